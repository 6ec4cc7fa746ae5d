#!/usr/bin/env bash
# Which recipe shows the paper's effect? Classifier recipe (train.py --recipe fast | paper) x generator
# recipe (generate_samples.py --recipe fast | paper), each then fine-tuned for one epoch with the paper's
# settings; the table counts the triggers flipped. REPRODUCTION.md shows what this printed on a CPU.
#
#   scripts/recipe_table.sh              # Fashion-MNIST, resnet8, 20k training images, 3 epochs, key seed 3
#
# Rerun after a stop: finished steps are skipped. Environment: PYTHON (.venv/bin/python), OUT
# (results/recipe-table), SUBSET (20000), EPOCHS (3), KEY_SEED (3), DATA_DIR (data), DEVICE (cpu).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
OUT=${OUT:-results/recipe-table}
SUBSET=${SUBSET:-20000}
EPOCHS=${EPOCHS:-3}
KEY_SEED=${KEY_SEED:-3}
COMMON=(--dataset fashion-mnist --device "${DEVICE:-cpu}" --data-dir "${DATA_DIR:-data}" --no-progress)

for train_recipe in fast paper; do
    dir=$OUT/classifier-$train_recipe
    model=$dir/resnet8_fashion-mnist.pt
    mkdir -p "$dir"
    if [ ! -f "$model" ]; then
        echo "== train ($train_recipe recipe)"
        "$PYTHON" train.py --arch resnet8 --epochs "$EPOCHS" --train-subset "$SUBSET" --recipe "$train_recipe" \
            --out "$model" "${COMMON[@]}"
    fi
    for gen_recipe in fast paper; do
        triggers=$dir/triggers-$gen_recipe
        if [ ! -f "$triggers/triggers.pt" ]; then
            echo "== triggers ($train_recipe classifier, $gen_recipe generator)"
            start=$(date +%s)
            "$PYTHON" generate_samples.py --model "$model" --recipe "$gen_recipe" --key-seed "$KEY_SEED" \
                --out "$triggers" --key-out "$dir/key-$gen_recipe.json" "${COMMON[@]}"
            echo "{\"seconds\": $(( $(date +%s) - start ))}" > "$triggers/wall_time.json"
        fi
        if [ ! -f "$dir/finetune-$gen_recipe/resnet8_fashion-mnist_paper_finetune.json" ]; then
            echo "== one epoch of the paper's fine-tuning ($train_recipe classifier, $gen_recipe generator)"
            "$PYTHON" eval.py --model "$model" --triggers "$triggers" --key "$dir/key-$gen_recipe.json" \
                --attack finetune --epochs 1 --train-subset "$SUBSET" --results-dir "$dir/finetune-$gen_recipe" \
                "${COMMON[@]}"
        fi
    done
done
"$PYTHON" scripts/reproduction_tables.py recipe-table "$OUT"
