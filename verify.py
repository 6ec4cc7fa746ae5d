"""Is this model still the one I watermarked? Black-box: only top-1 labels of the triggers are used.

    python verify.py --model checkpoints/resnet8_fashion-mnist.pt [--triggers DIR|triggers.pt] [--key KEY.json] [--json]
    python verify.py --url http://127.0.0.1:8080 --model-name fragile-wm --triggers DIR [--key KEY.json] [--json]

With --url the model is queried where it is deployed, over the Open Inference Protocol (KServe v2 REST:
KServe, Triton, MLServer, TorchServe); the checkpoint is not needed. Exit codes: 0 intact, 1 tampered, 2 error
(a server that is down or answers garbage is an error, never "intact").
"""
# ----------------------------------------------------------------------------- config
MODEL = ""                 # the checkpoint to verify (or --url)
URL = ""                   # a served model instead: the server's base URL (http://host:port)
MODEL_NAME = "fragile-wm"  # the name the server serves the model under (POST /v2/models/<name>/infer)
TIMEOUT = 30.0             # seconds per request
RETRIES = 3                # retries per request on connection errors, timeouts and 5xx answers (backoff doubles)
INPUT_NAME = "input-0"     # the request's input tensor name
INPUT_DATATYPE = "UINT8"   # UINT8 (the 8-bit triggers as they are) or FP32 (the same images in [0, 1])
TRIGGERS = ""              # trigger folder (its PNGs), PNG folder, or triggers.pt; default derived from MODEL
METHOD = "paper"           # which trigger set to derive the default paths from
KEY = ""                   # key JSON; default: the key named in the trigger metadata
MAX_MISMATCHES = 0         # tolerated mismatches before the verdict is "tampered"
BATCH_SIZE = 0             # query batch size (0: all triggers at once)
DEVICE = "cpu"
JSON = False               # print one JSON object instead of a verdict line
# -----------------------------------------------------------------------------

import json

from fragile.core.cli import UserError, apply_overrides, run_main
from fragile.core.devices import resolve_device
from fragile.core.io import load_classifier
from fragile.watermark.paths import load_watermark, triggers_path
from fragile.watermark.remote import query_remote_labels
from fragile.watermark.verify import check_compatible, compare, query_labels


def local_labels(triggers, key):
    """Labels from the checkpoint itself, and what it says about the model (its weights hash)."""
    model, model_meta = load_classifier(MODEL, resolve_device(DEVICE))
    check_compatible(triggers, key, model_meta["input_shape"], model_meta["num_classes"])
    return query_labels(model, triggers, BATCH_SIZE or None), model_meta["num_classes"], model_meta["weights_sha256"]


def remote_labels(triggers, key, trigger_meta, num_classes):
    """Labels from the served model; the model's shape and classes come from the trigger set and key."""
    if not num_classes:
        raise UserError("the key file does not say how many classes the model has (num_classes)")
    check_compatible(triggers, key, trigger_meta.get("input_shape") or list(triggers.shape[1:]), num_classes)
    labels = query_remote_labels(URL, MODEL_NAME, triggers, num_classes, TIMEOUT, RETRIES, BATCH_SIZE or None,
                                 INPUT_NAME, INPUT_DATATYPE)
    return labels, num_classes, None


def main():
    apply_overrides(globals(), __doc__, choices={"INPUT_DATATYPE": ["UINT8", "FP32"]})
    if bool(MODEL) == bool(URL):
        raise UserError("give either --model (a checkpoint) or --url (a served model)")
    if URL and not TRIGGERS:
        raise UserError("--triggers is required with --url")
    watermark = load_watermark(triggers_path(MODEL, METHOD, TRIGGERS), KEY)
    triggers, key, trigger_meta = watermark.triggers, watermark.key, watermark.meta
    labels, num_classes, weights_hash = (remote_labels(triggers, key, trigger_meta, watermark.num_classes) if URL
                                         else local_labels(triggers, key))
    report = compare(labels, key, num_classes, MAX_MISMATCHES, order=trigger_meta.get("query_order"))
    bound = trigger_meta.get("weights_sha256")
    report["weights_sha256"] = weights_hash
    report["hash_matches_triggers"] = (bound == weights_hash) if bound and weights_hash else None
    if URL:
        report.update(url=URL, model_name=MODEL_NAME)
    if JSON:
        print(json.dumps(report))
    else:
        hash_note = {True: "weights hash as watermarked", False: "weights hash DIFFERS from the one the triggers "
                     "were made for", None: "no weights hash bound to these triggers"}[report["hash_matches_triggers"]]
        if URL:
            hash_note = f"served model {MODEL_NAME!r} at {URL}, labels only"
        first = report["queries_to_first_mismatch"]
        order_note = f"; first mismatch at query {first} in the recorded fragility order" if first else ""
        print(f"{report['verdict'].upper()}: {report['matches']}/{report['n']} trigger labels match the key "
              f"(p={report['p_value']:.2e} by chance; {hash_note}{order_note})")
    return 0 if report["verdict"] == "intact" else 1


if __name__ == "__main__":
    run_main(main)
