"""Export a checkpoint as the ONNX file a deployment ships, bound to the checkpoint's weights.

    python export.py --model checkpoints/resnet8_fashion-mnist.pt [--out model.onnx] [--opset 17] [--overwrite]
    python verify.py --onnx checkpoints/resnet8_fashion-mnist.onnx     # verified in ONNX Runtime

The file records its opset and, in its metadata, the checkpoint's weights hash (computed from the weights loaded),
arch, dataset, input shape and class count. It is written atomically, then run in ONNX Runtime beside torch on
seeded random images: a file whose logits differ beyond a small fp32 tolerance is deleted and refused (exit 2).
Needs requirements-deploy.txt (onnx, onnxruntime).
"""
# ----------------------------------------------------------------------------- config
MODEL = ""                 # the checkpoint to export (required)
OUT = ""                   # the ONNX file; default: beside the checkpoint, its name with .onnx
OPSET = 17                 # the ONNX opset (7..20: what torch's TorchScript-based exporter writes)
OVERWRITE = False          # replace an existing --out
# -----------------------------------------------------------------------------

import os

from fragile.core.cli import UserError, apply_overrides, check_range, run_main
from fragile.core.io import check_writable, load_classifier, refuse_existing
from fragile.deploy.onnx_export import export_onnx
from fragile.deploy.runtimes import require

MIN_OPSET, MAX_OPSET = 7, 20


def out_path():
    return OUT or (MODEL[:-3] if MODEL.endswith(".pt") else MODEL) + ".onnx"


def check_settings():
    """Every setting checked before the checkpoint is read."""
    if not MODEL:
        raise UserError("--model is required")
    if not os.path.exists(MODEL):
        raise UserError(f"checkpoint not found: {MODEL}")
    if isinstance(OPSET, bool) or not isinstance(OPSET, int):
        raise UserError(f"--opset must be an integer, got {OPSET!r}")
    check_range("--opset", OPSET, MIN_OPSET, MAX_OPSET)
    check_writable(out_path())
    refuse_existing(out_path(), OVERWRITE, "ONNX file")
    require("onnx"), require("onnxruntime")   # one line naming the package, before any work


def main():
    apply_overrides(globals(), __doc__)
    check_settings()
    model, meta = load_classifier(MODEL)
    difference, tolerance = export_onnx(model, meta, out_path(), OPSET)
    print(f"wrote {out_path()} (opset {OPSET}, weights {meta['weights_sha256'][:16]}...; ONNX Runtime matches torch "
          f"within {difference:.2g}, tolerance {tolerance:.2g})")
    return 0


if __name__ == "__main__":
    run_main(main)
