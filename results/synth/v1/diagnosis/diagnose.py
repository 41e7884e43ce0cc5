"""Where the synth students fail: for each greedy test trace, is the start value copied from the
question, is each equation's arithmetic right, and is each equation's second operand the number of the
matching clause of the question? Reads the three trace files next to this script.

    python results/synth/v1/diagnosis/diagnose.py > results/synth/v1/diagnosis/diagnosis.txt
"""
import re
from pathlib import Path

import pyarrow.parquet as pq

# one step line in any of make_assets.STEP_STYLES: `a+b=r`, `a + b = r`, `a plus b is r`
STEP = re.compile(r"^(\d+)\s*(?:([+-])|(plus|minus))\s*(\d+)\s*(?:=|is)\s*(\d+)$")


def steps(completion):
    """(a, op, b, r) of every step line before </think>."""
    out = []
    for line in completion.split("</think>")[0].splitlines():
        m = STEP.match(line.strip())
        if m:
            a, sym, word, b, r = m.groups()
            out.append((int(a), sym or {"plus": "+", "minus": "-"}[word], int(b), int(r)))
    return out


def main():
    for path in sorted(Path(__file__).parent.glob("*.parquet")):
        t = pq.read_table(path).to_pydict()
        n_lines = arithmetic = operand = start = 0
        for question, completion in zip(t["question"], t["completion"]):
            numbers = [int(x) for x in re.findall(r"\d+", question)]  # start value, then one per clause
            found = steps(completion)
            start += bool(found) and found[0][0] == numbers[0]
            for k, (a, op, b, r) in enumerate(found):
                n_lines += 1
                arithmetic += (a + b if op == "+" else a - b) == r
                operand += k + 1 < len(numbers) and b == numbers[k + 1]
        n = len(t["question"])
        print(f"{path.stem}: {n} traces, af accuracy {sum(t['af_correct']) / n:.1%}; start value copied "
              f"{start / n:.1%}; {n_lines} step lines: arithmetic right {arithmetic / n_lines:.1%}, "
              f"second operand from the matching clause {operand / n_lines:.1%}")


if __name__ == "__main__":
    main()
