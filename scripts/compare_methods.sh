#!/usr/bin/env bash
# Every trigger method for one model, under the same attacks, side by side (docs/sensitivity.md).
#
#   scripts/compare_methods.sh MODEL.pt RESULTS_DIR [extra eval.py flags ...]
#   scripts/compare_methods.sh /tmp/sens/resnet8_fashion-mnist.pt /tmp/sens/results --train-subset 20000
#
# For each method (paper random natural ftg margin): generate_samples.py makes its triggers and key next to
# the checkpoint (<stem>_triggers_<method>, reusing them if present), then eval.py --attack compare runs the
# comparison attacks and the benign matrix on them. Finally plot.py --compare (fragile/report/comparison.py)
# writes comparison.md / .csv / .png into RESULTS_DIR.
# Environment: PYTHON (default .venv/bin/python), DEVICE (default cpu), NUM_TRIGGERS (100), KEY_SEED (0),
# METHODS (default "paper random natural ftg margin"), REGENERATE=1 to remake existing trigger sets,
# GENERATOR_RECIPE (default fast, the generator the documented comparison used; paper for the paper's own).
set -euo pipefail

# shellcheck source=scripts/compare_common.sh
source "$(dirname "$0")/compare_common.sh"
shift 2
METHODS=${METHODS:-"paper random natural ftg margin"}

for method in $METHODS; do
    if [ -n "${REGENERATE:-}" ] || [ ! -f "${STEM}_triggers_${method}/triggers.pt" ]; then
        echo "== generate: $method"
        "$PYTHON" generate_samples.py --model "$MODEL" --method "$method" --num-triggers "$NUM_TRIGGERS" \
            --key-seed "$KEY_SEED" --device "$DEVICE" --recipe "${GENERATOR_RECIPE:-fast}" --no-progress --overwrite
    fi
    echo "== compare: $method"
    "$PYTHON" eval.py --model "$MODEL" --method "$method" --attack compare --device "$DEVICE" \
        --results-dir "$RESULTS" --no-progress --overwrite "$@"
done

echo "== render"
FILES=()
for method in $METHODS; do
    FILES+=($(compgen -G "$RESULTS/*_${method}_compare.json"))
done
"$PYTHON" plot.py --results "${FILES[@]}" --compare --no-trigger-grid --formats png --figures-dir "$RESULTS"
