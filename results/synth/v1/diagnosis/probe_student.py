"""CPU probe: can a small student learn the synth task from distillation-sized data, and does writing
the traces differently help? A 1M-parameter Llama student is pretrained like the synth student, then
fully fine-tuned on 4,200 gold traces (standing in for a greedy teacher) in each format given, and
scored greedily on 100 test problems. Formats: `equations` (the synth teacher's traces) and `restated`
(each clause of the question restated before its equation). `copy` adds restatements of the questions
(their facts one per line: no arithmetic, no answer) to the pretraining text.

It imports make_assets, whose synth profile has changed since: it ran at commit f6e4701.

    PYTHONPATH=. python results/synth/v1/diagnosis/probe_student.py 800 800 plain equations,restated
    PYTHONPATH=. python results/synth/v1/diagnosis/probe_student.py 1200 800 copy restated
"""
import random
import sys
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import make_assets as m

SMALL = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2)


def clauses(problem):
    """The question's clauses in order, from its GSM8K answer lines (`Mia wins 21 more: ...`)."""
    return [line.split(":")[0] for line in problem["answer"].splitlines()[:-1]]


def restated_trace(problem, rng):
    steps = "".join(f"{c}: " + rng.choice(m.STEP_STYLES).format(a=a, s=s, w=m.WORDS[s], b=b, r=r)
                    for c, (a, s, b, r) in zip(clauses(problem), problem["steps"]))
    closing = rng.choice(m.CLOSINGS).format(r=problem["result"], name=problem["name"], obj=problem["obj"])
    return steps + "</think>\n\n" + closing


def restatement(problem):
    return problem["question"].split(". ")[0] + ".\n" + "".join(c + ".\n" for c in clauses(problem))


def main(base_steps, ft_steps, pretrain, formats):
    torch.set_num_threads(2)
    t0 = time.time()
    profile = m.PROFILES["synth"]
    system_prompt = m.load_system_prompt()
    rng = random.Random(0)
    test = m.make_problems(rng, 100, (), profile)
    train = m.make_problems(rng, 4200, [q["question"] for q in test], profile)
    pool = m.make_problems(rng, 6000, [q["question"] for q in test], profile)
    _, stok = m.make_tokenizers(pool, system_prompt, profile)
    _, text = m.base_corpora(pool, profile, 0)
    if pretrain == "copy":
        text = text + [q["question"] + "\n" + restatement(q) for q in pool]
    small = dict(profile, base=SMALL, base_train=dict(steps=base_steps, batch_size=32, lr=3e-3))
    base, loss = m.train_base_model(LlamaForCausalLM, LlamaConfig, stok, text, m.padded_vocab(len(stok), 16), 2,
                                    "base", small, torch.device("cpu"))
    state = {k: v.clone() for k, v in base.state_dict().items()}
    print(f"base loss {loss:.3f} params {m.n_params(base)} t={time.time() - t0:.0f}s", flush=True)
    for fmt in formats:
        base.load_state_dict(state)
        r = random.Random(1)
        examples = []
        for q in train:
            prompt = stok(m.render_prompt(stok, system_prompt, q["question"]), add_special_tokens=False).input_ids
            trace = m.reasoning(q, r) if fmt == "equations" else restated_trace(q, r)
            target = stok(trace, add_special_tokens=False).input_ids + [stok.eos_token_id]
            examples.append((prompt + target, [-100] * len(prompt) + target))
        loss, _ = m.train_lm(base, examples, steps=ft_steps, batch_size=32, lr=1e-3, seed=3, desc=fmt)
        acc, completions = m.greedy_accuracy(base, stok, system_prompt, test, 128)
        print(f"{fmt}: distill loss {loss:.3f} greedy accuracy {acc:.2f} t={time.time() - t0:.0f}s", flush=True)
        print(repr(completions[0][:200]), flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4].split(","))
