"""The optional runtimes (requirements-deploy.txt): imported only when a deployment needs one, and one error line
naming the package, or the missing GPU, when it is not there."""
import importlib

import torch

from ..core.cli import UserError, first_line

REQUIREMENTS = "requirements-deploy.txt"


def require(module, package=None):
    """``module`` imported, or one line naming the package to install (never an ImportError traceback)."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise UserError(f"this needs the Python package {package or module}, which is not installed here: "
                        f"pip install -r {REQUIREMENTS}") from None


def require_gpu(what):
    """A CUDA deployment on a machine without a GPU is one line, not a CUDA error deep inside a runtime."""
    if not torch.cuda.is_available():
        raise UserError(f"{what} needs a GPU, and torch.cuda.is_available() is false here: choose a CPU "
                        f"deployment (torch-fp32, torch-fp16, torch-bf16, onnxruntime, openvino)")


def ort_session(model, cuda=False, threads=None, optimizations="all"):
    """An ONNX Runtime session of ``model`` (a path or the file's bytes), on the CPU or on CUDA. The CUDA provider
    is asked for explicitly and nothing else: a silent fallback to the CPU would verify another arithmetic than
    the deployment's. ``threads`` (intra-op) and ``optimizations`` (graph optimisation level: all | basic |
    none) are the deployer's own settings: the deployment's jitter is measured across them."""
    ort = require("onnxruntime")
    if cuda:
        require_gpu("the onnxruntime-cuda deployment")
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise UserError("the onnxruntime-cuda deployment needs ONNX Runtime's CUDA build: pip install "
                            "onnxruntime-gpu (in place of onnxruntime)")
    providers = ["CUDAExecutionProvider"] if cuda else ["CPUExecutionProvider"]
    options = ort.SessionOptions()
    options.log_severity_level = 3   # errors only: the verdict line is the output
    if threads:
        options.intra_op_num_threads = threads
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, ORT_OPTIMIZATIONS[optimizations])
    try:
        return ort.InferenceSession(model, sess_options=options, providers=providers)
    except Exception as e:   # onnxruntime raises its own exception types for an unreadable model
        raise UserError(f"ONNX Runtime cannot load the model: {first_line(e)[:200]}") from None


ORT_OPTIMIZATIONS = {"all": "ORT_ENABLE_ALL", "basic": "ORT_ENABLE_BASIC", "none": "ORT_DISABLE_ALL"}


# OpenVINO's CPU plugin picks bf16 arithmetic by itself on CPUs with bf16 units (AMX, AVX512-BF16): the
# openvino deployment pins fp32, so its name means the same arithmetic on every machine.
OPENVINO_CONFIG = {"INFERENCE_PRECISION_HINT": "f32"}


def openvino_model(model_bytes, threads=None):
    """The ONNX model (its bytes) compiled by OpenVINO for the CPU, in fp32, with ``threads`` inference threads
    (None: OpenVINO's own choice)."""
    ov = require("openvino")
    core = ov.Core()
    config = {**OPENVINO_CONFIG, **({"INFERENCE_NUM_THREADS": threads} if threads else {})}
    return core.compile_model(core.read_model(model_bytes, b""), "CPU", config)
