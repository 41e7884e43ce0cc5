"""Experiment tracking, off by default: scalars to TensorBoard or Weights & Biases, or nowhere.

A stage opens one tracker for its run, logs scalars by name ("gentraces/af_accuracy") and closes it.
report_to=none (the default in every config) needs no package and writes nothing; tensorboard writes
event files into log_dir; wandb runs offline (files under log_dir, no network) unless WANDB_API_KEY or
WANDB_MODE says otherwise. A missing package is one 'error: ...' line, found before any model loads.

    tracker = tracking.open_tracker(cfg.report_to, Path(cfg.exp_dir) / "runs" / cfg.trace_name,
                                    cfg.trace_name, vars(cfg))
    tracker.log({"gentraces/af_accuracy": 0.41}, step=0)
    tracker.close()

    tensorboard --logdir exp/runs
"""
import importlib.util
import os
from pathlib import Path

from utils import die, to_yaml

REPORT_TO = ("none", "tensorboard", "wandb")  # the values of every config's report_to key
PROJECT = "antidistillation-sampling"         # the wandb project every stage logs into
PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}  # report_to -> the package it needs


def missing_package(report_to):
    """The one-line problem when report_to's package is not installed; None when it is (or for none).
    find_spec, not an import: the check runs with the settings, before anything slow."""
    package = PACKAGES.get(report_to)
    if package is None or importlib.util.find_spec(package) is not None:
        return None
    return f"report_to={report_to} needs the {package} package: pip install {package}"


def require(report_to):
    problem = missing_package(report_to)
    if problem:
        die(problem)


def wandb_mode():
    """WANDB_MODE if set; otherwise online only with an API key, so a run without one never waits on
    the network or a login prompt (its files sync later with `wandb sync`)."""
    return os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")


class NoTracker:
    """report_to=none: every call does nothing."""

    def log(self, scalars, step=0):
        pass

    def close(self):
        pass


class TensorBoardTracker:
    def __init__(self, log_dir, config):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # find_spec passed but the install is broken (or too old for torch)
            die("report_to=tensorboard cannot import tensorboard: pip install --upgrade tensorboard")
        self.writer = SummaryWriter(log_dir=str(log_dir))
        if config:  # the run's settings on TensorBoard's text tab; 4-space indent renders as code
            text = "\n".join("    " + line for line in to_yaml(_plain(config)).splitlines())
            self.writer.add_text("config", text)

    def log(self, scalars, step=0):
        for key, value in scalars.items():
            self.writer.add_scalar(key, float(value), step)
        self.writer.flush()  # a killed run keeps what it logged

    def close(self):
        self.writer.close()


class WandbTracker:
    def __init__(self, log_dir, name, config):
        import wandb
        self.run = wandb.init(project=PROJECT, name=name, dir=str(log_dir), config=_plain(config or {}),
                              mode=wandb_mode())

    def log(self, scalars, step=0):
        self.run.log({k: float(v) for k, v in scalars.items()}, step=step)

    def close(self):
        self.run.finish()


def _plain(config):
    """Config values as YAML and wandb store them (Paths and other objects as text)."""
    return {k: v if isinstance(v, (str, int, float, bool, type(None), list, dict)) else str(v)
            for k, v in config.items()}


def open_tracker(report_to: str, log_dir, name: str, config: dict | None = None):
    """A tracker with .log(scalars, step=0) and .close() for report_to (one of REPORT_TO); log_dir is
    made if missing. Call it on one process only (rank 0) when several run."""
    if report_to not in REPORT_TO:
        die(f"report_to must be one of {', '.join(REPORT_TO)}, got {report_to!r}")
    if report_to == "none":
        return NoTracker()
    require(report_to)
    Path(log_dir).mkdir(parents=True, exist_ok=True)  # wandb falls back to a temp dir when dir is missing
    if report_to == "tensorboard":
        return TensorBoardTracker(log_dir, config)
    return WandbTracker(log_dir, name, config)
