"""The whole tiny pipeline, end to end, as CI and a new user run it: every stage output must exist
and be well formed."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import datasets
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
TRACE_COLUMNS = {"idx", "question", "gold", "system", "prompt", "completion", "trace", "forced",
                 "raw_pred", "af_pred", "raw_correct", "af_correct", "n_tokens", "finished"}


KILLED_STAGE = "eval_student_base"  # the last generation stage: killing there costs CI the least


def descendants(pid):
    children = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        out += kids
        todo += kids
    return out


def kill_during_stage(env, exp, stage):
    """Run the pipeline and SIGKILL it and every process under it once `stage` has started decoding."""
    proc = subprocess.Popen(["bash", str(REPO / "pipeline_tiny.sh")], env=env, cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    work = exp / "traces" / f".{stage}.work"
    deadline = time.time() + 1200
    while not work.exists():
        assert proc.poll() is None and time.time() < deadline, "pipeline ended before the stage started"
        time.sleep(0.05)
    for pid in [proc.pid, *descendants(proc.pid)]:  # torchrun's workers leave the process group
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()
    time.sleep(1.0)
    assert not (exp / "traces" / stage).exists()  # killed mid-stage: no sentinel


@pytest.fixture(scope="module")
def tiny_run(tiny_assets, tmp_path_factory):
    """The tiny pipeline, killed (SIGKILL) during its last generation stage and then rerun."""
    exp = tmp_path_factory.mktemp("pipeline") / "exp"
    env = {**os.environ, "EXP_DIR": str(exp), "TINY_ASSETS": str(tiny_assets)}
    kill_during_stage(env, exp, KILLED_STAGE)
    res = subprocess.run(["bash", str(REPO / "pipeline_tiny.sh")], env=env, cwd=REPO,
                         capture_output=True, text=True, timeout=1200)
    assert res.returncode == 0, res.stderr[-4000:]
    stages = [line.split(" ", 2)[2] for line in res.stderr.splitlines() if line.startswith("== ")]
    assert stages == ["undistilled student eval", "report"]  # finished stages were skipped
    return exp


def grid_names():
    out = subprocess.run(["python", str(REPO / "grid.py"), "--grid", "tiny"], capture_output=True, text=True,
                         check=True).stdout.splitlines()
    return [f"tau{t}_lam{lam}_eps{e}" for t, lam, e in (line.split() for line in out)]


def check_trace(exp, name):
    traces = exp / "traces"
    ds = datasets.load_from_disk(str(traces / name))
    assert TRACE_COLUMNS <= set(ds.column_names) and len(ds) > 0
    assert (traces / f"{name}.parquet").stat().st_size > 0
    side = yaml.safe_load((traces / f"{name}.yaml").read_text())
    assert side["stats"]["n"] == len(ds)
    assert side["stats"]["af_accuracy"] == pytest.approx(sum(ds["af_correct"]) / len(ds))
    return side


def test_every_stage_output_exists_and_is_well_formed(tiny_run):
    exp = tiny_run
    names = grid_names()
    assert len(names) == 3
    holdout = check_trace(exp, "holdout")
    assert holdout["config"]["tau"] == 0
    assert (exp / "student_grads.safetensors").stat().st_size > 0
    for name in names:
        check_trace(exp, name)
        check_trace(exp, f"eval_student_{name}")
        side = check_trace(exp, f"eval_teacher_{name}")
        if not name.split("_lam")[1].startswith("0.00e+00"):
            assert side["diagnostics"]["frac_weights_changed_plus"] > 0
        assert (exp / "models" / f"student_{name}" / "final" / "model.safetensors").exists()
    check_trace(exp, "eval_student_base")
    check_trace(exp, "eval_teacher_base")
    registry = [json.loads(line) for line in (exp / "metadata" / "trace_registry.jsonl").read_text().splitlines()]
    assert {e["name"] for e in registry} >= {"holdout", *names, *(f"eval_teacher_{n}" for n in names)}
    assert not list((exp / "traces").glob(".*"))  # no temporary or work directories left


def test_report_has_a_row_per_grid_row_and_a_plot(tiny_run):
    report = (tiny_run / "report.md").read_text()
    for name in grid_names():
        tau = float(name[3:name.index("_lam")])
        assert f"{tau:.3g}" in report
    assert (tiny_run / "tradeoff.png").read_bytes()[:4] == b"\x89PNG"


def test_tiny_teacher_answers_well_above_chance(tiny_run):
    # the teacher's greedy answer-forced accuracy on the test split, as its sidecar reports it
    side = yaml.safe_load((tiny_run / "traces" / "eval_teacher_base.yaml").read_text())
    assert side["config"]["tau"] == 0 and side["config"]["data_split"] == "gsm8k_test"
    assert side["stats"]["af_accuracy"] >= 0.5


def test_rerun_skips_every_finished_stage(tiny_run, tiny_assets):
    env = {**os.environ, "EXP_DIR": str(tiny_run), "TINY_ASSETS": str(tiny_assets)}
    res = subprocess.run(["bash", str(REPO / "pipeline_tiny.sh")], env=env, cwd=REPO,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    stages = [line for line in res.stderr.splitlines() if line.startswith("== ")]
    assert [s.split(" ", 2)[2] for s in stages] == ["report"]


def test_stage_killed_mid_run_is_redone_to_the_uninterrupted_result(tiny_run, tiny_assets, tmp_path):
    side = yaml.safe_load((tiny_run / "traces" / f"{KILLED_STAGE}.yaml").read_text())
    overrides = [f"{k}={v}" for k, v in side["config"].items()
                 if k in ("teacher", "tokenizer", "data_split", "data_dir", "max_length", "max_prompt_length",
                          "tau", "lam", "batch_size", "trace_name")]
    subprocess.run([sys.executable, str(REPO / "gentraces.py"), *overrides, f"exp_dir={tmp_path}"],
                   check=True, cwd=REPO, capture_output=True)
    resumed = datasets.load_from_disk(str(tiny_run / "traces" / KILLED_STAGE))
    whole = datasets.load_from_disk(str(tmp_path / "traces" / KILLED_STAGE))
    assert resumed["completion"] == whole["completion"] and resumed["forced"] == whole["forced"]
