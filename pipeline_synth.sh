#!/usr/bin/env bash
# A small-scale reproduction on one GPU: does ADS degrade students more than temperature sampling at
# the same teacher accuracy? make_assets.py --profile synth trains a 25M Qwen2 teacher on synthetic
# two-digit word problems and pretrains the proxy (Qwen2) and student (Llama) on the questions and on
# arithmetic facts, never on solutions; then the 20-row synth grid (temperature, ADS, ADS with the
# penalty permuted) runs 10 rows at a time on the one GPU, and the report compares the curves.
#
#   EXP_DIR=exp/synth bash pipeline_synth.sh                       # one H200: about 15 minutes
#   ASSETS_PROFILE=tiny GRID=tiny PARALLEL=2 bash pipeline_synth.sh   # the same driver on CPU, in minutes
set -euo pipefail
cd "$(dirname "$0")"

export EXP_DIR=${EXP_DIR:-exp/synth}
ASSETS=${ASSETS:-$EXP_DIR/assets}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}   # many small processes share the CPU cores

python make_assets.py --profile "${ASSETS_PROFILE:-synth}" --out "$ASSETS"

export TEACHER=$ASSETS/teacher PROXY=$ASSETS/proxy STUDENT=$ASSETS/student STUDENT_TOKENIZER=$ASSETS/student
export DATASET=gsm8k GRID=${GRID:-synth} BATCH=${BATCH:-512} ADS_BATCH=${ADS_BATCH:-512} PARALLEL=${PARALLEL:-10}
# one process per stage: the models are small, so rows run side by side instead of across GPUs
export LAUNCH=${LAUNCH:-"accelerate launch --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no"}
# prompts are <= 110 tokens and clean traces ~70; fp32 keeps eps * g exact in the perturbed proxies;
# engine=eager: CUDA graphs without torch.compile, which would cost each process more than it saves
export GEN_ARGS="data_dir=$ASSETS/data max_length=320 max_prompt_length=160 dtype=float32 engine=eager ${GEN_ARGS:-}"
export GRAD_ARGS="batch_size=64 max_length=320 ${GRAD_ARGS:-}"
# full fine-tuning (lora_r=0): the student's output rows for the trace's words (</think>, \boxed, the
# closings) were never trained in pretraining, and adapters cannot reach them; with LoRA (r 64, 3 epochs)
# a first run left the student at 6% after distilling 95%-accurate traces
export TRAIN_ARGS="lora_r=0 learning_rate=1e-3 max_length=320 epochs=4 global_batch_size=32 per_device_batch_size=32 \
dtype=float32 ${TRAIN_ARGS:-}"
exec bash pipeline.sh
