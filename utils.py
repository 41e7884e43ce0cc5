"""Shared helpers for every stage: config and overrides, datasets and splits, chat rendering,
grading, the trace registry, atomic outputs, seeding and model loading.

Nothing here knows about ADS itself (that is sampling.py) and nothing here branches on a model
name: chat formats come from each tokenizer's own template.
"""
import difflib
import fcntl
import json
import os
import random
import re
import shutil
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import yaml

REPO = Path(__file__).resolve().parent
AF_SUFFIX = "\n\n**Final Answer**\n\\[\\boxed{"  # answer forcing, appended after the trace
THINK_CLOSE = "</think>"
SPLIT_SEED = 42  # the holdout/train split is part of the experiment's definition, not a knob


class ConfigError(SystemExit):
    """A user error: printed as one line, exit status 2, no traceback."""

    def __init__(self, msg):
        super().__init__(f"error: {msg}")
        self.code = 2
        self.msg = msg


def die(msg):
    raise ConfigError(msg)


# config

def run_cli(main):
    """Run a script's main(argv): a user error is one 'error: ...' line and exit status 2, Ctrl-C a
    one-line notice (everything finished is on disk)."""
    try:
        main(sys.argv[1:])
    except ConfigError as e:
        print(f"error: {e.msg}", file=sys.stderr, flush=True)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted: finished work is kept; rerun the same command to resume", file=sys.stderr)
        sys.exit(130)


_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def parse_overrides(args):
    out = {}
    for arg in args:
        key, sep, value = arg.partition("=")
        if not sep or not key:
            die(f"expected key=value, got {arg!r}")
        parsed = yaml.safe_load(value) if value != "" else None
        if isinstance(parsed, str) and _FLOAT.fullmatch(parsed):
            parsed = float(parsed)  # YAML 1.1 reads 5e-4 (no dot) as a string
        out[key.strip()] = parsed
    return out


SYNONYMS = {"temperature": "tau", "lambda": "lam", "epsilon": "eps"}  # the paper's words for our keys


def load_config(yaml_name, args):
    """yaml defaults + `key=value` overrides; an unknown key is an error naming the closest one."""
    path = Path(yaml_name)
    if not path.is_absolute():
        path = REPO / path
    cfg = yaml.safe_load(path.read_text())
    for key, value in parse_overrides(args).items():
        if key not in cfg:
            close = [SYNONYMS[key]] if SYNONYMS.get(key) in cfg else difflib.get_close_matches(key, cfg, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            die(f"unknown config key {key!r}{hint}; valid keys are listed in {path.name}")
        cfg[key] = value
    return SimpleNamespace(**cfg)


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# datasets

DATASETS = ("gsm8k", "hendrycks_math", "mmlu")
PARTS = ("train", "holdout", "test")
MATH_SUBSETS = ("algebra", "counting_and_probability", "geometry", "intermediate_algebra",
                "number_theory", "prealgebra", "precalculus")
VALID_SPLITS = [f"{d}_{p}" for d in DATASETS for p in PARTS]


def parse_split(key):
    """'hendrycks_math_train' -> ('hendrycks_math', 'train'): the part is after the LAST underscore."""
    dataset, _, part = str(key).rpartition("_")
    if dataset not in DATASETS or part not in PARTS:
        die(f"unknown data_split {key!r}; valid: {', '.join(VALID_SPLITS)}")
    return dataset, part


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _source_rows(dataset, source_split, data_dir):
    """Rows of one source split, from local jsonl files when data_dir is set, else from the Hub."""
    if dataset == "gsm8k":
        local = [f"gsm8k/{source_split}.jsonl"]
        hub = [("openai/gsm8k", "main", "train")] if source_split == "train" else \
              [("madrylab/gsm8k-platinum", "main", "test")]
    elif dataset == "hendrycks_math":
        local = [f"hendrycks_math/{s}/{source_split}.jsonl" for s in MATH_SUBSETS]
        hub = [("EleutherAI/hendrycks_math", s, source_split) for s in MATH_SUBSETS]
    else:
        local = [f"mmlu/{source_split}.jsonl"]
        hub = [("cais/mmlu", "all", source_split)]
    if data_dir:
        rows = []
        for rel in local:
            path = Path(data_dir) / rel
            if not path.exists():
                die(f"missing local dataset file {path}")
            rows += read_jsonl(path)
        return rows
    import datasets  # the Hub path only; local runs never touch it
    rows = []
    for name, config, split in hub:
        rows += list(datasets.load_dataset(name, config, split=split))
    return rows


def _to_example(dataset, row):
    """Source row -> {'question': user message text, 'gold': answer string for grading}."""
    if dataset == "gsm8k":
        return {"question": row["question"], "gold": row["answer"].split("####")[-1].strip()}
    if dataset == "hendrycks_math":
        return {"question": row["problem"], "gold": extract_boxed(row["solution"]) or ""}
    row = row.get("train", row) if isinstance(row.get("train"), dict) else row
    letters = "ABCDEFGHIJ"
    choices = "\n".join(f"{letters[i]}. {c}" for i, c in enumerate(row["choices"]))
    return {"question": f"{row['question']}\n\n{choices}", "gold": letters[int(row["answer"])]}


def load_split(key, data_dir=None, max_samples=None):
    """A list of {'idx', 'question', 'gold'} for a split key such as 'gsm8k_holdout'.

    train/holdout are the first 70% / the rest of the source training split after a seeded
    shuffle (the reference discarded shuffle()'s result, so its splits were unshuffled); the test
    split is shuffled too, so a capped test set samples every subset.  idx is the row's position in
    this split and keys the sampling noise."""
    dataset, part = parse_split(key)
    source = {"gsm8k": "train", "hendrycks_math": "train", "mmlu": "auxiliary_train"}[dataset]
    rows = _source_rows(dataset, "test" if part == "test" else source, data_dir)
    order = list(range(len(rows)))
    random.Random(SPLIT_SEED).shuffle(order)
    if part != "test":
        cut = int(0.7 * len(order))
        order = order[:cut] if part == "train" else order[cut:]
    if max_samples is not None:
        order = order[:int(max_samples)]
    examples = [_to_example(dataset, rows[i]) for i in order]
    for i, ex in enumerate(examples):
        ex["idx"] = i
    return examples


# chat rendering

def chat_messages(system, question):
    msgs = [{"role": "system", "content": system}] if system else []
    return msgs + [{"role": "user", "content": question}]


def render_generation_prompt(tokenizer, system, question):
    return tokenizer.apply_chat_template(chat_messages(system, question), tokenize=False,
                                         add_generation_prompt=True)


def assistant_marker(tokenizer):
    """The text the template puts before an assistant reply, derived by rendering a placeholder
    reply: e.g. '<｜Assistant｜>' (R1-Distill), '<|im_start|>assistant\\n' (Qwen)."""
    placeholder = "PLACEHOLDER_REPLY_7f3a"
    msgs = chat_messages("S", "Q")
    without = tokenizer.apply_chat_template(msgs, tokenize=False)
    full = tokenizer.apply_chat_template(msgs + [{"role": "assistant", "content": placeholder}],
                                         tokenize=False)
    common = os.path.commonprefix([without, full])
    end = full.find(placeholder)
    if end < len(common):
        die("cannot derive the assistant marker from the tokenizer's chat template")
    return full[len(common):end]


def split_at_marker(text, marker):
    """(prompt up to and including the last marker, completion after it) or None without marker."""
    pos = text.rfind(marker)
    if pos < 0:
        return None
    return text[:pos + len(marker)], text[pos + len(marker):]


def generation_tail(tokenizer):
    """What the generation prompt adds after the assistant marker: '<think>\\n' for R1-style
    templates, '' for Qwen and Llama 3."""
    prompt = render_generation_prompt(tokenizer, "S", "Q")
    return split_at_marker(prompt, assistant_marker(tokenizer))[1]


def tokenize_example(tokenizer, system, question, completion, max_length, tail=None):
    """input_ids and labels for completion-only training: the consumer's own rendering of the
    prompt, then the completion and its EOS; the prompt tokens are masked with -100.

    A stored completion starts right after the teacher's marker, so it may begin with what the
    consumer's generation prompt already ends with (`<think>\\n` when both are R1-style): that part
    is not repeated (tail: generation_tail(tokenizer), computed here when not given).
    The completion is never re-rendered as an assistant message: the R1-Distill template deletes
    everything before </think> in assistant messages, which would drop the reasoning."""
    tail = generation_tail(tokenizer) if tail is None else tail
    if tail and completion.startswith(tail):
        completion = completion[len(tail):]
    prompt = render_generation_prompt(tokenizer, system, question)
    p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    c_ids = tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    ids = (p_ids + c_ids)[:max_length]
    labels = ([-100] * len(p_ids) + c_ids)[:max_length]
    return ids, labels


TRACE_COLUMNS = ("idx", "system", "question", "completion")  # what every consumer of traces reads


def load_traces(path, columns=TRACE_COLUMNS):
    """A trace dataset written by gentraces.py, or a one-line error saying what is wrong with it."""
    import datasets  # imported here: most stages never need it
    if not Path(path).exists():
        die(f"trace dataset {path} does not exist (run gentraces.py first)")
    try:
        ds = datasets.load_from_disk(str(path))
    except IndexError:  # datasets saves zero rows as zero data files, then cannot load them
        die(f"trace dataset {path} is empty (no data files)")
    except (FileNotFoundError, ValueError) as e:
        die(f"trace dataset {path} is not a dataset saved with save_to_disk ({str(e).splitlines()[0]})")
    missing = [c for c in columns if c not in ds.column_names]
    if missing:
        die(f"trace dataset {path} lacks the columns {', '.join(missing)} (have {', '.join(ds.column_names)})")
    if len(ds) == 0:
        die(f"trace dataset {path} is empty")
    return ds


def tokenize_traces(ds, tokenizer, max_length):
    """(input_ids, labels) per trace, and the idx of traces left with no completion token after
    truncation to max_length (they would divide by zero in a token mean)."""
    examples, dropped = [], []
    tail = generation_tail(tokenizer)
    for row in ds:
        ids, labels = tokenize_example(tokenizer, row["system"], row["question"], row["completion"], max_length,
                                       tail)
        if any(label != -100 for label in labels):
            examples.append((ids, labels))
        else:
            dropped.append(row["idx"])
    return examples, dropped


# grading

def extract_boxed(text):
    """Content of the last \\boxed{...} (balanced braces), or None."""
    if text is None:
        return None
    start = text.rfind("\\boxed")
    while start >= 0:
        i = start + len("\\boxed")
        while i < len(text) and text[i] == " ":
            i += 1
        if i < len(text) and text[i] == "{":
            depth, j = 0, i
            for j in range(i, len(text)):
                depth += {"{": 1, "}": -1}.get(text[j], 0)
                if depth == 0:
                    return text[i + 1:j].strip()
        start = text.rfind("\\boxed", 0, start)
    return None


def forced_answer(forced_text):
    """The answer from the tokens decoded after AF_SUFFIX (which opened the \\boxed{)."""
    return extract_boxed("\\boxed{" + (forced_text or ""))


_NUM = re.compile(r"^-?\d+(\.\d+)?$")


def _as_number(s):
    s = s.replace(",", "").replace("$", "").replace("\\%", "").replace("%", "").strip()
    s = re.sub(r"\\(text|mathrm)\{[^}]*\}", "", s).strip().rstrip(".")
    frac = re.fullmatch(r"-?\\d?frac\{(-?\d+)\}\{(-?\d+)\}", s)
    if frac and int(frac.group(2)) != 0:
        sign = -1 if s.startswith("-") else 1
        return sign * int(frac.group(1)) / int(frac.group(2))
    return float(s) if _NUM.match(s) else None


def _math_equal(pred, gold):
    from math_verify import parse, verify  # imported lazily: it pulls in sympy
    try:
        return bool(verify(parse(f"${gold}$"), parse(f"${pred}$")))
    except Exception:  # math_verify raises on malformed LaTeX: that is a wrong answer
        return False


def is_correct(dataset, pred, gold):
    if pred is None or gold is None or gold == "":
        return False
    if dataset == "mmlu":
        letter = re.sub(r"\\text\{([A-J])\}", r"\1", pred).strip().strip("()").upper()
        return letter[:1] == gold and (len(letter) == 1 or not letter[1].isalpha())
    if dataset == "gsm8k":
        p, g = _as_number(pred), _as_number(gold)
        if p is not None and g is not None:
            return abs(p - g) <= 1e-6 * max(1.0, abs(g))
    return _math_equal(pred, gold)


# outputs

def atomic_write_text(path, text):
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def atomic_publish_dir(tmp_dir, final_dir):
    """Rename a finished directory into place (the sentinel appears complete or not at all)."""
    final_dir = Path(final_dir)
    if final_dir.exists():
        shutil.rmtree(final_dir)
    os.replace(tmp_dir, final_dir)


def append_registry(exp_dir, entry):
    """One JSON line per finished trace; a lock keeps concurrent writers' lines whole."""
    path = Path(exp_dir) / "metadata" / "trace_registry.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    entry = {**entry, "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        f.write(json.dumps(entry) + "\n")
        f.flush()
        os.fsync(f.fileno())
        fcntl.flock(f, fcntl.LOCK_UN)


def to_yaml(obj):
    return yaml.safe_dump(obj, sort_keys=False, allow_unicode=True, width=100)


# models

def torch_dtype(name, device):
    if device.type == "cpu":
        return torch.float32  # bf16 matmuls on CPU are slow and change numerics for tests
    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[name]


def require_positive(cfg, key, integer=False):
    """cfg.key must be a positive number (an integer with integer=True); else one error line."""
    value = getattr(cfg, key)
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)) or value <= 0:
        die(f"{key} must be a positive {'integer' if integer else 'number'}, got {value!r}")


def load_tokenizer(path, trust_remote_code=False, what="model"):
    """The tokenizer at a local path or Hub id; a missing path or an unloadable tokenizer is one
    error line naming `what` (teacher, proxy, student), not a traceback from deep in transformers."""
    from transformers import AutoTokenizer
    path = str(path)
    hub_id = not path.startswith(("/", ".", "~")) and path.count("/") == 1
    if not Path(path).exists() and not hub_id:
        die(f"{what} {path} does not exist (give a local model directory or a Hub id such as Qwen/Qwen2.5-3B)")
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        die(f"cannot load the {what} tokenizer from {path} ({str(e).strip().splitlines()[0]})")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token  # reuse an existing token: never grow the vocabulary
    return tok


def load_model(path, dtype, device, attn_implementation="sdpa", trust_remote_code=False):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype, attn_implementation=attn_implementation,
        trust_remote_code=trust_remote_code)
    return model.to(device).eval()


def same_tokenizer(a, b):
    return a.get_vocab() == b.get_vocab() and len(a) == len(b)


def log(msg, main_process=True):
    if main_process:
        print(msg, file=sys.stderr, flush=True)
