"""How robust is the synth reproduction's ADS-temperature gap? The run in results/synth and its
replicate in results/synth/seed2 (same assets seed, yet another teacher; other trace and student
seeds), then every run of this grid together: these two, v4/ and v4/seed2/, and v3/.

Reads only files committed beside it: each run's registry, per-problem grades, teacher eval
completions and students' train summaries. Prints, for each run, (1) each student's loss on the
teacher's greedy holdout traces, (2) the step-style and closing mix of the correct teacher traces,
(3) the raw-accuracy gap with each grid row left out in turn, (4) the gaps without the students that
failed to learn clean traces; then (5) the five runs of this grid side by side and pooled, with
intervals that resample the grid rows (each trained its own student) as well as the test problems,
and (6) where along the teacher-accuracy axis each run's gap lies.

    python results/synth/analysis/analyze.py > results/synth/analysis/analysis.txt
"""
import re
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[2]))
import report  # noqa: E402

RUNS = {"main": HERE.parent, "seed2": HERE.parent / "seed2"}
# every run of the synth grid, oldest first (v3's students were trained on a resume after 9 of them
# ran out of memory)
GRID_RUNS = {"v3": HERE.parent / "v3", "v4": HERE.parent / "v4", "v4/seed2": HERE.parent / "v4" / "seed2", **RUNS}
STYLES = {"compact": r"\d+[+-]\d+=\d+", "spaced": r"\d+ [+-] \d+ = \d+", "words": r"\d+ (plus|minus) \d+ is \d+"}
CLOSINGS = {"The answer is": "The answer is", "So NAME has": "So ", "bare": None}
PAIRS = [("ADS", "temperature"), (report.PERMUTED, "temperature"), ("ADS", report.PERMUTED)]
FAILED_LOSS, FAILED_TEACHER = 0.2, 80  # the rule fixed after the v3 run's losses, kept unchanged


def rows_of(run):
    return report.collect_rows(report.load_registry(run / "metadata" / "trace_registry.jsonl"))


def raw(entry):
    return report.accuracy(entry, "raw_accuracy")


def holdout_losses(run):
    """Final holdout loss of every student, by row name."""
    return {p.stem: yaml.safe_load(p.read_text())["eval_losses"][-1]["loss"]
            for p in (run / "analysis" / "train_summaries").glob("*.yaml")}


def style_mix(completions):
    """Share of step lines in each style and of traces with each closing, over the given traces."""
    lines, closings = {k: 0 for k in STYLES}, {k: 0 for k in CLOSINGS}
    for text in completions:
        body, _, tail = text.partition("</think>")
        for line in body.splitlines():
            step = line.split(". ", 1)[-1]
            for name, pattern in STYLES.items():
                if re.fullmatch(pattern, step):
                    lines[name] += 1
        closing = next((k for k, v in CLOSINGS.items() if v and v in tail), "bare")
        closings[closing] += 1
    n_lines, n = max(1, sum(lines.values())), max(1, len(completions))
    return ({k: v / n_lines for k, v in lines.items()}, {k: v / n for k, v in closings.items()})


def print_losses(run):
    print("(1) distilled student: loss on the teacher's greedy holdout traces after 8 epochs (3,000 traces)")
    for name, loss in sorted(holdout_losses(run).items()):
        print(f"  {name:<46} {loss:.3f}")


def print_styles(run):
    print("\n(2) correct teacher traces of each row (test split): step styles and closings")
    print(f"  {'row':<46} {'correct':>7}  " + " ".join(f"{k:>8}" for k in STYLES) + "  "
          + " ".join(f"{k:>14}" for k in CLOSINGS))
    traces = pd.read_parquet(run / "analysis" / "eval_teacher_completions.parquet")
    for row, group in traces.groupby("row"):
        ok = group[group["raw_correct"]]
        lines, closings = style_mix(list(ok["completion"]))
        print(f"  {row:<46} {len(ok):>7}  " + " ".join(f"{v:>8.2f}" for v in lines.values()) + "  "
              + " ".join(f"{v:>14.2f}" for v in closings.values()))


def ads_gap(rows):
    teacher = {r["name"]: raw(r["teacher"]) for r in rows}
    student = {r["name"]: raw(r["student"]) for r in rows}
    return report.curve_gap(report.series_points(rows, "ADS", teacher, student),
                            report.series_points(rows, "temperature", teacher, student))


def print_leave_one_out(rows):
    print(f"\n(3) raw-accuracy gap student(ADS) - student(temperature), all rows: {ads_gap(rows):+.1f} points; "
          "with one row left out:")
    for r in sorted(rows, key=lambda r: ads_gap([x for x in rows if x is not r])):
        print(f"  without {r['name']:<46} ({r['series']}, teacher {raw(r['teacher']):.1f}%, "
              f"student {raw(r['student']):.1f}%): {ads_gap([x for x in rows if x is not r]):+.1f}")


def failed_trainings(run, rows):
    """Students of a teacher at >= 80% whose final holdout loss stayed above 0.2."""
    loss = holdout_losses(run)
    return [r for r in rows if raw(r["teacher"]) >= FAILED_TEACHER and loss[r["name"]] > FAILED_LOSS]


def print_without_failed(run, rows):
    failed = failed_trainings(run, rows)
    loss = holdout_losses(run)
    print(f"\n(4) students from traces of a teacher at >= {FAILED_TEACHER}% whose holdout loss ended above "
          f"{FAILED_LOSS}:")
    for r in failed:
        print(f"  {r['name']:<46} loss {loss[r['name']]:.3f}, student {raw(r['student']):.1f}%")
    print("  the gaps without them (same bootstrap as the report):")
    for g in report.gap_summary([r for r in rows if r not in failed], run, "raw"):
        print("  " + report.gap_line(g))


def grades(label, run, rows):
    """{label/row name: (teacher 0/1 grades, student 0/1 grades)} over the test problems, in idx order."""
    names, teacher, student = report.per_problem_grades(run, rows, "raw")
    return {f"{label}/{n}": (teacher[i], student[i]) for i, n in enumerate(names)}


def row_bootstrap(runs, samples=2000, seed=0):
    """Gaps and 95% intervals when both the test problems and, within each series, the grid rows
    are resampled: every row trained its own student, so row-to-row training noise enters the interval
    (the report's interval resamples only the problems). Rows of several runs are pooled per series."""
    series, data = {}, {}
    for label, run in runs.items():
        rows = rows_of(run)
        data.update(grades(label, run, rows))
        for r in rows:
            series.setdefault(r["series"], []).append(f"{label}/{r['name']}")
    rng = np.random.default_rng(seed)
    n = len(next(iter(data.values()))[0])
    out = {}
    for a, b in PAIRS:
        found = []
        for _ in range(samples):
            weights = rng.multinomial(n, np.full(n, 1.0 / n)) / n
            points = {}
            for s in (a, b):
                picked = rng.choice(series[s], size=len(series[s]))
                points[s] = [(100 * weights @ data[k][0], 100 * weights @ data[k][1]) for k in picked]
            gap = report.curve_gap(points[a], points[b])
            if gap is not None:
                found.append(gap)
        full = {s: [(100 * data[k][0].mean(), 100 * data[k][1].mean()) for k in series[s]] for s in (a, b)}
        out[(a, b)] = (report.curve_gap(full[a], full[b]), *np.percentile(found, [2.5, 97.5]), len(found))
    return out


def print_replicates():
    print("\n(5) every run of this grid side by side: gap (percent points), 95% interval resampling problems "
          "only (the report's), and resampling grid rows and problems; then all runs' rows pooled, and the "
          "mean and standard deviation of the five runs' gaps")
    by_rows = {name: row_bootstrap({name: run}) for name, run in GRID_RUNS.items()}
    by_rows["all five, rows pooled"] = row_bootstrap(GRID_RUNS)
    by_problems = {name: {(g["a"], g["b"]): g for g in report.gap_summary(rows_of(run), run, "raw")}
                   for name, run in GRID_RUNS.items()}
    for a, b in PAIRS:
        print(f"  student({a}) - student({b}):")
        for name, table in by_rows.items():
            gap, low, high, kept = table[(a, b)]
            problems = by_problems.get(name, {}).get((a, b))
            only = f"problems {problems['low']:+.1f} to {problems['high']:+.1f}; " if problems else ""
            print(f"    {name:<24} {gap:+5.1f}   {only}rows and problems {low:+.1f} to {high:+.1f} "
                  f"({kept} of 2000 resamples overlap)")
        gaps = np.array([by_problems[name][(a, b)]["gap"] for name in GRID_RUNS])
        print(f"    {'runs: mean, sd':<24} {gaps.mean():+5.1f}   sd {gaps.std(ddof=1):.1f} over {len(gaps)} runs")


def curve(points):
    """(xs, ys) of a series' curve as report.curve_gap draws it: rows at equal x averaged."""
    xs = sorted({x for x, _ in points})
    return np.array(xs), np.array([np.mean([y for x2, y in points if x2 == x]) for x in xs])


def print_gap_by_teacher_accuracy(levels=(20, 40, 60, 80, 90)):
    print("\n(6) student(ADS) - student(temperature) at given teacher accuracies (raw, percent points; "
          "'.' where a curve does not reach)")
    print(f"  {'run':<10}" + "".join(f"{f'at {x}%':>9}" for x in levels))
    for name, run in GRID_RUNS.items():
        rows = rows_of(run)
        teacher = {r["name"]: raw(r["teacher"]) for r in rows}
        student = {r["name"]: raw(r["student"]) for r in rows}
        ads, temp = (curve(report.series_points(rows, s, teacher, student)) for s in ("ADS", "temperature"))
        cells = []
        for x in levels:
            inside = all(c[0][0] <= x <= c[0][-1] for c in (ads, temp))
            cells.append(f"{np.interp(x, *ads) - np.interp(x, *temp):+9.1f}" if inside else f"{'.':>9}")
        print(f"  {name:<10}" + "".join(cells))


if __name__ == "__main__":
    for name, run in RUNS.items():
        print(f"=== {name} run: {run.relative_to(HERE.parents[2])}\n")
        rows = rows_of(run)
        print_losses(run)
        print_styles(run)
        print_leave_one_out(rows)
        print_without_failed(run, rows)
        print()
    print_replicates()
    print_gap_by_teacher_accuracy()
