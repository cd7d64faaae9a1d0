"""benchmarks/arf_ablation.py: its variants are valid ARF settings, each in a folder of its own."""
import importlib.util
from pathlib import Path

from bench.method import METHODS, load_builtin_methods, resolve_hparams

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "arf_ablation.py"


def _script():
    spec = importlib.util.spec_from_file_location("arf_ablation", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_variant_is_a_valid_arf_setting_with_its_own_folder():
    ab = _script()
    load_builtin_methods()
    assert "arf" in METHODS
    slugs = [ab.slug(label) for label in ab.VARIANTS]
    assert len(set(slugs)) == len(slugs) and "reference" not in slugs
    seen = set()
    for label, keys in ab.VARIANTS.items():
        h = resolve_hparams("arf", {**ab.BASE, **keys}, "arf_ablation.py")  # unknown keys or bad values raise
        assert h.caption_anchors or h.retrieval_anchors, label  # a variant without anchors is FLYP: a reference row
        seen.add((h.caption_anchors, h.retrieval_anchors, h.retrieve_by))
    assert len(seen) == len(ab.VARIANTS)  # no two variants run the same setting
    assert {"zeroshot", "erm", "flyp"} <= set(ab.REFERENCE)
