# Sourced by the scripts/compare_*.sh drivers, with their arguments: MODEL.pt and RESULTS_DIR from the first two (the
# driver shifts them off afterwards), the repository root as the working directory, the environment every driver
# reads (PYTHON, DEVICE, NUM_TRIGGERS, KEY_SEED), STEM (the checkpoint's path without .pt) and the results folder;
# a missing argument or checkpoint is one error line, exit 2.
if [ $# -lt 2 ]; then
    echo "usage: $0 MODEL.pt RESULTS_DIR [extra eval.py flags ...]" >&2
    exit 2
fi
MODEL=$1
RESULTS=$2
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
DEVICE=${DEVICE:-cpu}
NUM_TRIGGERS=${NUM_TRIGGERS:-100}
KEY_SEED=${KEY_SEED:-0}
if [ ! -f "$MODEL" ]; then
    echo "error: checkpoint not found: $MODEL (train one with train.py first)" >&2
    exit 2
fi
STEM=${MODEL%.pt}
mkdir -p "$RESULTS"
