"""Shared helpers for every stage: config and overrides, datasets and splits, chat rendering,
grading, the trace registry, atomic outputs, seeding and model loading.

Nothing here knows about ADS itself (that is sampling.py) and nothing here branches on a model
name: chat formats come from each tokenizer's own template.
"""
import argparse
import difflib
import fcntl
import json
import os
import random
import re
import shutil
import sys
import time
import types
import typing
from pathlib import Path
from types import SimpleNamespace
from typing import Annotated, Literal

import numpy as np
import torch
import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, model_validator

REPO = Path(__file__).resolve().parent
AF_SUFFIX = "\n\n**Final Answer**\n\\[\\boxed{"  # answer forcing, appended after the trace
THINK_CLOSE = "</think>"
SPLIT_SEED = 42  # the holdout/train split is part of the experiment's definition, not a knob


class ConfigError(SystemExit):
    """User errors: each printed as one 'error: ...' line, exit status 2, no traceback."""

    def __init__(self, msg):
        self.messages = list(msg) if isinstance(msg, (list, tuple)) else [msg]
        super().__init__("\n".join(f"error: {m}" for m in self.messages))
        self.code = 2
        self.msg = "\n".join(self.messages)


def die(msg):
    raise ConfigError(msg)


# config

def run_cli(main):
    """Run a script's main(argv): a user error is one 'error: ...' line per problem and exit status 2,
    Ctrl-C a one-line notice (everything finished is on disk)."""
    try:
        main(sys.argv[1:])
    except ConfigError as e:
        for msg in e.messages:
            print(f"error: {msg}", file=sys.stderr, flush=True)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted: finished work is kept; rerun the same command to resume", file=sys.stderr)
        sys.exit(130)


_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def parse_value(text):
    """A command-line value as YAML reads it ('0.5' -> 0.5, 'null' -> None, '[a, b]' -> a list)."""
    parsed = yaml.safe_load(text) if text != "" else None
    if isinstance(parsed, str) and _FLOAT.fullmatch(parsed):
        parsed = float(parsed)  # YAML 1.1 reads 5e-4 (no dot) as a string
    return parsed


def parse_overrides(args):
    """`key=value` arguments -> {key: value text}; a later key wins (wrappers put the user's last)."""
    out = {}
    for arg in args:
        key, sep, value = arg.partition("=")
        if not sep or not key.strip():
            die(f"expected key=value, got {arg!r}")
        out[key.strip()] = value
    return out


SYNONYMS = {"temperature": "tau", "lambda": "lam", "epsilon": "eps"}  # the paper's words for our keys


def unknown_key(key, valid, where):
    close = [SYNONYMS[key]] if SYNONYMS.get(key) in valid else difflib.get_close_matches(key, valid, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"unknown config key {key!r}{hint}; valid keys are listed in {where}"


def load_config(yaml_name, args, schema=None, pending=()):
    """yaml defaults + `key=value` overrides, checked against the script's declared `schema` (a
    Settings subclass) before anything is loaded: every problem is one line of the ConfigError.

    The yaml holds the defaults and one comment per key, the schema each key's type and range. A value
    for a text key is taken as typed (so system_prompt='Note: x' stays text); others are read as YAML.
    `pending`: folders whose missing inputs an earlier pipeline stage will make (pipeline.sh's check)."""
    path = Path(yaml_name)
    if not path.is_absolute():
        path = REPO / path
    cfg = yaml.safe_load(path.read_text())
    undeclared = sorted(set(cfg) ^ set(schema.model_fields)) if schema else []
    if undeclared:  # the yaml and the script's schema must list the same keys
        die(f"{path.name} and {schema.__name__} disagree on the keys {', '.join(undeclared)}: "
            f"declare each key in both")
    problems = []
    for key, text in parse_overrides(args).items():
        if key not in cfg:
            problems.append(unknown_key(key, cfg, path.name))
        elif text in ("", "null", "~") or schema is None or not _text_key(schema.model_fields[key].annotation):
            cfg[key] = parse_value(text)
        else:
            cfg[key] = text
    if schema is None:
        if problems:
            die(problems)
        return SimpleNamespace(**cfg)
    return check_settings(schema, cfg, pending, problems)


def check_settings(schema, values, pending=(), problems=()):
    """`values` checked against `schema`: a SimpleNamespace of the typed values, or a ConfigError
    with one line per problem (after those already found)."""
    problems = list(problems)
    try:
        settings = schema.model_validate(values, context={"pending": pending})
    except ValidationError as e:
        problems += validation_messages(e, values)
    if problems:
        die(problems)
    return SimpleNamespace(**settings.model_dump())


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are one 'error: ...' line and exit status 2 (a ConfigError), like every
    other user error, instead of a usage block and the error."""

    def error(self, message):
        die(message)


class Settings(BaseModel):
    """Base of every script's declared settings: strict types (2.5 is no count, 'yes' no number),
    finite numbers only, no undeclared keys. A script's subclass lists its keys with their types,
    ranges and path roles, and puts checks that span several keys in problems()."""

    model_config = ConfigDict(strict=True, allow_inf_nan=False, extra="forbid")

    def problems(self, context):
        """Problems that involve several keys, one message each (none here)."""
        return []

    @model_validator(mode="after")
    def _check_across_keys(self, info: ValidationInfo):
        problems = self.problems(info.context or {})
        if problems:
            raise ValueError("\n".join(problems))  # validation_messages splits them into lines again
        return self


_PHRASES = {"int_type": "must be an integer", "int_from_float": "must be an integer",
            "float_type": "must be a number", "float_parsing": "must be a number",
            "finite_number": "must be a finite number", "bool_type": "must be true or false",
            "string_type": "must be text", "list_type": "must be a list such as [a, b]",
            "too_short": "must not be empty"}
_BOUNDS = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}


def _show(value):
    if value is None or isinstance(value, bool):
        return {None: "null", True: "true", False: "false"}[value]
    return repr(value) if isinstance(value, str) else str(value)


def _phrase(err):
    kind, ctx = err["type"], err.get("ctx") or {}
    if kind in _BOUNDS:
        bound = next(iter(ctx.values()))
        return f"must be {_BOUNDS[kind]} {int(bound) if float(bound).is_integer() else bound}"
    if kind == "literal_error":
        return f"must be {ctx['expected']}"
    if kind == "value_error":
        return str(ctx.get("error", err["msg"]))
    return _PHRASES.get(kind, err["msg"][0].lower() + err["msg"][1:])


def validation_messages(error, data):
    """pydantic's errors as one line per key: 'KEY must be ..., got VALUE'. The errors of one key (the
    branches of a union such as eps: a number or auto) are joined into one line."""
    phrases, lines = {}, []
    for err in error.errors():
        if not err["loc"]:  # checks across keys: one message per line
            lines += str(err.get("ctx", {}).get("error", err["msg"])).splitlines()
            continue
        phrase = _phrase(err)
        if any(isinstance(part, int) for part in err["loc"]):  # an item of a list
            phrase = "must be a list of " + ("text" if err["type"] == "string_type" else "valid items")
        phrases.setdefault(err["loc"][0], []).append(phrase)
    for key, found in phrases.items():
        if data.get(key) is None:
            lines.append(f"{key} is required")
            continue
        found = list(dict.fromkeys(found))
        joined = found[0] + "".join(" or " + p.removeprefix("must be ") for p in found[1:])
        lines.append(f"{key} {joined}, got {_show(data[key])}")
    return lines


def _text_key(annotation):
    """A key whose value is text: str or str | None (not a choice, a number or a list)."""
    union = typing.get_origin(annotation) in (typing.Union, types.UnionType)
    args = [typing.get_args(a)[0] if typing.get_origin(a) is typing.Annotated else a
            for a in (typing.get_args(annotation) if union else (annotation,))]
    return str in args and all(a in (str, type(None)) for a in args)


def key_problem(key, phrase, value):
    """One line in the house form: 'KEY must be ..., got VALUE'."""
    return f"{key} {phrase}, got {_show(value)}"


def is_pending(path, context):
    """In pipeline.sh's check, a missing input under a pending folder is one an earlier stage makes."""
    path = Path(path).resolve()
    return not path.exists() and any(path.is_relative_to(Path(d).resolve()) for d in context.get("pending", ()))


def input_problem(path, kind, context):
    """Why `path` is not an input of `kind` (file, directory, model, traces), as a phrase; None if it is."""
    p = Path(path).expanduser()
    if is_pending(p, context):
        return None
    if kind == "model":  # a local directory, or a Hub id resolved when loading (as load_tokenizer does)
        hub_id = not str(path).startswith(("/", ".", "~")) and str(path).count("/") == 1
        if p.is_dir() or (hub_id and not p.exists()):
            return None
        return "must be a model directory or a Hub id such as Qwen/Qwen2.5-3B (" + \
            ("it is a file)" if p.exists() else "no such directory)")
    if kind == "file":
        return None if p.is_file() else "must be an existing file" + (" (it is a directory)" if p.exists() else "")
    if not p.is_dir():
        what = "a trace dataset written by gentraces.py" if kind == "traces" else "an existing directory"
        return f"must be {what}" + (" (it is a file)" if p.exists() else " (no such directory)")
    if kind == "traces" and not (p / "state.json").is_file():
        return "must be a trace dataset written by gentraces.py (no state.json: not saved with save_to_disk)"
    return None


def output_dir_problem(path):
    """Why a directory cannot be made or written at `path`, as a phrase; None if it can. Checked before
    any model loads, so a file in the way is not found after hours of work."""
    p = Path(path).expanduser()
    existing = p
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return f"must be a directory that can be written ({existing} is a file)"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"must be a directory that can be written ({existing} is not writable)"
    return None


def output_file_problem(path):
    """Why a file cannot be written at `path`, as a phrase; None if it can."""
    p = Path(path).expanduser()
    if p.is_dir():
        return "must be the path of a file to write (it is a directory)"
    return output_dir_problem(p.parent)


_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+=-]*")


def name_problem(name):
    """Output names become file names inside their folder: no '/', '..' or leading '.' (hidden names
    are the work and temporary files)."""
    if _NAME.fullmatch(name) and len(name) <= 200:
        return None
    return "must be a plain name that stays inside its folder (letters, digits and . _ + = -, not starting with '.')"


def attention_problem(name):
    if name in ("sdpa", "eager"):  # the common names, without the seconds of importing transformers' models
        return None
    from transformers import AttentionInterface  # the names transformers knows, with any registered since
    known = {"eager", *AttentionInterface._global_mapping}
    if name in known or "/" in name or name.startswith("paged|"):  # org/repo: a Hub kernel
        return None
    return f"must be one of {', '.join(sorted(known))}, or a Hub kernel such as kernels-community/flash-attn"


def checked(check):
    """A pydantic validator from a check that returns a problem phrase or None."""
    def validate(value, info: ValidationInfo):
        problem = check(value, info.context or {})
        if problem:
            raise ValueError(problem)
        return value
    return AfterValidator(validate)


# the types the scripts' settings are declared with
Count = Annotated[int, Field(ge=1)]                     # a positive integer
NonNegativeInt = Annotated[int, Field(ge=0)]
Positive = Annotated[float, Field(gt=0)]                # a finite number > 0 (Settings forbids inf and nan)
NonNegative = Annotated[float, Field(ge=0)]
Seed = Annotated[int, Field(ge=0, lt=2**63)]
Dtype = Literal["bfloat16", "float16", "float32"]
Attention = Annotated[str, checked(lambda v, ctx: attention_problem(v))]
Name = Annotated[str, checked(lambda v, ctx: name_problem(v))]             # an output name inside its folder
ModelPath = Annotated[str, checked(lambda v, ctx: input_problem(v, "model", ctx))]  # local directory or Hub id
InputDir = Annotated[str, checked(lambda v, ctx: input_problem(v, "directory", ctx))]
InputFile = Annotated[str, checked(lambda v, ctx: input_problem(v, "file", ctx))]
TracesPath = Annotated[str, checked(lambda v, ctx: input_problem(v, "traces", ctx))]  # gentraces.py output
OutputDir = Annotated[str, checked(lambda v, ctx: output_dir_problem(v))]
OutputFile = Annotated[str, checked(lambda v, ctx: output_file_problem(v))]


def check_commands(argv):
    """pipeline.sh's check before its first launch, in this one process: stdin holds every stage
    command the run would launch, one `SCRIPT ARG ...` per line in shell quoting; each is checked by
    that script's own settings(). Inputs under the folders in argv may be missing (earlier stages make
    them). The same problem in many commands (a typo in GEN_ARGS) is reported once."""
    import runpy
    import shlex
    checkers, problems = {}, []
    for line in sys.stdin:
        if not line.strip():
            continue
        script, *args = shlex.split(line)
        if script not in checkers:  # loaded by path, as a launcher would: no module imports a stage script
            checkers[script] = runpy.run_path(str(REPO / script))["settings"]
        try:
            checkers[script](args, pending=tuple(argv))
        except ConfigError as e:
            problems += [f"{script}: {m}" for m in e.messages]
    if problems:
        die(list(dict.fromkeys(problems)))


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


SOURCE_FIELDS = {"gsm8k": ("question", "answer"), "hendrycks_math": ("problem", "solution"),
                 "mmlu": ("question", "choices", "answer")}  # what _to_example reads from a source row


def source_of(key):
    """(dataset, source split) that a split key such as 'gsm8k_holdout' reads."""
    dataset, part = parse_split(key)
    return dataset, "test" if part == "test" else \
        {"gsm8k": "train", "hendrycks_math": "train", "mmlu": "auxiliary_train"}[dataset]


def local_source_files(key, data_dir):
    """The jsonl files under data_dir that a split key reads (offline runs)."""
    dataset, source_split = source_of(key)
    if dataset == "gsm8k":
        rel = [f"gsm8k/{source_split}.jsonl"]
    elif dataset == "hendrycks_math":
        rel = [f"hendrycks_math/{s}/{source_split}.jsonl" for s in MATH_SUBSETS]
    else:
        rel = [f"mmlu/{source_split}.jsonl"]
    return [Path(data_dir) / r for r in rel]


def read_source_jsonl(path, fields):
    """Rows of a local source file; a line that is not a JSON object with `fields` is one error line."""
    rows = []
    with open(path) as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                die(f"{path}:{lineno}: not a JSON line ({e.msg})")
            inner = row.get("train", row) if isinstance(row, dict) and isinstance(row.get("train"), dict) else row
            missing = [k for k in fields if not isinstance(inner, dict) or k not in inner]
            if missing:
                die(f"{path}:{lineno}: lacks the field{'s' * (len(missing) > 1)} {', '.join(missing)}")
            rows.append(row)
    return rows


def _source_rows(key, data_dir):
    """Rows of the source split a split key reads, from local jsonl files when data_dir is set, else
    from the Hub."""
    dataset, source_split = source_of(key)
    if data_dir:
        rows = []
        for path in local_source_files(key, data_dir):
            if not path.exists():
                die(f"missing local dataset file {path}")
            rows += read_source_jsonl(path, SOURCE_FIELDS[dataset])
        return rows
    if dataset == "gsm8k":
        hub = [("openai/gsm8k", "main", "train")] if source_split == "train" else \
              [("madrylab/gsm8k-platinum", "main", "test")]
    elif dataset == "hendrycks_math":
        hub = [("EleutherAI/hendrycks_math", s, source_split) for s in MATH_SUBSETS]
    else:
        hub = [("cais/mmlu", "all", source_split)]
    import datasets  # the Hub path only; local runs never touch it
    rows = []
    for name, config, split in hub:
        rows += list(datasets.load_dataset(name, config, split=split))
    return rows


def _to_example(dataset, row):
    """Source row -> {'question': user message text, 'gold': answer string for grading, 'solution': the
    worked answer as the dataset writes it (a few-shot example's answer)}."""
    if dataset == "gsm8k":
        return {"question": row["question"], "gold": row["answer"].split("####")[-1].strip(),
                "solution": row["answer"]}
    if dataset == "hendrycks_math":
        return {"question": row["problem"], "gold": extract_boxed(row["solution"]) or "", "solution": row["solution"]}
    row = row.get("train", row) if isinstance(row.get("train"), dict) else row
    letters = "ABCDEFGHIJ"
    choices = "\n".join(f"{letters[i]}. {c}" for i, c in enumerate(row["choices"]))
    gold = letters[int(row["answer"])]
    return {"question": f"{row['question']}\n\n{choices}", "gold": gold, "solution": f"The answer is {gold}."}


def load_split(key, data_dir=None, max_samples=None):
    """A list of {'idx', 'question', 'gold'} for a split key such as 'gsm8k_holdout'.

    train/holdout are the first 70% / the rest of the source training split after a seeded
    shuffle (the reference discarded shuffle()'s result, so its splits were unshuffled); the test
    split is shuffled too, so a capped test set samples every subset.  idx is the row's position in
    this split and keys the sampling noise."""
    dataset, part = parse_split(key)
    rows = _source_rows(key, data_dir)
    if not rows:
        die(f"{key}: the source data has no rows" + (f" (data_dir={data_dir})" if data_dir else ""))
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


# few-shot prompts: the usual evaluation of a base model (the paper's undistilled-student baseline),
# plain "Question: / Answer:" blocks with no chat template, each example answered by its dataset's own
# solution (GSM8K's ends in "#### X"), so the model answers in that form and then goes on to write a
# next question of its own, where its completion is cut
FEWSHOT_QUESTION, FEWSHOT_ANSWER = "Question:", "Answer:"


def fewshot_examples(split_key, data_dir, k, seed, exclude=()):
    """k (question, solution) pairs from the train split of split_key's dataset, drawn by seed; questions
    in `exclude` (the evaluated ones) are never drawn."""
    dataset, _ = parse_split(split_key)
    skip = set(exclude)
    pool = [ex for ex in load_split(f"{dataset}_train", data_dir) if ex["question"] not in skip]
    if len(pool) < k:
        die(f"fewshot={k} needs {k} examples from {dataset}_train; it has {len(pool)}")
    return [(ex["question"], ex["solution"]) for ex in random.Random(seed).sample(pool, k)]


def render_fewshot_prompt(examples, question):
    """Each example as 'Question: q\nAnswer: a' followed by a blank line, then the question, ending at 'Answer:'."""
    shots = "".join(f"{FEWSHOT_QUESTION} {q}\n{FEWSHOT_ANSWER} {a}\n\n" for q, a in examples)
    return f"{shots}{FEWSHOT_QUESTION} {question}\n{FEWSHOT_ANSWER}"


def cut_at_next_question(text):
    """A few-shot completion up to where the model starts a question of its own (the stop)."""
    pos = text.find(f"\n{FEWSHOT_QUESTION}")
    return text if pos < 0 else text[:pos].rstrip()


def fewshot_answer(text):
    """The answer a few-shot completion states: after its last '####' (GSM8K's solutions), else its
    last \\boxed{} (MATH's), else after 'The answer is' (MMLU's); None when it states none."""
    if "####" in text:
        found = re.match(r"\s*([^\n]+)", text.rsplit("####", 1)[1])
        return found.group(1).strip() if found else None
    boxed = extract_boxed(text)
    if boxed is not None:
        return boxed
    found = re.findall(r"The answer is\s*\(?([^\s.)]+)", text)
    return found[-1] if found else None


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


def read_sidecar(traces) -> dict | None:
    """The yaml sidecar that gentraces.py writes beside a trace dataset (traces/NAME -> traces/NAME.yaml:
    its config, stats and diagnostics), or None when there is none."""
    path = Path(f"{traces}.yaml")
    return (yaml.safe_load(path.read_text()) or {}) if path.is_file() else None


def load_registry(path):
    """Registry entries by name (report.py, viewer.py); a name appended again (a rerun) replaces the
    earlier entry. A line that is not an entry as gentraces.py writes it is one error line naming it."""
    path = Path(path)
    if not path.is_file():
        die(f"registry not found: {path} (gentraces.py appends a line to it for every finished trace)")
    entries = {}
    with open(path) as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
                entries[entry["name"]] = entry
            except (json.JSONDecodeError, TypeError, KeyError) as e:
                die(f"{path}:{lineno}: malformed registry line ({type(e).__name__}: {e})")
            if "role" not in entry:
                die(f"{path}:{lineno}: a registry line without the role and row fields that gentraces.py records "
                    f"(written by an older version); add them once with: python migrate_registry.py {path}")
            for key in ("raw_accuracy", "af_accuracy"):
                value = entry.get(key)
                if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                          or not 0 <= value <= 1):
                    die(f"{path}:{lineno}: {key} must be a number in [0, 1] or null, got {value!r}")
    return entries


def to_yaml(obj):
    return yaml.safe_dump(obj, sort_keys=False, allow_unicode=True, width=100)


# models

def torch_dtype(name, device):
    if device.type == "cpu":
        return torch.float32  # bf16 matmuls on CPU are slow and change numerics for tests
    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[name]


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


MEMORY_CAP = "CUDA_MEMORY_CAP_GIB"  # e.g. 80: hold each process to an H100's memory on a larger GPU


def cap_cuda_memory(device):
    """Cap this process's CUDA memory at $CUDA_MEMORY_CAP_GIB (unset: no cap), so a run on a larger GPU
    fails where an 80 GiB one would; returns the cap in GiB, or None."""
    text = os.environ.get(MEMORY_CAP, "")
    if not text:
        return None
    try:
        gib = float(text)
    except ValueError:
        gib = float("nan")
    if not (gib > 0 and gib != float("inf")):
        die(f"{MEMORY_CAP} must be a positive number of GiB, got {text!r}")
    if device.type != "cuda":
        return None
    import torch
    if device.index is None:  # a plain process's accelerate state says "cuda": the current device
        device = torch.device("cuda", torch.cuda.current_device())
    total = torch.cuda.get_device_properties(device).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, gib * 2**30 / total), device)
    return gib


def peak_gpu_gib(device):
    """This process's peak CUDA memory, what its allocator reserved included, in GiB (None off CUDA)."""
    if device.type != "cuda":
        return None
    import torch
    return round(torch.cuda.max_memory_reserved(device) / 2**30, 2)
