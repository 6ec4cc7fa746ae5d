#!/usr/bin/env bash
# The whole tamper suite on the Fashion-MNIST resnet8 model, on CPU, in one command:
#
#     scripts/tamper_suite.sh [OUT_DIR]            # default OUT_DIR: /tmp/tamper
#
# 1. trains resnet8 on Fashion-MNIST (with the robust backdoor watermark beside the fragile one, for the
#    restore comparison) and makes its 100 fragile triggers -- both skipped when OUT_DIR already has them;
# 2. runs every attack (a rerun replaces each results file): finetune, poison (its model kept for the fine-pruning defense), fine-prune, restore,
#    obfuscate, noise, single-weight, bitflip, prune, quantize -> OUT_DIR/results/*.json (+ .csv);
# 3. plot.py --table: OUT_DIR/figures/summary.md, summary.csv, the sweep figures and the trajectory figures.
#
# Environment overrides: PYTHON (.venv/bin/python), DATA_DIR (data), MODEL (OUT_DIR/resnet8_fashion-mnist.pt),
# SEEDS ("0"), TRAIN_SUBSET (5000 fine-tuning images, a subset of the model's own training images),
# TEST_SUBSET (1000 test images for clean accuracy and attack success rate), EPOCHS (2 fine-tuning epochs).
# OMP_NUM_THREADS=1 is faster on a machine shared with other jobs. docs/tampering.md discusses the measured numbers.
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=${1:-/tmp/tamper}
PYTHON=${PYTHON:-.venv/bin/python}
DATA_DIR=${DATA_DIR:-data}
MODEL=${MODEL:-$OUT/resnet8_fashion-mnist.pt}
SEEDS=${SEEDS:-0}
TRAIN_SUBSET=${TRAIN_SUBSET:-5000}
TEST_SUBSET=${TEST_SUBSET:-1000}
EPOCHS=${EPOCHS:-2}
RESULTS=$OUT/results
FIGURES=$OUT/figures
TRIGGERS=${MODEL%.pt}_triggers_paper

started=$SECONDS
step() {  # step NAME COMMAND...: run it, print how long it took
    local name=$1 t0=$SECONDS
    shift
    echo "== $name"
    "$@"
    echo "== $name: $((SECONDS - t0)) s (suite so far $((SECONDS - started)) s)"
}

mkdir -p "$OUT"
if [ ! -f "$MODEL" ]; then
    step train "$PYTHON" train.py --dataset fashion-mnist --arch resnet8 --epochs 3 --train-subset 20000 \
        --recipe fast --backdoor-watermark --device cpu --data-dir "$DATA_DIR" --out "$MODEL" --no-progress
fi
if [ ! -d "$TRIGGERS" ]; then
    step triggers "$PYTHON" generate_samples.py --model "$MODEL" --recipe fast --device cpu --data-dir "$DATA_DIR" --no-progress
fi

attack() {  # attack NAME [FLAGS...]
    local name=$1
    shift
    # shellcheck disable=SC2086  # SEEDS is a list
    step "$name" "$PYTHON" eval.py --attack "$name" --model "$MODEL" --device cpu --data-dir "$DATA_DIR" \
        --train-subset "$TRAIN_SUBSET" --test-subset "$TEST_SUBSET" --epochs "$EPOCHS" --seeds $SEEDS \
        --results-dir "$RESULTS" --no-progress --overwrite "$@"
}

attack finetune
# BadNets strong enough to take on 5000 images: 20% poisoned, lr 2e-2, 3 epochs (docs/tampering.md: its ASR)
attack poison --epochs 3 --lr 0.02 --poison-fraction 0.2 --save-tampered "$OUT/poisoned.pt"
attack fine-prune --fine-prune-poisoned-model "$OUT/poisoned.pt"
attack restore
attack obfuscate
attack noise
attack single-weight
attack bitflip
attack prune
attack quantize
step table "$PYTHON" plot.py --results-dir "$RESULTS" --figures-dir "$FIGURES" --table
echo "tamper suite done in $((SECONDS - started)) s: table $FIGURES/summary.md, figures in $FIGURES/"
