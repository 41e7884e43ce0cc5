"""Summarise a sweep: a markdown table and the teacher-vs-student accuracy trade-off plot.

Reads EXP_DIR/metadata/trace_registry.jsonl (the last line of a name wins), pairs each grid row's
`eval_teacher_{row}` and `eval_student_{row}` entries, and writes EXP_DIR/tradeoff.png, then
EXP_DIR/report.md (the stage's sentinel, so it is written last and renamed into place).

    python report.py --exp-dir exp/gsm8k
"""
import argparse
import json
import os
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on the nodes; must precede pyplot
import matplotlib.pyplot as plt

# Row names are grid.row_name's `tau{:.2e}_lam{:.2e}_eps{:.2e}`; other names (train traces, holdout,
# eval_teacher_base, eval_student_base) do not match.
NUM = r"(-?\d\.\d+e[+-]\d+)"
EVAL_NAME = re.compile(rf"^eval_(teacher|student)_tau{NUM}_lam{NUM}_eps{NUM}$")
SERIES_STYLE = {"ADS": dict(marker="o", color="tab:red"), "temperature": dict(marker="s", color="tab:blue")}


def load_registry(path: Path) -> dict[str, dict]:
    """Registry entries by name; a name appended again (a rerun) replaces the earlier entry."""
    if not path.is_file():
        raise SystemExit(f"report.py: registry not found: {path}")
    entries = {}
    with open(path) as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
                entries[entry["name"]] = entry
            except (json.JSONDecodeError, TypeError, KeyError) as e:
                raise SystemExit(f"report.py: {path}:{lineno}: malformed registry line "
                                 f"({type(e).__name__}: {e})")
    return entries


def collect_rows(entries: dict[str, dict]) -> list[dict]:
    """One dict per grid row with any eval, sorted by series, tau, lam; missing evals are None.

    tau, lam and eps are parsed from the name, since a student eval's own entry records the greedy
    decode (tau = lam = 0), not the grid row it belongs to.
    """
    rows = {}
    for name, entry in entries.items():
        match = EVAL_NAME.match(name)
        if match is None:
            continue
        who = match.group(1)
        tau, lam, eps = (float(v) for v in match.groups()[1:])
        # lam = 0 samples with temperature alone (no proxy), whatever eps says.
        series = "ADS" if lam > 0 else "temperature"
        row = rows.setdefault((tau, lam, eps), dict(series=series, tau=tau, lam=lam, eps=eps,
                                                    teacher=None, student=None))
        row[who] = entry
    return sorted(rows.values(), key=lambda r: (r["series"], r["tau"], r["lam"]))


def accuracy(entry: dict | None, key: str) -> float | None:
    """entry[key] in percent, or None when the eval has not run."""
    if entry is None or entry.get(key) is None:
        return None
    return 100 * entry[key]


def fmt_acc(entry: dict | None, key: str) -> str:
    acc = accuracy(entry, key)
    return "-" if acc is None else f"{acc:.1f}"


def summary_line(label: str, entry: dict) -> str:
    af, raw = fmt_acc(entry, "af_accuracy"), fmt_acc(entry, "raw_accuracy")
    return f"{label}: af {af}%, raw {raw}% (n={entry.get('n', '-')})"


def write_table(rows: list[dict], entries: dict[str, dict], path: Path) -> None:
    """Write the markdown report to a temporary name, then rename it to `path`."""
    lines = [
        "# Antidistillation sampling: sweep report",
        "",
        "Accuracies in percent on the test split. Teacher: the teacher sampling with the row's "
        "(tau, lam, eps). Student: the student distilled on the row's traces, decoding greedily.",
        "",
        "| series | tau | lam | eps | teacher af | teacher raw | student af | student raw | n |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        t, s = r["teacher"], r["student"]
        n = (t or s).get("n", "-")
        lines.append(
            f"| {r['series']} | {r['tau']:.3g} | {r['lam']:.3g} | {r['eps']:.3g} "
            f"| {fmt_acc(t, 'af_accuracy')} | {fmt_acc(t, 'raw_accuracy')} "
            f"| {fmt_acc(s, 'af_accuracy')} | {fmt_acc(s, 'raw_accuracy')} | {n} |")
    if "holdout" in entries:
        lines += ["", summary_line("Teacher greedy on holdout", entries["holdout"])]
    if "eval_teacher_base" in entries:
        lines += ["", summary_line("Teacher greedy on test", entries["eval_teacher_base"])]
    if "eval_student_base" in entries:
        lines += ["", summary_line("Undistilled student on test", entries["eval_student_base"])]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, path)


def plot_tradeoff(rows: list[dict], base: dict | None, path: Path) -> None:
    """Scatter teacher af accuracy (x) against student af accuracy (y), one series per sampler."""
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for series, style in SERIES_STYLE.items():
        points = [(accuracy(r["teacher"], "af_accuracy"), accuracy(r["student"], "af_accuracy"))
                  for r in rows if r["series"] == series]
        points = [(x, y) for x, y in points if x is not None and y is not None]
        # An empty series still gets its legend entry, so the legend always names both samplers.
        ax.scatter([x for x, _ in points], [y for _, y in points],
                   label=f"{series} ({len(points)} rows)", **style)
    if accuracy(base, "af_accuracy") is not None:
        ax.axhline(accuracy(base, "af_accuracy"), color="gray", linestyle="--", label="undistilled student")
    ax.set_xlabel("teacher accuracy, answer-forced (%)")
    ax.set_ylabel("distilled student accuracy, answer-forced (%)")
    ax.set_title("Teacher vs distilled-student accuracy")
    ax.set_xlim(-2, 102)  # fixed 0-100% axes keep plots of different sweeps comparable
    ax.set_ylim(-2, 102)
    ax.grid(alpha=0.3)
    ax.legend(loc="best")
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, format="png", dpi=150)
    plt.close(fig)
    os.replace(tmp, path)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--exp-dir", type=Path, required=True, help="experiment directory holding metadata/")
    args = parser.parse_args(argv)
    entries = load_registry(args.exp_dir / "metadata" / "trace_registry.jsonl")
    rows = collect_rows(entries)
    plot_tradeoff(rows, entries.get("eval_student_base"), args.exp_dir / "tradeoff.png")
    write_table(rows, entries, args.exp_dir / "report.md")
    print(f"report.py: {len(rows)} grid rows -> {args.exp_dir}/report.md, {args.exp_dir}/tradeoff.png")


if __name__ == "__main__":
    main()
