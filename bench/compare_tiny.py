"""Compare two runs of the tiny pipeline (say 2 GPU processes against 2 CPU processes, same assets):
every trace set row by row, the proxy gradient, and the report.  Prints a markdown summary and
writes it as JSON.

    python bench/compare_tiny.py exp/tiny_gpu exp/tiny_cpu --labels gpu,cpu --out bench/results/x2/compare.json
"""
import argparse
import difflib
import json
import os
import sys
from pathlib import Path

import pandas as pd
import torch
from safetensors.torch import load_file


def trace_sets(exp):
    return {p.stem for p in (Path(exp) / "traces").glob("*.parquet")}


def compare_traces(a_path, b_path):
    """Row-by-row agreement of two trace sets of the same prompts."""
    a, b = (pd.read_parquet(p).set_index("idx").sort_index() for p in (a_path, b_path))
    if list(a.index) != list(b.index):
        return {"same_prompts": False, "n": [len(a), len(b)]}
    same = a["completion"] == b["completion"]
    first_diff = [len(os.path.commonprefix([s, t])) for s, t in zip(a["completion"][~same], b["completion"][~same])]
    return {"same_prompts": True, "n": len(a), "identical_completions": int(same.sum()),
            "identical_forced": int((a["forced"] == b["forced"]).sum()),
            "af_accuracy": [float(a["af_correct"].mean()), float(b["af_correct"].mean())],
            "first_difference_at_char": sorted(first_diff)}


def compare_grads(a_path, b_path):
    a, b = load_file(str(a_path)), load_file(str(b_path))
    if sorted(a) != sorted(b):
        return {"same_keys": False}
    diff = sum((a[k].double() - b[k].double()).pow(2).sum().item() for k in a) ** 0.5
    norm = sum(a[k].double().pow(2).sum().item() for k in a) ** 0.5
    return {"same_keys": True, "norm": norm, "rel_l2_diff": diff / norm,
            "max_abs_diff": max((a[k] - b[k]).abs().max().item() for k in a),
            "bitwise_equal": all(torch.equal(a[k], b[k]) for k in a)}


def compare_reports(a_path, b_path):
    a, b = (Path(p).read_text().splitlines() for p in (a_path, b_path))
    return {"identical": a == b, "diff": list(difflib.unified_diff(a, b, lineterm="", n=0))[2:]}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("a", help="first EXP_DIR")
    parser.add_argument("b", help="second EXP_DIR")
    parser.add_argument("--labels", default="a,b", help="names of the two runs in the output (default a,b)")
    parser.add_argument("--out", help="JSON path for the comparison")
    args = parser.parse_args()
    for exp in (args.a, args.b):
        if not (Path(exp) / "report.md").exists():
            sys.exit(f"error: {exp} holds no finished pipeline run (no report.md)")
    la, lb = args.labels.split(",")
    names = sorted(trace_sets(args.a) & trace_sets(args.b))
    result = {"labels": [la, lb], "only_in": {la: sorted(trace_sets(args.a) - trace_sets(args.b)),
                                                lb: sorted(trace_sets(args.b) - trace_sets(args.a))},
              "traces": {n: compare_traces(Path(args.a, "traces", f"{n}.parquet"), Path(args.b, "traces", f"{n}.parquet"))
                         for n in names},
              "gradient": compare_grads(Path(args.a, "student_grads.safetensors"),
                                        Path(args.b, "student_grads.safetensors")),
              "report": compare_reports(Path(args.a, "report.md"), Path(args.b, "report.md"))}
    print(f"| trace set | rows | identical completions | identical forced answers | af accuracy {la} / {lb} |")
    print("|---|---:|---:|---:|---|")
    for name, t in result["traces"].items():
        if not t["same_prompts"]:
            print(f"| {name} | {t['n']} | different prompts | | |")
            continue
        print(f"| {name} | {t['n']} | {t['identical_completions']} | {t['identical_forced']} | "
              f"{t['af_accuracy'][0]:.3f} / {t['af_accuracy'][1]:.3f} |")
    g = result["gradient"]
    print(f"\ngradient: same keys {g['same_keys']}" + (f", relative L2 difference {g['rel_l2_diff']:.2e}, largest "
          f"absolute difference {g['max_abs_diff']:.2e} (|g| = {g['norm']:.4g}), bitwise equal {g['bitwise_equal']}"
          if g["same_keys"] else ""))
    r = result["report"]
    print("report.md: identical" if r["identical"] else "report.md differs:\n" + "\n".join(r["diff"]))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
