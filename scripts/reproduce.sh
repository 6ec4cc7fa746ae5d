#!/usr/bin/env bash
# The paper's experiment end to end, with its recipes: train -> triggers -> clean and poisoned fine-tuning
# (3 seeds each) -> figures. REPRODUCTION.md reports what this printed on a CPU.
#
#   scripts/reproduce.sh                 # CPU: Fashion-MNIST (Debian's package), resnet8, full 60k training set
#   scripts/reproduce.sh --gpu           # GPU: CIFAR-10 (downloaded by torchvision), ResNet-18, the paper's 40 epochs
#
# Stopped halfway (Ctrl-C, a crash, a reboot), the same command resumes: every finished step is skipped
# (training resumes from its last finished epoch, fine-tuning per attack and seed), and only what is missing
# runs. Each step that ran appends its wall time to OUT/timings.jsonl.
# Environment: PYTHON (default .venv/bin/python), OUT (default results/reproduction-<dataset>), TRAIN_EPOCHS,
# FINETUNE_EPOCHS (CPU default 10 each; GPU 40 each), SEEDS (default "0 1 2"), KEY_SEED (0), DATA_DIR (data);
# for a quick smoke run only: SUBSET (training images, default 0 = all), GENERATOR_RECIPE (default paper).
set -euo pipefail
cd "$(dirname "$0")/.."

GPU=0
for arg in "$@"; do
    case "$arg" in
        --gpu) GPU=1 ;;
        *) echo "error: unknown argument $arg (usage: $0 [--gpu])" >&2; exit 2 ;;
    esac
done
if [ "$GPU" = 1 ]; then
    DATASET=cifar10 ARCH=resnet18 DEVICE=cuda
    TRAIN_EPOCHS=${TRAIN_EPOCHS:-40} FINETUNE_EPOCHS=${FINETUNE_EPOCHS:-40}
else
    DATASET=fashion-mnist ARCH=resnet8 DEVICE=cpu
    TRAIN_EPOCHS=${TRAIN_EPOCHS:-10} FINETUNE_EPOCHS=${FINETUNE_EPOCHS:-10}
fi
PYTHON=${PYTHON:-.venv/bin/python}
OUT=${OUT:-results/reproduction-$DATASET}
SEEDS=${SEEDS:-"0 1 2"}
KEY_SEED=${KEY_SEED:-0}
DATA_DIR=${DATA_DIR:-data}
SUBSET=${SUBSET:-0}
GENERATOR_RECIPE=${GENERATOR_RECIPE:-paper}
MODEL=$OUT/${ARCH}_${DATASET}.pt
TRIGGERS=$OUT/${ARCH}_${DATASET}_triggers_paper
COMMON=(--device "$DEVICE" --data-dir "$DATA_DIR" --no-progress)
mkdir -p "$OUT/runs"

step() {  # step NAME COMMAND...: run it, then record its wall time (only steps that finish are recorded)
    local name=$1 start end
    shift
    echo "== $name: $*"
    start=$(date +%s)
    "$@"
    end=$(date +%s)
    printf '{"step": "%s", "seconds": %d}\n' "$name" "$((end - start))" >> "$OUT/timings.jsonl"
}

part_of() {  # part_of DIR ATTACK: the results file eval.py wrote there (named after the model), if any
    compgen -G "$1/*_paper_$2.json" | head -n 1 || true
}

"$PYTHON" -c "import json, sys; from fragile.core.devices import describe_device, resolve_device, versions; \
d = resolve_device('$DEVICE'); json.dump({**versions(d), 'device': describe_device(d)}, sys.stdout, indent=1)" \
    > "$OUT/machine.json"

if [ ! -f "$MODEL" ]; then
    resume=()
    [ -f "${MODEL%.pt}.resume.pt" ] && resume=(--resume)
    step train "$PYTHON" train.py --dataset "$DATASET" --arch "$ARCH" --epochs "$TRAIN_EPOCHS" --out "$MODEL" \
        --train-subset "$SUBSET" "${COMMON[@]}" "${resume[@]}"
fi
if [ ! -f "$TRIGGERS/triggers.pt" ]; then
    step triggers "$PYTHON" generate_samples.py --model "$MODEL" --key-seed "$KEY_SEED" --recipe "$GENERATOR_RECIPE" \
        "${COMMON[@]}"
fi
for attack in finetune poison; do
    parts=()
    for seed in $SEEDS; do
        dir=$OUT/runs/seed$seed
        part=$(part_of "$dir" "$attack")
        if [ -z "$part" ]; then
            step "$attack seed $seed" "$PYTHON" eval.py --model "$MODEL" --attack "$attack" --seeds "$seed" \
                --epochs "$FINETUNE_EPOCHS" --train-subset "$SUBSET" --results-dir "$dir" "${COMMON[@]}"
            part=$(part_of "$dir" "$attack")
        fi
        parts+=("$part")
    done
    "$PYTHON" scripts/merge_results.py "$OUT/${ARCH}_${DATASET}_paper_$attack.json" "${parts[@]}"
done
"$PYTHON" plot.py --results "$OUT/${ARCH}_${DATASET}_paper_finetune.json" "$OUT/${ARCH}_${DATASET}_paper_poison.json" \
    --figures-dir "$OUT/figures" --formats png
echo "done: $OUT (results JSON, figures/, timings.jsonl, machine.json)"
