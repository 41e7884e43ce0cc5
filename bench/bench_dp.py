"""Data-parallel decode throughput: the engine's ADS benchmark with one process per GPU.

Every process builds the real-shape random-init models on its own GPU (bf16 7B-shaped teacher, two
3B-shaped proxies) and decodes `--batch` rows of `--prompt-len` tokens for `--new` tokens (EOS
ignored), as gentraces.py does under accelerate. The timed window starts at a barrier after warm-up
(graph capture and compilation) and ends when the slowest process is done; total tok/s counts the
tokens of every process. Run it once with one process and once with two, in the same call:

    python bench/bench_dp.py --out $OUT/dp1.json
    accelerate launch --multi_gpu --num_processes 2 bench/bench_dp.py --out $OUT/dp2.json
"""
import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from accelerate import PartialState

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import engine  # noqa: E402
from bench_decode import ADS, PROXY, TEACHER, VOCAB, build, random_prompts  # noqa: E402
from sampling import DecodeModels  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--batch", type=int, default=192, help="decode slots per process (default 192)")
parser.add_argument("--prompt-len", type=int, default=256, help="prompt tokens per row (default 256)")
parser.add_argument("--new", type=int, default=512, help="generated tokens per row, EOS ignored (default 512)")
parser.add_argument("--out", required=True, help="JSON results path (written by the main process)")


def decode_rows(models, n_rows, rank, args):
    prompts = random_prompts(n_rows, args.prompt_len, seed=1000 + rank)
    rows = [rank * n_rows + i for i in range(n_rows)]  # distinct rows per process, as in gentraces
    tokens, _ = engine.generate(models, prompts, rows, [args.new] * n_rows, ADS, args.batch)
    return sum(len(t) for t in tokens)


def main():
    args = parser.parse_args()
    state = PartialState()
    torch.cuda.set_device(state.local_process_index)
    models = DecodeModels(teacher=build(TEACHER, 0), vocab_size=VOCAB, eos_ids=[], pad_id=0,
                          plus=build(PROXY, 1), minus=build(PROXY, 2), eps=ADS.eps)
    decode_rows(models, args.batch, state.process_index, args)  # warm-up: capture and compile outside the window
    torch.cuda.synchronize()
    state.wait_for_everyone()
    start = time.perf_counter()
    n = decode_rows(models, args.batch, state.process_index, args)
    torch.cuda.synchronize()
    state.wait_for_everyone()
    wall = time.perf_counter() - start
    total = torch.tensor([n], device=state.device)
    if state.num_processes > 1:
        dist.all_reduce(total)
    if state.is_main_process:
        result = dict(processes=state.num_processes, batch_per_process=args.batch, prompt_len=args.prompt_len,
                      new_tokens=args.new, generated=int(total.item()), wall_s=wall,
                      tok_s=total.item() / wall, gpu=torch.cuda.get_device_name(),
                      peak_gib=torch.cuda.max_memory_allocated() / 2 ** 30, torch=torch.__version__)
        Path(args.out).write_text(json.dumps(result, indent=1))
        print(json.dumps(result))


if __name__ == "__main__":
    main()
