#!/usr/bin/env bash
# The pipeline on MMLU (cais/mmlu: auxiliary_train for train/holdout, test for test).
#
#   EXP_DIR=exp/mmlu bash pipeline_mmlu.sh
set -euo pipefail
cd "$(dirname "$0")"
# fixed NAME VALUE WHY: a variable this wrapper must set; a different value of the user's is refused, not ignored
fixed() {
    [[ -z ${!1:-} || ${!1} == "$2" ]] \
        || { echo "error: $(basename "$0") sets $1=$2 ($3), got '${!1}'; unset $1 or call pipeline.sh" >&2; exit 2; }
    export "$1=$2"
}
fixed DATASET mmlu "this is the MMLU driver"
export EXP_DIR=${EXP_DIR:-exp/mmlu}
export HOLDOUT_MAX_SAMPLES=${HOLDOUT_MAX_SAMPLES:-5120} MAX_SAMPLES=${MAX_SAMPLES:-2880} ADS_BATCH=${ADS_BATCH:-64}
exec bash pipeline.sh
