"""Copy what results/synth keeps of a pipeline_synth.sh run into a folder: the registry, every trace
sidecar, the per-problem grades of every eval (idx and grade columns only), every student's
train_summary.yaml, the calibrations and grids, the assets' manifest, the report and its plot, and the
redone / check / filler line counts of the train traces (whose completions are not kept).

    python results/synth/collect.py --exp-dir exp/synth --out /tmp/synth_results
"""
import argparse
import json
import shutil
import sys
from pathlib import Path

import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent))
import analyze  # noqa: E402

GRADES = ["idx", "raw_correct", "af_correct", "n_tokens", "finished"]


def copy(src: Path, dst: Path):
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(src, dst)


def collect(exp: Path, out: Path):
    for rel in ["metadata/trace_registry.jsonl", "grid.txt", "report.md", "tradeoff.png", "assets/manifest.json",
                "calibration/calibration.yaml"]:
        if (exp / rel).is_file():
            copy(exp / rel, out / rel)
    for path in exp.rglob("*.yaml"):
        rel = path.relative_to(exp)
        if rel.parts[0] == "assets" or "checkpoints" in rel.parts or "final" in rel.parts or rel.parts[-2].startswith("."):
            continue
        if path.parent.name == "traces" or path.name in ("train_summary.yaml", "calibration.yaml"):
            copy(path, out / rel)
    for path in exp.rglob("grid*.txt"):
        copy(path, out / path.relative_to(exp))
    counts = {}
    for path in (exp / "traces").glob("*.parquet"):
        name = path.stem
        if name.startswith("eval_"):
            table = pq.read_table(path, columns=[c for c in GRADES if c in pq.read_schema(path).names])
            (out / "traces").mkdir(parents=True, exist_ok=True)
            pq.write_table(table, out / "traces" / path.name)
        elif name != "holdout":
            counts[name] = analyze.line_counts(exp, name)
    counts["holdout"] = analyze.line_counts(exp, "holdout")
    (out / "analysis").mkdir(parents=True, exist_ok=True)
    (out / "analysis" / "line_counts.json").write_text(json.dumps(counts, indent=1, sort_keys=True))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--exp-dir", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    collect(args.exp_dir, args.out)
    print(f"collect.py: {sum(1 for _ in args.out.rglob('*') if _.is_file())} files -> {args.out}")


if __name__ == "__main__":
    main()
