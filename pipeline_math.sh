#!/usr/bin/env bash
# The pipeline on MATH (EleutherAI/hendrycks_math, 7 subsets), with the reference's MATH settings.
#
#   EXP_DIR=exp/math bash pipeline_math.sh
set -euo pipefail
cd "$(dirname "$0")"
export DATASET=hendrycks_math EXP_DIR=${EXP_DIR:-exp/math}
export MAX_SAMPLES=2880 HOLDOUT_MAX_SAMPLES=2880 BATCH=256
export GEN_ARGS="max_length=2048 max_prompt_length=1024 ${GEN_ARGS:-}"
export GRAD_ARGS="max_length=2048 ${GRAD_ARGS:-}"
export TRAIN_ARGS="max_length=2048 ${TRAIN_ARGS:-}"
exec bash pipeline.sh
