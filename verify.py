"""Is this model still the one I watermarked? Black-box: only top-1 labels of the triggers are used.

    python verify.py --model checkpoints/resnet8_fashion-mnist.pt [--triggers DIR|triggers.pt] [--key KEY.json] [--json]
    python verify.py --url http://127.0.0.1:8080 --model-name fragile-wm --triggers DIR [--key KEY.json] [--json]
    python verify.py --onnx checkpoints/resnet8_fashion-mnist.onnx [--triggers DIR] [--json]
    python verify.py --model CKPT --deployment onnxruntime|openvino|torch-fp16|torch-bf16|torch-cuda-fp32|...

With --url the model is queried where it is deployed, over the Open Inference Protocol (KServe v2 REST:
KServe, Triton, MLServer, TorchServe); the checkpoint is not needed. Exit codes: 0 intact, 1 tampered, 2 error
(a server that is down or answers garbage is an error, never "intact"). "Intact" needs an answer for every
trigger, each equal to its key label, and locally also the weights hash the triggers were made for, computed
from the weights loaded (never the hash the checkpoint's metadata claims); --json names the evidence.

--onnx verifies an exported file (export.py) in ONNX Runtime: its weights hash is recomputed from the tensors the
file holds and its graph from a fresh export of them (fragile/deploy/onnx_export.py), never read from its metadata.
--deployment computes a checkpoint's labels in a deployment's own arithmetic; a deployment the triggers were not
calibrated for gets a warning line (stderr) beside the verdict.
"""
# ----------------------------------------------------------------------------- config
MODEL = ""                 # the checkpoint to verify (or --url, or --onnx)
ONNX = ""                  # an exported ONNX file instead (export.py), run in ONNX Runtime
DEPLOYMENT = "torch-fp32"  # with --model: whose arithmetic computes the labels (fragile/deploy/targets.py)
URL = ""                   # a served model instead: the server's base URL (http://host:port)
MODEL_NAME = "fragile-wm"  # the name the server serves the model under (POST /v2/models/<name>/infer)
TIMEOUT = 30.0             # seconds per request, the whole request (connect, send, answer)
RETRIES = 3                # retries per request on connection errors, timeouts and 5xx answers (backoff doubles)
INPUT_NAME = "input-0"     # the request's input tensor name
INPUT_DATATYPE = "UINT8"   # UINT8 (the 8-bit triggers as they are) or FP32 (the same images in [0, 1])
TRIGGERS = ""              # trigger folder (its PNGs), PNG folder, or triggers.pt; default derived from MODEL
                           #   (or from ONNX: X.onnx has the triggers of X.pt)
METHOD = "paper"           # which trigger set to derive the default paths from
KEY = ""                   # key JSON; default: the key named in the trigger metadata
MAX_MISMATCHES = 0         # tolerated mismatches before the verdict is "tampered"
BATCH_SIZE = 0             # query batch size (0: all triggers at once)
DEVICE = "cpu"
JSON = False               # print one JSON object instead of a verdict line
# -----------------------------------------------------------------------------

import json
import os
import sys

import torch

from fragile.core.cli import UserError, apply_overrides, check_range, run_main
from fragile.core.data import DATASETS
from fragile.core.devices import resolve_device
from fragile.core.io import load_classifier
from fragile.watermark.paths import load_watermark, triggers_path
from fragile.watermark.remote import MAX_RETRIES, MAX_TIMEOUT_S, query_remote_labels
from fragile.watermark.queries import check_compatible, check_tolerance, compare
from fragile.deploy.onnx_export import io_shapes, onnx_evidence, read_onnx
from fragile.deploy.runtimes import ort_session
from fragile.deploy.predictors import onnx_predictor
from fragile.deploy.targets import DEFAULT_DEPLOYMENT, DEPLOYMENTS, calibrated_for, calibration_warning, predictor


def check_settings():
    """Every number checked before any file is read or request sent."""
    check_range("--batch-size", BATCH_SIZE, 0)
    check_range("--max-mismatches", MAX_MISMATCHES, 0)
    check_range("--timeout", TIMEOUT, 0, MAX_TIMEOUT_S, low_open=True)
    check_range("--retries", RETRIES, 0, MAX_RETRIES)
    if [bool(MODEL), bool(URL), bool(ONNX)].count(True) != 1:
        raise UserError("give one of --model (a checkpoint), --onnx (an exported file) or --url (a served model)")
    if DEPLOYMENT != DEFAULT_DEPLOYMENT and not MODEL:
        raise UserError("--deployment is for --model: an ONNX file runs in onnxruntime, a served model in its server")
    if URL and not TRIGGERS:
        raise UserError("--triggers is required with --url")
    if MODEL and not os.path.exists(MODEL):
        raise UserError(f"checkpoint not found: {MODEL}")
    if ONNX and not os.path.exists(ONNX):
        raise UserError(f"ONNX file not found: {ONNX}")


def source_path():
    """The file the default trigger paths derive from: the checkpoint, or the one an ONNX file was exported from."""
    return MODEL or (ONNX[:-len(".onnx")] + ".pt" if ONNX.endswith(".onnx") else ONNX)


def hash_status(computed, bound):
    return "not bound" if not bound else "as watermarked" if bound == computed else "differs"


def local_evidence(watermark):
    """Labels from the checkpoint itself, and what its weights say: the hash computed from the weights loaded, set
    beside the one the triggers were made for and the one the checkpoint's own metadata claims."""
    model, model_meta = load_classifier(MODEL, resolve_device(DEVICE))
    check_compatible(watermark.triggers, watermark.key, model_meta["input_shape"], model_meta["num_classes"])
    # torch-fp32 is exact fp32 (no TF32): the verdict must not depend on fast-math settings
    logits = predictor(DEPLOYMENT, model, model_meta)(watermark.triggers, BATCH_SIZE or None)
    computed, bound = model_meta["weights_sha256"], watermark.meta.get("weights_sha256")
    stored = model_meta["stored_weights_sha256"]
    evidence = {"weights_sha256": computed, "weights_hash": hash_status(computed, bound),
                "checkpoint_metadata_hash": ("absent" if not stored else "matches weights" if stored == computed
                                             else "differs from weights"),
                "finite_outputs": bool(torch.isfinite(logits).all())}
    return logits.argmax(1).cpu().tolist(), model_meta["num_classes"], evidence


def onnx_file_evidence(watermark):
    """Labels from the ONNX file in ONNX Runtime, and what its own tensors and graph say (recomputed, never the
    metadata's claim); its input shape and class count are the graph's."""
    proto, bound = read_onnx(ONNX)
    input_shape, num_classes = io_shapes(proto)
    if watermark.num_classes and num_classes != watermark.num_classes:
        raise UserError(f"the ONNX model returns {num_classes} classes, but the key {watermark.key_path} is for "
                        f"{watermark.num_classes}: it is not the model these triggers were made for")
    check_compatible(watermark.triggers, watermark.key, input_shape, num_classes)
    logits = onnx_predictor(ort_session(ONNX))(watermark.triggers, BATCH_SIZE or None)
    evidence = onnx_evidence(proto, bound)
    evidence.update(weights_hash=hash_status(evidence["weights_sha256"], watermark.meta.get("weights_sha256")),
                    finite_outputs=bool(torch.isfinite(logits).all()))
    return logits.argmax(1).tolist(), num_classes, evidence


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
    if evidence.get("onnx_metadata_hash") == "differs from weights":
        against.append("onnx_metadata_hash")
    if evidence.get("graph") == "differs from a fresh export":
        against.append("graph")
    if evidence.get("finite_outputs") is False:
        against.append("finite_outputs")
    report.update(evidence)
    report["verdict"] = "tampered" if against else "intact"
    report["decided_by"] = against or ["labels"] + (["weights_hash"] if evidence.get("weights_hash") ==
                                                    "as watermarked" else []) + \
        (["graph"] if evidence.get("graph") == "as exported" else [])
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
        if report.get("checkpoint_metadata_hash") == "differs from weights":
            note += "; the checkpoint's own metadata claims another hash than its weights have"
        if ONNX:
            note += (f"; ONNX file in onnxruntime, graph {report['graph']}" +
                     ("; its metadata claims another hash than its weights have"
                      if report["onnx_metadata_hash"] == "differs from weights" else ""))
        elif DEPLOYMENT != DEFAULT_DEPLOYMENT:
            note += f"; computed by {DEPLOYMENT}"
        if not report["finite_outputs"]:
            note += "; the model's outputs are not finite"
    first = report["queries_to_first_mismatch"]
    order_note = f"; first mismatch at query {first} in the recorded fragility order" if first else ""
    return (f"{report['verdict'].upper()}: {report['matches']}/{report['n']} trigger labels match the key "
            f"(p={report['p_value']:.2e} by chance; {note}{order_note}; decided by {', '.join(report['decided_by'])})")


def main():
    apply_overrides(globals(), __doc__, choices={"INPUT_DATATYPE": ["UINT8", "FP32"], "DEPLOYMENT": list(DEPLOYMENTS)})
    check_settings()
    watermark = load_watermark(triggers_path(source_path(), METHOD, TRIGGERS), KEY)
    check_tolerance(MAX_MISMATCHES, len(watermark.key))
    evidence_of = remote_evidence if URL else onnx_file_evidence if ONNX else local_evidence
    labels, num_classes, evidence = evidence_of(watermark)
    report = compare(labels, watermark.key, num_classes, MAX_MISMATCHES, order=watermark.meta.get("query_order"))
    report = decide(report, evidence)
    if URL:
        report.update(url=URL, model_name=MODEL_NAME)
    else:
        report.update(deployment="onnxruntime" if ONNX else DEPLOYMENT)
    report["calibrated_for"] = calibrated_for(watermark.meta)
    print(json.dumps(report) if JSON else verdict_line(report), flush=True)
    warning = None if URL else calibration_warning(report["deployment"], watermark.meta)
    if warning:
        print(warning, file=sys.stderr)
    return 0 if report["verdict"] == "intact" else 1


if __name__ == "__main__":
    run_main(main)
