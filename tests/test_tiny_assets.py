"""Tiny assets from make_assets.py: data schema, tokenizers, chat templates, a teacher that solves the test set.
The tests of the built assets are slow (the build trains a teacher); those of the builder's parts are fast."""
import json
import os
import re
import subprocess
import sys

import pytest
import torch
from tokenizers import Tokenizer
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import make_assets  # noqa: E402
import utils  # noqa: E402

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Ann has 3 apples."}]


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def greedy(model, tok, ids, max_new_tokens):
    """Plain greedy decoding without a cache, over the tokenizer's ids only (padding rows excluded)."""
    ids = list(ids)
    start = len(ids)
    with torch.no_grad():
        for _ in range(max_new_tokens):
            nxt = int(model(torch.tensor([ids])).logits[0, -1, :len(tok)].argmax())
            if nxt == tok.eos_token_id:
                break
            ids.append(nxt)
    return tok.decode(ids[start:])


@pytest.mark.slow
def test_data_files_follow_gsm8k_schema_with_correct_answers(tiny_assets):
    for split, size in [("train", 400), ("test", 64)]:
        rows = read_jsonl(tiny_assets / "data" / "gsm8k" / f"{split}.jsonl")
        assert len(rows) == size
        for row in rows:
            assert set(row) == {"question", "answer"}
            *lines, final = row["answer"].split("\n")
            gold = int(re.fullmatch(r"#### (\d+)", final).group(1))
            calcs = [re.search(r"<<(\d+)([+-])(\d+)=(\d+)>>", line).groups() for line in lines]
            value = int(re.findall(r"\d+", row["question"])[0])
            assert 2 <= len(calcs) <= 3
            for a, op, b, result in calcs:
                assert int(a) == value
                value = int(a) + int(b) if op == "+" else int(a) - int(b)
                assert value == int(result)
            assert value == gold


@pytest.mark.slow
def test_train_and_test_questions_are_disjoint(tiny_assets):
    train = {r["question"] for r in read_jsonl(tiny_assets / "data" / "gsm8k" / "train.jsonl")}
    test = {r["question"] for r in read_jsonl(tiny_assets / "data" / "gsm8k" / "test.jsonl")}
    assert len(train) == 400 and len(test) == 64 and not train & test


def test_same_seed_writes_identical_data(tmp_path):
    make_assets.make_data(str(tmp_path / "a"), seed=3, profile=make_assets.PROFILES["tiny"])
    make_assets.make_data(str(tmp_path / "b"), seed=3, profile=make_assets.PROFILES["tiny"])
    for split in ("train", "test"):
        path = os.path.join("data", "gsm8k", f"{split}.jsonl")
        assert (tmp_path / "a" / path).read_bytes() == (tmp_path / "b" / path).read_bytes()


def test_arithmetic_chains_are_correct_and_answer_forcing_repeats_the_last_result():
    import random
    docs = make_assets.arithmetic_chains(random.Random(4), 200, 9)
    for doc in docs:
        body, _, forced = doc.partition(utils.AF_SUFFIX)
        steps = re.findall(r"(\d+) ?(\+|-|plus|minus) ?(\d+) ?(?:=| is) (\d+)|(\d+)([+-])(\d+)=(\d+)", body)
        steps = [tuple(x for x in m if x) for m in steps]
        assert 2 <= len(steps) <= 4
        for (a, op, b, r), nxt in zip(steps, steps[1:] + [None]):
            assert int(r) == (int(a) + int(b) if op in ("+", "plus") else int(a) - int(b)) and 1 <= int(r) <= 9
            assert nxt is None or nxt[0] == r
        assert not forced or forced == f"{steps[-1][3]}}}\\]"
    assert 0.6 < sum(utils.AF_SUFFIX in d for d in docs) / len(docs) < 0.9


def test_tiny_student_reads_arithmetic_but_no_solved_problem():
    """The tiny student's corpus: the questions and arithmetic documents, never a question with its
    solution (that is what distillation teaches); the proxy's keeps the GSM8K solutions, and synth_tiny's
    student keeps the questions alone."""
    import random
    profile = make_assets.PROFILES["tiny"]
    pool = make_assets.make_problems(random.Random(0), 50, (), profile)
    proxy, student = make_assets.base_corpora(pool, profile, 0)
    questions = {p["question"] for p in pool}
    assert proxy == [p["question"] + "\n" + p["answer"] for p in pool]
    assert [t for t in student if t in questions] == [p["question"] for p in pool]
    assert len(student) == len(pool) + 2 * profile["student_docs"]
    assert not any("<think>" in t or "####" in t or t not in questions and "How many" in t for t in student)
    assert make_assets.base_corpora(pool, make_assets.PROFILES["synth_tiny"], 0)[1] == [p["question"] for p in pool]


def test_synth_traces_number_their_steps_like_the_question_lists_its_events():
    """Synth problems list one event a line, numbered; the k-th trace line is `k. ` and the k-th
    event's arithmetic, so the line number points at the event whose number it uses."""
    import random
    rng = random.Random(5)
    for p in make_assets.make_problems(rng, 50, (), make_assets.PROFILES["synth"]):
        events = re.findall(r"^(\d+)\. \w+ .*?(\d+)", p["question"], re.M)
        lines = make_assets.reasoning(p, rng).split("</think>")[0].splitlines()
        assert [int(k) for k, _ in events] == list(range(1, len(p["steps"]) + 1)) == \
            [int(line.split(".")[0]) for line in lines]
        for (_, n), line, (a, _, b, r) in zip(events, lines, p["steps"]):
            assert int(n) == b and re.findall(r"\d+", line.split(". ", 1)[1]) == [str(a), str(b), str(r)]
    tiny = make_assets.make_problems(rng, 5, (), make_assets.PROFILES["tiny"])
    assert not any(re.search(r"^\d+\. ", p["question"] + make_assets.reasoning(p), re.M) for p in tiny)


@pytest.mark.slow
def test_teacher_and_proxy_share_tokenizer_but_not_vocab_width(tiny_assets):
    teacher_tok = AutoTokenizer.from_pretrained(tiny_assets / "teacher")
    proxy_tok = AutoTokenizer.from_pretrained(tiny_assets / "proxy")
    assert teacher_tok.get_vocab() == proxy_tok.get_vocab()
    teacher, proxy = (AutoConfig.from_pretrained(tiny_assets / name) for name in ("teacher", "proxy"))
    assert teacher.vocab_size != proxy.vocab_size
    assert min(teacher.vocab_size, proxy.vocab_size) > len(teacher_tok)
    assert not teacher.tie_word_embeddings and teacher.num_key_value_heads < teacher.num_attention_heads


@pytest.mark.slow
def test_student_tokenizer_differs_from_teacher(tiny_assets):
    student = AutoTokenizer.from_pretrained(tiny_assets / "student")
    teacher = AutoTokenizer.from_pretrained(tiny_assets / "teacher")
    assert student.get_vocab() != teacher.get_vocab()
    assert student.eos_token == "<|eot_id|>" and student.pad_token == "<|finetune_right_pad_id|>"
    assert AutoConfig.from_pretrained(tiny_assets / "student").vocab_size >= len(student)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["teacher", "proxy", "student"])
def test_auto_tokenizer_encodes_like_the_saved_tokenizer_json(tiny_assets, name):
    # AutoTokenizer rebuilds qwen2 tokenizers with its own pre-tokenizer; the ids must not change.
    tok = AutoTokenizer.from_pretrained(tiny_assets / name)
    raw = Tokenizer.from_file(str(tiny_assets / name / "tokenizer.json"))
    text = tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True) + "12+7=19\n</think>"
    assert tok(text, add_special_tokens=False).input_ids == raw.encode(text, add_special_tokens=False).ids


@pytest.mark.slow
def test_teacher_generation_prompt_ends_in_think(tiny_assets):
    tok = AutoTokenizer.from_pretrained(tiny_assets / "teacher")
    text = tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert text == "<｜begin▁of▁sentence｜>Be brief.<｜User｜>Ann has 3 apples.<｜Assistant｜><think>\n"
    ids = tok(text, add_special_tokens=False).input_ids
    specials = ["<｜begin▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>", "<think>"]
    assert all(tok.convert_tokens_to_ids(s) in ids for s in specials)
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1


@pytest.mark.slow
def test_teacher_template_drops_reasoning_from_assistant_messages(tiny_assets):
    tok = AutoTokenizer.from_pretrained(tiny_assets / "teacher")
    reply = {"role": "assistant", "content": "3+4=7\n</think>\n\nThe answer is 7."}
    text = tok.apply_chat_template(MESSAGES + [reply], tokenize=False)
    assert text.endswith("<｜Assistant｜>\n\nThe answer is 7.<｜end▁of▁sentence｜>") and "3+4=7" not in text


@pytest.mark.slow
def test_student_template_uses_llama3_headers(tiny_assets):
    tok = AutoTokenizer.from_pretrained(tiny_assets / "student")
    text = tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert text == ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
                    "<|start_header_id|>user<|end_header_id|>\n\nAnn has 3 apples.<|eot_id|>"
                    "<|start_header_id|>assistant<|end_header_id|>\n\n")
    ids = tok(text, add_special_tokens=False).input_ids
    assert ids.count(tok.convert_tokens_to_ids("<|start_header_id|>")) == 3


@pytest.fixture(scope="module")
def teacher_runs(tiny_assets):
    """Greedy completion and answer-forced continuation for every test problem."""
    tok = AutoTokenizer.from_pretrained(tiny_assets / "teacher")
    model = AutoModelForCausalLM.from_pretrained(tiny_assets / "teacher").eval()
    system_prompt = make_assets.load_system_prompt()
    runs = []
    for row in read_jsonl(tiny_assets / "data" / "gsm8k" / "test.jsonl"):
        prompt = utils.render_generation_prompt(tok, system_prompt, row["question"])
        completion = greedy(model, tok, tok(prompt, add_special_tokens=False).input_ids, 64)
        closed = completion if "</think>" in completion else completion + "\n</think>"
        forced_ids = tok(prompt + closed + utils.AF_SUFFIX, add_special_tokens=False).input_ids
        runs.append((row["answer"].split("#### ")[-1], completion, greedy(model, tok, forced_ids, 32)))
    return runs


@pytest.mark.slow
def test_teacher_greedy_solves_most_test_problems(teacher_runs):
    correct = [utils.extract_boxed(completion) == gold for gold, completion, _ in teacher_runs]
    assert sum(correct) / len(correct) >= 0.8


@pytest.mark.slow
def test_teacher_answers_correctly_when_forced(teacher_runs):
    correct = [utils.forced_answer(forced) == gold for gold, _, forced in teacher_runs]
    assert sum(correct) / len(correct) >= 0.8


@pytest.mark.slow
def test_complete_build_is_not_rebuilt(tiny_assets):
    result = subprocess.run([sys.executable, os.path.join(REPO, "make_assets.py"), "--out", str(tiny_assets)],
                            check=True, capture_output=True, text=True)
    assert "already built" in result.stdout
    manifest = json.loads((tiny_assets / "manifest.json").read_text())
    assert manifest["teacher_test_accuracy"]["greedy"] >= 0.8 and (tiny_assets / ".complete").exists()


def test_a_tokenizer_relaid_to_a_real_layout_keeps_its_text_and_puts_specials_at_their_ids():
    import make_assets
    corpus = ["Ann has 5 apples. She buys 3 more.", "How many apples does Ann have now?"] * 20
    tok = make_assets.build_tokenizer(corpus, 300, make_assets.TEACHER_SPECIALS, ["<think>", "</think>"],
                                      bos=make_assets.TEACHER_SPECIALS[3], eos=make_assets.TEACHER_SPECIALS[0],
                                      pad=make_assets.TEACHER_SPECIALS[0], template=make_assets.TEACHER_TEMPLATE,
                                      qwen_split=True)
    specials = dict(enumerate(make_assets.TEACHER_SPECIALS + ["<think>", "</think>"], start=5000))
    layout = dict(regular=5000, size=5010, specials=specials, bos=specials[5003], eos=specials[5000],
                  pad=specials[5000])
    wide = make_assets.with_real_ids(tok, layout, make_assets.TEACHER_TEMPLATE)
    assert len(wide) == 5010 and wide.bos_token_id == 5003 and wide.eos_token_id == 5000
    assert wide.convert_tokens_to_ids("</think>") == 5005 and wide.convert_ids_to_tokens(5009).startswith("<|reserved")
    text = corpus[0]
    assert wide(text, add_special_tokens=False).input_ids == tok(text, add_special_tokens=False).input_ids
    assert wide("x", add_special_tokens=True).input_ids[0] == 5003
    filler = wide.decode([4000, 4001, 4002])
    assert filler.isalpha() and len(wide(filler, add_special_tokens=False).input_ids) <= 4


def built_folder(tmp_path, profile, seed):
    out = tmp_path / "assets"
    out.mkdir()
    (out / ".complete").write_text("")
    (out / "manifest.json").write_text(json.dumps({"seed": seed, "profile": make_assets.PROFILES[profile]}))
    return out


@pytest.mark.parametrize("args,other", [(["--profile", "synth_tiny"], "profile tiny and seed 0"),
                                         (["--seed", "3"], "profile tiny and seed 0")])
def test_a_folder_built_with_another_profile_or_seed_is_refused_in_one_line(tmp_path, args, other):
    out = built_folder(tmp_path, "tiny", 0)
    res = subprocess.run([sys.executable, os.path.join(REPO, "make_assets.py"), "--out", str(out), *args],
                         capture_output=True, text=True)
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert res.stderr.startswith(f"error: {out} holds assets built with {other}") and "--force" in res.stderr
    assert sorted(p.name for p in out.iterdir()) == [".complete", "manifest.json"]  # nothing rebuilt


def test_a_folder_built_as_asked_is_kept(tmp_path):
    out = built_folder(tmp_path, "synth_tiny", 0)
    assert make_assets.built_otherwise(str(out), "synth_tiny", 0) is None
    assert make_assets.built_otherwise(str(out), "tiny", 0) == "with profile synth_tiny and seed 0"
    res = subprocess.run([sys.executable, os.path.join(REPO, "make_assets.py"), "--out", str(out),
                          "--profile", "synth_tiny"], capture_output=True, text=True)
    assert res.returncode == 0 and "is already built" in res.stdout, res.stderr
