"""Is this model still the one I watermarked? Black-box: only top-1 labels of the triggers are used.

    python verify.py --model checkpoints/resnet8_fashion-mnist.pt [--triggers DIR|triggers.pt] [--key KEY.json] [--json]

Exit codes: 0 intact, 1 tampered, 2 error.
"""
# ----------------------------------------------------------------------------- config
MODEL = ""                 # the checkpoint to verify (required)
TRIGGERS = ""              # trigger folder (its PNGs), PNG folder, or triggers.pt; default derived from MODEL
METHOD = "paper"           # which trigger set to derive the default paths from
KEY = ""                   # key JSON; default: the key named in the trigger metadata
MAX_MISMATCHES = 0         # tolerated mismatches before the verdict is "tampered"
BATCH_SIZE = 0             # query batch size (0: all triggers at once)
DEVICE = "cpu"
JSON = False               # print one JSON object instead of a verdict line
# -----------------------------------------------------------------------------

import json
import os

from fragile.checkpoint_io import load_classifier
from fragile.cli import UserError, apply_overrides, run_main
from fragile.devices import resolve_device
from fragile.triggers import default_paths, load_key, load_triggers
from fragile.verification import check_compatible, compare, query_labels


def resolve_key_path(triggers_path, meta):
    if KEY:
        return KEY
    if not meta.get("key_file"):
        raise UserError("no --key given and the trigger metadata names no key file")
    folder = triggers_path if os.path.isdir(triggers_path) else os.path.dirname(os.path.abspath(triggers_path))
    folder = folder if os.path.exists(os.path.join(folder, "meta.json")) else os.path.dirname(os.path.abspath(folder))
    return os.path.join(os.path.dirname(os.path.abspath(folder)), meta["key_file"])


def main():
    apply_overrides(globals(), __doc__)
    if not MODEL:
        raise UserError("--model is required")
    model, model_meta = load_classifier(MODEL, resolve_device(DEVICE))
    triggers_path = TRIGGERS or default_paths(MODEL, METHOD)[0]
    if not os.path.exists(triggers_path):
        raise UserError(f"triggers not found: {triggers_path} (pass --triggers)")
    triggers, trigger_meta = load_triggers(triggers_path)
    key, _ = load_key(resolve_key_path(triggers_path, trigger_meta))
    check_compatible(triggers, key, model_meta["input_shape"], model_meta["num_classes"])
    report = compare(query_labels(model, triggers, BATCH_SIZE or None), key, model_meta["num_classes"], MAX_MISMATCHES,
                     order=trigger_meta.get("query_order"))
    bound = trigger_meta.get("weights_sha256")
    report["weights_sha256"] = model_meta["weights_sha256"]
    report["hash_matches_triggers"] = (bound == model_meta["weights_sha256"]) if bound else None
    if JSON:
        print(json.dumps(report))
    else:
        hash_note = {True: "weights hash as watermarked", False: "weights hash DIFFERS from the one the triggers "
                     "were made for", None: "no weights hash bound to these triggers"}[report["hash_matches_triggers"]]
        first = report["queries_to_first_mismatch"]
        order_note = f"; first mismatch at query {first} in the recorded fragility order" if first else ""
        print(f"{report['verdict'].upper()}: {report['matches']}/{report['n']} trigger labels match the key "
              f"(p={report['p_value']:.2e} by chance; {hash_note}{order_note})")
    return 0 if report["verdict"] == "intact" else 1


if __name__ == "__main__":
    run_main(main)
