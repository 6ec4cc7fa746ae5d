"""The named deployments on a tiny untrained resnet8, in real ONNX Runtime and OpenVINO sessions: each computes
the checkpoint's logits in its own arithmetic; calibration is read from trigger metadata; a missing runtime or GPU
is one error line."""
import sys

import pytest
import torch

from conftest import tiny_model
from fragile.core.cli import UserError
from fragile.deploy import runtimes, targets
from fragile.deploy.onnx_export import EXPORT_RTOL, check_images


@pytest.fixture(scope="module")
def tiny():
    model, meta = tiny_model()
    images = check_images(list(meta["input_shape"]), 16)
    return model, meta, images, targets.predictor("torch-fp32", model, meta)(images)


# fp32 runtimes agree with torch to rounding; half precision to its own (much larger) rounding.
TOLERANCE = {"onnxruntime": EXPORT_RTOL, "openvino": EXPORT_RTOL, "torch-fp16": 1e-2, "torch-bf16": 5e-2}


@pytest.mark.parametrize("name", sorted(TOLERANCE))
def test_each_cpu_deployment_computes_the_checkpoints_logits_in_its_own_arithmetic(tiny, name):
    model, meta, images, reference = tiny
    predict = targets.predictor(name, model, meta)
    logits = predict(images, 5)   # in batches, as verify.py --batch-size asks
    scale = reference.abs().max().item()
    assert logits.shape == reference.shape and logits.dtype == torch.float32
    assert (logits - reference).abs().max().item() <= TOLERANCE[name] * max(1.0, scale)
    if name in ("onnxruntime", "openvino"):   # [0, 1] floats (a served FP32 request) are not scaled twice
        assert torch.equal(predict(images.float() / 255), predict(images))
    else:   # the half-precision ones really compute in half precision
        assert not torch.equal(logits, reference)


def test_calibrated_deployments_come_from_the_metadata_or_its_envelope():
    assert targets.calibrated_for({}) == ["torch-fp32"]
    assert targets.calibrated_for({"envelope": ["exact", "bf16"]}) == ["torch-fp32", "torch-bf16"]
    assert targets.calibrated_for({"envelope": ["fp16", "cuda"]}) == ["torch-fp16", "torch-cuda-fp16"]
    assert targets.calibrated_for({"envelope": ["exact"], "deployments": ["onnxruntime"]}) == ["onnxruntime"]
    assert targets.calibration_warning("torch-bf16", {"envelope": ["exact", "bf16"]}) is None
    warning = targets.calibration_warning("onnxruntime", {"envelope": ["exact"]})
    assert warning.startswith("warning:") and "torch-fp32" in warning and "onnxruntime" in warning
    assert "\n" not in warning


@pytest.mark.parametrize("module, package", [("onnxruntime", "onnxruntime"), ("openvino", "openvino"),
                                             ("onnx", "onnx")])
def test_a_runtime_that_is_not_installed_is_one_line_naming_the_package(tiny, monkeypatch, module, package):
    model, meta, _, _ = tiny
    monkeypatch.setitem(sys.modules, module, None)   # what an absent package looks like to import
    with pytest.raises(UserError) as error:
        targets.predictor("openvino" if module == "openvino" else "onnxruntime", model, meta)
    assert f"package {package}" in str(error.value) and runtimes.REQUIREMENTS in str(error.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present: the CUDA deployments run here")
@pytest.mark.parametrize("name", [n for n, d in targets.DEPLOYMENTS.items() if d.gpu])
def test_a_cuda_deployment_without_a_gpu_is_one_line(tiny, name):
    model, meta, _, _ = tiny
    with pytest.raises(UserError, match="needs a GPU"):
        targets.predictor(name, model, meta)
