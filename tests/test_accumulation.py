"""Gradient accumulation (train.accum_steps, bench/accumulate.py): a step split into micro-batches is the step.

For every registered method that trains: one trainer step on a batch of 12 with accum_steps 1, 2 and 3 gives the
same loss, gradients and weights (fp32 on the CPU, to float rounding); a run with accum_steps 2 resumes
exactly; the key is checked at load time and is not part of a job's identity."""
import contextlib
import sys

import pytest
import torch

from bench import accumulate
from bench import results
from bench.cards import load_card
from bench.data import build_task
from bench.layouts import load_image
from bench.errors import BenchError
from bench.method import METHODS, build_method, load_builtin_methods
from bench.models import load_clip
from bench.prepare import prepare
from bench.train import make_optimizer, run, train_step
from methods.erm import ERM
from methods.flyp import FLYP
from tests.conftest import tiny_config

load_builtin_methods()
TRAINED = [name for name, cls in METHODS.items() if cls.trains]
# Small settings where a method's defaults are sized for real use; 2 anchor pairs, so that 3 micro-batches
# leave one without any (ARF's anchors are split with the batch).
TEST_HPARAMS = {"arf": {"pool_size": 400, "top_k": 64, "retrieval_batch": 2}}
B = 12


def trainer_batch(task, clip, n=B):
    """A batch as the trainer builds it: n training images, 4 from each of the 3 training domains."""
    items = task.train_items()
    domains = [d for d in task.train_domains for _ in task.train[d]]
    idx = torch.tensor([i for d in task.train_domains for i in
                        [j for j, dd in enumerate(domains) if dd == d][:n // len(task.train_domains)]])
    images = torch.stack([clip.preprocess_train(load_image(items[i][0])) for i in idx.tolist()])
    return {"images": images, "labels": torch.tensor([items[i][1] for i in idx.tolist()]), "index": idx,
            "domains": torch.tensor([task.train_domains.index(domains[i]) for i in idx.tolist()]), "step": 3,
            "total_steps": 10, "deterministic_images": False}


def one_step(method, batch, accum_steps):
    """The trainer's step (AdamW, clipping at 1) from the method's current weights -> (loss, logs, grads, weights)."""
    named = method.trainable_parameters()
    optimizer = make_optimizer(named, 1e-3, 0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    torch.manual_seed(1234)  # the trainer seeds torch per step
    loss, logs = train_step(method, dict(batch), optimizer, scheduler, [p for _, p in named], 1.0,
                            contextlib.nullcontext, accum_steps)
    return (loss, logs, {n: p.grad.clone() for n, p in named if p.grad is not None},
            {n: p.detach().clone() for n, p in named})


def assert_close_tensors(got, want, rtol, what):
    assert got.keys() == want.keys(), what
    for name in want:
        scale = want[name].abs().max().item()
        err = (got[name] - want[name]).abs().max().item()
        assert err <= rtol * max(scale, 1e-12), f"{what} {name}: max error {err:.3g} against max {scale:.3g}"


@pytest.mark.parametrize("name", TRAINED)
def test_a_step_from_micro_batches_equals_the_unsplit_step(embedded_root, name):
    assert METHODS.get(name).accumulation_route() in ("mean", "features")
    task = build_task(load_card("embedded"), embedded_root, ("sketch",), 0.2, 0)
    clip = load_clip("TinyCLIP-32", str(embedded_root / "tiny.pt"))
    torch.manual_seed(0)  # a method's own random init (LoRA's A) does not depend on the tests run before
    method = build_method(name, clip, task, TEST_HPARAMS.get(name, {}))
    method.train()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # away from the pretrained weights, where CAR-FT's and Lipsum-FT's terms vanish
        for _, p in method.trainable_parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=gen))
    start = {n: p.clone() for n, p in method.checkpoint_state().items()}
    batch = trainer_batch(task, clip)
    loss1, logs1, grads1, weights1 = one_step(method, batch, 1)
    assert any(g.abs().sum() > 0 for g in grads1.values())
    for k in (2, 3):
        method.load_checkpoint_state(start)
        loss, logs, grads, weights = one_step(method, batch, k)
        assert loss == pytest.approx(loss1, rel=1e-6), k
        assert logs.keys() == logs1.keys() and all(logs[m] == pytest.approx(logs1[m], rel=1e-5, abs=1e-7)
                                                   for m in logs1), (k, logs, logs1)
        assert_close_tensors(grads, grads1, 1e-5, f"accum_steps {k}: gradient of")
        # AdamW's first step moves a weight by lr * g / (|g| + 1e-8): by lr * sign(g) where |g| is well above
        # 1e-8, the same to a few ulps of the weight; where g is float noise (~0), by anything up to 2 lr
        checked = moved = 0
        for n, w in weights.items():
            g = grads1[n].abs()
            sure = (g > 1e-6) & (g > 1e-3 * g.max())
            assert torch.allclose(w[sure], weights1[n][sure], rtol=3e-7, atol=1e-8), (k, n)
            assert (w - weights1[n]).abs().max() <= 2e-3 + 1e-8, (k, n)
            checked, moved = checked + int(sure.sum()), moved + int((g > 0).sum())
        assert checked > 0.9 * moved  # the close check covers nearly every weight the gradient moves


def test_split_batch_cuts_rows_and_shares_the_rest():
    batch = {"images": torch.arange(12).view(6, 2), "labels": torch.arange(6), "index": torch.arange(6),
             "anchor": torch.arange(2), "shared": torch.arange(5), "step": 4}
    parts = accumulate.split_batch(batch, 3, ("anchor",))
    assert [p["labels"].tolist() for p in parts] == [[0, 1], [2, 3], [4, 5]]
    assert [p["anchor"].tolist() for p in parts] == [[0], [1], []]
    assert all(p["shared"] is batch["shared"] and p["step"] == 4 for p in parts)
    assert torch.equal(torch.cat([p["images"] for p in parts]), batch["images"])


def test_the_route_is_read_from_the_class_that_defines_the_loss():
    class OwnLoss(ERM):  # a loss of its own: ERM's promise that its loss is a mean does not carry over
        def loss(self, batch):
            return super().loss(batch)

    class OwnMeanLoss(OwnLoss):
        loss_is_mean = True

        def loss(self, batch):
            return super().loss(batch)

    class NewFeatures(FLYP):  # features redefined, the loss still derived from them
        def loss_from_features(self, features, batch):
            return super().loss_from_features(features, batch)

    class FlypLoss(FLYP):  # a loss written over FLYP's: it is not loss_from_features(features(...))
        def loss(self, batch):
            return super().loss(batch)

    assert [c.accumulation_route() for c in (ERM, OwnLoss, OwnMeanLoss, FLYP, NewFeatures, FlypLoss)] == \
        ["mean", None, "mean", "features", "features", None]


def test_accum_steps_is_checked_at_load_time(embedded_root):
    with pytest.raises(BenchError, match=r"^test: train.accum_steps: 5 does not divide train.batch_size 12; set a "
                                         r"divisor"):
        tiny_config(embedded_root, **{"train.accum_steps": 5})
    with pytest.raises(BenchError, match=r"^test: train.accum_steps: 0 is out of range; set it at least 1"):
        tiny_config(embedded_root, **{"train.accum_steps": 0})


@pytest.fixture
def no_route_plugin(tmp_path):
    path = tmp_path / "own_loss.py"
    path.write_text("import torch.nn.functional as F\nfrom bench.method import register_method\n"
                    "from methods.erm import ERM\n\n\n@register_method('accum_own_loss')\nclass OwnLoss(ERM):\n"
                    "    def loss(self, batch):\n"
                    "        return F.cross_entropy(self.predict(batch['images']), batch['labels'], reduction='sum')\n")
    yield path
    METHODS.unregister("accum_own_loss")
    for module in [m for m in sys.modules if m.startswith("rft_bench_plugin_own_loss")]:
        del sys.modules[module]


def test_a_method_with_no_route_is_refused_at_load_time(embedded_root, no_route_plugin):
    cfg = tiny_config(embedded_root, method="accum_own_loss", plugins=[str(no_route_plugin)])
    prepare(cfg)  # without accumulation it runs
    with pytest.raises(BenchError, match=r"^test\.yaml: train.accum_steps: 2, but method 'accum_own_loss' has no "
                                         r"accumulation route; set train.accum_steps: 1"):
        prepare(tiny_config(embedded_root, method="accum_own_loss", plugins=[str(no_route_plugin)],
                            **{"train.accum_steps": 2}), "test.yaml")
    # zeroshot trains nothing: nothing to accumulate, nothing to refuse
    prepare(tiny_config(embedded_root, method="zeroshot", **{"train.accum_steps": 2}))


def test_accum_steps_is_not_part_of_a_jobs_identity(embedded_root):
    one = prepare(tiny_config(embedded_root, method="flyp"))
    two = prepare(tiny_config(embedded_root, method="flyp", **{"train.accum_steps": 2}))
    assert one.job_id == two.job_id and one.seed == two.seed


def test_a_run_with_accumulation_resumes_exactly_and_matches_the_unsplit_run(embedded_root, tmp_path):
    cfg = tiny_config(embedded_root, method="flyp", **{"train.accum_steps": 2})
    unbroken = run(cfg, tmp_path / "a", progress=False)
    broken = run(cfg, tmp_path / "b", progress=False, stop_after=4)
    assert not (broken / results.DONE).is_file()
    run(cfg, broken, progress=False)
    a, b = torch.load(unbroken / results.FINAL)["method"], torch.load(broken / results.FINAL)["method"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # ... and it trains as the unsplit run does: the same training losses, to float rounding (AdamW turns the
    # rounding of near-zero gradients into weight differences of up to 2 lr a step, so weights are not compared)
    plain = run(tiny_config(embedded_root, method="flyp"), tmp_path / "c", progress=False)
    train_loss = lambda d: [r["value"] for r in results.read_rows(d / results.RESULTS) if r["metric"] == "loss"]
    assert train_loss(unbroken) == pytest.approx(train_loss(plain), rel=1e-5)
