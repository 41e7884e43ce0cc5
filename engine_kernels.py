"""The engine's GPU kernels, each next to the torch code it replaces (its twin, which CPU runs and the
tests compare it with), and the tuning that picks each Triton kernel's layout. (Not named kernels.py:
transformers looks for a `kernels` package and would import that file in its place.)

- decode attention: a split-K Triton kernel over static slot caches (torch twin: masked attention);
  prefill attention through SDPA;
- a block's elementwise work: residual add + RMSNorm, rotary, SiLU(gate) x up (torch twins: the ops
  Hugging Face's Llama/Qwen2 modules run);
- sort-free top-k/top-p sampling over the full vocabulary: row reductions in pieces, a many-way search
  for the nucleus boundary (Triton: the mass above each candidate), inverse CDF in two levels; it
  draws the tokens of sampling.sample_from_scores.

Used by stack.py (the fused block stack) and engine.py.  Without Triton or a GPU the torch twins run.
"""
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from sampling import ads_score, fd_delta, filter_top_k_top_p

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU machines: the torch twins are used instead
    triton = None
HAVE_TRITON = triton is not None

SEARCH_WAYS = 16          # default thresholds tested per pass of the top-p search (the engine tunes it)
SEARCH_WAY_CHOICES = (4, 8, 16, 32)
SEARCH_BOUND_MIN = 1e-3   # smallest 1 - top_p for which the search starts from nucleus_lower_bound
ROW_PIECE = 2048          # default vocabulary entries per program in the sampler's row reductions
# prefill attention kernels, in order of preference.  cuDNN's is left out: with it the first prefill
# in a process took 1.3 s longer on an H200, and later ones were no faster
# (bench/results/h200_prefill_warmup_*_f1ad258.log)
PREFILL_BACKENDS = (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH)


# kernel tuning: the fastest layout of each Triton kernel depends on the GPU and the shapes

TUNED = {}               # kernel key -> config, filled by engine.Engine.tune() before the step is recorded
TUNED_BY = {}            # kernel key -> the timer's name that chose TUNED[key]
TUNED_MS = {}            # kernel key -> milliseconds TUNED[key] took (absent if no layout was timed)
TUNING_LOG = []          # what each tuning measured (benchmarks report it)
TUNE_REPS = 10


def gpu_ms(fn, reps=TUNE_REPS):
    """Mean GPU milliseconds of fn(), timed as the decode step runs it: reps calls recorded in one CUDA
    graph, replayed.  Timed eagerly instead (launch_ms), a kernel shorter than its launch from Python
    is measured by the launches: every decode attention layout then timed about the same (0.09-0.18 ms
    for layouts that take 0.05-0.11 ms in a graph), and the fastest was chosen by noise."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            fn()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / reps


def launch_ms(fn, reps=TUNE_REPS):
    """Mean milliseconds of fn() over reps back-to-back eager calls (CUDA events): the host's launches
    included, which for short kernels is most of it (the engine's tuning before graph timing)."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / reps


def tune(key, configs, run, timer=gpu_ms):
    """Time run(config) for each config (after one compiling run) and keep the fastest in TUNED[key],
    once per key and timer.  A config that fails to build (e.g. needs more shared memory than the GPU
    has) or to be timed, or whose output differs from the first config's, is skipped, so the result is
    never wrong, only slower (the first config when none could be timed)."""
    if key in TUNED and TUNED_BY.get(key) == timer.__name__:
        return
    want = run(configs[0]).float()
    times = {}
    for config in configs:
        try:
            if torch.allclose(run(config).float(), want, rtol=1e-2, atol=1e-3, equal_nan=True):
                times[config] = timer(lambda: run(config))
        except Exception:  # it cannot be built here, or not timed: another will do
            continue
    TUNED[key] = min(times, key=times.get) if times else configs[0]
    TUNED_BY[key] = timer.__name__
    TUNED_MS.pop(key, None)
    if times:
        TUNED_MS[key] = times[TUNED[key]]
    TUNING_LOG.append(dict(key=str(key), timer=timer.__name__, chose=str(TUNED[key]),
                           ms={str(c): round(t, 4) for c, t in times.items()}))


# attention

def prefill_attention(q, k, v, mask, scale, backends=PREFILL_BACKENDS):
    """Causal attention within left-padded prompts: q (n, heads, T, dim), k and v (n, kv_heads, T, dim);
    prompts of one length need no mask.  backends: the SDPA kernels allowed, in order of preference.
    The flash kernel takes grouped K/V as they are; for the others (the memory-efficient one is the
    kernel that takes a mask) K/V are expanded to every query head, a strided copy that took 4% of
    a bf16 prefill on the H200."""
    grouped = mask is None and flash_takes(q, backends)
    if not grouped:
        group = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    with sdpa_kernel(list(backends)):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=scale,
                                              enable_gqa=grouped)


def flash_takes(q, backends):
    """Whether SDPA's flash kernel is allowed and runs these queries (on CPU it always does; on CUDA
    in half precision on Ampere or later).  If it declines after all, SDPA's math kernel takes the
    grouped K/V: slower, never wrong."""
    if SDPBackend.FLASH_ATTENTION not in backends:
        return False
    if not q.is_cuda:
        return True
    return q.dtype in (torch.float16, torch.bfloat16) and torch.cuda.get_device_capability(q.device) >= (8, 0)


def decode_attention(q, k_cache, v_cache, lengths, scale, rows=None):
    """One query per row against the first lengths[b] cached positions of cache row rows[b] (of row b
    when rows is None).  q: (n, heads, dim)."""
    if q.is_cuda and triton is not None and triton_head_dim(q.shape[-1]):
        return decode_attention_triton(q, k_cache, v_cache, lengths, scale, rows=rows)
    return decode_attention_torch(q, k_cache, v_cache, lengths, scale, rows)


def triton_head_dim(d):
    return d >= 16 and d & (d - 1) == 0


def decode_attention_torch(q, k_cache, v_cache, lengths, scale, rows=None):
    # grouped query heads share a KV head: fold them into the query axis instead of repeating K/V
    n, heads, dim = q.shape
    kv_heads = k_cache.shape[1]
    # on CPU read only the filled width; on GPU (captured in a graph) the whole cache, masked
    width = k_cache.shape[2] if q.is_cuda or torch.compiler.is_compiling() else int(lengths.max())
    rows = slice(0, n) if rows is None else rows  # a gather of the filled width only, not of whole slots
    k, v = k_cache[rows, :, :width].float(), v_cache[rows, :, :width].float()
    qg = q.float().view(n, kv_heads, heads // kv_heads, dim)
    s = qg @ k.transpose(-1, -2) * scale
    past_end = torch.arange(width, device=q.device) >= lengths[:, None, None, None]
    probs = s.masked_fill(past_end, float("-inf")).softmax(-1)
    return (probs @ v).reshape(n, heads, dim).to(q.dtype)


# (keys per program, keys per inner iteration, warps, pipeline stages) of the split-K decode kernel
ATTENTION_DEFAULT = (128, 64, 4, 3)
ATTENTION_CONFIGS = [ATTENTION_DEFAULT, (64, 64, 4, 3), (256, 64, 4, 3), (256, 128, 8, 3), (128, 32, 4, 3),
                     (128, 128, 8, 2), (512, 64, 4, 3), (256, 64, 8, 4), (32, 32, 4, 2), (1024, 64, 4, 3),
                     (512, 64, 8, 3), (512, 128, 8, 3), (1024, 64, 8, 3), (1024, 32, 4, 4), (2048, 64, 4, 3),
                     (4096, 64, 4, 3)]   # a split as long as the cache: no merge


def attention_key(q, k_cache):
    """TUNED's key of a decode attention call."""
    return ("attention", *q.shape, *k_cache.shape[1:], q.dtype)


def decode_attention_triton(q, k_cache, v_cache, lengths, scale, config=None, rows=None):
    """Flash-decoding: programs over (row, kv head, key split) each read only filled positions and
    keep a partial softmax; the splits are merged here, unless the layout's split covers the whole
    cache (one split a row), whose programs write the output themselves.  Graph-safe: lengths (and
    rows, the cache row of each query row, if given) stay on the device.  config: (keys per program,
    keys per iteration, warps, stages); default: the tuned one."""
    q = q.contiguous()  # the kernel assumes unit stride along dim
    n, heads, dim = q.shape
    kv_heads, max_len = k_cache.shape[1], k_cache.shape[2]
    group = heads // kv_heads
    padded = max(16, triton.next_power_of_2(group))  # tl.dot needs at least 16 rows
    split, block, warps, stages = config or TUNED.get(attention_key(q, k_cache), ATTENTION_DEFAULT)
    splits = triton.cdiv(max_len, split)
    out = torch.empty_like(q)
    # partial results of the real query heads only (7 of the 16 rows a 7-head group is padded to);
    # with one split there are none (the kernel does not touch what it is passed for them)
    acc, top, total = (out, out, out) if splits == 1 else (
        torch.empty((n, kv_heads, splits, group, dim), dtype=torch.float32, device=q.device),
        *(torch.empty((n, kv_heads, splits, group), dtype=torch.float32, device=q.device) for _ in range(2)))
    _split_decode_attention[(n, kv_heads, splits)](
        q, k_cache, v_cache, lengths, lengths if rows is None else rows, acc, top, total, out,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), out.stride(0), out.stride(1), scale,
        GROUP=group, PADDED=padded, DIM=dim, BLOCK_N=block, SPLIT=split,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32", DIRECT=splits == 1, MAPPED=rows is not None,
        num_warps=warps, num_stages=stages)
    if splits > 1:
        _merge_splits[(n, kv_heads)](acc, top, total, lengths, out, out.stride(0), out.stride(1),
                                     SPLITS=splits, SPLIT=split, GROUP=group, PADDED=padded, DIM=dim)
    return out


if triton is not None:
    @triton.jit
    def _split_decode_attention(Q, K, V, Lens, Rows, Acc, Top, Total, Out,
                                sqb, sqh, skb, skh, skn, svb, svh, svn, sob, soh, scale: tl.constexpr,
                                GROUP: tl.constexpr, PADDED: tl.constexpr, DIM: tl.constexpr,
                                BLOCK_N: tl.constexpr, SPLIT: tl.constexpr, PRECISION: tl.constexpr,
                                DIRECT: tl.constexpr, MAPPED: tl.constexpr):
        b, h, s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        row = b.to(tl.int64)
        if MAPPED:  # a step of fewer rows than the cache has slots: query row b reads cache row Rows[b]
            row = tl.load(Rows + b).to(tl.int64)
        start = s * SPLIT
        end = tl.minimum(start + SPLIT, tl.load(Lens + b).to(tl.int32))
        g = tl.arange(0, PADDED)
        d = tl.arange(0, DIM)
        real = g < GROUP
        q = tl.load(Q + b * sqb + (h * GROUP + g)[:, None] * sqh + d[None, :], mask=real[:, None], other=0.0)
        m = tl.full([PADDED], float("-inf"), tl.float32)
        l = tl.zeros([PADDED], tl.float32)
        acc = tl.zeros([PADDED, DIM], tl.float32)
        k_row = K + row * skb + h * skh
        v_row = V + row * svb + h * svh
        # the loop stops at the row's length: a split past it reads and computes nothing (the cache is
        # sized for the longest row, so most of it is empty for most of a decode)
        for n0 in range(start, end, BLOCK_N):
            n = n0 + tl.arange(0, BLOCK_N)
            live = n < end
            k = tl.load(k_row + n[:, None] * skn + d[None, :], mask=live[:, None], other=0.0)
            v = tl.load(v_row + n[:, None] * svn + d[None, :], mask=live[:, None], other=0.0)
            qk = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
            qk = tl.where(live[None, :], qk, float("-inf"))
            m_new = tl.maximum(m, tl.max(qk, 1))
            p = tl.exp(qk - m_new[:, None])
            alpha = tl.exp(m - m_new)
            l = l * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            m = m_new
        if DIRECT:  # the only split: no partials to merge
            tl.store(Out + b * sob + (h * GROUP + g)[:, None] * soh + d[None, :],
                     (acc / l[:, None]).to(Out.dtype.element_ty), mask=real[:, None])
        else:
            o = (b * tl.num_programs(1) + h) * tl.num_programs(2) + s
            tl.store(Acc + (o * GROUP + g)[:, None] * DIM + d[None, :], acc, mask=real[:, None])
            tl.store(Top + o * GROUP + g, m, mask=real)
            tl.store(Total + o * GROUP + g, l, mask=real)

    @triton.jit
    def _merge_splits(Acc, Top, Total, Lens, Out, sob, soh, SPLITS: tl.constexpr, SPLIT: tl.constexpr,
                      GROUP: tl.constexpr, PADDED: tl.constexpr, DIM: tl.constexpr):
        """Combine the partial softmaxes of the key splits that hold a key of the row (a split past
        the row's length wrote -inf and zeros, and is not read)."""
        b, h = tl.program_id(0), tl.program_id(1)
        used = tl.cdiv(tl.load(Lens + b).to(tl.int32), SPLIT)
        first = (b * tl.num_programs(1) + h) * SPLITS
        g = tl.arange(0, PADDED)
        d = tl.arange(0, DIM)
        real = g < GROUP
        top = tl.full([PADDED], float("-inf"), tl.float32)
        for s in range(0, used):
            top = tl.maximum(top, tl.load(Top + (first + s) * GROUP + g, mask=real, other=0.0))
        total = tl.zeros([PADDED], tl.float32)
        acc = tl.zeros([PADDED, DIM], tl.float32)
        for s in range(0, used):
            w = tl.exp(tl.load(Top + (first + s) * GROUP + g, mask=real, other=0.0) - top)
            total += w * tl.load(Total + (first + s) * GROUP + g, mask=real, other=1.0)
            acc += w[:, None] * tl.load(Acc + ((first + s) * GROUP + g)[:, None] * DIM + d[None, :],
                                        mask=real[:, None], other=0.0)
        out = acc / total[:, None]
        tl.store(Out + b * sob + (h * GROUP + g)[:, None] * soh + d[None, :], out.to(Out.dtype.element_ty),
                 mask=real[:, None])


# a block's elementwise work

def rms_norm(x, weight, eps):
    """Hugging Face's Llama/Qwen2 RMSNorm with a per-model weight: x (S, B, H), weight (S, H)."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight[:, None] * h.to(x.dtype)


def rotate(x, cos, sin):
    """Rotary embedding as Hugging Face applies it: x * cos + rotate_half(x) * sin."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


# The elementwise work of a block (residual adds, norms, rotary, SiLU) runs in the Triton kernels
# below on GPU outside torch.compile: in prefill, which is eager (as eager torch ops that work took
# a third of a prefill's GPU time, bench/README.md), in the decode step's first norm, and in eager
# decode blocks (compile_layers off, or a compiler failure).  Inside the compiled decode block the
# torch ops are kept, for Inductor to fuse with their neighbours.

def on_triton(x):
    return x.is_cuda and triton is not None and not torch.compiler.is_compiling()


def add_norm(x, y, weight, eps):
    """(x + y, its RMSNorm) for x, y (S, N, H) and per-model weights (S, H); y None: x and its norm."""
    if on_triton(x):
        return add_norm_triton(x, y, weight, eps)
    x = x if y is None else x + y
    return x, rms_norm(x, weight, eps)


def rotate_qk(qkv, cos, sin, heads, kv_heads):
    """q, k, v of qkv (S, N, heads + 2 kv_heads, dim) with the rotary embedding applied to q and k
    (cos, sin: (N, dim)); on GPU q and k are rotated in place."""
    q, k, v = qkv.split([heads, kv_heads, kv_heads], dim=2)
    if on_triton(qkv) and triton_head_dim(qkv.shape[-1]):
        rotate_qk_triton(qkv, cos, sin, heads + kv_heads)
        return q, k, v
    cos, sin = cos[None, :, None], sin[None, :, None]
    return rotate(q, cos, sin), rotate(k, cos, sin), v


def gated(gate_up, act):
    """act(gate) * up for gate_up = [gate | up] along the last axis."""
    if act is F.silu and on_triton(gate_up):
        return silu_mul_triton(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    return act(gate) * up


def add_norm_triton(x, y, weight, eps):
    x, weight = x.contiguous(), weight.contiguous()
    S, N, H = x.shape
    out, h = (x, torch.empty_like(x)) if y is None else (torch.empty_like(x), torch.empty_like(x))
    block = triton.next_power_of_2(H)
    _add_rms_norm[(S * N,)](x, x if y is None else y.contiguous(), weight, out, h, N, H, eps,
                            HAS_Y=y is not None, BLOCK=block, num_warps=min(16, max(1, block // 256)))
    return out, h


def rotate_qk_triton(qkv, cos, sin, rotated_heads):
    S, N, width, dim = qkv.shape
    assert qkv.is_contiguous()
    _rotary[(S * N,)](qkv, cos.contiguous(), sin.contiguous(), N, rotated_heads, width * dim,
                      HALF=dim // 2, HEADS=triton.next_power_of_2(rotated_heads))


def silu_mul_triton(gate_up, block=1024):
    gate_up = gate_up.contiguous()
    inter = gate_up.shape[-1] // 2
    out = gate_up.new_empty((*gate_up.shape[:-1], inter))
    _silu_mul[(out.numel() // inter, triton.cdiv(inter, block))](gate_up, out, inter, BLOCK=block)
    return out


if triton is not None:
    @triton.jit
    def _add_rms_norm(X, Y, W, Xout, Hout, rows_per_model, width, eps, HAS_Y: tl.constexpr, BLOCK: tl.constexpr):
        """Row r of (S N, H): Xout = X + Y rounded to X's dtype (torch's add), Hout = W[r // N] *
        RMSNorm(Xout), the norm in float32 and rounded before the weight (Hugging Face's order)."""
        r = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        live = cols < width
        x = tl.load(X + r * width + cols, mask=live, other=0.0)
        if HAS_Y:
            y = tl.load(Y + r * width + cols, mask=live, other=0.0)
            x = (x.to(tl.float32) + y.to(tl.float32)).to(Xout.dtype.element_ty)
            tl.store(Xout + r * width + cols, x, mask=live)
        xf = x.to(tl.float32)
        h = (xf * tl.rsqrt(tl.sum(xf * xf, axis=0) / width + eps)).to(Hout.dtype.element_ty).to(tl.float32)
        w = tl.load(W + (r // rows_per_model) * width + cols, mask=live, other=0.0).to(tl.float32)
        tl.store(Hout + r * width + cols, (w * h).to(Hout.dtype.element_ty), mask=live)

    @triton.jit
    def _rotary(QKV, Cos, Sin, rows_per_model, heads, row_width, HALF: tl.constexpr, HEADS: tl.constexpr):
        """In place on the first `heads` heads of row r of QKV (S N, row_width): x * cos +
        rotate_half(x) * sin in float32, rounded once, as Inductor's fused rotary in the decode
        block does; torch's eager ops round each product too, and a third of the bf16 results
        differ from theirs, by at most 0.031 (bench/results/h200_engine_largest_batch_longtail_9859468.json, check)."""
        r = tl.program_id(0).to(tl.int64)
        t = r % rows_per_model
        hh = tl.arange(0, HEADS)[:, None]
        d = tl.arange(0, HALF)[None, :]
        live = hh < heads
        at = QKV + r * row_width + hh * (2 * HALF) + d
        x1 = tl.load(at, mask=live, other=0.0).to(tl.float32)
        x2 = tl.load(at + HALF, mask=live, other=0.0).to(tl.float32)
        c1 = tl.load(Cos + t * 2 * HALF + d).to(tl.float32)
        c2 = tl.load(Cos + t * 2 * HALF + HALF + d).to(tl.float32)
        s1 = tl.load(Sin + t * 2 * HALF + d).to(tl.float32)
        s2 = tl.load(Sin + t * 2 * HALF + HALF + d).to(tl.float32)
        tl.store(at, (x1 * c1 - x2 * s1).to(QKV.dtype.element_ty), mask=live)
        tl.store(at + HALF, (x2 * c2 + x1 * s2).to(QKV.dtype.element_ty), mask=live)

    @triton.jit
    def _silu_mul(GU, Out, inter, BLOCK: tl.constexpr):
        """Out[r] = silu(gate) * up for row r of GU = [gate | up], silu rounded to the dtype first
        (torch's act_fn(gate) * up)."""
        r = tl.program_id(0).to(tl.int64)
        c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        live = c < inter
        dt = Out.dtype.element_ty
        g = tl.load(GU + r * 2 * inter + c, mask=live, other=0.0).to(tl.float32)
        u = tl.load(GU + r * 2 * inter + inter + c, mask=live, other=0.0).to(tl.float32)
        a = (g / (1.0 + tl.exp(-g))).to(dt).to(tl.float32)
        tl.store(Out + r * inter + c, (a * u).to(dt), mask=live)


# sort-free nucleus sampling

# (elements per program, elements per iteration, warps, column loads) of the top-p search kernel
MASS_DEFAULT = (4096, 256, 8, False)
MASS_CONFIGS = [MASS_DEFAULT, (4096, 256, 8, True), (2048, 512, 4, False), (2048, 512, 4, True),
                (1024, 1024, 8, False), (1024, 1024, 8, True), (8192, 512, 8, True), (1024, 256, 4, False),
                (2048, 256, 4, True), (4096, 512, 8, True), (2048, 256, 2, True), (1024, 512, 4, True)]


def mass_key(probs, ways):
    """TUNED's key of a top-p search pass over probs testing `ways` thresholds."""
    return ("mass", *probs.shape, ways)


def mass_above(probs, cand, config=None):
    """(B, W) sums of the probabilities whose float32 bit pattern exceeds each candidate.
    config: one of MASS_CONFIGS; default: the tuned one."""
    if probs.is_cuda and triton is not None:
        chunk, sub, warps, column = config or TUNED.get(mass_key(probs, cand.shape[1]), MASS_DEFAULT)
        chunks = triton.cdiv(probs.shape[1], chunk)
        part = torch.empty((probs.shape[0], chunks, cand.shape[1]), dtype=torch.float32, device=probs.device)
        _mass_above[(probs.shape[0], chunks)](probs, cand.contiguous(), part, probs.shape[1], probs.stride(0),
                                             WAYS=cand.shape[1], CHUNK=chunk, SUB=sub, COLUMN=column,
                                             num_warps=warps)
        return part.sum(1)
    bits = probs.view(torch.int32)
    return torch.stack([torch.where(bits > c[:, None], probs, 0.0).sum(-1) for c in cand.unbind(-1)], -1)


if triton is not None:
    @triton.jit
    def _mass_above(P, Cand, Out, vocab, stride, WAYS: tl.constexpr, CHUNK: tl.constexpr, SUB: tl.constexpr,
                    COLUMN: tl.constexpr = False):
        """Out[row, chunk, j] = sum of P[row, i] over this chunk's i with bits(P) > Cand[row, j].
        COLUMN loads each sub-block as a (SUB, 1) column, so the broadcast against the candidates
        needs no change of register layout (which of the two is faster depends on the GPU)."""
        row, chunk = tl.program_id(0), tl.program_id(1)
        cand = tl.load(Cand + row * WAYS + tl.arange(0, WAYS))[None, :]
        # reduce across threads once at the end, not per sub-block
        sums = tl.zeros([SUB, WAYS], tl.float32)
        for i in tl.static_range(0, CHUNK, SUB):
            if COLUMN:
                idx = chunk * CHUNK + i + tl.arange(0, SUB)[:, None]
                p = tl.load(P + row.to(tl.int64) * stride + idx, mask=idx < vocab, other=0.0)
            else:
                idx = chunk * CHUNK + i + tl.arange(0, SUB)
                p = tl.load(P + row.to(tl.int64) * stride + idx, mask=idx < vocab, other=0.0)[:, None]
            sums += tl.where(p.to(tl.int32, bitcast=True) > cand, p, 0.0)
        tl.store(Out + (row * tl.num_programs(1) + chunk) * WAYS + tl.arange(0, WAYS), tl.sum(sums, 0))


def pieces(x, fill, piece=ROW_PIECE):
    """(B, V) -> (B, P, piece), the tail padded with fill, so a reduction over each row runs as
    B x P programs and then B small ones: compiled as one program per row, the softmax over 192 rows
    of 151,665 took 0.77 ms on an H200, where reading its input takes 0.03 ms."""
    width = min(piece, x.shape[-1])
    n = -(-x.shape[-1] // width)
    return F.pad(x, (0, n * width - x.shape[-1]), value=fill).view(x.shape[0], n, width)


def row_max(x, fill=float("-inf"), piece=ROW_PIECE):
    return pieces(x, fill, piece).amax(-1).amax(-1, keepdim=True)


def row_sum(x, piece=ROW_PIECE):
    return pieces(x, 0.0, piece).sum(-1).sum(-1, keepdim=True)


def softmax_rows(scores, piece=ROW_PIECE):
    """softmax over the vocabulary in float32: two Triton passes on GPU (softmax_rows_triton), else
    softmax_rows_torch."""
    if scores.is_cuda and triton is not None:
        return softmax_rows_triton(scores.float())
    return softmax_rows_torch(scores, piece)


def softmax_rows_torch(scores, piece=ROW_PIECE):
    """softmax over the vocabulary in float32, with both row reductions split into pieces."""
    s = scores.float()
    e = torch.exp(s - row_max(s, piece=piece))
    return e / row_sum(e, piece)


SOFTMAX_CHUNK = 4096      # vocabulary entries per program of the softmax's two passes


def softmax_rows_triton(s, chunk=SOFTMAX_CHUNK):
    """softmax of float32 rows s (B, V) in two passes of B x ceil(V / chunk) programs: each chunk's
    max and sum of exponentials, combined per row here, then exp(s - max) / sum written out.  Left
    to Inductor, the second pass fused with the top-p search's first candidates into one kernel that
    took 0.27 ms for 192 rows of 151,665 (bench/results/h200_attention_to_row_length_73bd4a3.log), where
    its memory traffic takes 0.05 ms."""
    s = s.contiguous()
    B, V = s.shape
    chunks = triton.cdiv(V, chunk)
    part = torch.empty((2, B, chunks), dtype=torch.float32, device=s.device)
    top, total = row_max_sumexp(s, chunk)
    probs = torch.empty_like(s)
    _exp_normalise[(B, chunks)](s, top, total, probs, V, CHUNK=chunk, BLOCK=1024, num_warps=8)
    return probs


def row_max_sumexp(x, chunk=SOFTMAX_CHUNK):
    """Per row of x (B, V; any float dtype, rows may be strided): its max and the sum of exp(x -
    max), each (B, 1) float32, from B x ceil(V / chunk) programs and a small combine."""
    B, V = x.shape
    assert x.stride(1) == 1
    chunks = triton.cdiv(V, chunk)
    part = torch.empty((2, B, chunks), dtype=torch.float32, device=x.device)
    _chunk_max_sumexp[(B, chunks)](x, part, V, x.stride(0), chunks, B * chunks, CHUNK=chunk, BLOCK=1024, num_warps=8)
    top = part[0].amax(-1, keepdim=True)
    return top, (part[1] * torch.exp(part[0] - top)).sum(-1, keepdim=True)


def ads_fd_score(z_teacher, z_plus, z_minus, tau, lam, eps, out=None):
    """sampling.ads_score(z_teacher, sampling.fd_delta(z_plus, z_minus, eps), tau, lam) for logits
    (B, V) (z_plus, z_minus None: lam = 0), written into out if given: on GPU the three
    log-softmaxes' row statistics in one Triton pass each and the score in one more, with torch's
    order of operations; left to Inductor they took 0.40 ms per step for 192 rows of 151,665, whose
    memory traffic takes about 0.12 ms (bench/results/h200_attention_to_row_length_73bd4a3.log)."""
    if z_teacher.is_cuda and triton is not None:
        if out is None:
            return ads_fd_score_triton(z_teacher, z_plus, z_minus, tau, lam, eps)
        fd_score_into(z_teacher, z_plus, z_minus, tau, lam, eps, out)
        return out
    return ads_fd_score_torch(z_teacher, z_plus, z_minus, tau, lam, eps, out)


def ads_fd_score_torch(z_teacher, z_plus, z_minus, tau, lam, eps, out=None):
    delta = fd_delta(z_plus, z_minus, eps) if z_plus is not None and lam != 0 else None
    score = ads_score(z_teacher, delta, tau, lam)
    return score if out is None else out.copy_(score)


@torch.library.custom_op("ads::fd_score_into", mutates_args=("out",))
def fd_score_into(z_teacher: torch.Tensor, z_plus: Optional[torch.Tensor], z_minus: Optional[torch.Tensor], tau: float,
                  lam: float, eps: float, out: torch.Tensor) -> None:
    """ads_fd_score_triton straight into out: a custom op that says it writes out, so the compiled
    score neither copies its result into the engine's score buffer nor clones that buffer."""
    ads_fd_score_triton(z_teacher, z_plus, z_minus, tau, lam, eps, out)


@fd_score_into.register_fake
def _(z_teacher, z_plus, z_minus, tau, lam, eps, out):
    return None


def ads_fd_score_triton(z_teacher, z_plus, z_minus, tau, lam, eps, out=None):
    proxies = z_plus is not None and lam != 0
    B, V = z_teacher.shape
    stats = [row_max_sumexp(z) for z in ((z_teacher, z_plus, z_minus) if proxies else (z_teacher,))]
    # log_softmax(z) = (z - max) - log(sum): per model, its max and the log of its sum
    top = torch.cat([t for t, _ in stats] + [torch.zeros_like(stats[0][0])] * (3 - len(stats)), -1).contiguous()
    log_total = torch.cat([torch.log(s) for _, s in stats] + [torch.zeros_like(stats[0][1])] * (3 - len(stats)),
                          -1).contiguous()
    plus, minus = (z_plus, z_minus) if proxies else (z_teacher, z_teacher)
    out = torch.empty((B, V), dtype=torch.float32, device=z_teacher.device) if out is None else out
    block = 2048
    _fd_score[(B, triton.cdiv(V, block))](z_teacher, plus, minus, top, log_total, out, V, z_teacher.stride(0),
                                         plus.stride(0), minus.stride(0), out.stride(0), 1.0 / tau, lam, 2 * eps,
                                         PROXIES=proxies, BLOCK=block, num_warps=8)
    return out


if triton is not None:
    @triton.jit
    def _fd_score(ZT, ZP, ZM, Top, LogTotal, Out, vocab, st, sp, sm, so, inv_tau, lam, two_eps,
                  PROXIES: tl.constexpr, BLOCK: tl.constexpr):
        """Out = log_softmax(ZT) / tau (+ lam (log_softmax(ZP) - log_softmax(ZM)) / (2 eps)) for one
        row block, each log_softmax as (z - max) - log(sum), in float32."""
        row, blk = tl.program_id(0), tl.program_id(1)
        idx = blk * BLOCK + tl.arange(0, BLOCK)
        live = idx < vocab
        r = row.to(tl.int64)
        zt = tl.load(ZT + r * st + idx, mask=live, other=0.0).to(tl.float32)
        score = ((zt - tl.load(Top + row * 3)) - tl.load(LogTotal + row * 3)) * inv_tau
        if PROXIES:
            zp = tl.load(ZP + r * sp + idx, mask=live, other=0.0).to(tl.float32)
            zm = tl.load(ZM + r * sm + idx, mask=live, other=0.0).to(tl.float32)
            lp = (zp - tl.load(Top + row * 3 + 1)) - tl.load(LogTotal + row * 3 + 1)
            lm = (zm - tl.load(Top + row * 3 + 2)) - tl.load(LogTotal + row * 3 + 2)
            score = score + lam * ((lp - lm) / two_eps)
        tl.store(Out + r * so + idx, score, mask=live)

    @triton.jit
    def _chunk_max_sumexp(S, Part, vocab, stride, chunks, plane, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
        """Part[0, row, chunk] = max of the chunk's entries, Part[1, row, chunk] = sum of exp(entry -
        that max); each lane keeps its own running pair and the lanes are combined once at the end."""
        row, chunk = tl.program_id(0), tl.program_id(1)
        base = S + row.to(tl.int64) * stride
        m = tl.full([BLOCK], float("-inf"), tl.float32)
        l = tl.zeros([BLOCK], tl.float32)
        for i in tl.static_range(0, CHUNK, BLOCK):
            idx = chunk * CHUNK + i + tl.arange(0, BLOCK)
            x = tl.load(base + idx, mask=idx < vocab, other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m, x)
            seen = m_new > float("-inf")  # a lane that has met only -inf adds nothing (and no NaN)
            l = tl.where(seen, l * tl.exp(m - m_new) + tl.exp(x - m_new), 0.0)
            m = m_new
        top = tl.max(m, 0)
        total = tl.sum(tl.where(m > float("-inf"), l * tl.exp(m - top), 0.0), 0)
        tl.store(Part + row * chunks + chunk, top)
        tl.store(Part + plane + row * chunks + chunk, total)

    @triton.jit
    def _exp_normalise(S, Top, Total, P, vocab, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
        row, chunk = tl.program_id(0), tl.program_id(1)
        top = tl.load(Top + row)
        total = tl.load(Total + row)
        for i in tl.static_range(0, CHUNK, BLOCK):
            idx = chunk * CHUNK + i + tl.arange(0, BLOCK)
            live = idx < vocab
            x = tl.load(S + row.to(tl.int64) * vocab + idx, mask=live, other=float("-inf"))
            tl.store(P + row.to(tl.int64) * vocab + idx, tl.exp(x - top) / total, mask=live)


def bound_fraction(top_p, vocab):
    """c = (1 - top_p) / (2 vocab): entries at or below c times a row's total hold at most half of
    the (1 - top_p) share outside the nucleus, so the mass above c times the total is well over the
    target.  None where 1 - top_p is too small for that margin to dwarf float32 rounding."""
    return None if 1.0 - top_p < SEARCH_BOUND_MIN else (1.0 - top_p) / (2 * vocab)


def nucleus_lower_bound(total, top_p, vocab):
    """A float32 bit pattern below the nucleus floor of rows of `vocab` probabilities summing to
    total (B, 1): bound_fraction times the total, or 0."""
    c = bound_fraction(top_p, vocab)
    return torch.zeros_like(total, dtype=torch.int32) if c is None else (c * total).view(torch.int32)


def search_passes(ways, top_p, vocab):
    """Passes of a `ways`-way search that close the bracket (nucleus_lower_bound, row max]: for
    normal floats, bits(x) - bits(c x) <= (ceil(log2(1 / c)) + 1) * 2**23."""
    c = bound_fraction(top_p, vocab)
    span = 2 ** 31 if c is None else (math.ceil(-math.log2(c)) + 1) << 23
    passes = 0
    while ways ** passes < span:
        passes += 1
    return passes


def tune_search(probs, top_p, timer=gpu_ms, choices=SEARCH_WAY_CHOICES):
    """The top-p search's thresholds per pass for rows like probs on this GPU, among choices: each
    choice's pass layout is tuned, and the fewest milliseconds per search (passes x a pass) wins.
    On an H200 a 16-way pass is bound by its compares, not by reading the row."""
    key = ("search", *probs.shape, top_p, tuple(choices))
    if key in TUNED and TUNED_BY.get(key) == timer.__name__:
        return TUNED[key]
    per_search = {}
    for ways in choices:
        cand = probs.view(torch.int32)[:, :ways].sort(-1).values
        tune(mass_key(probs, ways), MASS_CONFIGS, lambda c: mass_above(probs, cand, c), timer)
        if mass_key(probs, ways) in TUNED_MS:
            per_search[ways] = search_passes(ways, top_p, probs.shape[-1]) * TUNED_MS[mass_key(probs, ways)]
    untimed = SEARCH_WAYS if SEARCH_WAYS in choices else choices[0]  # a choice asked for is kept
    TUNED[key] = min(per_search, key=per_search.get) if per_search else untimed
    TUNED_BY[key] = timer.__name__
    TUNING_LOG.append(dict(key=str(key), timer=timer.__name__, chose=str(TUNED[key]),
                           ms={str(w): round(t, 4) for w, t in per_search.items()}))
    return TUNED[key]


def nucleus_floor(probs, top_p, piece=ROW_PIECE, ways=SEARCH_WAYS):
    """Bit pattern `lo` such that the nucleus is exactly {i : bits(probs[i]) > lo}.

    A token is in the nucleus when the mass of strictly more probable tokens is < top_p * total
    (sampling.filter_top_k_top_p); that mass only grows as the threshold falls (also as rounded:
    each addition is monotone), and non-negative float32 values order like their bit patterns, so a
    `ways`-way search over the patterns between nucleus_lower_bound and the row's max finds the
    exact boundary in search_passes passes over the row, without sorting.  More ways are fewer
    passes of more work each; the engine times each choice on its GPU (SEARCH_WAY_CHOICES)."""
    total = row_sum(probs, piece)
    target = top_p * total
    lo = nucleus_lower_bound(total, top_p, probs.shape[-1])          # mass above it is >= target
    hi = row_max(probs.view(torch.int32), 0, piece)                  # mass above the max is 0
    steps = torch.arange(1, ways + 1, dtype=torch.int32, device=probs.device)
    for _ in range(search_passes(ways, top_p, probs.shape[-1])):
        step = (hi - lo + ways - 1) // ways
        cand = torch.minimum(lo + step * steps, hi)
        inside = mass_above(probs, cand) < target
        hi = torch.where(inside, cand, hi).amin(-1, keepdim=True)
        lo = torch.where(inside, lo, cand).amax(-1, keepdim=True)
    return lo


def nucleus_bounds(scores, top_k=0, top_p=1.0, piece=ROW_PIECE, softmax=softmax_rows, ways=SEARCH_WAYS):
    """(softmax(scores) with the tokens outside top-k zeroed, the nucleus floor or None for top_p
    1): the nucleus is the entries above the floor (keep_above).  Row reductions over piece-wide
    pieces; softmax: softmax_rows, or softmax_rows_torch (a benchmark's variant); ways: the top-p
    search's thresholds per pass."""
    probs = filter_top_k_top_p(softmax(scores, piece), top_k, 1.0)
    return probs, (nucleus_floor(probs, top_p, piece, ways) if top_p < 1.0 else None)


def keep_above(probs, floor):
    """probs with the entries at or below the floor (a float32 bit pattern per row) zeroed."""
    return probs if floor is None else torch.where(probs.view(torch.int32) > floor, probs, 0.0)


def nucleus_probs(scores, top_k=0, top_p=1.0, piece=ROW_PIECE, softmax=softmax_rows, ways=SEARCH_WAYS):
    """softmax(scores) with the tokens outside top-k and the nucleus zeroed (see nucleus_bounds)."""
    return keep_above(*nucleus_bounds(scores, top_k, top_p, piece, softmax, ways))


def first_positive_from(x, start):
    """Per row of x (B, W), the first index >= start (B, 1) where x > 0; past the last one, that last
    one.  Rows without any get -1."""
    idx = torch.arange(x.shape[-1], device=x.device)
    after = torch.where((x > 0) & (idx >= start), idx, x.shape[-1]).amin(-1, keepdim=True)
    return torch.where(after < x.shape[-1], after, torch.where(x > 0, idx, -1).amax(-1, keepdim=True))


def inverse_cdf(probs, u, piece=ROW_PIECE):
    """Per row, the first index whose running sum of probs reaches u times the row's total, in
    vocabulary order, summed in two levels: over piece-wide pieces, then inside the one piece
    that holds the target (one scan over the 151k-wide rows took 0.36 ms per step on an H200).
    A rounded sum can stop short of the target, or (a GPU scan adds in a tree) dip where a zero is
    added; either way the count is moved to the next positive entry, or the last one, so a token of
    zero probability is never drawn."""
    B, V = probs.shape
    width = min(piece, V)
    n = -(-V // width)
    sums = torch.cat([probs[:, :(n - 1) * width].reshape(B, n - 1, width).sum(-1),
                      probs[:, (n - 1) * width:].sum(-1, keepdim=True)], -1)
    piece_cdf = sums.cumsum(-1)
    target = u[:, None] * piece_cdf[:, -1:]
    j = first_positive_from(sums, (piece_cdf < target).sum(-1, keepdim=True)).clamp(min=0)
    before = torch.where(j > 0, piece_cdf.gather(1, (j - 1).clamp(min=0)), 0.0)
    cols = j * width + torch.arange(width, device=probs.device)
    inside = torch.where(cols < V, probs.gather(1, cols.clamp(max=V - 1)), 0.0)
    i = first_positive_from(inside, (inside.cumsum(-1) < target - before).sum(-1, keepdim=True))
    return (j * width + i).clamp(0, V - 1).squeeze(-1)


def sample_tokens(scores, u, top_k=0, top_p=1.0, piece=ROW_PIECE):
    """softmax(scores) -> top-k -> top-p -> inverse-CDF in vocabulary order with one uniform per row:
    sampling.sample_from_scores without its sort (the engine runs the same two parts compiled,
    engine.Engine.pick).  piece: the width of the row reductions' pieces."""
    return inverse_cdf(nucleus_probs(scores, top_k, top_p, piece), u, piece)
