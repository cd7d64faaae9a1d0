"""A user registers a method from their own file, without editing the harness (docs/ADDING_A_METHOD.md)."""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench import results
from bench.errors import BenchError
from bench.method import METHODS, load_plugin, resolve_hparams
from bench.train import run
from tests.conftest import tiny_config

DOC = Path(__file__).resolve().parent.parent / "docs" / "ADDING_A_METHOD.md"


@pytest.fixture
def plugin_file(tmp_path):
    code = re.search(r"```python\n(.*?)```", DOC.read_text(), re.S).group(1)
    path = tmp_path / "userdir" / "l2sp.py"
    path.parent.mkdir()
    path.write_text(code)
    yield path
    METHODS.unregister("my_l2sp")
    for name in [m for m in sys.modules if m.startswith("rft_bench_plugin_l2sp")]:
        del sys.modules[name]


def test_the_documented_example_runs_end_to_end(plugin_file, embedded_root, tmp_path):
    cfg = tiny_config(embedded_root, method="my_l2sp", plugins=[str(plugin_file)], hparams={"alpha": 0.5})
    out = run(cfg, tmp_path / "run", progress=False)
    rows = results.read_rows(out / results.RESULTS)
    assert (out / results.DONE).is_file() and any(r["metric"] == "penalty" and r["value"] > 0 for r in rows)
    assert torch.load(out / results.FINAL)["method"].keys() >= {"head.weight"}
    assert json.loads((out / results.CONFIG).read_text())["baseline"] is None  # extends ERM: not a baseline itself


def test_cli_lists_a_plugin_method(plugin_file):
    proc = subprocess.run([sys.executable, "-m", "bench", "methods", "--plugin", str(plugin_file)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "my_l2sp" in proc.stdout and "L2-SP" in proc.stdout


def test_plugin_errors_are_one_line(tmp_path):
    with pytest.raises(BenchError, match="not found"):
        load_plugin(tmp_path / "missing.py")
    broken = tmp_path / "broken.py"
    broken.write_text("import no_such_module_anywhere\n")
    with pytest.raises(BenchError, match=r"broken.py failed to import \(ModuleNotFoundError"):
        load_plugin(broken)


def test_a_plugin_whose_hparams_do_not_extend_erms_still_loads(tmp_path):
    """Plugins written before Hparams inherited (the documented example had a plain `class Hparams:` without
    label_smoothing): ERM.check_hparams must not require the key."""
    path = tmp_path / "old_style.py"
    path.write_text("from dataclasses import dataclass\nfrom bench.method import register_method\n"
                    "from methods.erm import ERM\n\n\n@register_method('old_style_erm')\nclass OldStyle(ERM):\n"
                    "    @dataclass(frozen=True)\n    class Hparams:\n        alpha: float = 0.1\n")
    try:
        load_plugin(path)
        assert resolve_hparams("old_style_erm", {"alpha": 0.5}).alpha == 0.5
    finally:
        METHODS.unregister("old_style_erm")
        for module in [m for m in sys.modules if m.startswith("rft_bench_plugin_old_style")]:
            del sys.modules[module]


@pytest.mark.parametrize("name", ["erm_head_no_decay", "erm_ema_teacher"])
def test_the_documented_hook_examples_run_and_resume(name, embedded_root, tmp_path):
    """docs/ADDING_A_METHOD.md's hook examples, as a user's own files: each runs, and resumes exactly."""
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)
    code = next(b for b in blocks if f'@register_method("{name}")' in b)
    path = tmp_path / "userdir" / f"{name}.py"
    path.parent.mkdir()
    path.write_text(code)
    try:
        cfg = tiny_config(embedded_root, method=name, plugins=[str(path)])
        a = run(cfg, tmp_path / "a", progress=False)
        b = run(cfg, tmp_path / "b", progress=False, stop_after=3)
        ckpt = torch.load(b / results.CHECKPOINT)
        if name == "erm_ema_teacher":
            assert ckpt["method_extra"] and all(k.startswith("teacher.") for k in ckpt["method_extra"])
        else:  # the method's two groups, the head's without decay
            assert [g["weight_decay"] for g in ckpt["optimizer"]["param_groups"]] == [cfg.train.weight_decay, 0.0]
        run(cfg, b, progress=False)
        wa, wb = torch.load(a / results.FINAL)["method"], torch.load(b / results.FINAL)["method"]
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    finally:
        METHODS.unregister(name)
        for module in [m for m in sys.modules if m.startswith(f"rft_bench_plugin_{name}")]:
            del sys.modules[module]


def test_the_documented_evaluating_example_runs(embedded_root, tmp_path):
    """docs/ADDING_A_METHOD.md's evaluating() example, as a user's own file: it trains and evaluates."""
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)
    code = next(b for b in blocks if '@register_method("text_head_ce")' in b)
    path = tmp_path / "userdir" / "text_head_ce.py"
    path.parent.mkdir()
    path.write_text(code)
    try:
        cfg = tiny_config(embedded_root, method="text_head_ce", plugins=[str(path)])
        out = run(cfg, tmp_path / "run", progress=False)
        acc = {r["step"]: r["value"] for r in results.read_rows(out / results.RESULTS)
               if r["metric"] == "acc" and r["role"] == "id_val"}
        assert (out / results.DONE).is_file() and len(acc) >= 2
    finally:
        METHODS.unregister("text_head_ce")
        for module in [m for m in sys.modules if m.startswith("rft_bench_plugin_text_head_ce")]:
            del sys.modules[module]
