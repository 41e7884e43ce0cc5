"""Summarise a sweep: a markdown table, the teacher-vs-student accuracy trade-off plot, and the gap.

Reads EXP_DIR/metadata/trace_registry.jsonl (the last line of a name wins), groups the teacher and
student evals by the grid row that each line records (its fields, from grid.py; names are never
parsed), and writes EXP_DIR/tradeoff.png, then EXP_DIR/report.md (the stage's sentinel, so it is
written last and renamed into place). Before it, EXP_DIR/traces.html (viewer.py): the train traces'
recorded tokens side by side across the grid rows, each coloured by how far the sampler moved it.

The gap is the mean over matched teacher accuracy of student(ADS) - student(temperature), each curve
linearly interpolated through its rows, over the teacher-accuracy range both series cover; negative
means ADS students are worse at equal teacher accuracy. Its 95% interval comes from a paired bootstrap
over test problems (every eval grades the same problems, so each resample reweights all rows alike),
read from the per-problem grades in EXP_DIR/traces/eval_*.parquet.  The gap and the plot use
answer-forced accuracy (the paper's), or with --metric raw the answer boxed in the trace itself.

    python report.py --exp-dir exp/gsm8k
    python report.py --exp-dir exp/synth --metric raw
"""
import os
from pathlib import Path
from typing import Literal

import matplotlib
import numpy as np

import utils
import viewer
from utils import die, load_registry

matplotlib.use("Agg")  # no display on the nodes; must precede pyplot
import matplotlib.pyplot as plt

PERMUTED = "ADS, permuted penalty"  # the control series: same score, penalty shuffled over the vocabulary
# a row's series label: by grid.Row.kind, and a control row's by its control (a new control adds its own)
SERIES = {"ads": "ADS", "temperature": "temperature", "permute": PERMUTED}
SERIES_STYLE = {"ADS": dict(marker="o", color="tab:red"), PERMUTED: dict(marker="^", color="tab:gray"),
                "temperature": dict(marker="s", color="tab:blue")}
# metric -> (registry key, per-problem parquet column, axis wording)
METRICS = {"af": ("af_accuracy", "af_correct", "answer-forced"),
           "raw": ("raw_accuracy", "raw_correct", "answer boxed in the trace")}
BOOTSTRAP = 2000         # resamples of the test problems
BOOTSTRAP_SEED = 0


def collect_rows(entries: dict[str, dict]) -> list[dict]:
    """One dict per grid row with any eval, sorted by series, tau, lam; missing evals are None.

    A row is the `row` fields of its evals' registry lines (a student eval decodes greedily, so only
    those fields say which row it belongs to). A row with several students (pipeline.sh's SEEDS) keeps
    each by its `student_seed` in `students` and their mean accuracies in `student`.
    """
    rows = {}
    for entry in entries.values():
        fields = entry.get("row")
        if fields is None or entry["role"] not in ("teacher_eval", "student_eval"):
            continue
        row = rows.setdefault(fields["name"], dict(fields, series=SERIES[fields["control"] if fields["kind"] == "control" else fields["kind"]], teacher=None,
                                                   student=None, students={}))
        if entry["role"] == "teacher_eval":
            row["teacher"] = entry
        else:
            row["students"][entry.get("student_seed")] = entry
    for row in rows.values():
        row["student"] = mean_entry(list(row["students"].values()))
    order = list(SERIES_STYLE)
    return sorted(rows.values(), key=lambda r: (order.index(r["series"]), r["tau"], r["lam"]))


def reference(entries: dict[str, dict], role: str, fewshot: bool = False) -> dict | None:
    """The last eval of this role that belongs to no grid row (the teacher greedy, the undistilled
    student zero-shot, or with fewshot its few-shot eval), or the holdout traces; None when it has not run."""
    found = [e for e in entries.values() if e["role"] == role and e.get("row") is None
             and bool(e.get("fewshot")) == fewshot]
    return found[-1] if found else None


def mean_entry(entries: list[dict]) -> dict | None:
    """One student's entry, or the seeds' mean accuracies (with their count in `seeds`)."""
    if len(entries) <= 1:
        return entries[0] if entries else None
    mean = lambda key: None if any(e.get(key) is None for e in entries) else float(np.mean([e[key] for e in entries]))
    return dict(entries[0], raw_accuracy=mean("raw_accuracy"), af_accuracy=mean("af_accuracy"), seeds=len(entries))


def holdout_nll(exp_dir: Path, row: dict) -> list[float]:
    """Each student's last holdout loss (distill.py's eval on the clean holdout traces), where recorded:
    in the train_summary.yaml beside the evaluated model (EXP_DIR/models/<student>/final)."""
    import yaml
    out = []
    for entry in row["students"].values():
        path = exp_dir / "models" / Path(entry["model"]).parent.name / "train_summary.yaml"
        if path.is_file():
            losses = (yaml.safe_load(path.read_text()) or {}).get("eval_losses") or []
            if losses:
                out.append(float(losses[-1]["loss"]))
    return out


def fmt_spread(values: list[float], digits: int = 3) -> str:
    if not values:
        return "-"
    return f"{np.mean(values):.{digits}f}" + (f" ± {np.std(values, ddof=1):.{digits}f}" if len(values) > 1 else "")


def accuracy(entry: dict | None, key: str) -> float | None:
    """entry[key] in percent, or None when the eval has not run."""
    if entry is None or entry.get(key) is None:
        return None
    return 100 * entry[key]


def fmt_acc(entry: dict | None, key: str) -> str:
    acc = accuracy(entry, key)
    return "-" if acc is None else f"{acc:.1f}"


def fmt_fd(entry: dict | None) -> str:
    """The FD check of an ADS eval, 'cosine / relative error'; '-' where none ran."""
    if entry is None or entry.get("fd_cosine_median") is None:
        return "-"
    return f"{entry['fd_cosine_median']:.3f} / {entry['fd_rel_error_median']:.2g}"


def cut_counts(exp_dir: Path, rows: list[dict]) -> list[tuple[str, int, int]]:
    """(row name, train traces cut at max_length, train traces), from each train trace set's sidecar
    (stats n and finished_fraction); rows without one are left out."""
    out = []
    for r in rows:
        stats = (utils.read_sidecar(exp_dir / "traces" / r["name"]) or {}).get("stats") or {}
        if stats.get("finished_fraction") is not None and stats.get("n"):
            out.append((r["name"], round(stats["n"] * (1 - stats["finished_fraction"])), stats["n"]))
    return out


def cut_lines(cut: list[tuple[str, int, int]]) -> list[str]:
    """The report's lines on train traces that hit max_length (none when no trace did): a cut trace may
    lack its answer, and a teacher that never ends a trace (untrained weights do this) makes every time
    and memory figure a worst case."""
    if not any(k for _, k, _ in cut):
        return []
    lines = ["", "Train traces cut at max_length (no end of sequence): "
             + "; ".join(f"{name} {k:,} of {n:,}" for name, k, n in cut)]
    if any(k > n / 2 for _, k, n in cut):
        lines[-1] += (". Most traces ran to the length limit: their answers may be cut off, and the run's times "
                      "and memory are a worst case (a teacher that never ends a trace, such as untrained weights, "
                      "does this).")
    return lines


def summary_line(label: str, entry: dict) -> str:
    af, raw = fmt_acc(entry, "af_accuracy"), fmt_acc(entry, "raw_accuracy")
    return f"{label}: af {af}%, raw {raw}% (n={entry.get('n', '-')})"


def curve_gap(a: list[tuple], b: list[tuple], points: int = 101) -> float | None:
    """Mean of y_a(x) - y_b(x) over the x range both curves cover; each curve is linear through its
    (x, y) points, rows at equal x averaged. None when a curve has < 2 points or the ranges miss."""
    curves = []
    for pts in (a, b):
        xs = sorted({x for x, _ in pts})
        if len(xs) < 2:
            return None
        curves.append((np.array(xs), np.array([np.mean([y for x2, y in pts if x2 == x]) for x in xs])))
    lo, hi = max(c[0][0] for c in curves), min(c[0][-1] for c in curves)
    if lo >= hi:
        return None
    grid = np.linspace(lo, hi, points)
    return float(np.mean(np.interp(grid, *curves[0]) - np.interp(grid, *curves[1])))


def series_points(rows: list[dict], series: str, teacher_acc, student_acc) -> list[tuple]:
    return [(teacher_acc[r["name"]], student_acc[r["name"]]) for r in rows
            if r["series"] == series and r["name"] in teacher_acc and r["name"] in student_acc]


def per_problem_grades(exp_dir: Path, rows: list[dict], metric: str = "af"):
    """{row name: (teacher grades (P,), student grades (seeds, P))} as 0/1 arrays over the test problems
    that every eval of every complete row graded, in idx order; None without a complete row."""
    import pyarrow.parquet as pq
    column = METRICS[metric][1]

    def grades_of(name):
        path = exp_dir / "traces" / f"{name}.parquet"
        if not path.is_file():
            die(f"{path} is missing: its per-problem grades give the gap's bootstrap interval")
        try:
            table = pq.read_table(path, columns=["idx", column]).to_pydict()
        except (OSError, ValueError, KeyError) as e:  # pyarrow's errors for a bad file or a missing column
            die(f"cannot read the columns idx, {column} of {path} ({str(e).splitlines()[0]})")
        return dict(zip(table["idx"], table[column]))

    graded = {}
    for r in rows:
        if r["teacher"] is None or not r["students"]:
            continue
        teacher = grades_of(r["teacher"]["name"])
        students = [grades_of(r["students"][seed]["name"])
                    for seed in sorted(r["students"], key=lambda s: -1 if s is None else s)]
        graded[r["name"]] = (teacher, students)
    if not graded:
        return None
    common = sorted(set.intersection(*(set(g) for t, ss in graded.values() for g in [t, *ss])))
    return {name: (np.array([t[i] for i in common], dtype=float), np.array([[g[i] for i in common] for g in ss],
                                                                           dtype=float))
            for name, (t, ss) in graded.items()}


def bootstrap_accuracies(grades: dict, rng, draws: int = BOOTSTRAP):
    """Resampled (teacher, student) accuracies in percent per row, `draws` times: the test problems are
    resampled once per draw for every row (all evals grade the same problems, so the comparison stays
    paired), and each row's students (seeds) with replacement; a student's accuracy is their mean."""
    n = next(iter(grades.values()))[0].shape[0]
    for _ in range(draws):
        weights = rng.multinomial(n, np.full(n, 1.0 / n)) / n
        out = {}
        for name, (teacher, students) in grades.items():
            seeds = students[rng.integers(0, len(students), len(students))]
            out[name] = (100 * weights @ teacher, 100 * float(np.mean(seeds @ weights)))
        yield out


def gap_summary(rows: list[dict], exp_dir: Path, metric: str = "af") -> list[dict]:
    """The interpolated student-accuracy gaps (percent points) at matched teacher accuracy, with
    bootstrap 95% intervals (seeds, then test problems; bootstrap_accuracies) where per-problem grades
    are on disk.  The rows themselves are kept: the curves need them."""
    key = METRICS[metric][0]
    done = [r for r in rows if accuracy(r["teacher"], key) is not None and accuracy(r["student"], key) is not None]
    teacher_acc = {r["name"]: accuracy(r["teacher"], key) for r in done}
    student_acc = {r["name"]: accuracy(r["student"], key) for r in done}
    pairs = [("ADS", "temperature"), (PERMUTED, "temperature"), ("ADS", PERMUTED)]
    out = []
    has_gap = any(curve_gap(series_points(done, a, teacher_acc, student_acc),
                            series_points(done, b, teacher_acc, student_acc)) is not None for a, b in pairs)
    graded = per_problem_grades(exp_dir, done, metric) if has_gap else None  # the gaps' intervals need them
    draws = [] if graded is None else list(bootstrap_accuracies(graded, np.random.default_rng(BOOTSTRAP_SEED)))
    for a, b in pairs:
        gap = curve_gap(series_points(done, a, teacher_acc, student_acc),
                        series_points(done, b, teacher_acc, student_acc))
        if gap is None:
            continue
        item = dict(a=a, b=b, gap=gap, low=None, high=None)
        samples = []
        for draw in draws:
            t, s_ = {n: v[0] for n, v in draw.items()}, {n: v[1] for n, v in draw.items()}
            g = curve_gap(series_points(done, a, t, s_), series_points(done, b, t, s_))
            if g is not None:
                samples.append(g)
        if draws and len(samples) >= BOOTSTRAP // 2:
            item["low"], item["high"] = (float(v) for v in np.percentile(samples, [2.5, 97.5]))
        out.append(item)
    return out


def gap_line(g: dict) -> str:
    ci = "" if g["low"] is None else f" (95% bootstrap CI {g['low']:+.1f} to {g['high']:+.1f})"
    return f"- student({g['a']}) - student({g['b']}) at matched teacher accuracy: {g['gap']:+.1f} points{ci}"


def write_table(rows: list[dict], entries: dict[str, dict], path: Path, gaps: list[dict] = (),
                metric: str = "af") -> None:
    """Write the markdown report to a temporary name, then rename it to `path`."""
    exp_dir = path.parent
    lines = [
        "# Antidistillation sampling: sweep report",
        "",
        "Accuracies in percent on the test split. Teacher: the teacher sampling with the row's "
        "(tau, lam, eps). Student: the student distilled on the row's traces, decoding greedily (the mean over "
        "its seeds; the holdout NLL as mean ± SD over seeds).",
        "",
        "FD: the median cosine and median relative error of the finite-difference delta_hat against the "
        "exact JVP on holdout positions, measured before the row sampled (gentraces.py's FD check).",
        "",
        "| series | tau | lam | eps | teacher af | teacher raw | student af | student raw | n | seeds "
        "| student holdout NLL | FD cos / rel err |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        t, s = r["teacher"], r["student"]
        n = (t or s).get("n", "-")
        lines.append(
            f"| {r['series']} | {r['tau']:.3g} | {r['lam']:.3g} | {r['eps']:.3g} "
            f"| {fmt_acc(t, 'af_accuracy')} | {fmt_acc(t, 'raw_accuracy')} "
            f"| {fmt_acc(s, 'af_accuracy')} | {fmt_acc(s, 'raw_accuracy')} | {n} | {len(r['students'])} "
            f"| {fmt_spread(holdout_nll(exp_dir, r))} | {fmt_fd(t)} |")
    for label, role in [("Teacher greedy on holdout", "holdout"), ("Teacher greedy on test", "teacher_eval"),
                        ("Undistilled student on test", "student_eval")]:
        if reference(entries, role):
            lines += ["", summary_line(label, reference(entries, role))]
    fewshot = reference(entries, "student_eval", fewshot=True)
    if fewshot:
        lines += ["", summary_line(f"Undistilled student on test, {fewshot['fewshot']}-shot plain prompts (how base "
                                   "models are usually evaluated, and the paper's baseline; af = the stated answer)",
                                   fewshot)]
    lines += cut_lines(cut_counts(exp_dir, rows))
    if gaps:
        lines += ["", f"Student-accuracy gap ({metric}, percent points), curves interpolated over the teacher "
                  "accuracy both series reach; intervals resample each row's students (seeds), then the test "
                  "problems:", ""] + [gap_line(g) for g in gaps]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, path)


def plot_tradeoff(rows: list[dict], entries: dict[str, dict], path: Path, gaps: list[dict] = (),
                  metric: str = "af") -> None:
    """Teacher accuracy (x) against student accuracy (y), one line per sampler through its rows."""
    key, _, wording = METRICS[metric]
    fig, ax = plt.subplots(figsize=(6.5, 5))
    for series, style in SERIES_STYLE.items():
        points = [(accuracy(r["teacher"], key), accuracy(r["student"], key))
                  for r in rows if r["series"] == series]
        points = sorted((x, y) for x, y in points if x is not None and y is not None)
        if not points and series == PERMUTED:
            continue  # sweeps without the control do not mention it
        # An empty series still gets its legend entry, so the legend always names both samplers.
        ax.plot([x for x, _ in points], [y for _, y in points], linestyle="-", alpha=0.8,
                label=f"{series} ({len(points)} rows)", **style)
    base, greedy = reference(entries, "student_eval"), reference(entries, "teacher_eval")
    if accuracy(base, key) is not None:
        ax.axhline(accuracy(base, key), color="black", linestyle="--", label="undistilled student")
    if accuracy(greedy, key) is not None:
        ax.axvline(accuracy(greedy, key), color="black", linestyle=":", label="teacher, greedy")
    ax.set_xlabel(f"teacher accuracy, {wording} (%)")
    ax.set_ylabel(f"distilled student accuracy, {wording} (%)")
    main_gap = next((g for g in gaps if (g["a"], g["b"]) == ("ADS", "temperature")), None)
    ax.set_title("Teacher vs distilled-student accuracy" + ("" if main_gap is None else
                 f"\nADS - temperature at matched teacher accuracy: {main_gap['gap']:+.1f} points"), fontsize=10)
    ax.set_xlim(-2, 102)  # fixed 0-100% axes keep plots of different sweeps comparable
    ax.set_ylim(-2, 102)
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, format="png", dpi=150)
    plt.close(fig)
    os.replace(tmp, path)


class ReportSettings(utils.Settings):
    """report.py's flags with their types: the registry is read from exp_dir, the report written there."""
    exp_dir: utils.InputDir
    metric: Literal[tuple(METRICS)]

    def problems(self, context):
        out = []
        for name in ("report.md", "tradeoff.png", "traces.html"):
            problem = utils.output_file_problem(Path(self.exp_dir) / name)
            if problem:
                out.append(f"{Path(self.exp_dir) / name} {problem}")
        return out


def settings(argv, pending=()):
    parser = utils.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--exp-dir", required=True, help="experiment directory holding metadata/")
    parser.add_argument("--metric", default="af",
                        help="accuracy of the gap and the plot: af (answer-forced, the paper's; default) or raw")
    return utils.check_settings(ReportSettings, vars(parser.parse_args(argv)), pending)


def main(argv=None) -> None:
    args = settings(argv)
    exp_dir = Path(args.exp_dir)
    registry = exp_dir / "metadata" / "trace_registry.jsonl"
    entries = load_registry(registry)
    rows = collect_rows(entries)
    if not rows:
        die(f"{registry} has no grid-row evals (eval_teacher_/eval_student_tau.._lam.._eps..): nothing to report")
    gaps = gap_summary(rows, exp_dir, args.metric)
    plot_tradeoff(rows, entries, exp_dir / "tradeoff.png", gaps, args.metric)
    shown = viewer.write_traces_html(entries, exp_dir, exp_dir / "traces.html")
    print(f"report.py: {exp_dir}/traces.html shows {shown} train traces token by token")
    write_table(rows, entries, exp_dir / "report.md", gaps, args.metric)
    print(f"report.py: {len(rows)} grid rows -> {exp_dir}/report.md, {exp_dir}/tradeoff.png")


if __name__ == "__main__":
    utils.run_cli(main)
