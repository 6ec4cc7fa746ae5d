"""export.py and verify.py --onnx / --deployment as a user runs them, on the session's watermarked resnet8: the
exported file verifies intact in ONNX Runtime (with the calibration warning), an edited file is tampered (exit 1,
the hash in --json), a file for another input shape and the bad inputs are one error line (exit 2)."""
import json

import onnx
import pytest
import torch
from onnx import numpy_helper

from conftest import run_script
from fragile.core.data import DATASETS
from fragile.core.io import model_sha256
from fragile.deploy.onnx_export import export_bytes
from models import build_classifier

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def exported(watermarked, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "resnet8_synthetic.onnx"
    proc = run_script("export.py", "--model", watermarked["model"], "--out", out, "--opset", 17)
    assert proc.stdout.startswith(f"wrote {out} (opset 17")
    return out


def verify_onnx(watermarked, path, *extra):
    return run_script("verify.py", "--onnx", path, "--triggers", watermarked["triggers"], "--key", watermarked["key"],
                      *extra, check=False)


def one_error_line(proc, code, expected):
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == code and len(lines) == 1 and lines[0].startswith("error:") and expected in lines[0], \
        proc.stderr


def test_the_exported_file_verifies_intact_in_onnxruntime_with_the_calibration_warning(watermarked, exported):
    proc = verify_onnx(watermarked, exported, "--json")
    report = json.loads(proc.stdout)
    assert proc.returncode == 0 and report["verdict"] == "intact" and report["matches"] == report["n"] == 30
    assert report["weights_hash"] == "as watermarked" and report["graph"] == "as exported"
    assert report["deployment"] == "onnxruntime" and report["calibrated_for"] == ["torch-fp32"]
    assert proc.stderr.startswith("warning:") and "not for onnxruntime" in proc.stderr


def test_an_onnx_file_with_an_edited_weight_is_tampered(watermarked, exported, tmp_path):
    proto = onnx.load(str(exported))
    tensor = next(t for t in proto.graph.initializer if t.name.endswith("fc.bias"))
    edited = numpy_helper.to_array(tensor).copy()
    edited[0] += 1e-4   # too small to flip a label: the recomputed hash decides
    tensor.CopyFrom(numpy_helper.from_array(edited, tensor.name))
    onnx.save(proto, str(tmp_path / "edited.onnx"))
    proc = verify_onnx(watermarked, tmp_path / "edited.onnx", "--json")
    report = json.loads(proc.stdout)
    assert proc.returncode == 1 and report["verdict"] == "tampered" and report["hash_matches_triggers"] is False
    assert "weights_hash" in report["decided_by"] and report["onnx_metadata_hash"] == "differs from weights"


def test_an_onnx_file_for_another_input_shape_is_one_line(watermarked, tmp_path):
    spec = DATASETS["fashion-mnist"]
    model = build_classifier("resnet8", spec).eval()
    meta = {"arch": "resnet8", "dataset": spec.name, "num_classes": spec.num_classes,
            "input_shape": list(spec.shape), "weights_sha256": model_sha256(model)}
    (tmp_path / "other.onnx").write_bytes(export_bytes(model, meta))
    one_error_line(verify_onnx(watermarked, tmp_path / "other.onnx"), 2, "shape")


def test_verify_through_a_named_deployment_warns_when_uncalibrated(watermarked):
    proc = run_script("verify.py", "--model", watermarked["model"], "--deployment", "openvino", "--json", check=False)
    report = json.loads(proc.stdout)
    assert proc.returncode == 0 and report["verdict"] == "intact" and report["deployment"] == "openvino"
    assert proc.stderr.startswith("warning:") and "not for openvino" in proc.stderr


@pytest.mark.parametrize("case", ["exists", "cuda"])
def test_bad_input_is_one_error_line(watermarked, exported, case):
    if case == "exists":
        one_error_line(run_script("export.py", "--model", watermarked["model"], "--out", exported, check=False), 2,
                       "--overwrite")
    else:
        if torch.cuda.is_available():
            pytest.skip("a GPU is present: the CUDA deployment runs here")
        one_error_line(run_script("verify.py", "--model", watermarked["model"], "--deployment", "torch-cuda-fp32",
                                  check=False), 2, "needs a GPU")
