"""The one place that knows a grid row: its fields, its kind and its name; prints a sweep, one row per line.

A row is (tau, lam, eps, control). Its kind: `temperature` when lam = 0 (plain sampling, no proxy),
`ads` when lam != 0, `control` when an ADS row applies a control to its penalty (`permute`: the penalty
shuffled over the vocabulary at every step, the paper's check that the gradient signal matters). Its
name (`tau{:.2e}_lam{:.2e}_eps{:.2e}[_control]`) names its traces, students and evals. The drivers read
the printed fields and pass `grid_row` to gentraces.py, which records the row's fields in every registry
line, so report.py reads fields, never names. Rows are shuffled with random.Random(42), so any shard or
any prefix of the sweep mixes the series; the order is the same on every machine. Edit GRIDS to change
the sweep.

Prints `name kind tau lam eps control` per row (tau, lam, eps in %.2e; control `none` or its name);
`--spec` prints the grid-file format instead, `tau lam eps [control]`, which --grid FILE reads and
calibrate.py writes.

    python grid.py                                   # the paper's 59 rows
    python grid.py --grid synth                      # the one-GPU reproduction: temperature, ADS, permuted ADS
    python grid.py --grid tiny --shard 1 --num-shards 4
    python grid.py --grid exp/synth/grid.txt --spec  # rows from a file in the grid-file format
"""
import argparse
import random
import sys
from pathlib import Path
from typing import NamedTuple

import numpy as np

# Each grid: a row per tau; tau <= ADS_MAX_TAU expands into ADS rows with lam = b * eps for each b,
# a larger tau gives one plain temperature row (lam = eps = 0).
GRIDS = {
    "paper": {  # DESIGN section 3: 2 ADS taus x 20 lams + 19 temperature taus = 59 rows
        "taus": [0.9] + np.linspace(1.0, 2.0, 20).tolist(),
        "lam_over_eps": np.linspace(0, 15, 20).tolist(),
        "eps": 1e-2,
    },
    "tiny": {  # CI: one temperature row, one ADS row (lam 0.2) and its permuted control
        "taus": [0.9, 1.5],
        "lam_over_eps": [20.0],
        "eps": 1e-2,
        "controls": ["permute"],
    },
    "shapes": {  # pipeline_shapes.sh: one temperature row and one ADS row (lam 0.05, b = 5), paper settings
        "taus": [0.9, 1.5],
        "lam_over_eps": [5.0],
        "eps": 1e-2,
    },
    # pipeline_synth.sh: 6 temperature rows (tau 0.9 with lam 0, and five hotter) and 7 ADS rows, each
    # again with its penalty permuted: 20 rows.  Placed after a two-GPU run of this task, where the
    # teacher kept 88% at tau 1.5, 52% at 1.75 and 7% at 2.0, ADS fell from 77% to 10% between lam
    # 0.01 and 0.015 and permuted ADS to 42% at lam 0.02: the middle band of teacher accuracy, where
    # that run's gap came from, now has rows of every series
    "synth": {
        "taus": [0.9, 1.25, 1.5, 1.65, 1.85, 2.0],
        "lam_over_eps": [0, 0.25, 0.5, 0.75, 1, 1.25, 1.5, 2],
        "eps": 1e-2,
        "controls": ["permute"],
    },
}
ADS_MAX_TAU = 1.0  # the paper pairs ADS with tau <= 1 and compares against hotter plain sampling
SHUFFLE_SEED = 42  # the reference's seed; changing it reorders (and re-shards) every sweep


CONTROLS = ("permute",)  # gentraces.py's ads_control values other than none


class Row(NamedTuple):
    tau: float
    lam: float
    eps: float
    control: str = "none"  # none, or the gentraces.py ads_control that the row applies to its ADS penalty

    @property
    def kind(self) -> str:
        """temperature (lam = 0: no proxy, whatever eps says), ads, or control."""
        return "temperature" if self.lam == 0 else "ads" if self.control == "none" else "control"

    @property
    def name(self) -> str:
        """The name every stage uses for the row's traces, models and evals."""
        return f"tau{self.tau:.2e}_lam{self.lam:.2e}_eps{self.eps:.2e}" + ("" if self.control == "none" else f"_{self.control}")

    @property
    def spec(self) -> str:
        """The row in the grid-file format (what --grid FILE reads and gentraces' grid_row takes)."""
        return f"{self.tau:.2e} {self.lam:.2e} {self.eps:.2e}" + ("" if self.control == "none" else f" {self.control}")

    def fields(self) -> dict:
        """What a registry line records of its row: the values at the printed precision."""
        tau, lam, eps = (float(f"{v:.2e}") for v in self[:3])
        return {"name": self.name, "kind": self.kind, "tau": tau, "lam": lam, "eps": eps, "control": self.control}


def parse_row(spec: str) -> Row:
    """A row from one line of the grid-file format (a fourth field `none` is no control, as grid.py prints
    it); ValueError says what is wrong."""
    fields = spec.split()
    if len(fields) not in (3, 4) or fields[3:] not in ([], ["none"], *([c] for c in CONTROLS)):
        raise ValueError(f"expected 'tau lam eps [{'|'.join(CONTROLS)}]', got {spec!r}")
    try:
        row = Row(*map(float, fields[:3]), *fields[3:])
    except ValueError:
        raise ValueError(f"expected 'tau lam eps [{'|'.join(CONTROLS)}]' with numbers, got {spec!r}") from None
    if row.control != "none" and row.kind == "temperature":
        raise ValueError(f"a control ({row.control}) acts on the ADS penalty, which lam = 0 does not have: {spec!r}")
    return row


def read_rows(path: Path) -> list[Row]:
    """Rows from a grid file, in the file's order."""
    rows = []
    for lineno, line in enumerate(path.read_text().splitlines(), start=1):
        try:
            rows.append(parse_row(line))
        except ValueError as e:
            print(f"error: {path}:{lineno}: {e}", file=sys.stderr)
            sys.exit(2)
    return rows


def grid_rows(name: str) -> list[Row]:
    """All rows of grid `name` (shuffled with SHUFFLE_SEED), or of the grid file at path `name`."""
    if name not in GRIDS:
        return read_rows(Path(name))
    spec = GRIDS[name]
    rows = []
    for tau in spec["taus"]:
        if tau <= ADS_MAX_TAU:
            ads = [Row(float(tau), float(b * spec["eps"]), float(spec["eps"])) for b in spec["lam_over_eps"]]
            rows += ads
            rows += [row._replace(control=c) for c in spec.get("controls", []) for row in ads if row.kind == "ads"]
        else:
            rows.append(Row(float(tau), 0.0, 0.0))
    random.Random(SHUFFLE_SEED).shuffle(rows)
    return rows


def shard_rows(rows: list, shard: int, num_shards: int) -> list:
    """Rows whose index is shard mod num_shards; the shards 0..num_shards-1 partition `rows`."""
    return [row for i, row in enumerate(rows) if i % num_shards == shard]


class Parser(argparse.ArgumentParser):
    """Errors are one 'error: ...' line and exit status 2, as in the stage scripts (which take theirs
    from utils; grid.py imports no torch, so the drivers get the rows at once)."""

    def error(self, message):
        self.exit(2, f"error: {message}\n")


def parse_args(argv=None) -> argparse.Namespace:
    parser = Parser(description=__doc__.splitlines()[0])
    parser.add_argument("--grid", default="paper",
                        help=f"which sweep to print: one of {', '.join(sorted(GRIDS))}, or a file of rows (default: paper)")
    parser.add_argument("--shard", type=int, default=0,
                        help="print only this shard, 0-based (default: 0)")
    parser.add_argument("--num-shards", type=int, default=1,
                        help="number of shards, e.g. nodes or array jobs (default: 1)")
    parser.add_argument("--spec", action="store_true",
                        help="print rows in the grid-file format 'tau lam eps [control]' instead of their fields")
    args = parser.parse_args(argv)
    if args.grid not in GRIDS and not Path(args.grid).is_file():
        parser.error(f"--grid must be one of {', '.join(sorted(GRIDS))} or a file of rows, got {args.grid!r}")
    if args.num_shards < 1:
        parser.error(f"--num-shards must be >= 1, got {args.num_shards}")
    if not 0 <= args.shard < args.num_shards:
        parser.error(f"--shard must be in [0, {args.num_shards}), got {args.shard}")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    rows = shard_rows(grid_rows(args.grid), args.shard, args.num_shards)
    lines = [r.spec if args.spec else " ".join(map(str, (r.name, r.kind, *r.spec.split()[:3], r.control)))
             for r in rows]
    # One newline per row and nothing else: an empty shard prints nothing, never a blank line.
    print("".join(line + "\n" for line in lines), end="")


if __name__ == "__main__":
    main()
