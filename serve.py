"""Serve a watermarked checkpoint over the Open Inference Protocol (KServe v2 REST), for verify.py --url.

    python serve.py --model checkpoints/resnet8_fashion-mnist.pt --http-port 8080
    python verify.py --url http://127.0.0.1:8080 --triggers checkpoints/resnet8_fashion-mnist_triggers_paper
    python serve.py --runtime onnxruntime --onnx checkpoints/resnet8_fashion-mnist.onnx   # an export.py file

POST /v2/models/<model-name>/infer with one input (N, C, H, W), UINT8 or FP32 in [0, 1]; the answer holds
"labels" (INT64) and "logits" (FP32). Needs KServe: pip install -r requirements-serve.txt. The checkpoint
is read with torch.load(weights_only=True), as everywhere in this suite.
"""
# ----------------------------------------------------------------------------- config
MODEL = ""                 # the checkpoint to serve (with --runtime torch)
RUNTIME = "torch"          # torch (a checkpoint) | onnxruntime (an exported ONNX file, --onnx; needs requirements-deploy.txt)
ONNX = ""                  # the ONNX file to serve with --runtime onnxruntime
MODEL_NAME = "fragile-wm"  # served as /v2/models/<name>
HOST = "127.0.0.1"         # the address to listen on: loopback by default; 0.0.0.0 serves every network (no authentication)
HTTP_PORT = 8080
PRECISION = "fp32"         # fp32 | fp16 | bf16: half precision is a benign deployment change (generate_samples.py --envelope)
DEVICE = "cpu"
# -----------------------------------------------------------------------------

import ipaddress
import socket
import sys

from fragile.core.cli import UserError, apply_overrides, run_main
from fragile.core.io import read_checkpoint


def check_host(host):
    """The listen address, resolved now (one error line for a bad one); a warning line when it is not loopback."""
    try:
        address = socket.getaddrinfo(host, None)[0][4][0]
    except (socket.gaierror, UnicodeError):
        raise UserError(f"--host {host!r} is not an address or name this machine can listen on") from None
    if not ipaddress.ip_address(address.split("%")[0]).is_loopback:
        print(f"warning: --host {host} serves the model beyond this machine, to anyone who reaches the port: this "
              f"server has no authentication (put it behind one, or keep the default 127.0.0.1)", file=sys.stderr,
              flush=True)


def torch_core():
    """The checkpoint in torch: checked now (a missing, corrupt or unsafe checkpoint), loaded by the server."""
    read_checkpoint(MODEL)
    return lambda served: served.from_checkpoint(MODEL, PRECISION, DEVICE)


def onnx_core():
    """The ONNX file in ONNX Runtime on the CPU, read and checked now; its input shape and class count are its
    graph's."""
    from fragile.deploy.onnx_export import io_shapes, read_onnx
    from fragile.deploy.runtimes import ort_session
    from fragile.deploy.predictors import onnx_predictor
    proto, _ = read_onnx(ONNX)
    input_shape, num_classes = io_shapes(proto)
    predict = onnx_predictor(ort_session(ONNX))
    return lambda served: served(predict, {"input_shape": input_shape, "num_classes": num_classes})


def main():
    apply_overrides(globals(), __doc__, choices={"PRECISION": ["fp32", "fp16", "bf16"],
                                                 "RUNTIME": ["torch", "onnxruntime"]})
    if RUNTIME == "torch" and (not MODEL or ONNX):
        raise UserError("--runtime torch serves a checkpoint: give --model (and no --onnx)")
    if RUNTIME == "onnxruntime" and (not ONNX or MODEL or PRECISION != "fp32"):
        raise UserError("--runtime onnxruntime serves an exported file: give --onnx (no --model; fp32 only)")
    if not 0 < HTTP_PORT < 65536:
        raise UserError(f"--http-port must be 1..65535, not {HTTP_PORT}")
    check_host(HOST)
    load_core = onnx_core() if ONNX else torch_core()   # a bad file fails here, in one line
    sys.argv = sys.argv[:1]  # KServe parses the command line when imported: it must not see these flags
    try:
        from fragile.watermark import serving
    except ModuleNotFoundError as e:
        if e.name and e.name.split(".")[0] == "kserve":
            raise UserError("serving needs KServe: pip install -r requirements-serve.txt") from None
        raise
    print(f"serving {MODEL or ONNX} as {MODEL_NAME!r} ({RUNTIME}, {PRECISION}) on "
          f"http://{HOST}:{HTTP_PORT}/v2/models/{MODEL_NAME}", flush=True)
    serving.serve(lambda: load_core(serving.ServedClassifier), MODEL_NAME, HOST, HTTP_PORT)


if __name__ == "__main__":
    run_main(main)
