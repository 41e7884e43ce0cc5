"""The ADS decode step's matmuls at the bench's real shapes, timed alone in several forms against
each one's floor (the larger of reading its weights once at COPY_BW and its FLOPs at MATMUL_PEAK).

Each matmul of the step (the teacher, and the two proxies stacked, as stack.Stack runs them) is timed
as the step runs it: calls recorded in a CUDA graph and replayed, cycling through enough copies of
the weights that every call reads them from memory, not from L2.  Forms:
  nt        x @ W.T, W (N, K) as the Stack lays it (mm for the teacher, bmm for the proxies)
  nn        x @ Wt, the weight stored transposed, (K, N) contiguous
  twomm     the stacked proxies as one mm per proxy
  pad256    nt with the rows padded from the batch to 256
  inductor  nt through torch.compile's max-autotune (Triton templates timed against cuBLAS; --inductor)
Every form's output is checked against nt's first.  Prints a table and writes JSON.

    python bench/bench_gemm.py --inductor --out bench/results/h200_gemm_forms_b192_<commit>.json
"""
import argparse
import json
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from engine_kernels import gpu_ms  # noqa: E402
from real_shapes import PROXY, TEACHER, matmul_floor_s, step_matmuls  # noqa: E402


def forms(stacked, rows, inductor):
    """name -> (weight (S, N, K) -> the weight as that form stores it, (x, w) -> product)."""
    same = lambda w: w  # noqa: E731
    nt = (lambda x, w: x[0] @ w[0].T) if stacked == 1 else (lambda x, w: torch.bmm(x, w.transpose(1, 2)))
    out = {"nt": (same, nt),
           "nn": (lambda w: w.transpose(1, 2).contiguous(),
                  (lambda x, w: x[0] @ w[0]) if stacked == 1 else torch.bmm)}
    if stacked > 1:
        out["twomm"] = (same, lambda x, w: torch.stack([x[s] @ w[s].T for s in range(stacked)]))
    if rows < 256:
        out["pad256"] = (same, lambda x, w: nt(torch.nn.functional.pad(x, (0, 0, 0, 256 - rows)), w)[..., :rows, :])
    if inductor:
        out["inductor"] = (same, torch.compile(nt, mode="max-autotune-no-cudagraphs", dynamic=False))
    return out


def time_matmul(rows, stacked, n, k, inductor, l2_bytes):
    """{form: microseconds per call} for one matmul shape, and the largest output difference from nt."""
    w0 = torch.randn(stacked, n, k, device="cuda", dtype=torch.bfloat16) / math.sqrt(k)
    x = torch.randn(stacked, rows, k, device="cuda", dtype=torch.bfloat16)
    copies = max(2, math.ceil(3 * l2_bytes / w0.nbytes))
    times, diffs, reference = {}, {}, None
    for name, (lay, product) in forms(stacked, rows, inductor).items():
        ws = [lay(w0)] + [lay(torch.randn_like(w0) / math.sqrt(k)) for _ in range(copies - 1)]
        first = product(x, ws[0]).reshape(stacked, rows, n).float()
        reference = first if reference is None else reference
        diffs[name] = (first - reference).abs().max().item()

        def calls():
            for w in ws:
                product(x, w)
        times[name] = 1e3 * gpu_ms(calls) / copies
        del ws
    return times, diffs


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=192, help="decode batch (the matmuls' M)")
    parser.add_argument("--inductor", action="store_true", help="also time torch.compile max-autotune")
    parser.add_argument("--out", default="gemm.json", help="JSON results path")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_gemm.py times CUDA matmuls: no GPU here")
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    results = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, rows=args.rows, matmuls=[])
    totals = {}
    print(f"{'matmul':<16}{'calls':>6}{'floor us':>10}" + "".join(f"{f:>16}" for f in
                                                                ("nt", "nn", "twomm", "pad256", "inductor")))
    for model, cfg, stacked in (("teacher", TEACHER, 1), ("proxies", PROXY, 2)):
        for name, s, n, k, calls in step_matmuls(cfg, stacked):
            floor_us = 1e6 * matmul_floor_s(args.rows, s, n, k)
            times, diffs = time_matmul(args.rows, s, n, k, args.inductor, l2)
            row = dict(model=model, matmul=name, stacked=s, n=n, k=k, calls=calls, floor_us=floor_us,
                       us=times, max_abs_diff_from_nt=diffs,
                       pct_of_floor={f: 100 * floor_us / t for f, t in times.items()})
            results["matmuls"].append(row)
            for f in ("nt", "nn", "twomm", "pad256", "inductor"):
                if "inductor" in times or f != "inductor":
                    # a form that does not apply to this matmul (twomm, pad256) counts as nt here
                    totals[f] = totals.get(f, 0.0) + calls * times.get(f, times["nt"])
            totals["floor"] = totals.get("floor", 0.0) + calls * floor_us
            totals["best"] = totals.get("best", 0.0) + calls * min(times.values())
            cells = "".join(f"{times[f]:>8.1f} ({row['pct_of_floor'][f]:>3.0f}%)" if f in times else f"{'':>16}"
                            for f in ("nt", "nn", "twomm", "pad256", "inductor"))
            print(f"{model + ' ' + name:<16}{calls:>6}{floor_us:>10.1f}{cells}", flush=True)
    results["step_ms"] = {f: t / 1e3 for f, t in totals.items()}
    print("step totals, ms: " + ", ".join(f"{f} {t / 1e3:.2f}" for f, t in totals.items()))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
