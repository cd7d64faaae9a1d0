"""SPD: Selective Projection Decay (Tian, Huang, Kira, NeurIPS 2024; "Rethinking Weight Decay for Robust
Fine-Tuning of Foundation Models", arXiv 2411.01713; GT-RIPL/Selective-Projection-Decay, `adamSPD.py`).

ERM's loss (image tower + zero-shot-initialised head, cross-entropy), trained by the method's own optimizer,
AdamSPD, through the optimizer hook (Method.make_optimizer). AdamSPD is Adam without weight decay, followed,
per parameter tensor ("layer"), by a selective projection towards the pretrained weights theta_0:

    theta_new = Adam step of theta_{t-1}
    c_t = -g_t . (theta_{t-1} - theta_0)                  (the selection condition, from the raw gradient)
    if c_t < 0:                          (the descent direction points back towards theta_0: the layer's loss
                                          reduction is inconsistent with its progress so far)
        r_t = clip((||theta_new - theta_0|| - ||theta_{t-1} - theta_0||) / ||theta_new - theta_0||, 0, 1)
        theta_new = theta_new - lambda * r_t * (theta_new - theta_0)

lambda is the reference's `weight_decay` (here hparams.strength); at lambda = 1 a selected layer's distance to
theta_0 does not grow. The rule is the one of the reference's `adamSPD.py` (AdamSPD.step and _ratio; its README
shows the usage: every trainable parameter in one group with its pretrained copy as `pre`); the code here is
written anew, the Adam part with the same operations as torch.optim.AdamW (foreach=False), so that strength 0 is
AdamW with weight decay 0 exactly. Differences: r_t is 0 where ||theta_new - theta_0|| is 0 (the reference divides
by zero there); the pretrained copies live in the optimizer object, not in its param groups, so its
state_dict holds Adam's moments only (theta_0 is rebuilt from the pretrained weights on resume).
train.weight_decay is not used: SPD replaces weight decay.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from bench.method import check_range, register_method
from methods.erm import ERM


class AdamSPD(torch.optim.Optimizer):
    """Adam with Selective Projection Decay towards `anchors` (one tensor per parameter, in the same order as the
    params of the groups; None: towards 0, the reference's PEFT mode)."""

    def __init__(self, params, anchors: list[torch.Tensor] | None, lr: float = 1e-3, betas=(0.9, 0.999),
                 eps: float = 1e-8, strength: float = 1.0):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, strength=strength))
        flat = [p for g in self.param_groups for p in g["params"]]
        if anchors is not None and len(anchors) != len(flat):
            raise ValueError(f"{len(anchors)} anchors for {len(flat)} parameters")
        self.anchors = {id(p): a for p, a in zip(flat, anchors)} if anchors is not None else None
        self.projected: dict[str, int] = {}  # per step: how many tensors met the condition (logging, tests)

    def anchor(self, p: torch.Tensor) -> torch.Tensor | None:
        return None if self.anchors is None else self.anchors[id(p)]

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        n_projected = n_seen = 0
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr, eps, strength = group["lr"], group["eps"], group["strength"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                state = self.state[p]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                n_seen += 1
                pre = self.anchor(p)
                selected = False
                if strength != 0:
                    delta = p - pre if pre is not None else p
                    selected = bool(-(grad * delta).sum() < 0)  # c_t < 0
                    if selected:
                        prev_norm = torch.linalg.vector_norm(delta)
                # Adam, as torch.optim.adam._single_tensor_adam with weight_decay 0
                state["step"] += 1
                step = state["step"].item()
                state["exp_avg"].lerp_(grad, 1 - beta1)
                state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad.conj(), value=1 - beta2)
                step_size = lr / (1 - beta1 ** step)
                denom = (state["exp_avg_sq"].sqrt() / math.sqrt(1 - beta2 ** step)).add_(eps)
                p.addcdiv_(state["exp_avg"], denom, value=-step_size)
                if selected:
                    n_projected += 1
                    new_delta = p - pre if pre is not None else p.clone()
                    curr_norm = torch.linalg.vector_norm(new_delta)
                    ratio = torch.where(curr_norm > 0, (curr_norm - prev_norm) / curr_norm.clamp_min(1e-30),
                                        torch.zeros_like(curr_norm)).clamp(0.0, 1.0)
                    p.sub_(strength * ratio * new_delta)
        self.projected = {"projected": n_projected, "tensors": n_seen}
        return loss


@register_method("spd")
class SPD(ERM):
    @dataclass(frozen=True)
    class Hparams(ERM.Hparams):
        strength: float = 1.0  # lambda, the reference's weight_decay of AdamSPD (default: UNVERIFIED, docs/METHODS.md)

    @classmethod
    def check_hparams(cls, hparams):
        super().check_hparams(hparams)
        check_range(hparams, "strength", 0, what="lambda: 0 is Adam without weight decay")

    def make_optimizer(self, named_params, lr, weight_decay):
        # theta_0: the trainable parameters as they are now, before the first step (the pretrained weights and
        # the zero-shot head); a resumed run builds its optimizer before loading the checkpoint, so it gets the
        # same theta_0.
        anchors = [p.detach().clone() for _, p in named_params]
        return AdamSPD([{"params": [p for _, p in named_params]}], anchors, lr=lr, strength=self.hparams.strength)
