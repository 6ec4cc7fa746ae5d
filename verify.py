"""Is this model still the one I watermarked? Black-box: only top-1 labels of the triggers are used.

    python verify.py --model checkpoints/resnet8_fashion-mnist.pt [--triggers DIR|triggers.pt] [--key KEY.json] [--json]
    python verify.py --url http://127.0.0.1:8080 --model-name fragile-wm --triggers DIR [--key KEY.json] [--json]

With --url the model is queried where it is deployed, over the Open Inference Protocol (KServe v2 REST:
KServe, Triton, MLServer, TorchServe); the checkpoint is not needed. Exit codes: 0 intact, 1 tampered, 2 error
(a server that is down or answers garbage is an error, never "intact"). "Intact" needs an answer for every
trigger, each equal to its key label, and locally also the weights hash the triggers were made for, computed
from the weights loaded (never the hash the checkpoint's metadata claims); --json names the evidence.
"""
# ----------------------------------------------------------------------------- config
MODEL = ""                 # the checkpoint to verify (or --url)
URL = ""                   # a served model instead: the server's base URL (http://host:port)
MODEL_NAME = "fragile-wm"  # the name the server serves the model under (POST /v2/models/<name>/infer)
TIMEOUT = 30.0             # seconds per request, the whole request (connect, send, answer)
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
import os

import torch

from fragile.core.cli import UserError, apply_overrides, check_range, run_main
from fragile.core.data import DATASETS
from fragile.core.devices import resolve_device, tf32
from fragile.core.io import load_classifier
from fragile.core.training import predict_logits
from fragile.watermark.paths import load_watermark, triggers_path
from fragile.watermark.remote import MAX_RETRIES, MAX_TIMEOUT_S, query_remote_labels
from fragile.watermark.queries import check_compatible, check_tolerance, compare


def check_settings():
    """Every number checked before any file is read or request sent."""
    check_range("--batch-size", BATCH_SIZE, 0)
    check_range("--max-mismatches", MAX_MISMATCHES, 0)
    check_range("--timeout", TIMEOUT, 0, MAX_TIMEOUT_S, low_open=True)
    check_range("--retries", RETRIES, 0, MAX_RETRIES)
    if bool(MODEL) == bool(URL):
        raise UserError("give either --model (a checkpoint) or --url (a served model)")
    if URL and not TRIGGERS:
        raise UserError("--triggers is required with --url")
    if MODEL and not os.path.exists(MODEL):
        raise UserError(f"checkpoint not found: {MODEL}")


def local_evidence(watermark):
    """Labels from the checkpoint itself, and what its weights say: the hash computed from the weights loaded, set
    beside the one the triggers were made for and the one the checkpoint's own metadata claims."""
    model, model_meta = load_classifier(MODEL, resolve_device(DEVICE))
    check_compatible(watermark.triggers, watermark.key, model_meta["input_shape"], model_meta["num_classes"])
    with tf32(False):   # exact fp32: the verdict must not depend on fast-math settings
        logits = predict_logits(model, watermark.triggers, BATCH_SIZE or len(watermark.triggers))
    computed, bound = model_meta["weights_sha256"], watermark.meta.get("weights_sha256")
    stored = model_meta["stored_weights_sha256"]
    evidence = {"weights_sha256": computed,
                "weights_hash": ("not bound" if not bound else "as watermarked" if bound == computed else "differs"),
                "checkpoint_metadata_hash": ("absent" if not stored else "matches weights" if stored == computed
                                             else "differs from weights"),
                "finite_outputs": bool(torch.isfinite(logits).all())}
    return logits.argmax(1).cpu().tolist(), model_meta["num_classes"], evidence


def remote_evidence(watermark):
    """Labels from the served model; its class count is the key's, which must agree with the dataset the triggers
    were made on (a key that claims more classes would shrink the p-value)."""
    num_classes = watermark.num_classes
    if not num_classes:
        raise UserError("the key file does not say how many classes the model has (num_classes)")
    dataset = watermark.meta.get("dataset")
    if dataset in DATASETS and DATASETS[dataset].num_classes != num_classes:
        raise UserError(f"the key {watermark.key_path} says {num_classes} classes, but its triggers were made for "
                        f"{dataset}, which has {DATASETS[dataset].num_classes}: the key file is corrupt")
    check_compatible(watermark.triggers, watermark.key, list(watermark.triggers.shape[1:]), num_classes)
    labels = query_remote_labels(URL, MODEL_NAME, watermark.triggers, num_classes, TIMEOUT, RETRIES,
                                 BATCH_SIZE or None, INPUT_NAME, INPUT_DATATYPE)
    return labels, num_classes, {"weights_hash": "not available (served model, labels only)"}


def decide(report, evidence):
    """The verdict from every piece of evidence: "intact" only when every trigger answered with its key label and,
    where the weights are at hand, their hash is the one the triggers were made for. ``decided_by`` names what
    made the verdict."""
    against = []
    if report["verdict"] == "tampered":
        against.append("labels")
    if evidence.get("weights_hash") == "differs":
        against.append("weights_hash")
    if evidence.get("checkpoint_metadata_hash") == "differs from weights":
        against.append("checkpoint_metadata_hash")
    if evidence.get("finite_outputs") is False:
        against.append("finite_outputs")
    report.update(evidence)
    report["verdict"] = "tampered" if against else "intact"
    report["decided_by"] = against or ["labels"] + (["weights_hash"] if evidence.get("weights_hash") ==
                                                    "as watermarked" else [])
    report["hash_matches_triggers"] = {"as watermarked": True, "differs": False}.get(evidence["weights_hash"])
    return report


HASH_NOTES = {"as watermarked": "weights hash as watermarked",
              "differs": "weights hash DIFFERS from the one the triggers were made for",
              "not bound": "no weights hash bound to these triggers"}


def verdict_line(report):
    if URL:
        note = f"served model {MODEL_NAME!r} at {URL}, labels only"
    else:
        note = HASH_NOTES[report["weights_hash"]]
        if report["checkpoint_metadata_hash"] == "differs from weights":
            note += "; the checkpoint's own metadata claims another hash than its weights have"
        if not report["finite_outputs"]:
            note += "; the model's outputs are not finite"
    first = report["queries_to_first_mismatch"]
    order_note = f"; first mismatch at query {first} in the recorded fragility order" if first else ""
    return (f"{report['verdict'].upper()}: {report['matches']}/{report['n']} trigger labels match the key "
            f"(p={report['p_value']:.2e} by chance; {note}{order_note}; decided by {', '.join(report['decided_by'])})")


def main():
    apply_overrides(globals(), __doc__, choices={"INPUT_DATATYPE": ["UINT8", "FP32"]})
    check_settings()
    watermark = load_watermark(triggers_path(MODEL, METHOD, TRIGGERS), KEY)
    check_tolerance(MAX_MISMATCHES, len(watermark.key))
    labels, num_classes, evidence = remote_evidence(watermark) if URL else local_evidence(watermark)
    report = compare(labels, watermark.key, num_classes, MAX_MISMATCHES, order=watermark.meta.get("query_order"))
    report = decide(report, evidence)
    if URL:
        report.update(url=URL, model_name=MODEL_NAME)
    print(json.dumps(report) if JSON else verdict_line(report))
    return 0 if report["verdict"] == "intact" else 1


if __name__ == "__main__":
    run_main(main)
