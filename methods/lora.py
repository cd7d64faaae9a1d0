"""LoRA: low-rank adaptation of the attention projections of both towers (CLIP-LoRA; Zanella & Ben Ayed, "Low-Rank
Few-Shot Adaptation of Vision-Language Models", CVPRW 2024; MaxZanella/CLIP-LoRA).

The pretrained weights stay frozen; each adapted projection W (d_out, d_in) becomes W + scale * B @ A with A (r,
d_in) initialised as nn.Linear's weight (kaiming_uniform_, a=sqrt(5)) and B (d_out, r) zero, so step 0 is the
zero-shot model exactly. scale = alpha / sqrt(r), as CLIP-LoRA's loralib/layers.py (LoRALayer: `self.scaling =
self.lora_alpha/math.sqrt(self.r)`, the LoRA paper's alpha / r commented out there). Defaults from CLIP-LoRA's
run_utils.py: every block (`--position all`) of both towers (`--encoder both`), projections q, k, v (`--params`;
its PlainMultiheadAttentionLoRA also accepts 'o', the output projection), r 2, alpha 1.

Attachment: open_clip's ResidualAttentionBlock keeps q, k, v in the fused in_proj_weight of nn.MultiheadAttention.
Where CLIP-LoRA replaces the module by its own split q/k/v attention, here the delta is a parametrization
(torch.nn.utils.parametrize) of in_proj_weight (its q, k, v row blocks) and of out_proj.weight, so open_clip's
fused attention runs unchanged on the merged weights (exactly the zero-shot model while B = 0).

Loss, as CLIP-LoRA's lora.py: cross-entropy of logit_scale * normalize(f(x)) @ normalize(g(prompts))^T, the
prompts being the first template filled with each seen class, run through the (adapted) text tower at every step;
the logit scale stays at its pretrained value. Evaluation uses the harness's template-averaged head from the
adapted text tower (CLIP-LoRA evaluates with the first template alone): the same protocol as every other method.

Not reproduced [a deviation, docs/METHODS.md]: CLIP-LoRA's dropout (0.25) on the input of each LoRA branch. It is
not a weight-space operation (it needs a non-fused attention), and the trainer's gradient accumulation needs
forward passes free of randomness of their own (bench/accumulate.py).

Checkpoints and WiSE-FT: the trainable parameters are the A and B matrices only, so checkpoint_state (and
final.pt) hold them. Post-hoc WiSE-FT interpolates them: B_a = a B, A_a = (1 - a) A_0 + a A, so the weight delta is
a * scale * B ((1 - a) A_0 + a A): exact at a = 0 (the zero-shot model) and a = 1 (the trained one), and in between
an interpolation of the LoRA factors, not of the merged weights (which would be a * scale * B A).
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from bench.errors import BenchError
from bench.method import Method, check_range, register_method

TOWERS = ("visual", "text")
PROJECTIONS = ("q", "k", "v", "o")


class LoRADelta(nn.Module):
    """A parametrization W -> W + scale * B @ A, on `blocks` equal row blocks of W (None: not adapted)."""

    def __init__(self, weight: torch.Tensor, blocks: list[bool], rank: int, scale: float):
        super().__init__()
        d_out, d_in = weight.shape
        if d_out % len(blocks):
            raise BenchError(f"a {d_out}-row weight does not split into {len(blocks)} projections")
        self.rows = d_out // len(blocks)
        self.blocks = list(blocks)
        self.scale = scale
        self.A = nn.ParameterList()
        self.B = nn.ParameterList()
        for on in blocks:
            if on:
                a = torch.empty(rank, d_in)  # on the CPU from torch's RNG: the same A for a given seed on any device
                nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # as CLIP-LoRA's init_lora_param (nn.Linear's init)
                self.A.append(nn.Parameter(a.to(weight)))
                self.B.append(nn.Parameter(torch.zeros(self.rows, rank, dtype=weight.dtype, device=weight.device)))

    def delta(self) -> torch.Tensor:
        pairs = iter(zip(self.A, self.B))
        parts = []
        for on in self.blocks:
            if on:
                a, b = next(pairs)
                parts.append(b @ a)
            else:
                parts.append(self.A[0].new_zeros(self.rows, self.A[0].shape[1]))
        return self.scale * torch.cat(parts)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + self.delta().to(weight.dtype)


def attach_lora(mha: nn.MultiheadAttention, projections: tuple[str, ...], rank: int, scale: float) -> list[LoRADelta]:
    """Parametrize mha's in_proj_weight (q, k, v rows) and out_proj.weight (o) -> the LoRA modules added."""
    if not mha._qkv_same_embed_dim:
        raise BenchError("lora: attention with separate q/k/v weights is not supported; use an open_clip "
                         "ResidualAttentionBlock (fused in_proj_weight)")
    if rank > mha.embed_dim:
        raise BenchError(f"hparams.rank: {rank} exceeds the attention width {mha.embed_dim}; set it lower")
    added = []
    qkv = [p in projections for p in ("q", "k", "v")]
    if any(qkv):
        delta = LoRADelta(mha.in_proj_weight.detach(), qkv, rank, scale)
        parametrize.register_parametrization(mha, "in_proj_weight", delta)
        added.append(delta)
    if "o" in projections:
        delta = LoRADelta(mha.out_proj.weight.detach(), [True], rank, scale)
        parametrize.register_parametrization(mha.out_proj, "weight", delta)
        added.append(delta)
    return added


def tower_module(model: nn.Module, tower: str) -> nn.Module:
    if tower == "visual":
        return model.visual
    return model.text if hasattr(model, "text") else model.transformer  # CustomTextCLIP, or CLIP's text transformer


@register_method("lora")
class LoRA(Method):
    @dataclass(frozen=True)
    class Hparams:
        rank: int = 2  # CLIP-LoRA --r
        alpha: float = 1.0  # CLIP-LoRA --alpha; scale = alpha / sqrt(rank)
        towers: tuple[str, ...] = TOWERS  # CLIP-LoRA --encoder both
        projections: tuple[str, ...] = ("q", "k", "v")  # CLIP-LoRA --params (default q k v)

    @classmethod
    def check_hparams(cls, hparams):
        check_range(hparams, "rank", 1, what="the rank of the low-rank matrices")
        check_range(hparams, "alpha", 0, what="scale = alpha / sqrt(rank)")
        if hparams.alpha == 0:
            raise BenchError("hparams.alpha: 0 leaves the model at its zero-shot weights; set it above 0")
        for key, choices in (("towers", TOWERS), ("projections", PROJECTIONS)):
            value = getattr(hparams, key)
            bad = [v for v in value if v not in choices]
            if not value or bad or len(set(value)) != len(value):
                raise BenchError(f"hparams.{key}: {list(value)!r} must list distinct items of "
                                 f"{', '.join(choices)}; set e.g. {list(choices[:3])}")

    def __init__(self, clip, task, hparams):
        super().__init__(clip, task, hparams)
        scale = hparams.alpha / math.sqrt(hparams.rank)
        self.lora_modules: list[LoRADelta] = []
        for tower in hparams.towers:
            blocks = [m for m in tower_module(self.model, tower).modules() if isinstance(m, nn.MultiheadAttention)]
            if not blocks:
                raise BenchError(f"hparams.towers: the {tower} tower of this model has no nn.MultiheadAttention; "
                                 f"drop it from towers")
            for mha in blocks:
                self.lora_modules += attach_lora(mha, hparams.projections, hparams.rank, scale)
        self.train_only(*self.lora_modules)
        # (K, L) tokens of CLIP-LoRA's training prompts: the first template, each seen class
        prompts = [self.templates[0].format(c) for c in task.seen_names]
        self.register_buffer("prompt_tokens", clip.tokenize(prompts).to(self.model.logit_scale.device),
                             persistent=False)

    @contextlib.contextmanager
    def evaluating(self):
        """The head is rebuilt, on first use, from the adapted text tower as it is at this evaluation."""
        self._head = None
        yield

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """The zero-shot head of the adapted text tower, cached between evaluations (as FLYP's); the same
        arithmetic as zeroshot's head (methods/erm.py LinearHead, zero bias), so that step 0 is that model exactly."""
        if getattr(self, "_head", None) is None:
            self._head = self.logit_scale_init * self.seen_head()
        return self.encode_image(images) @ self._head.t()

    loss_is_mean = True  # CE over the examples; the text head depends on the weights only, the same in every part

    def loss(self, batch):
        head = self.encode_text(self.prompt_tokens)  # (K, D), normalised, through the adapted text tower
        logits = self.logit_scale_init * self.encode_image(batch["images"]) @ head.t()
        return F.cross_entropy(logits, batch["labels"])
