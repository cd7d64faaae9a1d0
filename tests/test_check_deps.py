"""scripts/check_deps.py: PyPI's newest release of a dependency bounded above must be inside the bound, or a
documented choice; PyPI out of reach never fails CI."""
import importlib.util
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("check_deps", ROOT / "scripts" / "check_deps.py")
D = importlib.util.module_from_spec(spec)
spec.loader.exec_module(D)


def test_pyproject_bounds_open_clip_to_the_major_tested():
    import open_clip

    bounds = D.upper_bounds((ROOT / "pyproject.toml").read_text())
    spec_, upper = bounds["open_clip_torch"]
    assert spec_ == ">=3.0,<4" and upper == (4,)
    assert D.version_tuple(open_clip.__version__) < upper  # the installed (tested) one is inside


def test_a_newer_major_fails_in_one_line_unless_a_choice_records_why():
    bounds = D.upper_bounds('[project]\ndependencies = [\n    "open_clip_torch>=3.0,<4",\n    "torch>=2.1",\n]\n'
                            '[project.optional-dependencies]\ntest = ["pytest>=7,<9"]\n')
    assert bounds == {"open_clip_torch": (">=3.0,<4", (4,))}  # unbounded and optional ones are not checked
    assert D.check(bounds, {"open_clip_torch": "3.9.1"}, {}) == ([], [])
    failures, _ = D.check(bounds, {"open_clip_torch": "4.0.0"}, {})
    assert failures == ["check_deps: open_clip_torch 4.0.0 is on PyPI, outside pyproject.toml's "
                        "open_clip_torch>=3.0,<4: test it and raise the bound, or record why to stay below it in "
                        ".ci/deps_choices.txt (`open_clip_torch 4: why`)"]
    chosen = D.choices("# a comment\nopen-clip-torch 4: drops load_openai_model  # issue 12\n")
    failures, warnings = D.check(bounds, {"open_clip_torch": "4.0.0"}, chosen)
    assert failures == [] and "drops load_openai_model" in warnings[0]
    assert D.check(bounds, {"open_clip_torch": "5.0.0"}, chosen)[0]  # a choice covers one major only


def test_pypi_out_of_reach_is_a_warning_and_exit_0(tmp_path):
    # pip pointed at an index that does not exist, no network wanted: the script warns and succeeds
    env = {"PATH": "/usr/bin:/bin", "PIP_INDEX_URL": "http://127.0.0.1:9/simple", "PIP_NO_INDEX": "",
           "PIP_FIND_LINKS": "", "PIP_CONFIG_FILE": "/dev/null", "PIP_RETRIES": "0", "PIP_TIMEOUT": "2"}
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "check_deps.py")], capture_output=True, text=True,
                          env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "could not ask PyPI for open_clip_torch's newest release" in done.stderr
