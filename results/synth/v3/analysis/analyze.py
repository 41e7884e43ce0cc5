"""How robust is the synth run's ADS-temperature gap, and what did ADS change in the teacher's traces?

Reads only files committed beside it: the registry, the per-problem grades, every row's teacher eval
completions and every student's train summary. Prints (1) each student's loss on the teacher's greedy
holdout traces, (2) the step-style and closing mix of the correct teacher traces of each row, (3) the
raw-accuracy gap with each grid row left out in turn, (4) the gaps without the students whose training
failed on clean traces.

    python results/synth/v3/analysis/analyze.py > results/synth/v3/analysis/analysis.txt
"""
import re
import sys
from pathlib import Path

import pandas as pd
import yaml

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[3]))
import report  # noqa: E402

STYLES = {"compact": r"\d+[+-]\d+=\d+", "spaced": r"\d+ [+-] \d+ = \d+", "words": r"\d+ (plus|minus) \d+ is \d+"}
CLOSINGS = {"The answer is": "The answer is", "So NAME has": "So ", "bare": None}


def holdout_losses():
    print("(1) distilled student: loss on the teacher's greedy holdout traces after 8 epochs (3,000 traces)")
    for path in sorted((HERE / "train_summaries").glob("*.yaml")):
        s = yaml.safe_load(path.read_text())
        print(f"  {path.stem:<46} {s['eval_losses'][-1]['loss']:.3f}")


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


def styles():
    print("\n(2) correct teacher traces of each row (test split): step styles and closings")
    print(f"  {'row':<46} {'correct':>7}  " + " ".join(f"{k:>8}" for k in STYLES) + "  "
          + " ".join(f"{k:>14}" for k in CLOSINGS))
    traces = pd.read_parquet(HERE / "eval_teacher_completions.parquet")
    for row, group in traces.groupby("row"):
        ok = group[group["raw_correct"]]
        lines, closings = style_mix(list(ok["completion"]))
        print(f"  {row:<46} {len(ok):>7}  " + " ".join(f"{v:>8.2f}" for v in lines.values()) + "  "
              + " ".join(f"{v:>14.2f}" for v in closings.values()))


def leave_one_out():
    entries = report.load_registry(HERE.parent / "metadata" / "trace_registry.jsonl")
    rows = report.collect_rows(entries)
    teacher = {r["name"]: report.accuracy(r["teacher"], "raw_accuracy") for r in rows}
    student = {r["name"]: report.accuracy(r["student"], "raw_accuracy") for r in rows}

    def gap(kept):
        return report.curve_gap(report.series_points(kept, "ADS", teacher, student),
                                report.series_points(kept, "temperature", teacher, student))

    print(f"\n(3) raw-accuracy gap student(ADS) - student(temperature), all rows: {gap(rows):+.1f} points; "
          "with one row left out:")
    for r in sorted(rows, key=lambda r: gap([x for x in rows if x is not r])):
        print(f"  without {r['name']:<46} ({r['series']}, teacher {teacher[r['name']]:.1f}%, "
              f"student {student[r['name']]:.1f}%): {gap([x for x in rows if x is not r]):+.1f}")


def without_failed_training():
    """The gaps again, without the students that failed to learn clean traces: traces from a teacher
    at 80% or more, yet a final holdout loss above 0.2 (rule fixed after seeing this run's losses)."""
    entries = report.load_registry(HERE.parent / "metadata" / "trace_registry.jsonl")
    rows = report.collect_rows(entries)
    loss = {p.stem: yaml.safe_load(p.read_text())["eval_losses"][-1]["loss"]
            for p in (HERE / "train_summaries").glob("*.yaml")}
    failed = [r for r in rows if report.accuracy(r["teacher"], "raw_accuracy") >= 80 and loss[r["name"]] > 0.2]
    print("\n(4) students from traces of a teacher at >= 80% whose holdout loss ended above 0.2:")
    for r in failed:
        print(f"  {r['name']:<46} loss {loss[r['name']]:.3f}, student {report.accuracy(r['student'], 'raw_accuracy'):.1f}%")
    print("  the gaps without them (same bootstrap as the report):")
    for g in report.gap_summary([r for r in rows if r not in failed], HERE.parent, "raw"):
        print("  " + report.gap_line(g))


if __name__ == "__main__":
    holdout_losses()
    styles()
    leave_one_out()
    without_failed_training()
