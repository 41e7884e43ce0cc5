"""pipeline_synth.sh in its CPU form (tiny assets, tiny grid), as its docstring shows it: every stage
starts as a plain process (LAUNCH=python), the driver's settings reach the stages (full fine-tuning
with the holdout loss every second epoch), and two rows run side by side with the references."""
import os
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
ROWS = ["tau1.50e+00_lam0.00e+00_eps0.00e+00", "tau9.00e-01_lam2.00e-01_eps1.00e-02",
        "tau9.00e-01_lam2.00e-01_eps1.00e-02_permute"]


@pytest.fixture(scope="module")
def synth_run(tiny_assets, tmp_path_factory):
    exp = tmp_path_factory.mktemp("synth") / "exp"
    env = {**os.environ, "EXP_DIR": str(exp), "ASSETS": str(tiny_assets), "ASSETS_PROFILE": "tiny",
           "GRID": "tiny", "PARALLEL": "2"}
    res = subprocess.run(["bash", str(REPO / "pipeline_synth.sh")], env=env, cwd=REPO, capture_output=True,
                         text=True, timeout=1200)
    assert res.returncode == 0, res.stderr[-4000:]
    return exp, res.stdout + res.stderr  # the row loops' prefixed output goes to stdout


def test_synth_driver_runs_every_row_beside_the_references(synth_run):
    exp, log = synth_run
    report = (exp / "report.md").read_text()
    assert report.count("\n| ") == 1 + len(ROWS)  # the header, then one line per row
    assert "Undistilled student on test" in report
    assert all((exp / "traces" / f"eval_teacher_{row}").is_dir() for row in ROWS)
    assert "[rows 0]" in log and "[rows 1]" in log and "[references]" in log


def test_the_temperature_row_starts_before_the_gradient_it_does_not_need(synth_run):
    _, log = synth_run
    lines = log.splitlines()
    first = lambda text: next(i for i, line in enumerate(lines) if text in line)
    # the ADS rows wait for the gradient; the temperature row starts at once, beside the holdout traces
    assert first(f"{ROWS[0]}: train traces") < first("proxy gradient") < min(first(f"{r}: train traces") for r in ROWS[1:])


def test_synth_students_are_fully_fine_tuned_with_the_holdout_loss_every_second_epoch(synth_run):
    exp, _ = synth_run
    for row in ROWS:
        summary = yaml.safe_load((exp / "models" / f"student_{row}" / "train_summary.yaml").read_text())
        assert summary["config"]["lora_r"] == 0 and summary["config"]["epochs"] == 8
        assert [round(e["epoch"]) for e in summary["eval_losses"]] == [2, 4, 6, 8]
        assert summary["world_size"] == 1 and summary["peak_gpu_memory_gib"] is None  # CPU: no GPU to measure

