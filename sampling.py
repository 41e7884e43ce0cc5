"""The ADS math: the score, the token rule, the perturbed proxies and finite-difference quality.

    delta_hat = (log_softmax(z_plus) - log_softmax(z_minus)) / (2 eps)
    score     = log_softmax(z_T) / tau + lam * delta_hat        (paper Eq. 11)
    x_{t+1}  ~ softmax(top_p(top_k(score)))

z_plus / z_minus are the logits of the proxy student with weights theta_P +/- eps * g, where g is
the gradient of the proxy's loss on the teacher's holdout traces (save_grad.py).  Every random
draw is keyed on (seed, prompt index, position), so the traces do not depend on batch size,
process count, continuous-batching order or resuming.  No decoding here: decode.py runs these rules
(its reference loop, or engine.py), gentraces.py builds the proxies and checks eps.
"""
import copy
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from utils import die


@dataclass
class SamplingParams:
    tau: float = 0.0                 # 0 = greedy on the teacher
    lam: float = 0.0                 # 0 = plain temperature sampling
    eps: float = 1e-2
    top_p: float = 1.0
    top_k: int = 0                   # 0 = off
    repetition_penalty: float = 1.0
    seed: int = 0
    ads_mode: str = "fd"             # fd | jvp
    control: str = "none"            # none | permute: delta_hat shuffled over the vocabulary (paper's control)

    @property
    def greedy(self):
        return self.tau == 0

    @property
    def uses_proxy(self):
        return self.lam != 0 and self.tau != 0


@dataclass
class DecodeModels:
    teacher: torch.nn.Module
    vocab_size: int                  # ids the tokenizer defines; wider logits are padding rows
    eos_ids: list
    pad_id: int
    plus: torch.nn.Module = None     # proxy at theta + eps g
    minus: torch.nn.Module = None    # proxy at theta - eps g
    proxy: torch.nn.Module = None    # unperturbed proxy, only for ads_mode=jvp
    grads: dict = None               # name -> g, only for ads_mode=jvp
    eps: float = None                # the eps plus and minus were built with (check_eps holds params to it)
    diagnostics: dict = field(default_factory=dict)


def check_eps(models, params):
    """A finite-difference ADS run must use the eps its proxies were built with: delta_hat divides
    by 2 eps, so any other eps would silently rescale the penalty."""
    if not (params.uses_proxy and params.ads_mode == "fd"):
        return
    if models.eps is None:
        raise ValueError("DecodeModels.eps is not set: record the eps that plus and minus were built with "
                         "(sampling.perturbed_proxies), so that the penalty's scale can be checked")
    if not math.isclose(models.eps, params.eps, rel_tol=1e-6):
        raise ValueError(f"SamplingParams.eps={params.eps:g} but the proxies were built with eps={models.eps:g}: "
                         f"delta_hat would be off by a factor of {models.eps / params.eps:g}")


def fd_delta(z_plus, z_minus, eps):
    """Central finite difference of the proxy's log-probs along g: (lsm(z+) - lsm(z-)) / (2 eps)."""
    return (F.log_softmax(z_plus.float(), dim=-1) - F.log_softmax(z_minus.float(), dim=-1)) / (2 * eps)


def ads_score(z_teacher, delta, tau, lam):
    """score = log_softmax(z_T)/tau + lam * delta_hat, with delta_hat from fd_delta or exact_delta.

    lam is not divided by tau (the reference added the penalty to raw logits before Hugging Face's
    temperature, so its effective strength was lam/tau).  Inputs are (B, V) on the same ids."""
    score = F.log_softmax(z_teacher.float(), dim=-1) / tau
    return score + lam * delta if lam else score


def permute_vocab(delta, seed, rows, steps):
    """The paper's permutation control: each row's delta_hat shuffled over the vocabulary by a fresh
    permutation per (seed, row, position).  The penalty keeps its values and scale but loses its
    link to the tokens, so a control row shows what the gradient signal itself contributes."""
    cols = torch.arange(delta.shape[-1], device=delta.device)
    keys = _mix32(rows.long()[:, None] * 0x9E3779B1 + _mix32(steps.long()[:, None] * 0x85EBCA77 + cols))
    keys = _mix32(keys ^ _mix32(torch.full_like(keys, seed) + 0x27D4EB2F))
    return delta.gather(-1, keys.argsort(dim=-1, stable=True))


def _mix32(x):
    # lowbias32 integer hash; int64 arithmetic masked to 32 bits is exact on every device
    m = 0xFFFFFFFF
    x = x & m
    x = (x ^ (x >> 16)) * 0x7FEB352D & m
    x = (x ^ (x >> 15)) * 0x846CA68B & m
    return x ^ (x >> 16)


def row_uniforms(seed, rows, steps):
    """One uniform in (0, 1) per row, a pure function of (seed, row id, position)."""
    h = _mix32(rows.long() * 0x9E3779B1 + _mix32(steps.long() + 0x632BE5AB))
    h = _mix32(h ^ _mix32(torch.full_like(h, seed) + 0x1B873593))
    return (h.double() + 0.5).div(2.0 ** 32).float()


def filter_top_k_top_p(probs, top_k=0, top_p=1.0):
    """Zero out tokens outside top-k, then outside the nucleus: a token is kept when the mass of
    the tokens ranked above it is < top_p (so at least one token always survives)."""
    if top_k and top_k < probs.shape[-1]:
        kth = probs.topk(top_k, dim=-1).values[:, -1:]
        probs = torch.where(probs >= kth, probs, 0.0)
    if top_p < 1.0:
        srt = probs.sort(dim=-1, descending=True).values
        total = srt.sum(-1, keepdim=True)
        n_keep = ((srt.cumsum(-1) - srt) < top_p * total).sum(-1, keepdim=True).clamp(min=1)
        threshold = srt.gather(-1, n_keep - 1)
        probs = torch.where(probs >= threshold, probs, 0.0)
    return probs


def sample_from_scores(scores, u, top_k=0, top_p=1.0):
    """Inverse-CDF sample over vocabulary order with one uniform per row: exact for any order and
    reproducible, since the noise is not tied to the batch."""
    probs = filter_top_k_top_p(torch.softmax(scores.float(), dim=-1), top_k, top_p)
    cdf = probs.cumsum(-1)
    target = u.unsqueeze(-1) * cdf[:, -1:]
    return (cdf < target).sum(-1).clamp(max=probs.shape[-1] - 1)


def apply_repetition_penalty(logits, seen, penalty):
    """Hugging Face semantics: divide positive logits of seen tokens by penalty, multiply negatives."""
    if penalty == 1.0:
        return logits
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def next_tokens(z_teacher, delta, params, u, seen=None):
    """The token rule for one step on aligned (B, V) logits: greedy on the teacher when tau = 0."""
    if seen is not None:
        z_teacher = apply_repetition_penalty(z_teacher.float(), seen, params.repetition_penalty)
    if params.greedy:
        return z_teacher.argmax(-1)
    score = ads_score(z_teacher, delta, params.tau, params.lam)
    return sample_from_scores(score, u, params.top_k, params.top_p)


# gradients and perturbed proxies

def load_gradient(path):
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    try:
        grads = load_file(str(path))
    except FileNotFoundError:
        die(f"gradient file {path} does not exist (run save_grad.py first)")
    except (SafetensorError, OSError, ValueError) as e:
        die(f"gradient file {path} is not a readable safetensors file ({str(e).splitlines()[0]})")
    for name, g in grads.items():
        if not torch.isfinite(g).all():
            die(f"gradient file {path} holds NaN or Inf values (first in {name})")
    return grads


def check_gradient_matches(grads, model, path=""):
    """Name the first missing, extra and mis-shaped tensors instead of failing deep inside torch."""
    params = dict(model.named_parameters())
    missing = [n for n in params if n not in grads]
    extra = [n for n in grads if n not in params]
    shaped = [n for n in params if n in grads and grads[n].shape != params[n].shape]
    if missing or extra or shaped:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (first {missing[0]})")
        if extra:
            parts.append(f"{len(extra)} extra (first {extra[0]})")
        if shaped:
            n = shaped[0]
            parts.append(f"{len(shaped)} mis-shaped (first {n}: {tuple(grads[n].shape)} vs {tuple(params[n].shape)})")
        die(f"gradient {path} does not match the proxy: " + "; ".join(parts))


@torch.no_grad()
def perturbed_proxies(proxy, grads, eps, dtype=None):
    """theta +/- eps g, computed in fp32 and cast once to dtype (default: the proxy's), before sampling.

    In low precision a small eps*g can round away entirely, so report the fraction of weights the
    cast actually changed, and the RMS of the weights and of g."""
    dtype = dtype or next(proxy.parameters()).dtype
    plus, minus = copy.deepcopy(proxy).to(dtype), copy.deepcopy(proxy).to(dtype)
    n_total = changed_plus = changed_minus = 0
    sq_param = sq_grad = 0.0
    for (name, p), q_plus, q_minus in zip(proxy.named_parameters(), plus.parameters(), minus.parameters()):
        base = p.detach().float()
        step = eps * grads[name].to(device=p.device, dtype=torch.float32)
        unchanged = base.to(dtype)
        q_plus.copy_((base + step).to(dtype))
        q_minus.copy_((base - step).to(dtype))
        n_total += p.numel()
        changed_plus += (q_plus != unchanged).sum().item()
        changed_minus += (q_minus != unchanged).sum().item()
        sq_param += base.pow(2).sum().item()
        sq_grad += grads[name].float().pow(2).sum().item()
    diagnostics = {
        "proxy_dtype": str(dtype).replace("torch.", ""),
        "frac_weights_changed_plus": changed_plus / n_total,
        "frac_weights_changed_minus": changed_minus / n_total,
        "param_rms": math.sqrt(sq_param / n_total),
        "grad_rms": math.sqrt(sq_grad / n_total),
        "grad_norm": math.sqrt(sq_grad),
    }
    return plus.eval(), minus.eval(), diagnostics


def _logprob_jvp(proxy, grads, logits_of):
    """Forward-mode derivative along g of log_softmax(logits_of(weights)) at the proxy's weights."""
    from torch.func import jvp
    names = [n for n, _ in proxy.named_parameters()]
    primals = tuple(p.detach() for _, p in proxy.named_parameters())
    tangents = tuple(grads[n].to(p.device, p.dtype) for n, p in zip(names, primals))

    def logprobs(*weights):
        return F.log_softmax(logits_of(dict(zip(names, weights))).float(), dim=-1)

    # forward-mode AD has no rule for the fused SDPA kernels: run this call with eager attention
    previous = proxy.config._attn_implementation
    proxy.set_attn_implementation("eager")
    try:
        return jvp(logprobs, primals, tangents)[1]
    finally:
        proxy.set_attn_implementation(previous)


def exact_delta(proxy, grads, input_ids, attention_mask, position_ids, vocab_size):
    """d/d eps log_softmax(z(theta + eps g)) at eps = 0, for the last position, by forward-mode AD
    (paper App. C).  Recomputes the whole sequence: a correctness reference, not a fast path."""
    from torch.func import functional_call

    def last_logits(weights):
        out = functional_call(proxy, weights, args=(), kwargs=dict(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False))
        return out.logits[:, -1, :vocab_size]
    return _logprob_jvp(proxy, grads, last_logits)


# finite-difference quality: FD delta_hat against the exact JVP on holdout positions

EPS_GRID = [10.0 ** (k / 2) for k in range(-10, -1)]  # 1e-5 .. 1e-1 in half decades (paper App. B's sweep)


def check_positions(examples, n_positions, max_sequences=32):
    """(input_ids, positions) per sequence for the FD check: up to max_sequences (ids, labels) pairs
    from utils.tokenize_traces, each cut after its last chosen position, with positions spread evenly
    over those whose next token is a completion token (where the sampler acts)."""
    chosen = [ex for ex in examples if sum(label != -100 for label in ex[1][1:])][:max_sequences]
    per_sequence = max(1, math.ceil(n_positions / max(1, len(chosen))))
    batches = []
    for ids, labels in chosen:
        candidates = [t for t in range(len(ids) - 1) if labels[t + 1] != -100]
        step = len(candidates) / min(per_sequence, len(candidates))
        picked = sorted({candidates[int(i * step)] for i in range(min(per_sequence, len(candidates)))})
        batches.append((torch.tensor(ids[:picked[-1] + 1]), torch.tensor(picked)))
    return batches


def _logits_at(model, ids, positions, vocab_size):
    return model(input_ids=ids[None], logits_to_keep=positions, use_cache=False).logits[0, :, :vocab_size]


@torch.no_grad()
def fd_deltas(plus, minus, batches, eps, vocab_size):
    """FD delta_hat at every check position, (positions, V), as the sampler computes it."""
    device = next(plus.parameters()).device
    out = []
    for ids, pos in batches:
        ids, pos = ids.to(device), pos.to(device)
        out.append(fd_delta(_logits_at(plus, ids, pos, vocab_size), _logits_at(minus, ids, pos, vocab_size), eps))
    return torch.cat(out)


def exact_deltas(proxy, grads, batches, vocab_size):
    """The exact derivative along g of the proxy's log-probs at every check position, by JVP."""
    from torch.func import functional_call
    device = next(proxy.parameters()).device
    out = []
    for ids, pos in batches:
        ids, pos = ids.to(device), pos.to(device)
        out.append(_logprob_jvp(proxy, grads, lambda w: functional_call(
            proxy, w, args=(), kwargs=dict(input_ids=ids[None], logits_to_keep=pos, use_cache=False)
        ).logits[0, :, :vocab_size]))
    return torch.cat(out)


def token_terms(models, params, prompt_ids, gen_ids, row):
    """The two parts of the sampler's score at each generated position, recomputed teacher-forced from
    the prompt and the generated tokens (the trace viewer's data): the teacher's log-probs and the ADS
    term lam * delta_hat (the row's control applied; zeros without ADS), each (len(gen_ids), V)."""
    check_eps(models, params)
    device = next(models.teacher.parameters()).device
    ids = torch.tensor(list(prompt_ids) + list(gen_ids), device=device)
    pos = torch.arange(len(prompt_ids) - 1, len(ids) - 1, device=device)
    with torch.no_grad():
        logprobs = F.log_softmax(_logits_at(models.teacher, ids, pos, models.vocab_size).float(), dim=-1)
        if not params.uses_proxy:
            return logprobs, torch.zeros_like(logprobs)
        if params.ads_mode == "fd":
            delta = fd_delta(_logits_at(models.plus, ids, pos, models.vocab_size),
                             _logits_at(models.minus, ids, pos, models.vocab_size), params.eps)
    if params.ads_mode != "fd":
        delta = exact_deltas(models.proxy, models.grads, [(ids, pos)], models.vocab_size).detach()
    if params.control == "permute":
        steps = torch.arange(len(gen_ids), device=device)
        delta = permute_vocab(delta, params.seed, torch.full_like(steps, row), steps)
    return logprobs, params.lam * delta.float()


def fd_quality(fd, exact):
    """Per-position cosine and relative error ||fd - exact|| / ||exact|| of FD against the JVP."""
    fd, exact = fd.double(), exact.double()
    cosine = F.cosine_similarity(fd, exact, dim=-1)
    rel = (fd - exact).norm(dim=-1) / exact.norm(dim=-1).clamp(min=1e-30)
    return {"fd_positions": int(fd.shape[0]), "fd_cosine_median": cosine.median().item(),
            "fd_cosine_min": cosine.min().item(), "fd_rel_error_median": rel.median().item()}


def choose_eps(proxy, grads, batches, vocab_size, dtype=None, grid=EPS_GRID, exact=None):
    """The eps on grid whose FD delta_hat (proxies cast to dtype, as sampling will use them) has the
    smallest median relative error against the exact JVP; returns it and every candidate's quality."""
    exact = exact_deltas(proxy, grads, batches, vocab_size) if exact is None else exact
    table = []
    for eps in grid:
        plus, minus, _ = perturbed_proxies(proxy, grads, eps, dtype)
        table.append({"eps": eps, **fd_quality(fd_deltas(plus, minus, batches, eps, vocab_size), exact)})
        del plus, minus
    best = min(table, key=lambda row: row["fd_rel_error_median"])
    return best["eps"], table
