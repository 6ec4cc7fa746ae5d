"""Query a served model over the Open Inference Protocol (the KServe v2 REST API spoken by KServe, Triton,
MLServer and TorchServe): the owner sees only what the API returns.

    POST {url}/v2/models/{name}/infer
    {"inputs": [{"name": "input-0", "shape": [N, C, H, W], "datatype": "UINT8", "data": [...]}]}

The 8-bit triggers go out as UINT8 (or as FP32 in [0, 1] for servers that only take floats). Labels come
back from an integer output of N values, or from a float output of N x classes values (logits or
probabilities; argmax taken). Anything else is refused with one clear line: a verifier that cannot read
the answer must never conclude "intact". Each request is bounded as a whole by ``--timeout`` and redirects are
refused, never followed. Standard library only (http.client), so verification needs nothing beyond
requirements.txt.
"""
import http.client
import json
import math
import socket
import threading
import time
import urllib.parse

import torch

from ..core.cli import UserError, check_range

INTEGER_TYPES = {"INT8", "INT16", "INT32", "INT64", "UINT8", "UINT16", "UINT32", "UINT64"}
FLOAT_TYPES = {"FP16", "FP32", "FP64", "BF16"}
# Names a server may give its label output; any other integer output of the right size is used too.
LABEL_NAMES = ("labels", "label", "predictions", "prediction", "class", "classes")
MAX_RESPONSE_BYTES = 64 << 20   # a misbehaving server must not exhaust the verifier's memory
BACKOFF_S = 0.5                 # first pause before a retry; doubles each time
MAX_TIMEOUT_S = 3600.0          # --timeout: a whole request, at most an hour
MAX_RETRIES = 20


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


def _open(parsed, timeout):
    """An HTTP(S) connection to the URL's host; ``timeout`` bounds the connect and every socket read."""
    if parsed.scheme == "https":
        import ssl
        return http.client.HTTPSConnection(parsed.hostname, parsed.port, timeout=timeout,
                                           context=ssl.create_default_context())
    return http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=timeout)


def _exchange(url, data, timeout):
    """One POST, bounded as a whole by ``timeout`` seconds (not per socket read: a server that drips one byte at a
    time is cut off at the deadline). Returns (status, Location header, body). Redirects are never followed: urllib turns a
    redirected POST into a GET that sends no triggers, so a redirect is reported instead."""
    parsed = urllib.parse.urlparse(url)
    path = parsed.path + (f"?{parsed.query}" if parsed.query else "")
    conn = _open(parsed, timeout)
    expired = threading.Event()

    def cut_off():   # at the deadline: shut the socket, which ends whatever read is blocking
        expired.set()
        if conn.sock is not None:
            try:
                conn.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
    timer = threading.Timer(timeout, cut_off)
    timer.daemon = True
    timer.start()
    try:
        conn.request("POST", path or "/", body=data, headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        body = response.read(MAX_RESPONSE_BYTES + 1)
        return response.status, response.getheader("Location"), body
    except (OSError, http.client.HTTPException) as e:
        if expired.is_set():
            raise TimeoutError(f"no complete answer within --timeout {timeout:g} s") from None
        raise e
    finally:
        timer.cancel()
        conn.close()


def post_json(url, body, timeout, retries, sleep=time.sleep):
    """POST ``body`` as JSON; the decoded answer. Connection errors, timeouts and 5xx answers are retried
    ``retries`` times with exponential backoff; a 4xx answer (bad name, bad request) and a redirect are final."""
    data = json.dumps(body).encode()
    for attempt in range(retries + 1):
        try:
            status, location, raw = _exchange(url, data, timeout)
        except (OSError, http.client.HTTPException) as e:   # refused, reset, timed out (TimeoutError is an OSError)
            if attempt < retries:
                sleep(BACKOFF_S * 2 ** attempt)
                continue
            reason = getattr(e, "strerror", None) or str(e) or type(e).__name__
            raise UserError(f"no answer from {url} after {retries + 1} attempt(s): {reason}") from None
        if 300 <= status < 400:
            raise UserError(f"the server at {url} redirected (HTTP {status} to {location or 'nowhere'}): verification "
                            f"never follows redirects (a redirected POST arrives as a GET without the triggers); pass "
                            f"the final address with --url") from None
        if status >= 500 and attempt < retries:
            sleep(BACKOFF_S * 2 ** attempt)
            continue
        if status >= 400 or status < 200:
            raise UserError(f"the server at {url} answered HTTP {status}: {_error_text(raw, status)}") from None
        break
    if len(raw) > MAX_RESPONSE_BYTES:
        raise UserError(f"the server at {url} sent more than {MAX_RESPONSE_BYTES >> 20} MiB: not an inference answer")
    try:
        return json.loads(raw)
    except (ValueError, RecursionError):
        raise UserError(f"the server at {url} did not answer with JSON (starts {raw[:40]!r})") from None


def _error_text(raw, status):
    """The server's own error message, on one short line."""
    text = raw[:2000].decode(errors="replace")
    try:
        text = json.loads(text).get("error", text) if text.strip().startswith("{") else text
    except (ValueError, AttributeError, RecursionError):
        pass
    return " ".join(str(text or http.client.responses.get(status, "")).split())[:200]


def _flatten(data, limit):
    """v2 allows the data of a tensor flattened or nested row-major: always a flat list here (None if it is
    neither, or holds more than ``limit`` values). Iterative, so a deeply nested answer cannot exhaust the stack."""
    if not isinstance(data, list):
        return None
    flat, stack = [], [iter(data)]
    while stack:
        item = next(stack[-1], StopIteration)
        if item is StopIteration:
            stack.pop()
        elif isinstance(item, list):
            if len(stack) > 8:
                return None
            stack.append(iter(item))
        else:
            flat.append(item)
            if len(flat) > limit:
                return None
    return flat


def _declared_shape(output):
    shape = output.get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                              for d in shape):
        raise UserError(f"output {output.get('name')!r} declares no valid shape ({shape!r})")
    return shape


def _numbers(output, count, shapes):
    """The output's ``count`` values, refused unless its declared shape is one of ``shapes`` and its data holds
    exactly that many finite numbers."""
    shape = _declared_shape(output)
    if shape not in shapes:
        raise UserError(f"output {output.get('name')!r} declares shape {shape}, expected "
                        f"{' or '.join(map(str, shapes))}")
    data = _flatten(output.get("data"), count)
    if data is None:
        raise UserError(f"output {output.get('name')!r} holds no list of {count} values")
    if len(data) != count:
        raise UserError(f"output {output.get('name')!r} holds {len(data)} values, expected {count}")
    if not all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in data):
        raise UserError(f"output {output.get('name')!r} holds values that are not finite numbers")
    return data


def labels_from_response(payload, n, num_classes):
    """The N top-1 labels in a v2 inference response: a label output if there is one, else argmax of logits. The
    declared shapes are checked ([N] or [N, 1] labels, [N, classes] logits): a server answering for another
    number of classes cannot pass for this model."""
    outputs = payload.get("outputs") if isinstance(payload, dict) else None
    if not isinstance(outputs, list) or not outputs or not all(isinstance(o, dict) for o in outputs):
        raise UserError("the answer is not an Open Inference Protocol inference response (no outputs)")
    integer = [o for o in outputs if str(o.get("datatype", "")).upper() in INTEGER_TYPES]
    floats = [o for o in outputs if str(o.get("datatype", "")).upper() in FLOAT_TYPES]
    integer.sort(key=lambda o: o.get("name") not in LABEL_NAMES)
    if floats:   # logits, when sent, must be this model's: N rows of exactly num_classes scores
        scores = _numbers(floats[0], n * num_classes, [[n, num_classes]])
    if integer:
        labels = _numbers(integer[0], n, [[n], [n, 1]])
        if not all(float(x).is_integer() and 0 <= x < num_classes for x in labels):
            raise UserError(f"output {integer[0].get('name')!r} holds labels outside 0..{num_classes - 1}")
        return [int(x) for x in labels]
    if floats:
        return torch.tensor(scores, dtype=torch.float64).view(n, num_classes).argmax(1).tolist()
    kinds = ", ".join(f"{o.get('name')}: {o.get('datatype')}" for o in outputs)
    raise UserError(f"no label or logit output in the answer ({kinds})")


def query_remote_labels(url, model_name, images, num_classes, timeout=30.0, retries=3, batch_size=None,
                        input_name="input-0", datatype="UINT8"):
    """Top-1 labels of the served model for uint8 ``images``, ``batch_size`` per request (None: all at once)."""
    endpoint = infer_url(url, model_name)
    check_range("--timeout", timeout, 0, MAX_TIMEOUT_S, low_open=True)
    check_range("--retries", retries, 0, MAX_RETRIES)
    check_range("--batch-size", batch_size or 0, 0)
    step = batch_size or len(images)
    labels = []
    for start in range(0, len(images), step):
        batch = images[start:start + step].cpu()
        answer = post_json(endpoint, request_body(batch, input_name, datatype), timeout, retries)
        labels += labels_from_response(answer, len(batch), num_classes)
    if len(labels) != len(images):   # never a verdict on fewer answers than triggers
        raise UserError(f"the server answered {len(labels)} labels for {len(images)} triggers")
    return labels
