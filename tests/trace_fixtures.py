"""Tiny tokenizers, models, fabricated trace datasets and source data files, shared by the tests.

The "teacher" tokenizer has an R1-Distill-like template (the generation prompt ends in
`<|Assistant|><think>\\n`); the "student" one a Llama-3-like template with its own specials.
Both are byte-level BPE, so decode(encode(text)) == text and label checks can compare strings.
"""
import json
import random

import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

SYSTEM = "You are a careful math teacher. Think step by step and end with \\boxed{ANSWER}."
WORDS = ["apples", "pears", "coins", "cards", "books", "shells"]

TEACHER = dict(
    specials=["<|eos|>", "<|bos|>", "<|User|>", "<|Assistant|>", "<think>", "</think>"],
    bos="<|bos|>", eos="<|eos|>",
    template=(
        "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] }}"
        "{% elif m['role'] == 'user' %}<|User|>{{ m['content'] }}"
        "{% else %}<|Assistant|>{{ m['content'].split('</think>')[-1] }}<|eos|>{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}<|Assistant|><think>\n{% endif %}"),
)
TEACHER_MARKER = "<|Assistant|>"
STUDENT = dict(
    specials=["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
    bos="<|begin_of_text|>", eos="<|eot_id|>",
    template=(
        "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
        "{{ m['content'] }}<|eot_id|>{% endfor %}"
        "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"),
)


def question(a, b, word):
    return f"Sam has {a} {word} and finds {b} more. How many {word} does Sam have?"


def completion(a, b, word, steps):
    lines = [f"Sam starts with {a} {word}." for _ in range(steps)] + [f"{a} plus {b} is {a + b}."]
    return "<think>\n" + "\n".join(lines) + "\n</think>\n\nSam has \\boxed{" + str(a + b) + "} " + word + "."


def corpus():
    texts = [SYSTEM] + [question(a, b, w) + completion(a, b, w, 1) for a in range(10) for b in range(10)
                        for w in WORDS[:2]]
    return texts + [" ".join(WORDS)]


def make_tokenizer(spec, vocab_size=300):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus(), trainer)
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in spec["specials"]])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=spec["bos"], eos_token=spec["eos"],
                                   chat_template=spec["template"], model_max_length=4096)


def save_proxy(path, tokenizer, seed=0, hidden=32, layers=2):
    """A tiny Qwen2 proxy sharing the teacher's tokenizer (vocab padded wider, as in real checkpoints)."""
    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=len(tokenizer) + 8, hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=1024, tie_word_embeddings=False,
                      eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id)
    Qwen2ForCausalLM(cfg).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def save_student(path, tokenizer, seed=0, hidden=32, layers=2):
    """A tiny Llama student with its own tokenizer and no pad token (like Llama 3)."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=1024, tie_word_embeddings=False,
                      eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id)
    LlamaForCausalLM(cfg).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def trace_rows(teacher_tokenizer, n, seed=0, long_question_rows=()):
    """Rows with gentraces.py's schema; completions vary in length, and rows listed in
    long_question_rows get a very long question (to test dropping after truncation)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        a, b, word = rng.randrange(10), rng.randrange(10), rng.choice(WORDS)
        q = question(a, b, word) + (" Think hard." * 60 if i in long_question_rows else "")
        c = completion(a, b, word, steps=1 + i % 4)
        rendered = teacher_tokenizer.apply_chat_template(
            [{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}],
            tokenize=False, add_generation_prompt=True)
        # the prompt column stops at the marker; `<think>\n` after it belongs to the completion
        prompt = rendered[:rendered.rindex(TEACHER_MARKER) + len(TEACHER_MARKER)]
        rows.append(dict(idx=i, question=q, gold=str(a + b), system=SYSTEM, prompt=prompt, completion=c,
                         trace=prompt + c, forced="", raw_pred=str(a + b), af_pred=str(a + b),
                         raw_correct=True, af_correct=True,
                         n_tokens=len(teacher_tokenizer(c, add_special_tokens=False)["input_ids"]),
                         finished=True))
    return rows


def save_traces(path, rows):
    import datasets
    datasets.Dataset.from_list(rows).save_to_disk(str(path))
    return path


def write_jsonl(path, rows):
    """Rows as a JSON-lines source file; a str row is written as it is (a malformed line on purpose)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
