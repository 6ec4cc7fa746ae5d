"""A watermarked checkpoint behind the Open Inference Protocol (KServe v2 REST), served by KServe's ModelServer.

This is the deployment ``verify.py --url`` checks: ``serve.py`` starts it. The runtime reads the checkpoint
the suite's one safe way (``load_classifier`` -> ``torch.load(weights_only=True)``): a checkpoint carrying
pickled code is refused, never run. Requests carry one input tensor (N, C, H, W), UINT8 8-bit images or
FP32 images in [0, 1]; answers carry "labels" (INT64, N) and "logits" (FP32, N x classes). ``precision``
fp16 / bf16 serves the same weights in half precision, a benign deployment change the envelope covers; serve.py
can hand it another runtime's predictor instead (an exported ONNX file in ONNX Runtime).

The server listens on loopback unless told otherwise (``host``), and KServe's model-repository endpoints
(``/v2/repository/models/<name>/load`` and ``/unload``, which let anyone who reaches the port take the model
offline) are switched off: a verification target serves inference and metadata only.

Needs requirements-serve.txt (KServe); nothing else in the suite imports this module.
"""
import asyncio
import uuid

import numpy as np
import torch
from fastapi.responses import JSONResponse
from kserve import InferOutput, InferResponse, Model, ModelServer
from kserve.constants.constants import FASTAPI_APP_IMPORT_STRING
from kserve.errors import InvalidInput
from kserve.model_server import app as kserve_app
from kserve.protocol.rest.server import RESTServer

from ..core.io import load_classifier
from ..core.devices import resolve_device, set_fast_math
from .jitter import PRECISIONS, CastModel
from ..core.training import predict_logits

ACCEPTED_DATATYPES = ("UINT8", "FP32")


class ServedClassifier:
    """The framework-free core: checks a request's images and returns labels and logits. ``predict`` is the
    runtime's seam (uint8 or [0, 1] float images -> fp32 logits); ``meta`` names the input shape and class count."""

    def __init__(self, predict, meta):
        self.predict, self.meta = predict, meta

    @classmethod
    def from_checkpoint(cls, path, precision="fp32", device="cpu"):
        """A checkpoint served by torch, in fp32 or cast to half precision."""
        if precision not in ("fp32", *PRECISIONS):
            raise ValueError(f"precision must be fp32, fp16 or bf16, not {precision!r}")
        model, meta = load_classifier(path, resolve_device(device))
        model = CastModel(model, PRECISIONS[precision]) if precision != "fp32" else model
        set_fast_math(False)  # fp32 means fp32: no TF32 on a GPU
        return cls(lambda images: predict_logits(model, images, max(1, len(images))).cpu(), meta)

    def check(self, array, datatype):
        """One clear 400 for anything that is not a batch of this model's images."""
        if datatype not in ACCEPTED_DATATYPES:
            raise InvalidInput(f"input datatype must be one of {', '.join(ACCEPTED_DATATYPES)}, not {datatype}")
        expected = tuple(self.meta["input_shape"])
        if array.ndim != 4 or tuple(array.shape[1:]) != expected:
            raise InvalidInput(f"input shape must be (N, {', '.join(map(str, expected))}), not {tuple(array.shape)}")
        if datatype == "FP32" and not (np.isfinite(array).all() and array.min() >= 0 and array.max() <= 1):
            raise InvalidInput("FP32 images must hold finite values in [0, 1]")

    def infer(self, array, datatype):
        self.check(array, datatype)
        images = torch.from_numpy(np.ascontiguousarray(array))
        logits = self.predict(images)
        return logits.argmax(1).numpy().astype(np.int64), logits.numpy().astype(np.float32)


class FragileModel(Model):
    """The KServe model: v2 inference requests in, labels and logits out."""

    def __init__(self, name, load_core):
        super().__init__(name)
        self.load_core = load_core   # () -> ServedClassifier: the runtime's choice, made by serve.py
        self.core = None

    def load(self):
        self.core = self.load_core()
        self.ready = True
        return self.ready

    def get_input_types(self):
        """The model metadata's input (GET /v2/models/<name>): any batch of this model's images, UINT8 (FP32 in
        [0, 1] is accepted too)."""
        shape = [-1, *self.core.meta["input_shape"]]
        return [{"name": "input-0", "datatype": "UINT8", "shape": shape}]

    def get_output_types(self):
        classes = self.core.meta["num_classes"]
        return [{"name": "labels", "datatype": "INT64", "shape": [-1]},
                {"name": "logits", "datatype": "FP32", "shape": [-1, classes]}]

    async def predict(self, payload, headers=None, response_headers=None):
        inputs = getattr(payload, "inputs", None)
        if not inputs or len(inputs) != 1:
            raise InvalidInput("send exactly one input tensor (the images)")
        try:
            array = inputs[0].as_numpy()
        except Exception as e:  # malformed data of any kind: the client's fault, a 400
            raise InvalidInput(f"input data does not match its shape and datatype: {e}") from None
        labels, logits = self.core.infer(array, inputs[0].datatype)
        outputs = [InferOutput("labels", list(labels.shape), "INT64", labels.tolist()),
                   InferOutput("logits", list(logits.shape), "FP32", logits.tolist())]
        # The Open Inference Protocol makes a request's id optional; the answer then carries one of ours.
        return InferResponse(response_id=payload.id or str(uuid.uuid4()), model_name=self.name,
                             infer_outputs=outputs)


REPOSITORY_PATH = "/repository/"   # KServe's model-repository extension: load and unload by HTTP


@kserve_app.middleware("http")
async def refuse_repository(request, call_next):
    """The model-repository endpoints answer 403: nobody unloads the served model over HTTP."""
    if REPOSITORY_PATH in request.url.path:
        return JSONResponse({"error": "the model repository extension is disabled on this server"}, status_code=403)
    return await call_next(request)


def serve(load_core, name, host, http_port):
    """Load the model (``load_core()``, a ServedClassifier) and serve it on ``host``:``http_port`` until
    interrupted (REST only: no gRPC port). KServe's own start always binds 0.0.0.0, so its REST server is built
    here with the host set."""
    model = FragileModel(name, load_core)
    model.load()
    server = ModelServer(http_port=http_port, enable_grpc=False, workers=1)
    server.register_model(model)
    model.start()
    rest = RESTServer(FASTAPI_APP_IMPORT_STRING, server.dataplane, server.model_repository_extension, http_port)
    rest.config.host = host
    server.servers.append(rest.start())
    server.setup_event_loop()
    server.register_signal_handler()
    asyncio.run(server._serve())
