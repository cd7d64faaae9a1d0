import subprocess
import sys

import pytest

from bench import results
from bench.train import run
from tests.conftest import tiny_config


def bench(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "bench", *args], capture_output=True, text=True, cwd=cwd,
                          env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}, timeout=300)


@pytest.fixture
def finished_run(embedded_root, tmp_path):
    out = run(tiny_config(embedded_root, method="zeroshot"), tmp_path / "runs" / "done_job", progress=False)
    return out, {p.name: p.read_bytes() for p in out.iterdir()}


@pytest.mark.parametrize("yaml_text, pattern", [
    ("method: erm\ntrain:\n  stepz: 3\n", "unknown key 'train.stepz': did you mean 'train.steps'?"),
    ("method: ermm\n", "method: unknown method 'ermm': did you mean 'erm'"),
    ("data:\n  root: /nonexistent/data\n  dataset: pacs\n  test_domains: [sketch]\n",
     "data folder /nonexistent/data/PACS/art_painting not found"),
    ("data:\n  test_domains: [clipart]\n", "'clipart' is not a domain of embedded"),
    ("train: [1, 2\n", "malformed YAML"),
])
def test_bad_config_one_line_nonzero_exit_and_nothing_touched(tmp_path, finished_run, yaml_text, pattern):
    out, before = finished_run
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(yaml_text)
    runs = out.parent
    proc = bench("run", str(cfg), "--no-progress", cwd=runs.parent)  # writes to runs/<job id> if it ran
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and pattern in lines[0], proc.stderr
    assert str(cfg) in lines[0]
    assert [p.name for p in runs.iterdir()] == [out.name]
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_a_folder_of_another_job_is_refused_and_left_as_it_was(finished_run, embedded_root, tmp_path):
    out, before = finished_run
    cfg = tmp_path / "erm.yaml"
    cfg.write_text(f"method: erm\nmodel: {{pretrained: null}}\ndata: {{root: {embedded_root}}}\n")
    proc = bench("run", str(cfg), "--out", str(out), "--no-progress")
    assert proc.returncode != 0 and "holds another job" in proc.stderr
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_methods_and_datasets_commands(tmp_path):
    proc = bench("methods")
    assert proc.returncode == 0 and "erm" in proc.stdout and "zeroshot" in proc.stdout
    proc = bench("datasets", "--root", str(tmp_path))
    assert proc.returncode == 0 and "embedded" in proc.stdout and "missing" in proc.stdout
