#!/usr/bin/env bash
# The price of calibrating in the deployment, and its physical limit (docs/deployment.md): for each deployment, margin
# triggers calibrated in it (generate_samples.py --deploy NAME) beside today's envelope sets on the same model, each
# verified in that deployment: the comparison attacks and the benign matrix within it (eval.py --attack compare
# --deployment NAME), then the physical limit (eval.py --attack limit --deployment NAME); last, the table.
#
#   scripts/compare_deployments.sh MODEL.pt RESULTS_DIR [extra eval.py flags ...]
#   scripts/compare_deployments.sh /tmp/dep/resnet8_fashion-mnist.pt /tmp/dep/results --train-subset 20000
#
# Trigger sets live next to the checkpoint and are reused when present (REGENERATE=1 remakes them):
# <stem>_triggers_margin_deploy_<NAME> per deployment, and <stem>_triggers_margin_<envelope> for each of ENVELOPES
# ("|"-separated; default "exact|exact fp16 bf16": today's default and the envelope that accepts half precision).
# Each step is skipped when its results file exists, so a stopped run resumes. Environment: PYTHON
# (.venv/bin/python), DEVICE (cpu), NUM_TRIGGERS (100), KEY_SEED (0), DEPLOYMENTS (default "onnxruntime torch-bf16
# openvino"; torch-fp16 on a CPU runs half-precision convolutions at a tenth of bf16's speed), ENVELOPES,
# GENERATE_FLAGS (extra generate_samples.py flags, e.g. a short run for a smoke test).
set -euo pipefail

# shellcheck source=scripts/compare_common.sh
source "$(dirname "$0")/compare_common.sh"
shift 2
DEPLOYMENTS=${DEPLOYMENTS:-"onnxruntime torch-bf16 openvino"}
ENVELOPES=${ENVELOPES:-"exact|exact fp16 bf16"}

# shellcheck disable=SC2086
generate() {  # generate NAME FLAGS...: a margin set next to the checkpoint, unless present
    local name=$1
    shift
    if [ -n "${REGENERATE:-}" ] || [ ! -f "${STEM}_triggers_margin_${name}/triggers.pt" ]; then
        echo "== generate: margin $name"
        "$PYTHON" generate_samples.py --model "$MODEL" --method margin --num-triggers "$NUM_TRIGGERS" \
            --key-seed "$KEY_SEED" --device "$DEVICE" --out "${STEM}_triggers_margin_${name}" \
            --key-out "${STEM}_key_margin_${name}.json" --no-progress --overwrite ${GENERATE_FLAGS:-} "$@"
    fi
}

measure() {  # measure SET DEPLOYMENT [eval.py flags...]: compare and limit of one set, labelled in one deployment
    local set=$1 deployment=$2 attack out
    shift 2
    for attack in compare limit; do
        out="$RESULTS/$deployment/$set"
        if [ ! -f "$(compgen -G "$out/*_$attack.json" || true)" ]; then
            echo "== $attack: $set in $deployment"
            "$PYTHON" eval.py --model "$MODEL" --triggers "${STEM}_triggers_margin_${set}" \
                --key "${STEM}_key_margin_${set}.json" --attack "$attack" --deployment "$deployment" \
                --device "$DEVICE" --results-dir "$out" --no-progress --overwrite "$@"
        fi
    done
}

SETS=()
IFS='|' read -r -a LIST <<< "$ENVELOPES"
for envelope in "${LIST[@]}"; do
    name=$(echo $envelope | tr ' ' '+')
    # shellcheck disable=SC2086
    generate "$name" --envelope $envelope
    SETS+=("$name")
done
for deployment in $DEPLOYMENTS; do
    generate "deploy_$deployment" --deploy "$deployment"
    for set in "deploy_$deployment" "${SETS[@]}"; do
        measure "$set" "$deployment" "$@"
    done
done

echo "== table"
"$PYTHON" scripts/reproduction_tables.py deployment "$RESULTS"
