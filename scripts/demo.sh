#!/usr/bin/env bash
# The paper's pipeline end to end, set up first where anything is missing (scripts/setup.sh):
#   train -> generate_samples -> verify (INTACT, exit 0) -> eval finetune and poison -> verify the fine-tuned
#   copy (TAMPERED, exit 1) -> plot
# on real Fashion-MNIST (Debian's package) with the paper's recipes, sized for about 10 minutes on 2 CPU cores:
# resnet8 on 20k images for 3 epochs, DEMO_TRIGGERS triggers from the paper's generator, one epoch of the paper's
# fine-tuning, clean and BadNets-poisoned. It ends by printing the verdicts, the flip counts and the figure.
#
#   make demo                   # (this script)
#   make demo FULL=1            # the paper's full setting: ResNet-18 on CIFAR-10 (downloaded), a GPU, 40 + 40 epochs,
#                               # 100 triggers (hours on one GPU; days on a CPU)
# Rerun, it skips every step whose output exists. Environment: FULL (0), OUT (results/demo or results/demo-full),
# DEVICE (cpu; auto with FULL=1), DATA_DIR (data), DEMO_TRIGGERS (30; 100 with FULL=1); for the tests only:
# DEMO_DATASET, DEMO_TRAIN_ARGS, DEMO_GENERATOR_ARGS, DEMO_FINETUNE_ARGS (a smaller demo), SKIP_SETUP=1.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "${SKIP_SETUP:-0}" = 1 ] || scripts/setup.sh
PY=${VENV:-.venv}/bin/python

if [ "${FULL:-0}" = 1 ]; then
    OUT=${OUT:-results/demo-full}
    DEVICE=${DEVICE:-auto}
    TRIGGERS_N=${DEMO_TRIGGERS:-100}
    ARCH=resnet18 DATASET=cifar10
    TRAIN=()                                                     # the paper's: 40 epochs, its recipe
    FINETUNE=() FINETUNE_NOTE="40 epochs"                        # the paper's: 40 epochs on all 50k images
else
    OUT=${OUT:-results/demo}
    DEVICE=${DEVICE:-cpu}
    TRIGGERS_N=${DEMO_TRIGGERS:-30}
    ARCH=resnet8 DATASET=${DEMO_DATASET:-fashion-mnist}
    TRAIN=(--epochs 3 --train-subset 20000)
    FINETUNE=(--epochs 1 --train-subset 20000) FINETUNE_NOTE="one epoch"
fi
# shellcheck disable=SC2206   # the test-only overrides are word lists
[ -n "${DEMO_TRAIN_ARGS:-}" ] && TRAIN=(${DEMO_TRAIN_ARGS})
[ -n "${DEMO_FINETUNE_ARGS:-}" ] && FINETUNE=(${DEMO_FINETUNE_ARGS})
GENERATOR=(${DEMO_GENERATOR_ARGS:-})
COMMON=(--device "$DEVICE" --data-dir "${DATA_DIR:-data}" --no-progress)
MODEL=$OUT/model.pt
TRIGGERS=$OUT/model_triggers_paper
TAMPERED=$OUT/finetuned.pt
mkdir -p "$OUT"

step() {  # step NAME OUTPUT COMMAND...: run COMMAND unless OUTPUT exists, printing its wall time
    local name=$1 output=$2 start
    shift 2
    if [ -e "$output" ]; then echo "== $name: done before ($output)"; return; fi
    echo "== $name"
    start=$(date +%s)
    "$@"
    echo "   $name: $(( $(date +%s) - start )) s"
}

verdict() {  # verdict NAME EXPECTED_EXIT CHECKPOINT: verify.py on CHECKPOINT with the demo's triggers
    local name=$1 expected=$2 code=0
    "$PY" verify.py --model "$3" --triggers "$TRIGGERS" >"$OUT/verify-$name.txt" || code=$?
    cat "$OUT/verify-$name.txt"
    if [ "$code" != "$expected" ]; then
        echo "error: verify.py on the $name model exited $code, expected $expected" >&2
        exit 1
    fi
}

resume=()
[ -f "$OUT/model.resume.pt" ] && resume=(--resume)
step train "$MODEL" "$PY" train.py --dataset "$DATASET" --arch "$ARCH" "${TRAIN[@]}" --out "$MODEL" "${resume[@]}" \
    "${COMMON[@]}"
step "generate_samples (the paper's generator, $TRIGGERS_N triggers)" "$TRIGGERS" \
    "$PY" generate_samples.py --model "$MODEL" --num-triggers "$TRIGGERS_N" --key-seed 0 "${GENERATOR[@]}" \
    "${COMMON[@]}"
echo "== verify the untouched model"
verdict untouched 0 "$MODEL"
for attack in finetune poison; do
    results=$OUT/results/${ARCH}_${DATASET}_paper_$attack.json
    extra=() done=$results
    # the fine-tuned copy is written after the results: both must be there (a rerun replaces a lone one)
    [ "$attack" = finetune ] && extra=(--save-tampered "$TAMPERED") && [ ! -f "$TAMPERED" ] && done=$TAMPERED
    step "eval $attack (the paper's fine-tuning, $FINETUNE_NOTE)" "$done" \
        "$PY" eval.py --model "$MODEL" --attack "$attack" "${FINETUNE[@]}" --results-dir "$OUT/results" \
        --overwrite "${extra[@]}" "${COMMON[@]}"
done
echo "== verify the fine-tuned copy"
verdict finetuned 1 "$TAMPERED"
step plot "$OUT/figures" "$PY" plot.py --results-dir "$OUT/results" --figures-dir "$OUT/figures" --formats png

"$PY" - "$OUT" <<'PYEOF'
import glob, json, os, sys
out = sys.argv[1]
print("\n== the demo, in short")
for name in ("untouched", "finetuned"):
    print(f"verify, {name} model: {open(os.path.join(out, f'verify-{name}.txt')).read().strip()}")
for attack, what in (("finetune", "clean fine-tuning"), ("poison", "poisoned fine-tuning (BadNets)")):
    (path,) = glob.glob(os.path.join(out, "results", f"*_paper_{attack}.json"))
    results = json.load(open(path))
    run = results["runs"][0]
    last = run["records"][-1]
    print(f"{what}: {last['flipped']} of {results['num_triggers']} trigger labels changed after epoch "
          f"{last['epoch']:g}; first detected at step {run['first_detection_step']}")
(figure,) = glob.glob(os.path.join(out, "figures", "*_match_rate.png"))
print(f"the paper's figure (match rate against fine-tuning epoch): {figure}")
PYEOF
