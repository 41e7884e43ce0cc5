"""The whole tiny pipeline, end to end, as CI and a new user run it: every stage output must exist
and be well formed; a pipeline killed mid-stage and rerun ends with the report of an uninterrupted
one; two pipelines run at once on one machine without touching each other's files."""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import datasets
import pytest
import yaml
from safetensors.torch import load_file

import grid

REPO = Path(__file__).resolve().parents[1]
TRACE_COLUMNS = {"idx", "question", "gold", "system", "prompt", "completion", "trace", "forced",
                 "raw_pred", "af_pred", "raw_correct", "af_correct", "n_tokens", "finished"}


LAST_ROW = grid.grid_rows("tiny")[-1]  # a serial run does the rows in grid order, after phase 1
KILLED_STAGE = f"eval_teacher_{LAST_ROW.name}"  # the last generation stage: killing there costs CI the least
N_TRACES = 1 + 3 * 3 + 3  # holdout, 3 tiny grid rows x (train, student eval, teacher eval), 3 references


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
    """Run the pipeline and SIGKILL it and every process under it once `stage` has started decoding.
    Its output goes to EXP_DIR's sibling `<name>.first.log`, whose tail a failure shows."""
    log_path = exp.parent / f"{exp.name}.first.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(["bash", str(REPO / "pipeline_tiny.sh")], env=env, cwd=REPO,
                                stdout=log, stderr=subprocess.STDOUT)
    work = exp / "traces" / f".{stage}.work"
    deadline = time.time() + 1200
    while not work.exists():
        if proc.poll() is not None or time.time() > deadline:
            kill_tree(proc)
            pytest.fail(f"pipeline ended before the stage started:\n{log_path.read_text()[-4000:]}")
        time.sleep(0.05)
    kill_tree(proc)  # every descendant: torchrun's workers leave the process group
    time.sleep(1.0)
    assert not (exp / "traces" / stage).exists()  # killed mid-stage: no sentinel


def kill_tree(proc):
    for pid in [proc.pid, *descendants(proc.pid)]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()


@pytest.fixture(scope="module")
def runs(tiny_assets, tmp_path_factory):
    """Two tiny pipelines at once, on the same assets, with different EXP_DIRs and one shared, fresh
    TMPDIR: `whole` runs uninterrupted, its grid rows side by side (PARALLEL=3, the loops dealt over
    ROW_GPUS=0,1), while `killed` runs them one after another and is SIGKILLed during its last
    generation stage and rerun. One pair of runs serves four checks: the rerun's report against an
    uninterrupted run's, parallel rows against serial ones, two concurrent pipelines against each
    other, and what they leave in the shared TMPDIR.
    Side by side they cost CI little more than one: a tiny pipeline leaves much of 2 cores idle
    (process starts, single-process stages); measured ~400 s for the pair, ~320 s for one alone."""
    root = tmp_path_factory.mktemp("pipeline")
    shared_tmp = root / "tmp"
    shared_tmp.mkdir()
    env = {**os.environ, "TINY_ASSETS": str(tiny_assets), "TMPDIR": str(shared_tmp)}
    killed, whole = root / "killed", root / "whole"
    with open(root / "whole.log", "w") as log:
        whole_proc = subprocess.Popen(["bash", str(REPO / "pipeline_tiny.sh")],
                                      env={**env, "EXP_DIR": str(whole), "PARALLEL": "3", "ROW_GPUS": "0,1",
                                           "TRAIN_ARGS": "report_to=tensorboard"},
                                      cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    try:
        serial = {**env, "EXP_DIR": str(killed), "PARALLEL": "1"}
        kill_during_stage(serial, killed, KILLED_STAGE)
        res = subprocess.run(["bash", str(REPO / "pipeline_tiny.sh")], env=serial,
                             cwd=REPO, capture_output=True, text=True, timeout=1200)
        assert res.returncode == 0, res.stderr[-4000:]
        stages = [line.split(" ", 2)[2] for line in res.stderr.splitlines() if line.startswith("== ")]
        assert stages == [f"{LAST_ROW.name}: teacher eval", "report"]  # finished stages were skipped
        assert whole_proc.wait(timeout=1200) == 0, (root / "whole.log").read_text()[-4000:]
    finally:
        if whole_proc.poll() is None:
            kill_tree(whole_proc)
    return SimpleNamespace(killed=killed, whole=whole, tmp=shared_tmp, whole_log=root / "whole.log")


@pytest.fixture(scope="module")
def tiny_run(runs):
    """The killed-and-rerun pipeline's EXP_DIR: every check of a finished pipeline runs on it."""
    return runs.killed


def grid_names():
    out = subprocess.run(["python", str(REPO / "grid.py"), "--grid", "tiny"], capture_output=True, text=True,
                         check=True).stdout.splitlines()
    names = [line.split()[0] for line in out]  # grid.py prints each row's name first
    assert any(name.endswith("_permute") for name in names)  # the control series runs through the pipeline
    return names


def check_trace(exp, name):
    traces = exp / "traces"
    ds = datasets.load_from_disk(str(traces / name))
    assert TRACE_COLUMNS <= set(ds.column_names) and len(ds) > 0
    assert (traces / f"{name}.parquet").stat().st_size > 0
    side = yaml.safe_load((traces / f"{name}.yaml").read_text())
    assert side["stats"]["n"] == len(ds)
    assert side["stats"]["af_accuracy"] == pytest.approx(sum(ds["af_correct"]) / len(ds))
    return side


@pytest.mark.slow
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
    # every line of a row's stages records that row's fields (report.py reads them, never the names)
    rows = {e["name"]: (e["role"], e["row"] and e["row"]["name"]) for e in registry}
    for n in names:
        assert rows[n] == ("train", n) and rows[f"eval_teacher_{n}"] == ("teacher_eval", n)
        assert rows[f"eval_student_{n}"] == ("student_eval", n)
    assert rows["eval_student_base"] == ("student_eval", None) and rows["holdout"] == ("holdout", None)
    assert not list((exp / "traces").glob(".*"))  # no temporary or work directories left


@pytest.mark.slow
def test_report_has_a_row_per_grid_row_and_a_plot(tiny_run):
    report = (tiny_run / "report.md").read_text()
    for row in grid.grid_rows("tiny"):
        assert f"| {row.tau:.3g} | {row.lam:.3g} |" in report
    assert (tiny_run / "tradeoff.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_the_undistilled_student_is_also_evaluated_eight_shot_and_reported(tiny_run):
    side = check_trace(tiny_run, "eval_student_base_fewshot")
    assert side["config"]["fewshot"] == 8 and side["config"]["answer_force"]  # set, yet not applied to few-shot
    rows = datasets.load_from_disk(str(tiny_run / "traces" / "eval_student_base_fewshot"))
    assert all(p.count("Question: ") == 9 and p.endswith(f"Question: {q}\nAnswer:")
               for p, q in zip(rows["prompt"], rows["question"]))
    assert not any("\nQuestion:" in c for c in rows["completion"]) and set(rows["forced"]) == {""}
    assert "Undistilled student on test, 8-shot plain prompts" in (tiny_run / "report.md").read_text()


@pytest.mark.slow
def test_the_trace_viewer_opens_in_headless_chromium_with_every_row(tiny_run, chromium):
    import viewer
    dom = viewer.headless(tiny_run / "traces.html", "--virtual-time-budget=5000", "--dump-dom")
    body = re.search(r"<body[^>]*>", dom).group(0)
    # every grid row's first 4 train traces (gentraces' token_details), side by side
    assert 'data-status="ok"' in body and 'data-errors="0"' in body and 'data-traces="12"' in body, body


@pytest.mark.slow
def test_report_to_tensorboard_leaves_the_training_and_holdout_losses_in_event_files(runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    for name in grid_names():
        events = [EventAccumulator(str(p)).Reload() for p in (runs.whole / "models" / f"student_{name}" / "runs").rglob(
            "events.out.tfevents.*")]
        tags = {tag for e in events for tag in e.Tags()["scalars"]}
        assert {"train/loss", "eval/loss"} <= tags, name
        summary = yaml.safe_load((runs.whole / "models" / f"student_{name}" / "train_summary.yaml").read_text())
        holdout = [s.value for e in events if "eval/loss" in e.Tags()["scalars"] for s in e.Scalars("eval/loss")]
        assert holdout[-1] == pytest.approx(summary["eval_losses"][-1]["loss"], rel=1e-5)


@pytest.mark.slow
def test_the_pipeline_ends_with_a_summary_of_its_stages(runs):
    log = runs.whole_log.read_text()
    summary = re.search(r"^pipeline summary: (\d+) ran, (\d+) skipped, (\d+) failed; \d+ s in all", log, re.M)
    # every trace set, the gradient, 3 distills and the report ran; phase 2 skipped the temperature row's
    # train traces, which phase 1 had made
    assert summary and summary.groups() == (str(N_TRACES + 1 + 3 + 1), "1", "0")
    assert re.search(r"^  ran +\d+ s  proxy gradient$", log, re.M)


@pytest.mark.slow
def test_the_temperature_row_student_learns_from_its_traces(tiny_run):
    """The tiny run teaches something: the temperature row's student boxes the right answer at least 30
    points more often than the undistilled student (the report's metric, raw: see pipeline_tiny.sh)."""
    registry = registry_by_name(tiny_run)
    temperature = next(r for r in grid.grid_rows("tiny") if r.kind == "temperature")
    student, base = registry[f"eval_student_{temperature.name}"], registry["eval_student_base"]
    assert student["raw_accuracy"] >= base["raw_accuracy"] + 0.30, (student["raw_accuracy"], base["raw_accuracy"])


@pytest.mark.slow
def test_tiny_teacher_answers_well_above_chance(tiny_run):
    # the teacher's greedy answer-forced accuracy on the test split, as its sidecar reports it
    side = yaml.safe_load((tiny_run / "traces" / "eval_teacher_base.yaml").read_text())
    assert side["config"]["tau"] == 0 and side["config"]["data_split"] == "gsm8k_test"
    assert side["stats"]["af_accuracy"] >= 0.5


@pytest.mark.slow
def test_rerun_skips_every_finished_stage(tiny_run, tiny_assets):
    env = {**os.environ, "EXP_DIR": str(tiny_run), "TINY_ASSETS": str(tiny_assets)}
    res = subprocess.run(["bash", str(REPO / "pipeline_tiny.sh")], env=env, cwd=REPO,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    stages = [line for line in res.stderr.splitlines() if line.startswith("== ")]
    assert [s.split(" ", 2)[2] for s in stages] == ["report"]
    # phase 1 does not run (holdout and gradient exist); phase 2 skips 3 references and 3 rows x 4 stages
    assert re.search(r"^pipeline summary: 1 ran, 15 skipped, 0 failed", res.stderr, re.M), res.stderr[-2000:]


@pytest.mark.slow
def test_stage_killed_mid_run_is_redone_to_the_uninterrupted_result(tiny_run, tiny_assets, tmp_path):
    side = yaml.safe_load((tiny_run / "traces" / f"{KILLED_STAGE}.yaml").read_text())
    overrides = [f"{k}={v}" for k, v in side["config"].items()
                 if k in ("teacher", "tokenizer", "data_split", "data_dir", "max_length", "max_prompt_length",
                          "tau", "lam", "batch_size", "trace_name") and v is not None]
    subprocess.run([sys.executable, str(REPO / "gentraces.py"), *overrides, f"exp_dir={tmp_path}"],
                   check=True, cwd=REPO, capture_output=True)
    resumed = datasets.load_from_disk(str(tiny_run / "traces" / KILLED_STAGE))
    whole = datasets.load_from_disk(str(tmp_path / "traces" / KILLED_STAGE))
    assert resumed["completion"] == whole["completion"] and resumed["forced"] == whole["forced"]


def registry_by_name(exp):
    """The registry as report.py reads it (the last line of a name wins), with the EXP_DIR in paths
    replaced by a placeholder: trace and student paths lie in EXP_DIR, which differs by design."""
    entries = {}
    for line in (exp / "metadata" / "trace_registry.jsonl").read_text().splitlines():
        entry = json.loads(line.replace(str(exp), "$EXP_DIR"))
        entries[entry["name"]] = entry
    return entries


@pytest.mark.slow
def test_killed_and_rerun_pipeline_reports_what_an_uninterrupted_one_does(runs):
    # report.md holds only accuracies and counts (no timings, paths or dates), so it must match byte
    # for byte; the rerun redid the killed stage, so this compares redone and resumed work too
    assert (runs.killed / "report.md").read_text() == (runs.whole / "report.md").read_text()
    # `created` is the wall-clock time a line was written: the one field that differs by design
    killed, whole = ({name: {k: v for k, v in e.items() if k != "created"} for name, e in registry_by_name(r).items()}
                     for r in (runs.killed, runs.whole))
    assert len(whole) == N_TRACES
    assert killed == whole  # name, split, model, tau, lam, eps, n, raw and af accuracy of every trace


@pytest.mark.slow
def test_parallel_row_loops_each_ran_a_row_and_phase_one_ran_beside_the_gradient(runs):
    log = runs.whole_log.read_text()
    lines = log.splitlines()
    starts = {line.split("]")[0] + "]" for line in lines if re.match(r"\[rows \d\] == .*: distill", line)}
    assert starts == {"[rows 0]", "[rows 1]", "[rows 2]"}
    # phase 1: the temperature row's train traces ran beside the holdout traces and the gradient; the
    # ADS rows' traces waited for the gradient (phase 2), and the references ran beside the rows
    stage = lambda pattern: [i for i, line in enumerate(lines) if re.match(pattern, line)]  # noqa: E731
    gradient = stage(r"\[prepare\] == .*proxy gradient")[0]
    temperature_traces = stage(r"\[rows \d\] == .*lam0\.00e\+00_eps0\.00e\+00: train traces")
    assert len(temperature_traces) == 1 and temperature_traces[0] < gradient
    assert min(stage(r"\[rows \d\] == .*lam2\.00e-01.*: train traces")) > gradient
    assert min(stage(r"\[references\] == ")) < max(stage(r"\[rows \d\] == "))
    assert [line.split(" ", 3)[3] for line in lines if line.startswith("[references] == ")] == \
        ["teacher greedy eval", "undistilled student eval", "undistilled student 8-shot eval"]
    # ROW_GPUS=0,1 deals the loops over the GPUs round-robin (on CPU the variable is simply unused)
    assert sorted(set(re.findall(r"^\[rows (\d)\] on GPU (\d)$", log, re.M))) == [("0", "0"), ("1", "1"), ("2", "0")]


@pytest.mark.slow
def test_two_pipelines_at_once_write_identical_outputs(runs):
    """Same assets and seeds, so two pipelines that never touched each other's files write the same
    gradient and the same traces; a shared work file or a crossed EXP_DIR would show up here."""
    names = sorted(p.name for p in (runs.whole / "traces").iterdir() if p.is_dir())
    assert names == sorted(p.name for p in (runs.killed / "traces").iterdir() if p.is_dir())
    assert len(names) == N_TRACES
    for name in names:
        a = datasets.load_from_disk(str(runs.whole / "traces" / name))
        b = datasets.load_from_disk(str(runs.killed / "traces" / name))
        assert a["completion"] == b["completion"] and a["forced"] == b["forced"], name
    g_whole, g_killed = (load_file(str(r / "student_grads.safetensors")) for r in (runs.whole, runs.killed))
    assert g_whole.keys() == g_killed.keys()
    assert all((g_whole[k] == g_killed[k]).all() for k in g_whole)


@pytest.mark.slow
def test_two_pipelines_at_once_leave_nothing_in_the_shared_tmpdir(runs):
    """Both pipelines (and the killed one's rerun) had TMPDIR set to one fresh directory. No file may
    be left there (the reference kept its caches at fixed /tmp paths, which concurrent runs shared).
    Two kinds of empty directory are allowed, both torch's: torchrun's per-launch log directories
    (mkdtemp names, so never shared; torchrun does not remove them) and torch.compile's cache
    directory torchinductor_USER (one per user by design: content-addressed and written under file
    locks, so sharing it is safe; the CPU pipeline compiles nothing into it)."""
    entries = sorted(p.name for p in runs.tmp.iterdir())
    assert any(name.startswith("torchelastic_") for name in entries)  # the launches did use this TMPDIR
    allowed = re.compile(r"torchelastic_[a-z0-9_]{8}|torchinductor_\w+")
    assert [name for name in entries if not allowed.fullmatch(name)] == []
    assert [str(p) for p in runs.tmp.rglob("*") if not p.is_dir()] == []


def test_no_script_writes_to_a_fixed_tmp_path():
    """TMPDIR does not cover a hard-coded /tmp path, so none may appear in the scripts or drivers."""
    sources = [p for p in [*REPO.glob("*.py"), *REPO.glob("*.sh")] if not p.name.startswith(".")]
    assert sources
    offenders = [p.name for p in sources if re.search(r"(?<![\w.}])/tmp\b", p.read_text())]
    assert offenders == []
