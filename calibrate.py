"""Calibrate grid rows to target accuracies of the teacher's train traces, and write them as a grid file.

For each target accuracy, bisect on a few hundred train problems for the temperature tau at which plain
sampling (lam = 0) writes traces that accurate, and for the ADS strength lam at tau = --ads-tau that
does. The ADS rows' tau comes first: with --ads-tau auto, the tau at which plain sampling is --headroom
above the highest target; a given tau is probed at lam = 0 and refused when plain sampling there is not
above every ADS target (ADS only lowers accuracy, so the search would end at lam ~ 0, an ADS row in name
only). eps comes next, once: an ADS probe with eps=auto (gentraces.py's FD check against the exact JVP)
picks it, and every ADS row uses it. Each probe is a plain gentraces.py run under EXP_DIR/calibration/,
so calibration samples exactly as the rows will; probes of different searches run side by side.
Writes --out in grid.py's format (temperature and ADS row per target; optionally the first target's ADS
row again with its penalty permuted, and a tau = --ads-tau temperature reference) and
EXP_DIR/calibration/calibration.yaml (every probe, the eps and its FD check).

    python calibrate.py --exp-dir exp/synth --teacher T --proxy P --targets 0.9 0.8 --permute --reference \
        --out exp/synth/grid.txt -- data_dir=exp/synth/assets/data max_length=320
"""
import argparse
import math
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

import grid

REPO = Path(__file__).resolve().parent
TAU_RANGE = (0.5, 4.0)     # where the temperature rows' search looks
ADS_TAU_RANGE = (0.05, 4.0)  # and the ADS rows' (auto), in log space: near-greedy accuracy needs a low tau
LAM_START = 1e-2           # the ADS search doubles lam from here until the traces fall below the target
LAM_MAX = 1e4


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--exp-dir", type=Path, required=True, help="experiment folder holding the gradient")
    parser.add_argument("--teacher", required=True, help="teacher model (path or Hub id)")
    parser.add_argument("--proxy", required=True, help="proxy model whose gradient --grad is")
    parser.add_argument("--grad", type=Path, default=None,
                        help="gradient file (default: EXP_DIR/student_grads.safetensors)")
    parser.add_argument("--dataset", default="gsm8k", help="dataset whose train split is sampled (default gsm8k)")
    parser.add_argument("--targets", type=float, nargs="+", required=True, help="train-trace accuracies, e.g. 0.9 0.8")
    parser.add_argument("--series", nargs="+", default=["temperature", "ads"], choices=["temperature", "ads"],
                        help="which rows to calibrate per target (default: both)")
    parser.add_argument("--ads-tau", type=tau_or_auto, default=0.9,
                        help="the ADS rows' temperature, or auto (see --headroom); default 0.9")
    parser.add_argument("--headroom", type=float, default=0.03,
                        help="with --ads-tau auto, plain sampling's accuracy above the highest target (default 0.03)")
    parser.add_argument("--eps", default="auto", help="eps of the ADS rows, or auto (default: auto)")
    parser.add_argument("--problems", type=int, default=300, help="train problems per probe (default 300)")
    parser.add_argument("--tolerance", type=float, default=0.02,
                        help="a probe this close to the target ends its search (default 0.02)")
    parser.add_argument("--probes", type=int, default=10, help="most probes per search (default 10)")
    parser.add_argument("--metric", default="af", choices=["af", "raw"],
                        help="accuracy calibrated: af (answer-forced) or raw (boxed in the trace); default af")
    parser.add_argument("--permute", action="store_true", help="add the first target's ADS row with ads_control=permute")
    parser.add_argument("--reference", action="store_true", help="add a tau = --ads-tau temperature row")
    parser.add_argument("--out", type=Path, required=True, help="grid file to write")
    parser.add_argument("gen_args", nargs="*", help="key=value overrides for every gentraces.py probe (after --)")
    args = parser.parse_args(argv)
    if not all(0 < t < 1 for t in args.targets):
        parser.error(f"--targets must lie in (0, 1), got {args.targets}")
    if args.problems < 1 or args.probes < 1 or not 0 < args.tolerance < 1:
        parser.error("--problems and --probes must be positive and --tolerance in (0, 1)")
    if args.ads_tau == "auto" and "ads" not in args.series and args.reference:
        parser.error("--reference needs a numeric --ads-tau when no ADS rows are calibrated")
    if not 0 <= args.headroom < 1 - max(args.targets):
        parser.error(f"--headroom must lie in [0, 1 - highest target), got {args.headroom}")
    args.grad = args.grad or args.exp_dir / "student_grads.safetensors"
    if "ads" in args.series and not args.grad.is_file():
        parser.error(f"ADS rows need the gradient; {args.grad} does not exist (run save_grad.py first)")
    return args


def tau_or_auto(text):
    if text == "auto":
        return text
    try:
        tau = float(text)
    except ValueError:
        tau = math.nan
    if not (math.isfinite(tau) and tau > 0):
        raise argparse.ArgumentTypeError(f"must be a positive number or auto, got {text!r}")
    return tau


class Prober:
    """Runs gentraces.py probes on the calibration problems and reads back their accuracy."""

    def __init__(self, args):
        self.args, self.lock, self.log = args, threading.Lock(), []
        self.exp = args.exp_dir / "calibration"

    def __call__(self, name, tau, lam=0.0, eps=0.0, **extra):
        a = self.args
        cmd = [sys.executable, str(REPO / "gentraces.py"), f"teacher={a.teacher}", f"proxy={a.proxy}",
               f"grad_path={a.grad}", f"data_split={a.dataset}_train", f"max_samples={a.problems}",
               f"tau={tau}", f"lam={lam}", f"eps={eps}", f"exp_dir={self.exp}", f"trace_name={name}",
               *a.gen_args, *[f"{k}={v}" for k, v in extra.items()]]
        sidecar = self.exp / "traces" / f"{name}.yaml"
        if not sidecar.is_file():  # a rerun reuses finished probes
            done = subprocess.run(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            if done.returncode:
                sys.exit(f"calibrate.py: probe {name} failed:\n{done.stderr[-2000:]}")
        side = yaml.safe_load(sidecar.read_text())
        acc = side["stats"][f"{a.metric}_accuracy"]
        with self.lock:
            self.log.append(dict(name=name, tau=tau, lam=lam, eps=side["diagnostics"].get("eps", eps), accuracy=acc))
            print(f"calibrate: {name}: tau={tau:.4g} lam={lam:.4g} -> {acc:.3f}", file=sys.stderr, flush=True)
        return acc, side["diagnostics"]


def search(probe, f, lo, hi, target, tol, probes, geometric):
    """The x in [lo, hi] whose accuracy f(x) (falling in x) is closest to target: bisection, in log
    space when geometric; returns (x, accuracy)."""
    best = None
    for _ in range(probes):
        x = math.sqrt(lo * hi) if geometric and lo > 0 else (lo + hi) / 2
        acc = f(x)
        if best is None or abs(acc - target) < abs(best[1] - target):
            best = (x, acc)
        if abs(acc - target) <= tol:
            break
        lo, hi = (x, hi) if acc > target else (lo, x)
    return best


def rounded(x):
    """Probe at grid.py's precision (%.2e), so a row samples exactly as its calibration probe did."""
    return float(f"{x:.2e}")


def calibrate_temperature(probe, target, args):
    f = lambda tau: probe(f"cal_temperature_{target:.2f}_tau{rounded(tau):.2e}", rounded(tau))[0]
    tau, acc = search(probe, f, *TAU_RANGE, target, args.tolerance, args.probes, geometric=False)
    return rounded(tau), acc


def calibrate_ads(probe, target, eps, args):
    f = lambda lam: probe(f"cal_ads_{target:.2f}_lam{rounded(lam):.2e}", args.ads_tau, rounded(lam), eps)[0]
    lo, hi = 0.0, LAM_START
    while f(hi) > target and hi < LAM_MAX:  # bracket: lam large enough to push the traces below target
        lo, hi = hi, hi * 4
    lam, acc = search(probe, f, lo, hi, target, args.tolerance, args.probes, geometric=True)
    return rounded(lam), acc


def headroom_problem(targets, tau, plain_accuracy, tol):
    """Why no ADS row can be calibrated at tau, or None: ADS only takes accuracy away from plain sampling
    at its tau, so every target must lie more than tol below plain sampling's accuracy there."""
    short = [t for t in targets if plain_accuracy < t + tol]
    if short:
        return (f"ADS target {max(short):.2f} is not below plain sampling at tau {tau:.3g} "
                f"({plain_accuracy:.3f}); lower --ads-tau or use --ads-tau auto")
    return None


def choose_ads_tau(probe, args):
    """The ADS rows' tau: the given one, or (auto) where plain sampling is --headroom above the highest
    target; either way checked against every target. Returns (tau, plain sampling's accuracy there)."""
    f = lambda tau: probe(f"cal_plain_tau{rounded(tau):.2e}", rounded(tau))[0]
    if args.ads_tau == "auto":
        tau, acc = search(probe, f, *ADS_TAU_RANGE, max(args.targets) + args.headroom, args.tolerance, args.probes,
                          geometric=True)
        tau = rounded(tau)
    else:
        tau, acc = args.ads_tau, f(args.ads_tau)
    problem = headroom_problem(args.targets, tau, acc, args.tolerance)
    if problem:
        sys.exit(f"error: calibrate.py: {problem}")
    return tau, acc


def choose_eps(probe, args):
    """eps of every ADS row: the FD check's choice at eps=auto, or the given value (still checked)."""
    acc, diag = probe("cal_eps", args.ads_tau, LAM_START, args.eps)
    return rounded(diag["eps"]), {k: v for k, v in diag.items() if k.startswith(("fd_", "eps", "frac_", "grad_", "proxy_"))}


def grid_lines(args, temperature, ads, eps):
    rows = []
    for t in args.targets:
        if t in temperature:
            rows.append(grid.Row(temperature[t][0], 0.0, 0.0))
        if t in ads:
            rows.append(grid.Row(args.ads_tau, ads[t][0], eps))
    if args.permute and args.targets[0] in ads:
        rows.append(grid.Row(args.ads_tau, ads[args.targets[0]][0], eps, "permute"))
    if args.reference:
        rows.append(grid.Row(args.ads_tau, 0.0, 0.0))
    return list(dict.fromkeys(row.spec for row in rows))  # two targets can land on one row; pipeline.sh must run it once


def main(argv=None):
    args = parse_args(argv)
    probe = Prober(args)
    plain, eps, fd = None, 0.0, {}
    with ThreadPoolExecutor(2 * len(args.targets) + 1) as pool:
        # the temperature rows do not depend on the ADS rows' tau and eps, so they start at once
        temp = {t: pool.submit(calibrate_temperature, probe, t, args) for t in args.targets
                if "temperature" in args.series}
        ads = {}
        if "ads" in args.series:
            args.ads_tau, plain = choose_ads_tau(probe, args)
            eps, fd = choose_eps(probe, args)
            ads = {t: pool.submit(calibrate_ads, probe, t, eps, args) for t in args.targets}
        temp, ads = {t: f.result() for t, f in temp.items()}, {t: f.result() for t, f in ads.items()}
    lines = grid_lines(args, temp, ads, eps)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("".join(line + "\n" for line in lines))
    summary = {"targets": args.targets, "metric": args.metric, "problems": args.problems,
               "ads_tau": args.ads_tau if "ads" in args.series else None, "plain_accuracy_at_ads_tau": plain,
               "eps": eps, "fd_check": fd,
               "temperature": {t: dict(tau=x, accuracy=a) for t, (x, a) in temp.items()},
               "ads": {t: dict(tau=args.ads_tau, lam=x, accuracy=a) for t, (x, a) in ads.items()},
               "grid": lines, "probes": sorted(probe.log, key=lambda p: p["name"])}
    (probe.exp / "calibration.yaml").write_text(yaml.safe_dump(summary, sort_keys=False))
    print(f"calibrate.py: {len(lines)} rows -> {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
