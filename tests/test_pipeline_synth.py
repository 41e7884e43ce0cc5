"""pipeline_synth.sh in its CPU form (the synth recipe at tiny sizes), as its docstring shows it: the
assets keep cold and warm proxy and student, calibration writes the grid (eps by the FD check), every
row distills one student per seed, the diagnostic distills both student kinds for both proxies, and
the protocol's analysis runs on the experiment and on what collect.py keeps of it."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import grid

REPO = Path(__file__).resolve().parents[1]
SEEDS = [69, 70]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def synth_run(tmp_path_factory):
    exp = tmp_path_factory.mktemp("synth") / "exp"
    env = {**os.environ, "EXP_DIR": str(exp), "ASSETS_PROFILE": "synth_tiny", "TARGETS": "0.6",
           "DIAG_TARGETS": "0.6", "CAL_PROBLEMS": "16", "CAL_PROBES": "2", "SEEDS": " ".join(map(str, SEEDS)),
           "DIAG_SEEDS": " ".join(map(str, SEEDS)), "DIAG_SAMPLES": "24", "BATCH": "64", "ADS_BATCH": "64",
           "MAX_SAMPLES": "48", "HOLDOUT_MAX_SAMPLES": "24"}
    res = subprocess.run(["bash", str(REPO / "pipeline_synth.sh")], env=env, cwd=REPO, capture_output=True,
                         text=True, timeout=2400)
    assert res.returncode == 0, res.stderr[-4000:]
    return exp, res.stdout + res.stderr


def rows_of(grid):
    return [line.split() for line in grid.read_text().splitlines()]


def row_name(fields):
    return grid.parse_row(" ".join(fields)).name


def test_assets_keep_the_cold_bases_beside_the_warmed_up_proxy_and_student(synth_run):
    exp, _ = synth_run
    assets = exp / "assets"
    assert all((assets / name / "config.json").is_file() for name in ("teacher", "proxy", "proxy_cold", "student",
                                                                      "student_cold"))
    warmup = yaml.safe_load((assets / "manifest.json").read_text())["warmup"]
    assert warmup["traces"] == 200 and warmup["proxy"]["steps"] >= 1 and warmup["student"]["accuracy_history"]


def test_calibration_writes_the_band_rows_the_control_and_the_reference_with_the_checked_eps(synth_run):
    exp, _ = synth_run
    cal = yaml.safe_load((exp / "calibration" / "calibration.yaml").read_text())
    assert cal["fd_check"]["eps_auto"] and cal["eps"] in [float(f"{e:.2e}") for e in __import__("sampling").EPS_GRID]
    rows = rows_of(exp / "grid.txt")
    parsed = [grid.parse_row(" ".join(r)) for r in rows]
    assert [r.control for r in parsed if r.kind == "control"] == ["permute"]
    assert grid.Row(float(f"{cal['ads_tau']:.2e}"), 0.0, 0.0) in parsed  # the reference at the ADS rows' tau
    assert cal["plain_accuracy_at_ads_tau"] >= max(cal["targets"]) + 0.02  # the ADS rows' tau leaves them room
    assert sum(float(r[1]) > 0 for r in rows) == 2  # the ADS row and its permuted twin
    assert all(float(r[2]) == cal["eps"] for r in rows if float(r[1]) > 0)


def test_every_row_distills_one_student_per_seed_and_the_report_gives_their_mean_and_nll(synth_run):
    exp, log = synth_run
    report = (exp / "report.md").read_text()
    for fields in rows_of(exp / "grid.txt"):
        name = row_name(fields)
        for seed in SEEDS:
            summary = yaml.safe_load((exp / "models" / f"student_{name}_seed{seed}" / "train_summary.yaml").read_text())
            assert summary["config"]["seed"] == seed and summary["config"]["lora_r"] == 0
            assert [round(e["epoch"]) for e in summary["eval_losses"]] == [1, 2]
            assert (exp / "traces" / f"eval_student_{name}_seed{seed}").is_dir()
    table = [line for line in report.splitlines() if line.startswith(("| ADS", "| temperature"))]
    assert len(table) == len(rows_of(exp / "grid.txt")) and all(f"| {len(SEEDS)} | " in line for line in table)
    assert " ± " in report and "Undistilled student on test" in report


def test_the_diagnostic_distills_both_student_kinds_for_both_proxies_and_stops_before_evals(synth_run):
    exp, _ = synth_run
    for proxy, grid in (("warm", "grid_warm.txt"), ("cold", "grid_cold.txt")):
        for fields in rows_of(exp / "diagnostic" / grid):
            for kind in ("student", "proxy"):
                for seed in SEEDS:
                    path = exp / "diagnostic" / proxy / f"models_{kind}" / f"student_{row_name(fields)}_seed{seed}"
                    assert (path / "train_summary.yaml").is_file(), path
        assert not list((exp / "diagnostic" / proxy / "traces").glob("eval_*"))
    assert all(float(r[1]) > 0 for r in rows_of(exp / "diagnostic" / "grid_cold.txt"))


def test_the_protocol_analysis_runs_on_the_run_and_on_what_collect_keeps(synth_run, tmp_path):
    exp, _ = synth_run
    analyze = REPO / "results" / "synth"
    out = subprocess.run([sys.executable, str(analyze / "analyze.py"), "--exp-dir", str(exp)], capture_output=True,
                         text=True, cwd=REPO, check=True).stdout
    assert "Verdict against the pre-registered criteria" in out and "## Diagnostic" in out
    subprocess.run([sys.executable, str(analyze / "collect.py"), "--exp-dir", str(exp), "--out", str(tmp_path / "kept")],
                   check=True, cwd=REPO, capture_output=True)
    assert not list((tmp_path / "kept").rglob("*.safetensors")) and not list((tmp_path / "kept").rglob("train.parquet"))
    again = subprocess.run([sys.executable, str(analyze / "analyze.py"), "--exp-dir", str(tmp_path / "kept")],
                           capture_output=True, text=True, cwd=REPO, check=True).stdout
    strip = lambda text: text.split("\n", 1)[1]  # the first line names the experiment folder
    assert strip(again) == strip(out)


def test_the_trace_page_script_samples_every_row_of_the_runs_grid_with_token_details(synth_run, tmp_path):
    """results/synth/traces_page.sh on the run's assets (so no rebuild): every row of the committed synth
    grid sampled on the first problems, each trace with its token details, and the viewer's page."""
    import json

    import pandas as pd
    exp, _ = synth_run
    page = tmp_path / "page"
    page.mkdir()
    (page / "assets").symlink_to(exp / "assets")
    env = {**os.environ, "EXP_DIR": str(page), "ASSETS_PROFILE": "synth_tiny", "PROBLEMS": "2",
           "HOLDOUT_MAX_SAMPLES": "16", "OMP_NUM_THREADS": "1"}
    res = subprocess.run(["bash", str(REPO / "results" / "synth" / "traces_page.sh")], env=env, cwd=REPO,
                         capture_output=True, text=True, timeout=1200)
    assert res.returncode == 0, res.stderr[-4000:]
    names = [row_name(fields) for fields in rows_of(REPO / "results" / "synth" / "grid.txt")]
    for name in names:
        rows = pd.read_parquet(page / "traces" / f"{name}.parquet")
        assert len(rows) == 2 and all(json.loads(t) for t in rows["tokens"]), name
    assert (page / "traces.html").read_text().count('class="panel"') == 2 * len(names)
