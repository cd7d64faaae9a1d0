"""Experiment trackers: every metric row reaches TensorBoard's event files; wandb gets the same, offline without
network; trackers are off by default and no part of a job's identity."""
import sys
import types

import pytest

from bench import config
from bench import results
from bench import trackers
from bench.errors import BenchError
from bench.prepare import prepare
from bench.train import run
from tests.conftest import tiny_config


def tensorboard_scalars(logdir) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value), ...]} as TensorBoard shows them (purged steps of an earlier attempt left out)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def expected_scalars(run_dir) -> dict[str, list[tuple[int, float]]]:
    out: dict[str, list] = {}
    for name, value, step in trackers.scalars(results.read_rows(run_dir / results.RESULTS)):
        out.setdefault(name, []).append((step, value))
    return out


def assert_same(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for tag in want:
        assert [s for s, _ in got[tag]] == [s for s, _ in want[tag]], tag
        assert [v for _, v in got[tag]] == pytest.approx([v for _, v in want[tag]], rel=1e-6), tag  # float32


def test_tensorboard_event_files_hold_every_metric_row(embedded_root, tmp_path):
    pytest.importorskip("tensorboard", reason="needs the tensorboard package (pip install -e '.[test]')")
    out = run(tiny_config(embedded_root, **{"trackers.use": ["tensorboard"], "wise_alphas": [0.5]}),
              tmp_path / "r", progress=False)
    got = tensorboard_scalars(out / "tensorboard")
    want = expected_scalars(out)
    assert_same(got, want)
    assert "train/loss" in got and "id_val/acc/photo/out" in got and "wise:0.5/ood/acc/sketch/in" in got
    assert [s for s, _ in got["ood/acc/sketch/in"]] == [0, 3, 6]


def test_a_resumed_run_purges_what_the_broken_attempt_logged_after_its_checkpoint(embedded_root, tmp_path):
    pytest.importorskip("tensorboard", reason="needs the tensorboard package (pip install -e '.[test]')")
    cfg = tiny_config(embedded_root, **{"trackers.use": ["tensorboard"], "trackers.dir": str(tmp_path / "tb")})
    broken = run(cfg, tmp_path / "b", progress=False, stop_after=3)  # evaluated at 3, checkpoint at 2
    run(cfg, broken, progress=False)  # resumes from 2: evaluates 3 again, then 6
    got = tensorboard_scalars(tmp_path / "tb" / "tensorboard" / "b")
    assert [s for s, _ in got["train/loss"]] == [3, 6]
    assert_same(got, expected_scalars(broken))
    assert not (broken / "tensorboard").exists()


def test_trackers_are_off_by_default_and_not_part_of_the_job_id(embedded_root):
    plain = tiny_config(embedded_root)
    assert plain.trackers.use == ()
    tracked = tiny_config(embedded_root, **{"trackers.use": ["tensorboard", "wandb"], "trackers.dir": "/tmp/x",
                                            "trackers.wandb_mode": "offline", "train.prefetch_factor": 4})
    assert prepare(tracked).job_id == prepare(plain).job_id


@pytest.mark.parametrize("key, value, match", [
    ("trackers.use", ["mlflow"], "trackers.use: 'mlflow' is not a tracker"),
    ("trackers.use", ["wandb", "wandb"], "names a tracker twice"),
    ("trackers.wandb_mode", "sometimes", "trackers.wandb_mode: 'sometimes' is not one of auto, online, offline"),
    ("trackers.usr", ["wandb"], "did you mean 'trackers.use'"),
])
def test_bad_tracker_settings_fail_at_load(embedded_root, key, value, match):
    with pytest.raises(BenchError, match=match):
        tiny_config(embedded_root, **{key: value})


def test_a_missing_package_is_one_line_naming_the_pip_install(embedded_root, tmp_path, monkeypatch):
    monkeypatch.setattr(trackers, "_installed", lambda module: module != "wandb")
    cfg = tiny_config(embedded_root, **{"trackers.use": ["wandb"]})
    with pytest.raises(BenchError, match=r"^config: trackers.use: wandb needs the wandb package, which is not "
                                         r"installed; pip install wandb") as err:
        run(cfg, tmp_path / "r", progress=False)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "r").exists()  # failed before anything was written


class FakeWandb:
    """Stands in for the wandb package (not a test dependency): records init's arguments and every log call."""

    def __init__(self):
        self.inits, self.logged, self.finished = [], [], 0
        self.module = types.ModuleType("wandb")
        self.module.init = self.init

    def init(self, **kwargs):
        self.inits.append(kwargs)
        return types.SimpleNamespace(log=lambda values, step: self.logged.append((step, dict(values))),
                                     finish=self.finish)

    def finish(self):
        self.finished += 1


def test_wandb_logs_every_row_offline_when_the_server_does_not_answer(embedded_root, tmp_path, monkeypatch):
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake.module)
    monkeypatch.setattr(trackers, "_installed", lambda module: True)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # the discard port: nothing answers
    out = run(tiny_config(embedded_root, **{"trackers.use": ["wandb"]}), tmp_path / "r", progress=False)
    (init,) = fake.inits
    assert init["mode"] == "offline" and init["resume"] == "allow" and init["project"] == "rft-bench"
    assert init["id"] == init["config"]["job_id"] and init["dir"] == str(out) and init["name"] == "r"
    logged: dict[str, list] = {}
    for step, values in fake.logged:
        for name, value in values.items():
            logged.setdefault(name, []).append((step, value))
    assert_same(logged, expected_scalars(out))
    assert fake.finished == 1


def test_wandb_mode_env_and_setting_win_over_the_probe(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert trackers.wandb_mode(config.TrackersConfig(wandb_mode="online")) is None  # wandb reads WANDB_MODE itself
    monkeypatch.delenv("WANDB_MODE")
    assert trackers.wandb_mode(config.TrackersConfig(wandb_mode="offline")) == "offline"


def test_scalar_names_skip_empty_parts_and_non_numbers():
    rows = [{"step": 2, "role": "train", "domain": None, "split": None, "metric": "loss", "value": 0.5},
            {"step": 2, "role": "ood", "domain": "sketch", "split": "in", "metric": "acc", "value": 1,
             "variant": "wise:0.5"},
            {"step": 2, "role": "train", "domain": None, "split": None, "metric": "x", "value": float("nan")},
            {"step": 2, "role": "train", "domain": None, "split": None, "metric": "y", "value": None},
            {"step": 2, "role": "ood", "domain": "sketch", "split": "in", "metric": "rel_bins", "value": 15, "n": 9,
             "bins": "..."},  # a reliability histogram, not a scalar
            {"step": 2, "role": "id_val", "domain": None, "split": None, "metric": "temperature", "value": 1.5}]
    assert trackers.scalars(rows) == [("train/loss", 0.5, 2), ("wise:0.5/ood/acc/sketch/in", 1.0, 2),
                               ("id_val/temperature", 1.5, 2)]
