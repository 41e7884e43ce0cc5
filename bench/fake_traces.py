"""Write a trace dataset of random text for gradient benchmarks (no teacher needed).

    python bench/fake_traces.py --tokenizer .tiny/teacher --rows 256 --out /tmp/fake_holdout
"""
import argparse
import random

import datasets
from transformers import AutoTokenizer

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--tokenizer", required=True, help="tokenizer whose vocabulary the words come from")
parser.add_argument("--rows", type=int, default=256, help="number of traces (default 256)")
parser.add_argument("--out", required=True, help="output directory (datasets save_to_disk)")
args = parser.parse_args()

tok = AutoTokenizer.from_pretrained(args.tokenizer)
words = [w for w in tok.get_vocab() if w.isalpha()]
rng = random.Random(0)
text = lambda n: " ".join(rng.choice(words) for _ in range(n))
rows = [{"idx": i, "system": "Solve it.", "question": text(rng.randint(10, 60)),
         "completion": "<think>\n" + text(rng.randint(20, 200))} for i in range(args.rows)]
datasets.Dataset.from_list(rows).save_to_disk(args.out)
