"""benchmarks/gpu_check.py: one line and exit 0 without a GPU; --cpu runs every section at tiny sizes on the CPU
(the code a GPU session runs) and writes the JSON the docs' figures come from."""
import importlib.util
import json
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
G = importlib.util.module_from_spec(spec)
spec.loader.exec_module(G)


def test_without_a_gpu_it_says_so_in_one_line_and_exits_0(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert G.main(["--out", str(tmp_path / "x.json")]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and out.startswith("gpu_check: no CUDA device is visible")
    assert not (tmp_path / "x.json").exists()


def test_the_cpu_smoke_run_measures_every_section(embedded_root, tmp_path, capsys):
    out = tmp_path / "gpu_check.json"
    assert G.main(["--cpu", "--out", str(out), "--root", str(embedded_root), "--methods", "erm", "car_ft", "flyp",
                   "--workers", "0", "1"]) == 0
    r = json.loads(out.read_text())
    assert r.keys() == {"device", "settings", "harness_vs_bare", "methods", "eval", "loader", "eval_fraction",
                        "eval_fraction_workers"}
    assert r["settings"]["model"] == "TinyCLIP-32" and r["settings"]["batch"] == 8
    hb = r["harness_vs_bare"]
    assert hb.keys() == {"harness erm", "bare open_clip loop", "ratio", "goal"} and hb["ratio"] > 0
    assert list(r["methods"]) == ["erm", "car_ft", "flyp"]
    for m in r["methods"].values():
        assert m["s_per_step"] > 0 and m["images_per_s"] > 0 and m["over_erm"] > 0
        assert m["peak_mem_mb"] == {"8": None, "16": None}  # CPU: not measured
    assert r["methods"]["erm"]["over_erm"] == 1.0
    assert set(r["eval"]["loading"]) == {"0", "1"} and r["eval"]["from_memory"] > 0
    assert [(x["num_workers"], x["prefetch_factor"]) for x in r["loader"]] == [(0, None), (1, 2)]
    assert all(x["images_per_s"] > 0 for x in r["loader"])
    assert set(r["eval_fraction"]) == {"pacs", "vlcs", "officehome", "terraincognita", "domainnet"}
    pacs = r["eval_fraction"]["pacs"]
    assert (pacs["steps"], pacs["batch_size"], pacs["evaluations"]) == (5000, 96, 18)  # 0, 300, ..., 4800, 5000
    assert pacs["images_per_evaluation"] == round(sum(n + 0.2 * (9991 - n) for n in (2048, 2344, 1670, 3929)) / 4)
    assert 0 < pacs["eval_fraction"] < 1
    assert r["eval_fraction"]["domainnet"]["evaluations"] == 6  # eval_every 1000
    assert "harness / bare images/s" in capsys.readouterr().out
