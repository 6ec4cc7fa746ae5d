#!/usr/bin/env bash
# The golden run: the whole pipeline at tiny size on synthetic data, then a manifest of what every output holds.
# A refactor is bit-identical when the manifests of a run before it and a run after it are the same file:
#
#   git worktree add /tmp/before <commit before the refactor>
#   (cd /tmp/before && scripts/golden_run.sh /tmp/golden-before)      # the same script, the old code
#   scripts/golden_run.sh /tmp/golden-after
#   diff /tmp/golden-before/MANIFEST /tmp/golden-after/MANIFEST && echo bit-identical
#
# What runs: train.py (plain, with the robust backdoor watermark, the paper recipe); generate_samples.py for every
# method (margin with surrogates, the paper generator, the fp16 envelope); eval.py for every attack, the benign
# matrix and the method comparison; verify.py; plot.py (figures, --table, --compare). Every process gets one thread
# (the determinism contract: REPRODUCTION.md). About 6 minutes on 2 busy CPU cores.
#
# The manifest has one line per output file: its path under OUT and a SHA-256 of its content. Tensor files are
# hashed tensor by tensor; JSON, JSON-lines and CSV files (and the metadata inside tensor files) without the keys
# that hold wall times or dates (names ending in seconds, _s, time or created, and elapsed; CSV: those columns),
# which differ from run to run whatever the code; in text, the run's own folder is written <OUT>. Logs are left
# out for the same reason, PDFs too (they carry their creation date).
# Environment: PYTHON (.venv/bin/python, else python3). The script stops at the first failing step.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: scripts/golden_run.sh OUT_DIR (a new or empty folder)}
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
if [ -e "$OUT" ] && [ -n "$(ls -A "$OUT")" ]; then
    echo "error: $OUT is not empty: give a new folder (the manifest must describe this run alone)" >&2
    exit 2
fi
mkdir -p "$OUT"
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
COMMON=(--device cpu --data-dir "$OUT/data" --no-progress)
M=$OUT/m.pt
RESULTS=$OUT/results

plain() {  # plain SCRIPT ARGS...: the suite's script as given, its output in OUT/logs
    local log
    log=$OUT/logs/$(echo "$*" | tr -c 'A-Za-z0-9_.-' '_' | cut -c1-120).log
    mkdir -p "$OUT/logs"
    echo "== $*"
    "$PYTHON" "$@" >"$log" 2>&1 || { tail -5 "$log" >&2; echo "error: $* failed (log: $log)" >&2; exit 1; }
}

run() {  # run SCRIPT ARGS...: train.py, generate_samples.py or eval.py on the CPU, with the synthetic data folder
    plain "$@" "${COMMON[@]}"
}

# ----------------------------------------------------------------------------- classifiers
run train.py --dataset synthetic --arch resnet8 --epochs 3 --recipe fast --out "$M"
run train.py --dataset synthetic --arch resnet8 --epochs 2 --recipe fast --backdoor-watermark --backdoor-triggers 20 \
    --out "$OUT/backdoor.pt"
run train.py --dataset synthetic --arch resnet8 --epochs 1 --out "$OUT/paper-recipe.pt"

# ----------------------------------------------------------------------------- trigger sets
FAST_MARGIN=(--margin-steps 20 --margin-grid-rounds 10 --margin-pool 1 --margin-select-draws 4)
run generate_samples.py --model "$M" --method paper --recipe fast --num-triggers 12 --key-seed 0
for method in random natural; do
    run generate_samples.py --model "$M" --method "$method" --num-triggers 12 --key-seed 0
done
run generate_samples.py --model "$M" --method ftg --ftg-steps 400 --num-triggers 12 --key-seed 0
run generate_samples.py --model "$M" --method margin "${FAST_MARGIN[@]}" --margin-surrogates 1 \
    --margin-surrogate-steps 10 --num-triggers 12 --key-seed 0
run generate_samples.py --model "$M" --method margin "${FAST_MARGIN[@]}" --margin-surrogates 0 --margin-start paper \
    --envelope exact fp16 --num-triggers 12 --key-seed 1 --out "$OUT/m_triggers_margin_fp16" \
    --key-out "$OUT/m_key_margin_fp16.json"
run generate_samples.py --model "$OUT/backdoor.pt" --method paper --recipe fast --num-triggers 12 --key-seed 0
run generate_samples.py --model "$OUT/paper-recipe.pt" --method paper --recipe fast --num-triggers 8 --key-seed 0

# ----------------------------------------------------------------------------- every attack, the experiments
SMALL=(--train-subset 400 --test-subset 200 --seeds 0 --results-dir "$RESULTS")
run eval.py --model "$M" --attack finetune --epochs 1 "${SMALL[@]}" --save-tampered "$OUT/finetuned.pt"
run eval.py --model "$M" --attack poison --epochs 1 "${SMALL[@]}" --save-tampered "$OUT/poisoned.pt"
run eval.py --model "$M" --attack fine-prune --fine-prune-epochs 1 --fine-prune-rank-samples 200 \
    --fine-prune-poisoned-model "$OUT/poisoned.pt" "${SMALL[@]}"
run eval.py --model "$M" --attack obfuscate --obfuscate-ks 1 10 --obfuscate-steps 5 "${SMALL[@]}"
run eval.py --model "$M" --attack noise --noise-sigmas 1e-4 1e-2 --noise-trials 3 "${SMALL[@]}"
run eval.py --model "$M" --attack single-weight --single-weight-epsilons 1e-2 10 --single-weight-trials 3 "${SMALL[@]}"
run eval.py --model "$M" --attack bitflip --bitflip-ks 1 10 --bitflip-trials 3 "${SMALL[@]}"
run eval.py --model "$M" --attack prune --prune-ratios 0.1 0.5 "${SMALL[@]}"
run eval.py --model "$M" --attack quantize "${SMALL[@]}"
run eval.py --model "$OUT/backdoor.pt" --attack restore --restore-attack-epochs 1 --restore-epochs 1 "${SMALL[@]}"
run eval.py --model "$M" --method margin --attack benign --envelope exact fp16 bf16 batch "${SMALL[@]}"
for method in paper margin; do
    run eval.py --model "$M" --method "$method" --attack compare --compare-trials 3 "${SMALL[@]}"
done

# ----------------------------------------------------------------------------- verification, figures
verdict() {  # verdict NAME EXPECTED_EXIT ARGS...: verify.py --json, its report kept as OUT/verify/NAME.json
    local name=$1 expected=$2 code=0
    shift 2
    mkdir -p "$OUT/verify"
    echo "== verify.py $*"
    "$PYTHON" verify.py "$@" --device cpu --json >"$OUT/verify/$name.json" 2>"$OUT/verify/$name.err" || code=$?
    [ "$code" = "$expected" ] || { cat "$OUT/verify/$name.err" >&2; echo "error: verify.py $* exited $code" >&2; exit 1; }
    rm "$OUT/verify/$name.err"
}
verdict untouched 0 --model "$M"
verdict finetuned 1 --model "$OUT/finetuned.pt" --triggers "$OUT/m_triggers_paper"
verdict margin-fp16 0 --model "$M" --triggers "$OUT/m_triggers_margin_fp16" --key "$OUT/m_key_margin_fp16.json"
plain plot.py --results-dir "$RESULTS" --figures-dir "$OUT/figures" --formats png
plain plot.py --results-dir "$RESULTS" --figures-dir "$OUT/figures-table" --formats png --table
plain plot.py --results "$RESULTS"/*_compare.json --figures-dir "$OUT/figures-compare" --formats png --compare

# ----------------------------------------------------------------------------- the manifest
"$PYTHON" scripts/golden_manifest.py "$OUT"
