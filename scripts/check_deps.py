#!/usr/bin/env python3
"""CI: every dependency that pyproject.toml bounds above (`name>=A,<N`) still admits the newest release on PyPI.

    python scripts/check_deps.py            # asks `pip index versions NAME` for each bounded dependency

A fresh `pip install` takes the newest release inside the bound; a new major outside it is untested here, so this
fails (one line) until the bound is raised after testing it, or until .ci/deps_choices.txt records the choice to
stay below it (a line `NAME MAJOR: why`). PyPI out of reach (an offline runner) is a warning, never a failure.
"""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = ROOT / "pyproject.toml"
CHOICES = ROOT / ".ci" / "deps_choices.txt"
# "open_clip_torch>=3.0,<4" (in [project] dependencies): name, then an upper bound
BOUNDED = re.compile(r'^\s*"([A-Za-z0-9_.\-]+)\s*([^"]*?<\s*([0-9][0-9.]*)[^"]*)"', re.M)


def upper_bounds(text: str) -> dict[str, tuple[str, tuple[int, ...]]]:
    """{name: (its specifier, the version it must stay below)} of the dependencies bounded by `<N`."""
    project = text.split("[project.optional-dependencies]")[0]
    out = {}
    for name, spec, upper in BOUNDED.findall(project):
        if "<=" in spec:
            continue
        out[name] = (spec.strip(), version_tuple(upper))
    return out


def version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", text.split("rc")[0].split("a")[0].split("b")[0])[:3])


def choices(text: str) -> dict[tuple[str, int], str]:
    """.ci/deps_choices.txt: `NAME MAJOR: why` lines (# comments) -> {(name, major): why}."""
    out = {}
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        m = re.fullmatch(r"([A-Za-z0-9_.\-]+)\s+(\d+)\s*:\s*(.+)", line)
        if m:
            out[(normalise(m[1]), int(m[2]))] = m[3].strip()
    return out


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def newest_on_pypi(name: str, timeout: float = 60) -> str | None:
    """The newest release `pip index versions` reports, or None when it cannot say (no network, no index)."""
    try:
        done = subprocess.run([sys.executable, "-m", "pip", "index", "versions", name], capture_output=True,
                              text=True, timeout=timeout)
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(rf"^{re.escape(name)}\s*\(([^)]+)\)", done.stdout, re.M | re.I)
    return m[1].strip() if done.returncode == 0 and m else None


def check(bounds: dict, newest: dict[str, str | None], chosen: dict[tuple[str, int], str]) -> tuple[list, list]:
    """-> (failures, warnings), one line each."""
    failures, warnings = [], []
    for name, (spec, upper) in bounds.items():
        version = newest.get(name)
        if version is None:
            warnings.append(f"check_deps: warning: could not ask PyPI for {name}'s newest release; not checked")
            continue
        if version_tuple(version) < upper:
            continue
        major = version_tuple(version)[0]
        why = chosen.get((normalise(name), major))
        if why:
            warnings.append(f"check_deps: {name} {version} is outside {spec}, kept so by {CHOICES.name}: {why}")
            continue
        failures.append(f"check_deps: {name} {version} is on PyPI, outside pyproject.toml's {name}{spec}: test it "
                        f"and raise the bound, or record why to stay below it in .ci/deps_choices.txt "
                        f"(`{name} {major}: why`)")
    return failures, warnings


def main() -> int:
    bounds = upper_bounds(PYPROJECT.read_text())
    chosen = choices(CHOICES.read_text()) if CHOICES.is_file() else {}
    failures, warnings = check(bounds, {name: newest_on_pypi(name) for name in bounds}, chosen)
    for line in warnings:
        print(line, file=sys.stderr)
    for line in failures:
        print(line, file=sys.stderr)
    if not failures:
        print(f"check_deps: {', '.join(f'{n}{s}' for n, (s, _) in bounds.items()) or 'no bounded dependency'}: ok")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
