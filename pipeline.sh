#!/usr/bin/env bash
# Antidistillation sampling end to end: holdout traces -> proxy gradient -> for each grid row
# (train traces -> distilled student -> student eval -> teacher eval) -> report.
# Every stage is skipped when its output exists, so a killed run is resumed by running it again.
# Two phases: first the holdout traces, the gradient and the train traces of the rows that need no
# gradient (side by side when PARALLEL > 1); then the references and every row's remaining stages.
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
GRID=${GRID:-paper}                           # a grid name from grid.py, or a grid file
SHARD=${SHARD:-0}
NUM_SHARDS=${NUM_SHARDS:-1}
PARALLEL=${PARALLEL:-1}                       # grid rows run at once on this machine (small models share a GPU)
ROW_GPUS=${ROW_GPUS:-}                        # e.g. 0,1: parallel row loop j runs on GPU j mod 2 (empty: all GPUs)
BATCH=${BATCH:-512}                           # decode slots per process without ADS
ADS_BATCH=${ADS_BATCH:-192}                   # with ADS three models share the GPU
HOLDOUT_MAX_SAMPLES=${HOLDOUT_MAX_SAMPLES:-null}
MAX_SAMPLES=${MAX_SAMPLES:-null}              # cap on train prompts (and test prompts, unless TEST_MAX_SAMPLES)
TEST_MAX_SAMPLES=${TEST_MAX_SAMPLES:-$MAX_SAMPLES}   # cap on test prompts of every eval
SEEDS=${SEEDS:-}                              # e.g. "69 70 71": one student per seed and row (empty: one, train_config's seed)
PREPARE_ONLY=${PREPARE_ONLY:-0}               # 1: stop after the holdout traces and the gradient
SKIP_EVALS=${SKIP_EVALS:-0}                   # 1: rows stop after distillation (no test evals, no references)
FEWSHOT=${FEWSHOT:-8}                         # shots of the undistilled student's plain few-shot eval (the paper's 31% baseline); 0 = none
# GSM8K's 8-shot prompts are about 1,500 Llama tokens; an answer needs a few hundred
read -ra FEWSHOT_EXTRA <<<"${FEWSHOT_ARGS:-max_prompt_length=2048 max_length=2560 max_new_tokens=512}"
MODELS=${MODELS:-$EXP_DIR/models}             # where distilled students go
LAUNCH=${LAUNCH:-accelerate launch --config_file acc_config.yaml}   # python ...: each stage one plain process
read -ra GEN_EXTRA <<<"${GEN_ARGS:-}"        # extra key=value overrides for every gentraces.py run
read -ra GRAD_EXTRA <<<"${GRAD_ARGS:-}"
read -ra TRAIN_EXTRA <<<"${TRAIN_ARGS:-}"
read -ra REPORT_EXTRA <<<"${REPORT_ARGS:-}"    # e.g. --metric raw
read -ra LAUNCHER <<<"$LAUNCH"

# the grid rows of this shard (grid.py's fields: name kind tau lam eps control), read before any stage
# runs so a bad grid or shard fails at once
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
# stage LABEL OUTPUT COMMAND...: COMMAND unless OUTPUT (the stage's sentinel; empty: none) exists; each
# stage is recorded in STAGES_TSV (ran, skipped or failed, and its wall time) for the summary at the end
stage() {
    local label=$1 output=$2 start=$SECONDS status=0
    shift 2
    if [[ -n $output && -e $output ]]; then
        [[ -n ${CHECKING:-} ]] || printf '%s\tskipped\t0\n' "$label" >>"$STAGES_TSV"
        return 0
    fi
    STAGE_LOG=$EXP_DIR/logs/${label//[^A-Za-z0-9._+-]/_}.log
    [[ -n ${CHECKING:-} ]] || echo "== $(date +%H:%M:%S) $label" >&2
    "$@" || status=$?
    [[ -n ${CHECKING:-} ]] || printf '%s\t%s\t%s\n' "$label" "$( ((status)) && echo failed || echo ran)" \
        $((SECONDS - start)) >>"$STAGES_TSV"
    return "$status"
}
# the summary of this invocation's stages, printed however the pipeline ends, except on a user error
# (exit status 2), which stays the one 'error:' line
summary() {
    (($1 != 2)) && [[ -s $STAGES_TSV ]] || return 0
    awk -F'\t' -v wall=$SECONDS -v file="$STAGES_TSV" '
        { n[$2]++; line[NR] = sprintf("  %-8s %6s  %s", $2, $2 == "skipped" ? "" : $3 " s", $1) }
        END { printf "pipeline summary: %d ran, %d skipped, %d failed; %d s in all (%s)\n",
                     n["ran"], n["skipped"], n["failed"], wall, file
              for (i = 1; i <= NR; i++) print line[i] }' "$STAGES_TSV" >&2
}

# 1-2. holdout traces (the teacher, greedy, on the holdout split), then the proxy gradient g of the
# proxy's completion loss on them. ADS rows need g; every distill evaluates on the holdout traces
prepare() {
    stage "holdout traces" "$TRACES/holdout" \
        gentraces teacher="$TEACHER" data_split="${DATASET}_holdout" tau=0 lam=0 role=holdout \
        max_samples="$HOLDOUT_MAX_SAMPLES" batch_size="$BATCH" trace_name=holdout
    stage "proxy gradient" "$GRADS" \
        launch save_grad.py proxy="$PROXY" traces="$TRACES/holdout" out="$GRADS" "${GRAD_EXTRA[@]}"
}

# references: the teacher greedy on the test split, and the undistilled student (the plot's baseline)
# evaluated as every distilled student is (zero-shot, its chat template) and, with FEWSHOT > 0, as base
# models usually are (FEWSHOT worked examples in plain text: what the paper's 31% for Llama-3.2-3B is)
run_references() {
    stage "teacher greedy eval" "$TRACES/eval_teacher_base" \
        gentraces teacher="$TEACHER" data_split="${DATASET}_test" tau=0 lam=0 role=teacher_eval \
        max_samples="$TEST_MAX_SAMPLES" batch_size="$BATCH" trace_name=eval_teacher_base
    stage "undistilled student eval" "$TRACES/eval_student_base" \
        gentraces teacher="$STUDENT" tokenizer="$STUDENT_TOKENIZER" data_split="${DATASET}_test" tau=0 lam=0 \
        role=student_eval max_samples="$TEST_MAX_SAMPLES" batch_size="$BATCH" trace_name=eval_student_base
    ((FEWSHOT == 0)) || stage "undistilled student ${FEWSHOT}-shot eval" "$TRACES/eval_student_base_fewshot" \
        gentraces teacher="$STUDENT" tokenizer="$STUDENT_TOKENIZER" data_split="${DATASET}_test" tau=0 lam=0 \
        role=student_eval fewshot="$FEWSHOT" "${FEWSHOT_EXTRA[@]}" max_samples="$TEST_MAX_SAMPLES" batch_size="$BATCH" \
        trace_name=eval_student_base_fewshot
}

# a grid row's sampling settings, from grid.py's fields (NAME KIND TAU LAM EPS CONTROL): the row is
# recorded in every registry line of its stages (grid_row), and ADS rows (any kind but temperature)
# sample with three models, so with fewer slots
row_settings() {
    ROW_SPEC="$3 $4 $5 $6"
    ROW=(tau="$3" lam="$4" eps="$5" ads_control="$6" grad_path="$GRADS" grid_row="$ROW_SPEC")
    ROW_BATCH=$BATCH
    [[ $2 == temperature ]] || ROW_BATCH=$ADS_BATCH
}

# 3. a row's train traces
row_traces() {
    local ROW ROW_BATCH ROW_SPEC
    row_settings "$@"
    stage "$1: train traces" "$TRACES/$1" \
        gentraces teacher="$TEACHER" proxy="$PROXY" data_split="${DATASET}_train" "${ROW[@]}" role=train \
        max_samples="$MAX_SAMPLES" batch_size="$ROW_BATCH" trace_name="$1"
}

# 4-5. one student of row NAME (its seed SEED, empty without SEEDS): distilled on the row's train
# traces, then evaluated greedily on the test split, its registry line recording the caller's ROW_SPEC
run_student() {
    local NAME=$1 STUDENT_NAME=$2 SEED=$3 MODEL_DIR=$MODELS/student_$2
    stage "$STUDENT_NAME: distill" "$MODEL_DIR/final" \
        launch distill.py student="$STUDENT" student_tokenizer="$STUDENT_TOKENIZER" \
        train_traces="$TRACES/$NAME" eval_traces="$TRACES/holdout" output_dir="$MODEL_DIR" \
        "${TRAIN_EXTRA[@]}" ${SEED:+seed="$SEED"}
    ((SKIP_EVALS)) || stage "$STUDENT_NAME: student eval" "$TRACES/eval_student_$STUDENT_NAME" \
        gentraces teacher="$MODEL_DIR/final" data_split="${DATASET}_test" tau=0 lam=0 role=student_eval \
        grid_row="$ROW_SPEC" ${SEED:+student_seed="$SEED"} \
        max_samples="$TEST_MAX_SAMPLES" batch_size="$BATCH" trace_name="eval_student_$STUDENT_NAME"
}

# 3-6. one grid row: its train traces, its students (one per seed of SEEDS, side by side when
# PARALLEL > 1: small models), then the teacher's eval with the row's sampling settings
run_row() {
    local NAME=$1 ROW ROW_BATCH ROW_SPEC SEED
    row_traces "$@"
    row_settings "$@"
    if [[ -z $SEEDS ]]; then
        run_student "$NAME" "$NAME" ""
    elif ((PARALLEL == 1)); then
        for SEED in $SEEDS; do run_student "$NAME" "${NAME}_seed$SEED" "$SEED"; done
    else
        local pids=() failed=0
        for SEED in $SEEDS; do
            run_student "$NAME" "${NAME}_seed$SEED" "$SEED" &
            pids+=($!)
        done
        for pid in "${pids[@]}"; do wait "$pid" || failed=1; done
        ((failed == 0)) || return 1
    fi
    ((SKIP_EVALS == 0)) || return 0
    stage "$NAME: teacher eval" "$TRACES/eval_teacher_$NAME" \
        gentraces teacher="$TEACHER" proxy="$PROXY" data_split="${DATASET}_test" "${ROW[@]}" role=teacher_eval \
        max_samples="$TEST_MAX_SAMPLES" batch_size="$ROW_BATCH" trace_name="eval_teacher_$NAME"
}

# row loop j: FN on rows j, j + PARALLEL, ... of the grid (of kind KIND only, when given)
row_loop() {
    local j=$1 fn=$2 kind=${3:-} i=0 fields line
    for line in "${ROWS[@]}"; do
        read -ra fields <<<"$line"
        [[ -z $kind || ${fields[1]} == "$kind" ]] || continue
        if ((i % PARALLEL == j)); then "$fn" "${fields[@]}"; fi
        i=$((i + 1))
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
        row_loop 0 run_row
        if ((SKIP_EVALS == 0)); then
            run_references
            printf '%q ' "${REPORT[@]}"
            echo
        fi
    fi
) | python -c 'import utils; utils.run_cli(utils.check_commands)' "$EXP_DIR"
mkdir -p "$TRACES" "$MODELS" "$EXP_DIR/logs"
STAGES_TSV=$EXP_DIR/logs/stages_$(date +%Y%m%d-%H%M%S)_$$.tsv
trap 'summary $?' EXIT

if ((PREPARE_ONLY)); then
    prepare
    exit 0
fi

# a phase's jobs: one after the other when PARALLEL = 1 (a failure stops the pipeline at once), else
# side by side, each line of a job's output prefixed with its label
PIDS=()
job() {
    local label=$1
    shift
    if ((PARALLEL == 1)); then
        "$@"
        return
    fi
    "$@" > >(sed -u "s/^/[$label] /") 2>&1 &
    PIDS+=($!)
}
# row loop J on GPU J mod the count of ROW_GPUS (on every GPU when ROW_GPUS is empty)
rows_on_gpu() {
    (
        if ((PARALLEL > 1 && ${#GPU_LIST[@]})); then
            export CUDA_VISIBLE_DEVICES=${GPU_LIST[$1 % ${#GPU_LIST[@]}]}
            echo "on GPU $CUDA_VISIBLE_DEVICES"
        fi
        row_loop "$@"
    )
}
# wait for the phase's jobs; a failed job fails the pipeline once the others are done (their finished
# stages are kept, so a rerun does only what is left), with exit status 2 when every failure was a
# user error, else 1
wait_jobs() {
    local failed=0 pid s
    for pid in "${PIDS[@]}"; do wait "$pid" || { s=$?; failed=$(((failed == 0 || failed == 2) && s == 2 ? 2 : 1)); }; done
    PIDS=()
    ((failed == 0)) || { echo "pipeline: a stage failed; see the [prepare], [references] and [rows N] lines above" >&2; exit "$failed"; }
}

# phase 1, while the holdout traces or the gradient are missing: the train traces of the rows that
# need neither run beside their making
if [[ ! -d $TRACES/holdout || ! -f $GRADS ]]; then
    job prepare prepare
    for ((j = 0; j < PARALLEL; j++)); do job "rows $j" rows_on_gpu "$j" row_traces temperature; done
    wait_jobs
fi
# phase 2: the references, and every row's remaining stages, rows dealt to PARALLEL loops in grid order
((SKIP_EVALS)) || job references run_references
for ((j = 0; j < PARALLEL; j++)); do job "rows $j" rows_on_gpu "$j" run_row; done
wait_jobs

((SKIP_EVALS == 0)) || exit 0
# report: table and trade-off plot over every row finished so far (all shards share EXP_DIR)
stage "report" "" python "${REPORT[@]}"
echo "done: $EXP_DIR/report.md $EXP_DIR/tradeoff.png" >&2
