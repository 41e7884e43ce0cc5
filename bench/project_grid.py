"""Projects the wall time of a whole grid at the paper's sample counts from one pipeline_shapes.sh run.

Every stage of the run is split into its work, which grows with the prompts (or sequences) and is
shared by the node's processes, and its overhead, paid once per stage (loading, compiling, the FD
check, answer forcing, saving, the launcher): the rest of the stage's wall time in logs/stages_*.tsv.
A generation stage's work is its steady decoding: the generated tokens over the decode rate between
the first and the last update of the stage's progress line (logs/STAGE.log, every 16 decode steps),
so the first call's compilation and prefill stay in the overhead. Distillation's work is train_seconds
(its holdout evals included; they scale about as the train set does: 2,242 / 5,231 at the paper's
counts against 192 / 384 in the rehearsal); the gradient's is save_grad's wall_seconds.

    projected stage = overhead + work * (paper count / measured count) / processes

The grid is the holdout traces and the gradient once, the references once, and for each row its train
traces, its student's distillation and eval and the teacher's eval with the row's settings; ADS rows
(any kind but temperature) take the run's ADS row's stages, temperature rows its temperature row's.

The reference approach differs only in generation: its generation work is ours times a measured
speed ratio (ADS stages take the ADS ratio, every other generation the lam = 0 one), and its overhead
lacks our first decode update's latency (it compiles nothing). One projection per source of ratios:
the same run's stage 3 through the engine and through the reference loop, steady decoding (the run, or
--stage3 RUN: pipeline_shapes.sh's stage3_ROW_ENGINE for its ADS and temperature rows;
decode.generate_reference does the work of `generate` with a LogitsProcessor, in other code), and each
--bench file (bench/bench_decode.py's same-run engine against Hugging Face `generate` with a
LogitsProcessor at batch 192, end to end), whose spread shows how much the host-bound reference moves
between machines. Distillation and the gradient are the
same code for both.

    python bench/project_grid.py --run results/shapes/run_5c5adca --stage3 results/shapes/run_STAGE3 \
        --bench bench/results/h200_engine_vs_reference_b192_*.json --out results/shapes/run_5c5adca/projection.md
"""
import argparse
import ast
import json
import re
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import grid  # noqa: E402
import utils  # noqa: E402

PAPER_COUNTS = {"train": 5231, "holdout": 2242, "test": 1209}  # GSM8K prompts: DESIGN, the paper's splits


def read_stages(run: Path) -> dict[str, float]:
    """Stage label -> seconds, for the stages that ran (logs/stages_*.tsv of the run)."""
    seconds = {}
    for tsv in sorted(run.glob("logs/stages_*.tsv")):
        for line in tsv.read_text().splitlines():
            label, status, secs = line.split("\t")
            if status == "ran":
                seconds[label] = float(secs)
    return seconds


PROGRESS = re.compile(r"^traces \(rank 0\):.*\[([\d:]+)<[^\]]*, ([\d,]+) tok/s\]")  # gentraces' Progress line


def decode_seconds(log: str, generated_tokens: int) -> tuple[float, float]:
    """Seconds of steady decoding in a gentraces log (all its tokens at the rate between the progress
    line's first update, elapsed as shown, and its last one, elapsed = the tokens over the cumulative
    rate shown then), and the seconds to that first update (compilation, the first prefill)."""
    updates = [(sum(int(x) * 60 ** i for i, x in enumerate(reversed(t.split(":")))), int(r.replace(",", "")))
               for t, r in (m.groups() for m in map(PROGRESS.search, re.split(r"[\r\n]", log)) if m)]
    updates = [(t, r) for t, r in updates if r > 0]
    if len(updates) < 2:
        raise ValueError("fewer than two progress updates with a token rate in the stage log")
    (t0, r0), (_, r1) = updates[0], updates[-1]
    t1 = generated_tokens / r1
    rate = (generated_tokens - r0 * t0) / (t1 - t0)
    return generated_tokens / rate, float(t0)


def sidecar(run: Path, name: str) -> dict:
    side = utils.read_sidecar(run / "traces" / name)
    if side is None:
        raise FileNotFoundError(f"no sidecar {run / 'traces' / name}.yaml in the run")
    return side


def measured_stages(run: Path) -> list[dict]:
    """The run's stages: label, what they scale with (split), measured count, work seconds, wall seconds,
    whether the stage generates with ADS (three models) or plainly, and the peak GiB."""
    walls = read_stages(run)
    registry = [json.loads(x) for x in (run / "metadata" / "trace_registry.jsonl").read_text().splitlines() if x.strip()]
    rows = {e["row"]["name"]: e["row"]["kind"] for e in registry if e.get("row")}
    stages = []

    def generation(label, name, split, ads, per):
        side = sidecar(run, name)
        log = run / "logs" / (re.sub(r"[^A-Za-z0-9._+-]", "_", label) + ".log")  # pipeline.sh's STAGE_LOG
        work, first = decode_seconds(log.read_text(errors="replace"), side["stats"]["generated_tokens"])
        stages.append(dict(label=label, per=per, split=split, n=side["stats"]["n"], work=work, wall=walls[label],
                           first=first, rate=side["stats"]["generated_tokens"] / work,
                           gen="ads" if ads else "plain", peak=side["diagnostics"].get("peak_gpu_memory_gib")))

    generation("holdout traces", "holdout", "holdout", False, "once")
    meta = ast.literal_eval((run / "grad_meta.txt").read_text().strip())
    stages.append(dict(label="proxy gradient", per="once", split="holdout", n=int(meta["n_sequences"]),
                       work=float(meta["wall_seconds"]), wall=walls["proxy gradient"], gen=None,
                       peak=float(meta["peak_gpu_memory_gib"])))
    generation("teacher greedy eval", "eval_teacher_base", "test", False, "once")
    generation("undistilled student eval", "eval_student_base", "test", False, "once")
    fewshot = [label for label in walls if label.startswith("undistilled student") and "shot" in label]
    for label in fewshot:
        generation(label, "eval_student_base_fewshot", "test", False, "once")
    for name, kind in rows.items():
        ads = kind != "temperature"
        kind = "ads" if ads else kind
        generation(f"{name}: train traces", name, "train", ads, kind)
        summary = yaml.safe_load((run / "models" / f"student_{name}" / "train_summary.yaml").read_text())
        # train_seconds holds the holdout evals too; they scale about as the train set does (2,242 / 5,231
        # at the paper's counts against 192 / 384 here)
        stages.append(dict(label=f"{name}: distill", per=kind, split="train", n=summary["n_train"],
                           work=summary["train_seconds"], wall=walls[f"{name}: distill"], gen=None,
                           peak=summary.get("peak_gpu_memory_gib")))
        generation(f"{name}: student eval", f"eval_student_{name}", "test", False, kind)
        generation(f"{name}: teacher eval", f"eval_teacher_{name}", "test", ads, kind)
    return stages


def stage3_ratios(run: Path) -> dict[str, float] | None:
    """The run's own ratios: the engine's steady decode rate over the reference loop's on the same stage-3
    workload, for the ADS row and for the temperature row (lam = 0), pipeline_shapes.sh's
    stage3_ROW_ENGINE.  A run without the temperature row's pair takes lam = 0 as equal (1.0, which
    favours the reference).  None when the run has not the ADS row's pair."""
    ratios = {}
    for kind, row in (("ads", "ads"), ("plain", "temperature")):
        rates = {}
        for engine in ("auto", "reference"):
            name = f"stage3_{row}_{engine}"
            log, side = run / "logs" / f"{name}.log", utils.read_sidecar(run / "traces" / name)
            if log.is_file() and side is not None:
                tokens = side["stats"]["generated_tokens"]
                rates[engine] = tokens / decode_seconds(log.read_text(errors="replace"), tokens)[0]
        if len(rates) == 2:
            ratios[kind] = rates["auto"] / rates["reference"]
    return None if "ads" not in ratios else {"plain": 1.0, **ratios}


def bench_ratios(path: Path) -> dict[str, float]:
    """End-to-end speed of the engine over the reference approach at batch 192, ADS and lam = 0."""
    data = json.loads(path.read_text())
    return {kind: next(r["end_to_end"] for r in data[f"speedup_{kind}"] if r["batch"] == 192) for kind in ("ads", "plain")}


def project(stages: list[dict], rows_per_kind: dict[str, int], processes: int, counts: dict,
            ratios: dict | None = None) -> tuple[list[dict], float]:
    """Each stage's projected seconds per occurrence and in all, and the grid's total seconds; with
    ratios, generation work is slowed by them (the reference approach)."""
    out, total = [], 0.0
    for s in stages:
        work = s["work"] * counts[s["split"]] / s["n"] / processes
        overhead = max(s["wall"] - s["work"], 0.0)
        if ratios and s["gen"]:
            # the reference approach compiles nothing: our first update's latency leaves its overhead
            # (its prefill is inside the end-to-end ratio)
            work *= ratios[s["gen"]]
            overhead = max(overhead - s["first"], 0.0)
        each = overhead + work
        times = 1 if s["per"] == "once" else rows_per_kind.get(s["per"], 0)
        out.append(dict(s, each=each, times=times, total=each * times))
        total += each * times
    return out, total


def hours(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h"


def write(ours, ours_total, refs, rows_per_kind, args) -> str:
    kinds = ", ".join(f"{n} {k}" for k, n in sorted(rows_per_kind.items()))
    lines = [
        f"# Projected wall time: grid `{args.grid}` ({sum(rows_per_kind.values())} rows: {kinds}) on one "
        f"node of {args.processes} GPUs",
        "",
        f"From the run in `{args.run}` (its stage walls, trace sidecars, train summaries and gradient "
        f"metadata), at the paper's counts: {counts_text(args.counts)} prompts. Made by "
        "`bench/project_grid.py`; per stage:",
        "",
        "    projected stage = overhead + work * (paper count / measured count) / processes",
        "",
        "Work is the stage's steady decoding (or training, or gradient) time, overhead the rest of its wall "
        "time. Every trace of an untrained teacher runs to max_length, so generation is a worst case.",
        "",
        "| stage (run's row) | each | measured n | wall s | work s | decode tok/s | peak GiB | projected each | "
        "times | projected total |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s in ours:
        peak = "-" if s["peak"] is None else f"{s['peak']:.1f}"
        rate = f"{s['rate']:,.0f}" if s.get("rate") else "-"
        lines.append(f"| {s['label']} | {s['per']} | {s['n']} {s['split']} | {s['wall']:.0f} | {s['work']:.0f} | "
                     f"{rate} | {peak} | {s['each'] / 60:.1f} min | {s['times']} | {hours(s['total'])} |")
    gen = sum(s["total"] for s in ours if s["gen"])
    lines += ["", f"**This repository: {hours(ours_total)}** for the grid on one node, {hours(gen)} of it generating."]
    if refs:
        lines += ["", "The reference approach: generation work slowed by each measured speed ratio (the run's own "
                  "stage 3, engine against reference loop, where it has one; the bench's same-run end-to-end "
                  "ratios at batch 192), generation overhead without our first decode update's latency "
                  "(compilation, the first prefill), distillation and the gradient unchanged:", "",
                  "| measured in | ADS ratio | lam = 0 ratio | reference approach (generating) | this repository "
                  "(generating) |",
                  "|---|---:|---:|---:|---:|"]
        for path, ratios, total, gen_ref in refs:
            lines.append(f"| `{path}` | {ratios['ads']:.2f}x | {ratios['plain']:.2f}x | {hours(total)} "
                         f"({hours(gen_ref)}) | {hours(ours_total)} ({hours(gen)}) |")
        low, high = min(r[2] for r in refs), max(r[2] for r in refs)
        lines += ["", f"**The paper grid takes {hours(ours_total)} with this repository and {hours(low)} to "
                  f"{hours(high)} with the reference approach**, every trace at max_length."]
    return "\n".join(lines) + "\n"


def counts_text(counts: dict) -> str:
    return ", ".join(f"{n:,} {split}" for split, n in counts.items())


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", type=Path, required=True, help="a results/shapes run folder")
    p.add_argument("--grid", default="paper", help="a grid name of grid.py")
    p.add_argument("--processes", type=int, default=8, help="GPUs of the node, one process each")
    p.add_argument("--stage3", type=Path, help="the run whose stage 3 gives the same-run ratios (default --run; "
                   "a STAGES=stage3 run of pipeline_shapes.sh)")
    p.add_argument("--bench", type=Path, nargs="*", default=[], help="bench_decode.py results with a reference stage")
    p.add_argument("--out", type=Path, help="markdown file to write (default: print)")
    args = p.parse_args(argv)
    args.counts = dict(PAPER_COUNTS)
    return args


def main(argv=None):
    args = parse_args(argv)
    rows_per_kind = {}
    for row in grid.grid_rows(args.grid):
        kind = "temperature" if row.kind == "temperature" else "ads"  # a control row samples as an ADS row does
        rows_per_kind[kind] = rows_per_kind.get(kind, 0) + 1
    stages = measured_stages(args.run)
    ours, ours_total = project(stages, rows_per_kind, args.processes, args.counts)
    refs = []
    stage3 = args.stage3 or args.run
    sources = [(f"{stage3}: stage 3, engine vs reference loop", stage3_ratios(stage3))]
    sources = [s for s in sources if s[1]] + [(path, bench_ratios(path)) for path in args.bench]
    for path, ratios in sources:
        out, total = project(stages, rows_per_kind, args.processes, args.counts, ratios)
        refs.append((path, ratios, total, sum(s["total"] for s in out if s["gen"])))
    text = write(ours, ours_total, refs, rows_per_kind, args)
    if args.out:
        args.out.write_text(text)
    print(text, end="")


if __name__ == "__main__":
    main()
