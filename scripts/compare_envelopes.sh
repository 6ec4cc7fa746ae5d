#!/usr/bin/env bash
# The price of a deployment envelope (docs/sensitivity.md): one trigger method calibrated on each envelope,
# then the same comparison attacks and the benign matrix on every set, side by side.
#
#   scripts/compare_envelopes.sh MODEL.pt RESULTS_DIR [extra eval.py flags ...]
#   scripts/compare_envelopes.sh /tmp/sens/resnet8_fashion-mnist.pt /tmp/sens/envelopes --train-subset 20000
#
# For each envelope (ENVELOPES, separated by "|"; default "exact|exact fp16|exact fp16 bf16"):
# generate_samples.py --envelope ... makes the triggers next to the checkpoint
# (<stem>_triggers_<method>_<entries joined by +>, reusing them if present), eval.py --attack compare runs on
# them with the matrix covering WIDE_ENVELOPE (default "exact fp16 bf16": every set is also checked on the
# changes it was not calibrated for), and plot.py --compare writes comparison.md / .csv /
# .png into RESULTS_DIR. Environment: PYTHON (.venv/bin/python), DEVICE (cpu), METHOD (margin),
# NUM_TRIGGERS (100), KEY_SEED (0), ENVELOPES, WIDE_ENVELOPE, REGENERATE=1 to remake existing sets.
set -euo pipefail

# shellcheck source=scripts/compare_common.sh
source "$(dirname "$0")/compare_common.sh"
shift 2
METHOD=${METHOD:-margin}
ENVELOPES=${ENVELOPES:-"exact|exact fp16|exact fp16 bf16"}
WIDE_ENVELOPE=${WIDE_ENVELOPE:-"exact fp16 bf16"}

FILES=()
IFS='|' read -r -a LIST <<< "$ENVELOPES"
for envelope in "${LIST[@]}"; do
    name=$(echo $envelope | tr ' ' '+')
    triggers="${STEM}_triggers_${METHOD}_${name}"
    key="${STEM}_key_${METHOD}_${name}.json"
    if [ -n "${REGENERATE:-}" ] || [ ! -f "$triggers/triggers.pt" ]; then
        echo "== generate: $METHOD, envelope $envelope"
        # shellcheck disable=SC2086
        "$PYTHON" generate_samples.py --model "$MODEL" --method "$METHOD" --num-triggers "$NUM_TRIGGERS" \
            --key-seed "$KEY_SEED" --device "$DEVICE" --envelope $envelope --out "$triggers" --key-out "$key" \
            --no-progress --overwrite
    fi
    echo "== compare: $METHOD, envelope $envelope"
    # shellcheck disable=SC2086
    "$PYTHON" eval.py --model "$MODEL" --method "$METHOD" --triggers "$triggers" --key "$key" --attack compare \
        --envelope $WIDE_ENVELOPE --device "$DEVICE" --results-dir "$RESULTS/$name" --no-progress --overwrite "$@"
    FILES+=("$RESULTS/$name")
done

echo "== render"
COMPARED=()
for folder in "${FILES[@]}"; do
    COMPARED+=($(compgen -G "$folder/*_compare.json"))
done
"$PYTHON" plot.py --results "${COMPARED[@]}" --compare --no-trigger-grid --formats png --figures-dir "$RESULTS"
