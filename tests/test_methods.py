"""Conformance tests over the whole method registry, and each method's defining property."""
import copy

import open_clip
import pytest
import torch

from bench import results
from bench.cards import load_card
from bench.data import build_task
from bench.losses import contrastive_loss, interpolate, kl_divergence
from bench.method import METHODS, Method, build_method, load_builtin_methods
from bench.models import load_clip
from bench.train import run
from tests.conftest import tiny_config

load_builtin_methods()
TRAINED = [name for name, cls in METHODS.items() if cls.trains]
# Small settings where a method's defaults are sized for real use.
TEST_HPARAMS = {"arf": {"pool_size": 400, "top_k": 64, "retrieval_batch": 8}}


def make(embedded_root, name, hparams=None, augment=False):
    cfg = tiny_config(embedded_root, method=name)
    task = build_task(load_card("embedded"), embedded_root, ("sketch",), 0.2, 0)
    clip = load_clip("TinyCLIP-32", cfg.model.pretrained)
    method = build_method(name, clip, task, {**TEST_HPARAMS.get(name, {}), **(hparams or {})})
    return method, task, clip


def batch_of(task, clip, n=8, step=0, total=10, deterministic=True):
    items = task.train_items()
    idx = torch.arange(0, len(items), max(1, len(items) // n))[:n]
    images = torch.stack([clip.preprocess_val(__import__("bench.layouts", fromlist=["load_image"]).load_image(items[i][0]))
                          for i in idx])
    labels = torch.tensor([items[i][1] for i in idx])
    return {"images": images, "labels": labels, "index": idx, "step": step, "total_steps": total,
            "deterministic_images": deterministic, "domains": torch.zeros(n, dtype=torch.long)}


def loss_of(out):
    return out[0] if isinstance(out, tuple) else out


def test_every_shipped_method_is_registered():
    assert {"zeroshot", "erm", "wise_ft", "flyp", "car_ft", "lipsum_ft", "lp_ft", "arf"} <= set(METHODS)


def test_a_shipped_method_that_extends_another_extends_its_hparams():
    """class Hparams(ERM.Hparams): the parent's keys (label_smoothing, which ERM.loss reads) are never lost."""
    for name, cls in METHODS.items():
        parent = cls.__mro__[1]
        if cls.__module__.startswith("methods.") and parent is not Method:
            assert issubclass(cls.Hparams, parent.Hparams), f"{name}: class Hparams({parent.__name__}.Hparams)"


@pytest.mark.parametrize("name", TRAINED)
def test_finite_loss_and_gradients_only_where_the_method_trains(embedded_root, name):
    method, task, clip = make(embedded_root, name)
    batch = batch_of(task, clip, step=9)
    loss = loss_of(method.loss(batch))
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    trainable = {n for n, _ in method.trainable_parameters()}
    with_grad = {n for n, p in method.named_parameters() if p.grad is not None}
    assert with_grad <= trainable, sorted(with_grad - trainable)[:5]
    assert any(method.get_parameter(n).grad.abs().sum() > 0 for n in with_grad)


@pytest.mark.parametrize("name", TRAINED)
def test_frozen_parameters_and_reference_models_stay_frozen(embedded_root, name):
    method, task, clip = make(embedded_root, name)
    trainable = {n for n, _ in method.trainable_parameters()}
    frozen_before = {n: p.detach().clone() for n, p in method.named_parameters() if n not in trainable}
    opt = torch.optim.AdamW([p for _, p in method.trainable_parameters()], lr=1e-2, weight_decay=0.1)
    for step in range(3):
        opt.zero_grad()
        loss_of(method.loss(batch_of(task, clip, step=step + 7))).backward()
        opt.step()
    moved = [n for n, p in method.trainable_parameters() if not torch.equal(p, frozen_before.get(n, p * 0 + 1e9))]
    assert moved
    for n, p in method.named_parameters():
        if n in frozen_before:
            assert torch.equal(p, frozen_before[n]), f"{n} changed"
            assert not p.requires_grad


@pytest.mark.parametrize("name", TRAINED)
def test_resume_gives_the_same_weights_as_an_unbroken_run(embedded_root, tmp_path, name):
    cfg = tiny_config(embedded_root, method=name, hparams=TEST_HPARAMS.get(name, {}))
    a = run(cfg, tmp_path / "a", progress=False)
    b = run(cfg, tmp_path / "b", progress=False, stop_after=4)
    run(cfg, b, progress=False)
    wa, wb = torch.load(a / results.FINAL)["method"], torch.load(b / results.FINAL)["method"]
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


# ---- defining properties -----------------------------------------------------------------------

def test_interpolate_is_exact_at_both_ends():
    a = {"w": torch.randn(5, 3), "n": torch.tensor([1, 2])}
    b = {"w": torch.randn(5, 3) * 1e3, "n": torch.tensor([3, 4])}
    assert torch.equal(interpolate(a, b, 0.0)["w"], a["w"]) and torch.equal(interpolate(a, b, 1.0)["w"], b["w"])
    assert torch.allclose(interpolate(a, b, 0.25)["w"], 0.75 * a["w"] + 0.25 * b["w"])


def perturb(method, scale=0.05, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in method.trainable_parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_wise_ft_at_alpha_0_is_the_zeroshot_model_and_at_1_the_finetuned_one(embedded_root, alpha):
    zs, task, clip = make(embedded_root, "zeroshot")
    wise, _, _ = make(embedded_root, "wise_ft", {"alpha": alpha})
    batch = batch_of(task, clip)
    perturb(wise)  # "fine-tuning"
    wise.eval()
    with torch.no_grad():  # as in evaluation (autograd changes which attention kernel runs)
        finetuned = wise.predict(batch["images"])
        with wise.evaluating():
            mixed = wise.predict(batch["images"])
        zeroshot = zs.predict(batch["images"])
    assert torch.equal(mixed, zeroshot if alpha == 0 else finetuned)
    assert not torch.equal(finetuned, zeroshot)


@pytest.mark.parametrize("name", ["flyp", "lora", "arf", "carot"])
def test_a_cached_text_head_is_rebuilt_at_each_evaluation(embedded_root, name):
    """FLYP and LoRA (and, by inheritance, ARF and CaRot) cache their text head; evaluating() drops it on entry."""
    method, task, clip = make(embedded_root, name)
    images = batch_of(task, clip)["images"]
    method.eval()
    with torch.no_grad():
        with method.evaluating():
            before = method.predict(images)
        perturb(method)  # "training" between two evaluations
        stale = method.predict(images)  # outside an evaluation: still the cached head
        with method.evaluating():
            after = method.predict(images)
            assert torch.equal(after, method.predict(images))  # cached within the evaluation
        method._head = None
        fresh = method.predict(images)
    assert torch.equal(after, fresh) and not torch.equal(after, before)
    assert not torch.equal(stale, fresh)


def accs(rows):
    return sorted((r["role"], r["domain"], r["value"]) for r in rows if r["metric"] == "acc")


def assert_wise_ends(rows, zeroshot_dir):
    """A run's wise:0 rows are the zero-shot run's, its wise:1 rows its own last step's."""
    assert accs(r for r in rows if r.get("variant") == "wise:0") == accs(results.read_rows(zeroshot_dir / results.RESULTS))
    last = max(r["step"] for r in rows)
    assert accs(r for r in rows if r.get("variant") == "wise:1") == accs(
        r for r in rows if "variant" not in r and r["step"] == last)


def test_posthoc_wise_variants_reproduce_zeroshot_and_finetuned_rows(embedded_root, tmp_path):
    zs = run(tiny_config(embedded_root, method="zeroshot"), tmp_path / "zs", progress=False)
    ft = run(tiny_config(embedded_root, method="flyp", wise_alphas=[0.0, 0.5, 1.0]), tmp_path / "ft", progress=False)
    rows = results.read_rows(ft / results.RESULTS)
    assert_wise_ends(rows, zs)
    # the same variants again, post hoc from the saved weights, with no retraining
    from bench.wise import posthoc

    before = accs(r for r in rows if r.get("variant") == "wise:0.5")
    posthoc(ft, [0.5])
    after = results.read_rows(ft / results.RESULTS)
    assert accs(r for r in after if r.get("variant") == "wise:0.5") == before
    assert len(after) == len(rows)


def test_flyp_loss_equals_open_clip_cliploss(embedded_root):
    method, task, clip = make(embedded_root, "flyp")
    batch = batch_of(task, clip)
    torch.manual_seed(3)
    loss = method.loss(batch)
    torch.manual_seed(3)  # the same template draw
    templates = torch.randint(len(method.templates), (len(batch["labels"]),))
    prompts = [method.templates[t].format(task.seen_names[y]) for t, y in zip(templates, batch["labels"])]
    img, txt, scale = clip.model(batch["images"], clip.tokenize(prompts))
    expected = open_clip.ClipLoss()(img, txt, scale)
    assert torch.allclose(loss, expected, atol=1e-6)
    # and the pure function equals ClipLoss on arbitrary features
    a, b = torch.nn.functional.normalize(torch.randn(6, 4), dim=-1), torch.nn.functional.normalize(torch.randn(6, 4), dim=-1)
    assert torch.allclose(contrastive_loss(a, b, 10.0), open_clip.ClipLoss()(a, b, torch.tensor(10.0)), atol=1e-6)


@pytest.mark.parametrize("name", ["car_ft", "lipsum_ft"])
def test_regulariser_is_zero_at_step_0_and_grows_as_the_model_moves(embedded_root, name):
    method, task, clip = make(embedded_root, name)
    batch = batch_of(task, clip)

    def reg():
        torch.manual_seed(0)  # Lipsum-FT's random texts: the same draw for each measurement
        with torch.no_grad():
            _, logs = method.loss(batch)
        return logs["reg"]

    assert reg() == pytest.approx(0.0, abs=1e-6)
    start = copy.deepcopy(method.checkpoint_state())
    values = []
    for scale in (0.001, 0.003, 0.01):
        method.load_checkpoint_state(start)
        perturb(method, scale)
        values.append(reg())
    assert 0 < values[0] < values[1] < values[2]


def test_kl_divergence_is_zero_for_equal_and_positive_for_different_logits():
    a = torch.randn(4, 7)
    assert kl_divergence(a, a) == 0
    assert kl_divergence(a, a + torch.randn(4, 7)) > 0


def test_frozen_reference_cache_matches_uncached_features(embedded_root):
    method, task, clip = make(embedded_root, "car_ft")
    batch = batch_of(task, clip)
    cached_first = method.reference(batch)
    again = method.reference(batch)
    uncached = method.reference({**batch, "deterministic_images": False})
    assert torch.equal(cached_first, again) and torch.allclose(cached_first, uncached)


def test_lp_ft_fits_its_probe_to_convergence_before_fine_tuning(embedded_root):
    from methods.lp_ft import fit_linear_probe

    erm, task, clip = make(embedded_root, "erm")
    lpft, _, _ = make(embedded_root, "lp_ft")
    features, labels = lpft.probe_features(clip)
    assert len(labels) == len(task.train_items()) and torch.allclose(features.norm(dim=-1), torch.ones(len(labels)))
    ce = lambda head: torch.nn.functional.cross_entropy(features @ head.weight.t() + head.bias, labels).item()
    assert ce(lpft.head) < ce(erm.head)  # the probe fits the training images better than the zero-shot head
    # ... and it is at a minimum of its objective: the gradient there is (nearly) zero
    W, b = lpft.head.weight.detach().clone().requires_grad_(True), lpft.head.bias.detach().clone().requires_grad_(True)
    obj = torch.nn.functional.cross_entropy(features @ W.t() + b, labels) + 1e-4 * (W ** 2).sum()
    obj.backward()
    assert W.grad.abs().max() < 1e-3 and b.grad.abs().max() < 1e-3
    # then everything ERM trains trains: the image tower gets gradients at once
    lpft.loss(batch_of(task, clip)).backward()
    assert any(p.grad is not None for p in lpft.model.visual.parameters()) and lpft.head.weight.grad is not None
    # the probe is deterministic: fitted again from the same start, the same head
    again = fit_linear_probe(features, labels, erm.head.weight, erm.head.bias, 1e-4, 200)
    assert torch.allclose(again[0], lpft.head.weight, atol=1e-5)


def test_text_encoding_without_unused_padding_equals_the_full_context():
    from bench.text import encode_text, trim_padding

    clip = load_clip("TinyCLIP-32", None)
    tokens = clip.tokenize(["a star", "a sketch of a large red lightning bolt on a striped background", "a cup"])
    assert trim_padding(tokens).shape[1] < tokens.shape[1] and (trim_padding(tokens) != 0).any(0).all()
    with torch.no_grad():
        assert torch.allclose(encode_text(clip.model, tokens), clip.model.encode_text(tokens), atol=1e-5)
        one = clip.tokenize(["a star"])
        assert torch.allclose(encode_text(clip.model, one), clip.model.encode_text(one), atol=1e-5)


def test_lipsum_random_texts_and_prefix_encoding_equal_full_context_encoding():
    from bench.text import encode_text_prefix
    from methods.lipsum_ft import random_token_texts

    clip = load_clip("TinyCLIP-32", None)
    tok = clip.tokenizer
    tokens = random_token_texts(5, 8, tok.sot_token_id, tok.eot_token_id, "cpu", torch.Generator().manual_seed(0))
    assert tokens.shape == (5, 10) and (tokens[:, 0] == tok.sot_token_id).all() and (tokens[:, -1] == tok.eot_token_id).all()
    assert (tokens[:, 1:-1] < tok.sot_token_id).all()
    padded = torch.zeros(5, tok.context_length, dtype=torch.long)
    padded[:, :10] = tokens
    with torch.no_grad():
        assert torch.allclose(encode_text_prefix(clip.model, tokens), clip.model.encode_text(padded), atol=1e-5)


def test_arf_caption_anchors_pair_each_image_with_its_own_caption(embedded_root):
    from bench.data import read_captions

    method, task, clip = make(embedded_root, "arf")
    captions = read_captions(embedded_root / "embedded" / "captions.jsonl")
    base = embedded_root / "embedded"
    batch = batch_of(task, clip)
    paths = [task.train_items()[i][0] for i in batch["index"].tolist()]
    own = [captions[str(__import__("pathlib").Path(p).relative_to(base))] for p in paths]
    assert torch.equal(method.caption_tokens[batch["index"]], clip.tokenize(own))
    assert len(set(own)) > 1


def test_arf_retrieves_the_pool_pairs_nearest_the_class_prompts(embedded_root):
    from methods.arf import embedded_corpus_pool
    from methods.arf.retrieval import class_queries, embed_pool, pool_embedding

    method, task, clip = make(embedded_root, "arf", {"top_k": 20})
    pool = embedded_corpus_pool(embedded_root, 400, 1)
    image_emb, text_emb = embed_pool(clip, pool, clip.preprocess_val, cache=embedded_root / ".rft-cache")
    scores = (pool_embedding(image_emb, text_emb, "text") @ class_queries(clip, task.seen_names, task.templates).T).max(1)
    assert sorted(method.retrieved.tolist()) == sorted(__import__("numpy").argsort(-scores, kind="stable")[:20].tolist())
    # each anchor pair keeps its own caption
    x, caption, i = method.anchor_items[0]
    assert caption == pool.caption(int(method.retrieved[i]))


def test_arf_anchor_kinds_switch_off(embedded_root):
    batch = None
    for caps, ret, expected in [(True, False, {"prompt", "caption"}), (False, True, {"prompt", "retrieval"}),
                                (False, False, {"prompt"})]:
        method, task, clip = make(embedded_root, "arf", {"caption_anchors": caps, "retrieval_anchors": ret})
        batch = batch or batch_of(task, clip)
        _, logs = method.loss(batch)
        assert set(logs) == expected
