"""The Open Inference Protocol client of verify.py --url: requests it sends and answers it accepts."""
import pytest

from fragile.core.cli import UserError
from fragile.watermark.remote import infer_url, labels_from_response, request_body


def test_labels_from_response_reads_labels_or_argmax_of_logits():
    logits = [[0.1, 0.9, 0.0], [2.0, -1.0, 1.5]]
    answer = {"outputs": [{"name": "logits", "datatype": "FP32", "shape": [2, 3], "data": logits}]}
    assert labels_from_response(answer, 2, 3) == [1, 0]  # nested row-major data, argmax per row
    answer["outputs"].append({"name": "labels", "datatype": "INT64", "shape": [2], "data": [2, 2]})
    assert labels_from_response(answer, 2, 3) == [2, 2]  # a label output wins over logits
    with pytest.raises(UserError, match="expected 6"):
        labels_from_response({"outputs": [dict(answer["outputs"][0], data=[1.0] * 5)]}, 2, 3)
    with pytest.raises(UserError, match="not finite"):
        labels_from_response({"outputs": [{"name": "labels", "datatype": "INT32", "shape": [2], "data": [True, 1]}]},
                             2, 3)


def test_request_body_and_endpoint():
    import torch
    images = torch.tensor([[[[0, 255]]]], dtype=torch.uint8)
    assert request_body(images)["inputs"][0] == {"name": "input-0", "shape": [1, 1, 1, 2], "datatype": "UINT8",
                                                 "data": [0, 255]}
    assert request_body(images, datatype="FP32")["inputs"][0]["data"] == [0.0, 1.0]
    assert infer_url("http://h:1/", "m") == "http://h:1/v2/models/m/infer"
    assert infer_url("http://h:1/v2/models/x", "m") == "http://h:1/v2/models/x/infer"
    with pytest.raises(UserError, match="http"):
        infer_url("ftp://h/", "m")


def test_declared_shapes_must_be_this_models():
    """A [40, 5] FP32 output is not 20 x 10 logits; labels must be [N] or [N, 1]; a shape must be declared."""
    scores = {"name": "logits", "datatype": "FP32", "shape": [40, 5], "data": [0.0] * 200}
    with pytest.raises(UserError, match=r"declares shape \[40, 5\], expected \[20, 10\]"):
        labels_from_response({"outputs": [scores]}, 20, 10)
    labels = {"name": "labels", "datatype": "INT64", "shape": [2, 10], "data": [0] * 20}
    with pytest.raises(UserError, match="declares shape"):
        labels_from_response({"outputs": [labels]}, 20, 10)
    with pytest.raises(UserError, match="declares no valid shape"):
        labels_from_response({"outputs": [{"name": "labels", "datatype": "INT64", "data": [0] * 20}]}, 20, 10)
    assert labels_from_response({"outputs": [dict(labels, shape=[20, 1])]}, 20, 10) == [0] * 20


def test_logits_for_another_number_of_classes_are_refused_even_beside_labels():
    answer = {"outputs": [{"name": "labels", "datatype": "INT64", "shape": [2], "data": [1, 1]},
                          {"name": "logits", "datatype": "FP32", "shape": [2, 1000], "data": [0.0] * 2000}]}
    with pytest.raises(UserError, match=r"expected \[2, 10\]"):
        labels_from_response(answer, 2, 10)


def test_deeply_nested_data_is_refused_not_a_recursion_error():
    nested = [0]
    for _ in range(50_000):
        nested = [nested]
    with pytest.raises(UserError, match="holds no list"):
        labels_from_response({"outputs": [{"name": "labels", "datatype": "INT64", "shape": [1],
                                           "data": nested}]}, 1, 10)


# ----------------------------------------------------------------------------- the HTTP exchange

@pytest.fixture
def raw_server():
    """A loopback TCP server running ``raw_server.handler(connection)`` for each connection."""
    import socket
    import threading
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    state = {"handler": None, "stop": False}

    def loop():
        while not state["stop"]:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=state["handler"], args=(conn,), daemon=True).start()
    threading.Thread(target=loop, daemon=True).start()
    state["url"] = f"http://127.0.0.1:{listener.getsockname()[1]}/v2/models/m/infer"
    yield state
    state["stop"] = True
    listener.close()


def read_request(conn):
    data = b""
    while b"\r\n\r\n" not in data:
        data += conn.recv(65536)
    head, body = data.split(b"\r\n\r\n", 1)
    length = int([line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")][0])
    while len(body) < length:
        body += conn.recv(65536)
    return head


def test_a_redirect_is_refused_never_followed(raw_server):
    """urllib would follow a 303 with a GET that carries no triggers, and a canned page would read as intact."""
    from fragile.watermark.remote import post_json

    def redirect(conn):
        read_request(conn)
        conn.sendall(b"HTTP/1.1 303 See Other\r\nLocation: http://127.0.0.1:1/canned\r\nContent-Length: 0\r\n\r\n")
        conn.close()
    raw_server["handler"] = redirect
    with pytest.raises(UserError, match=r"redirected \(HTTP 303 to http://127.0.0.1:1/canned\)"):
        post_json(raw_server["url"], {"inputs": []}, timeout=5, retries=0)


def test_timeout_bounds_the_whole_request_not_each_read(raw_server):
    """A server that answers one byte every 0.2 s: each read is quick, the request never ends; --timeout 1 cuts it
    off after about a second (the old per-read bound waited for all of it)."""
    import time
    from fragile.watermark.remote import post_json

    def drip(conn):
        read_request(conn)
        try:
            for byte in b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n" + b" " * 100000:
                conn.sendall(bytes([byte]))
                time.sleep(0.2)
        except OSError:
            pass
    raw_server["handler"] = drip
    started = time.monotonic()
    with pytest.raises(UserError, match="within --timeout 1 s"):
        post_json(raw_server["url"], {"inputs": []}, timeout=1, retries=0)
    assert time.monotonic() - started < 30   # the drip alone would take hours


def test_request_and_retry_settings_are_checked_before_any_request():
    import torch
    from fragile.watermark.remote import query_remote_labels
    images = torch.zeros(2, 1, 1, 1, dtype=torch.uint8)
    for kwargs, expected in ((dict(timeout=float("inf")), "--timeout"), (dict(timeout=0), "--timeout"),
                             (dict(retries=-1), "--retries"), (dict(batch_size=-1), "--batch-size")):
        with pytest.raises(UserError, match=expected):
            query_remote_labels("http://127.0.0.1:1", "m", images, 10, **kwargs)
