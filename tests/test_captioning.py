import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bench import embedded
from bench.errors import BenchError
from methods.arf.captioning import (Captioner, CocaCaptioner, EmbeddedCaptioner, FileCaptioner, build_captioner,
                                    caption_items, decode_caption, greedy_decode)


def _image(path: Path, value: int) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((32, 32, 3), value, np.uint8)).save(path)
    return str(path)


@pytest.fixture(scope="module")
def bench_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("captioning")
    embedded.generate_benchmark(root, per_class=2, workers=1, progress=False)
    return root


@pytest.fixture(scope="module")
def tiny_coca() -> CocaCaptioner:
    """A random-init tiny CoCa; its decoder's output projection starts at zero (every caption '!!!'),
    so it is re-drawn here to make captions depend on the image."""
    torch.manual_seed(0)
    cap = CocaCaptioner("TinyCoCa-32", None, batch_size=3, seq_len=10)
    torch.nn.init.normal_(cap.model.text_decoder.text_projection, std=0.125)
    return cap


def test_file_captioner_reads_relative_paths_against_its_folder(tmp_path):
    a = _image(tmp_path / "imgs" / "a.png", 10)
    b = _image(tmp_path / "imgs" / "b.png", 20)
    f = tmp_path / "caps.jsonl"
    f.write_text(json.dumps({"path": "imgs/a.png", "caption": "a dark square"}) + "\n\n"
                 + json.dumps({"path": b, "caption": "a darker square"}) + "\n")
    cap = FileCaptioner(f)
    assert cap.caption([b, a]) == ["a darker square", "a dark square"]
    assert isinstance(cap, Captioner) and cap.name == f"file:{f}" and len(cap) == 2
    other = tmp_path / "elsewhere"
    other.mkdir()
    (other / "caps.jsonl").write_text(f.read_text())
    assert FileCaptioner(other / "caps.jsonl", base=tmp_path).caption([a]) == ["a dark square"]


def test_file_captioner_names_the_file_and_the_missing_image(tmp_path):
    f = tmp_path / "caps.jsonl"
    f.write_text(json.dumps({"path": "a.png", "caption": "x"}) + "\n")
    missing = str(tmp_path / "zz.png")
    with pytest.raises(BenchError) as err:
        FileCaptioner(f).caption([missing])
    msg = str(err.value)
    assert str(f) in msg and missing in msg and "\n" not in msg
    with pytest.raises(BenchError, match="no such captions file"):
        FileCaptioner(tmp_path / "nope.jsonl")
    f.write_text('{"path": "a.png"}\n')
    with pytest.raises(BenchError, match=r"caps.jsonl:1: not a JSON object with string 'path' and 'caption'"):
        FileCaptioner(f)


def test_embedded_captioner_pairs_each_image_with_its_own_caption(bench_root):
    from bench.cards import load_card
    from bench.data import build_task

    card = load_card("embedded")
    task = build_task(card, bench_root, ("sketch",), 0.2, 0)
    paths = [p for items in task.train.values() for p, _ in items]
    captions = EmbeddedCaptioner(bench_root).caption(paths)
    truth = {str(bench_root / "embedded" / row["path"]): row["caption"]
             for row in map(json.loads, (bench_root / "embedded" / "captions.jsonl").read_text().splitlines())}
    assert captions == [truth[p] for p in paths]
    for p, c in zip(paths, captions):  # the caption names the image's own class and domain
        domain, cls = Path(p).parts[-3:-1]
        assert embedded.prompt_name(cls) in c and domain in c
    with pytest.raises(BenchError, match="bench data embedded"):
        EmbeddedCaptioner(bench_root / "nowhere")


def test_tiny_coca_captions_one_string_per_image_deterministically(tmp_path, tiny_coca):
    paths = [_image(tmp_path / f"{i}.png", v) for i, v in enumerate([0, 60, 120, 180, 250])]
    first = tiny_coca.caption(paths)
    assert len(first) == 5 and all(isinstance(c, str) and c for c in first)
    assert not any("<start_of_text>" in c or "<end_of_text>" in c for c in first)
    assert len(set(first)) > 1  # captions depend on the image
    tiny_coca.batch_size = 1
    try:
        assert tiny_coca.caption(paths) == first  # batching changes nothing
    finally:
        tiny_coca.batch_size = 3
    torch.manual_seed(0)  # the same seed builds the same model, hence the same captions
    again = CocaCaptioner("TinyCoCa-32", None, decoding="greedy", seq_len=10)
    torch.nn.init.normal_(again.model.text_decoder.text_projection, std=0.125)
    assert again.caption(paths) == first
    assert tiny_coca.name == "coca:TinyCoCa-32:none:greedy"


def test_greedy_decoding_respects_lengths_and_decode_strips_special_tokens(tiny_coca):
    tokens = greedy_decode(tiny_coca.model, torch.randn(2, 3, 32, 32), seq_len=8, min_seq_len=4)
    assert tokens.shape[0] == 2 and tokens.shape[1] <= 8 and (tokens[:, 0] == 49406).all()
    assert ((tokens == 49407).sum(dim=1) == 1).all()  # one end of text per row, forced at the latest
    import open_clip

    assert decode_caption(open_clip.tokenize(["a photo of a star"])[0]) == "a photo of a star"


def test_coca_loading_failures_are_one_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(BenchError) as err:
        CocaCaptioner("coca_ViT-B-32", "mscoco_finetuned_laion2b_s13b_b90k", decoding="greedy")
    msg = str(err.value)
    assert msg.startswith("captioner: could not fetch pretrained weights coca_ViT-B-32/") and "\n" not in msg
    with pytest.raises(BenchError, match="TinyCLIP-32 is not a CoCa model"):
        CocaCaptioner("TinyCLIP-32", None, decoding="greedy")
    with pytest.raises(BenchError, match="decoding 'nucleus' unknown"):
        CocaCaptioner("TinyCoCa-32", None, decoding="nucleus")


def test_beam_search_without_usable_transformers_says_how_to_fix(monkeypatch):
    from open_clip import coca_model

    monkeypatch.setattr(coca_model, "_has_transformers", False)
    with pytest.raises(BenchError, match="decoding: greedy"):
        CocaCaptioner("TinyCoCa-32", None, decoding="beam_search")


def test_beam_search_is_open_clip_generate(tiny_coca):
    from open_clip import coca_model

    if not coca_model._has_transformers:
        pytest.skip("open_clip's generate needs transformers with BeamSearchScorer (e.g. 4.55.4)")
    torch.manual_seed(0)
    beam = CocaCaptioner("TinyCoCa-32", None, decoding="beam_search", seq_len=10)
    beam.model.load_state_dict(tiny_coca.model.state_dict())
    x = torch.randn(2, 3, 32, 32)
    captions = beam.caption_tensors(x)
    assert len(captions) == 2 and all(isinstance(c, str) and c for c in captions)
    top1 = tiny_coca.model.generate(x, seq_len=10, generation_type="top_k", top_k=1)
    assert tiny_coca.caption_tensors(x) == [decode_caption(t) for t in top1]  # greedy == generate's top-1


def test_build_captioner_from_config_values(bench_root, tmp_path):
    assert build_captioner("embedded", bench_root).name == "embedded"
    f = tmp_path / "c.jsonl"
    f.write_text(json.dumps({"path": "x.png", "caption": "y"}) + "\n")
    assert isinstance(build_captioner({"file": str(f)}, bench_root), FileCaptioner)
    assert build_captioner(f"file:{f}", bench_root).caption([str(tmp_path / "x.png")]) == ["y"]
    coca = build_captioner({"coca": {"model": "TinyCoCa-32", "pretrained": None, "decoding": "greedy"}}, bench_root)
    assert isinstance(coca, CocaCaptioner)
    with pytest.raises(BenchError, match="unknown captioner 'blip2'; choose 'embedded'"):
        build_captioner("blip2", bench_root)
    with pytest.raises(BenchError, match="unknown coca option 'beams'"):
        build_captioner({"coca": {"beams": 3}}, bench_root)


class CountingCaptioner(Captioner):
    def __init__(self, name="count"):
        self.name = name
        self.calls: list[list[str]] = []

    def caption(self, paths):
        self.calls.append(list(paths))
        return [f"caption of {Path(p).name}" for p in paths]


def test_caption_items_captions_each_image_once_and_caches(tmp_path):
    paths = [str(tmp_path / f"{i}.png") for i in range(7)]
    cache = tmp_path / "cache" / "caps.jsonl"
    cap = CountingCaptioner()
    out = caption_items(cap, paths + paths[:2], cache, batch_size=3, progress=False)
    assert out == {p: f"caption of {Path(p).name}" for p in paths}
    assert [len(c) for c in cap.calls] == [3, 3, 1]
    assert caption_items(cap, paths[:4], cache, progress=False) == {p: out[p] for p in paths[:4]}
    assert len(cap.calls) == 3  # all cached
    assert not list(cache.parent.glob("*.tmp-*"))
    assert FileCaptioner(cache).caption(paths[:2]) == [out[p] for p in paths[:2]]  # a valid captions file
    other = CountingCaptioner("another")
    caption_items(other, paths[:2], cache, progress=False)
    assert len(other.calls) == 1  # another captioner's rows are not reused
