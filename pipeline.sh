#!/usr/bin/env bash
# Antidistillation sampling end to end: holdout traces -> proxy gradient -> for each grid row
# (train traces -> distilled student -> student eval -> teacher eval) -> report.
# Every stage is skipped when its output exists, so a killed run is resumed by running it again.
# With PARALLEL > 1, the references and the rows that need no gradient start beside the first two stages.
#
#   bash pipeline.sh                                    # GSM8K, paper models, one 8-GPU node
#   EXP_DIR=exp/gsm8k SHARD=0 NUM_SHARDS=4 bash pipeline.sh   # a quarter of the grid (one node of four)
#   bash pipeline_math.sh | bash pipeline_mmlu.sh | bash pipeline_tiny.sh | bash pipeline_synth.sh   # wrappers
set -euo pipefail
cd "$(dirname "$0")"

DATASET=${DATASET:-gsm8k}                     # gsm8k | hendrycks_math | mmlu
EXP_DIR=${EXP_DIR:-exp/$DATASET}
TEACHER=${TEACHER:-deepseek-ai/DeepSeek-R1-Distill-Qwen-7B}
PROXY=${PROXY:-Qwen/Qwen2.5-3B}
STUDENT=${STUDENT:-meta-llama/Llama-3.2-3B}
STUDENT_TOKENIZER=${STUDENT_TOKENIZER:-meta-llama/Llama-3.2-3B-Instruct}   # the base model has no chat template
GRID=${GRID:-paper}                           # a grid name from grid.py
SHARD=${SHARD:-0}
NUM_SHARDS=${NUM_SHARDS:-1}
PARALLEL=${PARALLEL:-1}                       # grid rows run at once on this machine (small models share a GPU)
ROW_GPUS=${ROW_GPUS:-}                        # e.g. 0,1: parallel row loop j runs on GPU j mod 2 (empty: all GPUs)
BATCH=${BATCH:-512}                           # decode slots per process without ADS
ADS_BATCH=${ADS_BATCH:-192}                   # with ADS three models share the GPU
HOLDOUT_MAX_SAMPLES=${HOLDOUT_MAX_SAMPLES:-null}
MAX_SAMPLES=${MAX_SAMPLES:-null}              # cap on train and test prompts
SEEDS=${SEEDS:-}                              # e.g. "69 70 71": one student per seed and row (empty: one, train_config's seed)
PREPARE_ONLY=${PREPARE_ONLY:-0}               # 1: stop after the holdout traces and the gradient
SKIP_EVALS=${SKIP_EVALS:-0}                   # 1: rows stop after distillation (no test evals, no references)
MODELS=${MODELS:-$EXP_DIR/models}             # where distilled students go
LAUNCH=${LAUNCH:-accelerate launch --config_file acc_config.yaml}   # python ...: each stage one plain process
read -ra GEN_EXTRA <<<"${GEN_ARGS:-}"        # extra key=value overrides for every gentraces.py run
read -ra GRAD_EXTRA <<<"${GRAD_ARGS:-}"
read -ra TRAIN_EXTRA <<<"${TRAIN_ARGS:-}"
read -ra REPORT_EXTRA <<<"${REPORT_ARGS:-}"    # e.g. --metric raw
read -ra LAUNCHER <<<"$LAUNCH"

# the grid rows of this shard, read before any stage runs so a bad grid or shard fails at once
[[ $PARALLEL =~ ^[1-9][0-9]*$ ]] || { echo "pipeline: PARALLEL must be a positive integer, got '$PARALLEL'" >&2; exit 2; }
[[ -z $ROW_GPUS || $ROW_GPUS =~ ^[0-9]+(,[0-9]+)*$ ]] \
    || { echo "pipeline: ROW_GPUS must be comma-separated GPU indices such as 0,1, got '$ROW_GPUS'" >&2; exit 2; }
IFS=, read -ra GPU_LIST <<<"$ROW_GPUS"
GRID_ROWS=$(python grid.py --grid "$GRID" --shard "$SHARD" --num-shards "$NUM_SHARDS")
ROWS=()
[[ -z $GRID_ROWS ]] || mapfile -t ROWS <<<"$GRID_ROWS"  # an empty shard has no rows

TRACES=$EXP_DIR/traces
GRADS=$EXP_DIR/student_grads.safetensors
REPORT=(report.py --exp-dir "$EXP_DIR" "${REPORT_EXTRA[@]}")

# a free rendezvous port per launch, so pipelines and parallel rows can share a machine; a python
# interpreter as the launcher (python, python3 -u, /path/to/python) starts one process, which needs none.
# When a worker fails, the launcher (torchrun) adds a ~40-line traceback of its own: the stage's whole
# output goes to its log under logs/, the terminal gets it up to the first traceback or the first
# 'error:' line (shown once, however many workers print it), and a worker's user error (an 'error:'
# line) fails the pipeline with exit status 2, as in a plain process. In the check (CHECKING set), the
# command is only written down
launch() {
    local port status=(0 0 0)
    if [[ -n ${CHECKING:-} ]]; then
        printf '%q ' "$@"
        echo
        return
    fi
    if [[ ${LAUNCHER[0]##*/} == python* ]]; then
        "${LAUNCHER[@]}" "$@"
        return
    fi
    port=$(python -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])')
    "${LAUNCHER[@]}" --main_process_port "$port" "$@" 2>&1 | tee -a "$STAGE_LOG" | awk '
        /^error: / { if (!quiet) print; quiet = 1; user_error = 1 }
        /^Traceback \(most recent call last\)/ { quiet = 1 }
        !quiet { print; fflush() }
        END { exit user_error ? 3 : 0 }' >&2 || status=("${PIPESTATUS[@]}")
    ((status[0] == 0)) && return
    ((status[2] == 3)) && return 2
    echo "pipeline: $1 failed (exit status ${status[0]}); its whole output is in $STAGE_LOG" >&2
    return 1
}
gentraces() { launch gentraces.py exp_dir="$EXP_DIR" "${GEN_EXTRA[@]}" "$@"; }
stage() {
    STAGE_LOG=$EXP_DIR/logs/${*//[^A-Za-z0-9._+-]/_}.log
    [[ -n ${CHECKING:-} ]] || echo "== $(date +%H:%M:%S) $*" >&2
}

# 1-2. holdout traces (the teacher, greedy, on the holdout split), then the proxy gradient g of the
# proxy's completion loss on them. ADS rows need g; every distill evaluates on the holdout traces
prepare() {
    if [[ ! -d $TRACES/holdout ]]; then
        stage "holdout traces"
        gentraces teacher="$TEACHER" data_split="${DATASET}_holdout" tau=0 lam=0 \
            max_samples="$HOLDOUT_MAX_SAMPLES" batch_size="$BATCH" trace_name=holdout
    fi
    if [[ ! -f $GRADS ]]; then
        stage "proxy gradient"
        launch save_grad.py proxy="$PROXY" traces="$TRACES/holdout" out="$GRADS" "${GRAD_EXTRA[@]}"
    fi
}

# with parallel rows, prepare() runs beside the temperature rows and the references, which need
# neither of its outputs until their distill; a stage that needs one waits here for it (both are
# renamed into place when complete), and fails once prepare() has ended (its exit status is in
# PREP_STATUS, a name of this run's own) without making it; run serially, prepare() has already ended
PREP_STATUS=$EXP_DIR/logs/.prepare.$$.status
await() {
    [[ -z ${CHECKING:-} ]] || return 0
    while [[ ! -e $1 ]]; do
        if ((PARALLEL == 1)) || [[ -s $PREP_STATUS && ! -e $1 ]]; then
            echo "pipeline: $1 was not made: the holdout or gradient stage failed (see the [prepare] lines)" >&2
            return 1
        fi
        sleep 2
    done
}

# 4-5. one student of a row: distilled on the row's train traces, then evaluated greedily on the test
# split; named as the row, with _seedN when SEEDS is set; further arguments go to distill.py
run_student() {
    local TRACE_NAME=$1 NAME=$2 MODEL_DIR=$MODELS/student_$2
    shift 2
    if [[ ! -d $MODEL_DIR/final ]]; then
        await "$TRACES/holdout"
        stage "$NAME: distill"
        launch distill.py student="$STUDENT" student_tokenizer="$STUDENT_TOKENIZER" \
            train_traces="$TRACES/$TRACE_NAME" eval_traces="$TRACES/holdout" output_dir="$MODEL_DIR" \
            "${TRAIN_EXTRA[@]}" "$@"
    fi
    if ((SKIP_EVALS == 0)) && [[ ! -d $TRACES/eval_student_$NAME ]]; then
        stage "$NAME: student eval"
        gentraces teacher="$MODEL_DIR/final" data_split="${DATASET}_test" tau=0 lam=0 \
            max_samples="$MAX_SAMPLES" batch_size="$BATCH" trace_name="eval_student_$NAME"
    fi
}

# 3-6. one grid row: tau lam eps [control], names use %.2e; lam = 0 is plain temperature sampling
run_row() {
    local TAU=$1 LAM=$2 EPS=$3 CONTROL=${4:-none} NAME ROW ROW_BATCH=$BATCH ADS=false SEED
    [[ $LAM == 0.00e+00 ]] || { ADS=true; ROW_BATCH=$ADS_BATCH; }  # ADS: three models, and the gradient
    NAME=tau${TAU}_lam${LAM}_eps${EPS}
    ROW=(tau="$TAU" lam="$LAM" eps="$EPS" grad_path="$GRADS")
    if [[ $CONTROL != none ]]; then
        NAME=${NAME}_$CONTROL
        ROW+=(ads_control="$CONTROL")
    fi

    if [[ ! -d $TRACES/$NAME ]]; then
        if $ADS; then await "$GRADS"; fi
        stage "$NAME: train traces"
        gentraces teacher="$TEACHER" proxy="$PROXY" data_split="${DATASET}_train" "${ROW[@]}" \
            max_samples="$MAX_SAMPLES" batch_size="$ROW_BATCH" trace_name="$NAME"
    fi
    if [[ -z $SEEDS ]]; then
        run_student "$NAME" "$NAME"
    elif ((PARALLEL == 1)); then
        for SEED in $SEEDS; do run_student "$NAME" "${NAME}_seed$SEED" seed="$SEED"; done
    else  # small models: the row's students train side by side
        local pids=() failed=0
        for SEED in $SEEDS; do
            run_student "$NAME" "${NAME}_seed$SEED" seed="$SEED" &
            pids+=($!)
        done
        for pid in "${pids[@]}"; do wait "$pid" || failed=1; done
        ((failed == 0)) || return 1
    fi
    ((SKIP_EVALS == 0)) || return 0
    if [[ ! -d $TRACES/eval_teacher_$NAME ]]; then
        if $ADS; then await "$GRADS"; fi
        stage "$NAME: teacher eval"
        gentraces teacher="$TEACHER" proxy="$PROXY" data_split="${DATASET}_test" "${ROW[@]}" \
            max_samples="$MAX_SAMPLES" batch_size="$ROW_BATCH" trace_name="eval_teacher_$NAME"
    fi
}

# references: the teacher greedy on the test split, and the undistilled student (the plot's baseline);
# they need no grid row, so with parallel rows they run beside them
run_references() {
    if [[ ! -d $TRACES/eval_teacher_base ]]; then
        stage "teacher greedy eval"
        gentraces teacher="$TEACHER" data_split="${DATASET}_test" tau=0 lam=0 \
            max_samples="$MAX_SAMPLES" batch_size="$BATCH" trace_name=eval_teacher_base
    fi
    if [[ ! -d $TRACES/eval_student_base ]]; then
        stage "undistilled student eval"
        gentraces teacher="$STUDENT" tokenizer="$STUDENT_TOKENIZER" data_split="${DATASET}_test" tau=0 lam=0 \
            max_samples="$MAX_SAMPLES" batch_size="$BATCH" trace_name=eval_student_base
    fi
}

# rows are dealt round-robin to PARALLEL loops; a failed row stops its loop and fails the pipeline
# once the other loops are done (their finished rows are kept, so a rerun does only what is left)
row_loop() {
    local i fields
    for ((i = $1; i < ${#ROWS[@]}; i += PARALLEL)); do
        read -ra fields <<<"${ROWS[i]}"
        run_row "${fields[@]}"
    done
}
# every stage's settings, for every row of this shard, checked in one plain process before the first
# launch, so a typo in GEN_ARGS fails in seconds rather than after stage 2: a dry run of the stages
# writes down each command it would launch (stages whose output exists are skipped, as in the run),
# and utils.check_commands checks them all; inputs under EXP_DIR may not exist yet (stages make them)
(
    CHECKING=1 PARALLEL=1
    prepare
    if ((PREPARE_ONLY == 0)); then
        row_loop 0
        if ((SKIP_EVALS == 0)); then
            run_references
            printf '%q ' "${REPORT[@]}"
            echo
        fi
    fi
) | python -c 'import utils; utils.run_cli(utils.check_commands)' "$EXP_DIR"
mkdir -p "$TRACES" "$MODELS" "$EXP_DIR/logs"

if ((PREPARE_ONLY)); then
    prepare
    exit 0
fi
if ((PARALLEL == 1)); then
    prepare
    row_loop 0
    ((SKIP_EVALS)) || run_references
else
    # rows that need no gradient go first (in grid order, then the others), so no loop idles while
    # prepare() runs
    [[ -z $GRID_ROWS ]] || mapfile -t ROWS < <(printf '%s\n' "${ROWS[@]}" \
        | awk '$2 == "0.00e+00" {print; next} {later[n++] = $0} END {for (i = 0; i < n; i++) print later[i]}')
    trap 'rm -f "$PREP_STATUS"' EXIT
    (trap 'echo $? > "$PREP_STATUS"' EXIT; prepare) > >(sed -u "s/^/[prepare] /") 2>&1 &
    PIDS=($!)
    if ((SKIP_EVALS == 0)); then
        (run_references) > >(sed -u "s/^/[references] /") 2>&1 &
        PIDS+=($!)
    fi
    for ((j = 0; j < PARALLEL; j++)); do
        (
            if ((${#GPU_LIST[@]})); then
                export CUDA_VISIBLE_DEVICES=${GPU_LIST[j % ${#GPU_LIST[@]}]}
                echo "on GPU $CUDA_VISIBLE_DEVICES"
            fi
            row_loop "$j"
        ) > >(sed -u "s/^/[rows $j] /") 2>&1 &
        PIDS+=($!)
    done
    FAILED=0  # the exit status: 2 when every failed loop stopped on a user error, else 1
    for pid in "${PIDS[@]}"; do wait "$pid" || { s=$?; FAILED=$(((FAILED == 0 || FAILED == 2) && s == 2 ? 2 : 1)); }; done
    ((FAILED == 0)) || { echo "pipeline: a grid row, a reference or the holdout/gradient stage failed; see the [rows N], [references] and [prepare] lines above" >&2; exit "$FAILED"; }
fi

((SKIP_EVALS == 0)) || exit 0
# report: table and trade-off plot over every row finished so far (all shards share EXP_DIR)
stage "report"
python "${REPORT[@]}"
echo "done: $EXP_DIR/report.md $EXP_DIR/tradeoff.png" >&2
