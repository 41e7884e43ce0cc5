"""bench/compare_tiny.py: two pipeline runs compared trace by trace, gradient and report."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import torch
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parents[1]


def fake_run(exp, completions, grad_scale=1.0, report="# report\n"):
    (exp / "traces").mkdir(parents=True)
    pd.DataFrame({"idx": [2, 0, 1], "completion": completions, "forced": ["7", "8", "9"],
                  "af_correct": [True, False, True]}).to_parquet(exp / "traces" / "holdout.parquet")
    save_file({"w": torch.arange(4.0) * grad_scale}, str(exp / "student_grads.safetensors"))
    (exp / "report.md").write_text(report)


def compare(a, b, out):
    res = subprocess.run([sys.executable, str(REPO / "bench" / "compare_tiny.py"), str(a), str(b), "--out", str(out)],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    return json.loads(out.read_text()), res.stdout


def test_identical_runs_compare_equal_and_a_changed_row_is_counted(tmp_path):
    fake_run(tmp_path / "a", ["x1", "x2", "x3"])
    shutil.copytree(tmp_path / "a", tmp_path / "same")
    fake_run(tmp_path / "b", ["x1", "x2 but longer", "x3"], grad_scale=1.0 + 1e-6, report="# report\nmore\n")
    result, _ = compare(tmp_path / "a", tmp_path / "same", tmp_path / "same.json")
    t = result["traces"]["holdout"]
    assert t["identical_completions"] == 3 and result["gradient"]["bitwise_equal"] and result["report"]["identical"]
    result, text = compare(tmp_path / "a", tmp_path / "b", tmp_path / "diff.json")
    t = result["traces"]["holdout"]
    assert t["identical_completions"] == 2 and t["identical_forced"] == 3 and t["first_difference_at_char"] == [2]
    g = result["gradient"]
    assert not g["bitwise_equal"] and 5e-7 < g["rel_l2_diff"] < 2e-6
    assert not result["report"]["identical"] and result["report"]["diff"][-1] == "+more"
    assert "| holdout | 3 | 2 | 3 |" in text


def test_a_run_without_a_report_is_one_error_line(tmp_path):
    fake_run(tmp_path / "a", ["x", "y", "z"])
    (tmp_path / "b").mkdir()
    res = subprocess.run([sys.executable, str(REPO / "bench" / "compare_tiny.py"), str(tmp_path / "a"),
                          str(tmp_path / "b")], capture_output=True, text=True)
    assert res.returncode == 1 and res.stderr.strip().startswith("error:") and "Traceback" not in res.stderr
