"""Query a served model over the Open Inference Protocol (the KServe v2 REST API spoken by KServe, Triton,
MLServer and TorchServe): the owner sees only what the API returns.

    POST {url}/v2/models/{name}/infer
    {"inputs": [{"name": "input-0", "shape": [N, C, H, W], "datatype": "UINT8", "data": [...]}]}

The 8-bit triggers go out as UINT8 (or as FP32 in [0, 1] for servers that only take floats). Labels come
back from an integer output of N values, or from a float output of N x classes values (logits or
probabilities; argmax taken). Anything else is refused with one clear line: a verifier that cannot read
the answer must never conclude "intact". Standard library only (urllib), so verification needs nothing
beyond requirements.txt.
"""
import http.client
import json
import math
import socket
import time
import urllib.error
import urllib.parse
import urllib.request

import torch

from ..core.cli import UserError

INTEGER_TYPES = {"INT8", "INT16", "INT32", "INT64", "UINT8", "UINT16", "UINT32", "UINT64"}
FLOAT_TYPES = {"FP16", "FP32", "FP64", "BF16"}
# Names a server may give its label output; any other integer output of the right size is used too.
LABEL_NAMES = ("labels", "label", "predictions", "prediction", "class", "classes")
MAX_RESPONSE_BYTES = 64 << 20   # a misbehaving server must not exhaust the verifier's memory
BACKOFF_S = 0.5                 # first pause before a retry; doubles each time


def infer_url(url, model_name):
    """The infer endpoint: ``url`` is the server's base (http://host:port), or already a /v2/models/... path."""
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise UserError(f"--url must be an http:// or https:// address, not {url!r}")
    base = url.rstrip("/")
    if "/v2/models/" in base:
        return base if base.endswith("/infer") else base + "/infer"
    if not model_name:
        raise UserError("--model-name is required with --url (the name the server serves the model under)")
    return f"{base}/v2/models/{urllib.parse.quote(model_name, safe='')}/infer"


def request_body(images, input_name="input-0", datatype="UINT8", request_id="fragile-wm"):
    """A v2 inference request for uint8 ``images`` (N, C, H, W): UINT8 as they are, or FP32 in [0, 1]."""
    if datatype == "UINT8":
        data = images.reshape(-1).tolist()
    elif datatype == "FP32":
        data = (images.reshape(-1).double() / 255).tolist()
    else:
        raise UserError(f"input datatype must be UINT8 or FP32, not {datatype!r}")
    return {"id": request_id, "inputs": [{"name": input_name, "shape": list(images.shape), "datatype": datatype,
                                          "data": data}]}


def post_json(url, body, timeout, retries, sleep=time.sleep):
    """POST ``body`` as JSON; the decoded answer. Connection errors, timeouts and 5xx answers are retried
    ``retries`` times with exponential backoff; a 4xx answer (bad name, bad request) is final at once."""
    data = json.dumps(body).encode()
    for attempt in range(retries + 1):
        try:
            request = urllib.request.Request(url, data=data, method="POST",
                                             headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=timeout) as response:
                raw = response.read(MAX_RESPONSE_BYTES + 1)
            break
        except urllib.error.HTTPError as e:  # before URLError: it is one
            if e.code >= 500 and attempt < retries:
                sleep(BACKOFF_S * 2 ** attempt)
                continue
            raise UserError(f"the server at {url} answered HTTP {e.code}: {_error_text(e)}") from None
        except (urllib.error.URLError, http.client.HTTPException, ConnectionError, socket.timeout, TimeoutError) as e:
            if attempt < retries:
                sleep(BACKOFF_S * 2 ** attempt)
                continue
            reason = getattr(e, "reason", None) or e
            raise UserError(f"no answer from {url} after {retries + 1} attempt(s): {reason}") from None
    if len(raw) > MAX_RESPONSE_BYTES:
        raise UserError(f"the server at {url} sent more than {MAX_RESPONSE_BYTES >> 20} MiB: not an inference answer")
    try:
        return json.loads(raw)
    except ValueError:
        raise UserError(f"the server at {url} did not answer with JSON (starts {raw[:40]!r})") from None


def _error_text(error):
    """The server's own error message, on one short line."""
    try:
        text = error.read(2000).decode(errors="replace")
        text = json.loads(text).get("error", text) if text.strip().startswith("{") else text
    except (OSError, ValueError, AttributeError):
        text = ""
    return " ".join(str(text or error.reason).split())[:200]


def _flatten(data):
    """v2 allows the data of a tensor flattened or nested row-major: always a flat list here."""
    if isinstance(data, list) and data and isinstance(data[0], list):
        return [x for row in data for x in _flatten(row)]
    return data


def _numbers(output, count):
    data = _flatten(output.get("data"))
    if not isinstance(data, list) or len(data) != count:
        raise UserError(f"output {output.get('name')!r} holds {len(data) if isinstance(data, list) else 'no'} "
                        f"values, expected {count}")
    if not all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in data):
        raise UserError(f"output {output.get('name')!r} holds values that are not finite numbers")
    return data


def labels_from_response(payload, n, num_classes):
    """The N top-1 labels in a v2 inference response: a label output if there is one, else argmax of logits."""
    outputs = payload.get("outputs") if isinstance(payload, dict) else None
    if not isinstance(outputs, list) or not outputs or not all(isinstance(o, dict) for o in outputs):
        raise UserError("the answer is not an Open Inference Protocol inference response (no outputs)")
    integer = [o for o in outputs if str(o.get("datatype", "")).upper() in INTEGER_TYPES]
    floats = [o for o in outputs if str(o.get("datatype", "")).upper() in FLOAT_TYPES]
    integer.sort(key=lambda o: o.get("name") not in LABEL_NAMES)
    if integer:
        labels = _numbers(integer[0], n)
        if not all(float(x).is_integer() and 0 <= x < num_classes for x in labels):
            raise UserError(f"output {integer[0].get('name')!r} holds labels outside 0..{num_classes - 1}")
        return [int(x) for x in labels]
    if floats:
        scores = torch.tensor(_numbers(floats[0], n * num_classes), dtype=torch.float64).view(n, num_classes)
        return scores.argmax(1).tolist()
    kinds = ", ".join(f"{o.get('name')}: {o.get('datatype')}" for o in outputs)
    raise UserError(f"no label or logit output in the answer ({kinds})")


def query_remote_labels(url, model_name, images, num_classes, timeout=30.0, retries=3, batch_size=None,
                        input_name="input-0", datatype="UINT8"):
    """Top-1 labels of the served model for uint8 ``images``, ``batch_size`` per request (None: all at once)."""
    endpoint = infer_url(url, model_name)
    if timeout <= 0 or retries < 0:
        raise UserError("--timeout must be positive and --retries at least 0")
    step = batch_size or len(images)
    labels = []
    for start in range(0, len(images), step):
        batch = images[start:start + step].cpu()
        answer = post_json(endpoint, request_body(batch, input_name, datatype), timeout, retries)
        labels += labels_from_response(answer, len(batch), num_classes)
    return labels
