"""The synth v3 analysis, as pre-registered in results/synth/PROTOCOL.md: per accuracy band, the ADS
minus temperature gap in student test accuracy with a hierarchical bootstrap interval (rows, seeds,
test problems), the holdout-NLL difference against the seeds' SD, the permutation control, the
redone / check / filler lines of the correct train traces, the FD check, the criteria's verdict, and
the cold/warm diagnostic.

Reads an experiment folder as pipeline_synth.sh leaves it (or this folder, which keeps the same
files): calibration/calibration.yaml, metadata/trace_registry.jsonl, traces/*.parquet (the eval grades;
the train traces' completions where present, else analysis/line_counts.json), models/*/train_summary.yaml
(or analysis/train_summaries/), diagnostic/. It imports report.py (the bootstrap) and grid.py (row
names) from the repository; the commit it ran at is in the output's first line.

    python results/synth/analyze.py --exp-dir exp/synth > results/synth/analysis/analysis.md
    python results/synth/analyze.py --exp-dir results/synth      # the same tables from the kept files
"""
import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
import grid  # noqa: E402
import report  # noqa: E402

DRAWS = 2000
LINE_KINDS = {"redone": re.compile(r"^no, "), "check": re.compile(r"^check: "),
              "filler": re.compile(r"^(ok|next|so far so good)$")}


def row_name(tau, lam, eps, control="none"):
    return grid.Row(tau, lam, eps, control).name


def main_rows(exp):
    """{band: {"temperature": name, "ADS": name}}, the permuted and reference rows, from the calibration."""
    cal = yaml.safe_load((exp / "calibration" / "calibration.yaml").read_text())
    bands = {}
    for t in cal["targets"]:
        bands[t] = {"temperature": row_name(cal["temperature"][t]["tau"], 0, 0),
                    "ADS": row_name(cal["ads"][t]["tau"], cal["ads"][t]["lam"], cal["eps"])}
    first = cal["targets"][0]
    permuted = row_name(cal["ads"][first]["tau"], cal["ads"][first]["lam"], cal["eps"], "permute")
    return cal, bands, permuted, row_name(cal["ads"][first]["tau"], 0, 0)


def summaries(exp, models="models"):
    """{student folder name: its last holdout loss}, from models/ or analysis/train_summaries/."""
    out = {}
    for path in sorted((exp / models).glob("student_*/train_summary.yaml")) + \
            sorted((exp / "analysis" / "train_summaries").glob("student_*.yaml")):
        name = path.parent.name if path.name == "train_summary.yaml" else path.stem
        losses = (yaml.safe_load(path.read_text()) or {}).get("eval_losses") or []
        if losses:
            out[name] = float(losses[-1]["loss"])
    return out


def seed_nlls(nll, name):
    return [v for k, v in sorted(nll.items()) if re.fullmatch(rf"student_{re.escape(name)}_seed\d+", k)]


def line_counts(exp, name):
    """Mean count per correct train trace of each LINE_KINDS line, and the number of correct traces."""
    import pyarrow.parquet as pq
    path = exp / "traces" / f"{name}.parquet"
    if not path.is_file():
        saved = exp / "analysis" / "line_counts.json"
        return json.loads(saved.read_text()).get(name) if saved.is_file() else None
    table = pq.read_table(path, columns=["completion", "raw_correct"]).to_pydict()
    correct = [c for c, ok in zip(table["completion"], table["raw_correct"]) if ok]
    counts = {kind: 0 for kind in LINE_KINDS}
    for completion in correct:
        for line in completion.split("</think>")[0].splitlines():
            for kind, pattern in LINE_KINDS.items():
                counts[kind] += bool(pattern.match(line))
    return {"correct_traces": len(correct), **{k: v / max(1, len(correct)) for k, v in counts.items()}}


def band_bootstrap(grades, ads, temp, rng):
    """Gap samples (ADS minus temperature student accuracy): per draw, each series' rows of the band
    resampled (one each here), then seeds, then problems (report.bootstrap_accuracies)."""
    samples = []
    for draw in report.bootstrap_accuracies({n: grades[n] for n in (ads, temp)}, rng, DRAWS):
        samples.append(draw[ads][1] - draw[temp][1])
    return np.array(samples)


def verdict(bands):
    # seeds that agree exactly (SD 0) give no scale for the NLL criterion: it is then not met
    effect = all((b["gap"] <= -10 and b["high"] < 0) or 0 < 3 * b["nll_sd"] < b["dnll"] for b in bands.values())
    nulls = [t for t, b in bands.items() if abs(b["gap"]) < 5 and b["low"] <= 0 <= b["high"]
             and b["dnll"] <= 3 * b["nll_sd"]]
    if effect:
        return "effect shown (both bands meet a criterion)"
    if len(nulls) == len(bands):
        return "null in both bands"
    return "inconclusive" + (f" (null in band {', '.join(f'{t:.0%}' for t in nulls)})" if nulls else "")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--exp-dir", type=Path, default=Path(__file__).resolve().parent)
    exp = parser.parse_args().exp_dir
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    print(f"# Synth v3 analysis (analyze.py at commit {commit}, experiment {exp})\n")
    cal, bands, permuted, reference = main_rows(exp)
    entries = report.load_registry(exp / "metadata" / "trace_registry.jsonl")
    rows = {r["name"]: r for r in report.collect_rows(entries)}
    grades = report.per_problem_grades(exp, list(rows.values()), "raw")
    nll = summaries(exp)
    rng = np.random.default_rng(0)

    fd = cal.get("fd_check", {})
    print(f"eps = {cal['eps']:.2e} (eps=auto): FD vs JVP median cosine {fd.get('fd_cosine_median', float('nan')):.4f}, "
          f"median relative error {fd.get('fd_rel_error_median', float('nan')):.3g} "
          f"({'meets' if fd.get('fd_cosine_median', 0) >= 0.99 else 'FAILS'} the protocol's 0.99)\n")
    print("| row | train-trace acc | teacher test acc | students | student test acc (mean ± SD) | holdout NLL (mean ± SD) "
          "| redone / check / filler per correct trace |")
    print("|---|---|---|---|---|---|---|")
    named = [(f"{t:.0%} {s}", n) for t, b in bands.items() for s, n in b.items()] + \
            [(f"{cal['targets'][0]:.0%} ADS permuted", permuted), (f"tau {cal['ads'][cal['targets'][0]]['tau']:.3g} reference (lam 0)", reference)]
    for label, name in named:
        row = rows.get(name)
        student = [100 * e["raw_accuracy"] for e in row["students"].values()] if row else []
        lines = line_counts(exp, name)
        print(f"| {label} | {report.fmt_acc(entries.get(name), 'raw_accuracy')} | "
              f"{report.fmt_acc(row and row['teacher'], 'raw_accuracy')} | {len(student)} | "
              f"{report.fmt_spread(student, 1)} | {report.fmt_spread(seed_nlls(nll, name))} | "
              + ("-" if not lines else f"{lines['redone']:.2f} / {lines['check']:.2f} / {lines['filler']:.2f}") + " |")
    print()
    results = {}
    for t, b in bands.items():
        ads, temp = b["ADS"], b["temperature"]
        acc = {s: np.mean([e["raw_accuracy"] for e in rows[n]["students"].values()]) * 100 for s, n in b.items()}
        samples = band_bootstrap(grades, ads, temp, rng)
        nll_a, nll_t = seed_nlls(nll, ads), seed_nlls(nll, temp)
        pooled = float(np.sqrt((np.var(nll_a, ddof=1) + np.var(nll_t, ddof=1)) / 2))
        realised = {s: 100 * entries[n]["raw_accuracy"] for s, n in b.items()}
        results[t] = dict(gap=acc["ADS"] - acc["temperature"], low=float(np.percentile(samples, 2.5)),
                          high=float(np.percentile(samples, 97.5)), dnll=float(np.mean(nll_a) - np.mean(nll_t)),
                          nll_sd=pooled, realised=realised,
                          miscalibrated=any(abs(v - 100 * t) > 3 for v in realised.values()))
        r = results[t]
        print(f"- band {t:.0%}: ADS - temperature student accuracy {r['gap']:+.1f} points "
              f"(95% hierarchical bootstrap {r['low']:+.1f} to {r['high']:+.1f}); holdout NLL "
              f"{r['dnll']:+.4f} (pooled seed SD {r['nll_sd']:.4f}"
              + (f", {r['dnll'] / r['nll_sd']:+.1f} SD); " if r["nll_sd"] > 0 else "); ") +
              f"train traces {realised['ADS']:.1f}% vs {realised['temperature']:.1f}%"
              + (" (MISCALIBRATED: a row missed its band by more than 3 points)" if r["miscalibrated"] else ""))
    first = cal["targets"][0]
    perm_acc = np.mean([e["raw_accuracy"] for e in rows[permuted]["students"].values()]) * 100
    temp_acc = np.mean([e["raw_accuracy"] for e in rows[bands[first]["temperature"]]["students"].values()]) * 100
    print(f"- control: permuted - temperature ({first:.0%}) {perm_acc - temp_acc:+.1f} points "
          f"({'within' if abs(perm_acc - temp_acc) <= 5 else 'NOT within'} 5)")
    print(f"\n**Verdict against the pre-registered criteria: {verdict(results)}.**\n")
    diagnostic(exp)


def diagnostic(exp):
    """dNLL (ADS minus temperature) per proxy, band and student kind, from diagnostic/."""
    root = exp / "diagnostic"
    if not root.is_dir():
        return
    print("## Diagnostic: holdout NLL, ADS minus temperature (mean over each row's seeds)\n")
    print("| proxy | band | student | eps | FD cosine | ADS NLL | temperature NLL | dNLL (seed SDs) |")
    print("|---|---|---|---|---|---|---|---|")
    warm = yaml.safe_load((root / "warm" / "calibration" / "calibration.yaml").read_text())
    temps = {t: row_name(warm["temperature"][t]["tau"], 0, 0) for t in warm["targets"]}
    for proxy in ("warm", "cold"):
        cal = yaml.safe_load((root / proxy / "calibration" / "calibration.yaml").read_text())
        for t in cal["targets"]:
            ads = row_name(cal["ads"][t]["tau"], cal["ads"][t]["lam"], cal["eps"])
            for kind in ("student", "proxy"):
                a = seed_nlls(summaries(root / proxy, f"models_{kind}"), ads)
                b = seed_nlls(summaries(root / "warm", f"models_{kind}"), temps[t])
                if not a or not b:
                    continue
                sd = float(np.sqrt((np.var(a, ddof=1) + np.var(b, ddof=1)) / 2)) if min(len(a), len(b)) > 1 else float("nan")
                d = float(np.mean(a) - np.mean(b))
                ratio = f"{d / sd:+.1f}" if sd > 0 else "n/a"
                print(f"| {proxy} | {t:.0%} | {'Llama' if kind == 'student' else 'proxy-shaped'} | {cal['eps']:.1e} | "
                      f"{cal['fd_check'].get('fd_cosine_median', float('nan')):.3f} | {np.mean(a):.4f} | {np.mean(b):.4f} | "
                      f"{d:+.4f} ({ratio}) |")


if __name__ == "__main__":
    main()
