import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

import distill
import trace_fixtures as tf
import tracking
from test_tracking import scalars_in
from utils import ConfigError, load_tokenizer, render_generation_prompt

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("distill")
    teacher_tok = tf.make_tokenizer(tf.TEACHER)
    student = tf.save_student(root / "student", tf.make_tokenizer(tf.STUDENT))
    train = tf.save_traces(root / "train", tf.trace_rows(teacher_tok, 16, seed=1))
    holdout = tf.save_traces(root / "holdout", tf.trace_rows(teacher_tok, 4, seed=2))
    return root, student, train, holdout


def run(assets, output_dir, *overrides):
    root, student, train, holdout = assets
    distill.main([f"student={student}", f"student_tokenizer={student}", f"train_traces={train}",
                  f"eval_traces={holdout}", f"output_dir={output_dir}", "lora_r=8", "lora_alpha=16",
                  "learning_rate=0.01", "epochs=1", "global_batch_size=4", "max_length=256",
                  *overrides])
    return yaml.safe_load((output_dir / "train_summary.yaml").read_text())


def test_labels_mask_exactly_the_student_rendered_prompt(assets):
    root, student, train, _ = assets
    tok = load_tokenizer(str(student))
    examples, dropped = distill.build_examples(train, tok, max_length=4096)
    batch = distill.collate(examples[:3], pad_id=tok.pad_token_id)
    row = tf.trace_rows(tf.make_tokenizer(tf.TEACHER), 16, seed=1)[0]
    prompt_ids = tok(render_generation_prompt(tok, row["system"], row["question"]),
                     add_special_tokens=False)["input_ids"]
    n = batch["attention_mask"][0].sum().item()
    ids, labels = batch["input_ids"][0, :n], batch["labels"][0, :n]
    assert dropped == 0
    assert ids[:len(prompt_ids)].tolist() == prompt_ids
    assert (labels[:len(prompt_ids)] == -100).all() and (labels[len(prompt_ids):] != -100).all()
    assert tok.decode(labels[len(prompt_ids):]) == row["completion"] + tok.eos_token
    assert "<|Assistant|>" not in tok.decode(ids) and "<|start_header_id|>assistant" in tok.decode(ids)
    assert (batch["labels"][batch["attention_mask"] == 0] == -100).all()
    assert (batch["input_ids"][batch["attention_mask"] == 0] == tok.pad_token_id).all()


def test_short_run_writes_a_merged_model_and_summary(assets):
    root, student, _, _ = assets
    out = root / "run"
    summary = run(assets, out)
    final = out / "final"
    assert not (out / ".final.tmp").exists()
    assert not any("lora" in k for k in load_file(str(final / "model.safetensors")))
    model = AutoModelForCausalLM.from_pretrained(str(final))
    base = AutoModelForCausalLM.from_pretrained(str(student))
    assert model.config.vocab_size == base.config.vocab_size
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, base.get_parameter(n))]
    assert changed and all("proj" in n for n in changed)  # only LoRA-targeted weights moved
    tok, student_tok = AutoTokenizer.from_pretrained(str(final)), AutoTokenizer.from_pretrained(str(student))
    assert tok.get_vocab() == student_tok.get_vocab() and tok.chat_template == student_tok.chat_template
    assert summary["global_step"] == 4 and summary["resumed_from"] is None
    assert [e["step"] for e in summary["eval_losses"]] == [2, 4]
    losses = [e["loss"] for e in summary["train_losses"]]
    assert losses[-1] < losses[0]


def test_report_to_tensorboard_logs_the_training_and_eval_losses_to_output_dir_runs(assets):
    pytest.importorskip("tensorboard")
    root, _, _, _ = assets
    out = root / "tensorboard"
    env_before = os.environ.get("TENSORBOARD_LOGGING_DIR")
    summary = run(assets, out, "report_to=tensorboard")
    assert list((out / "runs").glob("events.out.tfevents.*")) and not (out / "checkpoints" / "runs").exists()
    scalars = scalars_in(out / "runs")
    assert [step for step, _ in scalars["train/loss"]] == [e["step"] for e in summary["train_losses"]] == [1, 2, 3, 4]
    assert [step for step, _ in scalars["eval/loss"]] == [e["step"] for e in summary["eval_losses"]] == [2, 4]
    assert [v for _, v in scalars["eval/loss"]] == pytest.approx([e["loss"] for e in summary["eval_losses"]])
    assert os.environ.get("TENSORBOARD_LOGGING_DIR") == env_before  # set only while the Trainer was built


def test_report_to_wandb_logs_offline_into_output_dir_runs(assets, monkeypatch):
    pytest.importorskip("wandb")  # not in the test extra (large); pip install -e '.[track]' brings it
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    seen = {}
    close = tracking.WandbTracker.close

    def keep_run_then_close(self):  # what the run holds when distill closes it
        seen.update(project=self.run.project, name=self.run.name, offline=self.run.offline,
                    keys=set(self.run.summary.keys()))
        close(self)
    monkeypatch.setattr(tracking.WandbTracker, "close", keep_run_then_close)
    root, _, _, _ = assets
    out = root / "student_wandb"
    run(assets, out, "report_to=wandb")
    assert seen["project"] == "antidistillation-sampling" and seen["name"] == "student_wandb" and seen["offline"]
    assert {"train/loss", "eval/loss"} <= seen["keys"]
    assert list((out / "runs" / "wandb").glob("offline-run-*/run-*.wandb"))


def test_lora_r_0_fine_tunes_every_weight(assets):
    root, student, _, _ = assets
    out = root / "full"
    summary = run(assets, out, "lora_r=0")
    model = AutoModelForCausalLM.from_pretrained(str(out / "final"))
    base = AutoModelForCausalLM.from_pretrained(str(student))
    unchanged = [n for n, p in model.named_parameters() if torch.equal(p, base.get_parameter(n))]
    assert unchanged == []  # embeddings and the output layer too, which adapters never touch
    assert summary["global_step"] == 4


def test_rerun_resumes_from_the_latest_checkpoint(assets):
    root, _, _, _ = assets
    out = root / "resume"
    first = run(assets, out, "max_steps=2")
    assert first["global_step"] == 2 and (out / "checkpoints" / "checkpoint-2" / "trainer_state.json").exists()
    shutil.rmtree(out / "final")  # as if killed after the checkpoint, before the end
    second = run(assets, out)
    assert second["resumed_from"].endswith("checkpoint-2")
    assert second["global_step"] == 4 and (out / "final" / "model.safetensors").exists()
    assert [e["step"] for e in second["train_losses"]][:2] == [1, 2]  # history carried over


def test_missing_or_empty_traces_are_one_line_errors(assets, tmp_path):
    import datasets
    root, student, _, _ = assets
    tok = load_tokenizer(str(student))
    with pytest.raises(ConfigError, match="does not exist"):
        distill.build_examples(tmp_path / "nope", tok, 256)
    empty = datasets.Dataset.from_list(tf.trace_rows(tf.make_tokenizer(tf.TEACHER), 1)).select([])
    for shards in (None, 1):  # by default datasets writes no data file at all for zero rows
        empty.save_to_disk(str(tmp_path / f"empty{shards}"), num_shards=shards)
        with pytest.raises(ConfigError, match="is empty"):
            distill.build_examples(tmp_path / f"empty{shards}", tok, 256)
    with pytest.raises(ConfigError, match="train_traces is required"):
        distill.main(["output_dir=x"])


# Bad input: one line `error: ...` on stderr, exit status 2, no traceback, nothing written. The
# student given is a directory holding only its tokenizer, so a check that came after the model load
# would end in a traceback instead and fail the test.

@pytest.fixture(scope="module")
def tokenizer_only(tmp_path_factory):
    root = tmp_path_factory.mktemp("distill_bad")
    tf.make_tokenizer(tf.STUDENT).save_pretrained(root / "student")
    teacher_tok = tf.make_tokenizer(tf.TEACHER)
    tf.save_traces(root / "train", tf.trace_rows(teacher_tok, 8, seed=1))
    tf.save_traces(root / "holdout", tf.trace_rows(teacher_tok, 4, seed=2))
    return root


@pytest.mark.slow  # a process per case (~3 s each to start torch); test_config_errors.py checks these in-process
@pytest.mark.parametrize("bad,message", [
    ({"lora_rank": 8}, "unknown config key 'lora_rank' (did you mean 'lora_r'?)"),
    ({"lora_r": -1}, "lora_r must be >= 0, got -1"),
    ({"lora_alpha": 0}, "lora_alpha must be > 0, got 0"),
    ({"learning_rate": 0}, "learning_rate must be > 0, got 0"),
    ({"learning_rate": -5e-4}, "learning_rate must be > 0, got -0.0005"),
    ({"epochs": 0}, "epochs must be > 0, got 0"),
    ({"global_batch_size": 5}, "global_batch_size=5 is not a multiple of per_device_batch_size=2 x 1 processes"),
    ({"max_length": 8}, "keeps a completion token within max_length=8"),
    (lambda tmp_path: {"eval_traces": tmp_path / "missing_holdout"}, "missing_holdout'"),
    ({"student": "/nonexistent/student"}, "student must be a model directory or a Hub id"),
], ids=["unknown_key", "lora_r_negative", "lora_alpha_0", "learning_rate_0", "learning_rate_negative", "epochs_0",
        "batch_not_divisible", "max_length_below_every_prompt", "missing_eval_traces", "missing_student"])
def test_bad_input_is_one_error_line_and_writes_nothing(bad, message, tokenizer_only, tmp_path):
    args = {"student": tokenizer_only / "student", "student_tokenizer": None, "train_traces": tokenizer_only / "train",
            "eval_traces": tokenizer_only / "holdout", "output_dir": tmp_path / "out", "max_length": 256,
            "global_batch_size": 4, "per_device_batch_size": 2}
    args.update(bad(tmp_path) if callable(bad) else bad)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("WORLD_SIZE", None)
    res = subprocess.run([sys.executable, str(ROOT / "distill.py"),
                          *(f"{k}={'null' if v is None else v}" for k, v in args.items())],
                         capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
    assert res.returncode == 2, res.stderr[-3000:]
    assert res.stderr.strip().startswith("error: ") and res.stderr.strip().count("\n") == 0, res.stderr[-3000:]
    assert message in res.stderr and "Traceback" not in res.stderr
    assert list(tmp_path.iterdir()) == []  # no output_dir, checkpoints or final model


def test_global_batch_must_split_evenly_over_the_processes():
    """The rule counts processes: 16 sequences split over 8 processes of 2, not over 3 processes of 2."""
    cfg = distill.load_config("train_config.yaml", ["train_traces=t", "output_dir=o", "global_batch_size=16",
                                                    "per_device_batch_size=2"])
    distill.check_config(cfg, world=8)
    assert distill.schedule(cfg, n_train=64, world=8)[0] == 1
    with pytest.raises(ConfigError, match=r"2 x 3 processes = 6; set e.g. global_batch_size=18"):
        distill.check_config(cfg, world=3)
