"""Build the tiny pipeline's offline assets: synthetic GSM8K-style data, two tokenizers, three small models.

The teacher (Qwen2, R1-Distill-style template) is trained until its greedy traces solve most test
problems, answer forcing included. The proxy (smaller Qwen2, same tokenizer, another padded vocab
width) and the student (Llama, Llama-3-style template, its own vocabulary) are weak base models
pretrained on domain text. Deterministic data for a seed; CPU only, about 70 s on 2 idle cores.

    python make_tiny.py --out tiny_assets
"""
import argparse
import json
import math
import os
import random
import re
import shutil
import tempfile
import time

import torch
import yaml
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from tqdm import tqdm
from transformers import (LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM,
                          Qwen2Tokenizer)

NAMES = ["Ann", "Ben", "Cara", "Dev", "Eli", "Fay", "Gus", "Hana", "Ivan", "Jo", "Kim", "Liam",
         "Mia", "Noor", "Omar", "Pia", "Raj", "Sue", "Tom", "Uma", "Vic", "Wes", "Yara", "Zoe"]
OBJECTS = ["apples", "marbles", "stickers", "pencils", "cookies", "books", "shells", "coins",
           "cards", "stamps", "eggs", "balloons", "crayons", "buttons"]
GAINS = ["buys {n} more", "finds {n} more", "gets {n} more from {other}", "picks up {n} more", "wins {n} more"]
LOSSES = ["gives {n} to {other}", "loses {n}", "sells {n}", "uses {n}", "gives {n} away"]
OPENINGS = ["{name} has {n} {obj}.", "{name} starts with {n} {obj}."]
ASKS = ["How many {obj} does {name} have now?", "How many {obj} does {name} end up with?",
        "How many {obj} does {name} have at the end?"]
MAX_VALUE = 9  # values stay in 1..9: one token each under Qwen's digit split, arithmetic a small table
FORCE = "\n\n**Final Answer**\n\\[\\boxed{"  # the pipeline's answer-forcing suffix
AF_FRACTION = 0.2  # share of teacher examples that teach answer forcing
SPLIT_SIZES = {"train": 200, "test": 64}
TEACHER_PROBLEMS = 4000
TEACHER_VAL = 64  # held-out teacher problems: training stops once greedy solves 90% of them

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


def make_problem(rng):
    """One word problem: a start value then 2-3 gains or losses; returns question, GSM8K answer, steps."""
    name, other = rng.sample(NAMES, 2)
    obj = rng.choice(OBJECTS)
    value = rng.randint(2, MAX_VALUE - 1)
    start, clauses, steps = value, [], []
    for _ in range(rng.randint(2, 3)):
        if value < MAX_VALUE and (value == 1 or rng.random() < 0.5):
            n = rng.randint(1, MAX_VALUE - value)
            clause, new = rng.choice(GAINS).format(n=n, other=other), value + n
        else:
            n = rng.randint(1, value - 1)
            clause, new = rng.choice(LOSSES).format(n=n, other=other), value - n
        clauses.append(clause)
        steps.append((value, "+" if new > value else "-", n, new))
        value = new
    question = " ".join([rng.choice(OPENINGS).format(name=name, n=start, obj=obj),
                         f"{name} {', then '.join(clauses)}.", rng.choice(ASKS).format(name=name, obj=obj)])
    lines = [f"{name} {c}: {a} {s} {b} = <<{a}{s}{b}={r}>>{r} {obj}." for c, (a, s, b, r) in zip(clauses, steps)]
    return {"question": question, "answer": "\n".join(lines) + f"\n#### {value}", "steps": steps, "result": value}


def make_problems(rng, count, exclude):
    """count problems with distinct questions, none of them in exclude."""
    problems, seen = [], set(exclude)
    while len(problems) < count:
        p = make_problem(rng)
        if p["question"] not in seen:
            seen.add(p["question"])
            problems.append(p)
    return problems


def reasoning(problem):
    """The teacher's trace after `<think>\\n`: one equation a line, then the boxed answer."""
    eqs = "".join(f"{a}{s}{b}={r}\n" for a, s, b, r in problem["steps"])
    return eqs + f"</think>\n\nThe answer is \\boxed{{{problem['result']}}}."


def write_jsonl(path, problems):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        for p in problems:
            f.write(json.dumps({"question": p["question"], "answer": p["answer"]}) + "\n")


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


def render_prompt(tok, system_prompt, question):
    messages = [{"role": "system", "content": system_prompt}, {"role": "user", "content": question}]
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def count_tokens(tok, text):
    return len(tok(text, add_special_tokens=False).input_ids)


def padded_vocab(n, multiple):
    """Round up then add one more block, so padding rows always exist (Qwen pads 151,665 to 152,064)."""
    return (n + multiple - 1) // multiple * multiple + multiple


def teacher_examples(tok, problems, system_prompt, rng):
    """(ids, labels) pairs: prompt -> trace + eos, or prompt + trace + FORCE -> `N}\\]` + eos.

    The prompt itself is a target too: predicting the question's repeated names and objects grows the
    copy circuit the trace needs (with a completion-only loss 500 steps leave the teacher near 25%).
    """
    eos = [tok.eos_token_id]
    examples = []
    for p in problems:
        prompt = tok(render_prompt(tok, system_prompt, p["question"]), add_special_tokens=False).input_ids
        trace = reasoning(p)
        if rng.random() < AF_FRACTION:
            if rng.random() < 0.3:  # truncated traces, as max_length or a poisoned sample would leave them
                trace = trace[:rng.randint(0, len(trace))]
            if "</think>" not in trace:
                trace += "\n</think>"
            context = tok(trace + FORCE, add_special_tokens=False).input_ids
            target = tok(f"{p['result']}}}\\]", add_special_tokens=False).input_ids + eos
        else:
            context, target = [], tok(trace, add_special_tokens=False).input_ids + eos
        examples.append((prompt + context + target, prompt + [-100] * len(context) + target))
    return examples


def text_examples(tok, texts):
    """Plain language-model examples: bos + text + eos, loss everywhere."""
    examples = []
    for t in texts:
        ids = tok(t, add_special_tokens=True).input_ids + [tok.eos_token_id]
        examples.append((ids, ids))
    return examples


def collate(batch, pad_id):
    width = max(len(ids) for ids, _ in batch)
    ids = torch.full((len(batch), width), pad_id)
    labels = torch.full((len(batch), width), -100)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, (x, y) in enumerate(batch):
        ids[i, :len(x)], labels[i, :len(y)], mask[i, :len(x)] = torch.tensor(x), torch.tensor(y), 1
    return ids, labels, mask


def train_lm(model, examples, steps, batch_size, lr, seed, desc, good_enough=None):
    """AdamW, linear warmup then cosine decay, on random batches; stops early once good_enough(model)
    holds (checked every 100 steps after the first third). Returns the last loss and the steps taken."""
    torch.manual_seed(seed)
    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.01)
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * (0.55 + 0.45 * math.cos(math.pi * s / steps)))
    model.train()
    bar = tqdm(range(steps), desc=desc)
    for step in bar:
        ids, labels, mask = collate(rng.sample(examples, batch_size), model.config.pad_token_id)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if good_enough and step + 1 >= steps / 3 and (step + 1) % 100 == 0 and good_enough(model.eval()):
            break
        model.train()
    model.eval()
    return loss.item(), step + 1


@torch.no_grad()
def greedy_completions(model, tok, prompts, max_new_tokens=64):
    """Greedy decode of left-padded prompts; returns the decoded completions."""
    tok.padding_side = "left"
    enc = tok(prompts, add_special_tokens=False, return_tensors="pt", padding=True)
    tok.padding_side = "right"
    out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False)
    return tok.batch_decode(out[:, enc.input_ids.shape[1]:], skip_special_tokens=True)


def last_boxed(text):
    found = re.findall(r"\\boxed\{([^{}]*)\}", text)
    return found[-1].strip() if found else None


def new_model(cls, config_cls, seed, **kw):
    torch.manual_seed(seed)
    return cls(config_cls(tie_word_embeddings=False, max_position_embeddings=2048, dtype="float32", **kw))


def save_model(model, tok, path):
    """save_pretrained with eos/pad/bos ids in both the config and the generation config."""
    for cfg in (model.config, model.generation_config):
        cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
    model.save_pretrained(path)
    tok.save_pretrained(path)


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def make_data(out, seed):
    """Write train/test jsonl (disjoint questions); return them and the teacher's own problem pool."""
    rng = random.Random(seed)
    test = make_problems(rng, SPLIT_SIZES["test"], exclude=())
    train = make_problems(rng, SPLIT_SIZES["train"], exclude=[p["question"] for p in test])
    pool = make_problems(rng, TEACHER_PROBLEMS + TEACHER_VAL, exclude=[p["question"] for p in test])
    write_jsonl(os.path.join(out, "data/gsm8k/train.jsonl"), train)
    write_jsonl(os.path.join(out, "data/gsm8k/test.jsonl"), test)
    return train, test, pool


def make_tokenizers(pool, system_prompt):
    """Teacher/proxy tokenizer (R1-Distill-like) and a student tokenizer with another vocabulary."""
    corpus = [system_prompt, FORCE] + [t for p in pool for t in (p["question"], p["answer"], reasoning(p))]
    teacher = build_tokenizer(corpus, 1000, TEACHER_SPECIALS, ["<think>", "</think>"], bos=TEACHER_SPECIALS[3],
                              eos=TEACHER_SPECIALS[0], pad=TEACHER_SPECIALS[0], template=TEACHER_TEMPLATE,
                              qwen_split=True)  # the corpus saturates near 530 tokens: every word is one token
    student = build_tokenizer(corpus, 400, STUDENT_SPECIALS, [], bos=STUDENT_SPECIALS[0], eos=STUDENT_SPECIALS[5],
                              pad=STUDENT_SPECIALS[2], template=STUDENT_TEMPLATE)
    return teacher, student


def greedy_accuracy(model, tok, system_prompt, problems):
    """Share of problems whose greedy trace boxes the right answer, and the traces."""
    prompts = [render_prompt(tok, system_prompt, p["question"]) for p in problems]
    completions = greedy_completions(model, tok, prompts)
    correct = sum(last_boxed(c) == str(p["result"]) for c, p in zip(completions, problems))
    return correct / len(problems), completions


def forced_accuracy(model, tok, system_prompt, problems, completions):
    """Share answered right by the pipeline's answer forcing: trace, closing </think> if missing, FORCE."""
    contexts = [render_prompt(tok, system_prompt, p["question"]) + c + ("" if "</think>" in c else "\n</think>")
                + FORCE for p, c in zip(problems, completions)]
    forced = greedy_completions(model, tok, contexts, max_new_tokens=32)
    return sum(f.split("}")[0].strip() == str(p["result"]) for f, p in zip(forced, problems)) / len(problems)


def train_teacher(tok, pool, system_prompt, seed):
    """Qwen2 teacher trained on its own problems until greedy solves 90% of held-out ones (<= 1000 steps)."""
    teacher = new_model(Qwen2ForCausalLM, Qwen2Config, seed, vocab_size=padded_vocab(len(tok), 64),
                        hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                        pad_token_id=tok.pad_token_id)
    train, val = pool[:-TEACHER_VAL], pool[-TEACHER_VAL:]
    examples = teacher_examples(tok, train, system_prompt, random.Random(seed))

    def solved(model):
        return greedy_accuracy(model, tok, system_prompt, val)[0] >= 0.9

    loss, steps = train_lm(teacher, examples, steps=1000, batch_size=16, lr=7e-3, seed=seed, desc="teacher",
                           good_enough=solved)
    return teacher, loss, steps


def train_base_model(cls, config_cls, tok, texts, vocab_size, seed, desc):
    """A weak base model: a few seconds of language modelling on domain text."""
    model = new_model(cls, config_cls, seed, vocab_size=vocab_size, hidden_size=64, intermediate_size=192,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    loss, _ = train_lm(model, text_examples(tok, texts), steps=50, batch_size=32, lr=3e-3, seed=seed, desc=desc)
    return model, loss


def build(out, seed):
    t0 = time.time()
    system_prompt = load_system_prompt()
    train, test, pool = make_data(out, seed)
    ttok, stok = make_tokenizers(pool, system_prompt)

    teacher, teacher_loss, teacher_steps = train_teacher(ttok, pool, system_prompt, seed)
    accuracy, completions = greedy_accuracy(teacher, ttok, system_prompt, test)
    af_accuracy = forced_accuracy(teacher, ttok, system_prompt, test, completions)
    save_model(teacher, ttok, os.path.join(out, "teacher"))
    # Another padded width than the teacher's, as Qwen2.5-3B (151,936) against R1-Distill-7B (152,064).
    domain = [p["question"] + "\n" + p["answer"] for p in pool]
    proxy, proxy_loss = train_base_model(Qwen2ForCausalLM, Qwen2Config, ttok, domain, padded_vocab(len(ttok), 32),
                                         seed + 1, "proxy")
    save_model(proxy, ttok, os.path.join(out, "proxy"))
    student, student_loss = train_base_model(LlamaForCausalLM, LlamaConfig, stok, [p["question"] for p in pool],
                                             padded_vocab(len(stok), 16), seed + 2, "student")  # no solutions
    save_model(student, stok, os.path.join(out, "student"))

    manifest = {
        "seed": seed,
        "rows": {"train": len(train), "test": len(test), "teacher_train": TEACHER_PROBLEMS,
                 "teacher_val": TEACHER_VAL},
        "tokenizer_len": {"teacher": len(ttok), "student": len(stok)},
        "vocab_size": {"teacher": teacher.config.vocab_size, "proxy": proxy.config.vocab_size,
                       "student": student.config.vocab_size},
        "params": {"teacher": n_params(teacher), "proxy": n_params(proxy), "student": n_params(student)},
        "final_loss": {"teacher": teacher_loss, "proxy": proxy_loss, "student": student_loss},
        "teacher_steps": teacher_steps,
        "teacher_test_accuracy": {"greedy": accuracy, "answer_forced": af_accuracy},
        "max_tokens": {"teacher_prompt": max(count_tokens(ttok, render_prompt(ttok, system_prompt, p["question"]))
                                             for p in test),
                       "teacher_completion": max(count_tokens(ttok, c) for c in completions)},
        "build_seconds": round(time.time() - t0, 1),
    }
    with open(os.path.join(out, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=2)
    return manifest


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="output folder (built atomically; skipped if complete)")
    parser.add_argument("--seed", type=int, default=0, help="seed for data, tokenizers and models (default 0)")
    parser.add_argument("--force", action="store_true", help="rebuild even if OUT/.complete exists")
    args = parser.parse_args()
    out = os.path.abspath(args.out)
    if os.path.exists(os.path.join(out, ".complete")) and not args.force:
        print(f"{out} is already built; pass --force to rebuild")
        return
    torch.set_num_threads(min(os.cpu_count() or 1, 2))  # tiny matmuls: more threads only add sync overhead
    os.makedirs(os.path.dirname(out), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tiny-", dir=os.path.dirname(out))  # same filesystem, so the rename is atomic
    try:
        manifest = build(tmp, args.seed)
        open(os.path.join(tmp, ".complete"), "w").close()
        if os.path.exists(out):
            shutil.rmtree(out)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    acc = manifest["teacher_test_accuracy"]
    print(f"built {out} in {manifest['build_seconds']}s; teacher test accuracy: greedy {acc['greedy']:.2f}, "
          f"answer-forced {acc['answer_forced']:.2f}")


if __name__ == "__main__":
    main()
