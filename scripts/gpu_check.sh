#!/usr/bin/env bash
# The paper's own setting on one GPU, in at most 8 minutes of wall time, in one prepared command:
#   1. bench.py: our training step against the reference-style loop (DataLoader + PIL, fp32), ResNet-18, batch 512;
#   2. ResNet-18 on Fashion-MNIST with the paper's recipe, for as many epochs as fit in TRAIN_SECONDS (a one-epoch
#      probe measures the epoch time first);
#   3. 100 triggers from the paper's generator (--recipe paper) and 100 margin triggers;
#   4. the paper's fine-tuning, clean and BadNets-poisoned, FINETUNE_EPOCHS epochs x seeds 0 1, on the paper's
#      triggers, recorded at every step of the first epoch;
#   5. the benign matrix's CUDA rows (fp32 on CPU vs GPU, TF32, fp16, bf16, batch sizes, cuDNN benchmark on and off)
#      on both trigger sets, with the logit jitter of each row;
#   6. the figures (plot.py --table) and the reproduction table (scripts/reproduction_tables.py) from the results folder.
# Every step prints its wall time (and appends it to OUT/timings.jsonl); a step whose output exists is skipped, so
# a rerun resumes; the first step that fails stops the script, names itself, and keeps what the others wrote.
#
#   scripts/gpu_check.sh              # on a GPU machine: OUT=results/gpu-check
#   scripts/gpu_check.sh --dry-run    # the same steps at tiny size on the CPU (tests/scripts/test_gpu_check_script.py)
#
# Fashion-MNIST comes from Debian's package, or from FASHION_MNIST_DIR (a folder with its four .gz files, for a
# machine without the package: carry them in the git-ignored .gpu-data/). Environment: PYTHON (.venv/bin/python,
# else python3), OUT, DATA_DIR (OUT/data), TRAIN_SECONDS (120), FINETUNE_EPOCHS (3), FASHION_MNIST_DIR.
set -euo pipefail
cd "$(dirname "$0")/.."

DRY_RUN=0
for arg in "$@"; do
    case "$arg" in
        --dry-run) DRY_RUN=1 ;;
        *) echo "error: unknown argument $arg (usage: $0 [--dry-run])" >&2; exit 2 ;;
    esac
done
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
if [ "$DRY_RUN" = 0 ]; then
    if ! "$PYTHON" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
        echo "error: no GPU visible (torch.cuda.is_available() is false): run this on a GPU machine, or pass --dry-run" \
             "for the tiny CPU run" >&2
        exit 2
    fi
    OUT=${OUT:-results/gpu-check} DEVICE=cuda ARCH=resnet18 TRAIN_SECONDS=${TRAIN_SECONDS:-120}
    FINETUNE_EPOCHS=${FINETUNE_EPOCHS:-3} NUM_TRIGGERS=100
    BENCH=() TRAIN_SIZE=() GENERATOR=() MARGIN=() FINETUNE=() ENVELOPE=(exact fp16 bf16 cuda)
else   # every step at a size that a 2-core CPU finishes in minutes; the GPU-only rows are left out
    OUT=${OUT:-results/gpu-check-dry-run} DEVICE=cpu ARCH=resnet8 TRAIN_SECONDS=0
    FINETUNE_EPOCHS=${FINETUNE_EPOCHS:-1} NUM_TRIGGERS=10
    BENCH=(--measure-steps 2 --warmup-steps 1 --num-images 256 --gen-steps 2 --verify-repeats 1)
    TRAIN_SIZE=(--epochs 3 --train-subset 5000 --recipe fast) GENERATOR=(--recipe fast)
    MARGIN=(--margin-steps 20 --margin-grid-rounds 10 --margin-pool 1 --margin-select-draws 4 --margin-surrogates 0)
    FINETUNE=(--train-subset 512 --test-subset 200) ENVELOPE=(exact fp16 bf16)
fi
DATA_DIR=${DATA_DIR:-$OUT/data}
DATASET=fashion-mnist
MODEL=$OUT/${ARCH}_${DATASET}.pt
RESULTS=$OUT/results
COMMON=(--device "$DEVICE" --data-dir "$DATA_DIR" --no-progress)
mkdir -p "$OUT" "$RESULTS"

current=""
trap 'code=$?; [ -n "$current" ] && [ "$code" != 0 ] && echo "error: step \"$current\" failed (exit $code); what \
the earlier steps wrote is kept in $OUT: rerun the same command to resume" >&2' EXIT

step() {  # step NAME OUTPUT COMMAND...: run COMMAND unless OUTPUT exists ("-": always); print and record its wall time
    local name=$1 output=$2 start ms
    shift 2
    if [ "$output" != - ] && [ -e "$output" ]; then echo "== $name: done before ($output)"; return; fi
    echo "== $name"
    current=$name
    start=$(date +%s%N)
    "$@"
    ms=$(( ($(date +%s%N) - start) / 1000000 ))
    current=""
    printf '{"step": "%s", "seconds": %d.%03d}\n' "$name" $((ms / 1000)) $((ms % 1000)) >> "$OUT/timings.jsonl"
    printf '   %s: %d.%03d s\n' "$name" $((ms / 1000)) $((ms % 1000))
}

stage_fashion_mnist() {  # the four idx files where torchvision looks, from FASHION_MNIST_DIR or Debian's package
    local source=${FASHION_MNIST_DIR:-/usr/share/datasets/fashion-mnist} raw=$DATA_DIR/FashionMNIST/raw name
    mkdir -p "$raw"
    for name in train-images-idx3-ubyte train-labels-idx1-ubyte t10k-images-idx3-ubyte t10k-labels-idx1-ubyte; do
        if [ ! -f "$source/$name.gz" ]; then
            echo "error: $source/$name.gz not found: install Debian's dataset-fashion-mnist, or set" \
                 "FASHION_MNIST_DIR to a folder holding the four Fashion-MNIST .gz files" >&2
            return 2
        fi
        gunzip -c "$source/$name.gz" > "$raw/.$name.part" && mv "$raw/.$name.part" "$raw/$name"
    done
}

epochs_that_fit() {  # how many epochs of the probe's length fit in TRAIN_SECONDS (at least 1, at most 40)
    "$PYTHON" - "$OUT/probe.log.jsonl" "$TRAIN_SECONDS" <<'EOF'
import json, sys
seconds = json.loads(open(sys.argv[1]).read().splitlines()[-1])["seconds"]
print(max(1, min(40, int(float(sys.argv[2]) // seconds))))
EOF
}

step "stage Fashion-MNIST" "$DATA_DIR/FashionMNIST/raw/t10k-labels-idx1-ubyte" stage_fashion_mnist
step "1 bench.py: ours vs the reference loop" "$OUT/bench.json" \
    "$PYTHON" bench.py --device "$DEVICE" "${BENCH[@]}" --out "$OUT/bench.json"
if [ "$TRAIN_SECONDS" -gt 0 ]; then
    step "2a one-epoch probe of the epoch time" "$OUT/probe.pt" \
        "$PYTHON" train.py --dataset "$DATASET" --arch "$ARCH" --epochs 1 --out "$OUT/probe.pt" --overwrite "${COMMON[@]}"
    TRAIN_SIZE=(--epochs "$(epochs_that_fit)")
fi
resume=()
[ -f "${MODEL%.pt}.resume.pt" ] && resume=(--resume)
step "2 train $ARCH, the paper's recipe (${TRAIN_SIZE[*]})" "$MODEL" \
    "$PYTHON" train.py --dataset "$DATASET" --arch "$ARCH" "${TRAIN_SIZE[@]}" --out "$MODEL" "${resume[@]}" \
    "${COMMON[@]}"
step "3a $NUM_TRIGGERS triggers, the paper's generator" "${MODEL%.pt}_triggers_paper" \
    "$PYTHON" generate_samples.py --model "$MODEL" --num-triggers "$NUM_TRIGGERS" --key-seed 0 "${GENERATOR[@]}" \
    "${COMMON[@]}"
step "3b $NUM_TRIGGERS margin triggers" "${MODEL%.pt}_triggers_margin" \
    "$PYTHON" generate_samples.py --model "$MODEL" --method margin --num-triggers "$NUM_TRIGGERS" --key-seed 0 \
    "${MARGIN[@]}" "${COMMON[@]}"
# every step of the first epoch recorded (batch 256: the steps of one pass over the fine-tuning images)
steps_per_epoch=$("$PYTHON" -c "import sys; n = int(sys.argv[1]); print(-(-n // 256))" \
    "$( [ "$DRY_RUN" = 1 ] && echo 512 || echo 60000 )")
for attack in finetune poison; do
    step "4 $attack, the paper's settings, $FINETUNE_EPOCHS epochs x seeds 0 1" \
        "$RESULTS/${ARCH}_${DATASET}_paper_$attack.json" \
        "$PYTHON" eval.py --model "$MODEL" --attack "$attack" --seeds 0 1 --epochs "$FINETUNE_EPOCHS" \
        --early-steps $(seq 1 "$steps_per_epoch") "${FINETUNE[@]}" --results-dir "$RESULTS" "${COMMON[@]}"
done
for method in paper margin; do
    step "5 benign matrix (${ENVELOPE[*]}), $method triggers" "$RESULTS/${ARCH}_${DATASET}_${method}_benign.json" \
        "$PYTHON" eval.py --model "$MODEL" --method "$method" --attack benign --envelope "${ENVELOPE[@]}" \
        --results-dir "$RESULTS" "${COMMON[@]}"
done
# the figures and the table are redrawn every time: a rerun step may have changed what they show
step "6a figures" - "$PYTHON" plot.py --results "$RESULTS"/*_finetune.json "$RESULTS"/*_poison.json \
    "$RESULTS"/*_benign.json --figures-dir "$OUT/figures" --formats png --table
step "6b reproduction table" - "$PYTHON" scripts/reproduction_tables.py summary "$RESULTS"
"$PYTHON" - "$OUT" <<'EOF'
import json, sys
out = sys.argv[1]
steps = [json.loads(line) for line in open(f"{out}/timings.jsonl")]
print(f"gpu check done: {sum(s['seconds'] for s in steps):.0f} s in the steps that ran; results in {out}/")
EOF
