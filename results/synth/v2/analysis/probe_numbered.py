"""CPU probe run before the v2 synth design: does numbering the question's events and the trace's
steps alone let a 1M-parameter student learn the task? Same sizes, seeds and steps as
v1/diagnosis/probe_student.py (which gave 6% on unnumbered traces); the unnumbered problems that
make_assets wrote at commit f6e4701 are rewritten into the numbered form here, so it reproduces only
at that commit (make_assets now writes numbered questions itself). Output: probe_numbered.log.

    PYTHONPATH=. python results/synth/analysis/probe_numbered.py 800 800 4200
"""
import random
import sys
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
import make_assets as m  # noqa: E402

SMALL = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2)


def clauses(p):
    return [line.split(":")[0] for line in p["answer"].splitlines()[:-1]]


def numbered(p):
    """The unnumbered question of p rewritten as its opening, a numbered list of events, and the ask."""
    q = p["question"]
    opening = q.split(". ")[0] + "."
    ask = q.rsplit(". ", 1)[1]
    body = "\n".join(f"{i}. {c}." for i, c in enumerate(clauses(p), 1))
    return dict(p, question=f"{opening}\n{body}\n{ask}")


def numbered_trace(p, rng):
    steps = "".join(f"{i}. " + rng.choice(m.STEP_STYLES).format(a=a, s=s, w=m.WORDS[s], b=b, r=r)
                    for i, (a, s, b, r) in enumerate(p["steps"], 1))
    closing = rng.choice(m.CLOSINGS).format(r=p["result"], name=p["name"], obj=p["obj"])
    return steps + "</think>\n\n" + closing


def main(base_steps, ft_steps, n_train):
    torch.set_num_threads(2)
    t0 = time.time()
    profile = m.PROFILES["synth"]
    sp = m.load_system_prompt()
    rng = random.Random(0)
    test = [numbered(p) for p in m.make_problems(rng, 100, (), profile)]
    train = [numbered(p) for p in m.make_problems(rng, n_train, [q["question"] for q in test], profile)]
    pool = [numbered(p) for p in m.make_problems(rng, 6000, [q["question"] for q in test], profile)]
    print(repr(test[0]["question"]))
    _, stok = m.make_tokenizers(pool, sp, profile)
    _, text = m.base_corpora(pool, profile, 0)
    small = dict(profile, base=SMALL, base_train=dict(steps=base_steps, batch_size=32, lr=3e-3))
    base, loss = m.train_base_model(LlamaForCausalLM, LlamaConfig, stok, text, m.padded_vocab(len(stok), 16), 2,
                                    "base", small, torch.device("cpu"))
    print(f"base loss {loss:.3f} params {m.n_params(base)} t={time.time() - t0:.0f}s", flush=True)
    r = random.Random(1)
    examples = []
    for q in train:
        prompt = stok(m.render_prompt(stok, sp, q["question"]), add_special_tokens=False).input_ids
        target = stok(numbered_trace(q, r), add_special_tokens=False).input_ids + [stok.eos_token_id]
        examples.append((prompt + target, [-100] * len(prompt) + target))
    done = 0
    for chunk in [ft_steps // 2, ft_steps - ft_steps // 2]:  # scored halfway and at the end
        loss, _ = m.train_lm(base, examples, steps=chunk, batch_size=32, lr=1e-3, seed=3 + done, desc="numbered")
        done += chunk
        acc, completions = m.greedy_accuracy(base, stok, sp, test, 128)
        print(f"numbered after {done}: loss {loss:.3f} greedy acc {acc:.2f} t={time.time() - t0:.0f}s", flush=True)
        print(repr(completions[0][:200]), flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]))
