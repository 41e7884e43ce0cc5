"""tracking.py: report_to=tensorboard writes scalars TensorBoard reads back, none writes nothing, and a
missing package is one 'error: ...' line. distill.py's use of it is in test_distill.py and
test_config_errors.py."""
import sys

import pytest

import tracking
from utils import ConfigError


def scalars_in(log_dir):
    """{tag: [(step, value), ...]} of every scalar in the event files under log_dir."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(log_dir))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_tensorboard_scalars_are_read_back_under_their_keys(tmp_path):
    pytest.importorskip("tensorboard")
    log_dir = tmp_path / "runs" / "t"
    tracker = tracking.open_tracker("tensorboard", log_dir, "t", {"tau": 0.9, "exp_dir": tmp_path})
    tracker.log({"gentraces/af_accuracy": 0.25, "gentraces/raw_accuracy": 0.5})
    tracker.log({"gentraces/af_accuracy": 0.75}, step=3)
    tracker.close()
    assert scalars_in(log_dir) == {"gentraces/af_accuracy": [(0, 0.25), (3, 0.75)],
                                   "gentraces/raw_accuracy": [(0, 0.5)]}


def test_none_writes_nothing(tmp_path):
    tracker = tracking.open_tracker("none", tmp_path / "runs" / "t", "t", {"tau": 0.9})
    tracker.log({"gentraces/af_accuracy": 0.25})
    tracker.close()
    assert list(tmp_path.iterdir()) == []


def test_a_missing_package_is_one_line_naming_the_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # find_spec and import then see no package
    with pytest.raises(ConfigError) as e:
        tracking.open_tracker("tensorboard", tmp_path / "runs", "t")
    assert e.value.messages == ["report_to=tensorboard needs the tensorboard package: pip install tensorboard"]
    assert list(tmp_path.iterdir()) == []


def test_an_unknown_backend_is_one_line(tmp_path):
    with pytest.raises(ConfigError, match="report_to must be one of none, tensorboard, wandb, got 'mlflow'"):
        tracking.open_tracker("mlflow", tmp_path, "t")


def test_wandb_runs_offline_without_an_api_key(tmp_path, monkeypatch):
    pytest.importorskip("wandb")  # not in the test extra (large); pip install -e '.[track]' brings it
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    tracker = tracking.open_tracker("wandb", tmp_path / "runs", "t", {"tau": 0.9, "exp_dir": tmp_path})
    tracker.log({"gentraces/af_accuracy": 0.25})
    tracker.close()
    assert list((tmp_path / "runs" / "wandb").glob("offline-run-*/run-*.wandb"))
