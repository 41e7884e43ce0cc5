"""Build offline assets: synthetic GSM8K-style word problems, two tokenizers, three models from scratch.

The teacher (Qwen2, R1-Distill-style template) is trained until its greedy traces solve most test
problems, answer forcing included. The proxy (Qwen2, the teacher's tokenizer, another padded vocab
width) and the student (Llama, Llama-3-style template, its own vocabulary) are base models pretrained
on domain text. The three train side by side, one process each (on CPU, as many as the cores allow).
Deterministic data for a seed, and models on CPU. On GPU, five synth builds ended the proxy and the
student at the same losses, to the last digit, but stopped the teacher at different steps (1,000 to
1,600; cause not found). Profiles:
  tiny   the CI pipeline's assets: one-digit problems, sub-million-parameter models; 141 s on 2 CPU cores
  synth  the one-GPU reproduction: two-digit problems of 3-5 numbered events, traces written in varied
         styles (room for ADS to choose among correct tokens); a 25M-parameter teacher, and a proxy and
         a student of its size pretrained on the questions and on arithmetic facts, then warmed up
         on the teacher's traces of other problems until greedy solves 30%; about 4.5 minutes on
         one H200 (268 s in results/synth)
  shapes the real-shape rehearsal (pipeline_shapes.sh): untrained bf16 models with the paper's
         configs (real_shapes.yaml: a 7B R1-Distill-Qwen teacher, a Qwen2.5-3B proxy, a Llama-3.2-3B
         student) and tokenizers with the real id layouts (151,665 and 128,256 ids); nothing is trained
  shapes_narrow  the same vocabularies, tokenizers and templates with 2-layer models of width 32: CI's
         check that logits are cut and aligned at the real sizes

    python make_assets.py --out tiny_assets
    python make_assets.py --profile synth --out exp/synth/assets
    python make_assets.py --profile shapes --out exp/shapes/assets
"""
import argparse
import json
import math
import multiprocessing
import os
import random
import shutil
import string
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

import torch
import transformers
import yaml
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from tqdm import tqdm
import utils
from transformers import (AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast,
                          Qwen2Config, Qwen2ForCausalLM, Qwen2Tokenizer)

NAMES = ["Ann", "Ben", "Cara", "Dev", "Eli", "Fay", "Gus", "Hana", "Ivan", "Jo", "Kim", "Liam",
         "Mia", "Noor", "Omar", "Pia", "Raj", "Sue", "Tom", "Uma", "Vic", "Wes", "Yara", "Zoe"]
OBJECTS = ["apples", "marbles", "stickers", "pencils", "cookies", "books", "shells", "coins",
           "cards", "stamps", "eggs", "balloons", "crayons", "buttons"]
GAINS = ["buys {n} more", "finds {n} more", "gets {n} more from {other}", "picks up {n} more", "wins {n} more"]
LOSSES = ["gives {n} to {other}", "loses {n}", "sells {n}", "uses {n}", "gives {n} away"]
OPENINGS = ["{name} has {n} {obj}.", "{name} starts with {n} {obj}."]
ASKS = ["How many {obj} does {name} have now?", "How many {obj} does {name} end up with?",
        "How many {obj} does {name} have at the end?"]
AF_FRACTION = 0.2  # share of teacher examples that teach answer forcing
# How a step may be written in a synth trace; the teacher learns them all with equal weight, so its
# sampling distribution keeps real choices among correct continuations (as a language model's does).
STEP_STYLES = ["{a}{s}{b}={r}\n", "{a} {s} {b} = {r}\n", "{a} {w} {b} is {r}\n"]
CLOSINGS = ["The answer is \\boxed{{{r}}}.", "So {name} has \\boxed{{{r}}} {obj}.", "\\boxed{{{r}}}"]
WORDS = {"+": "plus", "-": "minus"}
# Optional trace content a teacher learns to recover from (synth): a step written with a wrong result and
# then redone, a check of a step by its inverse, a filler line.  Correct traces may carry any of them, so
# a sampler can push a trace toward them and keep its answer (the paper's poisoned traces are correct
# solutions with odd tokens that the teacher recovers from); report.py's analysis counts them.
CORRECTION = "no, "                 # starts the redone step after a wrong one
CHECK = "check: "                   # starts a check line
FILLERS = ["ok\n", "next\n", "so far so good\n"]

THREADS = 2  # per training process: tiny matmuls, more threads only add sync overhead

PROFILES = {
    "tiny": {
        "max_value": 9,  # values stay in 1..9: one token each under Qwen's digit split, arithmetic a small table
        "n_steps": (2, 3), "styles": False, "splits": {"train": 200, "test": 64},
        "teacher_problems": 4000, "teacher_val": 64,  # training stops once greedy solves 90% of the val problems
        "teacher": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2),
        "teacher_train": dict(steps=1000, batch_size=16, lr=7e-3), "teacher_target": 0.9, "check_every": 100,
        "base": dict(hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2),
        "base_train": dict(steps=50, batch_size=32, lr=3e-3), "arithmetic_docs": 0,
        "vocab": {"teacher": 1000, "student": 400}, "max_new_tokens": 64, "numbered": False,
    },
    "synth": {
        "max_value": 60, "n_steps": (3, 5), "styles": True, "splits": {"train": 10000, "test": 1000},
        "teacher_problems": 40000, "teacher_val": 256,
        # v3: steps written wrong and redone, check lines and filler lines, which the teacher learns to
        # recover from (the room for ADS to poison a trace that stays correct)
        "extras": {"correction": 0.1, "check": 0.1, "filler": 0.1},
        "teacher": dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
                        num_key_value_heads=2),
        "teacher_train": dict(steps=3000, batch_size=128, lr=1e-3), "teacher_target": 0.96, "check_every": 200,
        # proxy and student of the teacher's size, as in the paper (3B proxy and student, 7B teacher, one
        # family apart): a first run with 5M bases left every distilled student below 8%
        "base": dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
                     num_key_value_heads=2),
        "base_train": dict(steps=1500, batch_size=64, lr=1e-3), "arithmetic_docs": 20000,
        # v3: then a warm-up on the teacher's temperature traces of 6,000 other problems (half of them
        # replaced by worded solutions), stopped once greedy solves 30% of 128 more, as the paper's
        # undistilled Llama-3.2-3B solves 31% of GSM8K: a proxy that knows the task gives a gradient
        # that FD can follow (the cold v2 proxy's did not), a student that knows it can still be taught
        "warmup": dict(problems=6000, val=128, tau=1.0, teacher_share=0.5, target=0.3, steps=3000,
                       batch_size=64, lr=3e-4, check_every=50),
        "vocab": {"teacher": 2000, "student": 800}, "max_new_tokens": 200, "numbered": True,
    },
}
# tiny's student, set apart from its proxy: twice as wide, pretrained 8x longer on the questions and on
# arithmetic documents (facts, and chains of steps that end in the answer forcing), never on a solved
# problem; and 400 train problems (280 traces after the holdout's 30%; 140 taught 34% at best).  The
# questions alone (the first tiny student) left every distilled student at 0% on test
TINY_STUDENT = {"student_base": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2),
                "student_train": dict(steps=400, batch_size=32, lr=3e-3), "student_docs": 4000}
PROFILES["tiny"] = {**PROFILES["tiny"], **TINY_STUDENT, "splits": {"train": 400, "test": 64}}
# the synth recipe (extras and warm-up) at the tiny sizes, with the first tiny student and split
PROFILES["synth_tiny"] = {**{k: v for k, v in PROFILES["tiny"].items() if k not in TINY_STUDENT},
                          "splits": {"train": 200, "test": 64}, "styles": True, "extras": PROFILES["synth"]["extras"],
                          "max_new_tokens": 96,
                          "warmup": dict(problems=200, val=16, tau=1.0, teacher_share=0.5, target=0.3, steps=40,
                                         batch_size=16, lr=1e-3, check_every=20)}
# untrained models of the real shapes: the layout of real_shapes.yaml, GSM8K-schema problems of the
# synth kind; `narrow` overrides the width and depth of every model (the vocabularies stay real)
SHAPES = {"max_value": 60, "n_steps": (3, 5), "styles": True, "extras": PROFILES["synth"]["extras"],
          "splits": {"train": 800, "test": 128}, "teacher_problems": 0, "teacher_val": 0, "numbered": True,
          "vocab": {"teacher": 2000, "student": 800}, "narrow": None}
PROFILES["shapes"] = SHAPES
PROFILES["shapes_narrow"] = {**SHAPES, "splits": {"train": 120, "test": 16},
                             "narrow": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2, head_dim=8)}

TEACHER_SPECIALS = ["<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>", "<｜begin▁of▁sentence｜>"]
STUDENT_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|finetune_right_pad_id|>",
                    "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
# R1-Distill behaviour: system text right after bos, reasoning before </think> dropped from replies.
TEACHER_TEMPLATE = (
    "{{ bos_token }}{% for m in messages if m['role'] == 'system' %}{{ m['content'] }}{% endfor %}"
    "{% for m in messages %}{% if m['role'] == 'user' %}<｜User｜>{{ m['content'] }}"
    "{% elif m['role'] == 'assistant' %}{% set reply = m['content'].split('</think>')[-1] %}"
    "<｜Assistant｜>{{ reply }}<｜end▁of▁sentence｜>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<｜Assistant｜><think>\n{% endif %}")
STUDENT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")


def make_problem(rng, max_value, n_steps, numbered=False):
    """One word problem: a start value then n_steps gains or losses, every value in 1..max_value;
    returns question, GSM8K answer, steps and the names the trace may mention.  numbered: the events
    are a numbered list, one a line, and the trace numbers its steps the same way (so which number
    comes next is a lookup, not a count of the clauses used so far)."""
    name, other = rng.sample(NAMES, 2)
    obj = rng.choice(OBJECTS)
    value = rng.randint(2, max_value - 1)
    start, clauses, steps = value, [], []
    for _ in range(rng.randint(*n_steps)):
        if value < max_value and (value == 1 or rng.random() < 0.5):
            n = rng.randint(1, max_value - value)
            clause, new = rng.choice(GAINS).format(n=n, other=other), value + n
        else:
            n = rng.randint(1, value - 1)
            clause, new = rng.choice(LOSSES).format(n=n, other=other), value - n
        clauses.append(clause)
        steps.append((value, "+" if new > value else "-", n, new))
        value = new
    opening, ask = rng.choice(OPENINGS).format(name=name, n=start, obj=obj), rng.choice(ASKS).format(name=name, obj=obj)
    if numbered:
        events = "".join(f"{i}. {name} {c}.\n" for i, c in enumerate(clauses, 1))
        question = f"{opening}\n{events}{ask}"
    else:
        question = " ".join([opening, f"{name} {', then '.join(clauses)}.", ask])
    lines = [f"{name} {c}: {a} {s} {b} = <<{a}{s}{b}={r}>>{r} {obj}." for c, (a, s, b, r) in zip(clauses, steps)]
    return {"question": question, "answer": "\n".join(lines) + f"\n#### {value}", "steps": steps, "result": value,
            "name": name, "obj": obj, "numbered": numbered}


def make_problems(rng, count, exclude, profile):
    """count problems with distinct questions, none of them in exclude."""
    problems, seen = [], set(exclude)
    while len(problems) < count:
        p = make_problem(rng, profile["max_value"], profile["n_steps"], profile["numbered"])
        if p["question"] not in seen:
            seen.add(p["question"])
            problems.append(p)
    return problems


def reasoning(problem, rng=None, extras=None):
    """The teacher's trace after `<think>\\n`: one equation a line (numbered like the question's events
    when they are), then the boxed answer.  With rng (synth), every line and the closing take a random
    style from STEP_STYLES and CLOSINGS; with extras ({"correction": p, "check": p, "filler": p}), a
    step is first written wrong and redone, followed by a check line, or by a filler line, each with
    its probability."""
    numbers = [f"{i}. " if problem.get("numbered") else "" for i in range(1, len(problem["steps"]) + 1)]
    if rng is None:
        eqs = "".join(f"{n}{a}{s}{b}={r}\n" for n, (a, s, b, r) in zip(numbers, problem["steps"]))
        return eqs + f"</think>\n\nThe answer is \\boxed{{{problem['result']}}}."
    step = lambda a, s, b, r: rng.choice(STEP_STYLES).format(a=a, s=s, w=WORDS[s], b=b, r=r)
    eqs = ""
    for n, (a, s, b, r) in zip(numbers, problem["steps"]):
        if extras and rng.random() < extras["correction"]:
            wrong = r + rng.choice([-3, -2, -1, 1, 2, 3])
            eqs += n + step(a, s, b, max(0, wrong) if wrong != r else r + 1) + CORRECTION + step(a, s, b, r)
        else:
            eqs += n + step(a, s, b, r)
        if extras and rng.random() < extras["check"]:
            eqs += CHECK + step(r, "-" if s == "+" else "+", b, a)
        if extras and rng.random() < extras["filler"]:
            eqs += rng.choice(FILLERS)
    closing = rng.choice(CLOSINGS).format(r=problem["result"], name=problem["name"], obj=problem["obj"])
    return eqs + "</think>\n\n" + closing


def solution_text(problem):
    """Another correct solution, in GSM8K's worded style rather than the teacher's (warm-up data)."""
    steps = problem["answer"].split("\n#### ")[0]
    return f"{steps}\n</think>\n\nThe answer is \\boxed{{{problem['result']}}}."


# how an arithmetic chain may close: the last result restated, boxed, or after a closed reasoning block (as
# the traces close theirs), so that answer forcing after any of them repeats that result
CHAIN_CLOSINGS = ["", "So it is {r}.", "The answer is \\boxed{{{r}}}.", "</think>\n\nThe answer is \\boxed{{{r}}}."]


def arithmetic_chains(rng, count, max_value, forced_share=0.75):
    """Domain text with no problems: chains of 2-4 sums and differences, each step starting from the
    last result, in one step style a document; forced_share of them end as answer forcing closes a
    trace (AF_SUFFIX, then the last result), so a base model learns the convention, as real ones know
    that a final answer repeats the result just worked out."""
    docs = []
    for _ in range(count):
        style, value, lines = rng.choice(STEP_STYLES), rng.randint(1, max_value), []
        for _ in range(rng.randint(2, 4)):
            if value < max_value and (value == 1 or rng.random() < 0.5):
                n = rng.randint(1, max_value - value)
                s, new = "+", value + n
            else:
                n = rng.randint(1, value - 1)
                s, new = "-", value - n
            lines.append(style.format(a=value, s=s, w=WORDS[s], b=n, r=new))
            value = new
        doc = "".join(lines) + rng.choice(CHAIN_CLOSINGS).format(r=value)
        docs.append(doc + utils.AF_SUFFIX + f"{value}}}\\]" if rng.random() < forced_share else doc)
    return docs


def arithmetic_facts(rng, count, max_value):
    """Domain text with no solutions: short documents of sums and differences in every step style,
    so base models know the arithmetic and the notation but have never seen a worked problem."""
    docs = []
    for _ in range(count):
        lines = []
        for _ in range(rng.randint(4, 10)):
            a, b = rng.randint(1, max_value), rng.randint(1, max_value)
            s = "+" if a + b <= max_value and rng.random() < 0.5 else "-"
            a, b = (a, b) if s == "+" or a > b else (b, a)
            if a == b:
                continue
            r = a + b if s == "+" else a - b
            lines.append(rng.choice(STEP_STYLES).format(a=a, s=s, w=WORDS[s], b=b, r=r))
        docs.append("".join(lines))
    return docs


def build_tokenizer(texts, vocab_size, specials, added, bos, eos, pad, template, qwen_split=False):
    """Byte-level BPE trained on texts; specials appended after the learned vocab, as in real checkpoints.

    AutoTokenizer rebuilds any qwen2 checkpoint's tokenizer with Qwen2Tokenizer's own normalizer and
    split (one digit per token), so the teacher's BPE is trained with exactly those or ids would change.
    """
    tok = Tokenizer(models.BPE())
    if qwen_split:
        qwen = Qwen2Tokenizer().backend_tokenizer
        tok.normalizer, tok.pre_tokenizer = qwen.normalizer, qwen.pre_tokenizer
    else:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer)
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    tok.add_tokens([AddedToken(s, special=False, normalized=False) for s in added])
    # Both real tokenizers prepend bos when add_special_tokens=True; keep that trap for the pipeline.
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, pad_token=pad,
                                   unk_token=None, chat_template=template, model_max_length=2048)


def load_system_prompt():
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "gen_config.yaml")) as f:
        return yaml.safe_load(f)["system_prompt"]


def count_tokens(tok, text):
    return len(tok(text, add_special_tokens=False).input_ids)


def max_prompt_tokens(tok, system_prompt, problems):
    """The longest generation prompt of problems, in tokens, as the pipeline renders it."""
    return max(count_tokens(tok, utils.render_generation_prompt(tok, system_prompt, p["question"])) for p in problems)


def padded_vocab(n, multiple):
    """Round up then add one more block, so padding rows always exist (Qwen pads 151,665 to 152,064)."""
    return (n + multiple - 1) // multiple * multiple + multiple


def teacher_examples(tok, problems, system_prompt, rng, styles, extras=None):
    """(ids, labels) pairs: prompt -> trace + eos, or prompt + trace + AF_SUFFIX -> `N}\\]` + eos.

    The prompt itself is a target too: predicting the question's repeated names and objects grows the
    copy circuit the trace needs (with a completion-only loss 500 steps leave the teacher near 25%).
    """
    prompts, contexts, targets = [], [], []
    for p in problems:
        prompts.append(utils.render_generation_prompt(tok, system_prompt, p["question"]))
        trace = reasoning(p, rng if styles else None, extras)
        if rng.random() < AF_FRACTION:
            if rng.random() < 0.3:  # truncated traces, as max_length or a poisoned sample would leave them
                trace = trace[:rng.randint(0, len(trace))]
            if "</think>" not in trace:
                trace += "\n</think>"
            contexts.append(trace + utils.AF_SUFFIX)
            targets.append(f"{p['result']}}}\\]")
        else:
            contexts.append("")
            targets.append(trace)
    eos = [tok.eos_token_id]
    examples = []
    for prompt, context, target in zip(*(encode(tok, texts) for texts in (prompts, contexts, targets))):
        target = target + eos
        examples.append((prompt + context + target, prompt + [-100] * len(context) + target))
    return examples


def encode(tok, texts, add_special_tokens=False):
    """Token ids of many texts in one call: the same ids as one call each, in a fraction of the time
    (and on every core when TOKENIZERS_PARALLELISM allows it)."""
    return tok(texts, add_special_tokens=add_special_tokens).input_ids if texts else []


def text_examples(tok, texts):
    """Plain language-model examples: bos + text + eos, loss everywhere."""
    return [(ids + [tok.eos_token_id],) * 2 for ids in encode(tok, texts, add_special_tokens=True)]


def collate(batch, pad_id, device):
    width = max(len(ids) for ids, _ in batch)
    ids = torch.full((len(batch), width), pad_id)
    labels = torch.full((len(batch), width), -100)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, (x, y) in enumerate(batch):
        ids[i, :len(x)], labels[i, :len(y)], mask[i, :len(x)] = torch.tensor(x), torch.tensor(y), 1
    return ids.to(device), labels.to(device), mask.to(device)


def train_lm(model, examples, steps, batch_size, lr, seed, desc, good_enough=None, check_every=100, bar_line=0,
             check_from=None):
    """AdamW, linear warmup then cosine decay, on random batches; stops early once good_enough(model)
    holds (checked every check_every steps from check_from, by default after the first third). Returns
    the last loss and the steps taken."""
    check_from = steps / 3 if check_from is None else check_from
    torch.manual_seed(seed)
    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.01)
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * (0.55 + 0.45 * math.cos(math.pi * s / steps)))
    model.train()
    bar = tqdm(range(steps), desc=desc, position=bar_line)  # one line per concurrent job
    for step in bar:
        ids, labels, mask = collate(rng.sample(examples, batch_size), model.config.pad_token_id, model.device)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if good_enough and step + 1 >= check_from and (step + 1) % check_every == 0 and good_enough(model.eval()):
            break
        model.train()
    model.eval()
    return loss.item(), step + 1


@torch.no_grad()
def greedy_completions(model, tok, prompts, max_new_tokens=64):
    """Greedy decode of left-padded prompts; returns the decoded completions."""
    tok.padding_side = "left"
    enc = tok(prompts, add_special_tokens=False, return_tensors="pt", padding=True).to(model.device)
    tok.padding_side = "right"
    out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False)
    return tok.batch_decode(out[:, enc.input_ids.shape[1]:], skip_special_tokens=True)


def new_model(cls, config_cls, seed, device, **kw):
    torch.manual_seed(seed)
    return cls(config_cls(tie_word_embeddings=False, max_position_embeddings=2048, dtype="float32", **kw)).to(device)


def save_model(model, tok, path):
    """save_pretrained with eos/pad/bos ids in both the config and the generation config."""
    for cfg in (model.config, model.generation_config):
        cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
    model.save_pretrained(path)
    tok.save_pretrained(path)


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def write_rows(path, rows):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


def write_other_schemas(data_dir, train, test, seed):
    """The same problems in the MATH schema (problem, level, type, solution with a boxed answer; dealt
    over the 7 subsets) and the MMLU schema (question, subject, four choices, answer index), so that
    pipeline_math.sh and pipeline_mmlu.sh run offline on the tiny assets."""
    for part, problems in (("train", train), ("test", test)):
        for k, subset in enumerate(utils.MATH_SUBSETS):
            write_rows(os.path.join(data_dir, "hendrycks_math", subset, f"{part}.jsonl"),
                       [{"problem": p["question"], "level": "Level 1", "type": subset,
                         "solution": p["answer"].split("\n#### ")[0] + f"\nSo the answer is $\\boxed{{{p['result']}}}$."}
                        for p in problems[k::len(utils.MATH_SUBSETS)]])
        rng = random.Random(seed + 13)
        rows = []
        for p in problems:
            wrong = rng.sample([v for v in range(max(0, p["result"] - 6), p["result"] + 7) if v != p["result"]], 3)
            at = rng.randrange(4)
            rows.append({"question": p["question"], "subject": "elementary_mathematics",
                         "choices": [str(v) for v in wrong[:at] + [p["result"]] + wrong[at:]], "answer": at})
        write_rows(os.path.join(data_dir, "mmlu", "auxiliary_train.jsonl" if part == "train" else "test.jsonl"), rows)


def make_data(out, seed, profile):
    """Write train/test jsonl (disjoint questions); return them and the teacher's own problem pool."""
    rng = random.Random(seed)
    test = make_problems(rng, profile["splits"]["test"], (), profile)
    train = make_problems(rng, profile["splits"]["train"], [p["question"] for p in test], profile)
    pool = make_problems(rng, profile["teacher_problems"] + profile["teacher_val"], [p["question"] for p in test],
                         profile)
    for part, problems in (("train", train), ("test", test)):
        write_rows(os.path.join(out, f"data/gsm8k/{part}.jsonl"),
                   [{"question": p["question"], "answer": p["answer"]} for p in problems])
    write_other_schemas(os.path.join(out, "data"), train, test, seed)
    warmup = profile.get("warmup")
    if warmup:  # drawn last, so profiles without a warm-up keep their data exactly
        seen = [p["question"] for p in test + train + pool]
        pool = pool + make_problems(rng, warmup["problems"] + warmup["val"], seen, profile)
    return train, test, pool


def teacher_pool(pool, profile):
    """The teacher's own problems (make_data appends the warm-up problems after them)."""
    return pool[:profile["teacher_problems"] + profile["teacher_val"]]


def make_tokenizers(pool, system_prompt, profile):
    """Teacher/proxy tokenizer (R1-Distill-like) and a student tokenizer with another vocabulary."""
    rng = random.Random(0) if profile["styles"] else None
    corpus = [system_prompt, utils.AF_SUFFIX] + [t for p in pool for t in (p["question"], p["answer"],
                                                                           reasoning(p, rng, profile.get("extras")))]
    vocab = profile["vocab"]
    teacher = build_tokenizer(corpus, vocab["teacher"], TEACHER_SPECIALS, ["<think>", "</think>"], bos=TEACHER_SPECIALS[3],
                              eos=TEACHER_SPECIALS[0], pad=TEACHER_SPECIALS[0], template=TEACHER_TEMPLATE,
                              qwen_split=True)  # the corpus saturates near 530 tokens: every word is one token
    student = build_tokenizer(corpus, vocab["student"], STUDENT_SPECIALS, [], bos=STUDENT_SPECIALS[0], eos=STUDENT_SPECIALS[5],
                              pad=STUDENT_SPECIALS[2], template=STUDENT_TEMPLATE)
    return teacher, student


def greedy_accuracy(model, tok, system_prompt, problems, max_new_tokens=64):
    """Share of problems whose greedy trace boxes the right answer, and the traces."""
    prompts = [utils.render_generation_prompt(tok, system_prompt, p["question"]) for p in problems]
    completions = greedy_completions(model, tok, prompts, max_new_tokens)
    correct = sum(utils.extract_boxed(c) == str(p["result"]) for c, p in zip(completions, problems))
    return correct / len(problems), completions


def forced_accuracy(model, tok, system_prompt, problems, completions):
    """Share answered right by the pipeline's answer forcing: trace, closing </think> if missing, AF_SUFFIX."""
    contexts = [utils.render_generation_prompt(tok, system_prompt, p["question"]) + c
                + ("" if "</think>" in c else "\n</think>") + utils.AF_SUFFIX for p, c in zip(problems, completions)]
    forced = greedy_completions(model, tok, contexts, max_new_tokens=32)
    return sum(utils.forced_answer(f) == str(p["result"]) for f, p in zip(forced, problems)) / len(problems)


def train_teacher(tok, pool, system_prompt, seed, profile, device):
    """Qwen2 teacher trained on its own problems until greedy solves teacher_target of held-out ones."""
    teacher = new_model(Qwen2ForCausalLM, Qwen2Config, seed, device, vocab_size=padded_vocab(len(tok), 64),
                        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                        **profile["teacher"])
    n_val = profile["teacher_val"]
    train, val = pool[:-n_val], pool[-n_val:]
    examples = teacher_examples(tok, train, system_prompt, random.Random(seed), profile["styles"], profile.get("extras"))

    def solved(model):
        return greedy_accuracy(model, tok, system_prompt, val, profile["max_new_tokens"])[0] >= profile["teacher_target"]

    loss, steps = train_lm(teacher, examples, seed=seed, desc="teacher", good_enough=solved,
                           check_every=profile["check_every"], **profile["teacher_train"])
    return teacher, loss, steps


def train_base_model(cls, config_cls, tok, texts, vocab_size, seed, desc, profile, device, bar_line=0, name=None):
    """A base model: language modelling on domain text (profile's `<name>_base` and `<name>_train`
    where it has them, else its `base` and `base_train`)."""
    model = new_model(cls, config_cls, seed, device, vocab_size=vocab_size, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      **profile.get(f"{name}_base", profile["base"]))
    loss, _ = train_lm(model, text_examples(tok, texts), seed=seed, desc=desc, bar_line=bar_line,
                       **profile.get(f"{name}_train", profile["base_train"]))
    return model, loss


def base_corpora(pool, profile, seed):
    """Pretraining text of the proxy and of the student.  tiny: the proxy reads questions with their
    GSM8K solutions, the student questions and student_docs arithmetic facts and as many arithmetic
    chains (synth_tiny's student: the questions alone).  With arithmetic_docs, both read the questions
    and arithmetic facts, never a solved problem, so all they know of the task's reasoning comes later."""
    questions = [p["question"] for p in pool]
    if not profile["arithmetic_docs"]:
        n, rng = profile.get("student_docs", 0), random.Random(seed + 5)
        docs = arithmetic_facts(rng, n, profile["max_value"]) + arithmetic_chains(rng, n, profile["max_value"])
        return [p["question"] + "\n" + p["answer"] for p in pool], questions + docs
    text = questions + arithmetic_facts(random.Random(seed + 3), profile["arithmetic_docs"], profile["max_value"])
    return text, text


def setup_torch():
    """Thread count and matmul precision, for the main process and each training job."""
    torch.set_num_threads(min(os.cpu_count() or 1, THREADS))
    torch.backends.cuda.matmul.allow_tf32 = True


def job_device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def teacher_job(tok, pool, test, system_prompt, seed, profile, path):
    """Train the teacher, grade it on the test split and save it; returns what the manifest records."""
    teacher, loss, steps = train_teacher(tok, pool, system_prompt, seed, profile, job_device())
    accuracy, completions = greedy_accuracy(teacher, tok, system_prompt, test, profile["max_new_tokens"])
    af_accuracy = forced_accuracy(teacher, tok, system_prompt, test, completions)
    save_model(teacher, tok, path)
    return dict(loss=loss, steps=steps, greedy=accuracy, answer_forced=af_accuracy, params=n_params(teacher),
                vocab_size=teacher.config.vocab_size, max_completion=max(count_tokens(tok, c) for c in completions))


# (class, config, vocab padding multiple, job index: the seed offset and the progress bar's line); the
# proxy gets another padded width than the teacher's, as Qwen2.5-3B (151,936) against R1-Distill-7B (152,064)
BASES = {"proxy": (Qwen2ForCausalLM, Qwen2Config, 32, 1), "student": (LlamaForCausalLM, LlamaConfig, 16, 2)}


def base_job(name, tok, texts, seed, profile, path):
    """Pretrain the proxy or the student on domain text and save it."""
    cls, config_cls, multiple, index = BASES[name]
    model, loss = train_base_model(cls, config_cls, tok, texts, padded_vocab(len(tok), multiple), seed + index,
                                   name, profile, job_device(), bar_line=index, name=name)
    save_model(model, tok, path)
    return dict(loss=loss, params=n_params(model), vocab_size=model.config.vocab_size)


def train_models(out, seed, profile, ttok, stok, pool, test, system_prompt):
    """The teacher, the proxy and the student train side by side, one process each: they are
    independent, and each small model alone leaves most of a GPU idle (launch-bound steps). On CPU
    they share the cores instead, so only as many run at once as the cores allow (one on two cores)."""
    proxy_text, student_text = base_corpora(pool, profile, seed)
    suffix = "_cold" if profile.get("warmup") else ""  # warm_up() writes the warm ones under the plain names
    at_once = 3 if torch.cuda.is_available() else max(1, min(3, (os.cpu_count() or 1) // THREADS))
    spawn = multiprocessing.get_context("spawn")  # CUDA cannot be forked
    with ProcessPoolExecutor(at_once, mp_context=spawn, initializer=setup_torch) as jobs:
        futures = {
            "teacher": jobs.submit(teacher_job, ttok, pool, test, system_prompt, seed, profile,
                                   os.path.join(out, "teacher")),
            "proxy": jobs.submit(base_job, "proxy", ttok, proxy_text, seed, profile,
                                 os.path.join(out, "proxy" + suffix)),
            "student": jobs.submit(base_job, "student", stok, student_text, seed, profile,
                                   os.path.join(out, "student" + suffix)),
        }
        return {name: future.result() for name, future in futures.items()}


@torch.no_grad()
def sampled_completions(model, tok, prompts, tau, seed, max_new_tokens, batch_size=512):
    """Temperature samples of left-padded prompts (no top-k, no top-p), decoded."""
    torch.manual_seed(seed)
    tok.padding_side = "left"
    out = []
    for i in range(0, len(prompts), batch_size):
        enc = tok(prompts[i:i + batch_size], add_special_tokens=False, return_tensors="pt", padding=True).to(model.device)
        gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=True, temperature=tau, top_k=0, top_p=1.0)
        out += tok.batch_decode(gen[:, enc.input_ids.shape[1]:], skip_special_tokens=True)
    tok.padding_side = "right"
    return out


def warmup_completions(teacher_path, tok, system_prompt, problems, seed, profile):
    """The warm-up traces: for each problem, the teacher's temperature sample where it is correct and a
    coin says so, else another correct solution in GSM8K's worded style (so the proxy learns the
    teacher's distribution without becoming a clone of it).  Completions start with `<think>\\n`, as
    gentraces.py stores them."""
    warmup = profile["warmup"]
    teacher = AutoModelForCausalLM.from_pretrained(teacher_path, dtype=torch.float32).to(job_device()).eval()
    prompts = [utils.render_generation_prompt(tok, system_prompt, p["question"]) for p in problems]
    samples = sampled_completions(teacher, tok, prompts, warmup["tau"], seed, profile["max_new_tokens"])
    rng = random.Random(seed + 7)
    completions, from_teacher = [], 0
    for p, sample in zip(problems, samples):
        if utils.extract_boxed(sample) == str(p["result"]) and rng.random() < warmup["teacher_share"]:
            completions.append("<think>\n" + sample)
            from_teacher += 1
        else:
            completions.append("<think>\n" + solution_text(p))
    return completions, from_teacher / len(problems)


def warmup_job(name, cold_path, path, problems, completions, val, system_prompt, seed, profile):
    """Fine-tune a cold base model on the warm-up traces (its own template, completion-only loss) until
    its greedy accuracy on val reaches warmup['target'] (checked every check_every steps), and save it."""
    warmup = profile["warmup"]
    tok = AutoTokenizer.from_pretrained(cold_path)
    model = AutoModelForCausalLM.from_pretrained(cold_path, dtype=torch.float32).to(job_device())
    tail = utils.generation_tail(tok)
    examples = [utils.tokenize_example(tok, system_prompt, p["question"], c, 512, tail)
                for p, c in zip(problems, completions)]
    history = []

    def warm_enough(m):
        history.append(greedy_accuracy(m, tok, system_prompt, val, profile["max_new_tokens"])[0])
        return history[-1] >= warmup["target"]

    loss, steps = train_lm(model, examples, warmup["steps"], warmup["batch_size"], warmup["lr"], seed + 11,
                           f"{name} warm-up", good_enough=warm_enough, check_every=warmup["check_every"],
                           check_from=0, bar_line=BASES[name][3])
    save_model(model, tok, path)
    return dict(loss=loss, steps=steps, val_accuracy=history[-1] if history else None, accuracy_history=history)


def warm_up(out, seed, profile, ttok, pool, system_prompt):
    """Proxy and student warmed up on the teacher's temperature traces of problems that no split and no
    teacher example uses, side by side; the cold bases stay as proxy_cold/ and student_cold/."""
    warmup = profile["warmup"]
    problems = pool[len(teacher_pool(pool, profile)):]
    problems, val = problems[:warmup["problems"]], problems[warmup["problems"]:]
    completions, teacher_share = warmup_completions(os.path.join(out, "teacher"), ttok, system_prompt, problems,
                                                    seed, profile)
    at_once = 2 if torch.cuda.is_available() else max(1, min(2, (os.cpu_count() or 1) // THREADS))
    spawn = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(at_once, mp_context=spawn, initializer=setup_torch) as jobs:
        futures = {name: jobs.submit(warmup_job, name, os.path.join(out, f"{name}_cold"), os.path.join(out, name),
                                     problems, completions, val, system_prompt, seed, profile)
                   for name in ("proxy", "student")}
        done = {name: future.result() for name, future in futures.items()}
    return {**done, "traces": len(problems), "teacher_share": teacher_share}


def real_shapes():
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "real_shapes.yaml")) as f:
        return yaml.safe_load(f)


def with_real_ids(tok, layout, template):
    """tok re-laid to a real tokenizer's ids: its learned tokens first, then merged tokens of two to
    four letters up to layout['regular'] (so decoded random ids re-encode to about as many tokens, as
    with a real BPE), then the specials at their real ids and reserved specials in the gaps:
    len() and every special id are the real checkpoint's."""
    spec = json.loads(tok.backend_tokenizer.to_str())
    vocab, merges = spec["model"]["vocab"], spec["model"]["merges"]
    if len(vocab) > layout["regular"]:
        raise ValueError(f"{len(vocab)} learned tokens do not fit in {layout['regular']} regular ids")
    for left, right in filler_pairs(string.ascii_letters):
        if len(vocab) == layout["regular"]:
            break
        if left + right not in vocab:
            vocab[left + right] = len(vocab)
            merges.append([left, right])
    flags = {t["content"]: t["special"] for t in spec["added_tokens"]}
    named = {int(i): text for i, text in layout["specials"].items()}
    missing = set(flags) - set(named.values())
    if missing:
        raise ValueError(f"tokens {sorted(missing)} have no id in the layout")
    spec["added_tokens"] = [
        dict(id=i, content=named.get(i, f"<|reserved_special_token_{i - layout['regular']}|>"),
             single_word=False, lstrip=False, rstrip=False, normalized=False, special=flags.get(named.get(i), True))
        for i in range(layout["regular"], layout["size"])]
    ids = {t["content"]: t["id"] for t in spec["added_tokens"]}
    for entry in spec["post_processor"]["special_tokens"].values():
        entry["ids"] = [ids[entry["id"]]]
    wide = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)), bos_token=layout["bos"],
                                   eos_token=layout["eos"], pad_token=layout["pad"], unk_token=None,
                                   chat_template=template, model_max_length=131072)
    assert len(wide) == layout["size"], (len(wide), layout["size"])
    return wide


def filler_pairs(letters):
    """(left, right) merges in a fixed order: pairs of letters, then pair + letter, then pair + pair.
    Letters only: decoded, random ids then form words that re-encode to about as many tokens (digits
    and punctuation would be split apart by the pre-tokenizers, bytes could decode to invalid UTF-8)."""
    pairs = [(a, b) for a in letters for b in letters]
    yield from pairs
    for tail in (letters, [a + b for a, b in pairs]):
        for a, b in pairs:
            for c in tail:
                yield a + b, c


def random_model(spec, tok, narrow, seed, device):
    """An untrained model of spec's class and config (narrowed if asked), bf16, its token ids from tok."""
    cls = getattr(transformers, spec["class"])
    config = cls.config_class(**{**spec["config"], **(narrow or {})}, bos_token_id=tok.bos_token_id,
                              eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    with torch.device(device):  # a 7B model initialises in seconds on the GPU, minutes on the CPU
        return cls._from_config(config, dtype=torch.bfloat16)


def build_shapes(out, seed, profile):
    """Data, tokenizers with the real id layouts, and untrained teacher, proxy and student."""
    t0 = time.time()
    system_prompt = load_system_prompt()
    train, test, _ = make_data(out, seed, profile)
    ttok, stok = make_tokenizers(train, system_prompt, profile)
    shapes = real_shapes()
    ttok = with_real_ids(ttok, shapes["teacher"]["tokenizer"], TEACHER_TEMPLATE)
    stok = with_real_ids(stok, shapes["student"]["tokenizer"], STUDENT_TEMPLATE)
    toks = {"teacher": ttok, "proxy": ttok, "student": stok}
    done = {}
    for index, name in enumerate(("teacher", "proxy", "student")):
        model = random_model(shapes[name], toks[name], profile["narrow"], seed + index, job_device())
        save_model(model, toks[name], os.path.join(out, name))
        done[name] = dict(params=n_params(model), vocab_size=model.config.vocab_size, tokenizer_len=len(toks[name]))
        del model
    manifest = {"seed": seed, "profile": profile, "rows": {"train": len(train), "test": len(test)},
                "models": done, "sources": {name: shapes[name]["source"] for name in toks},
                "device": job_device().type, "build_seconds": round(time.time() - t0, 1)}
    with open(os.path.join(out, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=2)
    return manifest


def build(out, seed, profile):
    if "narrow" in profile:  # the shapes profiles: nothing is trained
        return build_shapes(out, seed, profile)
    t0 = time.time()
    system_prompt = load_system_prompt()
    train, test, pool = make_data(out, seed, profile)
    ttok, stok = make_tokenizers(teacher_pool(pool, profile), system_prompt, profile)
    done = train_models(out, seed, profile, ttok, stok, teacher_pool(pool, profile), test, system_prompt)
    teacher = done["teacher"]
    warm = warm_up(out, seed, profile, ttok, pool, system_prompt) if profile.get("warmup") else None

    manifest = {
        "seed": seed,
        "profile": profile,
        "rows": {"train": len(train), "test": len(test), "teacher_train": profile["teacher_problems"],
                 "teacher_val": profile["teacher_val"]},
        "tokenizer_len": {"teacher": len(ttok), "student": len(stok)},
        "vocab_size": {name: done[name]["vocab_size"] for name in done},
        "params": {name: done[name]["params"] for name in done},
        "final_loss": {name: done[name]["loss"] for name in done},
        "teacher_steps": teacher["steps"],
        "teacher_test_accuracy": {"greedy": teacher["greedy"], "answer_forced": teacher["answer_forced"]},
        "max_tokens": {"teacher_prompt": max_prompt_tokens(ttok, system_prompt, test),
                       "student_prompt": max_prompt_tokens(stok, system_prompt, test),
                       "teacher_completion": teacher["max_completion"]},
        "warmup": warm,
        "device": job_device().type,
        "build_seconds": round(time.time() - t0, 1),
    }
    with open(os.path.join(out, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=2)
    return manifest


def built_otherwise(out, profile, seed):
    """How the complete asset folder out was built, when its manifest records another profile or seed
    than these (a rerun must not take tiny assets for synth ones); None when they match or it has no
    manifest."""
    path = os.path.join(out, "manifest.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        built = json.load(f)
    if (built.get("profile"), built.get("seed")) == (json.loads(json.dumps(PROFILES[profile])), seed):
        return None
    names = [name for name, p in PROFILES.items() if json.loads(json.dumps(p)) == built.get("profile")]
    return f"with profile {names[0] if names else '(one this version does not define)'} and seed {built.get('seed')}"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="output folder (built atomically; skipped if complete with this "
                        "profile and seed, refused if complete with others)")
    parser.add_argument("--profile", default="tiny", choices=sorted(PROFILES),
                        help="task and model sizes (default tiny; synth_tiny: the synth recipe at tiny sizes)")
    parser.add_argument("--seed", type=int, default=0, help="seed for data, tokenizers and models (default 0)")
    parser.add_argument("--force", action="store_true", help="rebuild even if OUT/.complete exists")
    args = parser.parse_args()
    out = os.path.abspath(args.out)
    if os.path.exists(os.path.join(out, ".complete")) and not args.force:
        other = built_otherwise(out, args.profile, args.seed)
        if other:
            print(f"error: {out} holds assets built {other}, not with profile {args.profile} and seed {args.seed}; "
                  "pass --force to rebuild them, or another --out", file=sys.stderr)
            sys.exit(2)
        print(f"{out} is already built; pass --force to rebuild")
        return
    setup_torch()
    os.makedirs(os.path.dirname(out), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".assets-", dir=os.path.dirname(out))  # same filesystem: the rename is atomic
    try:
        manifest = build(tmp, args.seed, PROFILES[args.profile])
        open(os.path.join(tmp, ".complete"), "w").close()
        if os.path.exists(out):
            shutil.rmtree(out)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    acc = manifest.get("teacher_test_accuracy")
    print(f"built {out} in {manifest['build_seconds']}s" + (f"; teacher test accuracy: greedy {acc['greedy']:.2f}, "
          f"answer-forced {acc['answer_forced']:.2f}" if acc else " (untrained models)"))


if __name__ == "__main__":
    main()
