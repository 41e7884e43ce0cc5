"""fewshot=k: a base model's evaluation on k worked train examples in plain "Question: / Answer:" text,
its completion cut where the model starts a question of its own and graded on the answer it states."""
import json

import datasets
import pytest

import gentraces
import make_assets
import utils


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    """The tiny profile's GSM8K-schema data, as make_assets.py writes it (no model is trained)."""
    out = tmp_path_factory.mktemp("tinydata")
    make_assets.make_data(str(out), 0, make_assets.PROFILES["tiny"])
    return out / "data"


def test_eight_shot_prompt_is_eight_worked_train_examples_then_the_question(tiny_data):
    test = utils.load_split("gsm8k_test", tiny_data, 4)
    train = {ex["question"]: ex["solution"] for ex in utils.load_split("gsm8k_train", tiny_data)}
    shots = utils.fewshot_examples("gsm8k_test", tiny_data, 8, seed=42, exclude=[ex["question"] for ex in test])
    prompt = utils.render_fewshot_prompt(shots, test[0]["question"])
    blocks = prompt.split("\n\n")
    assert len(blocks) == 9 and blocks[-1] == f"Question: {test[0]['question']}\nAnswer:"
    for block, (q, a) in zip(blocks, shots):
        assert block == f"Question: {q}\nAnswer: {a}" and train[q] == a and "\n#### " in a
    assert len({q for q, _ in shots}) == 8


def test_shots_are_fixed_by_seed_and_never_an_evaluated_question(tiny_data):
    draw = lambda seed, exclude=(): utils.fewshot_examples("gsm8k_test", tiny_data, 8, seed, exclude)
    assert draw(42) == draw(42) and draw(42) != draw(43)
    banned = [q for q, _ in draw(42)]
    assert not set(banned) & {q for q, _ in draw(42, exclude=banned)}


def test_more_shots_than_train_examples_is_one_clear_error(tiny_data):
    with pytest.raises(utils.ConfigError, match="fewshot=100000 needs 100000 examples from gsm8k_train"):
        utils.fewshot_examples("gsm8k_test", tiny_data, 100000, 0)


@pytest.mark.parametrize("completion, kept, answer", [
    (" 4 + 3 = 7 apples.\n#### 7\n\nQuestion: Sam has 2 pens.\nAnswer: 2\n#### 2", " 4 + 3 = 7 apples.\n#### 7", "7"),
    (" 4 + 3 = 7\n#### 7\nQuestion: again", " 4 + 3 = 7\n#### 7", "7"),
    (" so it is \\boxed{12}.", " so it is \\boxed{12}.", "12"),
    (" The answer is (B).\n\nQuestion: next", " The answer is (B).", "B"),
    (" I do not know", " I do not know", None),
])
def test_a_completion_stops_at_the_next_question_and_is_graded_on_its_stated_answer(completion, kept, answer):
    assert utils.cut_at_next_question(completion) == kept
    assert utils.fewshot_answer(kept) == answer


def test_a_fewshot_run_writes_plain_prompts_cut_completions_and_records_k(untrained_assets, tmp_path):
    gentraces.main([f"teacher={untrained_assets / 'teacher'}", f"data_dir={untrained_assets / 'data'}",
                    f"exp_dir={tmp_path}", "data_split=gsm8k_test", "max_samples=6", "batch_size=3",
                    "max_length=400", "max_prompt_length=300", "tau=1.0", "fewshot=2", "trace_name=fs",
                    "engine=eager"])
    rows = list(datasets.load_from_disk(str(tmp_path / "traces" / "fs")))
    assert len(rows) == 6
    for r in rows:
        assert r["prompt"].startswith("Question: ") and r["prompt"].count("Question: ") == 3
        assert r["prompt"].endswith(f"Question: {r['question']}\nAnswer:") and "<|User|>" not in r["prompt"]
        assert "\nQuestion:" not in r["completion"] and r["forced"] == ""
        assert r["raw_pred"] == r["af_pred"] == utils.fewshot_answer(r["completion"])
    entry = json.loads((tmp_path / "metadata" / "trace_registry.jsonl").read_text().splitlines()[-1])
    assert entry["fewshot"] == 2 and entry["name"] == "fs"
