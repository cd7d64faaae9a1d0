"""LoRA (methods/lora.py): step 0 is the zero-shot model, only A and B train, the parametrized fused attention equals
attention with the explicitly merged weights W + scale * B @ A, a run resumes exactly and WiSE-FT's ends are exact."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bench import results
from bench.errors import BenchError
from bench.method import resolve_hparams
from bench.train import run
from methods.lora import LoRADelta
from tests.conftest import tiny_config
from tests.test_methods import assert_wise_ends, batch_of, make


def randomize(method, seed=0, scale=0.1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in method.trainable_parameters():
            p.copy_(scale * torch.randn(p.shape, generator=g))


def attention_modules(method):
    return [m for m in method.model.modules() if isinstance(m, nn.MultiheadAttention)]


def test_step_0_is_the_zeroshot_model_exactly(embedded_root):
    zs, task, clip = make(embedded_root, "zeroshot")
    lora, _, _ = make(embedded_root, "lora")
    batch = batch_of(task, clip)
    zs.eval(), lora.eval()
    with torch.no_grad():
        assert torch.equal(lora.predict(batch["images"]), zs.predict(batch["images"]))
    # and the training loss is the CE of CLIP-LoRA's logits (first template) from the zero-shot towers
    with torch.no_grad():
        head = F.normalize(clip.model.encode_text(clip.tokenize([task.templates[0].format(c) for c in task.seen_names])), dim=-1)
        logits = zs.logit_scale_init * F.normalize(clip.model.encode_image(batch["images"]), dim=-1) @ head.t()
        assert torch.allclose(lora.loss(batch), F.cross_entropy(logits, batch["labels"]), atol=1e-5)


def test_only_lora_parameters_train_and_get_gradients(embedded_root):
    method, task, clip = make(embedded_root, "lora")
    n_blocks = len(attention_modules(method))
    trainable = dict(method.trainable_parameters())
    assert trainable and all(n.rsplit(".", 2)[-2] in ("A", "B") for n in trainable)
    assert len(trainable) == 2 * 3 * n_blocks  # q, k, v in every block of both towers
    assert sum(p.numel() for p in trainable.values()) < 0.1 * sum(p.numel() for p in method.model.parameters())
    method.loss(batch_of(task, clip)).backward()
    with_grad = {n for n, p in method.named_parameters() if p.grad is not None}
    assert with_grad == set(trainable)  # B = 0 at step 0: A's gradient is 0 but defined, B's is not 0
    assert all(trainable[n].grad.abs().sum() > 0 for n in trainable if n.endswith("B.0"))
    assert all(trainable[n].grad.abs().sum() == 0 for n in trainable if n.endswith("A.0"))


@pytest.mark.parametrize("projections", [("q", "k", "v"), ("k", "o"), ("q", "v", "o")])
def test_fused_attention_equals_attention_with_the_merged_weights(embedded_root, projections):
    method, _, _ = make(embedded_root, "lora", {"projections": list(projections), "rank": 3, "alpha": 2.0})
    mha = attention_modules(method)[0]
    x = torch.randn(2, 5, mha.embed_dim, generator=torch.Generator().manual_seed(1))
    mask = torch.triu(torch.full((5, 5), float("-inf")), 1)
    original = copy.deepcopy(mha)  # B = 0: the parametrization is the identity, exactly
    for m in (original, mha):
        m.eval()
    with torch.no_grad():
        plain = nn.MultiheadAttention(mha.embed_dim, mha.num_heads, batch_first=mha.batch_first).eval()
        plain.in_proj_weight.copy_(mha.in_proj_weight), plain.in_proj_bias.copy_(mha.in_proj_bias)
        plain.out_proj.weight.copy_(mha.out_proj.weight), plain.out_proj.bias.copy_(mha.out_proj.bias)
    # with autograd on, as in training (evaluation's no-grad path: test_step_0_is_the_zeroshot_model_exactly)
    assert torch.equal(mha(x, x, x, need_weights=False, attn_mask=mask)[0],
                       plain(x, x, x, need_weights=False, attn_mask=mask)[0])
    with torch.no_grad():
        randomize(method, seed=2)
        adapted = mha(x, x, x, need_weights=False, attn_mask=mask)[0]
        # the merged weights, written out: W + alpha / sqrt(r) * B @ A on each adapted row block
        scale, d = 2.0 / math.sqrt(3), mha.embed_dim
        w_in = plain.in_proj_weight.clone()
        w_out = plain.out_proj.weight.clone()
        deltas = [m for m in method.lora_modules if m in set(mha.modules())]
        pairs = [(a, b) for delta in deltas for a, b in zip(delta.A, delta.B)]
        for i, p in enumerate(q for q in ("q", "k", "v") if q in projections):
            a, b = pairs[i]
            j = ("q", "k", "v").index(p)
            w_in[j * d:(j + 1) * d] += scale * b @ a
        if "o" in projections:
            a, b = pairs[-1]
            w_out += scale * b @ a
        plain.in_proj_weight.copy_(w_in), plain.out_proj.weight.copy_(w_out)
    merged = plain(x, x, x, need_weights=False, attn_mask=mask)[0]
    with torch.no_grad():
        assert not torch.allclose(adapted, original(x, x, x, need_weights=False, attn_mask=mask)[0], atol=1e-3)
        assert torch.allclose(adapted, merged, atol=1e-6)
        # unadapted projections keep their pretrained rows exactly
        for j, p in enumerate(("q", "k", "v")):
            if p not in projections:
                assert torch.equal(mha.in_proj_weight[j * d:(j + 1) * d], original.in_proj_weight[j * d:(j + 1) * d])
        if "o" not in projections:
            assert torch.equal(mha.out_proj.weight, original.out_proj.weight)


def test_lora_delta_is_scale_b_a():
    torch.manual_seed(0)
    w = torch.randn(12, 4)
    delta = LoRADelta(w, [False, True, True], rank=2, scale=0.5)
    assert torch.equal(delta(w), w)  # B = 0
    with torch.no_grad():
        for b in delta.B:
            b.normal_()
    out = delta(w)
    assert torch.equal(out[:4], w[:4])
    assert torch.allclose(out[4:8], w[4:8] + 0.5 * delta.B[0] @ delta.A[0])
    assert torch.allclose(out[8:], w[8:] + 0.5 * delta.B[1] @ delta.A[1])
    bound = 1 / math.sqrt(4)  # kaiming_uniform_(a=sqrt(5)) on (r, d_in): U(-1/sqrt(d_in), 1/sqrt(d_in))
    assert all(a.abs().max() <= bound for a in delta.A)


@pytest.mark.parametrize("hparams, message", [
    ({"rank": 0}, "hparams.rank: 0 is out of range"),
    ({"alpha": 0.0}, "hparams.alpha: 0 leaves the model"),
    ({"alpha": -1.0}, "hparams.alpha: -1.0 is out of range"),
    ({"towers": ["visual", "audio"]}, "hparams.towers: ['visual', 'audio'] must list distinct items"),
    ({"towers": []}, "hparams.towers: [] must list"),
    ({"projections": ["q", "q"]}, "hparams.projections: ['q', 'q'] must list distinct items of q, k, v, o"),
])
def test_bad_hparams_fail_with_one_line(hparams, message):
    with pytest.raises(BenchError, match=__import__("re").escape(message)) as err:
        resolve_hparams("lora", hparams)
    assert "\n" not in str(err.value)


def test_rank_above_the_width_fails(embedded_root):
    with pytest.raises(BenchError, match="hparams.rank: 100000 exceeds the attention width"):
        make(embedded_root, "lora", {"rank": 100000})


def test_one_tower_only_adapts_that_tower(embedded_root):
    method, task, clip = make(embedded_root, "lora", {"towers": ["visual"]})
    assert all(n.startswith("model.visual.") for n, _ in method.trainable_parameters())


def test_a_run_resumes_exactly_and_wise_ends_are_exact(embedded_root, tmp_path):
    cfg = tiny_config(embedded_root, method="lora", wise_alphas=[0.0, 1.0])
    a = run(cfg, tmp_path / "a", progress=False)
    b = run(cfg, tmp_path / "b", progress=False, stop_after=4)
    run(cfg, b, progress=False)
    wa, wb = torch.load(a / results.FINAL)["method"], torch.load(b / results.FINAL)["method"]
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert all(".A." in k or ".B." in k for k in wa) and any(wa[k].abs().sum() > 0 for k in wa if ".B." in k)
    zs = run(tiny_config(embedded_root, method="zeroshot"), tmp_path / "zs", progress=False)
    assert_wise_ends(results.read_rows(a / results.RESULTS), zs)
