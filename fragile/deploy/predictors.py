"""Predictors: uint8 images (N, C, H, W) in, CPU fp32 logits out, whatever computes them (torch, possibly cast to
half precision; an ONNX Runtime session; an OpenVINO compiled model)."""
import numpy as np
import torch

from ..core.data import to_float
from ..core.devices import tf32
from ..core.training import predict_logits
from ..watermark.jitter import CastModel, torch_threads


def torch_predictor(model, dtype=None, threads=None):
    """Torch on the model's device, exact fp32 or cast to ``dtype``, with ``threads`` intra-op threads (None: as set);
    all images at once unless a batch is given."""
    model = CastModel(model, dtype) if dtype is not None else model

    def predict(images, batch_size=None):
        with tf32(False), torch.no_grad(), torch_threads(threads or torch.get_num_threads()):
            return predict_logits(model, images, batch_size or max(1, len(images))).cpu()
    return predict


def onnx_predictor(run):
    """A predictor around an ONNX Runtime session or an OpenVINO compiled model (each answers a list of outputs, the
    logits first): the images in [0, 1], as torch gets them (the model normalizes internally), fed in batches."""
    if hasattr(run, "get_inputs"):   # an ONNX Runtime session: its one input by name
        session, name = run, run.get_inputs()[0].name
        run = lambda batch: session.run(None, {name: batch})   # noqa: E731 -- the one adapter both runtimes need

    def predict(images, batch_size=None):
        size = batch_size or max(1, len(images))
        outs = [torch.from_numpy(np.array(run(_unit_floats(images[i:i + size]).numpy())[0], dtype=np.float32))
                for i in range(0, len(images), size)]
        return torch.cat(outs) if outs else torch.empty(0)
    return predict


def _unit_floats(images):
    """uint8 images to [0, 1] as predict_logits makes them; float images (a served FP32 request) are that already."""
    images = images.cpu()
    return to_float(images) if images.dtype == torch.uint8 else images.float()
