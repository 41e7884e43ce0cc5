"""Add the role and grid-row fields to a trace registry written before gentraces.py recorded them.

Older registries identify a row only by its trace names (`eval_teacher_{row}`, `eval_student_{row}_seedN`,
`{row}` for train traces); report.py now reads fields and refuses such a file with a pointer here.
This reads each old name once, takes the row's fields from grid.py, and rewrites the file in place
(atomically); lines that already have a role are left as they are, so running it twice changes nothing.

    python migrate_registry.py exp/gsm8k/metadata/trace_registry.jsonl
"""
import argparse
import json
import re
from pathlib import Path

import grid
import utils

NUM = r"(-?\d\.\d+e[+-]\d+)"
OLD_ROW = rf"tau{NUM}_lam{NUM}_eps{NUM}(?:_({'|'.join(grid.CONTROLS)}))?"
OLD_EVAL = re.compile(rf"^eval_(teacher|student)_{OLD_ROW}(?:_seed(\d+))?$")
OLD_TRAIN = re.compile(rf"^{OLD_ROW}$")
REFERENCES = {"holdout": "holdout", "eval_teacher_base": "teacher_eval", "eval_student_base": "student_eval"}


def row_fields(tau, lam, eps, control):
    return grid.Row(float(tau), float(lam), float(eps), control or "none").fields()


def fields_of(name: str) -> dict:
    """role, row and student_seed of an entry, read from the name pipeline.sh gave it."""
    if name in REFERENCES:
        return {"role": REFERENCES[name], "row": None, "student_seed": None}
    match = OLD_EVAL.match(name)
    if match:
        who, seed = match.group(1), match.group(6)
        return {"role": f"{who}_eval", "row": row_fields(*match.groups()[1:5]),
                "student_seed": int(seed) if seed else None}
    match = OLD_TRAIN.match(name)
    if match:
        return {"role": "train", "row": row_fields(*match.groups()), "student_seed": None}
    return {"role": "other", "row": None, "student_seed": None}  # calibration probes and the like


def migrate(path: Path) -> int:
    """Rewrite the registry at `path`; returns how many lines gained fields."""
    lines, changed = [], 0
    for lineno, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            name = entry["name"]
        except (json.JSONDecodeError, TypeError, KeyError) as e:
            utils.die(f"{path}:{lineno}: malformed registry line ({type(e).__name__}: {e})")
        if "role" not in entry:
            entry.update(fields_of(name))
            changed += 1
        lines.append(json.dumps(entry))
    utils.atomic_write_text(path, "".join(line + "\n" for line in lines))
    return changed


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("registries", nargs="+", type=Path, help="trace_registry.jsonl files to migrate")
    args = parser.parse_args(argv)
    for path in args.registries:
        if not path.is_file():
            utils.die(f"registry not found: {path}")
        print(f"{path}: {migrate(path)} lines gained role and row fields")


if __name__ == "__main__":
    utils.run_cli(main)
