"""Decoding: the entry point `generate`, which runs the engine (engine.py) where it can and the
reference loop otherwise, and that reference loop, `generate_reference`: one Hugging Face KV cache
per model, the token rule of sampling.py applied step by step.  The engine's tokens equal the loop's.

    tokens, ended = decode.generate(models, prompts, rows, max_new, params, batch_size=192)
"""
import inspect
import sys
from dataclasses import replace

import torch
from transformers import DynamicCache

from sampling import check_eps, exact_delta, fd_delta, next_tokens, permute_vocab, row_uniforms
from utils import die

ENGINES = ("auto", "eager", "reference")


def generate(models, prompts, rows, max_new, params, batch_size, engine="auto", progress=None, options=None,
             on_done=None, drain_steps=None):
    """Decode all prompts with batch_size slots: the engine by default ('eager': the same engine
    without torch.compile), the reference loop over chunks of batch_size prompts when
    engine='reference' or the engine does not run the request (said on stderr).  progress(tokens,
    rows), if given, is called with the tokens generated and the rows finished as they happen;
    on_done(i, tokens, ended), once per prompt as soon as prompt i is decoded (in no fixed order).
    options: engine.EngineOptions for the engine (benchmarks); drain_steps, if given, replaces its
    drain_steps (halvings of the batch for a call's last rows).  Returns (tokens, ended) per prompt."""
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    check_eps(models, params)
    if engine != "reference":
        import engine as fast  # here, not above: it loads Triton and torch.compile, which the loop never needs
        reason = fast.unsupported_reason(models, params)
        if reason is None:
            options = options or fast.EngineOptions()
            if drain_steps is not None:
                options = replace(options, drain_steps=drain_steps)
            if engine == "eager":
                options = replace(options, compile_layers=False)
            return fast.generate(models, prompts, rows, max_new, params, batch_size, progress, options, on_done)
        print(f"engine: {reason} is not supported, falling back to decode.generate_reference", file=sys.stderr)
    outs, ended = [], []
    for s in range(0, len(prompts), batch_size):
        sl = slice(s, s + batch_size)
        o, e = generate_reference(models, prompts[sl], rows[sl], max_new[sl], params, progress)
        if on_done:
            for i, (tokens, end) in enumerate(zip(o, e)):
                on_done(s + i, tokens, end)
        outs += o
        ended += e
    return outs, ended


# the reference loop

def _positions(mask):
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def _left_pad(prompts, pad_id, device):
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((len(prompts), width), dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        if p:
            ids[i, width - len(p):] = torch.tensor(p, device=device)
            mask[i, width - len(p):] = 1
    return ids, mask


def cache_kwarg(model):
    """transformers renamed the forward argument past_key_values to cache (5.2x); accept both."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


class CachedModel:
    """One model with its own KV cache, fed left-padded prompts then one token per step; returns
    the logits of the newest position only, cut to the tokenizer's ids."""

    def __init__(self, model, vocab_size):
        self.model, self.vocab_size, self.cache = model, vocab_size, None
        self.cache_arg = cache_kwarg(model)
        width = model.get_output_embeddings().weight.shape[0]
        if width < vocab_size:
            die(f"model output width {width} is smaller than the tokenizer's {vocab_size} ids")

    def prefill(self, ids, mask):
        # a fresh cache per batch: the reference reused a stale one (defect 5)
        self.cache = DynamicCache(config=self.model.config)
        return self._forward(ids, mask, _positions(mask))

    def step(self, tokens, mask, positions):
        return self._forward(tokens[:, None], mask, positions[:, None])

    def _forward(self, ids, mask, positions):
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions,
                         use_cache=True, logits_to_keep=1, **{self.cache_arg: self.cache})
        return out.logits[:, -1, :self.vocab_size]


@torch.no_grad()
def generate_reference(models, prompts, rows, max_new, params, progress=None):
    """Decode a batch with a Hugging Face KV cache per model.  prompts: token id lists; rows: the
    prompt indices that key the noise; max_new: per-row token budgets.  Returns the generated ids
    per row (EOS excluded) and whether each row ended with EOS.  progress(tokens, rows), if given, is
    called after every step with the tokens generated and the rows finished in it."""
    check_eps(models, params)
    device = next(models.teacher.parameters()).device
    ids, mask = _left_pad(prompts, models.pad_id, device)
    rows_t = torch.tensor(rows, device=device)
    budget = torch.tensor(max_new, device=device)
    eos = torch.tensor(models.eos_ids, device=device)
    use_fd = params.uses_proxy and params.ads_mode == "fd"
    nets = [CachedModel(m, models.vocab_size) for m in
            ([models.teacher, models.plus, models.minus] if use_fd else [models.teacher])]
    logits = [net.prefill(ids, mask) for net in nets]
    seen = _seen_mask(ids, mask, models.vocab_size) if params.repetition_penalty != 1.0 else None
    positions = _positions(mask)[:, -1]
    out = torch.full((len(prompts), max(max_new + [0])), models.pad_id, dtype=torch.long, device=device)
    lengths = torch.zeros_like(budget)
    done = budget <= 0
    ended = torch.zeros_like(done)
    for t in range(out.shape[1]):
        step = torch.full_like(rows_t, t)
        u = row_uniforms(params.seed, rows_t, step)
        delta = _delta(models, params, logits, ids, mask, rows_t, step)
        tok = next_tokens(logits[0], delta, params, u, seen)
        is_eos = torch.isin(tok, eos) & ~done
        write = ~done & ~is_eos
        out[:, t] = torch.where(write, tok, models.pad_id)
        lengths += write.long()
        ended |= is_eos
        finished = ~done & (is_eos | (lengths >= budget))
        done = done | finished
        if progress:
            progress(int(write.sum()), int(finished.sum()))
        if done.all():
            break
        tok = torch.where(done, models.pad_id, tok)
        if seen is not None:
            seen[torch.arange(len(tok)), tok] |= ~done
        mask = torch.cat([mask, (~done).long()[:, None]], dim=1)
        ids = torch.cat([ids, tok[:, None]], dim=1)
        positions = positions + 1
        logits = [net.step(tok, mask, positions) for net in nets]
    return [out[i, :n].tolist() for i, n in enumerate(lengths.tolist())], ended.tolist()


def _delta(models, params, logits, ids, mask, rows, step):
    if not params.uses_proxy:
        return None
    if params.ads_mode == "fd":
        delta = fd_delta(logits[1], logits[2], params.eps)
    else:
        delta = exact_delta(models.proxy, models.grads, ids, mask, _positions(mask), models.vocab_size)
    return permute_vocab(delta, params.seed, rows, step) if params.control == "permute" else delta


def _seen_mask(ids, mask, vocab_size):
    counts = torch.zeros((ids.shape[0], vocab_size), dtype=torch.long, device=ids.device)
    counts.scatter_add_(1, ids.clamp(max=vocab_size - 1), mask.long())
    return counts > 0
