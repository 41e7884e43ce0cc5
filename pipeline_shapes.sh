#!/usr/bin/env bash
# The paper run rehearsed at its real shapes: pipeline.sh with the paper's defaults (generation to 1,024
# tokens, ADS batch 192, LoRA r 128 at max_length 4096, 3 epochs, the accelerate launcher) on untrained
# bf16 models of the paper's configs (make_assets.py --profile shapes: a 7B R1-Distill-Qwen teacher, a
# Qwen2.5-3B proxy, a Llama-3.2-3B student, tokenizers with the real id layouts), with only the sample
# counts cut and a two-row grid (one temperature row, one ADS row). Untrained models almost never emit EOS,
# so nearly every trace runs to max_length: a worst case for time and memory. Each process's CUDA memory is capped
# at CUDA_MEMORY_CAP_GIB (default 80, an H100's), so a stage that fits here fits on the paper's node.
#
#   EXP_DIR=exp/shapes bash pipeline_shapes.sh                       # every GPU of the machine
#   EXP_DIR=exp/shapes STAGES=stage3 bash pipeline_shapes.sh         # only what stage 3's same-run ratios need
#   ASSETS_PROFILE=shapes_narrow LAUNCH=python HOLDOUT_MAX_SAMPLES=8 MAX_SAMPLES=8 STAGES=first \
#       GEN_ARGS="max_length=160 max_prompt_length=128" bash pipeline_shapes.sh      # CPU: the first stages
set -euo pipefail
cd "$(dirname "$0")"

export EXP_DIR=${EXP_DIR:-exp/shapes}
ASSETS=${ASSETS:-$EXP_DIR/assets}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export CUDA_MEMORY_CAP_GIB=${CUDA_MEMORY_CAP_GIB:-80}
STAGES=${STAGES:-all}   # all; first: the holdout, the gradient, the ADS row's train traces, the undistilled student;
# stage3: the holdout and the gradient only (each followed by stage 3 through the engine and the reference loop)
# fixed NAME VALUE WHY: a variable this wrapper must set; a different value of the user's is refused, not ignored
fixed() {
    [[ -z ${!1:-} || ${!1} == "$2" ]] \
        || { echo "error: $(basename "$0") sets $1=$2 ($3), got '${!1}'; unset $1 or call pipeline.sh" >&2; exit 2; }
    export "$1=$2"
}
[[ $STAGES =~ ^(all|first|stage3)$ ]] || { echo "error: STAGES must be all, first or stage3, got '$STAGES'" >&2; exit 2; }

for model in teacher proxy student; do fixed "${model^^}" "$ASSETS/$model" "the shapes assets"; done
fixed STUDENT_TOKENIZER "$ASSETS/student" "the shapes assets"
fixed DATASET gsm8k "the shapes data has the GSM8K schema"
fixed GRID shapes "the rehearsal's two rows"

python make_assets.py --profile "${ASSETS_PROFILE:-shapes}" --out "$ASSETS"

# the paper's counts are 5,231 train, 2,242 holdout and 1,209 test prompts; these keep every batch full
export HOLDOUT_MAX_SAMPLES=${HOLDOUT_MAX_SAMPLES:-192} MAX_SAMPLES=${MAX_SAMPLES:-384}
export TEST_MAX_SAMPLES=${TEST_MAX_SAMPLES:-$((MAX_SAMPLES < 128 ? MAX_SAMPLES : 128))}
GPUS=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
((GPUS > 0)) || GPUS=1
export LAUNCH=${LAUNCH:-"accelerate launch --config_file acc_config.yaml --num_processes $GPUS"}
export GEN_ARGS="data_dir=$ASSETS/data ${GEN_ARGS:-}"
read -r NAME _ TAU LAM EPS CONTROL < <(python grid.py --grid shapes | awk '$2 == "ads"')
read -r _ _ TEMP_TAU _ < <(python grid.py --grid shapes | awk '$2 == "temperature"')
read -ra GEN <<<"$GEN_ARGS"
TRACES=$EXP_DIR/traces
ADS_ROW=(teacher="$TEACHER" proxy="$PROXY" data_split=gsm8k_train tau="$TAU" lam="$LAM" eps="$EPS"
         ads_control="$CONTROL" grad_path="$EXP_DIR/student_grads.safetensors" exp_dir="$EXP_DIR")
TEMP_ROW=(teacher="$TEACHER" data_split=gsm8k_train tau="$TEMP_TAU" lam=0 exp_dir="$EXP_DIR")

# stage 3 of a row (ads or temperature) through the engine and through the reference loop
# (decode.generate_reference: one forward per model and step over a growing cache, scored and sampled in
# plain torch, as `generate` with a LogitsProcessor does) on one batch of the row's prompts (at most
# MAX_SAMPLES), REFERENCE_TOKENS new tokens each: bench/project_grid.py projects the reference approach
# from their decode rates, measured side by side in the same run (logs/stage3_ROW_ENGINE.log)
stage3() {
    local row=$1 engine=$2 name=stage3_$1_$2 batch args
    if [[ $row == ads ]]; then batch=${ADS_BATCH:-192} args=("${ADS_ROW[@]}"); else batch=${BATCH:-512} args=("${TEMP_ROW[@]}"); fi
    mkdir -p "$EXP_DIR/logs"
    [[ -d $TRACES/$name ]] || python gentraces.py "${args[@]}" engine="$engine" max_samples=$((MAX_SAMPLES < batch ? MAX_SAMPLES : batch)) \
        batch_size="$batch" max_new_tokens="${REFERENCE_TOKENS:-128}" role=other trace_name="$name" \
        fd_check=0 token_details=0 answer_force=false "${GEN[@]}" 2>&1 | tee "$EXP_DIR/logs/$name.log"
}

if [[ $STAGES == stage3 ]]; then
    PREPARE_ONLY=1 bash pipeline.sh
elif [[ $STAGES == first ]]; then
    # the stages where the four vocabularies meet, without distillation: what CI runs on CPU
    PREPARE_ONLY=1 bash pipeline.sh
    [[ -d $TRACES/$NAME ]] || python gentraces.py "${ADS_ROW[@]}" grid_row="$TAU $LAM $EPS $CONTROL" role=train \
        max_samples="$MAX_SAMPLES" batch_size="${ADS_BATCH:-192}" trace_name="$NAME" "${GEN[@]}"
    [[ -d $TRACES/eval_student_base ]] || python gentraces.py teacher="$STUDENT" tokenizer="$STUDENT_TOKENIZER" \
        data_split=gsm8k_test tau=0 lam=0 role=student_eval exp_dir="$EXP_DIR" max_samples="$TEST_MAX_SAMPLES" \
        trace_name=eval_student_base "${GEN[@]}"
else
    bash pipeline.sh
fi
for row in ads temperature; do
    stage3 $row auto
    stage3 $row reference
done
