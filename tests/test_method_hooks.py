"""The optional method hooks (own optimizer, after_step, extra state) and the defining properties of the methods
that use them: l2sp (L2-SP), spd (Selective Projection Decay), carot (CaRot)."""
import contextlib
import copy

import pytest
import torch

from bench import results
from bench.method import METHODS, Method
from bench.train import make_optimizer, run, train_step
from tests.conftest import tiny_config
from tests.test_methods import batch_of, loss_of, make, perturb


def trainer_step(method, batch, optimizer=None):
    """One trainer step (clipping at 1, constant lr) with the method's optimizer (or the trainer's AdamW)."""
    named = method.trainable_parameters()
    optimizer = optimizer or method.make_optimizer(named, 1e-3, 0.1) or make_optimizer(named, 1e-3, 0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    torch.manual_seed(0)
    train_step(method, dict(batch), optimizer, scheduler, [p for _, p in named], 1.0, contextlib.nullcontext)
    return {n: p.detach().clone() for n, p in named}


# ---- l2sp ----------------------------------------------------------------------------------------------------
def test_l2sp_with_alpha_0_takes_erms_step_exactly(embedded_root):
    erm, task, clip = make(embedded_root, "erm")
    l2sp, _, _ = make(embedded_root, "l2sp", {"alpha": 0.0, "beta": 0.0})
    perturb(erm)
    perturb(l2sp)  # away from w0, so that the penalty term is not zero by itself
    assert l2sp.regularizer() == 0
    batch = batch_of(task, clip, step=3)
    a, b = trainer_step(erm, batch), trainer_step(l2sp, batch)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_l2sp_penalty_gradient_is_alpha_times_the_distance_to_w0(embedded_root):
    method, task, clip = make(embedded_root, "l2sp", {"alpha": 0.3, "beta": 0.05})
    start = {n: p.detach().clone() for n, p in method.model.visual.named_parameters()}
    perturb(method)
    method.regularizer().backward()
    for n, p in method.model.visual.named_parameters():
        assert torch.allclose(p.grad, 0.3 * (p.detach() - start[n]), rtol=1e-5, atol=1e-8), n
    assert torch.allclose(method.head.weight.grad, 0.05 * method.head.weight.detach(), rtol=1e-5)
    assert method.head.bias.grad is None or not method.head.bias.grad.any()


# ---- spd -----------------------------------------------------------------------------------------------------
def test_spd_with_strength_0_is_adamw_without_weight_decay(embedded_root):
    spd, task, clip = make(embedded_root, "spd", {"strength": 0.0})
    erm = copy.deepcopy(spd)
    named = erm.trainable_parameters()
    adamw = torch.optim.AdamW([p for _, p in named], lr=1e-3, weight_decay=0.0, foreach=False)
    for step in range(3):  # several steps: the moments and bias corrections too
        batch = batch_of(task, clip, step=step)
        spd_opt = spd_opt if step else spd.make_optimizer(spd.trainable_parameters(), 1e-3, 0.1)
        a, b = trainer_step(spd, batch, spd_opt), trainer_step(erm, batch, adamw)
        assert all(torch.equal(a[k], b[k]) for k in a), step
        assert spd_opt.projected["projected"] == 0


def test_spd_projects_only_the_layers_whose_condition_is_met():
    """adamSPD.py's rule: project a layer iff c = -g . (theta - theta_0) < 0 (the descent direction points back
    towards the pretrained weights), by r = clip((|new - w0| - |old - w0|) / |new - w0|, 0, 1)."""
    from methods.spd import AdamSPD

    w0 = torch.tensor([1.0, 0.0])
    a, b = torch.nn.Parameter(torch.tensor([1.05, 0.0])), torch.nn.Parameter(torch.tensor([1.05, 0.0]))
    opt = AdamSPD([{"params": [a, b]}], [w0, w0.clone()], lr=0.1, strength=0.5)
    a.grad = torch.tensor([0.001, -1.0])  # c = -0.001 * 0.05 < 0: selected
    b.grad = torch.tensor([-0.001, -1.0])  # c > 0: not selected, left where Adam puts it
    opt.step()
    assert opt.projected == {"projected": 1, "tensors": 2}
    adam = torch.tensor([0.95, 0.1])  # Adam's first step: lr * sign(g), to float precision
    assert torch.allclose(b.detach(), torch.tensor([1.15, 0.1]), atol=1e-6)
    r = ((adam - w0).norm() - 0.05) / (adam - w0).norm()
    assert 0 < r < 1 and torch.allclose(a.detach(), adam - 0.5 * r * (adam - w0), atol=1e-6)
    # selected, but the step brought the layer closer to w0: r clips to 0, nothing moves
    c = torch.nn.Parameter(torch.tensor([2.0, 0.0]))
    opt = AdamSPD([{"params": [c]}], [w0], lr=0.1, strength=1.0)
    c.grad = torch.tensor([1.0, 0.0])
    opt.step()
    assert opt.projected["projected"] == 1 and torch.allclose(c.detach(), torch.tensor([1.9, 0.0]))
    # at the pretrained weights (the first step) c = 0: nothing is projected
    d = torch.nn.Parameter(w0.clone())
    opt = AdamSPD([{"params": [d]}], [w0], lr=0.1, strength=1.0)
    d.grad = torch.tensor([-1.0, 0.0])
    opt.step()
    assert opt.projected["projected"] == 0 and torch.allclose(d.detach(), torch.tensor([1.1, 0.0]))


# ---- carot ---------------------------------------------------------------------------------------------------
def test_carot_ema_teacher_after_a_step_is_m_teacher_plus_1_minus_m_student(embedded_root):
    from methods.carot import ema_momentum

    method, task, clip = make(embedded_root, "carot", {"ema_every": 2})
    perturb(method)  # the student moves; the teacher stays at the pretrained weights
    before = {n: p.clone() for n, p in method.teacher.named_parameters()}
    method.after_step(3, 10)  # 3 % 2: no update
    assert all(torch.equal(p, before[n]) for n, p in method.teacher.named_parameters())
    method.after_step(4, 10)
    m = ema_momentum(4, 10, 0.05, 0.9, 0.2)
    assert m == 0.9  # past the ramp (2 of 10 steps)
    student = dict(method.model.named_parameters())
    for n, p in method.teacher.named_parameters():
        assert torch.allclose(p, m * before[n] + (1 - m) * student[n], rtol=1e-6, atol=1e-7), n
    assert ema_momentum(1, 10, 0.05, 0.9, 0.2) == pytest.approx(0.05 + 0.85 / 2)


def test_carot_with_every_extra_weight_0_is_flyps_loss(embedded_root):
    flyp, task, clip = make(embedded_root, "flyp")
    carot, _, _ = make(embedded_root, "carot", {"lam_distill": 0.0, "lam_orth": 0.0, "lam_cross": 0.0})
    full, _, _ = make(embedded_root, "carot")
    batch = batch_of(task, clip, step=5)
    perturb(full)  # the student away from its teacher
    losses = []
    for method in (flyp, carot, full):
        torch.manual_seed(3)  # the same template draw
        losses.append(loss_of(method.loss(batch)))
    assert carot.teacher is None and torch.equal(losses[0], losses[1])
    torch.manual_seed(3)
    _, logs = full.loss(batch)
    assert logs.keys() == {"clip", "orth", "cross", "distill"} and logs["distill"] > 0
    assert losses[2].item() == pytest.approx(logs["clip"] + 0.2 * logs["orth"] + 0.05 * logs["cross"]
                                      + 1.5 * logs["distill"], rel=1e-5)


def test_carot_terms_by_hand():
    from methods.carot import distillation, orthogonality

    q, _ = torch.linalg.qr(torch.randn(6, 4))
    assert orthogonality(q) == pytest.approx(0, abs=1e-5)
    assert orthogonality(2 * q) == pytest.approx(3 * 2, rel=1e-5)  # ||4I - I||_F over 4 dims
    s, t = torch.randn(3, 3), torch.randn(3, 3)
    ce = lambda a, b: -(a.softmax(1) * b.log_softmax(1)).sum(1)  # noqa: E731
    assert distillation(s, t) == pytest.approx((ce(t, s) + ce(t.t(), s.t())).mean().item(), rel=1e-6)
    # equal logits: the cross-entropy is the teacher's entropy, the minimum over students
    assert distillation(t, t) < distillation(s, t)


# ---- the hooks in the trainer: resume with an EMA teacher and a custom optimizer --------------------------------
def final_weights(out):
    return torch.load(out / results.FINAL)["method"]


def test_resume_restores_the_ema_teacher_and_the_custom_optimizer(embedded_root, tmp_path, monkeypatch):
    carot = tiny_config(embedded_root, method="carot", hparams={"ema_every": 1})
    spd = tiny_config(embedded_root, method="spd", hparams={"strength": 1.0})
    for name, cfg in [("carot", carot), ("spd", spd)]:
        a = run(cfg, tmp_path / f"{name}-a", progress=False)
        b = run(cfg, tmp_path / f"{name}-b", progress=False, stop_after=3)
        ckpt = torch.load(b / results.CHECKPOINT)
        extra = ckpt["method_extra"]
        assert (extra and all(k.startswith("teacher.") for k in extra)) if name == "carot" else extra == {}
        assert ckpt["optimizer"]["state"]  # Adam's moments (AdamSPD's for spd)
        run(cfg, b, progress=False)
        wa, wb = final_weights(a), final_weights(b)
        assert all(torch.equal(wa[k], wb[k]) for k in wa), name
    # the same resume with the teacher left out of the checkpoint diverges: the test above can fail
    monkeypatch.setattr(METHODS.get("carot"), "extra_state", Method.extra_state)
    c = run(carot, tmp_path / "carot-c", progress=False, stop_after=3)
    run(carot, c, progress=False)
    wa, wc = final_weights(tmp_path / "carot-a"), final_weights(c)
    assert not all(torch.equal(wa[k], wc[k]) for k in wa)


def test_a_checkpoint_without_the_teacher_is_refused(embedded_root):
    method, _, _ = make(embedded_root, "carot")
    with pytest.raises(Exception, match="extra state does not match method 'carot'"):
        method.load_extra_state({})
    erm, _, _ = make(embedded_root, "erm")
    erm.load_extra_state({})  # a method without extra state reads a checkpoint of an older version


def test_make_optimizer_must_return_an_optimizer(embedded_root):
    from bench.errors import BenchError
    from bench.train import build_optimizer

    method, _, _ = make(embedded_root, "erm")
    method.make_optimizer = lambda named, lr, wd: [p for _, p in named]
    with pytest.raises(BenchError, match="make_optimizer returned list"):
        build_optimizer(method, method.trainable_parameters(), 1e-3, 0.1)
