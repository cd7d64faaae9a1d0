"""The trainer on a CUDA device: bf16 autocast, every method, exact resume. Skipped without a GPU."""
import pytest
import torch

from bench import results
from bench.method import METHODS, load_builtin_methods
from bench.prepare import autocast_for, resolve_device
from bench.train import run
from tests.conftest import tiny_config

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none is visible)")]

load_builtin_methods()
TRAINED = [name for name, cls in METHODS.items() if cls.trains]


def test_auto_picks_cuda_and_bf16():
    device = resolve_device("auto")
    assert device.type == "cuda"
    with autocast_for("auto", device)():
        x = torch.randn(4, 4, device=device)
        assert (x @ x).dtype == torch.bfloat16
    with autocast_for("fp32", device)():
        assert (x @ x).dtype == torch.float32


@pytest.mark.parametrize("method", TRAINED)
def test_every_method_trains_on_the_gpu_with_finite_loss(method, embedded_root, tmp_path):
    out = run(tiny_config(embedded_root, method=method, **{"train.device": "cuda"}), tmp_path / method,
              progress=False)
    rows = results.read_rows(out / results.RESULTS)
    losses = [r["value"] for r in rows if r["metric"] == "loss"]
    assert losses and all(torch.isfinite(torch.tensor(losses)))
    assert any(r["metric"] == "peak_mem_mb" and r["value"] > 0 for r in rows)
    state = torch.load(out / results.FINAL, map_location="cpu")["method"]
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


def test_resume_on_the_gpu_equals_an_unbroken_run(embedded_root, tmp_path):
    cfg = tiny_config(embedded_root, **{"train.device": "cuda", "train.precision": "fp32"})
    unbroken = run(cfg, tmp_path / "a", progress=False)
    broken = run(cfg, tmp_path / "b", progress=False, stop_after=4)
    run(cfg, broken, progress=False)
    a = torch.load(unbroken / results.FINAL, map_location="cpu")["method"]
    b = torch.load(broken / results.FINAL, map_location="cpu")["method"]
    for k in a:  # CUDA kernels may differ in the last bits between runs; the run itself must not
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)


def test_bf16_and_fp32_runs_agree_at_step_zero(embedded_root, tmp_path):
    """Autocast changes the arithmetic, not the protocol: the zero-shot evaluation is nearly the same."""
    fp32 = run(tiny_config(embedded_root, method="zeroshot", **{"train.device": "cuda", "train.precision": "fp32"}),
               tmp_path / "fp32", progress=False)
    bf16 = run(tiny_config(embedded_root, method="zeroshot", **{"train.device": "cuda", "train.precision": "bf16"}),
               tmp_path / "bf16", progress=False)
    acc = lambda d: {(r["role"], r["domain"]): r["value"] for r in results.read_rows(d / results.RESULTS) if r["metric"] == "acc"}
    a, b = acc(fp32), acc(bf16)
    assert a.keys() == b.keys()
    assert max(abs(a[k] - b[k]) for k in a) <= 0.1
