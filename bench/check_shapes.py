"""The engine's tokens against the Hugging Face reference loop (decode.generate_reference) at each of
the paper's real configs (real_shapes.yaml), on the GPU: the R1-Distill-7B-shaped teacher with two
Qwen2.5-3B-shaped proxies under ADS (their logits 152,064 and 151,936 wide, cut to the tokenizer's
151,665 ids), and the Llama-3.2-3B-shaped student (llama3 rope scaling, tied embeddings) alone. Untrained
fp32 weights with TF32 off and sharpened output heads, so the argmax (top_k = 1) is not decided by
rounding; prompts of random ids and lengths. Writes JSON and exits 1 if any row differs.

    python bench/check_shapes.py --out $OUT/check_shapes.json
"""
import argparse
import json
import sys
import time
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import engine  # noqa: E402
from decode import generate_reference  # noqa: E402
from make_assets import real_shapes  # noqa: E402
from sampling import DecodeModels, SamplingParams  # noqa: E402

SHARPEN = 30.0  # output-head scale: peaked distributions, as trained models have


def build(spec, seed):
    cls = getattr(transformers, spec["class"])
    torch.manual_seed(seed)
    with torch.device("cuda"):
        model = cls._from_config(cls.config_class(**spec["config"]), attn_implementation="sdpa", dtype=torch.float32)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(SHARPEN)
    return model.eval()


def compare(name, models, params, n_prompts, new_tokens, seed):
    reason = engine.unsupported_reason(models, params)
    if reason:  # decode.generate would fall back to the reference loop and compare it with itself
        raise SystemExit(f"error: the engine does not run {name}: {reason}")
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(8, 200, (n_prompts,), generator=g).tolist()
    prompts = [torch.randint(0, models.vocab_size, (n,), generator=g).tolist() for n in lengths]
    rows, budgets = list(range(n_prompts)), [new_tokens] * n_prompts
    t0 = time.time()
    want = generate_reference(models, prompts, rows, budgets, params)
    t1 = time.time()
    got = engine.generate(models, prompts, rows, budgets, params, batch_size=n_prompts)
    t2 = time.time()
    same = [a == b for a, b in zip(want[0], got[0])]
    first = [next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None) for a, b in zip(want[0], got[0])]
    result = dict(rows_equal=f"{sum(same)}/{n_prompts}", first_difference=first, prompt_lengths=lengths,
                  new_tokens=new_tokens, reference_s=round(t1 - t0, 1), engine_s=round(t2 - t1, 1),
                  ids_in_vocab=all(t < models.vocab_size for row in got[0] for t in row), passed=all(same))
    print(name, json.dumps(result), flush=True)
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="check_shapes.json", help="JSON results path")
    parser.add_argument("--prompts", type=int, default=4, help="prompts per check (default 4)")
    parser.add_argument("--new", type=int, default=64, help="generated tokens per prompt (default 64)")
    args = parser.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    shapes = real_shapes()
    results = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "transformers": transformers.__version__}
    ads = SamplingParams(tau=0.9, lam=0.05, eps=1e-2, top_k=1, top_p=1.0, seed=42)
    teacher = build(shapes["teacher"], 0)
    plus, minus = build(shapes["proxy"], 1), build(shapes["proxy"], 2)  # two proxies, as theta +- eps g
    models = DecodeModels(teacher=teacher, vocab_size=shapes["teacher"]["tokenizer"]["size"], eos_ids=[151643],
                          pad_id=151643, plus=plus, minus=minus, eps=ads.eps)
    results["teacher_ads_top_k_1"] = compare("teacher + proxies, ADS", models, ads, args.prompts, args.new, 1)
    del teacher, plus, minus, models
    torch.cuda.empty_cache()
    student = build(shapes["student"], 3)
    models = DecodeModels(teacher=student, vocab_size=shapes["student"]["tokenizer"]["size"], eos_ids=[128009],
                          pad_id=128004)
    results["student_top_k_1"] = compare("student", models, SamplingParams(tau=0.9, top_k=1, top_p=1.0, seed=42),
                                         args.prompts, args.new, 2)
    Path(args.out).write_text(json.dumps(results, indent=1))
    sys.exit(0 if all(r["passed"] for r in results.values() if isinstance(r, dict)) else 1)


if __name__ == "__main__":
    main()
