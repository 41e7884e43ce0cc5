"""The decode engine: static KV slots, one CUDA graph per decode step, continuous batching.

Same tokens as decode.generate_reference in float32 (the noise is keyed on (seed, prompt index,
position), so neither the batch a row lands in nor its slot changes its sample; on a GPU, up to the
rounding of the kernels a step picks: README, Determinism), at a fraction of the cost:
- every model keeps its K/V in static (slots, kv_heads, max_len, head_dim) caches, written and read
  by an attention function registered with transformers' AttentionInterface (so the Hugging Face
  model classes run unchanged), or by the fused block stack (stack.py) for Llama/Qwen2-form models;
- one decode step (teacher + both proxies + ADS score + sort-free top-k/top-p sampling + EOS and
  budget bookkeeping) is one CUDA graph replay, with each block, the score and the sampler fused by
  torch.compile while the graph is recorded; the Triton kernels (engine_kernels.py) take the layout that
  times fastest on this GPU for these shapes, chosen once per process before the step is recorded;
- a Scheduler on the host looks at the slots every `check_every` steps and refills a finished row's
  slot with the next prompt (prefilled outside the graph), so the batch stays full while trace
  lengths vary; once nothing is left to prefill (the drain), the live rows move to the first slots
  and a step of half, a quarter, ... the batch runs them (graphs recorded up front); results come
  back in input order.
On CPU the same code runs eagerly.  decode.generate is the entry point (it falls back to the
reference loop for requests the engine does not run); directly:

    tokens, ended = engine.generate(models, prompts, rows, max_new, params, batch_size=192)
"""
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable

import torch
from transformers import AttentionInterface

from engine_kernels import (ATTENTION_CONFIGS, HAVE_TRITON, PREFILL_BACKENDS, ROW_PIECE, SEARCH_WAY_CHOICES, SEARCH_WAYS,
                            ads_fd_score, attention_key, decode_attention, decode_attention_triton, gpu_ms, inverse_cdf,
                            keep_above, nucleus_bounds, prefill_attention, softmax_rows, triton_head_dim,
                            tune, tune_search)
from sampling import ads_score, check_eps, fd_delta, permute_vocab, row_uniforms
from stack import Prefill, Stack, decode_block, fusion_gap

ATTENTION_NAME = "ads_slots"
# the per-slot state a step reads and writes: a smaller step sees the first rows of each
SLOT_STATE = ("seq_len", "row_id", "n_gen", "budget", "done", "ended", "out", "score")
TUNE_MIN_VOCAB = 32768   # smaller models run tiny kernels: tuning's compiles would cost more than they save


@dataclass
class EngineOptions:
    """How engine.generate runs.  decode.generate sets compile_layers (off for engine='eager') and
    drain_steps (gentraces' config); the other fields are the benchmark's switches
    (bench/bench_decode.py), for before/after runs in one process, and keep their defaults everywhere else."""
    compile_layers: bool = True            # on GPU, blocks, score, filter and draw through torch.compile (off: eager)
    gemm_autotune: bool = False            # compiled blocks' matmuls picked by Inductor's max-autotune (Triton
    #                                        templates timed against cuBLAS per shape; a longer compile)
    check_every: int = None                # decode steps between host checks; None: 16 on GPU, 1 on CPU
    refill: bool = True                    # refill a finished row's slot at once (off: whole static batches)
    fused: bool = True                     # decode Llama/Qwen2-form models through stack.Stack (off: HF modules)
    fused_prefill: bool = True             # prefill through the Stack too (off: HF modules)
    stack_models: bool = True              # models of one config in one Stack (off: a Stack each, plain matmuls)
    prefill_tokens: int = 16384            # padded prompt tokens per prefill call (bounds activation memory)
    prefill_backends: tuple = PREFILL_BACKENDS  # SDPA kernels for prefill attention, in order of preference
    row_piece: int = ROW_PIECE             # width of the pieces of the sampler's row reductions and inverse CDF
    search_ways: int = None                # thresholds per pass of the top-p search; None: tuned (GPU), else 16
    drain_steps: int = 4                   # smaller steps for the drain: once no prompt is queued, the live rows move
    #                                        to the first slots and a step of 1/2, 1/4, ... of them runs (this
    #                                        many halvings, each one more graph to capture; 0: every step is full)
    inverse_cdf: Callable = inverse_cdf    # the sampler's last step, (probs, u, piece) -> tokens
    softmax: Callable = softmax_rows       # the sampler's softmax, (scores, piece) -> probs
    fd_score: Callable = ads_fd_score      # the ADS score from the three models' logits, written into its last
    #                                        argument if given (not under the permute control)
    tune_timer: Callable = gpu_ms          # how kernel layouts are timed when tuned (launch_ms: the old eager timing)
    timings: dict = None                   # if a dict: receives capture_s (re-lay, tuning, compile, capture),
    #                                        compiled, prefill_s, decode_s, steps and row_steps (steps x their
    #                                        rows; device syncs around prefill)

    def __post_init__(self):
        if self.search_ways is not None and self.search_ways not in SEARCH_WAY_CHOICES:
            raise ValueError(f"search_ways must be one of {SEARCH_WAY_CHOICES} (or None: tuned), not {self.search_ways}")
        if type(self.drain_steps) is not int or self.drain_steps < 0:
            raise ValueError(f"drain_steps must be a whole number of halvings (0: off), not {self.drain_steps!r}")


# attention over static slot caches

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
    write them into the slot cache, then attend.  Decode: one token for each of the first n slots, in
    order (every slot, or the drain's fewer), at slot_positions (n, 1); prefill: as slot_prefill says.  Returns (n, T, heads, dim)."""
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
    return prefill_attention(query, key, value, p.mask, scaling, p.backends).transpose(1, 2), None


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


def step_batches(slots, halvings):
    """Rows of the engine's steps: every slot, then halves (rounded up) for the drain."""
    sizes = [slots]
    while len(sizes) <= halvings and sizes[-1] > 1:
        sizes.append((sizes[-1] + 1) // 2)
    return sizes


class Engine:
    """Decode slots for one request: static state tensors, the per-step function (captured as one
    CUDA graph per step batch on GPU: every slot, and the drain's fewer), prefill into chosen slots,
    moving rows to the first slots for the drain, and the kernel tuning before capture."""

    def __init__(self, models, params, slots, max_len, max_new, options=None):
        self.options = options = options or EngineOptions()
        self.params, self.vocab, self.pad = params, models.vocab_size, models.pad_id
        self.nets = [models.teacher] + ([models.plus, models.minus] if params.uses_proxy else [])
        for net in self.nets:
            if net.get_output_embeddings().weight.shape[0] < self.vocab:
                raise ValueError(f"{type(net).__name__} has fewer output logits than the tokenizer's {self.vocab} ids")
        # decode groups in the order teacher, plus, minus: a Stack where the models allow (options.fused),
        # else the Hugging Face modules with their own slot caches
        self.groups = []
        for nets in [[models.teacher]] + ([[models.plus, models.minus]] if params.uses_proxy else []):
            together = fusion_gap(nets) is None and options.stack_models
            for part in [nets] if together else [[net] for net in nets]:
                stack = Stack(part, slots, max_len) if options.fused and fusion_gap(part) is None else None
                if stack is None:
                    for net in part:
                        attach_slot_caches(net, slots, max_len)
                self.groups.append((part, stack))
        self.scores_fn, self.nucleus_fn, self.uniforms_fn = self.scores_of, self.nucleus_of, row_uniforms
        self.draw_fn, self.book_fn = self.draw, self.book
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
        self.search_ways = options.search_ways or SEARCH_WAYS
        self.batches = step_batches(slots, options.drain_steps)
        self.batch = slots           # the step that runs: the first `batch` slots
        self.graphs = {}             # a captured step per batch
        self.compiled = "nothing"    # what capture() managed to compile

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
        through the Stacks unless options.fused_prefill is off."""
        logits = []
        for nets, stack in self.groups:
            if stack is None or not self.options.fused_prefill:
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

    def scores_of(self, logits, rows, steps, out=None):
        """Scores for each slot's next token (written into out if given); rows and steps (tokens kept
        so far) key the control's permutation exactly as decode.generate_reference does."""
        p = self.params
        if p.greedy:
            score = logits[0].float()
        elif p.uses_proxy and p.control == "permute":
            delta = permute_vocab(fd_delta(logits[1], logits[2], p.eps), p.seed, rows, steps)
            score = ads_score(logits[0], delta, p.tau, p.lam)
        else:
            plus, minus = logits[1:3] if p.uses_proxy else (None, None)
            return self.options.fd_score(logits[0], plus, minus, p.tau, p.lam, p.eps, out)
        return score if out is None else out.copy_(score)

    def nucleus_of(self, scores, top_k, top_p, piece):
        return nucleus_bounds(scores, top_k, top_p, piece, self.options.softmax, self.search_ways)

    def draw(self, probs, floor, u, piece):
        """The inverse CDF over the nucleus of probs; compiled, the nucleus mask is applied where the
        scan reads probs, so no masked copy of the B x V probabilities is written (0.06 ms a step)."""
        return self.options.inverse_cdf(keep_above(probs, floor), u, piece)

    def pick(self, u):
        """softmax -> top-k -> top-p -> inverse CDF: engine_kernels.sample_tokens, in two compiled parts."""
        p = self.params
        if p.greedy:
            return self.score.argmax(-1)
        probs, floor = self.nucleus_fn(self.score, p.top_k, p.top_p, self.options.row_piece)
        return self.draw_fn(probs, floor, u, self.options.row_piece)

    def book(self, tok):
        """Keep each live slot's sampled token (a pad once it is done), update the slots' state, and
        return what the models are fed (pads for done slots) at which cache positions."""
        is_eos = (tok[:, None] == self.eos).any(-1) & ~self.done
        keep = ~self.done & ~is_eos
        self.out.scatter_(1, self.n_gen[:, None], torch.where(keep, tok, self.pad)[:, None])
        self.n_gen.add_(keep.long())
        self.ended.logical_or_(is_eos)
        self.done.logical_or_(is_eos | (self.n_gen >= self.budget))
        pos = self.seq_len.clamp(max=self.max_len - 1)  # finished slots write harmlessly in bounds
        self.seq_len.add_((~self.done).long())
        return torch.where(self.done, self.pad, tok), pos

    def step(self):
        """Sample every slot's next token from the stored scores, book it, feed it to the models."""
        feed, pos = self.book_fn(self.pick(self.uniforms_fn(self.params.seed, self.row_id, self.n_gen)))
        self.scores_fn(self.decode_logits(feed, pos), self.row_id, self.n_gen, self.score)

    def tune(self):
        """Pick the decode attention and top-p search layouts, and the search's thresholds per pass,
        for this engine's shapes (TUNED; attention for each step batch), timed on random data of those shapes."""
        if not HAVE_TRITON or self.device.type != "cuda" or self.vocab < TUNE_MIN_VOCAB:
            return
        for (nets, stack), batch in ((g, b) for g in self.groups for b in self.batches):
            cfg = nets[0].config
            dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
            if not triton_head_dim(dim):
                continue
            rows = batch * (len(nets) if stack is not None else 1)
            like = dict(dtype=nets[0].get_output_embeddings().weight.dtype, device=self.device)
            q = torch.randn(rows, cfg.num_attention_heads, dim, **like)
            k, v = (torch.randn(rows, cfg.num_key_value_heads, self.max_len, dim, **like) for _ in range(2))
            # every filled length from 1 to the cache's size: a decode's rows pass through them all
            lengths = torch.linspace(1, self.max_len, rows, device=self.device).long()
            tune(attention_key(q, k), ATTENTION_CONFIGS,
                 lambda c: decode_attention_triton(q, k, v, lengths, dim ** -0.5, c), self.options.tune_timer)
        if not self.params.greedy and self.params.top_p < 1.0:
            probs = torch.softmax(3 * torch.randn(self.slots, self.vocab, device=self.device), -1)
            ways = self.options.search_ways
            self.search_ways = tune_search(probs, self.params.top_p, self.options.tune_timer,
                                           (ways,) if ways else SEARCH_WAY_CHOICES)
            for batch in self.batches[1:]:  # the search's pass layout for the drain's rows, at the same ways
                tune_search(probs[:batch], self.params.top_p, self.options.tune_timer, (self.search_ways,))

    def capture(self):
        """Record step() as CUDA graphs: one of every slot, and one for each of the drain's smaller
        batches.  The warm-up runs compile the kernels on a side stream while every slot is still
        empty (done), so they leave no trace in the results.  With options.compile_layers, each
        transformer block, the score and the top-k/top-p filter of the full step run through
        torch.compile while its graph is recorded (fusing norms, rotary, activations and the passes
        over B x V), and so do the draw and the bookkeeping (some 130 small kernels eagerly); prefill
        stays eager.  A compiler failure must not stop generation: then the draw and bookkeeping, next
        the score and filter, and if that is not enough the blocks too, fall back to eager kernels.
        The drain's steps are recorded from the eager kernels: compiling each of their shapes took
        over a minute of setup (H200, the bench's models) to save a second or two of a call's drain."""
        self.tune()
        blocks = [b for nets, stack in self.groups if stack is None for net in nets for b in decoder_layers(net)]
        tiers = [("blocks, score, filter and draw", True, True, True), ("blocks, score and filter", True, True, False),
                 ("blocks", True, False, False)]
        tiers = tiers if self.options.compile_layers else []
        full, drain = self.batches[:1], self.batches[1:]
        pool = torch.cuda.graph_pool_handle()   # the steps never run at once: their graphs share one pool
        try:
            for name, compile_blocks, compile_score, compile_draw in tiers + [("nothing", False, False, False)]:
                self.compile_parts(blocks, compile_blocks, compile_score, compile_draw)
                try:
                    self.warm_up(full)
                    self.compiled = name
                    break
                except Exception as e:
                    if not compile_blocks:
                        raise
                    print(f"engine: torch.compile of the {name} failed ({type(e).__name__}: {str(e)[:200]}), "
                          "compiling less", file=sys.stderr)
            self.record(self.slots, pool)
            self.compile_parts(blocks, False, False)
            try:
                self.warm_up(drain)
                for batch in drain:
                    self.record(batch, pool)
            except Exception as e:  # the full step runs every row; the drain only saves time
                print(f"engine: recording the drain's smaller steps failed ({type(e).__name__}: {str(e)[:200]}), "
                      "every step runs the full batch", file=sys.stderr)
                self.batches, self.graphs = self.batches[:1], {self.slots: self.graphs[self.slots]}
        finally:
            self.compile_parts(blocks, False, False)

    def record(self, batch, pool):
        self.graphs[batch] = torch.cuda.CUDAGraph()
        with self.narrowed(batch), torch.cuda.graph(self.graphs[batch], pool=pool):
            self.step()

    def compile_parts(self, hf_blocks, blocks, score, draw=False):
        """Route the decode step through compiled (True) or eager (False) blocks, score/filter and
        draw/bookkeeping."""
        mode = "max-autotune-no-cudagraphs" if self.options.gemm_autotune else None  # the step is one graph already
        for b in hf_blocks:
            b.__dict__.pop("forward", None)
            if blocks:
                b.forward = torch.compile(b.forward, dynamic=False, mode=mode)
        for _, stack in self.groups:
            if stack is not None:
                stack.block = torch.compile(decode_block, dynamic=False, mode=mode) if blocks else decode_block
        self.scores_fn = torch.compile(self.scores_of, dynamic=False) if score else self.scores_of
        self.nucleus_fn = torch.compile(self.nucleus_of, dynamic=False) if score else self.nucleus_of
        # the noise's hash is some 60 tiny integer kernels eagerly, one compiled
        self.uniforms_fn = torch.compile(row_uniforms, dynamic=False) if score else row_uniforms
        self.draw_fn = torch.compile(self.draw, dynamic=False) if draw else self.draw
        self.book_fn = torch.compile(self.book, dynamic=False) if draw else self.book

    def warm_up(self, batches):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for batch in batches:
                with self.narrowed(batch):
                    for _ in range(2):
                        self.step()
        torch.cuda.current_stream().wait_stream(side)

    @contextmanager
    def narrowed(self, batch):
        """Point the step's per-slot state at its first `batch` rows (views), for a step of that batch."""
        full = {name: getattr(self, name) for name in SLOT_STATE}
        for name, t in full.items():
            setattr(self, name, t[:batch])
        try:
            yield
        finally:
            for name, t in full.items():
                setattr(self, name, t)

    def release(self):
        for net in self.nets:
            detach_slot_caches(net)
        self.groups = []

    def advance(self, steps):
        """steps decode steps of the current batch (a graph replay each on GPU)."""
        if self.graphs:
            for _ in range(steps):
                self.graphs[self.batch].replay()
            return
        with self.narrowed(self.batch):
            for _ in range(steps):
                self.step()

    def shrink(self, live):
        """If the live slots fit a smaller step, move their rows (state and cached K/V) into the
        first slots and make that step the current one.  Returns {old slot: new slot} of the moved rows."""
        batch = min(b for b in self.batches if b >= max(len(live), 1))
        if batch >= self.batch:
            return {}
        holes = [s for s in range(len(live)) if s not in live]
        moved = dict(zip([s for s in live if s >= len(live)], holes))
        if moved:
            src, dst = (torch.tensor(list(x), device=self.device) for x in (moved.keys(), moved.values()))
            width = int(self.seq_len[src].max())
            for nets, stack in self.groups:
                if stack is not None:
                    stack.move_slots(src, dst, width)
                    continue
                for m in (m for net in nets for m in attention_layers(net)):
                    for cache in (m.slot_k, m.slot_v):
                        cache[dst, :, :width] = cache[src, :, :width]
            for name in SLOT_STATE:
                t = getattr(self, name)
                t[dst] = t[src]
            self.done[src] = True
        self.batch = batch
        return moved

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
        prefill = Prefill(positions, slot_t, token_rows, token_cols, mask, self.options.prefill_backends)
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


def generate(models, prompts, rows, max_new, params, batch_size, progress=None, options=None, on_done=None):
    """decode.generate_reference over any number of prompts with `batch_size` decode slots, for a
    request the engine runs (unsupported_reason None; decode.generate checks).  progress(tokens, rows)
    is called with the tokens generated and the rows finished since its last call, at each check;
    on_done(i, tokens, ended) once per prompt, when prompt i is done (a prompt with no budget: first).
    options: an EngineOptions (default: EngineOptions())."""
    options = options or EngineOptions()
    check_eps(models, params)
    reason = unsupported_reason(models, params)
    if reason:
        raise ValueError(f"the engine does not run {reason} (decode.generate uses the reference loop for it)")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("engine.generate needs non-empty prompts")
    live = [i for i in range(len(prompts)) if max_new[i] > 0]
    if on_done:
        for i in range(len(prompts)):
            if max_new[i] <= 0:
                on_done(i, [], False)
    if not live:
        return [[] for _ in prompts], [False] * len(prompts)
    start = time.perf_counter()
    with torch.no_grad():
        engine = Engine(models, params, min(batch_size, len(live)),
                        max(len(prompts[i]) + max_new[i] for i in live), max(max_new), options)
    on_gpu = engine.device.type == "cuda"
    try:
        with slot_attention_on(engine.nets), torch.no_grad():
            if on_gpu:
                engine.capture()
                torch.cuda.synchronize()
            if options.timings is not None:
                options.timings["capture_s"] = time.perf_counter() - start
                options.timings["compiled"] = engine.compiled
            scheduler = Scheduler(engine, prompts, rows, max_new, options.check_every or (16 if on_gpu else 1), progress,
                                  on_done)
            return scheduler.run()
    finally:
        engine.release()


class Scheduler:
    """The host loop over one Engine: fill free slots with queued prompts, advance check_every steps,
    harvest the finished rows, repeat until every prompt is done.  With options.refill off, a whole
    batch finishes before the next starts (static batches, for comparison)."""

    def __init__(self, engine, prompts, rows, max_new, check_every, progress=None, on_done=None):
        self.engine, self.options = engine, engine.options
        self.prompts, self.rows, self.max_new = prompts, rows, max_new
        self.check_every, self.progress, self.on_done = check_every, progress, on_done
        self.tokens, self.ended = [[] for _ in prompts], [False] * len(prompts)  # results, in input order
        self.queue = [i for i in reversed(range(len(prompts))) if max_new[i] > 0]  # next prompt last
        self.free = list(range(engine.slots))
        self.owner = [None] * engine.slots      # prompt index held by each slot
        self.counted = [0] * engine.slots       # tokens of the slot's row already reported
        self.clock = {"prefill_s": 0.0, "decode_s": 0.0, "steps": 0, "row_steps": 0}

    def run(self):
        """Decode every queued prompt; returns (tokens, ended) in input order."""
        while True:
            if self.free and self.queue and (self.options.refill or len(self.free) == self.engine.slots):
                self.fill()
            if all(o is None for o in self.owner):
                break
            self.advance()
        if self.options.timings is not None:
            self.options.timings.update(self.clock)
        return self.tokens, self.ended

    def fill(self):
        """Prefill queued prompts into free slots, in groups of at most options.prefill_tokens padded
        tokens (with device syncs around it when timings are asked for)."""
        sync = self.options.timings is not None and self.engine.device.type == "cuda"
        if sync:
            torch.cuda.synchronize()
        start = time.perf_counter()
        while self.free and self.queue:
            group = []
            while self.free and self.queue:
                width = max([len(self.prompts[self.queue[-1]])] + [len(self.prompts[i]) for _, i in group])
                if group and width * (len(group) + 1) > self.options.prefill_tokens:
                    break
                group.append((self.free.pop(0), self.queue.pop()))
            idx = [i for _, i in group]
            self.engine.prefill([s for s, _ in group], [self.prompts[i] for i in idx], [self.rows[i] for i in idx],
                                [self.max_new[i] for i in idx])
            for s, i in group:
                self.owner[s], self.counted[s] = i, 0
        if sync:
            torch.cuda.synchronize()
        self.clock["prefill_s"] += time.perf_counter() - start

    def advance(self):
        """check_every decode steps, then one look at the slots: collect the finished rows, free their
        slots and report progress."""
        start = time.perf_counter()
        self.engine.advance(self.check_every)
        done, n_gen, eos = self.engine.snapshot()
        self.clock["decode_s"] += time.perf_counter() - start
        self.clock["steps"] += self.check_every
        self.clock["row_steps"] += self.check_every * self.engine.batch
        slots = range(self.engine.slots)
        finished = [s for s in slots if self.owner[s] is not None and done[s]]
        if finished:
            rows_out = self.engine.out[finished].cpu()
            for j, s in enumerate(finished):
                self.tokens[self.owner[s]] = rows_out[j, :n_gen[s]].tolist()
                self.ended[self.owner[s]] = eos[s]
                if self.on_done:
                    self.on_done(self.owner[s], self.tokens[self.owner[s]], eos[s])
        if self.progress:
            new = sum(n_gen[s] - self.counted[s] for s in slots if self.owner[s] is not None)
            if new or finished:
                self.progress(new, len(finished))
        self.counted = list(n_gen)
        for s in finished:
            self.owner[s] = None
            self.free.append(s)
        if not self.queue:
            self.drain()

    def drain(self):
        """With nothing left to prefill, run the live rows in a smaller step when they fit one."""
        moved = self.engine.shrink([s for s, o in enumerate(self.owner) if o is not None])
        for src, dst in moved.items():
            self.owner[dst], self.counted[dst] = self.owner[src], self.counted[src]
            self.owner[src], self.counted[src] = None, 0
        self.free = [s for s, o in enumerate(self.owner) if o is None]
