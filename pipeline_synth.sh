#!/usr/bin/env bash
# A small-scale reproduction on one GPU (synth v3; protocol in results/synth/PROTOCOL.md): do ADS
# students learn less than temperature students from traces of the same accuracy? make_assets.py
# --profile synth trains a 25M Qwen2 teacher on synthetic word problems whose traces may carry a step
# written wrong and redone, check lines and filler lines; a proxy (Qwen2) and a student (Llama) of its
# size are pretrained on domain text, then warmed up on the teacher's temperature traces of other
# problems until greedy solves about 30% (the cold bases stay as proxy_cold/ and student_cold/).
# Then: holdout traces and the warm proxy's gradient; calibrate.py picks eps (FD against the JVP) and
# the rows whose train traces are 90% and 80% accurate (temperature and ADS each, the 90% ADS row
# permuted, the ADS rows at the tau where plain sampling is 3 points above the highest target);
# pipeline.sh distills SEEDS students per row; and a diagnostic compares cold and
# warm proxies (ADS at 92% and 85%) with Llama and proxy-shaped students by their holdout NLL.
#
#   EXP_DIR=exp/synth bash pipeline_synth.sh                              # one H200
#   EXP_DIR=exp/synth ROW_GPUS=0,1 bash pipeline_synth.sh                 # two GPUs, rows dealt over both
#   ASSETS_PROFILE=synth_tiny TARGETS=0.7 DIAG_TARGETS=0.7 CAL_PROBLEMS=16 CAL_PROBES=2 SEEDS="69 70" \
#       DIAG_SEEDS="69 70" DIAG_SAMPLES=32 BATCH=64 ADS_BATCH=64 bash pipeline_synth.sh   # the same driver on CPU
set -euo pipefail
cd "$(dirname "$0")"

export EXP_DIR=${EXP_DIR:-exp/synth}
ASSETS=${ASSETS:-$EXP_DIR/assets}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}   # many small processes share the CPU cores
TARGETS=${TARGETS:-"0.9 0.8"}                  # train-trace accuracies of the main rows
DIAG_TARGETS=${DIAG_TARGETS:-"0.92 0.85"}      # and of the diagnostic's rows
CAL_PROBLEMS=${CAL_PROBLEMS:-300}              # train problems per calibration probe
CAL_PROBES=${CAL_PROBES:-10}                   # most probes per calibration search
export SEEDS=${SEEDS:-"69 70 71 72 73"}        # students per main row (the same seeds, so the same inits and data order, in every row)
DIAG_SEEDS=${DIAG_SEEDS:-"69 70 71"}
DIAG_SAMPLES=${DIAG_SAMPLES:-2000}             # train traces per diagnostic row

# fixed NAME VALUE WHY: a variable this wrapper must set; a different value of the user's is refused, not ignored
fixed() {
    [[ -z ${!1:-} || ${!1} == "$2" ]] \
        || { echo "error: $(basename "$0") sets $1=$2 ($3), got '${!1}'; unset $1 or call pipeline.sh" >&2; exit 2; }
    export "$1=$2"
}

for model in teacher proxy student; do fixed "${model^^}" "$ASSETS/$model" "the synth assets"; done
fixed STUDENT_TOKENIZER "$ASSETS/student" "the synth assets"
fixed DATASET gsm8k "the synth data has the GSM8K schema"
[[ -z ${GRID:-} ]] || { echo "error: $(basename "$0") calibrates its own grid (EXP_DIR/grid.txt), got GRID='$GRID'; unset GRID or call pipeline.sh" >&2; exit 2; }

# assets: no other stage runs during the build, so its tokenizers may use every core
TOKENIZERS_PARALLELISM=true python make_assets.py --profile "${ASSETS_PROFILE:-synth}" --out "$ASSETS"

export BATCH=${BATCH:-512} ADS_BATCH=${ADS_BATCH:-512}
# the protocol compares students evaluated as they were distilled; it has no few-shot baseline
export FEWSHOT=${FEWSHOT:-0}
# one plain process per stage: the models are small, so rows run side by side instead of across GPUs;
# accelerate's launcher would add its own interpreter and torch import to every stage start
# (3.9-6.2 s a launch of an empty script on 2 idle cores; more with 20 rows sharing the CPU)
export LAUNCH=${LAUNCH:-python}
# prompts are <= 120 tokens and clean traces <= 130; fp32 keeps eps * g exact in the perturbed proxies;
# engine=eager: CUDA graphs without torch.compile, which would cost each process more than it saves
export GEN_ARGS="data_dir=$ASSETS/data max_length=320 max_prompt_length=160 dtype=float32 engine=eager ${GEN_ARGS:-}"
export GRAD_ARGS="batch_size=64 max_length=320 ${GRAD_ARGS:-}"
# full fine-tuning of a student that already solves ~30%: 2 epochs of the row's 7,000 traces at a
# modest rate; the holdout NLL (a co-primary endpoint) every epoch, so also at the end
export TRAIN_ARGS="lora_r=0 learning_rate=3e-4 max_length=320 epochs=2 global_batch_size=64 per_device_batch_size=16 \
eval_every=1 dtype=float32 ${TRAIN_ARGS:-}"
# the synth students never met the answer-forcing suffix, so the answer boxed in the trace is graded
export REPORT_ARGS="--metric raw ${REPORT_ARGS:-}"
read -ra GEN_EXTRA <<<"$GEN_ARGS"
read -ra TARGET_LIST <<<"$TARGETS"
read -ra DIAG_TARGET_LIST <<<"$DIAG_TARGETS"
calibrate() {
    # --ads-tau auto: a fixed tau can leave plain sampling below a target on one teacher and above it on another
    python calibrate.py --teacher "$TEACHER" --metric raw --problems "$CAL_PROBLEMS" --probes "$CAL_PROBES" \
        --ads-tau auto "$@" \
        -- "${GEN_EXTRA[@]}"
}

# 1-2. holdout traces and the warm proxy's gradient, then the cold proxy's on the same traces
PREPARE_ONLY=1 bash pipeline.sh
DIAG=$EXP_DIR/diagnostic
mkdir -p "$DIAG/cold/traces"
[[ -d $DIAG/cold/traces/holdout ]] || cp -r "$EXP_DIR/traces/holdout" "$DIAG/cold/traces/holdout"
[[ -f $DIAG/cold/student_grads.safetensors ]] || python save_grad.py proxy="$ASSETS/proxy_cold" \
    traces="$DIAG/cold/traces/holdout" out="$DIAG/cold/student_grads.safetensors" $GRAD_ARGS

# calibration: the main rows, and the diagnostic's (warm and cold proxy, each in its own folder, so no
# two searches share a probe), side by side
mkdir -p "$DIAG/warm/traces"
[[ -d $DIAG/warm/traces/holdout ]] || cp -r "$EXP_DIR/traces/holdout" "$DIAG/warm/traces/holdout"
[[ -f $DIAG/warm/student_grads.safetensors ]] || cp "$EXP_DIR/student_grads.safetensors" "$DIAG/warm/student_grads.safetensors"
PIDS=()
[[ -f $EXP_DIR/grid.txt ]] || { calibrate --exp-dir "$EXP_DIR" --proxy "$PROXY" --targets "${TARGET_LIST[@]}" \
    --permute --reference --out "$EXP_DIR/grid.txt" & PIDS+=($!); }
[[ -f $DIAG/grid_warm.txt ]] || { calibrate --exp-dir "$DIAG/warm" --proxy "$PROXY" \
    --targets "${DIAG_TARGET_LIST[@]}" --out "$DIAG/grid_warm.txt" & PIDS+=($!); }
[[ -f $DIAG/grid_cold.txt ]] || { calibrate --exp-dir "$DIAG/cold" --proxy "$ASSETS/proxy_cold" \
    --targets "${DIAG_TARGET_LIST[@]}" --series ads --out "$DIAG/grid_cold.txt" & PIDS+=($!); }
for pid in "${PIDS[@]}"; do wait "$pid"; done

# 3-6. the main rows, every row at once, each row's students side by side
GRID=$EXP_DIR/grid.txt PARALLEL=${PARALLEL:-$(wc -l <"$EXP_DIR/grid.txt")} bash pipeline.sh

# the diagnostic, after the main rows (their students fill the GPU): holdout NLL only, no test evals;
# the warm proxy's rows (temperature and ADS) and the cold proxy's ADS rows, each distilled into the
# Llama student and into a proxy-shaped one (the warm proxy itself; it reuses the first one's traces)
diagnostic() {
    local proxy=$1 grid=$2 exp=$3
    for student in student proxy; do
        EXP_DIR=$exp PROXY=$ASSETS/$proxy GRID=$grid SEEDS=$DIAG_SEEDS SKIP_EVALS=1 MAX_SAMPLES=$DIAG_SAMPLES \
            STUDENT=$ASSETS/$student STUDENT_TOKENIZER=$ASSETS/$student MODELS=$exp/models_$student \
            PARALLEL=$(wc -l <"$grid") bash pipeline.sh
    done
}
(diagnostic proxy "$DIAG/grid_warm.txt" "$DIAG/warm") > >(sed -u "s/^/[diag warm] /") 2>&1 &
PIDS=($!)
(diagnostic proxy_cold "$DIAG/grid_cold.txt" "$DIAG/cold") > >(sed -u "s/^/[diag cold] /") 2>&1 &
PIDS+=($!)
for pid in "${PIDS[@]}"; do wait "$pid"; done
echo "pipeline_synth: done; the protocol's analysis: python results/synth/analyze.py --exp-dir $EXP_DIR" >&2
