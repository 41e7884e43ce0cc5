"""The fused block stack: Llama/Qwen2-form models of one config run together, per block q/k/v and
gate/up as one weight each and the models stacked on a first axis, so a block of the two proxies is
four batched matmuls for both, in decode and in prefill.  Building a Stack re-lays the models' weights
in place (same values, no second copy).  Block functions take plain tensors, so the engine can compile
decode_block once for every block.  Used by engine.py; the kernels come from engine_kernels.py.
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from engine_kernels import PREFILL_BACKENDS, add_norm, decode_attention, gated, prefill_attention, rotate_qk

FUSABLE_TYPES = ("llama", "qwen2")   # decoder blocks of the form HF Llama/Qwen2 write (checked by fusion_gap)


@dataclass
class Prefill:
    """Where the tokens of left-padded prompts go in the slot caches."""
    positions: torch.Tensor               # (n, T) cache index of each token (= its rotary position)
    slots: torch.Tensor                   # (n,) slot of each prompt
    token_rows: torch.Tensor              # row and column of each real (non-pad) token
    token_cols: torch.Tensor
    mask: torch.Tensor                    # (n, 1, T, T) causal mask over real tokens; None: no padding
    backends: tuple = PREFILL_BACKENDS    # SDPA kernels for the prompts' attention, in order of preference


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



def linear(x, weight, bias=None):
    """x (S, B, K) times each model's (N, K) weight: one matmul for one model, a bmm for a stack."""
    y = (x[0] @ weight[0].T)[None] if x.shape[0] == 1 else torch.bmm(x, weight.transpose(1, 2))
    return y if bias is None else y + bias[:, None]


# the blocks

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
    x: (S, B, H) residual stream, h: its input norm; rows: the cache row of each of the S x B rows."""
    heads, kv_heads, dim, scale, eps = shape
    S, B, _ = x.shape
    q, k, v = block_qkv(h, cos, sin, w, shape)
    k_cache[rows, :, at] = k.reshape(S * B, kv_heads, dim)
    v_cache[rows, :, at] = v.reshape(S * B, kv_heads, dim)
    # a step of every slot reads cache row b for row b; a smaller one (the drain) reads rows[b]
    read = None if k_cache.shape[0] == S * B else rows
    out = decode_attention(q.reshape(S * B, heads, dim), k_cache, v_cache, lengths, scale, read)
    return block_rest(x, out.view(S, B, heads * dim), w, w_next, eps, act)


def prefill_block(x, h, cos, sin, write, n, mask, k_cache, v_cache, w, w_next, shape, act, backends=PREFILL_BACKENDS):
    """One transformer block over n left-padded prompts of T tokens, flattened to N = n T, for S
    stacked models: each real token's K/V goes to its slot (write: its index in the S x N tokens, its
    cache row and position), then attention within each prompt (through the SDPA backends)."""
    heads, kv_heads, dim, scale, eps = shape
    S, N, _ = x.shape
    q, k, v = block_qkv(h, cos, sin, w, shape)
    token, row, at = write
    k_cache[row, :, at] = k.reshape(S * N, kv_heads, dim)[token]
    v_cache[row, :, at] = v.reshape(S * N, kv_heads, dim)[token]
    by_prompt = lambda t: t.reshape(S * n, N // n, t.shape[2], dim).transpose(1, 2)  # noqa: E731
    out = prefill_attention(by_prompt(q), by_prompt(k), by_prompt(v), mask, scale, backends)
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
        self.layers, self.caches, self.slots = [], [], slots
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
        """(S, B, V) next-token logits of every model for ids (B,) at cache positions pos (B,): the
        first B slots (all of them, or the drain's fewer)."""
        S = self.embed.shape[0]
        x = self.embed[:, ids]
        cos, sin = (t[:, 0] for t in self.rotary(x[0][:, None], pos[:, None]))
        rows = self.cache_rows(torch.arange(len(ids), device=ids.device))
        at = pos.repeat(S)
        lengths = at + 1
        x, h = add_norm(x, None, self.layers[0]["in_norm"], self.shape[-1])
        for w, (k_cache, v_cache), w_next in self.blocks():
            x, h = self.block(x, h, cos, sin, rows, at, lengths, k_cache, v_cache, w, w_next, self.shape, self.act)
        return self.project(h)

    def cache_rows(self, slots):
        """The stacked caches' rows of these slots, model by model."""
        return (torch.arange(self.embed.shape[0], device=slots.device)[:, None] * self.slots + slots).reshape(-1)

    def move_slots(self, src, dst, width):
        """Copy the cached K/V of slots src to slots dst (long tensors), at positions below width."""
        src, dst = self.cache_rows(src), self.cache_rows(dst)
        for cache in (c for pair in self.caches for c in pair):
            cache[dst, :, :width] = cache[src, :, :width]

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
        x = self.embed[:, ids.reshape(-1)]
        cos, sin = (t.reshape(n * T, -1) for t in self.rotary(x[0].view(n, T, -1), p.positions))
        r, c = p.token_rows, p.token_cols
        model = torch.arange(S, device=ids.device)[:, None]
        write = ((model * n * T + r * T + c).reshape(-1), self.cache_rows(p.slots[r]),
                 p.positions[r, c].repeat(S))
        mask = None if p.mask is None else p.mask.repeat(S, 1, 1, 1)
        x, h = add_norm(x, None, self.layers[0]["in_norm"], self.shape[-1])
        for w, (k_cache, v_cache), w_next in self.blocks():
            x, h = prefill_block(x, h, cos, sin, write, n, mask, k_cache, v_cache, w, w_next, self.shape, self.act,
                                 p.backends)
        return self.project(h.view(S, n, T, -1)[:, :, -1])
