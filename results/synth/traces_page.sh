#!/usr/bin/env bash
# The synth run's trace page (results/synth/traces.png): the synth assets rebuilt (seeded, as in the
# run), the holdout traces and the warm proxy's gradient as pipeline_synth.sh makes them, then every row
# of the run's grid (results/synth/grid.txt) sampled with its settings on the first PROBLEMS train
# problems, each trace with the viewer's token details, and viewer.py's page. The run itself predates
# token_details, so its traces carry none. Rendering needs Chromium: where the GPU machine has none,
# copy EXP_DIR back and run the last line there.
#
#   EXP_DIR=exp/synth_page bash results/synth/traces_page.sh          # one H200, about 6 minutes
#   python viewer.py --exp-dir exp/synth_page --screenshot results/synth/traces.png
#   ASSETS_PROFILE=synth_tiny HOLDOUT_MAX_SAMPLES=16 PROBLEMS=2 bash results/synth/traces_page.sh   # CPU
set -euo pipefail
cd "$(dirname "$0")/../.."

export EXP_DIR=${EXP_DIR:-exp/synth_page}
ASSETS=$EXP_DIR/assets
PROBLEMS=${PROBLEMS:-8}
GRID=results/synth/grid.txt
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

python make_assets.py --profile "${ASSETS_PROFILE:-synth}" --out "$ASSETS"
read -ra EXTRA <<<"${GEN_ARGS:-}"
GEN=(data_dir="$ASSETS/data" max_length=320 max_prompt_length=160 dtype=float32 engine=eager "${EXTRA[@]}")
TEACHER=$ASSETS/teacher PROXY=$ASSETS/proxy STUDENT=$ASSETS/student STUDENT_TOKENIZER=$ASSETS/student \
    DATASET=gsm8k LAUNCH=python GEN_ARGS="${GEN[*]}" GRAD_ARGS="batch_size=64 max_length=320" \
    HOLDOUT_MAX_SAMPLES=${HOLDOUT_MAX_SAMPLES:-null} PREPARE_ONLY=1 GRID=$GRID bash pipeline.sh
python grid.py --grid "$GRID" | while read -r name kind tau lam eps control; do
    [[ -d $EXP_DIR/traces/$name ]] || python gentraces.py teacher="$ASSETS/teacher" proxy="$ASSETS/proxy" \
        data_split=gsm8k_train tau="$tau" lam="$lam" eps="$eps" ads_control="$control" \
        grad_path="$EXP_DIR/student_grads.safetensors" grid_row="$tau $lam $eps $control" role=train \
        exp_dir="$EXP_DIR" max_samples="$PROBLEMS" batch_size="$PROBLEMS" token_details="$PROBLEMS" \
        trace_name="$name" "${GEN[@]}" </dev/null
done
python viewer.py --exp-dir "$EXP_DIR"
