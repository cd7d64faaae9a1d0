import pytest

from bench import config
from bench.errors import BenchError


def test_defaults_and_overrides():
    cfg = config.load_run_config(None, ["train.lr=3e-4", "data.test_domains=[photo]", "method=erm"])
    assert cfg.train.lr == pytest.approx(3e-4) and cfg.data.test_domains == ("photo",)


def test_unknown_key_names_the_file_key_and_valid_keys(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  lrr: 0.1\n")
    with pytest.raises(BenchError) as err:
        config.load_run_config(path)
    msg = str(err.value)
    assert str(path) in msg and "train.lrr" in msg and "did you mean 'train.lr'" in msg and "valid keys" in msg


def test_wrong_type_is_rejected(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  steps: many\n")
    with pytest.raises(BenchError, match="train.steps' must be int"):
        config.load_run_config(path)


def test_malformed_yaml_names_the_line(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  steps: [1,\n")
    with pytest.raises(BenchError, match="malformed YAML"):
        config.load_run_config(path)


def test_identity_ignores_where_a_job_runs():
    a = config.load_run_config(None, ["data.root=/a", "train.num_workers=4"])
    b = config.load_run_config(None, ["data.root=/b", "train.device=cpu"])
    c = config.load_run_config(None, ["train.lr=1e-3"])
    assert config.stable_hash(config.identity(a)) == config.stable_hash(config.identity(b)) != config.stable_hash(config.identity(c))
