"""Config overrides, dataset splits, chat markers and grading (utils.py)."""

import pytest
import torch
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace
from transformers import PreTrainedTokenizerFast

import trace_fixtures as tf
import utils

R1_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] }}"
    "{% elif m['role'] == 'user' %}<｜User｜>{{ m['content'] }}"
    "{% else %}{% set c = m['content'] %}{% if '</think>' in c %}{% set c = c.split('</think>')[-1] %}{% endif %}"
    "<｜Assistant｜>{{ c }}<｜end▁of▁sentence｜>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<｜Assistant｜><think>\n{% endif %}")
QWEN_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")


def make_tokenizer(template, bos="<s>", eos="</s>"):
    vocab = {w: i for i, w in enumerate(["[UNK]", bos, eos, "S", "Q", "hello", "world"])}
    tok = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos,
                                   unk_token="[UNK]", chat_template=template)


@pytest.mark.parametrize("template,marker", [
    (R1_TEMPLATE, "<｜Assistant｜>"),
    (QWEN_TEMPLATE, "<|im_start|>assistant\n"),
    (LLAMA3_TEMPLATE, "<|start_header_id|>assistant<|end_header_id|>\n\n"),
])
def test_assistant_marker_is_derived_from_the_template(template, marker):
    tok = make_tokenizer(template)
    assert utils.assistant_marker(tok) == marker
    prompt = utils.render_generation_prompt(tok, "sys", "what?")
    head, tail = utils.split_at_marker(prompt, marker)
    assert head.endswith(marker) and head + tail == prompt


def test_r1_generation_prompt_puts_think_in_the_completion():
    tok = make_tokenizer(R1_TEMPLATE)
    prompt = utils.render_generation_prompt(tok, "sys", "what?")
    head, tail = utils.split_at_marker(prompt, utils.assistant_marker(tok))
    assert tail == "<think>\n"


def test_unknown_config_key_suggests_the_closest(capsys):
    with pytest.raises(SystemExit) as e:
        utils.load_config("gen_config.yaml", ["temperatur=1.0", "tau=1"])
    assert "unknown config key 'temperatur'" in str(e.value)
    with pytest.raises(SystemExit) as e:
        utils.load_config("gen_config.yaml", ["lamb=0.1"])
    assert "did you mean 'lam'" in str(e.value)


def test_overrides_are_parsed_as_yaml_values():
    cfg = utils.load_config("gen_config.yaml", ["tau=0.9", "lam=5.00e-02", "max_samples=null", "trace_name=x"])
    assert cfg.tau == 0.9 and cfg.lam == 0.05 and cfg.max_samples is None and cfg.trace_name == "x"


@pytest.fixture
def data_dir(tmp_path):
    tf.write_jsonl(tmp_path / "gsm8k/train.jsonl",
                   [{"question": f"q{i}", "answer": f"work\n#### {i}"} for i in range(100)])
    tf.write_jsonl(tmp_path / "gsm8k/test.jsonl",
                   [{"question": f"t{i}", "answer": f"#### {i}"} for i in range(10)])
    for s in utils.MATH_SUBSETS:
        for part, n in (("train", 20), ("test", 5)):
            tf.write_jsonl(tmp_path / f"hendrycks_math/{s}/{part}.jsonl",
                           [{"problem": f"{s}-{part}-{i}", "level": "Level 1", "type": s,
                             "solution": f"so $\\boxed{{\\frac{{{i}}}{{2}}}}$"} for i in range(n)])
    tf.write_jsonl(tmp_path / "mmlu/auxiliary_train.jsonl",
                   [{"question": f"m{i}", "subject": "", "choices": ["a", "b", "c", "d"], "answer": i % 4}
                    for i in range(30)])
    tf.write_jsonl(tmp_path / "mmlu/test.jsonl",
                   [{"question": f"mt{i}", "subject": "x", "choices": ["a", "b"], "answer": 1} for i in range(6)])
    return tmp_path


def test_gsm8k_train_and_holdout_are_a_shuffled_70_30_partition(data_dir):
    train = utils.load_split("gsm8k_train", data_dir)
    holdout = utils.load_split("gsm8k_holdout", data_dir)
    assert len(train) == 70 and len(holdout) == 30
    tq, hq = {r["question"] for r in train}, {r["question"] for r in holdout}
    assert not tq & hq and len(tq | hq) == 100
    assert [r["question"] for r in train] != [f"q{i}" for i in range(70)]  # really shuffled
    assert all(r["gold"] == r["question"][1:] for r in train)
    assert [r["idx"] for r in train] == list(range(70))
    assert utils.load_split("gsm8k_train", data_dir) == train  # deterministic


def test_math_split_keys_with_underscores_parse_and_cover_every_subset(data_dir):
    assert utils.parse_split("hendrycks_math_train") == ("hendrycks_math", "train")
    train = utils.load_split("hendrycks_math_train", data_dir)
    assert len(train) == int(0.7 * 140)
    test = utils.load_split("hendrycks_math_test", data_dir, max_samples=14)
    subsets = {r["question"].split("-")[0] for r in test}
    assert len(subsets) > 3  # a capped test set samples many subsets, not just the first
    assert test[0]["gold"].startswith("\\frac{")


def test_mmlu_prompt_lists_lettered_choices_and_gold_is_a_letter(data_dir):
    rows = utils.load_split("mmlu_test", data_dir)
    assert len(rows) == 6 and all(r["gold"] == "B" for r in rows)
    assert "\nA. a\nB. b" in rows[0]["question"]
    assert len(utils.load_split("mmlu_holdout", data_dir)) == 9


def test_unknown_split_lists_the_valid_ones():
    with pytest.raises(SystemExit) as e:
        utils.parse_split("gsm8k_dev")
    assert "hendrycks_math_train" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("dataset,pred,gold,ok", [
    ("gsm8k", "1,234", "1234", True),
    ("gsm8k", "\\$1,234.00", "1234", True),
    ("gsm8k", "\\frac{1}{2}", "0.5", True),
    ("gsm8k", "\\dfrac{3}{4}", "0.75", True),
    ("gsm8k", "12", "13", False),
    ("gsm8k", None, "13", False),
    ("hendrycks_math", "0.5", "\\frac{1}{2}", True),
    ("hendrycks_math", "\\frac{2}{4}", "\\frac{1}{2}", True),
    ("hendrycks_math", "\\sqrt{2}", "\\frac{1}{2}", False),
    ("mmlu", "B", "B", True),
    ("mmlu", "\\text{C}", "C", True),
    ("mmlu", "(D)", "D", True),
    ("mmlu", "A", "B", False),
    ("mmlu", "Apple", "A", False),
])
def test_grader_cases(dataset, pred, gold, ok):
    assert utils.is_correct(dataset, pred, gold) is ok


def test_gsm8k_gold_is_the_number_after_hashes(data_dir):
    assert utils._to_example("gsm8k", {"question": "q", "answer": "a\n#### 1,234"})["gold"] == "1,234"
    assert utils.is_correct("gsm8k", "1234", "1,234")


def test_boxed_extraction_handles_nesting_and_answer_forcing():
    assert utils.extract_boxed("so \\boxed{\\frac{1}{2}} and \\boxed{7}.") == "7"
    assert utils.extract_boxed("x \\boxed{\\frac{1}{2}}") == "\\frac{1}{2}"
    assert utils.extract_boxed("no answer here") is None
    assert utils.extract_boxed("unclosed \\boxed{12") is None
    assert utils.forced_answer("42}\\]") == "42"
    assert utils.forced_answer("\\frac{3}{4}}\\]\n") == "\\frac{3}{4}"
    assert utils.forced_answer("never closed") is None


def test_r1_style_consumer_does_not_repeat_think_from_its_generation_prompt():
    completion = tf.completion(3, 4, "coins", steps=1)
    assert completion.startswith("<think>\n")
    r1, llama = tf.make_tokenizer(tf.TEACHER), tf.make_tokenizer(tf.STUDENT)
    assert utils.generation_tail(r1) == "<think>\n" and utils.generation_tail(llama) == ""
    for tok in (r1, llama):
        ids, labels = utils.tokenize_example(tok, tf.SYSTEM, "Q?", completion, max_length=512)
        text = tok.decode(ids)
        assert text.count("<think>") == 1
        prompt = utils.render_generation_prompt(tok, tf.SYSTEM, "Q?")
        assert text == prompt + completion[len(utils.generation_tail(tok)):] + tok.eos_token
        learned = tok.decode([i for i, lab in zip(ids, labels) if lab != -100])
        assert learned == text[len(prompt):]
    # a completion that does not start with the tail (traces written by another template) is kept whole
    ids, _ = utils.tokenize_example(r1, tf.SYSTEM, "Q?", "3+4=7", max_length=512)
    assert r1.decode(ids).endswith("<think>\n3+4=7" + r1.eos_token)


@pytest.mark.parametrize("value", ["abc", "-5", "0", "inf", "nan"])
def test_a_bad_memory_cap_is_refused_before_any_model_loads(value, monkeypatch):
    monkeypatch.setenv(utils.MEMORY_CAP, value)
    with pytest.raises(utils.ConfigError, match=f"^error: {utils.MEMORY_CAP} must be a positive number of GiB, got '{value}'$"):
        utils.cap_cuda_memory(torch.device("cpu"))


def test_the_memory_cap_is_off_unless_set_and_never_applies_on_cpu(monkeypatch):
    monkeypatch.delenv(utils.MEMORY_CAP, raising=False)
    assert utils.cap_cuda_memory(torch.device("cpu")) is None
    monkeypatch.setenv(utils.MEMORY_CAP, "80")
    assert utils.cap_cuda_memory(torch.device("cpu")) is None and utils.peak_gpu_gib(torch.device("cpu")) is None
