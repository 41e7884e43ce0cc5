"""Stage 4: LoRA SFT of the student on teacher traces (the distillation ADS tries to spoil).

An example is the prompt rendered by the student's own chat template, then the teacher's completion
and the student's EOS; only completion tokens count in the loss. Evaluates on the holdout traces and
checkpoints every eval_every epochs, resumes from the latest checkpoint when restarted, and at the end
merges the LoRA and writes model + student tokenizer to output_dir/final (the stage's sentinel).
report_to=tensorboard or wandb also logs the training and holdout losses to output_dir/runs (off by
default; wandb runs offline without WANDB_API_KEY).

    accelerate launch --config_file acc_config.yaml distill.py train_traces=exp/traces/NAME \
        eval_traces=exp/traces/holdout output_dir=exp/models/student_NAME [report_to=tensorboard]
    tensorboard --logdir exp/models    # one run per student: its training loss and holdout loss
"""
import math
import os
import shutil
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Annotated, Literal

# Batches vary in width, so the caching allocator fragments its cache into blocks of many sizes;
# expandable segments let it grow and reuse one mapping instead. That matters when several students
# share one GPU (pipeline_synth.sh). Without them, in a one-GPU synth run, 9 of 20 distills failed out
# of memory while the others held 6-29 GiB each (whole processes); the next run, which added them and
# changed nothing else that touches memory, reserved at most 4.4-7.6 GiB each, 20 at once. Read at
# the first CUDA allocation, so it must be set before then; a PYTORCH_CUDA_ALLOC_CONF of the user's wins.
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

import torch  # noqa: E402

from pydantic import Field  # noqa: E402

from utils import (Attention, Count, Dtype, ModelPath, NonNegative, NonNegativeInt, OutputDir, Positive,  # noqa: E402
                   Seed, Settings, TracesPath, atomic_publish_dir, atomic_write_text, cap_cuda_memory, checked, die,
                   load_config, load_model, load_tokenizer, load_traces, log, peak_gpu_gib, run_cli, seed_everything,
                   to_yaml, tokenize_traces, torch_dtype)
import tracking  # noqa: E402


def scheduler_problem(name):
    if name in ("cosine", "linear", "constant"):  # common names, without the seconds of importing the trainer
        return None
    from transformers import SchedulerType  # the names TrainingArguments accepts
    names = [t.value for t in SchedulerType]
    return None if name in names else f"must be a transformers scheduler name ({', '.join(names)})"


class TrainSettings(Settings):
    """train_config.yaml's keys with their types and ranges (the yaml holds the defaults). Unchecked, a
    negative lora_r failed after the model load, learning_rate <= 0, lora_alpha=0 or epochs=0 published
    an untrained or anti-trained student as final/, and a scheduler name transformers does not know
    failed after the model load."""
    student: ModelPath
    student_tokenizer: ModelPath | None
    dtype: Dtype
    attn_implementation: Attention
    trust_remote_code: bool
    train_traces: TracesPath
    eval_traces: TracesPath | None
    max_length: Count
    max_samples: Count | None
    lora_r: NonNegativeInt                  # 0 = full fine-tuning
    lora_alpha: Positive
    lora_dropout: Annotated[float, Field(ge=0, lt=1)]
    target_modules: Annotated[list[str], Field(min_length=1)] | Literal["all-linear"]
    learning_rate: Positive
    weight_decay: NonNegative
    max_grad_norm: NonNegative              # 0 = no clipping
    warmup_ratio: Annotated[float, Field(ge=0, lt=1)]
    lr_scheduler: Annotated[str, checked(lambda v, ctx: scheduler_problem(v))]
    global_batch_size: Count
    per_device_batch_size: Count
    epochs: Positive
    max_steps: Count | None
    gradient_checkpointing: bool
    seed: Seed
    eval_every: Positive                    # in epochs
    output_dir: OutputDir
    report_to: Literal[tracking.REPORT_TO]

    def problems(self, context):
        # a missing tensorboard or wandb would otherwise fail in Trainer(), after the model load
        problem = tracking.missing_package(self.report_to)
        return [problem] if problem else []


def settings(argv, pending=()):
    """The run's config: train_config.yaml + `key=value` overrides, checked against TrainSettings."""
    return load_config("train_config.yaml", argv, TrainSettings, pending)


def check_config(cfg, world):
    """What settings() cannot know alone: a global batch the processes cannot split would have to
    become another one, changing the experiment with the GPU count."""
    per_pass = cfg.per_device_batch_size * world  # sequences per forward pass over all processes
    if cfg.global_batch_size % per_pass:
        rounded_up = -(-cfg.global_batch_size // per_pass) * per_pass
        die(f"global_batch_size={cfg.global_batch_size} is not a multiple of per_device_batch_size="
            f"{cfg.per_device_batch_size} x {world} processes = {per_pass}; set e.g. "
            f"global_batch_size={rounded_up} or a smaller per_device_batch_size")


def check_target_modules(cfg):
    """LoRA targets the student lacks, found from its config on the meta device (no weights read)
    rather than by peft after the model load."""
    if cfg.lora_r == 0 or cfg.target_modules == "all-linear":
        return
    from transformers import AutoConfig, AutoModelForCausalLM
    try:
        config = AutoConfig.from_pretrained(cfg.student, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as e:
        die(f"cannot read the student's config from {cfg.student} ({str(e).strip().splitlines()[0]})")
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=cfg.trust_remote_code)
    names = {name.rpartition(".")[2] for name, _ in skeleton.named_modules()}
    missing = [t for t in cfg.target_modules if t.rpartition(".")[2] not in names]
    if missing:
        linear = sorted({n.rpartition(".")[2] for n, m in skeleton.named_modules() if isinstance(m, torch.nn.Linear)})
        die(f"target_modules {', '.join(missing)} not in the student {cfg.student} (its linear layers: "
            f"{', '.join(linear)})")


def build_examples(path, tokenizer, max_length, max_samples=None):
    """Student-tokenized examples; traces left with no completion token after truncation are dropped."""
    ds = load_traces(path)
    if max_samples is not None:
        ds = ds.select(range(min(int(max_samples), len(ds))))
    pairs, dropped = tokenize_traces(ds, tokenizer, max_length)
    examples = [{"input_ids": ids, "labels": labels} for ids, labels in pairs]
    if not examples:
        die(f"no trace in {path} keeps a completion token within max_length={max_length}")
    return examples, len(dropped)


def collate(batch, pad_id):
    """Right-pad input_ids with pad_id and labels with -100; the attention mask hides the padding."""
    width = max(len(ex["input_ids"]) for ex in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full_like(input_ids, -100)
    mask = torch.zeros_like(input_ids)
    for row, ex in enumerate(batch):
        n = len(ex["input_ids"])
        input_ids[row, :n] = torch.tensor(ex["input_ids"])
        labels[row, :n] = torch.tensor(ex["labels"])
        mask[row, :n] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def student_model(cfg, device):
    from peft import LoraConfig, get_peft_model
    model = load_model(cfg.student, torch_dtype(cfg.dtype, device), device, cfg.attn_implementation,
                       cfg.trust_remote_code)
    if cfg.gradient_checkpointing:  # non-reentrant: the frozen embeddings' outputs need no grad
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.lora_r == 0:  # full fine-tuning
        return model
    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=cfg.target_modules, task_type="CAUSAL_LM")
    return get_peft_model(model, lora)


def schedule(cfg, n_train, world):
    """(gradient accumulation steps, optimizer steps per epoch, eval/checkpoint interval in steps);
    check_config made global_batch_size a multiple of per_device_batch_size x world."""
    per_pass = cfg.per_device_batch_size * world
    accum = cfg.global_batch_size // per_pass
    batches_per_epoch = math.ceil(n_train / per_pass)  # per process, as Trainer's sharded loader counts
    steps_per_epoch = math.ceil(batches_per_epoch / accum)
    return accum, steps_per_epoch, max(1, round(cfg.eval_every * steps_per_epoch))


def training_args(cfg, accum, eval_steps, has_eval, dtype):
    from transformers import TrainingArguments
    return TrainingArguments(
        output_dir=str(Path(cfg.output_dir) / "checkpoints"),
        per_device_train_batch_size=cfg.per_device_batch_size,
        per_device_eval_batch_size=cfg.per_device_batch_size,
        gradient_accumulation_steps=accum,
        learning_rate=cfg.learning_rate,
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm,
        warmup_steps=cfg.warmup_ratio,  # a float below 1 is a share of all steps (transformers 5)
        lr_scheduler_type=cfg.lr_scheduler,
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps or -1,
        eval_strategy="steps" if has_eval else "no",
        eval_steps=eval_steps,
        save_strategy="steps",
        save_steps=eval_steps,
        save_total_limit=2,
        logging_steps=max(1, eval_steps // 5),
        seed=cfg.seed,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        use_cpu=not torch.cuda.is_available(),  # several CPU processes then talk over gloo
        ddp_find_unused_parameters=False,
        remove_unused_columns=False,
        report_to=cfg.report_to,
    )


@contextmanager
def tensorboard_dir(path):
    """transformers 5 has no logging_dir: its TensorBoardCallback takes TENSORBOARD_LOGGING_DIR when the
    Trainer builds it, else output_dir/runs/DATE_HOST, which here is inside checkpoints/. Set only while
    the Trainer is built, so a later run in this process does not inherit it."""
    old = os.environ.get("TENSORBOARD_LOGGING_DIR")
    os.environ["TENSORBOARD_LOGGING_DIR"] = str(path)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TENSORBOARD_LOGGING_DIR")
        else:
            os.environ["TENSORBOARD_LOGGING_DIR"] = old


def open_wandb_run(cfg, is_main):
    """wandb: the run is opened here, with this project's name, dir and offline default; Trainer's
    WandbCallback finds it open and logs into it (it would otherwise open an online 'huggingface' one)."""
    if cfg.report_to != "wandb" or not is_main:
        return tracking.NoTracker()
    return tracking.open_tracker("wandb", Path(cfg.output_dir) / "runs", Path(cfg.output_dir).name, vars(cfg))


def latest_checkpoint(checkpoints):
    """The newest complete checkpoint (Trainer writes trainer_state.json last), or None."""
    done = [p for p in Path(checkpoints).glob("checkpoint-*") if (p / "trainer_state.json").exists()]
    return str(max(done, key=lambda p: int(p.name.rpartition("-")[2]))) if done else None


def save_final(model, tokenizer, output_dir):
    """Merge the LoRA into the base weights (if any) and publish output_dir/final in one rename."""
    merged = model.merge_and_unload() if hasattr(model, "merge_and_unload") else model
    # the student learned to stop with its tokenizer's EOS (<|eot_id|> for Llama 3 Instruct), which
    # the base model's generation config may not list
    gen = merged.generation_config
    eos = gen.eos_token_id if isinstance(gen.eos_token_id, list) else [gen.eos_token_id]
    gen.eos_token_id = list(dict.fromkeys([e for e in eos if e is not None] + [tokenizer.eos_token_id]))
    gen.pad_token_id = tokenizer.pad_token_id
    tmp = Path(output_dir) / ".final.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    merged.save_pretrained(str(tmp))
    tokenizer.save_pretrained(str(tmp))
    atomic_publish_dir(tmp, Path(output_dir) / "final")


def summary(cfg, trainer, result, resumed_from, counts):
    """train_summary.yaml: losses by step, whether this run resumed, and the resolved config."""
    history = trainer.state.log_history
    return {
        "train_loss": result.training_loss,
        "train_losses": [{"step": h["step"], "loss": h["loss"]} for h in history if "loss" in h],
        "eval_losses": [{"step": h["step"], "epoch": h["epoch"], "loss": h["eval_loss"]}
                        for h in history if "eval_loss" in h],
        "global_step": trainer.state.global_step,
        "resumed_from": resumed_from,
        "world_size": trainer.args.world_size,
        # this process's peak, with what its allocator kept cached: what a GPU shared by several
        # students must hold for each
        "peak_gpu_memory_gib": peak_gpu_gib(trainer.args.device),
        "gradient_accumulation_steps": trainer.args.gradient_accumulation_steps,
        **counts,
        "config": vars(cfg),
    }


def main(argv):
    cfg = settings(argv)
    world = int(os.environ.get("WORLD_SIZE", 1))
    check_config(cfg, world)
    seed_everything(cfg.seed)
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available() \
        else torch.device("cpu")
    memory_cap = cap_cuda_memory(device)
    # float32 students (small models, the synth run) train through TF32 tensor cores on CUDA
    torch.backends.cuda.matmul.allow_tf32 = True
    tokenizer = load_tokenizer(cfg.student_tokenizer or cfg.student, cfg.trust_remote_code, what="student")
    train, dropped_train = build_examples(cfg.train_traces, tokenizer, cfg.max_length, cfg.max_samples)
    evals, dropped_eval = build_examples(cfg.eval_traces, tokenizer, cfg.max_length) if cfg.eval_traces \
        else (None, 0)
    check_target_modules(cfg)

    from transformers import Trainer  # imported here: a bad config fails in a second, not ten
    model = student_model(cfg, device)
    accum, steps_per_epoch, eval_steps = schedule(cfg, len(train), world)
    args = training_args(cfg, accum, eval_steps, evals is not None, torch_dtype(cfg.dtype, device))
    run = open_wandb_run(cfg, int(os.environ.get("RANK", 0)) == 0)
    with tensorboard_dir(Path(cfg.output_dir) / "runs"):
        trainer = Trainer(model=model, args=args, train_dataset=train, eval_dataset=evals,
                          data_collator=partial(collate, pad_id=tokenizer.pad_token_id))
    resumed_from = latest_checkpoint(args.output_dir)
    log(f"{len(train)} train / {len(evals or [])} eval examples (dropped {dropped_train} / {dropped_eval}), "
        f"{steps_per_epoch} steps per epoch, eval and checkpoint every {eval_steps}"
        + (f", resuming from {resumed_from}" if resumed_from else ""), trainer.is_world_process_zero())
    result = trainer.train(resume_from_checkpoint=resumed_from)

    if trainer.is_world_process_zero():
        counts = dict(n_train=len(train), n_eval=len(evals or []), dropped_train=dropped_train,
                      dropped_eval=dropped_eval, memory_cap_gib=memory_cap,
                      train_seconds=round(result.metrics.get("train_runtime", 0.0), 2),
                      train_samples_per_second=result.metrics.get("train_samples_per_second"))
        atomic_write_text(Path(cfg.output_dir) / "train_summary.yaml",
                          to_yaml(summary(cfg, trainer, result, resumed_from, counts)))
        save_final(trainer.model, tokenizer, cfg.output_dir)
        log(f"wrote {Path(cfg.output_dir) / 'final'}")
    run.close()


if __name__ == "__main__":
    run_cli(main)
