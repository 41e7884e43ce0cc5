"""Stage 2: g, the gradient of the proxy student's loss on the teacher's holdout traces.

l(theta_P) = mean over holdout sequences of the token-mean NLL on completion tokens only, with the
prompt rendered by the proxy's own chat template; g = grad l in fp32, not normalised, the same for
any process count and batch size: sequences are sharded by index, per-process sums are all-reduced,
and no DDP wrapper is used (so saved keys are exactly proxy.named_parameters() names).

    accelerate launch --config_file acc_config.yaml save_grad.py proxy=Qwen/Qwen2.5-3B \
        traces=exp/traces/holdout out=exp/student_grads.safetensors
"""
import math
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from accelerate import PartialState
from safetensors.torch import save_file
from tqdm import tqdm

from utils import (Attention, Count, ModelPath, OutputFile, Settings, TracesPath, cap_cuda_memory, die, load_config,
                   load_model, load_tokenizer, load_traces, log, peak_gpu_gib, read_sidecar, run_cli,
                   same_tokenizer, tokenize_traces)


class GradSettings(Settings):
    """grad_config.yaml's keys with their types and ranges (the yaml holds the defaults). Unchecked, a
    batch_size of 0 failed after the model load, a negative one saved g = 0, max_length < 0 cut every
    sequence from the end, and an unwritable out failed after the whole backward pass."""
    proxy: ModelPath
    traces: TracesPath
    out: OutputFile
    batch_size: Count
    max_length: Count
    trust_remote_code: bool
    attn_implementation: Attention


def settings(argv, pending=()):
    """The run's config: grad_config.yaml + `key=value` overrides, checked against GradSettings."""
    return load_config("grad_config.yaml", argv, GradSettings, pending)


def check_traces_tokenizer(cfg, tokenizer):
    """ADS adds proxy log-probs to the teacher's token by token, so g is only usable for a proxy with
    the teacher's tokenizer (gentraces.py refuses any other pair). The traces' yaml sidecar names the
    model whose tokenizer wrote them; a mismatch is refused now rather than after the backward pass.
    Traces without a sidecar, or whose model cannot be loaded here, are not checked."""
    sidecar = read_sidecar(Path(cfg.traces))
    if sidecar is None:
        return
    gen = sidecar.get("config") or {}
    source = gen.get("tokenizer") or gen.get("teacher")
    if not source:
        return
    from transformers import AutoTokenizer
    try:
        source_tok = AutoTokenizer.from_pretrained(str(source), trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError):
        log(f"cannot load {source} (named by {cfg.traces}.yaml) to check that it shares the proxy's tokenizer",
            os.environ.get("RANK", "0") == "0")
        return
    if not same_tokenizer(source_tok, tokenizer):
        die(f"proxy {cfg.proxy} and {source}, whose tokenizer wrote {cfg.traces}, have different tokenizers; "
            f"ADS needs the proxy to share the teacher's token ids")


def shard(examples, rank, world):
    """Longest first (less padding per batch, and an out-of-memory shows at once), every world-th."""
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i][0]))
    return [examples[i] for i in order[rank::world]]


def collate(batch, pad_id, device):
    """Right-pad a list of (input_ids, labels); padded positions get mask 0 and label -100."""
    width = max(len(ids) for ids, _ in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full_like(input_ids, -100)
    mask = torch.zeros_like(input_ids)
    for row, (ids, lab) in enumerate(batch):
        input_ids[row, :len(ids)] = torch.tensor(ids)
        labels[row, :len(lab)] = torch.tensor(lab)
        mask[row, :len(ids)] = 1
    return input_ids.to(device), mask.to(device), labels.to(device)


def sequence_nll(model, input_ids, mask, labels):
    """Each sequence's token-mean NLL over its completion tokens, and its count of those tokens."""
    logits = model(input_ids=input_ids, attention_mask=mask).logits[:, :-1].float()
    targets = labels[:, 1:]
    nll = F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=-100, reduction="none")
    counts = (targets != -100).sum(dim=1)
    return nll.sum(dim=1) / counts, counts


def accumulate_gradient(model, examples, batch_size, n_total, pad_id, device, show_progress):
    """Backpropagate sum_i mean_nll_i / n_total over this process's sequences; returns the local
    (sum of mean NLLs, completion token count) as a float64 tensor for the all-reduce."""
    stats = torch.zeros(2, dtype=torch.float64, device=device)
    batches = [examples[i:i + batch_size] for i in range(0, len(examples), batch_size)]
    for batch in tqdm(batches, desc="proxy gradient", disable=not show_progress):
        nll, counts = sequence_nll(model, *collate(batch, pad_id, device))
        (nll.sum() / n_total).backward()
        stats += torch.stack([nll.detach().sum().double(), counts.sum().double()])
    return stats


def reduce_gradient(model, stats, world):
    """Sum every process's gradient and stats in place; parameters nothing reached get g = 0."""
    for p in model.parameters():
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        if world > 1:
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
    if world > 1:
        dist.all_reduce(stats, op=dist.ReduceOp.SUM)
    return stats.cpu()


def save_gradient(model, stats, cfg, n_sequences, n_dropped, world, costs):
    """g as fp32 safetensors with string metadata, written to a temporary name and renamed into place."""
    grads = {name: p.grad.detach().float().cpu().contiguous() for name, p in model.named_parameters()}
    meta = dict(n_sequences=n_sequences, n_dropped=n_dropped, n_tokens=int(stats[1].item()),
                loss=stats[0].item() / n_sequences,
                grad_norm=math.sqrt(sum(g.double().pow(2).sum().item() for g in grads.values())),
                proxy=cfg.proxy, traces=cfg.traces, max_length=cfg.max_length, n_processes=world, **costs)
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    save_file(grads, str(tmp), metadata={k: str(v) for k, v in meta.items()})
    os.replace(tmp, out)
    return meta


def main(argv):
    cfg = settings(argv)
    state = PartialState(cpu=not torch.cuda.is_available())  # CPU processes talk over gloo
    main_process, world = state.is_main_process, state.num_processes
    memory_cap = cap_cuda_memory(state.device)
    start = time.time()
    ds = load_traces(cfg.traces)
    tokenizer = load_tokenizer(cfg.proxy, cfg.trust_remote_code, what="proxy")
    check_traces_tokenizer(cfg, tokenizer)
    examples, dropped = tokenize_traces(ds, tokenizer, cfg.max_length)
    if not examples:
        die(f"no trace in {cfg.traces} keeps a completion token within max_length={cfg.max_length}")
    if dropped:
        log(f"dropped {len(dropped)} traces with no completion token within max_length={cfg.max_length} "
            f"(idx {dropped[:10]}{' ...' if len(dropped) > 10 else ''})", main_process)

    model = load_model(cfg.proxy, torch.float32, state.device, cfg.attn_implementation, cfg.trust_remote_code)
    model.requires_grad_(True)
    local = shard(examples, state.process_index, world)
    stats = accumulate_gradient(model, local, cfg.batch_size, len(examples), tokenizer.pad_token_id,
                                state.device, main_process)
    stats = reduce_gradient(model, stats, world)
    if main_process:
        costs = dict(wall_seconds=round(time.time() - start, 2), peak_gpu_memory_gib=peak_gpu_gib(state.device),
                     memory_cap_gib=memory_cap)
        meta = save_gradient(model, stats, cfg, len(examples), len(dropped), world, costs)
        log(f"wrote {cfg.out}: {meta['n_sequences']} sequences, {meta['n_tokens']} completion tokens, "
            f"loss {meta['loss']:.4f}, |g| {meta['grad_norm']:.4e}, {meta['wall_seconds']:.1f} s"
            + (f", peak {meta['peak_gpu_memory_gib']} GiB" if meta["peak_gpu_memory_gib"] else ""))
    state.wait_for_everyone()
    if world > 1:
        state.destroy_process_group()


if __name__ == "__main__":
    run_cli(main)
