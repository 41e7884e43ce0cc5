"""pipeline_math.sh and pipeline_mmlu.sh end to end, offline, on the tiny assets (whose data folder
also holds the problems in the MATH and MMLU schemas): every stage, the dataset's grader, answer
forcing and the report run for each schema. The tiny teacher is not good at them; that is not the
point."""
import json
import os
import subprocess
from pathlib import Path

import pandas as pd
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow
ROW = "tau9.00e-01_lam2.00e-01_eps1.00e-02"


@pytest.mark.parametrize("driver, dataset, gold", [("pipeline_math.sh", "hendrycks_math", r"^\d+$"),
                                                   ("pipeline_mmlu.sh", "mmlu", r"^[ABCD]$")])
def test_the_dataset_driver_runs_every_stage_and_reports(driver, dataset, gold, tiny_assets, tmp_path):
    exp = tmp_path / "exp"
    grid = tmp_path / "grid.txt"
    grid.write_text("9.00e-01 2.00e-01 1.00e-02\n")
    env = {**os.environ, "EXP_DIR": str(exp), "TEACHER": str(tiny_assets / "teacher"),
           "PROXY": str(tiny_assets / "proxy"), "STUDENT": str(tiny_assets / "student"),
           "STUDENT_TOKENIZER": str(tiny_assets / "student"), "GRID": str(grid), "LAUNCH": "python",
           "BATCH": "64", "ADS_BATCH": "64", "MAX_SAMPLES": "12", "HOLDOUT_MAX_SAMPLES": "12",
           "GEN_ARGS": f"data_dir={tiny_assets / 'data'} max_length=256 max_prompt_length=224",
           "GRAD_ARGS": "batch_size=8 max_length=256",
           "TRAIN_ARGS": "lora_r=8 lora_alpha=16 max_length=256 epochs=1 global_batch_size=8 per_device_batch_size=8"}
    res = subprocess.run(["bash", str(REPO / driver)], env=env, cwd=REPO, capture_output=True, text=True,
                         timeout=1200)
    assert res.returncode == 0, res.stderr[-4000:]
    registry = [json.loads(line) for line in (exp / "metadata" / "trace_registry.jsonl").read_text().splitlines()]
    names = {e["name"] for e in registry}
    assert names == {"holdout", ROW, f"eval_student_{ROW}", f"eval_teacher_{ROW}", "eval_teacher_base",
                     "eval_student_base", "eval_student_base_fewshot"}
    for name in names:
        side = yaml.safe_load((exp / "traces" / f"{name}.yaml").read_text())
        assert side["config"]["data_split"].startswith(dataset) and side["stats"]["n"] == 12
        rows = pd.read_parquet(exp / "traces" / f"{name}.parquet")
        assert rows["gold"].str.fullmatch(gold).all()
        # a few-shot eval is graded on the answer it states; every other one is answer-forced
        forced = rows["forced"].str.len()
        assert (forced == 0).all() if side["config"]["fewshot"] else (forced > 0).all()
    report = (exp / "report.md").read_text()
    assert ROW in report or "ADS" in report
