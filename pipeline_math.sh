#!/usr/bin/env bash
# The pipeline on MATH (EleutherAI/hendrycks_math, 7 subsets), with the reference's MATH settings.
#
#   EXP_DIR=exp/math bash pipeline_math.sh
set -euo pipefail
cd "$(dirname "$0")"
# fixed NAME VALUE WHY: a variable this wrapper must set; a different value of the user's is refused, not ignored
fixed() {
    [[ -z ${!1:-} || ${!1} == "$2" ]] \
        || { echo "error: $(basename "$0") sets $1=$2 ($3), got '${!1}'; unset $1 or call pipeline.sh" >&2; exit 2; }
    export "$1=$2"
}
fixed DATASET hendrycks_math "this is the MATH driver"
export EXP_DIR=${EXP_DIR:-exp/math}
export MAX_SAMPLES=${MAX_SAMPLES:-2880} HOLDOUT_MAX_SAMPLES=${HOLDOUT_MAX_SAMPLES:-2880} BATCH=${BATCH:-256}
export GEN_ARGS="max_length=2048 max_prompt_length=1024 ${GEN_ARGS:-}"
export GRAD_ARGS="max_length=2048 ${GRAD_ARGS:-}"
export TRAIN_ARGS="max_length=2048 ${TRAIN_ARGS:-}"
exec bash pipeline.sh
