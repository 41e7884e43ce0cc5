#!/usr/bin/env bash
# The pipeline on MMLU (cais/mmlu: auxiliary_train for train/holdout, test for test).
#
#   EXP_DIR=exp/mmlu bash pipeline_mmlu.sh
set -euo pipefail
cd "$(dirname "$0")"
export DATASET=mmlu EXP_DIR=${EXP_DIR:-exp/mmlu}
export HOLDOUT_MAX_SAMPLES=5120 MAX_SAMPLES=2880 ADS_BATCH=64
exec bash pipeline.sh
