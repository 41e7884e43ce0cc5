"""Throughput on one GPU over the same full workload (prompt 256, 512 new tokens, EOS ignored):
the reference approach (Hugging Face `generate` with a logits processor that runs both proxies with
their own DynamicCache) against engine.generate, for ADS and for plain sampling (lam = 0), end to
end (prefill included; the engine's one-off setup, i.e. re-lay, compile and capture, reported
apart) and per decode step, on randomly initialised models of the real shapes (bf16 7B-shaped
teacher, two 3B-shaped proxies).  Checks the engine against the reference loop and sampling.py on
the GPU first.  Prints a table and writes JSON (rewritten after every stage, so a run cut short keeps
what it measured).  The variants are EngineOptions of one engine, run in the same process.

    python bench/bench_decode.py --out $OUT/decode_<gpu>_<commit>.json
"""
import argparse
import hashlib
from contextlib import contextmanager
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import engine  # noqa: E402
import engine_kernels  # noqa: E402
from bench_gemm import time_matmul  # noqa: E402
from real_shapes import COPY_BW, MATMUL_PEAK, PROXY, TEACHER, VOCAB, step_matmuls  # noqa: E402
from schedule import rows_per_step  # noqa: E402
from decode import cache_kwarg, generate_reference  # noqa: E402
from engine import EngineOptions  # noqa: E402
from sampling import DecodeModels, SamplingParams, fd_delta, sample_from_scores  # noqa: E402
from transformers import DynamicCache, LogitsProcessor  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--out", default="decode.json", help="JSON results path")
parser.add_argument("--stages", default="check,engine,reference,unfused", help="comma list of stages to run: "
                    "check, profile, engine, reference, unfused (engine through the HF modules), eagerblocks, "
                    "wholerows (row_piece as wide as the vocabulary: the sampler's row reductions one program per row, "
                    "as before row pieces, and since engine_kernels.inverse_cdf its scan over the whole row too), "
                    "wholescan (the sampler's inverse CDF one scan per row, as before engine_kernels.inverse_cdf), "
                    "hfprefill (prefill through the HF modules, as before the Stack's prefill), launchtuned (kernel layouts "
                    "chosen by eager timing, as before graph timing), gemmtuned (the blocks' matmuls through Inductor's max-autotune), "
                    "piecesoftmax (the sampler's softmax left to Inductor, as before its Triton passes), unstacked (each proxy "
                    "its own Stack: plain matmuls, not batched), torchscore (the ADS score left to Inductor, as before its "
                    "Triton passes), ways16 (the top-p search at 16 thresholds a pass, as before the engine tuned it), longtail "
                    "(768 long-tailed traces: continuous batching with and without the drain's smaller steps, and static "
                    "batches), chunks (gentraces' chunks of 4 x 192 long-tailed prompts one engine call each, "
                    "as before gentraces.decode_chunks, or all in one call), bound (at batch 192, the targets': the step's matmuls and attention timed alone at "
                    "their best, against the targets; the step at every row count, pricing the long-tailed workload's rows)")
parser.add_argument("--batches", default="192,64", help="decode slots; 'max' = largest that fits")
parser.add_argument("--prompt-len", type=int, default=256, help="prompt tokens per row")
parser.add_argument("--new", type=int, default=512, help="generated tokens per row (EOS ignored)")
parser.add_argument("--longtail-prompts", type=int, default=768, help="prompts in the long-tailed workload")
args = parser.parse_args()
torch._dynamo.config.recompile_limit = 64  # one compiled block per (model shape, batch) in one process

ADS = SamplingParams(tau=0.9, lam=0.05, eps=1e-2, top_p=0.95, seed=42)
PLAIN = SamplingParams(tau=0.9, lam=0.0, top_p=0.95, seed=42)


def build(shape, seed, dtype=torch.bfloat16):
    from transformers import Qwen2Config, Qwen2ForCausalLM
    torch.manual_seed(seed)
    with torch.device("cuda"):
        model = Qwen2ForCausalLM._from_config(Qwen2Config(**shape), attn_implementation="sdpa", dtype=dtype)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model.eval()


def random_prompts(n, length, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(100, VOCAB, (n, length), generator=g).tolist()


def check(results):
    """On the GPU: engine kernels and tokens against sampling.py (fp32 small models, bf16 kernels)."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    out = {}
    small = dict(hidden_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=512, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                 max_position_embeddings=512)
    teacher = build(dict(small, vocab_size=512), 0, torch.float32)
    plus, minus = (build(dict(small, vocab_size=500, hidden_size=128, num_attention_heads=2,
                              num_key_value_heads=1), s, torch.float32) for s in (1, 2))
    for m in (teacher, plus, minus):
        m.get_output_embeddings().weight.data.mul_(30.0)  # peaked distributions, as trained models have
    models = DecodeModels(teacher=teacher, vocab_size=490, eos_ids=[7, 11], pad_id=0, plus=plus, minus=minus,
                          eps=SamplingParams().eps)  # random stand-ins for theta +- eps g, at the params' eps
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(20, 490, (int(n),), generator=g).tolist() for n in torch.randint(3, 40, (24,), generator=g)]
    rows = list(range(100, 124))
    budgets = torch.randint(1, 60, (24,), generator=g).tolist()
    for name, params in [("ads_top_k_1", SamplingParams(tau=0.8, lam=0.3, top_k=1)),
                         ("ads_top_p", SamplingParams(tau=0.8, lam=0.3, top_p=0.95, seed=5)),
                         ("plain_top_p", SamplingParams(tau=1.0, top_p=0.9, seed=6)),
                         ("greedy", SamplingParams(tau=0.0))]:
        want = generate_reference(models, prompts, rows, budgets, params)
        got = engine.generate(models, prompts, rows, budgets, params, batch_size=8, options=EngineOptions(check_every=4))
        same = sum(a == b for a, b in zip(want[0], got[0]))
        out[f"tokens_equal_{name}"] = f"{same}/{len(prompts)} rows" + ("" if want[1] == got[1] else ", EOS flags differ")
    torch.backends.cuda.matmul.allow_tf32 = True
    q = torch.randn(192, 28, 128, device="cuda", dtype=torch.bfloat16)
    kc, vc = (torch.randn(192, 4, 768, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    lengths = torch.randint(1, 769, (192,), device="cuda")
    a = engine_kernels.decode_attention_triton(q, kc, vc, lengths, 128 ** -0.5).float()
    b = engine_kernels.decode_attention_torch(q, kc, vc, lengths, 128 ** -0.5).float()
    out["attention_rel_err_bf16"] = ((a - b).norm() / b.norm()).item()
    # a drain step: half the rows, reading cache rows scattered over the cache
    rows = torch.randperm(192, device="cuda")[:96]
    a = engine_kernels.decode_attention_triton(q[:96], kc, vc, lengths[:96], 128 ** -0.5, rows=rows).float()
    b = engine_kernels.decode_attention_torch(q[:96], kc[rows], vc[rows], lengths[:96], 128 ** -0.5).float()
    out["drain_attention_rel_err_bf16"] = ((a - b).norm() / b.norm()).item()
    # prompts of one length: flash with grouped K/V against K/V expanded to every head
    q = torch.randn(64, 28, 256, 128, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(64, 4, 256, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    a = engine_kernels.prefill_attention(q, k, v, None, 128 ** -0.5)
    b = torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(7, 1), v.repeat_interleave(7, 1),
                                                         is_causal=True, scale=128 ** -0.5)
    out["prefill_grouped_equal_bf16"] = torch.equal(a, b)
    out["prefill_grouped_max_abs_bf16"] = (a.float() - b.float()).abs().max().item()
    out["prefill_kernels_bf16"] = check_prefill_kernels()
    scores = torch.randn(192, VOCAB, device="cuda") * 4
    u = torch.rand(192, device="cuda")
    same = (engine_kernels.sample_tokens(scores, u, 0, 0.95) == sample_from_scores(scores, u, 0, 0.95)).float().mean()
    out["sampler_token_match"] = same.item()
    results["check"] = out
    print(json.dumps(out, indent=1), flush=True)


def check_prefill_kernels(tokens=4096):
    """The prefill's Triton kernels against the torch ops they replace, in bf16 at the teacher's
    shapes: the residual add rounds as torch's does, so it should match exactly; the norm's, the
    rotary's and SiLU's float32 math may differ from torch's eager ops by a bf16 rounding step."""
    bf16 = dict(device="cuda", dtype=torch.bfloat16)
    x, y = torch.randn(1, tokens, 3584, **bf16), torch.randn(1, tokens, 3584, **bf16)
    w = torch.rand(1, 3584, **bf16) + 0.5
    x_out, h = engine_kernels.add_norm_triton(x, y, w, 1e-6)
    h_want = engine_kernels.rms_norm(x + y, w, 1e-6)
    qkv = torch.randn(1, tokens, 28 + 8, 128, **bf16)
    angle = torch.randint(0, 32768, (tokens, 1), device="cuda") * 10000.0 ** -(torch.arange(0, 128, 2, device="cuda") / 128)
    cos, sin = (f(torch.cat((angle, angle), -1)).to(torch.bfloat16) for f in (torch.cos, torch.sin))
    q, k, _ = qkv.split([28, 4, 4], dim=2)
    q_want, k_want = (engine_kernels.rotate(t, cos[None, :, None], sin[None, :, None]) for t in (q, k))
    engine_kernels.rotate_qk_triton(qkv, cos, sin, 32)
    gate_up = torch.randn(1, tokens, 2 * 18944, **bf16)
    silu = engine_kernels.silu_mul_triton(gate_up)
    silu_want = torch.nn.functional.silu(gate_up[..., :18944]) * gate_up[..., 18944:]
    rotated, rotated_want = torch.cat((q, k), 2), torch.cat((q_want, k_want), 2)
    return dict(add_equal=torch.equal(x_out, x + y), rotary_equal_frac=(rotated == rotated_want).float().mean().item(),
                rotary_max_abs=(rotated.float() - rotated_want.float()).abs().max().item(),
                norm_equal_frac=(h == h_want).float().mean().item(),
                norm_max_abs=(h.float() - h_want.float()).abs().max().item(),
                silu_mul_equal_frac=(silu == silu_want).float().mean().item(),
                silu_mul_max_abs=(silu.float() - silu_want.float()).abs().max().item())


def kv_bytes_per_token(m):
    c = m.config
    return 2 * c.num_hidden_layers * c.num_key_value_heads * (c.hidden_size // c.num_attention_heads) * 2


def matmul_params(m):
    """Parameters a decode step reads: all but an untied input embedding table (only gathered)."""
    embed = m.get_input_embeddings().weight
    return sum(p.numel() for p in m.parameters()) - (0 if m.config.tie_word_embeddings else embed.numel())


def weight_bytes(models):
    return sum(matmul_params(m) * m.get_input_embeddings().weight.element_size() for m in models)


def roofline(batch, context, models):
    """Per-step floor: weights and KV read once at copy bandwidth, matmul FLOPs at the measured peak."""
    flops = sum(2 * matmul_params(m) * batch for m in models)
    kv = sum(kv_bytes_per_token(m) for m in models) * batch * context
    return max(weight_bytes(models) / COPY_BW, flops / MATMUL_PEAK) + kv / COPY_BW


def scan_whole_rows(probs, u, piece=None):
    """The sampler's inverse CDF as one scan over each whole row, as the engine had it before
    engine_kernels.inverse_cdf (the wholescan variant; piece is unused)."""
    cdf = probs.cumsum(-1)
    return (cdf < u[:, None] * cdf[:, -1:]).sum(-1).clamp(max=probs.shape[-1] - 1)


def time_engine(models, params, batch, prompts=None, budgets=None, rows=None, keep_tokens=False, **options):
    """engine.generate over the workload; options: EngineOptions fields that differ from the defaults
    (a variant: an older piece of the engine, or static batches).  rows: the prompts' row ids, which
    key the noise (default 0, 1, ...); keep_tokens: the tokens too."""
    prompts = prompts or random_prompts(batch, args.prompt_len, batch)
    budgets = budgets or [args.new] * len(prompts)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    timings = {}
    opts = EngineOptions(timings=timings, **options)
    fresh = options.get("gemm_autotune", False)  # compiled with other settings: dynamo must not reuse the blocks
    if fresh:
        torch._dynamo.reset()
    start = time.perf_counter()
    rows = rows or list(range(len(prompts)))
    tokens, _ = engine.generate(models, prompts, rows, budgets, params, batch, options=opts)
    if fresh:
        torch._dynamo.reset()
    wall = time.perf_counter() - start - timings["capture_s"]
    n = sum(len(t) for t in tokens)
    changed = {k: getattr(v, "__name__", v) for k, v in options.items()}  # the variant's options, as written
    return dict(**({"tokens": tokens} if keep_tokens else {}),
                batch=batch, generated=n, wall_s=wall, setup_s=timings["capture_s"], compile_layers=opts.compile_layers,
                compiled=timings["compiled"], fused=opts.fused, prefill_s=timings["prefill_s"], decode_s=timings["decode_s"],
                steps=timings["steps"], row_steps=timings["row_steps"], options=changed, fused_prefill=opts.fused_prefill,
                tokens_sha1=hashlib.sha1(str(tokens).encode()).hexdigest(),
                tok_s=n / wall, decode_tok_s=n / timings["decode_s"],
                ms_per_step=1e3 * timings["decode_s"] / timings["steps"],
                peak_gib=torch.cuda.max_memory_allocated() / 2 ** 30)


def longtail_workload(n, seed):
    """(budgets, prompts) of n prompts whose trace lengths are long-tailed: lognormal, median 120,
    sigma 0.9, capped at the new tokens (EOS forced there)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.exp(math.log(120) + 0.9 * torch.randn(n, generator=g))
    return lengths.clamp(1, args.new).long().tolist(), random_prompts(n, args.prompt_len, 99)


def time_chunks(models, budgets, prompts, batch=192):
    """gentraces' chunks of 4 x batch prompts decoded one engine call each (as before decode_chunks:
    every call ends by draining its batch) and all in one call (decode_chunks), ADS; the tokens must
    be the same."""
    size = 4 * batch
    # each chunk's rows keep their ids, as gentraces' do: the noise is keyed on them
    parts = [time_engine(models, ADS, batch, prompts=prompts[i:i + size], budgets=budgets[i:i + size],
                         rows=list(range(i, i + len(prompts[i:i + size]))), keep_tokens=True)
             for i in range(0, len(prompts), size)]
    one = time_engine(models, ADS, batch, prompts=prompts, budgets=budgets, keep_tokens=True)
    same = [t for p in parts for t in p.pop("tokens")] == one.pop("tokens")
    summed = {k: sum(p[k] for p in parts) for k in ("generated", "wall_s", "setup_s", "prefill_s", "decode_s", "steps")}
    summed.update(batch=batch, calls=len(parts), tok_s=summed["generated"] / summed["wall_s"],
                  decode_tok_s=summed["generated"] / summed["decode_s"],
                  ms_per_step=1e3 * summed["decode_s"] / summed["steps"], peak_gib=max(p["peak_gib"] for p in parts))
    return dict(prompts=len(prompts), chunk=size, budgets_mean=sum(budgets) / len(budgets), tokens_equal=same,
                one_call=one, call_per_chunk=summed, speedup=one["tok_s"] / summed["tok_s"])


class ProxyPenalty(LogitsProcessor):
    """The reference approach as a logits processor: both proxies run every step with their own
    DynamicCache and lam * delta_hat is added to the teacher's scores (padding ids masked)."""

    def __init__(self, plus, minus, params):
        self.nets, self.params, self.caches = (plus, minus), params, None

    def __call__(self, input_ids, scores):
        if self.caches is None:  # first call: the proxies prefill the whole prompt
            self.caches = [DynamicCache(config=n.config) for n in self.nets]
            ids = input_ids
        else:
            ids = input_ids[:, -1:]
        logits = [net(input_ids=ids, use_cache=True, logits_to_keep=1, **{cache_kwarg(net): cache}).logits[:, -1, :VOCAB]
                  for net, cache in zip(self.nets, self.caches)]
        scores[:, :VOCAB] += self.params.lam * fd_delta(logits[0], logits[1], self.params.eps)
        scores[:, VOCAB:] = float("-inf")
        return scores


class StepClock(LogitsProcessor):
    """Host time at each step's scores (after a device sync; generate syncs every step anyway)."""

    def __init__(self):
        self.times = []

    def __call__(self, input_ids, scores):
        torch.cuda.synchronize()
        self.times.append(time.perf_counter())
        return scores


def time_hf(teacher, proxies, params, batch):
    """The reference approach over the full workload, end to end; per-step time from the clock."""
    from transformers import LogitsProcessorList
    ids = torch.tensor(random_prompts(batch, args.prompt_len, batch), device="cuda")
    clock = StepClock()
    procs = LogitsProcessorList(([ProxyPenalty(*proxies, params)] if proxies else []) + [clock])
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    with torch.no_grad():
        out = teacher.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True,
                               temperature=params.tau, top_p=params.top_p, top_k=0, max_new_tokens=args.new,
                               logits_processor=procs)
    torch.cuda.synchronize()
    wall = time.perf_counter() - start
    n = (out.shape[1] - ids.shape[1]) * batch
    steps = len(clock.times) - 1
    step = (clock.times[-1] - clock.times[0]) / steps
    return dict(batch=batch, generated=n, wall_s=wall, tok_s=n / wall, prefill_s=clock.times[0] - start,
                steps=steps, ms_per_step=1e3 * step, decode_tok_s=batch / step,
                peak_gib=torch.cuda.max_memory_allocated() / 2 ** 30,
                note="one generate call over the full workload; per-step time between the first and last step's scores")


def kernel_table(prof, per):
    """(name, calls, device us) per `per` units, heaviest first: the profile kept in the JSON."""
    rows = [(e.key, e.count / per, e.device_time_total / per) for e in prof.key_averages() if e.device_time_total > 0]
    return sorted(rows, key=lambda r: -r[2])


@contextmanager
def prefilled_engine(models, params, batch, max_len, budget, options=None):
    """An engine with its steps captured and every slot prefilled with a random prompt (row ids 0, 1,
    ...; budget tokens each), released after."""
    eng = engine.Engine(models, params, batch, max_len, budget, options)
    try:
        with engine.slot_attention_on(eng.nets), torch.no_grad():
            eng.capture()
            eng.prefill(list(range(batch)), random_prompts(batch, args.prompt_len, 5), list(range(batch)), [budget] * batch)
            yield eng
    finally:
        eng.release()


def profile_step(models, params, batch):
    """Kernel-level profiles of replays of the captured decode step and of one prefill call (as many
    prompts as generate puts in one: PREFILL_TOKENS), i.e. where the time goes."""
    from torch.profiler import ProfilerActivity, profile
    with prefilled_engine(models, params, batch, args.prompt_len + 64, 64) as eng:
        torch.cuda.synchronize()
        group = min(batch, eng.options.prefill_tokens // args.prompt_len)
        with profile(activities=[ProfilerActivity.CUDA]) as pre:
            eng.prefill(list(range(group)), random_prompts(group, args.prompt_len, 5), list(range(group)), [64] * group)
            torch.cuda.synchronize()
        eng.advance(8)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            eng.advance(16)
            torch.cuda.synchronize()
    step, prefill = kernel_table(prof, 16), kernel_table(pre, 1)
    for label, table in (("step", step), (f"prefill of {group} prompts", prefill)):
        print(f"profile batch {batch} {label}: {sum(r[1] for r in table):.0f} kernels, "
              f"{sum(r[2] for r in table) / 1e3:.2f} ms GPU")
        for name, calls, us in table[:40]:
            print(f"{us:10.1f} us {calls:7.1f}x  {name[:110]}")
    return dict(kernels_per_step=sum(r[1] for r in step), gpu_ms_per_step=sum(r[2] for r in step) / 1e3,
                prefill_gpu_ms=sum(r[2] for r in prefill) / 1e3, step_kernels=step, prefill_kernels=prefill)


def attention_ms(cfg, rows, max_len, contexts):
    """ms per decode attention call at each context (every row that long), the fastest of the
    engine's layouts at each, alone in a CUDA graph: the call's best, whatever the tuner picks."""
    dim = cfg["hidden_size"] // cfg["num_attention_heads"]
    like = dict(dtype=torch.bfloat16, device="cuda")
    q = torch.randn(rows, cfg["num_attention_heads"], dim, **like)
    k, v = (torch.randn(rows, cfg["num_key_value_heads"], max_len, dim, **like) for _ in range(2))
    best = {}
    for ctx in contexts:
        lengths = torch.full((rows,), ctx, dtype=torch.long, device="cuda")
        best[ctx] = min(engine_kernels.gpu_ms(lambda: engine_kernels.decode_attention_triton(q, k, v, lengths, dim ** -0.5, c))
                        for c in engine_kernels.ATTENTION_CONFIGS)
    return best


def step_ms_by_rows(models, params, batch, contexts, steps=16):
    """ms per captured engine step at each of its step batches (every slot, then halvings down to one
    row: the drain's steps), with every row live at each context."""
    out = {}
    with prefilled_engine(models, params, batch, args.prompt_len + args.new, args.new,
                          EngineOptions(drain_steps=16)) as eng:
        start = {name: getattr(eng, name).clone() for name in engine.SLOT_STATE}
        for ctx in contexts:
            for rows in eng.batches:
                for name, t in start.items():
                    getattr(eng, name).copy_(t)
                eng.seq_len.fill_(ctx)
                eng.batch = rows
                eng.advance(2)
                begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                begin.record()
                eng.advance(steps)
                end.record()
                end.synchronize()
                out.setdefault(ctx, {})[rows] = begin.elapsed_time(end) / steps
    return out


def bound(models, results):
    """What issue 18's targets ask of the kernels.  The step's matmuls (bench_gemm's forms, the fastest
    of each) and its decode attention (the fastest layout at each of the run's contexts), each timed
    alone, summed: a step cannot be faster than these two parts with nothing else in it.  And the
    engine's step at every row count, to price the long-tailed workload's rows as an engine would run
    them that refilled every step and sized every step to its live rows."""
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    matmul_ms = {}
    for name, cfg, stacked in (("teacher", TEACHER, 1), ("proxies", PROXY, 2)):
        matmul_ms[name] = sum(calls * min(time_matmul(192, s, n, k, False, l2)[0].values())
                              for _, s, n, k, calls in step_matmuls(cfg, stacked)) / 1e3
        print("bound: matmuls", name, f"{matmul_ms[name]:.2f} ms", flush=True)
    context = args.prompt_len + args.new
    contexts = torch.linspace(args.prompt_len + 1, context, 9).round().long().tolist()  # the run's, evenly
    attention = {name: attention_ms(cfg, rows, context, contexts)
                 for name, cfg, rows in (("teacher", TEACHER, 192), ("proxies", PROXY, 2 * 192))}
    attention_step = {name: sum(attention[name].values()) / len(contexts) * cfg["num_hidden_layers"]
                      for name, cfg in (("teacher", TEACHER), ("proxies", PROXY))}
    out = dict(matmul_ms=matmul_ms, attention_contexts=contexts, attention_call_ms=attention,
               attention_step_ms=attention_step)
    nets = {"ads": [models.teacher, models.plus, models.minus], "plain": [models.teacher]}
    parts = {"ads": ("teacher", "proxies"), "plain": ("teacher",)}
    for mode, target in (("ads", 75), ("plain", 70)):
        roof = 1e3 * roofline(192, args.prompt_len + args.new / 2, nets[mode])
        kernels = sum(matmul_ms[p] + attention_step[p] for p in parts[mode])
        e = engine_192(results, mode)
        measured = e and e["ms_per_step"]
        out[mode] = dict(roofline_ms=roof, target_pct=target, target_ms=100 * roof / target, matmuls_and_attention_ms=kernels,
                         best_pct_of_roofline=100 * roof / kernels, left_for_the_rest_ms=100 * roof / target - kernels,
                         engine_ms=measured, engine_rest_ms=measured and measured - kernels)
        print("bound:", mode, out[mode], flush=True)
    e = engine_192(results, "ads")
    if e:
        tokens = 192 * args.new
        out["ads"]["best_e2e_tok_s"] = tokens / (e["prefill_s"] + args.new * out["ads"]["matmuls_and_attention_ms"] / 1e3)
        out["ads"]["step_ms_for_11000_e2e"] = 1e3 * (tokens / 11000 - e["prefill_s"]) / args.new
    # the prompt's context (every row's least; the long-tailed pricing's) and the run's mean
    rows_ms = step_ms_by_rows(models, ADS, 192, (args.prompt_len, args.prompt_len + args.new // 2))
    out["step_ms_by_rows"] = rows_ms
    print("bound: step ms by rows", rows_ms, flush=True)
    if "longtail_ads_192" in results:
        out["longtail"] = price_longtail(rows_ms[args.prompt_len], results["longtail_ads_192"], nets["ads"])
        print("bound: longtail", out["longtail"], flush=True)
    return out


def engine_192(results, mode):
    """The engine stage's batch-192 result of this mode, if it ran."""
    return next((r for r in results.get(f"engine_{mode}", []) if r["batch"] == 192), None)


def price_longtail(cost, lt, nets):
    """The long-tailed workload refilled every step and each step sized to its live rows, each priced
    at the timed step (cost: rows -> ms) of the next smaller row count; against the longtail stage's
    measured static batches (lt)."""
    budgets, _ = longtail_workload(args.longtail_prompts, 7)
    at = lambda n: cost[max(b for b in cost if b <= n)]  # noqa: E731
    exact = rows_per_step(budgets, 192, 1, live_only=True)
    engine_rows = rows_per_step(budgets, 192, 16, EngineOptions().drain_steps)
    prefill = min(lt[k]["prefill_s"] for k in ("continuous", "static"))
    decode_exact = sum(map(at, exact)) / 1e3
    full = sum(n == 192 for n in exact)
    return dict(
        exact_steps=len(exact), exact_full_steps=full, exact_row_steps=sum(exact),
        engine_schedule_priced_s=sum(map(at, engine_rows)) / 1e3, engine_decode_s=lt["continuous"]["decode_s"],
        exact_decode_s=decode_exact, static_wall_s=lt["static"]["wall_s"], prefill_s=prefill,
        exact_speedup=lt["static"]["wall_s"] / (prefill + decode_exact),
        # decode time 2x allows, and what is left of it per step of the tail after the full steps
        decode_s_for_2x=lt["static"]["wall_s"] / 2 - prefill,
        tail_step_ms_for_2x=(1e3 * (lt["static"]["wall_s"] / 2 - prefill) - full * cost[192]) / (len(exact) - full),
        weight_read_ms=1e3 * weight_bytes(nets) / COPY_BW)


def largest_batch(models, per_slot_tokens):
    """Slots whose KV caches fit in what is free, keeping 24 GiB for activations and the graph pool
    (capped at 1024 to bound the run's time)."""
    kv = sum(kv_bytes_per_token(m) for m in models)
    free, _ = torch.cuda.mem_get_info()
    return min(1024, max(64, int((free - 24 * 2 ** 30) / (kv * per_slot_tokens)) // 64 * 64))


def main():
    stages = args.stages.split(",")
    results = dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                   transformers=__import__("transformers").__version__,
                   prompt_len=args.prompt_len, new_tokens=args.new, params_ads=vars(ADS), params_plain=vars(PLAIN),
                   tuning=engine_kernels.TUNING_LOG)  # filled as the engine tunes its kernels (saved with each stage)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def save():
        out.write_text(json.dumps(results, indent=1))

    if "check" in stages:
        check(results)
        save()
    teacher = build(TEACHER, 0)
    plus, minus = build(PROXY, 1), build(PROXY, 2)
    models = DecodeModels(teacher=teacher, vocab_size=VOCAB, eos_ids=[], pad_id=0, plus=plus, minus=minus, eps=ADS.eps)
    if "profile" in stages:
        results["profile_ads_192"] = profile_step(models, ADS, 192)
        results["profile_plain_192"] = profile_step(models, PLAIN, 192)
        save()
    context = args.prompt_len + args.new
    biggest = largest_batch([teacher, plus, minus], context)
    batches = [biggest if b == "max" else int(b) for b in args.batches.split(",")]
    results["largest_batch"] = biggest
    rows = []

    def record(label, key, r):
        results.setdefault(key, []).append(r)
        rows.append((label, r))
        save()
        print(rows[-1], flush=True)

    for b in batches:
        mean_ctx = args.prompt_len + args.new / 2
        for mode, params, nets in (("ads", ADS, [teacher, plus, minus]), ("plain", PLAIN, [teacher])):
            floor = roofline(b, mean_ctx, nets)
            variants = [("engine", {})] if "engine" in stages else []
            variants += [("unfused", dict(fused=False))] if "unfused" in stages and b == 192 and mode == "ads" else []
            variants += [("eagerblocks", dict(compile_layers=False))] if "eagerblocks" in stages and b == 192 else []
            variants += [("wholerows", dict(row_piece=VOCAB))] if "wholerows" in stages and b == 192 else []
            variants += [("wholescan", dict(inverse_cdf=scan_whole_rows))] if "wholescan" in stages and b == 192 else []
            variants += [("hfprefill", dict(fused_prefill=False))] if "hfprefill" in stages and b == 192 else []
            # kernel layouts chosen by eager timing (host launches included), as before graph timing
            variants += [("launchtuned", dict(tune_timer=engine_kernels.launch_ms))] if "launchtuned" in stages else []
            variants += [("gemmtuned", dict(gemm_autotune=True))] if "gemmtuned" in stages else []
            variants += [("piecesoftmax", dict(softmax=engine_kernels.softmax_rows_torch))] if "piecesoftmax" in stages else []
            variants += [("unstacked", dict(stack_models=False))] if "unstacked" in stages and mode == "ads" else []
            variants += [("torchscore", dict(fd_score=engine_kernels.ads_fd_score_torch))] if "torchscore" in stages else []
            variants += [("ways16", dict(search_ways=16))] if "ways16" in stages else []
            mine = {}
            for name, kw in variants:
                r = time_engine(models, params, b, **kw)
                r["roofline_ms_per_step"] = 1e3 * floor
                r["pct_of_roofline"] = 100 * floor / (r["ms_per_step"] / 1e3)
                mine[name] = r
                record(f"{name} {mode}", f"{name}_{mode}" if name != "engine" else f"engine_{mode}", r)
            if "reference" in stages and b <= 192:
                r = time_hf(teacher, (plus, minus) if params.uses_proxy else None, params, b)
                record(f"hf-generate {mode}", f"reference_{mode}", r)
                if "engine" in mine:
                    e = mine["engine"]
                    ratio = dict(batch=b, end_to_end=e["tok_s"] / r["tok_s"], per_step=r["ms_per_step"] / e["ms_per_step"])
                    results.setdefault(f"speedup_{mode}", []).append(ratio)
                    save()
                    print(("speedup", mode, ratio), flush=True)
    if "longtail" in stages:
        budgets, prompts = longtail_workload(args.longtail_prompts, 7)
        lt = dict(budgets_mean=sum(budgets) / len(budgets), budgets_max=max(budgets),
                  note="lognormal(median 120, sigma 0.9) lengths capped at max new tokens, EOS forced there (budget)")
        # static batches run every step at the full batch, as a batch of a plain generate call does;
        # full_drain is continuous batching without the drain's smaller steps (the engine before them)
        tokens = {}
        for name, options in (("continuous", {}), ("full_drain", dict(drain_steps=0)),
                              ("static", dict(refill=False, drain_steps=0))):
            lt[name] = r = time_engine(models, ADS, 192, prompts=prompts, budgets=budgets, keep_tokens=True, **options)
            tokens[name] = r.pop("tokens")
            rows.append((f"longtail {name.replace('_', ' ')}", r))
            print(rows[-1], flush=True)
        lt["speedup"] = lt["continuous"]["tok_s"] / lt["static"]["tok_s"]
        lt["speedup_full_drain"] = lt["full_drain"]["tok_s"] / lt["static"]["tok_s"]
        # the drain's steps run other kernels (cuBLAS picks its GEMMs by row count; they are recorded from
        # the eager kernels, not the compiled ones), so logits can round differently there: how many
        # rows, and tokens up to each row's first difference, agree
        pairs = list(zip(tokens["continuous"], tokens["full_drain"]))
        prefix = [next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b))) for a, b in pairs]
        lt["drain_rows_equal"] = f"{sum(a == b for a, b in pairs)}/{len(pairs)}"
        lt["drain_tokens_before_first_difference"] = sum(prefix) / sum(len(b) for _, b in pairs)
        results["longtail_ads_192"] = lt
        save()
    if "bound" in stages:
        results["bound"] = bound(models, results)
        save()
    if "chunks" in stages:
        results["chunks_ads_192"] = chunks = time_chunks(models, *longtail_workload(2 * args.longtail_prompts, 8))
        save()
        for name in ("one_call", "call_per_chunk"):
            rows.append((f"chunks {name.replace('_', ' ')}", chunks[name]))
            print(rows[-1], flush=True)
    print(f"\n{'run':<20}{'batch':>6}{'ms/step':>9}{'decode tok/s':>14}{'e2e tok/s':>11}{'wall s':>8}{'prefill s':>10}"
          f"{'setup s':>9}{'peak GiB':>10}{'% roof':>8}")
    for name, r in rows:
        print(f"{name:<20}{r['batch']:>6}{r['ms_per_step']:>9.2f}{r['decode_tok_s']:>14.0f}{r['tok_s']:>11.0f}"
              f"{r['wall_s']:>8.1f}{r['prefill_s']:>10.2f}{r.get('setup_s', float('nan')):>9.1f}{r['peak_gib']:>10.1f}"
              f"{r.get('pct_of_roofline', float('nan')):>8.1f}")
    for mode in ("ads", "plain"):
        for s in results.get(f"speedup_{mode}", []):
            print(f"speedup {mode} batch {s['batch']}: {s['end_to_end']:.1f}x end to end, {s['per_step']:.1f}x per step")


if __name__ == "__main__":
    main()
