#!/usr/bin/env bash
# A small-scale reproduction on one GPU: does ADS degrade students more than temperature sampling at
# the same teacher accuracy? make_assets.py --profile synth trains a 25M Qwen2 teacher on synthetic
# two-digit word problems and pretrains a proxy (Qwen2) and a student (Llama) of its size on the
# questions and on arithmetic facts, never on solutions; then the 20-row synth grid (temperature, ADS,
# ADS with the penalty permuted) runs all rows at once (the models are small, so the row processes
# share the GPU), and the report compares the curves.
#
#   EXP_DIR=exp/synth bash pipeline_synth.sh                              # one H200
#   EXP_DIR=exp/synth ROW_GPUS=0,1 bash pipeline_synth.sh                 # two GPUs, rows dealt over both
#   EXP_DIR=exp/synth_seed2 GEN_ARGS=seed=43 TRAIN_ARGS=seed=70 bash pipeline_synth.sh   # a replicate
#   ASSETS_PROFILE=tiny GRID=tiny PARALLEL=2 bash pipeline_synth.sh   # the same driver on CPU, in minutes
set -euo pipefail
cd "$(dirname "$0")"

export EXP_DIR=${EXP_DIR:-exp/synth}
ASSETS=${ASSETS:-$EXP_DIR/assets}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}   # many small processes share the CPU cores
# fixed NAME VALUE WHY: a variable this wrapper must set; a different value of the user's is refused, not ignored
fixed() {
    [[ -z ${!1:-} || ${!1} == "$2" ]] \
        || { echo "error: $(basename "$0") sets $1=$2 ($3), got '${!1}'; unset $1 or call pipeline.sh" >&2; exit 2; }
    export "$1=$2"
}

for model in teacher proxy student; do fixed "${model^^}" "$ASSETS/$model" "the synth assets"; done
fixed STUDENT_TOKENIZER "$ASSETS/student" "the synth assets"
fixed DATASET gsm8k "the synth data has the GSM8K schema"

# no other stage runs during the asset build, so its tokenizers may use every core
TOKENIZERS_PARALLELISM=true python make_assets.py --profile "${ASSETS_PROFILE:-synth}" --out "$ASSETS"

export GRID=${GRID:-synth} BATCH=${BATCH:-512} ADS_BATCH=${ADS_BATCH:-512}
# every row at once: each process alone leaves the GPU mostly idle (small models, launch-bound steps);
# with the 20 synth students training, one H200 had up to 125 of its 140 GiB in use
export PARALLEL=${PARALLEL:-$(python grid.py --grid "$GRID" | wc -l)}
# one plain process per stage: the models are small, so rows run side by side instead of across GPUs;
# accelerate's launcher would add its own interpreter and torch import to every stage start
# (3.9-6.2 s a launch of an empty script on 2 idle cores; more with 20 rows sharing the CPU)
export LAUNCH=${LAUNCH:-python}
# prompts are <= 120 tokens and clean traces <= 85; fp32 keeps eps * g exact in the perturbed proxies;
# engine=eager: CUDA graphs without torch.compile, which would cost each process more than it saves
export GEN_ARGS="data_dir=$ASSETS/data max_length=320 max_prompt_length=160 dtype=float32 engine=eager ${GEN_ARGS:-}"
export GRAD_ARGS="batch_size=64 max_length=320 ${GRAD_ARGS:-}"
# full fine-tuning (lora_r=0): the student's output rows for the trace's words (</think>, \boxed, the
# closings) were never trained in pretraining, and adapters cannot reach them; with LoRA (r 64, 3 epochs)
# a first run left the student at 6% after distilling 95%-accurate traces.  8 epochs of 7,000 traces:
# the teacher needed ~180k examples to learn the task from scratch, the pretrained student gets 56k;
# the holdout loss every second epoch
export TRAIN_ARGS="lora_r=0 learning_rate=1e-3 max_length=320 epochs=8 global_batch_size=64 per_device_batch_size=64 \
eval_every=2 dtype=float32 ${TRAIN_ARGS:-}"
# the report's gap and plot use the answer boxed in the trace: the synth students never met the
# answer-forcing suffix (a real base model has seen such text), so their forced answers are noise
# (a first two-GPU run: distilled students 98% boxed, 15% forced)
export REPORT_ARGS="--metric raw ${REPORT_ARGS:-}"
exec bash pipeline.sh
