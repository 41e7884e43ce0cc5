"""Generate reasoning traces: greedy holdout traces, ADS or temperature-sampled training traces, and
evaluation traces, each graded before and after answer forcing.

Writes EXP_DIR/traces/NAME (datasets on disk; the pipeline's sentinel, renamed into place last),
NAME.parquet, NAME.yaml (resolved config + stats) and one line of EXP_DIR/metadata/trace_registry.jsonl.
Decoded and finished chunks are kept in EXP_DIR/traces/.NAME.work, so a killed run resumes where it
stopped.

    accelerate launch --config_file acc_config.yaml gentraces.py data_split=gsm8k_train \
        tau=0.9 lam=0.05 eps=0.01 grad_path=exp/student_grads.safetensors exp_dir=exp trace_name=demo
"""
import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Annotated, Literal

import torch
from pydantic import Field

import decode
import grid
import sampling
import tracking
import utils
from utils import die


# the columns gentraces.py writes itself; trace_colname may not take one of their names
OWN_COLUMNS = ("idx", "question", "gold", "system", "prompt", "completion", "has_marker", "n_tokens", "finished",
               "forced", "raw_pred", "af_pred", "raw_correct", "af_correct", "tokens")
VIEWER_ALTERNATIVES = 4  # top alternatives recorded per token for the trace viewer


class GenSettings(utils.Settings):
    """gen_config.yaml's keys with their types and ranges (the yaml holds the defaults and what each
    key means). Every user error is caught here, before a model is loaded or a file written."""
    teacher: utils.ModelPath
    proxy: str | None                           # a model path, checked only when lam != 0 (else unused)
    tokenizer: utils.ModelPath | None
    grad_path: str | None                       # an existing file, checked only when lam != 0
    dtype: utils.Dtype
    proxy_dtype: utils.Dtype | None
    attn_implementation: utils.Attention
    trust_remote_code: bool
    data_split: Literal[tuple(utils.VALID_SPLITS)]
    data_dir: utils.InputDir | None
    max_samples: utils.Count | None
    fewshot: utils.NonNegativeInt
    system_prompt: str | None
    seed: utils.Seed
    batch_size: utils.Count
    max_length: utils.Count
    max_prompt_length: utils.Count
    max_new_tokens: utils.Count | None
    tau: utils.NonNegative
    lam: float                                  # < 0 tilts toward the proxy (pro-distillation): allowed, with a notice
    eps: utils.NonNegative | Literal["auto"]    # > 0 or auto when lam != 0
    fd_check: utils.NonNegativeInt
    fd_check_traces: utils.TracesPath | None
    top_p: Annotated[float, Field(gt=0, le=1)]
    top_k: utils.NonNegativeInt
    repetition_penalty: utils.Positive
    ads_mode: Literal["fd", "jvp"]
    ads_control: Literal[("none", *grid.CONTROLS)]
    token_details: utils.NonNegativeInt
    answer_force: bool
    answer_force_tokens: utils.Count
    engine: Literal["auto", "eager", "reference"]
    drain_steps: utils.NonNegativeInt
    exp_dir: utils.OutputDir
    trace_name: utils.Name
    trace_colname: utils.Name
    role: Literal["holdout", "train", "teacher_eval", "student_eval", "other"]
    grid_row: str | None
    student_seed: utils.Seed | None
    report_to: Literal[tracking.REPORT_TO]

    def problems(self, context):
        out = []
        if self.max_prompt_length >= self.max_length:
            out.append(f"max_prompt_length ({self.max_prompt_length}) must be < max_length ({self.max_length})")
        if self.trace_colname in OWN_COLUMNS:
            out.append(f"trace_colname={self.trace_colname} would overwrite a column of the traces "
                       f"({', '.join(OWN_COLUMNS)})")
        for sub in ("traces", "metadata"):
            problem = utils.output_dir_problem(Path(self.exp_dir) / sub)
            if problem:
                out.append(utils.key_problem("exp_dir", problem, self.exp_dir))
        if self.data_dir and Path(self.data_dir).is_dir():
            missing = [str(p) for p in utils.local_source_files(self.data_split, self.data_dir) if not p.is_file()]
            if missing:
                out.append(f"data_split={self.data_split} reads {missing[0]}, which does not exist")
        out += self.row_problems()
        if self.ads_control != "none" and not self.lam:
            out.append(f"ads_control={self.ads_control} permutes the ADS penalty; it needs lam != 0")
        if self.lam:
            out += self.ads_problems(context)
        problem = tracking.missing_package(self.report_to)
        return out + [problem] if problem else out

    def row_problems(self):
        """The row a trace set records must be the row it samples: a train or teacher-eval set samples
        with the row's own settings (a student eval decodes greedily, whatever its row)."""
        if self.grid_row is None:
            return ["role=train needs grid_row (the row whose train traces these are)"] if self.role == "train" else []
        try:
            row = grid.parse_row(self.grid_row)
        except ValueError as e:
            return [f"grid_row: {e}"]
        eps = row.eps if self.eps == "auto" or not self.lam else float(self.eps)
        if self.role in ("train", "teacher_eval") and grid.Row(self.tau, self.lam, eps, self.ads_control).name != row.name:
            return [f"grid_row={self.grid_row!r} is not what this run samples (tau={self.tau} lam={self.lam} "
                    f"eps={self.eps} ads_control={self.ads_control})"]
        return []

    def ads_problems(self, context):
        """With lam != 0 the proxy and the gradient are used, and the score divides by tau and eps."""
        out = []
        if self.tau == 0:
            out.append("tau=0 is greedy decoding on the teacher; lam must be 0 with it")
        if self.eps == 0:
            out.append("eps must be > 0 (or auto) with lam != 0, got 0")
        if self.eps == "auto" and not self.fd_check:
            out.append("eps=auto picks eps by the FD check; it needs fd_check > 0")
        problem = utils.input_problem(self.proxy, "model", context) if self.proxy else "is required with lam != 0"
        if problem:
            out.append(utils.key_problem("proxy", problem, self.proxy))
        problem = utils.input_problem(self.grad_path, "file", context) if self.grad_path else None
        if not self.grad_path:
            out.append("lam != 0 needs grad_path (the safetensors file written by save_grad.py)")
        elif problem:
            out.append(utils.key_problem("grad_path", problem, self.grad_path))
        return out


def settings(argv, pending=()):
    """The run's config: gen_config.yaml + `key=value` overrides, checked against GenSettings."""
    return utils.load_config("gen_config.yaml", argv, GenSettings, pending)


FD_REGISTRY_KEYS = ("fd_cosine_median", "fd_rel_error_median", "proxy_dtype", "frac_weights_changed_plus")
FD_COSINE_WARNING = 0.9  # median cosine of FD delta_hat with the exact JVP below which a run is warned


def sampling_params(cfg):
    eps = 0.0 if cfg.eps == "auto" else float(cfg.eps or 0.0)  # auto: set by check_fd before sampling
    return sampling.SamplingParams(tau=float(cfg.tau), lam=float(cfg.lam or 0.0), eps=eps,
                                   top_p=float(cfg.top_p), top_k=int(cfg.top_k),
                                   repetition_penalty=float(cfg.repetition_penalty),
                                   seed=int(cfg.seed), ads_mode=cfg.ads_mode, control=cfg.ads_control)


def load_prompts(cfg, tokenizer):
    """Render every question with the generating model's own chat template (or, with fewshot=k, after k
    worked examples as plain text: a base model's evaluation); prompts longer than max_prompt_length are
    dropped and counted. The marker is where a completion starts (None for few-shot prompts: at their end)."""
    examples = utils.load_split(cfg.data_split, cfg.data_dir, cfg.max_samples)
    shots = utils.fewshot_examples(cfg.data_split, cfg.data_dir, cfg.fewshot, cfg.seed,
                                   [ex["question"] for ex in examples]) if cfg.fewshot else None
    marker = None if shots else utils.assistant_marker(tokenizer)
    kept, dropped = [], 0
    for ex in examples:
        if shots:  # plain text: the tokenizer adds the model's BOS itself, as in pretraining
            text = utils.render_fewshot_prompt(shots, ex["question"])
            ids = tokenizer(text, add_special_tokens=True)["input_ids"]
        else:
            text = utils.render_generation_prompt(tokenizer, cfg.system_prompt, ex["question"])
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) > cfg.max_prompt_length:
            dropped += 1
            continue
        kept.append({**ex, "rendered": text, "prompt_ids": ids})
    if not kept:
        die(f"no prompts left in {cfg.data_split} after dropping {dropped} longer than "
            f"max_prompt_length={cfg.max_prompt_length}")
    return kept, marker, dropped


def eos_ids(tokenizer, model):
    ids = {tokenizer.eos_token_id}
    gen_eos = getattr(model.generation_config, "eos_token_id", None)
    ids |= set(gen_eos if isinstance(gen_eos, list) else [gen_eos])
    return sorted(i for i in ids if i is not None)


def preflight_proxy(cfg, teacher_tok):
    """Check the proxy's tokenizer, the gradient against the proxy's shapes (built on the meta device,
    so nothing is loaded) and the FD check's traces before any weights are read."""
    from transformers import AutoConfig, AutoModelForCausalLM
    proxy_tok = utils.load_tokenizer(cfg.proxy, cfg.trust_remote_code, what="proxy")
    if not utils.same_tokenizer(teacher_tok, proxy_tok):
        die(f"teacher {cfg.teacher} and proxy {cfg.proxy} have different tokenizers; ADS needs shared ids")
    grads = sampling.load_gradient(cfg.grad_path)
    config = AutoConfig.from_pretrained(cfg.proxy, trust_remote_code=cfg.trust_remote_code)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=cfg.trust_remote_code)
    sampling.check_gradient_matches(grads, skeleton, cfg.grad_path)
    checks = fd_check_examples(cfg, proxy_tok) if cfg.fd_check and cfg.ads_mode == "fd" else None
    return grads, checks


def fd_check_examples(cfg, proxy_tok):
    """The FD check's sequences: holdout traces tokenized as save_grad.py tokenized them (the proxy's
    template), by default the very traces the gradient was computed on (named in its metadata)."""
    from safetensors import safe_open
    path = cfg.fd_check_traces
    if not path:
        with safe_open(str(cfg.grad_path), "pt") as f:
            path = (f.metadata() or {}).get("traces")
    if not path:
        die(f"{cfg.grad_path} does not name its traces; set fd_check_traces=DIR or fd_check=0")
    examples, _ = utils.tokenize_traces(utils.load_traces(path), proxy_tok, cfg.max_length)
    if not examples:
        die(f"no trace in {path} keeps a completion token within max_length={cfg.max_length} for the FD check")
    return examples


def check_fd(cfg, proxy, grads, checks, params, vocab_size, proxy_dtype, state):
    """Finite differences against the exact JVP on holdout positions, before sampling; with eps=auto,
    first the eps on sampling.EPS_GRID where they agree best.  The main process measures and the others
    take its result, so every process samples with the same eps.  Returns the sidecar's fd_* fields."""
    result = [None]
    if state.is_main_process:
        batches = sampling.check_positions(checks, cfg.fd_check)
        exact = sampling.exact_deltas(proxy, grads, batches, vocab_size)
        if cfg.eps == "auto":
            eps, table = sampling.choose_eps(proxy, grads, batches, vocab_size, proxy_dtype, exact=exact)
            quality = next(row for row in table if row["eps"] == eps)
            result = [{**quality, "eps_auto": True, "eps_candidates": table}]
        else:
            plus, minus, _ = sampling.perturbed_proxies(proxy, grads, params.eps, proxy_dtype)
            result = [{"eps": params.eps, **sampling.fd_quality(
                sampling.fd_deltas(plus, minus, batches, params.eps, vocab_size), exact), "eps_auto": False}]
    if state.num_processes > 1:
        import torch.distributed as dist
        dist.broadcast_object_list(result, src=0)
    fd = result[0]
    if fd["fd_cosine_median"] < FD_COSINE_WARNING:
        utils.log(f"warning: finite differences disagree with the exact JVP (median cosine "
                  f"{fd['fd_cosine_median']:.2f}, median relative error {fd['fd_rel_error_median']:.2f} at eps "
                  f"{fd['eps']:.2e} over {fd['fd_positions']} holdout positions): the ADS penalty is mostly "
                  f"finite-difference error; try eps=auto or proxy_dtype=float32", state.is_main_process)
    return fd


def load_models(cfg, tokenizer, grads, checks, params, state):
    device = state.device
    dtype = utils.torch_dtype(cfg.dtype, device)
    load = lambda path, dt: utils.load_model(path, dt, device, cfg.attn_implementation, cfg.trust_remote_code)
    diagnostics = {}
    plus = minus = proxy = None
    if params.uses_proxy:  # first, so the FD check's JVP never shares the GPU with the teacher
        proxy_dtype = utils.torch_dtype(cfg.proxy_dtype or cfg.dtype, device)
        proxy = load(cfg.proxy, torch.float32)  # fp32 master weights: theta +/- eps g and the exact JVP
        if checks is not None:
            diagnostics.update(check_fd(cfg, proxy, grads, checks, params, len(tokenizer), proxy_dtype, state))
            params.eps = diagnostics["eps"]
        plus, minus, perturbation = sampling.perturbed_proxies(proxy, grads, params.eps, proxy_dtype)
        diagnostics.update(perturbation)
        proxy = proxy.to(proxy_dtype) if params.ads_mode == "jvp" else None
    teacher = load(cfg.teacher, dtype)
    return sampling.DecodeModels(teacher=teacher, vocab_size=len(tokenizer), eos_ids=eos_ids(tokenizer, teacher),
                                 pad_id=tokenizer.pad_token_id, plus=plus, minus=minus, proxy=proxy,
                                 grads=grads if proxy is not None else None,
                                 eps=params.eps if params.uses_proxy else None, diagnostics=diagnostics)


def run_fingerprint(cfg):
    """Chunks on disk are reused only by a run with the same generation-relevant config."""
    keys = ("teacher", "proxy", "tokenizer", "grad_path", "dtype", "proxy_dtype", "data_split", "data_dir",
            "max_samples", "fewshot", "system_prompt", "seed", "max_length", "max_prompt_length", "max_new_tokens",
            "tau", "lam", "eps", "fd_check", "fd_check_traces", "top_p", "top_k", "repetition_penalty", "ads_mode",
            "ads_control", "answer_force", "answer_force_tokens", "token_details")
    # the chunk size too: chunk c of another size holds other rows
    blob = json.dumps({**{k: getattr(cfg, k) for k in keys}, "chunk_rows": chunk_rows(cfg)}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def prepare_workdir(cfg, state):
    """The run's chunk folder, or None for a process that arrives after the main process has already
    published the traces and removed the folder (it had no chunk to write: nothing is left to do)."""
    work = Path(cfg.exp_dir) / "traces" / f".{cfg.trace_name}.work"
    stamp = work / "fingerprint"
    fp = run_fingerprint(cfg)
    if state.is_main_process:
        if work.exists() and (not stamp.exists() or stamp.read_text() != fp):
            shutil.rmtree(work)  # chunks from a different config must not leak into this run
        work.mkdir(parents=True, exist_ok=True)
        utils.atomic_write_text(stamp, fp)
        return work
    published = Path(cfg.exp_dir) / "traces" / cfg.trace_name
    while not stamp.exists() or stamp.read_text() != fp:
        if published.exists():
            return None
        time.sleep(0.2)
    return work


def answer_force(models, tokenizer, rows, cfg, batch_size, engine):
    """Close the trace (</think> if missing), append the forcing string and decode greedily with the
    generating model alone."""
    suffix_plain = tokenizer(utils.AF_SUFFIX, add_special_tokens=False)["input_ids"]
    suffix_close = tokenizer("\n" + utils.THINK_CLOSE + utils.AF_SUFFIX, add_special_tokens=False)["input_ids"]
    prompts = [r["prompt_ids"] + r["gen_ids"] + (suffix_plain if utils.THINK_CLOSE in r["completion"]
                                                 else suffix_close) for r in rows]
    greedy = sampling.SamplingParams(tau=0.0)
    teacher_only = sampling.DecodeModels(teacher=models.teacher, vocab_size=models.vocab_size,
                                         eos_ids=models.eos_ids, pad_id=models.pad_id)
    n = [cfg.answer_force_tokens] * len(rows)
    outs, _ = decode.generate(teacher_only, prompts, [r["idx"] for r in rows], n, greedy, batch_size, engine,
                              drain_steps=cfg.drain_steps)
    return [tokenizer.decode(o, skip_special_tokens=True) for o in outs]


def decode_chunks(models, chunks, which, cfg, params, progress, work):
    """Decode the prompts of chunks `which` in one call, so continuous batching runs across chunks
    (decoded one call each, every chunk ended in steps that ran a draining batch at full cost), and
    keep each chunk's tokens on disk as soon as its last row is done (decoded_path: resume)."""
    examples = [ex for c in which for ex in chunks[c]]
    chunk_of = [c for c in which for _ in chunks[c]]
    first = {c: chunk_of.index(c) for c in which}
    pending = {c: [None] * len(chunks[c]) for c in which}
    left = {c: len(chunks[c]) for c in which}

    def on_done(i, tokens, ended):
        c = chunk_of[i]
        pending[c][i - first[c]] = {"idx": examples[i]["idx"], "gen_ids": tokens, "finished": bool(ended)}
        left[c] -= 1
        if left[c] == 0:
            utils.atomic_write_text(decoded_path(work, c), "".join(json.dumps(r) + "\n" for r in pending.pop(c)))

    budgets = [min(cfg.max_length - len(ex["prompt_ids"]), cfg.max_new_tokens or cfg.max_length) for ex in examples]
    decode.generate(models, [ex["prompt_ids"] for ex in examples], [ex["idx"] for ex in examples], budgets, params,
                    cfg.batch_size, cfg.engine, progress, on_done=on_done, drain_steps=cfg.drain_steps)
    progress.decoded(len(examples))


def build_chunk(models, tokenizer, chunk, decoded, marker, cfg, params):
    """The trace rows of a decoded chunk: completion text, answer forcing and token details."""
    rows = []
    for ex, d in zip(chunk, decoded):
        gen, fin = d["gen_ids"], d["finished"]
        split = (ex["rendered"], "") if marker is None else utils.split_at_marker(ex["rendered"], marker)
        prompt, head = split if split else (ex["rendered"], "")
        completion = head + tokenizer.decode(gen, skip_special_tokens=False)
        if marker is None:
            completion = utils.cut_at_next_question(completion)
        rows.append({"idx": ex["idx"], "question": ex["question"], "gold": ex["gold"],
                     "system": None if marker is None else cfg.system_prompt,  # few-shot prompts have none
                     "prompt": prompt, "completion": completion,
                     "has_marker": split is not None, "n_tokens": len(gen), "finished": bool(fin),
                     "prompt_ids": ex["prompt_ids"], "gen_ids": gen})
    # a few-shot completion is graded on the answer it states, as the base-model evaluation does
    forced = answer_force(models, tokenizer, rows, cfg, cfg.batch_size, cfg.engine) \
        if cfg.answer_force and not cfg.fewshot else [""] * len(rows)
    for row, f in zip(rows, forced):
        row["forced"] = f
        row["tokens"] = json.dumps(token_details(models, tokenizer, params, row)) \
            if row["idx"] < cfg.token_details else ""
        del row["prompt_ids"], row["gen_ids"]
    return rows


def token_texts(tokenizer, ids):
    """Each token's piece of the decoded text, joining to decode(ids): a character spread over several
    byte-level tokens is given to the last of them (decoded alone, each would be a replacement mark)."""
    pieces, done = [], ""
    for t in range(len(ids)):
        text = tokenizer.decode(ids[:t + 1])
        if (text.endswith("\ufffd") and t + 1 < len(ids)) or not text.startswith(done):
            pieces.append("")
            continue
        pieces.append(text[len(done):])
        done = text
    return pieces


def token_details(models, tokenizer, params, row):
    """What the trace viewer shows of one trace: per generated token its text, the teacher's log-prob
    (lp), the ADS term of its score (ads) and the top alternatives by score as [text, lp, ads]."""
    logprobs, ads = sampling.token_terms(models, params, row["prompt_ids"], row["gen_ids"], row["idx"])
    score = sampling.ads_score(logprobs, ads, params.tau, 1.0) if params.tau else logprobs  # ads holds lam
    top = score.topk(min(VIEWER_ALTERNATIVES + 1, score.shape[-1]), dim=-1).indices.tolist() if len(score) else []
    r3 = lambda x: round(float(x), 3)  # noqa: E731
    tokens = []
    for t, (tok, text, alts) in enumerate(zip(row["gen_ids"], token_texts(tokenizer, row["gen_ids"]), top)):
        tokens.append({"t": text, "lp": r3(logprobs[t, tok]), "ads": r3(ads[t, tok]),
                       "alt": [[tokenizer.decode([a]), r3(logprobs[t, a]), r3(ads[t, a])]
                               for a in alts if a != tok][:VIEWER_ALTERNATIVES]})
    return {"tau": params.tau, "lam": params.lam, "control": params.control, "tokens": tokens}


def chunk_rows(cfg):
    return cfg.batch_size * 4  # the resume granularity, and the unit spread over processes


def chunk_path(work, c):
    return work / f"chunk{c:05d}.jsonl"


def decoded_path(work, c):
    return work / f"decoded{c:05d}.jsonl"


def read_decoded(work, c, chunk):
    """Chunk c's decoded rows, or None when there are none for exactly its prompts (not decoded yet,
    or a file cut short)."""
    path = decoded_path(work, c)
    rows = utils.read_jsonl(path) if path.exists() else []
    return rows if [r["idx"] for r in rows] == [ex["idx"] for ex in chunk] else None


def generate_all(cfg, params, state, models, tokenizer, examples, marker, work):
    """Chunk c goes to process c % world.  This process decodes all of its chunks in one call, writing
    each chunk's tokens as soon as it is decoded, then builds each chunk's rows (answer forcing, token
    details).  A chunk already on disk is skipped, a decoded one is not decoded again (resume)."""
    size = chunk_rows(cfg)
    chunks = [examples[i:i + size] for i in range(0, len(examples), size)]
    mine = [c for c in range(len(chunks)) if c % state.num_processes == state.process_index]
    todo = [c for c in mine if not chunk_path(work, c).exists()]
    decoded = {c: read_decoded(work, c, chunks[c]) for c in todo}  # left by a stopped run
    undecoded = [c for c in todo if decoded[c] is None]
    progress = Progress(state, sum(len(chunks[c]) for c in mine), sum(len(chunks[c]) for c in mine if c not in undecoded))
    if undecoded:
        decode_chunks(models, chunks, undecoded, cfg, params, progress, work)
    progress.bar.close()
    from tqdm import tqdm
    for c in tqdm(todo, desc=f"rows: answer forcing (rank {state.process_index})", unit="chunk",
                  disable=not state.is_main_process or not todo, dynamic_ncols=True):
        done = decoded[c] or read_decoded(work, c, chunks[c])
        rows = build_chunk(models, tokenizer, chunks[c], done, marker, cfg, params)
        utils.atomic_write_text(chunk_path(work, c), "".join(json.dumps(r) + "\n" for r in rows))
        decoded_path(work, c).unlink(missing_ok=True)  # the main process may have removed the folder already
    return len(chunks)


class Progress:
    """The stage's progress line: rows finished of this process's share, tokens/s and the time left,
    moved by the decoder as rows finish (not once per chunk)."""

    def __init__(self, state, total, done):
        from tqdm import tqdm
        self.bar = tqdm(total=total, initial=done, desc=f"traces (rank {state.process_index})", unit="row",
                        disable=not state.is_main_process, dynamic_ncols=True)
        self.tokens, self.in_call = 0, 0

    def __call__(self, tokens, rows):
        self.tokens += tokens
        self.in_call += rows
        elapsed = max(self.bar.format_dict["elapsed"], 1e-9)
        self.bar.set_postfix_str(f"{self.tokens / elapsed:,.0f} tok/s", refresh=False)
        self.bar.update(rows)

    def decoded(self, n_rows):
        """Rows that needed no decoding (an empty budget) are counted when the decoding call returns."""
        self.bar.update(n_rows - self.in_call)
        self.in_call = 0


def gather(work, n_chunks):
    """Main process: wait for every chunk file (other ranks may still be decoding), in input order."""
    paths = [work / f"chunk{c:05d}.jsonl" for c in range(n_chunks)]
    while not all(p.exists() for p in paths):
        time.sleep(1.0)
    rows = [r for p in paths for r in utils.read_jsonl(p)]
    return sorted(rows, key=lambda r: r["idx"])


def grade(rows, dataset, colname, fewshot=False):
    for r in rows:
        r["raw_pred"] = utils.fewshot_answer(r["completion"]) if fewshot else utils.extract_boxed(r["completion"])
        r["af_pred"] = utils.forced_answer(r["forced"]) if r["forced"] else r["raw_pred"]
        r["raw_correct"] = utils.is_correct(dataset, r["raw_pred"], r["gold"])
        r["af_correct"] = utils.is_correct(dataset, r["af_pred"], r["gold"])
        r[colname] = r["prompt"] + r["completion"]
    return rows


def trace_stats(rows, n_dropped, seconds):
    lengths = sorted(r["n_tokens"] for r in rows)
    n = len(rows)
    pct = lambda q: lengths[min(n - 1, int(q * n))]
    return {
        "n": n,
        "raw_accuracy": sum(r["raw_correct"] for r in rows) / n,
        "af_accuracy": sum(r["af_correct"] for r in rows) / n,
        "n_dropped_long_prompt": n_dropped,
        "n_without_marker": sum(not r["has_marker"] for r in rows),
        "n_unparseable_raw": sum(r["raw_pred"] is None for r in rows),
        "n_unparseable_af": sum(r["af_pred"] is None for r in rows),
        "finished_fraction": sum(r["finished"] for r in rows) / n,
        "length_mean": sum(lengths) / n,
        "length_median": pct(0.5),
        "length_p90": pct(0.9),
        "length_max": lengths[-1],
        "generated_tokens": sum(lengths),
        "wall_seconds": round(seconds, 2),
    }


def save_outputs(cfg, rows, stats, diagnostics):
    """parquet, yaml sidecar, registry line, then the dataset directory: the sentinel comes last."""
    import datasets
    traces = Path(cfg.exp_dir) / "traces"
    name = cfg.trace_name
    ds = datasets.Dataset.from_list(rows)
    tmp_parquet = traces / f".{name}.parquet.tmp-{os.getpid()}"
    ds.to_parquet(str(tmp_parquet))
    os.replace(tmp_parquet, traces / f"{name}.parquet")
    sidecar = {"config": vars(cfg), "stats": stats, "diagnostics": diagnostics}
    utils.atomic_write_text(traces / f"{name}.yaml", utils.to_yaml(sidecar))
    utils.append_registry(cfg.exp_dir, {
        "name": name, "path": str(traces / name), "data_split": cfg.data_split, "model": cfg.teacher,
        "tau": float(cfg.tau), "lam": float(cfg.lam or 0.0), "eps": float(diagnostics["eps"]),
        "n": stats["n"], "raw_accuracy": stats["raw_accuracy"], "af_accuracy": stats["af_accuracy"],
        "role": cfg.role, "row": grid.parse_row(cfg.grid_row).fields() if cfg.grid_row else None,
        "student_seed": cfg.student_seed, "fewshot": cfg.fewshot,
        **{k: diagnostics[k] for k in FD_REGISTRY_KEYS if k in diagnostics}})
    tmp_dir = traces / f".{name}.tmp-{os.getpid()}"
    ds.save_to_disk(str(tmp_dir))
    utils.atomic_publish_dir(tmp_dir, traces / name)


def log_stage_numbers(cfg, stats, diagnostics):
    """The run's accuracy, speed and FD quality to the tracker report_to names (EXP_DIR/runs/NAME)."""
    numbers = {"af_accuracy": stats["af_accuracy"], "raw_accuracy": stats["raw_accuracy"],
               "tokens_per_s": stats["generated_tokens"] / max(stats["wall_seconds"], 1e-9),
               "length_mean": stats["length_mean"], "wall_s": stats["wall_seconds"],
               **{k: diagnostics[k] for k in ("fd_cosine_median", "fd_rel_error_median", "eps") if k in diagnostics}}
    tracker = tracking.open_tracker(cfg.report_to, Path(cfg.exp_dir) / "runs" / cfg.trace_name, cfg.trace_name,
                                    vars(cfg))
    tracker.log({f"gentraces/{k}": v for k, v in numbers.items() if v is not None})
    tracker.close()


def main(argv):
    cfg = settings(argv)
    from accelerate import PartialState
    state = PartialState(cpu=not torch.cuda.is_available())  # CPU processes talk over gloo
    memory_cap = utils.cap_cuda_memory(state.device)
    if cfg.lam < 0:
        utils.log(f"notice: lam={cfg.lam} < 0 tilts sampling toward tokens that lower the proxy's loss: "
                  "traces easier to distill, the opposite of ADS", state.is_main_process)
    utils.seed_everything(cfg.seed)
    params = sampling_params(cfg)
    tokenizer = utils.load_tokenizer(cfg.tokenizer or cfg.teacher, cfg.trust_remote_code,
                                     what="tokenizer" if cfg.tokenizer else "teacher")
    grads, checks = preflight_proxy(cfg, tokenizer) if params.uses_proxy else (None, None)
    examples, marker, n_dropped = load_prompts(cfg, tokenizer)
    start = time.time()
    models = load_models(cfg, tokenizer, grads, checks, params, state)
    work = prepare_workdir(cfg, state)
    if work is None:
        return
    n_chunks = generate_all(cfg, params, state, models, tokenizer, examples, marker, work)
    if not state.is_main_process:
        return
    rows = grade(gather(work, n_chunks), utils.parse_split(cfg.data_split)[0], cfg.trace_colname, cfg.fewshot > 0)
    stats = trace_stats(rows, n_dropped, time.time() - start)
    diagnostics = {**models.diagnostics, "eps": params.eps, "processes": state.num_processes, "device": str(state.device),
                   "engine": cfg.engine, "drain_steps": cfg.drain_steps, "vocab_size": models.vocab_size,
                   "peak_gpu_memory_gib": utils.peak_gpu_gib(state.device), "memory_cap_gib": memory_cap}
    save_outputs(cfg, rows, stats, diagnostics)
    log_stage_numbers(cfg, stats, diagnostics)
    shutil.rmtree(work, ignore_errors=True)
    utils.log(f"{cfg.trace_name}: n={stats['n']} raw_acc={stats['raw_accuracy']:.3f} "
              f"af_acc={stats['af_accuracy']:.3f} mean_len={stats['length_mean']:.1f}")


if __name__ == "__main__":
    utils.run_cli(main)
