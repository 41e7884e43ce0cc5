"""A fast ADS decode engine: static KV slots, one CUDA graph per decode step, continuous batching.

Same tokens as sampling.generate_reference (the noise is keyed on (seed, prompt index, position),
so neither the batch a row lands in nor its slot changes its sample), at a fraction of the cost:
- every model keeps its K/V in a static (slots, kv_heads, max_len, head_dim) cache per layer, written
  and read by an attention function registered with transformers' AttentionInterface, so the
  Hugging Face model classes run unchanged and attention reads only the filled part of each row;
- decode and prefill run Llama/Qwen2-form models through a Stack: per block, q/k/v and gate/up are
  one weight each and the two proxies are stacked, so a proxy block is four batched matmuls for both
  (the weights are re-laid in place, same values; other architectures use the Hugging Face modules);
  prefill's residual adds, norms, rotary and SiLU run in Triton kernels on GPU, one pass each;
- one decode step (teacher + both proxies + ADS score + sort-free top-k/top-p sampling + EOS and
  budget bookkeeping) is one CUDA graph replay, with each block, the score and the sampler fused by
  torch.compile while the graph is recorded; the host looks at the rows only every `check_every` steps;
- the Triton kernels (decode attention, the top-p search) take the layout that times fastest on this
  GPU for these shapes, chosen once per process before the step is recorded;
- a finished row's slot is refilled with the next prompt (prefilled outside the graph), so the batch
  stays full while trace lengths vary; results come back in input order.
On CPU the same code runs eagerly.  Usage:

    tokens, ended = engine.generate(models, prompts, rows, max_new, params, batch_size=192)
"""
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import AttentionInterface

from sampling import ads_score, fd_delta, filter_top_k_top_p, generate_reference, permute_vocab, row_uniforms

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU machines: the torch paths below are used instead
    triton = None

ATTENTION_NAME = "ads_slots"
SEARCH_WAYS = 16          # thresholds tested per pass of the top-p search
SEARCH_PASSES = 8         # 16**8 = 2**32 covers every float32 bit pattern
ROW_PIECE = 2048          # vocabulary entries per program in the sampler's row reductions
PREFILL_TOKENS = 16384    # padded prompt tokens per prefill call (bounds activation memory)
# prefill attention kernels, in order of preference.  cuDNN's is left out: with it the first prefill
# in a process took 1.3 s longer on an H200, and later ones were no faster (bench/results/prefill_*.log)
PREFILL_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


# attention over static slot caches

@dataclass
class Prefill:
    """Where the tokens of left-padded prompts go in the slot caches."""
    positions: torch.Tensor               # (n, T) cache index of each token (= its rotary position)
    slots: torch.Tensor                   # (n,) slot of each prompt
    token_rows: torch.Tensor              # row and column of each real (non-pad) token
    token_cols: torch.Tensor
    mask: torch.Tensor                    # (n, 1, T, T) causal mask over real tokens; None: no padding


def attention_layers(model):
    """The attention modules, recognised by what the Hugging Face attention interface needs."""
    return [m for m in model.modules() if hasattr(m, "layer_idx") and hasattr(m, "scaling")]


def decoder_layers(model):
    """The modules that hold an attention module as a direct child: one per transformer block."""
    attention = {id(m) for m in attention_layers(model)}
    return [m for m in model.modules() if any(id(c) in attention for c in m.children())]


def attach_slot_caches(model, slots, max_len):
    """Give each attention layer its static K/V, (slots, kv_heads, max_len, head_dim) each.  They live
    on the modules, not in a list indexed by layer number, so that every layer of a model is the
    same function of its inputs (one compiled graph serves them all)."""
    cfg = model.config
    weight = model.get_output_embeddings().weight
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    shape = (slots, cfg.num_key_value_heads, max_len, head_dim)
    for m in attention_layers(model):
        m.slot_k = torch.zeros(shape, dtype=weight.dtype, device=weight.device)
        m.slot_v = torch.zeros_like(m.slot_k)


def detach_slot_caches(model):
    for m in attention_layers(model):
        m.__dict__.pop("slot_k", None)
        m.__dict__.pop("slot_v", None)


def slot_attention(module, query, key, value, attention_mask, scaling=None, slot_positions=None,
                   slot_prefill=None, **kwargs):
    """AttentionInterface entry: the Hugging Face layer hands over post-rotary q/k/v (no HF cache);
    write them into the slot cache, then attend.  Decode: one token per slot, every slot in order,
    at slot_positions (n, 1); prefill: as slot_prefill says.  Returns (n, T, heads, dim)."""
    if slot_positions is None and slot_prefill is None:
        raise ValueError("a model switched to the engine's attention was called outside the engine")
    k_cache, v_cache = module.slot_k, module.slot_v
    if slot_prefill is None:
        pos = slot_positions[:, 0]
        slot = torch.arange(len(pos), device=pos.device)
        k_cache[slot, :, pos] = key[:, :, 0]
        v_cache[slot, :, pos] = value[:, :, 0]
        return decode_attention(query[:, :, 0], k_cache, v_cache, pos + 1, scaling)[:, None], None
    p = slot_prefill
    r, c = p.token_rows, p.token_cols
    k_cache[p.slots[r], :, p.positions[r, c]] = key[r, :, c]
    v_cache[p.slots[r], :, p.positions[r, c]] = value[r, :, c]
    return prefill_attention(query, key, value, p.mask, scaling).transpose(1, 2), None


def prefill_attention(q, k, v, mask, scale):
    """Causal attention within left-padded prompts: q (n, heads, T, dim), k and v (n, kv_heads, T, dim).
    K/V are expanded to every query head (prompt-sized, so cheap): the flash and memory-efficient
    kernels do not all take grouped-query inputs; prompts of one length need no mask."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    with sdpa_kernel(PREFILL_BACKENDS):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=scale)


AttentionInterface.register(ATTENTION_NAME, slot_attention)


@contextmanager
def slot_attention_on(nets):
    """Route the models' attention through slot_attention, restoring their own on exit."""
    previous = [net.config._attn_implementation for net in nets]
    for net in nets:
        net.set_attn_implementation(ATTENTION_NAME)
    try:
        yield
    finally:
        for net, impl in zip(nets, previous):
            net.set_attn_implementation(impl)


def decode_attention(q, k_cache, v_cache, lengths, scale):
    """One query per row against the first lengths[b] cached positions of slot b.  q: (n, heads, dim)."""
    if q.is_cuda and triton is not None and _triton_head_dim(q.shape[-1]):
        return decode_attention_triton(q, k_cache, v_cache, lengths, scale)
    return decode_attention_torch(q, k_cache, v_cache, lengths, scale)


def _triton_head_dim(d):
    return d >= 16 and d & (d - 1) == 0


def decode_attention_torch(q, k_cache, v_cache, lengths, scale):
    # grouped query heads share a KV head: fold them into the query axis instead of repeating K/V
    n, heads, dim = q.shape
    kv_heads = k_cache.shape[1]
    # on CPU read only the filled width; on GPU (captured in a graph) the whole cache, masked
    width = k_cache.shape[2] if q.is_cuda or torch.compiler.is_compiling() else int(lengths.max())
    k, v = k_cache[:n, :, :width].float(), v_cache[:n, :, :width].float()
    qg = q.float().view(n, kv_heads, heads // kv_heads, dim)
    s = qg @ k.transpose(-1, -2) * scale
    past_end = torch.arange(width, device=q.device) >= lengths[:, None, None, None]
    probs = s.masked_fill(past_end, float("-inf")).softmax(-1)
    return (probs @ v).reshape(n, heads, dim).to(q.dtype)


# (keys per program, keys per inner iteration, warps, pipeline stages) of the split-K decode kernel
ATTENTION_DEFAULT = (128, 64, 4, 3)
ATTENTION_CONFIGS = [ATTENTION_DEFAULT, (64, 64, 4, 3), (256, 64, 4, 3), (256, 128, 8, 3), (128, 32, 4, 3),
                     (128, 128, 8, 2), (512, 64, 4, 3), (256, 64, 8, 4)]


def attention_key(q, k_cache):
    """TUNED's key of a decode attention call."""
    return ("attention", *q.shape, *k_cache.shape[1:], q.dtype)


def decode_attention_triton(q, k_cache, v_cache, lengths, scale, config=None):
    """Flash-decoding: programs over (row, kv head, key split) each read only filled positions and
    keep a partial softmax; the splits are merged here.  Graph-safe: lengths stay on the device.
    config: (keys per program, keys per iteration, warps, stages); default: the tuned one."""
    q = q.contiguous()  # the kernel assumes unit stride along dim
    n, heads, dim = q.shape
    kv_heads, max_len = k_cache.shape[1], k_cache.shape[2]
    group = heads // kv_heads
    padded = max(16, triton.next_power_of_2(group))  # tl.dot needs at least 16 rows
    split, block, warps, stages = config or TUNED.get(attention_key(q, k_cache), ATTENTION_DEFAULT)
    splits = triton.cdiv(max_len, split)
    acc = torch.empty((n, kv_heads, splits, padded, dim), dtype=torch.float32, device=q.device)
    top = torch.empty((n, kv_heads, splits, padded), dtype=torch.float32, device=q.device)
    total = torch.empty_like(top)
    _split_decode_attention[(n, kv_heads, splits)](
        q, k_cache, v_cache, lengths, acc, top, total,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), scale,
        GROUP=group, PADDED=padded, DIM=dim, BLOCK_N=block, SPLIT=split,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32", num_warps=warps, num_stages=stages)
    out = torch.empty_like(q)
    _merge_splits[(n, kv_heads)](acc, top, total, out, out.stride(0), out.stride(1),
                                 SPLITS=splits, GROUP=group, PADDED=padded, DIM=dim)
    return out


if triton is not None:
    @triton.jit
    def _split_decode_attention(Q, K, V, Lens, Acc, Top, Total,
                                sqb, sqh, skb, skh, skn, svb, svh, svn, scale: tl.constexpr,
                                GROUP: tl.constexpr, PADDED: tl.constexpr, DIM: tl.constexpr,
                                BLOCK_N: tl.constexpr, SPLIT: tl.constexpr, PRECISION: tl.constexpr):
        b, h, s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        start = s * SPLIT
        end = tl.minimum(start + SPLIT, tl.load(Lens + b).to(tl.int32))
        g = tl.arange(0, PADDED)
        d = tl.arange(0, DIM)
        q = tl.load(Q + b * sqb + (h * GROUP + g)[:, None] * sqh + d[None, :], mask=(g < GROUP)[:, None], other=0.0)
        m = tl.full([PADDED], float("-inf"), tl.float32)
        l = tl.zeros([PADDED], tl.float32)
        acc = tl.zeros([PADDED, DIM], tl.float32)
        k_row = K + b.to(tl.int64) * skb + h * skh
        v_row = V + b.to(tl.int64) * svb + h * svh
        # constant trip count with masked loads: keys past a row's length cost no memory traffic
        for n0 in range(0, SPLIT, BLOCK_N):
            n = start + n0 + tl.arange(0, BLOCK_N)
            live = n < end
            k = tl.load(k_row + n[:, None] * skn + d[None, :], mask=live[:, None], other=0.0)
            v = tl.load(v_row + n[:, None] * svn + d[None, :], mask=live[:, None], other=0.0)
            qk = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
            qk = tl.where(live[None, :], qk, float("-inf"))
            m_new = tl.maximum(m, tl.max(qk, 1))
            m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # a block with no live key adds nothing
            p = tl.exp(qk - m_ref[:, None])
            alpha = tl.exp(m - m_ref)
            l = l * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            m = m_new
        o = (b * tl.num_programs(1) + h) * tl.num_programs(2) + s
        tl.store(Acc + (o * PADDED + g)[:, None] * DIM + d[None, :], acc)
        tl.store(Top + o * PADDED + g, m)
        tl.store(Total + o * PADDED + g, l)

    @triton.jit
    def _merge_splits(Acc, Top, Total, Out, sob, soh,
                      SPLITS: tl.constexpr, GROUP: tl.constexpr, PADDED: tl.constexpr, DIM: tl.constexpr):
        """Combine the partial softmaxes of the key splits (splits past a row's length hold -inf)."""
        b, h = tl.program_id(0), tl.program_id(1)
        first = (b * tl.num_programs(1) + h) * SPLITS
        g = tl.arange(0, PADDED)
        d = tl.arange(0, DIM)
        top = tl.full([PADDED], float("-inf"), tl.float32)
        for s in tl.static_range(SPLITS):
            top = tl.maximum(top, tl.load(Top + (first + s) * PADDED + g))
        total = tl.zeros([PADDED], tl.float32)
        acc = tl.zeros([PADDED, DIM], tl.float32)
        for s in tl.static_range(SPLITS):
            w = tl.exp(tl.load(Top + (first + s) * PADDED + g) - top)
            total += w * tl.load(Total + (first + s) * PADDED + g)
            acc += w[:, None] * tl.load(Acc + ((first + s) * PADDED + g)[:, None] * DIM + d[None, :])
        out = acc / total[:, None]
        tl.store(Out + b * sob + (h * GROUP + g)[:, None] * soh + d[None, :], out.to(Out.dtype.element_ty),
                 mask=(g < GROUP)[:, None])

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


# fused decode path: one compiled function per block, q/k/v and gate/up fused, the proxies stacked

FUSABLE_TYPES = ("llama", "qwen2")   # decoder blocks of the form HF Llama/Qwen2 write (checked below)


def fusion_gap(nets):
    """Why these models cannot share one Stack (None when they can): same config, Llama-form blocks."""
    first = {k: v for k, v in nets[0].config.to_dict().items() if k != "_name_or_path"}
    for net in nets:
        cfg = net.config
        if cfg.model_type not in FUSABLE_TYPES:
            return f"model type {cfg.model_type}"
        if {k: v for k, v in cfg.to_dict().items() if k != "_name_or_path"} != first:
            return "models of different configs"
        inner = getattr(net, "model", None)
        if not all(hasattr(inner, a) for a in ("embed_tokens", "layers", "norm", "rotary_emb")):
            return f"{type(net).__name__} has no Llama-form body"
        for layer in inner.layers:
            attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
            if not (all(hasattr(attn, a) for a in ("q_proj", "k_proj", "v_proj", "o_proj"))
                    and all(hasattr(mlp, a) for a in ("gate_proj", "up_proj", "down_proj", "act_fn"))
                    and hasattr(layer, "input_layernorm") and hasattr(layer, "post_attention_layernorm")
                    and not hasattr(attn, "q_norm")):
                return f"a block of {type(net).__name__} is not Llama-form"
    return None


def relay(tensors):
    """tensors[s][j]: parameters of model s to lay end to end along rows, the models stacked on a
    new first axis.  Returns the (S, rows, ...) tensor and points every parameter at its slice, so
    the models keep their values and no second copy of the weights stays alive."""
    if len(tensors) == 1 and len(tensors[0]) == 1:
        return tensors[0][0].data.unsqueeze(0)
    rows = [t.shape[0] for t in tensors[0]]
    like = tensors[0][0]
    out = torch.empty((len(tensors), sum(rows), *like.shape[1:]), dtype=like.dtype, device=like.device)
    for s, group in enumerate(tensors):
        start = 0
        for t, n in zip(group, rows):
            out[s, start:start + n].copy_(t.data)
            t.data = out[s, start:start + n]
            start += n
    return out


def relay_linears(linears):
    """relay() for nn.Linear weights, and their biases (zeros in place of a missing one)."""
    weight = relay([[m.weight for m in group] for group in linears])
    if all(m.bias is None for group in linears for m in group):
        return weight, None
    zeros = lambda m: torch.zeros(m.out_features, dtype=weight.dtype, device=weight.device)  # noqa: E731
    return weight, relay([[zeros(m) if m.bias is None else m.bias for m in group] for group in linears])


def rms_norm(x, weight, eps):
    """Hugging Face's Llama/Qwen2 RMSNorm with a per-model weight: x (S, B, H), weight (S, H)."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight[:, None] * h.to(x.dtype)


def linear(x, weight, bias=None):
    """x (S, B, K) times each model's (N, K) weight: one matmul for one model, a bmm for a stack."""
    y = (x[0] @ weight[0].T)[None] if x.shape[0] == 1 else torch.bmm(x, weight.transpose(1, 2))
    return y if bias is None else y + bias[:, None]


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
    if on_triton(qkv) and _triton_head_dim(qkv.shape[-1]):
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
        differ from theirs, by at most 0.031 (bench/results/h200_max_triton_prefill.json, check)."""
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


def block_qkv(h, cos, sin, w, shape):
    """q, k, v of one block for N tokens of S stacked models, (S, N, heads or kv_heads, dim), with the
    rotary embedding applied; h: (S, N, H), the block's normed input; cos, sin: (N, dim)."""
    heads, kv_heads, dim = shape[:3]
    S, N, _ = h.shape
    qkv = linear(h, w["qkv"], w["qkv_bias"]).view(S, N, heads + 2 * kv_heads, dim)
    return rotate_qk(qkv, cos, sin, heads, kv_heads)


def block_rest(x, out, w, w_next, eps, act):
    """The block after attention (out: (S, N, heads x dim)): output projection and MLP, each with its
    residual; returns the new x and its norm for the next block (w_next: that block's input-norm
    weight, or the final norm), so the two fuse."""
    x, h = add_norm(x, linear(out, w["o"], w["o_bias"]), w["post_norm"], eps)
    up = gated(linear(h, w["gate_up"], w["gate_up_bias"]), act)
    return add_norm(x, linear(up, w["down"], w["down_bias"]), w_next, eps)


def decode_block(x, h, cos, sin, rows, at, lengths, k_cache, v_cache, w: dict, w_next, shape: tuple, act):
    """One transformer block for one new token per row, for S stacked models at once.
    x: (S, B, H) residual stream, h: its input norm."""
    heads, kv_heads, dim, scale, eps = shape
    S, B, _ = x.shape
    q, k, v = block_qkv(h, cos, sin, w, shape)
    k_cache[rows, :, at] = k.reshape(S * B, kv_heads, dim)
    v_cache[rows, :, at] = v.reshape(S * B, kv_heads, dim)
    out = decode_attention(q.reshape(S * B, heads, dim), k_cache, v_cache, lengths, scale)
    return block_rest(x, out.view(S, B, heads * dim), w, w_next, eps, act)


def prefill_block(x, h, cos, sin, write, n, mask, k_cache, v_cache, w, w_next, shape, act):
    """One transformer block over n left-padded prompts of T tokens, flattened to N = n T, for S
    stacked models: each real token's K/V goes to its slot (write: its index in the S x N tokens, its
    cache row and position), then attention within each prompt."""
    heads, kv_heads, dim, scale, eps = shape
    S, N, _ = x.shape
    q, k, v = block_qkv(h, cos, sin, w, shape)
    token, row, at = write
    k_cache[row, :, at] = k.reshape(S * N, kv_heads, dim)[token]
    v_cache[row, :, at] = v.reshape(S * N, kv_heads, dim)[token]
    by_prompt = lambda t: t.reshape(S * n, N // n, t.shape[2], dim).transpose(1, 2)  # noqa: E731
    out = prefill_attention(by_prompt(q), by_prompt(k), by_prompt(v), mask, scale)
    return block_rest(x, out.transpose(1, 2).reshape(S, N, heads * dim), w, w_next, eps, act)


class Stack:
    """Models of one config decoded together (the teacher alone, or the two proxies): per block,
    q/k/v and gate/up as one weight each and the models stacked on a first axis, so a proxy block
    is 4 batched matmuls for both proxies, in decode and in prefill.  Building it re-lays the models'
    weights in place (same values).  Each model's attention modules get views of the stacked K/V
    caches, so prefill can also run through the Hugging Face modules unchanged (fused_prefill off)."""

    def __init__(self, nets, slots, max_len):
        cfg = nets[0].config
        bodies = [net.model for net in nets]
        dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        first = bodies[0].layers[0].self_attn
        self.shape = (cfg.num_attention_heads, cfg.num_key_value_heads, dim, first.scaling, cfg.rms_norm_eps)
        self.rotary, self.act = bodies[0].rotary_emb, bodies[0].layers[0].mlp.act_fn
        if cfg.hidden_act in ("silu", "swish"):
            self.act = F.silu  # what their act_fn computes; gated() knows it and fuses it with the product
        self.block = decode_block
        tied = [net.get_output_embeddings().weight is net.get_input_embeddings().weight for net in nets]
        self.embed = relay([[net.get_input_embeddings().weight] for net in nets])
        self.head = self.embed if all(tied) else relay([[net.get_output_embeddings().weight] for net in nets])
        self.final_norm = relay([[b.norm.weight] for b in bodies])
        self.layers, self.caches = [], []
        for i in range(cfg.num_hidden_layers):
            blocks = [b.layers[i] for b in bodies]
            w = {"in_norm": relay([[b.input_layernorm.weight] for b in blocks]),
                 "post_norm": relay([[b.post_attention_layernorm.weight] for b in blocks])}
            for name, parts in (("qkv", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
                                ("o", ("self_attn.o_proj",)), ("gate_up", ("mlp.gate_proj", "mlp.up_proj")),
                                ("down", ("mlp.down_proj",))):
                w[name], w[name + "_bias"] = relay_linears([[b.get_submodule(p) for p in parts] for b in blocks])
            # kept out of w: a compiled block must not see the cache it writes as two aliased inputs
            k_cache = torch.zeros((len(nets) * slots, cfg.num_key_value_heads, max_len, dim),
                                  dtype=self.embed.dtype, device=self.embed.device)
            v_cache = torch.zeros_like(k_cache)
            for s, b in enumerate(blocks):
                b.self_attn.slot_k = k_cache[s * slots:(s + 1) * slots]
                b.self_attn.slot_v = v_cache[s * slots:(s + 1) * slots]
            self.layers.append(w)
            self.caches.append((k_cache, v_cache))

    def logits(self, ids, pos):
        """(S, B, V) next-token logits of every model for ids (B,) at cache positions pos (B,)."""
        S = self.embed.shape[0]
        x = self.embed[:, ids]
        cos, sin = (t[:, 0] for t in self.rotary(x[0][:, None], pos[:, None]))
        rows = torch.arange(S * len(ids), device=ids.device)
        at = pos.repeat(S)
        lengths = at + 1
        x, h = add_norm(x, None, self.layers[0]["in_norm"], self.shape[-1])
        for w, (k_cache, v_cache), w_next in self.blocks():
            x, h = self.block(x, h, cos, sin, rows, at, lengths, k_cache, v_cache, w, w_next, self.shape, self.act)
        return self.project(h)

    def blocks(self):
        """(weights, K/V caches, next norm weight) of each block: the next block's input norm, or the
        final norm after the last, so each block's output and that norm fuse."""
        return zip(self.layers, self.caches, [w["in_norm"] for w in self.layers[1:]] + [self.final_norm])

    def project(self, h):
        """(S, B, V) logits of the final-normed hidden states h (S, B, H)."""
        return torch.bmm(h, self.head.transpose(1, 2)) if h.shape[0] > 1 else (h[0] @ self.head[0].T)[None]

    def prefill_logits(self, ids, p):
        """(S, n, V) next-token logits of every model after the left-padded prompts ids (n, T), whose
        real tokens' K/V go into the slots p names."""
        S, (n, T) = self.embed.shape[0], ids.shape
        slots = self.caches[0][0].shape[0] // S
        x = self.embed[:, ids.reshape(-1)]
        cos, sin = (t.reshape(n * T, -1) for t in self.rotary(x[0].view(n, T, -1), p.positions))
        r, c = p.token_rows, p.token_cols
        model = torch.arange(S, device=ids.device)[:, None]
        write = ((model * n * T + r * T + c).reshape(-1), (model * slots + p.slots[r]).reshape(-1),
                 p.positions[r, c].repeat(S))
        mask = None if p.mask is None else p.mask.repeat(S, 1, 1, 1)
        x, h = add_norm(x, None, self.layers[0]["in_norm"], self.shape[-1])
        for w, (k_cache, v_cache), w_next in self.blocks():
            x, h = prefill_block(x, h, cos, sin, write, n, mask, k_cache, v_cache, w, w_next, self.shape, self.act)
        return self.project(h.view(S, n, T, -1)[:, :, -1])


# sort-free nucleus sampling

# (elements per program, elements per iteration, warps, column loads) of the top-p search kernel
MASS_DEFAULT = (4096, 256, 8, False)
MASS_CONFIGS = [MASS_DEFAULT, (4096, 256, 8, True), (2048, 512, 4, False), (2048, 512, 4, True),
                (1024, 1024, 8, False), (1024, 1024, 8, True), (8192, 512, 8, True), (1024, 256, 4, False)]


def mass_key(probs):
    """TUNED's key of a top-p search over probs."""
    return ("mass", *probs.shape)


def mass_above(probs, cand, config=None):
    """(B, W) sums of the probabilities whose float32 bit pattern exceeds each candidate.
    config: one of MASS_CONFIGS; default: the tuned one."""
    if probs.is_cuda and triton is not None:
        chunk, sub, warps, column = config or TUNED.get(mass_key(probs), MASS_DEFAULT)
        chunks = triton.cdiv(probs.shape[1], chunk)
        part = torch.empty((probs.shape[0], chunks, cand.shape[1]), dtype=torch.float32, device=probs.device)
        _mass_above[(probs.shape[0], chunks)](probs, cand.contiguous(), part, probs.shape[1], probs.stride(0),
                                             WAYS=cand.shape[1], CHUNK=chunk, SUB=sub, COLUMN=column,
                                             num_warps=warps)
        return part.sum(1)
    bits = probs.view(torch.int32)
    return torch.stack([torch.where(bits > c[:, None], probs, 0.0).sum(-1) for c in cand.unbind(-1)], -1)


def pieces(x, fill):
    """(B, V) -> (B, P, ROW_PIECE), the tail padded with fill, so a reduction over each row runs as
    B x P programs and then B small ones: compiled as one program per row, the softmax over 192 rows
    of 151,665 took 0.77 ms on an H200, where reading its input takes 0.03 ms."""
    width = min(ROW_PIECE, x.shape[-1])
    n = -(-x.shape[-1] // width)
    return F.pad(x, (0, n * width - x.shape[-1]), value=fill).view(x.shape[0], n, width)


def row_max(x, fill=float("-inf")):
    return pieces(x, fill).amax(-1).amax(-1, keepdim=True)


def row_sum(x):
    return pieces(x, 0.0).sum(-1).sum(-1, keepdim=True)


def softmax_rows(scores):
    """softmax over the vocabulary in float32, with both row reductions split into pieces."""
    s = scores.float()
    e = torch.exp(s - row_max(s))
    return e / row_sum(e)


def nucleus_floor(probs, top_p):
    """Bit pattern `lo` such that the nucleus is exactly {i : bits(probs[i]) > lo}.

    A token is in the nucleus when the mass of strictly more probable tokens is < top_p * total
    (sampling.filter_top_k_top_p); that mass only grows as the threshold falls, and non-negative
    float32 values order like their bit patterns, so a 16-way search over the 2**31 patterns finds
    the exact boundary in 8 passes over the row, without sorting."""
    target = top_p * row_sum(probs)
    lo = torch.zeros_like(probs[:, :1], dtype=torch.int32)           # mass above 0 is >= target
    hi = row_max(probs.view(torch.int32), 0)                         # mass above the max is 0
    ways = torch.arange(1, SEARCH_WAYS + 1, dtype=torch.int32, device=probs.device)
    for _ in range(SEARCH_PASSES):
        step = (hi - lo + SEARCH_WAYS - 1) // SEARCH_WAYS
        cand = torch.minimum(lo + step * ways, hi)
        inside = mass_above(probs, cand) < target
        hi = torch.where(inside, cand, hi).amin(-1, keepdim=True)
        lo = torch.where(inside, lo, cand).amax(-1, keepdim=True)
    return lo


def nucleus_probs(scores, top_k=0, top_p=1.0):
    """softmax(scores) with the tokens outside top-k and the nucleus zeroed."""
    probs = filter_top_k_top_p(softmax_rows(scores), top_k, 1.0)
    if top_p < 1.0:
        probs = torch.where(probs.view(torch.int32) > nucleus_floor(probs, top_p), probs, 0.0)
    return probs


def first_positive_from(x, start):
    """Per row of x (B, W), the first index >= start (B, 1) where x > 0; past the last one, that last
    one.  Rows without any get -1."""
    idx = torch.arange(x.shape[-1], device=x.device)
    after = torch.where((x > 0) & (idx >= start), idx, x.shape[-1]).amin(-1, keepdim=True)
    return torch.where(after < x.shape[-1], after, torch.where(x > 0, idx, -1).amax(-1, keepdim=True))


def inverse_cdf(probs, u):
    """Per row, the first index whose running sum of probs reaches u times the row's total, in
    vocabulary order, summed in two levels: over ROW_PIECE-wide pieces, then inside the one piece
    that holds the target (one scan over the 151k-wide rows took 0.36 ms per step on an H200).
    A rounded sum can stop short of the target, or (a GPU scan adds in a tree) dip where a zero is
    added; either way the count is moved to the next positive entry, or the last one, so a token of
    zero probability is never drawn."""
    B, V = probs.shape
    width = min(ROW_PIECE, V)
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


def sample_tokens(scores, u, top_k=0, top_p=1.0, filtered=nucleus_probs):
    """softmax(scores) -> top-k -> top-p -> inverse-CDF in vocabulary order with one uniform per row:
    sampling.sample_from_scores without its sort.  filtered: nucleus_probs, or a compiled copy; the
    inverse CDF runs eagerly after it (as measured; a whole-row scan failed to compile in torch 2.11)."""
    return inverse_cdf(filtered(scores, top_k, top_p), u)


# kernel tuning: the fastest layout of each Triton kernel depends on the GPU and the shapes

TUNED = {}               # kernel key -> config, filled by Engine.tune() before the step is compiled
TUNING_LOG = []          # what each tuning measured (benchmarks report it)
TUNE_MIN_VOCAB = 32768   # smaller models run tiny kernels: the compiles would cost more than they save
TUNE_REPS = 20


def gpu_ms(fn, reps=TUNE_REPS):
    """Mean GPU milliseconds of fn() over reps back-to-back calls (CUDA events)."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / reps


def tune(key, configs, run, timer=gpu_ms):
    """Time run(config) for each config (after one compiling run) and keep the fastest in TUNED[key].
    A config that fails to build (e.g. needs more shared memory than the GPU has) or whose output
    differs from the first config's is skipped, so the result is never wrong, only slower."""
    if key in TUNED:
        return
    want = run(configs[0]).float()
    times = {}
    for config in configs:
        try:
            got = run(config)
        except Exception:
            continue
        if torch.allclose(got.float(), want, rtol=1e-2, atol=1e-3, equal_nan=True):
            times[config] = timer(lambda: run(config))
    TUNED[key] = min(times, key=times.get)
    TUNING_LOG.append(dict(key=str(key), chose=str(TUNED[key]), ms={str(c): round(t, 4) for c, t in times.items()}))


# the engine

def unsupported_reason(models, params):
    """Why the engine cannot run this request (None when it can)."""
    if params.uses_proxy and params.ads_mode != "fd":
        return f"ads_mode={params.ads_mode}"
    if params.repetition_penalty != 1.0:
        return f"repetition_penalty={params.repetition_penalty}"
    for model in [models.teacher] + ([models.plus, models.minus] if params.uses_proxy else []):
        reason = _architecture_gap(model)
        if reason:
            return reason
    return None


def _architecture_gap(model):
    cfg = model.config
    if getattr(cfg, "is_encoder_decoder", False):
        return "encoder-decoder model"
    if set(getattr(cfg, "layer_types", None) or ["full_attention"]) != {"full_attention"}:
        return "layers other than full attention"
    if any(getattr(cfg, k, None) for k in ("final_logit_softcapping", "attn_logit_softcapping")):
        return "logit soft-capping"
    if len(attention_layers(model)) != cfg.num_hidden_layers or not hasattr(cfg, "num_key_value_heads"):
        return f"attention layers of {type(model).__name__} not recognised"
    return None


class Engine:
    """Decode slots for one request: static state tensors, the per-step function, prefill and refill."""

    def __init__(self, models, params, slots, max_len, max_new, fused=True, fused_prefill=True):
        self.params, self.vocab, self.pad = params, models.vocab_size, models.pad_id
        self.nets = [models.teacher] + ([models.plus, models.minus] if params.uses_proxy else [])
        for net in self.nets:
            if net.get_output_embeddings().weight.shape[0] < self.vocab:
                raise ValueError(f"{type(net).__name__} has fewer output logits than the tokenizer's {self.vocab} ids")
        # decode groups in the order teacher, plus, minus: a Stack where the models allow (fused),
        # else the Hugging Face modules with their own slot caches
        self.groups = []
        for nets in [[models.teacher]] + ([[models.plus, models.minus]] if params.uses_proxy else []):
            for part in [nets] if fusion_gap(nets) is None else [[net] for net in nets]:
                stack = Stack(part, slots, max_len) if fused and fusion_gap(part) is None else None
                if stack is None:
                    for net in part:
                        attach_slot_caches(net, slots, max_len)
                self.groups.append((part, stack))
        self.scores_fn, self.nucleus_fn = self.scores_of, nucleus_probs
        device = next(models.teacher.parameters()).device
        self.device, self.slots, self.max_len = device, slots, max_len
        self.eos = torch.tensor(models.eos_ids, dtype=torch.long, device=device)
        self.seq_len = torch.zeros(slots, dtype=torch.long, device=device)     # tokens in each slot's cache
        self.row_id = torch.zeros_like(self.seq_len)                           # prompt index (keys the noise)
        self.n_gen = torch.zeros_like(self.seq_len)                            # tokens kept so far
        self.budget = torch.zeros_like(self.seq_len)
        self.done = torch.ones(slots, dtype=torch.bool, device=device)         # empty slots count as done
        self.ended = torch.zeros_like(self.done)
        # one spare column: a finished row keeps writing pads at column n_gen <= max_new
        self.out = torch.full((slots, max_new + 1), self.pad, dtype=torch.long, device=device)
        self.score = torch.zeros((slots, self.vocab), dtype=torch.float32, device=device)
        self.graph = None
        self.compiled = "nothing"    # what capture() managed to compile
        self.fused_prefill = fused_prefill

    def decode_logits(self, ids, pos):
        """Next-token logits of every model for one token per slot, cut to the tokenizer's ids."""
        logits = []
        for nets, stack in self.groups:
            if stack is None:
                logits += self.forward(ids[:, None], pos[:, None], nets=nets)
            else:
                logits += list(stack.logits(ids, pos)[:, :, :self.vocab].unbind(0))
        return logits

    def prefill_logits(self, ids, prefill):
        """Last-position logits of every model for left-padded prompts, cut to the tokenizer's ids;
        through the Stacks unless fused_prefill is off."""
        logits = []
        for nets, stack in self.groups:
            if stack is None or not self.fused_prefill:
                logits += self.forward(ids, prefill.positions, prefill, nets=nets)
            else:
                logits += list(stack.prefill_logits(ids, prefill)[:, :, :self.vocab].unbind(0))
        return logits

    def forward(self, ids, positions, prefill=None, nets=None):
        """Logits of the newest position of every model (or of nets) through the Hugging Face
        modules, cut to the tokenizer's ids."""
        where = dict(slot_positions=positions) if prefill is None else dict(slot_prefill=prefill)
        logits = []
        for net in nets or self.nets:
            out = net(input_ids=ids, position_ids=positions, attention_mask=None, use_cache=False,
                      logits_to_keep=1, **where)
            logits.append(out.logits[:, -1, :self.vocab])
        return logits

    def scores_of(self, logits, rows, steps):
        """Scores for each slot's next token; rows and steps (tokens kept so far) key the control's
        permutation exactly as sampling.generate_reference does."""
        p = self.params
        if p.greedy:
            return logits[0].float()
        delta = fd_delta(logits[1], logits[2], p.eps) if p.uses_proxy else None
        if delta is not None and p.control == "permute":
            delta = permute_vocab(delta, p.seed, rows, steps)
        return ads_score(logits[0], delta, p.tau, p.lam)

    def pick(self, u):
        p = self.params
        return self.score.argmax(-1) if p.greedy else sample_tokens(self.score, u, p.top_k, p.top_p, self.nucleus_fn)

    def step(self):
        """Sample every slot's next token from the stored scores, book it, feed it to the models."""
        tok = self.pick(row_uniforms(self.params.seed, self.row_id, self.n_gen))
        is_eos = (tok[:, None] == self.eos).any(-1) & ~self.done
        keep = ~self.done & ~is_eos
        self.out.scatter_(1, self.n_gen[:, None], torch.where(keep, tok, self.pad)[:, None])
        self.n_gen.add_(keep.long())
        self.ended.logical_or_(is_eos)
        self.done.logical_or_(is_eos | (self.n_gen >= self.budget))
        pos = self.seq_len.clamp(max=self.max_len - 1)  # finished slots write harmlessly in bounds
        feed = torch.where(self.done, self.pad, tok)
        self.score.copy_(self.scores_fn(self.decode_logits(feed, pos), self.row_id, self.n_gen))
        self.seq_len.add_((~self.done).long())

    def tune(self):
        """Pick the decode attention and top-p search layouts for this engine's shapes (TUNED),
        timed on random data of those shapes at full cache length."""
        if triton is None or self.device.type != "cuda" or self.vocab < TUNE_MIN_VOCAB:
            return
        for nets, stack in self.groups:
            cfg = nets[0].config
            dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
            if not _triton_head_dim(dim):
                continue
            rows = self.slots * (len(nets) if stack is not None else 1)
            like = dict(dtype=nets[0].get_output_embeddings().weight.dtype, device=self.device)
            q = torch.randn(rows, cfg.num_attention_heads, dim, **like)
            k, v = (torch.randn(rows, cfg.num_key_value_heads, self.max_len, dim, **like) for _ in range(2))
            lengths = torch.full((rows,), self.max_len, device=self.device)
            tune(attention_key(q, k), ATTENTION_CONFIGS,
                 lambda c: decode_attention_triton(q, k, v, lengths, dim ** -0.5, c))
        if not self.params.greedy and self.params.top_p < 1.0:
            probs = torch.softmax(3 * torch.randn(self.slots, self.vocab, device=self.device), -1)
            cand = probs.view(torch.int32)[:, :SEARCH_WAYS].sort(-1).values
            tune(mass_key(probs), MASS_CONFIGS, lambda c: mass_above(probs, cand, c))

    def capture(self, compile_layers=True):
        """Record step() as one CUDA graph.  The warm-up runs compile the kernels on a side stream
        while every slot is still empty (done), so they leave no trace in the results.  With
        compile_layers, each transformer block, the score and the top-k/top-p filter run through
        torch.compile while the graph is recorded (fusing norms, rotary, activations and the passes
        over B x V); prefill stays eager.  A compiler failure must not stop generation: then the
        score and filter, and if that is not enough the blocks too, fall back to eager kernels."""
        self.tune()
        blocks = [b for nets, stack in self.groups if stack is None for net in nets for b in decoder_layers(net)]
        tiers = [("blocks, score and filter", True, True), ("blocks", True, False)] if compile_layers else []
        try:
            for name, compile_blocks, compile_score in tiers + [("nothing", False, False)]:
                self.compile_parts(blocks, compile_blocks, compile_score)
                try:
                    self.warm_up()
                    self.compiled = name
                    break
                except Exception as e:
                    if not compile_blocks:
                        raise
                    print(f"engine: torch.compile of the {name} failed ({type(e).__name__}: {str(e)[:200]}), "
                          "compiling less", file=sys.stderr)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.step()
        finally:
            self.compile_parts(blocks, False, False)

    def compile_parts(self, hf_blocks, blocks, score):
        """Route the decode step through compiled (True) or eager (False) blocks and score/filter."""
        for b in hf_blocks:
            b.__dict__.pop("forward", None)
            if blocks:
                b.forward = torch.compile(b.forward, dynamic=False)
        for _, stack in self.groups:
            if stack is not None:
                stack.block = torch.compile(decode_block, dynamic=False) if blocks else decode_block
        self.scores_fn = torch.compile(self.scores_of, dynamic=False) if score else self.scores_of
        self.nucleus_fn = torch.compile(nucleus_probs, dynamic=False) if score else nucleus_probs

    def warm_up(self):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self.step()
        torch.cuda.current_stream().wait_stream(side)

    def release(self):
        for net in self.nets:
            detach_slot_caches(net)
        self.groups = []

    def advance(self, steps):
        for _ in range(steps):
            if self.graph is not None:
                self.graph.replay()
            else:
                self.step()

    def prefill(self, slots, prompts, rows, budgets):
        """Run the prompts through every model into the given slots and reset those slots' state."""
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad, dtype=torch.long)
        real = torch.zeros((len(prompts), width), dtype=torch.bool)
        for i, p in enumerate(prompts):
            ids[i, width - len(p):] = torch.tensor(p)
            real[i, width - len(p):] = True
        ids, real = ids.to(self.device), real.to(self.device)
        positions = (real.long().cumsum(-1) - 1).clamp(min=0)
        mask = None  # prompts of one length need no mask: attention is plainly causal
        if any(len(p) < width for p in prompts):
            causal = torch.ones((width, width), dtype=torch.bool, device=self.device).tril()
            # a pad query attends to itself only, so no softmax row is empty (NaN would leak through V)
            mask = ((causal & real[:, None, :]) | torch.eye(width, dtype=torch.bool, device=self.device))[:, None]
        token_rows, token_cols = real.nonzero(as_tuple=True)
        slot_t = torch.tensor(slots, dtype=torch.long, device=self.device)
        prefill = Prefill(positions, slot_t, token_rows, token_cols, mask)
        rows_t = torch.tensor(rows, dtype=torch.long, device=self.device)
        self.score[slot_t] = self.scores_of(self.prefill_logits(ids, prefill), rows_t, torch.zeros_like(rows_t))
        self.seq_len[slot_t] = torch.tensor([len(p) for p in prompts], device=self.device)
        self.row_id[slot_t] = rows_t
        self.budget[slot_t] = torch.tensor(budgets, dtype=torch.long, device=self.device)
        self.n_gen[slot_t] = 0
        self.done[slot_t] = False
        self.ended[slot_t] = False

    def snapshot(self):
        """done, tokens kept and EOS flags of every slot: the one host sync of a check."""
        flags = torch.stack([self.done.long(), self.n_gen, self.ended.long()]).cpu()
        return flags[0].bool().tolist(), flags[1].tolist(), flags[2].bool().tolist()


def generate(models, prompts, rows, max_new, params, batch_size, progress=None, *,
             refill=True, check_every=None, timings=None, compile_layers=True, fused=True, fused_prefill=True):
    """Drop-in for sampling.generate_reference over any number of prompts with `batch_size` decode
    slots.  progress(tokens, rows) is called with the tokens generated and the rows finished since its
    last call, at each check (every `check_every` steps: 16 on GPU, 1 on CPU).  refill=False waits for a
    whole batch to finish before starting the next (a static batch, for comparison).  timings, if a dict, receives
    setup (weight re-lay, compilation, capture), prefill and decode seconds (with device syncs
    around prefill, for benchmarks).  compile_layers: on GPU, fuse each block's small kernels with
    torch.compile (off: plain eager kernels in the graph).  fused: decode Llama/Qwen2-form models
    through Stack (fused projections, proxies stacked; re-lays their weights in place, same values);
    off: through the Hugging Face modules.  fused_prefill: prefill through the Stack as well (off:
    through the Hugging Face modules)."""
    reason = unsupported_reason(models, params)
    if reason:
        print(f"engine: {reason} is not supported, falling back to sampling.generate_reference", file=sys.stderr)
        return _generate_in_chunks(models, prompts, rows, max_new, params, batch_size, progress)
    if any(len(p) == 0 for p in prompts):
        raise ValueError("engine.generate needs non-empty prompts")
    tokens, ended = [[] for _ in prompts], [False] * len(prompts)
    queue = [i for i in range(len(prompts)) if max_new[i] > 0]
    if not queue:
        return tokens, ended
    slots = min(batch_size, len(queue))
    start = time.perf_counter()
    with torch.no_grad():
        engine = Engine(models, params, slots, max(len(prompts[i]) + max_new[i] for i in queue), max(max_new),
                        fused=fused, fused_prefill=fused_prefill)
    on_gpu = engine.device.type == "cuda"
    check_every = check_every or (16 if on_gpu else 1)
    try:
        with slot_attention_on(engine.nets), torch.no_grad():
            if on_gpu:
                engine.capture(compile_layers)
                torch.cuda.synchronize()
            if timings is not None:
                timings["capture_s"] = time.perf_counter() - start
                timings["compiled"] = engine.compiled
            _serve(engine, prompts, rows, max_new, queue, tokens, ended, progress, refill, check_every, timings)
    finally:
        engine.release()
    return tokens, ended


def _serve(engine, prompts, rows, max_new, queue, tokens, ended, progress, refill, check_every, timings):
    """The host loop: fill free slots, advance check_every steps, harvest finished rows, repeat."""
    owner = [None] * engine.slots               # prompt index held by each slot
    counted = [0] * engine.slots                # tokens of the slot's row already reported
    clock = {"prefill_s": 0.0, "decode_s": 0.0, "steps": 0}
    queue = list(reversed(queue))
    free = list(range(engine.slots))
    while True:
        if free and queue and (refill or len(free) == engine.slots):
            _fill(engine, free, queue, owner, counted, prompts, rows, max_new, clock, timings is not None)
        if all(o is None for o in owner):
            break
        start = time.perf_counter()
        engine.advance(check_every)
        done, n_gen, eos = engine.snapshot()
        clock["decode_s"] += time.perf_counter() - start
        clock["steps"] += check_every
        finished = [s for s in range(engine.slots) if owner[s] is not None and done[s]]
        if finished:
            rows_out = engine.out[finished].cpu()
            for j, s in enumerate(finished):
                tokens[owner[s]] = rows_out[j, :n_gen[s]].tolist()
                ended[owner[s]] = eos[s]
        if progress:
            new = sum(n_gen[s] - counted[s] for s in range(engine.slots) if owner[s] is not None)
            if new or finished:
                progress(new, len(finished))
        for s in range(engine.slots):
            counted[s] = n_gen[s]
        for s in finished:
            owner[s] = None
            free.append(s)
    if timings is not None:
        timings.update(clock)


def _fill(engine, free, queue, owner, counted, prompts, rows, max_new, clock, sync):
    """Prefill queued prompts into free slots, in groups of at most PREFILL_TOKENS padded tokens."""
    sync = sync and engine.device.type == "cuda"
    if sync:
        torch.cuda.synchronize()
    start = time.perf_counter()
    while free and queue:
        group = []
        while free and queue:
            width = max([len(prompts[queue[-1]])] + [len(prompts[i]) for _, i in group])
            if group and width * (len(group) + 1) > PREFILL_TOKENS:
                break
            group.append((free.pop(0), queue.pop()))
        slots = [s for s, _ in group]
        idx = [i for _, i in group]
        engine.prefill(slots, [prompts[i] for i in idx], [rows[i] for i in idx], [max_new[i] for i in idx])
        for s, i in group:
            owner[s], counted[s] = i, 0
    if sync:
        torch.cuda.synchronize()
    clock["prefill_s"] += time.perf_counter() - start


def _generate_in_chunks(models, prompts, rows, max_new, params, batch_size, progress):
    tokens, ended = [], []
    for i in range(0, len(prompts), batch_size):
        t, e = generate_reference(models, prompts[i:i + batch_size], rows[i:i + batch_size],
                                  max_new[i:i + batch_size], params, progress)
        tokens += t
        ended += e
    return tokens, ended
