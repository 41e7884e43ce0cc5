import json
import re

import pytest

import grid
import report
from utils import ConfigError

ADS = grid.Row(0.9, 0.05, 0.01)
ADS_NO_STUDENT = grid.Row(1.0, 0.2, 0.01)
TEMPERATURE = grid.Row(1.5, 0.0, 0.0)


def entry(name, af, raw, n=100, tau=0.0, lam=0.0, eps=0.0, role="other", row=None, seed=None, model="m"):
    """A registry line as gentraces.py writes it."""
    return dict(name=name, data_split="gsm8k_test", model=model, tau=tau, lam=lam, eps=eps, n=n,
                raw_accuracy=raw, af_accuracy=af, created="2025-01-01T00:00:00", role=role,
                row=row.fields() if row else None, student_seed=seed)


def teacher_eval(row, af, raw, n=100):
    """The teacher's eval of a row: it samples with the row's settings."""
    return entry(f"eval_teacher_{row.name}", af, raw, n=n, tau=row.tau, lam=row.lam, eps=row.eps,
                 role="teacher_eval", row=row)


def student_eval(row, af, raw, n=100, seed=None):
    """A row's student's eval: greedy decoding of the model that pipeline.sh names after the row."""
    student = f"student_{row.name}" + ("" if seed is None else f"_seed{seed}")
    return entry(f"eval_{student}", af, raw, n=n, role="student_eval", row=row, seed=seed,
                 model=f"exp/models/{student}/final")


def write_registry(exp_dir, lines):
    (exp_dir / "metadata").mkdir(parents=True, exist_ok=True)
    path = exp_dir / "metadata" / "trace_registry.jsonl"
    path.write_text("".join(line + "\n" for line in lines))
    return path


@pytest.fixture
def exp_dir(tmp_path):
    entries = [
        entry("holdout", 0.91, 0.88, n=50, role="holdout"),
        entry(ADS.name, None, None, tau=0.9, lam=0.05, eps=0.01, role="train", row=ADS),  # not an eval, ignored
        entry("cal_probe", 0.3, 0.3, tau=0.9, lam=0.05, eps=0.01),  # a calibration probe (role other), ignored
        teacher_eval(ADS, 0.10, 0.05),  # superseded by the rerun
        student_eval(ADS, 0.40, 0.35),
        teacher_eval(TEMPERATURE, 0.70, 0.60),
        student_eval(TEMPERATURE, 0.55, 0.50),
        teacher_eval(ADS_NO_STUDENT, 0.62, 0.58),
        {**teacher_eval(ADS, 0.80, 0.75), "fd_cosine_median": 0.9987, "fd_rel_error_median": 0.052},
        entry("eval_student_base", 0.45, 0.42, role="student_eval"),
        {**entry("eval_student_base_fewshot", 0.31, 0.31, role="student_eval"), "fewshot": 8},
    ]
    write_registry(tmp_path, [json.dumps(e) for e in entries])
    return tmp_path


def table_rows(text):
    return [[c.strip() for c in line.strip("|").split("|")]
            for line in text.splitlines() if line.startswith(("| ADS", "| temperature"))]


def test_report_table_has_one_row_per_grid_row_and_last_entry_wins(exp_dir):
    report.main(["--exp-dir", str(exp_dir)])
    rows = table_rows((exp_dir / "report.md").read_text())
    assert rows == [
        ["ADS", "0.9", "0.05", "0.01", "80.0", "75.0", "40.0", "35.0", "100", "1", "-", "0.999 / 0.052"],
        ["ADS", "1", "0.2", "0.01", "62.0", "58.0", "-", "-", "100", "0", "-", "-"],
        ["temperature", "1.5", "0", "0", "70.0", "60.0", "55.0", "50.0", "100", "1", "-", "-"],
    ]


def test_report_states_holdout_and_undistilled_student_accuracy(exp_dir):
    report.main(["--exp-dir", str(exp_dir)])
    text = (exp_dir / "report.md").read_text()
    assert text.startswith("# ")
    assert "Teacher greedy on holdout: af 91.0%, raw 88.0% (n=50)" in text
    assert "Undistilled student on test: af 45.0%, raw 42.0% (n=100)" in text
    assert re.search(r"Undistilled student on test, 8-shot .*: af 31.0%, raw 31.0% \(n=100\)", text)


def test_tradeoff_plot_is_a_png(exp_dir):
    report.main(["--exp-dir", str(exp_dir)])
    png = (exp_dir / "tradeoff.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 1000
    assert not list(exp_dir.glob("*.tmp"))


def test_row_missing_its_student_eval_is_kept_with_no_student(exp_dir):
    rows = report.collect_rows(report.load_registry(exp_dir / "metadata" / "trace_registry.jsonl"))
    assert [(r["teacher"] is not None, r["student"] is not None) for r in rows] == [
        (True, True), (True, False), (True, True)]


def test_malformed_registry_line_is_a_one_line_error_naming_the_line(tmp_path):
    path = write_registry(tmp_path, [json.dumps(entry("holdout", 0.9, 0.9, role="holdout")), '{"name": "eval_teacher_', "{}"])
    with pytest.raises(ConfigError) as e:
        report.main(["--exp-dir", str(tmp_path)])
    assert len(e.value.messages) == 1 and f"{path}:2:" in e.value.msg and "\n" not in e.value.msg


def test_registry_line_without_a_name_is_malformed(tmp_path):
    path = write_registry(tmp_path, [json.dumps({"n": 3})])
    with pytest.raises(ConfigError, match=re.escape(f"{path}:1:")):
        report.main(["--exp-dir", str(tmp_path)])


def test_missing_registry_is_a_one_line_error(tmp_path):
    with pytest.raises(ConfigError, match="registry not found"):
        report.main(["--exp-dir", str(tmp_path)])
    assert not (tmp_path / "report.md").exists()


def test_curve_gap_is_the_mean_difference_over_the_shared_teacher_range():
    ads = [(20.0, 10.0), (80.0, 40.0)]
    temperature = [(0.0, 30.0), (100.0, 80.0), (100.0, 80.0)]
    assert report.curve_gap(ads, temperature) == pytest.approx(-30.0)  # parallel lines 30 points apart on [20, 80]
    assert report.curve_gap(temperature, ads) == pytest.approx(30.0)
    assert report.curve_gap(ads, [(90.0, 1.0), (95.0, 2.0)]) is None  # no shared teacher accuracy
    assert report.curve_gap(ads, [(50.0, 1.0)]) is None


def write_graded_row(exp_dir, row, teacher, student, student_raw=None):
    """Registry entries and per-problem parquet grades for one grid row (lists of 0/1 by idx); the raw
    grades equal the answer-forced ones unless student_raw gives the student's."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    (exp_dir / "traces").mkdir(parents=True, exist_ok=True)
    lines = []
    for make, af, raw in ((teacher_eval, teacher, teacher), (student_eval, student, student_raw or student)):
        line = make(row, sum(af) / len(af), sum(raw) / len(raw), n=len(af))
        pq.write_table(pa.table({"idx": list(range(len(af))), "af_correct": [bool(g) for g in af],
                                 "raw_correct": [bool(g) for g in raw]}),
                       exp_dir / "traces" / f"{line['name']}.parquet")
        lines.append(json.dumps(line))
    return lines


def test_metric_raw_takes_the_gap_and_the_plot_from_the_answers_boxed_in_the_traces(tmp_path):
    """A student that never learned the answer-forcing suffix: af grades all 0, raw grades carry
    the signal (ADS students 40 points below temperature ones at equal teacher accuracy)."""
    lines = []
    for row, t, s in [(grid.Row(1.0, 0.0, 0.0), 80, 70), (grid.Row(2.0, 0.0, 0.0), 20, 40),
                      (grid.Row(0.9, 0.01, 0.01), 80, 30), (grid.Row(0.9, 0.1, 0.01), 20, 0)]:
        grades = lambda k: [1] * k + [0] * (100 - k)  # noqa: E731
        lines += write_graded_row(tmp_path, row, grades(t), grades(0), student_raw=grades(s))
    write_registry(tmp_path, lines)
    report.main(["--exp-dir", str(tmp_path)])
    assert "ADS) - student(temperature) at matched teacher accuracy: +0.0 points" in (tmp_path / "report.md").read_text()
    report.main(["--exp-dir", str(tmp_path), "--metric", "raw"])
    text = (tmp_path / "report.md").read_text()
    assert "Student-accuracy gap (raw, percent points)" in text
    assert re.search(r"student\(ADS\) - student\(temperature\) at matched teacher accuracy: -40\.0 points "
                     r"\(95% bootstrap CI -4\d\.\d to -3\d\.\d\)", text)


def test_report_gives_the_ads_gap_with_a_bootstrap_interval_and_the_permutation_control(tmp_path):
    import random
    rng = random.Random(0)
    n = 400

    def grades(p):
        return [int(rng.random() < p) for _ in range(n)]

    lines = []
    # temperature: the student keeps 60% of the teacher's accuracy; ADS only 20%; permuted ADS 55%
    for row, t, ratio in [(grid.Row(1.0, 0.0, 0.0), 0.9, 0.6), (grid.Row(2.0, 0.0, 0.0), 0.5, 0.6),
                          (grid.Row(0.9, 0.01, 0.01), 0.85, 0.2), (grid.Row(0.9, 0.1, 0.01), 0.45, 0.2),
                          (grid.Row(0.9, 0.01, 0.01, "permute"), 0.88, 0.55),
                          (grid.Row(0.9, 0.1, 0.01, "permute"), 0.4, 0.55)]:
        lines += write_graded_row(tmp_path, row, grades(t), grades(t * ratio))
    write_registry(tmp_path, lines)
    report.main(["--exp-dir", str(tmp_path)])
    text = (tmp_path / "report.md").read_text()
    gaps = {m[0]: (float(m[1]), float(m[2]), float(m[3])) for m in re.findall(
        r"student\((.+?)\) - student\(.+?\) at matched teacher accuracy: ([+-][\d.]+) points "
        r"\(95% bootstrap CI ([+-][\d.]+) to ([+-][\d.]+)\)", text)}
    ads, low, high = gaps["ADS"]
    assert -35 < ads < -20 and low < ads < high and high < -10 and high - low < 20  # true gap: -0.4 x ~63 points
    permuted, p_low, p_high = gaps["ADS, permuted penalty"]
    assert p_low < permuted < p_high and abs(permuted) < 10
    rows = table_rows(text)
    assert [r[0] for r in rows].count("ADS, permuted penalty") == 2


def test_a_row_with_several_seeds_reports_their_mean_and_their_holdout_nll(tmp_path):
    import yaml
    row = grid.Row(0.9, 0.01, 0.01)
    lines = [json.dumps(teacher_eval(row, 0.8, 0.8))]
    for seed, acc, nll in [(69, 0.30, 0.50), (70, 0.40, 0.60), (71, 0.50, 0.70)]:
        lines.append(json.dumps(student_eval(row, acc, acc, seed=seed)))
        summary = tmp_path / "models" / f"student_{row.name}_seed{seed}" / "train_summary.yaml"
        summary.parent.mkdir(parents=True)
        summary.write_text(yaml.safe_dump({"eval_losses": [{"step": 1, "epoch": 1, "loss": 9.0},
                                                           {"step": 2, "epoch": 2, "loss": nll}]}))
    write_registry(tmp_path, lines)
    rows = report.collect_rows(report.load_registry(tmp_path / "metadata" / "trace_registry.jsonl"))
    assert len(rows) == 1 and sorted(rows[0]["students"]) == [69, 70, 71]
    assert rows[0]["student"]["af_accuracy"] == pytest.approx(0.4)
    report.main(["--exp-dir", str(tmp_path)])
    assert table_rows((tmp_path / "report.md").read_text()) == [
        ["ADS", "0.9", "0.01", "0.01", "80.0", "80.0", "40.0", "40.0", "100", "3", "0.600 ± 0.100", "-"]]


def test_bootstrap_resamples_seeds_so_disagreeing_seeds_widen_the_interval():
    import numpy as np
    n = 200
    same = {"r": (np.ones(n), np.tile((np.arange(n) % 2).astype(float), (4, 1)))}  # every seed 50%
    split = {"r": (np.ones(n), np.stack([np.ones(n), np.ones(n), np.zeros(n), np.zeros(n)]))}  # seeds 100% or 0%
    spread = lambda g: np.std([d["r"][1] for d in report.bootstrap_accuracies(g, np.random.default_rng(0), 500)])
    assert spread(split) > 5 * spread(same)


def old_registry_lines():
    """The same sweep as written before registry lines recorded their role and row: names only."""
    drop = ("role", "row", "student_seed")
    rows = [teacher_eval(ADS, 0.8, 0.75), student_eval(ADS, 0.4, 0.35, seed=69), student_eval(ADS, 0.5, 0.45, seed=70),
            teacher_eval(TEMPERATURE, 0.7, 0.6), student_eval(TEMPERATURE, 0.55, 0.5),
            teacher_eval(grid.Row(0.9, 0.05, 0.01, "permute"), 0.85, 0.8),
            entry("holdout", 0.91, 0.88, n=50), entry("eval_teacher_base", 0.9, 0.9), entry("eval_student_base", 0.2, 0.2),
            entry(ADS.name, None, None), entry("cal_ads_0.90_lam1.00e-02", 0.9, 0.9)]
    return [{k: v for k, v in e.items() if k not in drop} for e in rows], rows


def test_a_registry_from_before_row_fields_is_refused_in_one_line_naming_the_migration(tmp_path):
    old, _ = old_registry_lines()
    path = write_registry(tmp_path, [json.dumps(e) for e in old])
    with pytest.raises(ConfigError) as e:
        report.main(["--exp-dir", str(tmp_path)])
    assert len(e.value.messages) == 1 and f"{path}:1:" in e.value.msg
    assert f"python migrate_registry.py {path}" in e.value.msg


def test_migrating_an_old_registry_gives_each_line_the_fields_gentraces_now_records(tmp_path):
    import subprocess
    import sys
    from pathlib import Path
    old, new = old_registry_lines()
    path = write_registry(tmp_path, [json.dumps(e) for e in old])
    repo = Path(__file__).resolve().parents[1]
    for _ in range(2):  # the second run finds nothing to add
        res = subprocess.run([sys.executable, str(repo / "migrate_registry.py"), str(path)], capture_output=True,
                             text=True, cwd=repo, check=True)
    assert res.stdout.strip().endswith(": 0 lines gained role and row fields")
    migrated = [json.loads(line) for line in path.read_text().splitlines()]
    expected = {e["name"]: (e["role"], e["row"], e["student_seed"]) for e in new}
    expected.update({"holdout": ("holdout", None, None), "eval_teacher_base": ("teacher_eval", None, None),
                     "eval_student_base": ("student_eval", None, None), ADS.name: ("train", ADS.fields(), None),
                     "cal_ads_0.90_lam1.00e-02": ("other", None, None)})
    assert {e["name"]: (e["role"], e["row"], e["student_seed"]) for e in migrated} == expected
    rows = report.collect_rows(report.load_registry(path))
    assert [(r["series"], sorted(r["students"], key=str)) for r in rows] == [
        ("ADS", [69, 70]), ("ADS, permuted penalty", []), ("temperature", [None])]


def write_sidecar(exp_dir, row, finished_fraction, n=1000):
    """The train traces' sidecar as gentraces.py writes it (only the fields the report reads)."""
    (exp_dir / "traces").mkdir(exist_ok=True)
    (exp_dir / "traces" / f"{row.name}.yaml").write_text(f"stats:\n  n: {n}\n  finished_fraction: {finished_fraction}\n")


def test_report_says_when_the_train_traces_ran_to_max_length(exp_dir):
    write_sidecar(exp_dir, ADS, 0.005)
    write_sidecar(exp_dir, TEMPERATURE, 0.0)
    report.main(["--exp-dir", str(exp_dir)])
    line = next(x for x in (exp_dir / "report.md").read_text().splitlines() if x.startswith("Train traces cut"))
    assert f"{ADS.name} 995 of 1,000" in line and f"{TEMPERATURE.name} 1,000 of 1,000" in line
    assert ADS_NO_STUDENT.name not in line  # no sidecar: left out
    assert "worst case" in line


def test_a_few_cut_traces_are_counted_without_the_worst_case_warning(exp_dir):
    write_sidecar(exp_dir, ADS, 0.9996, n=7000)
    report.main(["--exp-dir", str(exp_dir)])
    line = next(x for x in (exp_dir / "report.md").read_text().splitlines() if x.startswith("Train traces cut"))
    assert line.endswith(f"{ADS.name} 3 of 7,000")


def test_no_line_about_cut_traces_when_every_trace_ended(exp_dir):
    write_sidecar(exp_dir, ADS, 1.0)
    write_sidecar(exp_dir, TEMPERATURE, 1.0)
    report.main(["--exp-dir", str(exp_dir)])
    assert "cut at max_length" not in (exp_dir / "report.md").read_text()
