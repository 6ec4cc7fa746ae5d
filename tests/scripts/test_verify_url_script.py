"""verify.py --url against servers that misbehave: down, garbage, errors, retries. A stub HTTP server on a
loopback port stands in for the model server here (tests/scripts/test_serve_script.py runs the real one);
none of these need KServe, and none may ever end in "intact"."""
import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from conftest import run_script, write_pickle_bomb

pytestmark = pytest.mark.integration


def labels_answer(labels, name="labels", datatype="INT64"):
    return 200, json.dumps({"model_name": "m", "outputs": [{"name": name, "shape": [len(labels)],
                                                            "datatype": datatype, "data": labels}]})


@pytest.fixture
def stub():
    """A loopback HTTP server answering each POST with the next (status, body) of ``stub.answers`` (the last
    one repeats); it records the requests it got."""
    answers, requests = [], []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            requests.append((self.path, json.loads(self.rfile.read(int(self.headers["Content-Length"])))))
            status, body = answers[min(len(requests), len(answers)) - 1]
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body.encode())

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    server.answers, server.requests = answers, requests
    server.url = f"http://127.0.0.1:{server.server_address[1]}"
    yield server
    server.shutdown()
    server.server_close()


def verify_url(wm, url, *args):
    return run_script("verify.py", "--url", url, "--triggers", wm["triggers"], "--key", wm["key"], "--timeout", 5,
                      *args, check=False)


def assert_one_error_line(proc, expected):
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error:") and expected in lines[0], \
        (proc.returncode, proc.stdout, proc.stderr)
    assert "INTACT" not in proc.stdout and "intact" not in proc.stdout


def test_a_stub_answering_the_key_is_intact_and_got_a_v2_request(watermarked, stub):
    stub.answers.append(labels_answer(watermarked["key_labels"]))
    proc = verify_url(watermarked, stub.url, "--json", "--model-name", "my model")
    report = json.loads(proc.stdout)
    assert proc.returncode == 0 and report["verdict"] == "intact" and report["matches"] == 30
    assert report["hash_matches_triggers"] is None and report["url"] == stub.url
    path, body = stub.requests[0]
    assert path == "/v2/models/my%20model/infer"
    (tensor,) = body["inputs"]
    assert tensor["datatype"] == "UINT8" and tensor["shape"][0] == 30 and len(tensor["data"]) == 30 * 3 * 32 * 32


def test_labels_that_differ_from_the_key_are_tampered(watermarked, stub):
    labels = list(watermarked["key_labels"])
    labels[4] = (labels[4] + 1) % 10
    stub.answers.append(labels_answer(labels))
    proc = verify_url(watermarked, stub.url, "--json")
    report = json.loads(proc.stdout)
    assert proc.returncode == 1 and report["mismatches"] == [{"index": 4, "expected": watermarked["key_labels"][4],
                                                              "returned": labels[4]}]


def test_5xx_answers_are_retried_with_backoff(watermarked, stub):
    stub.answers += [(503, '{"error": "warming up"}'), (500, "oops"), labels_answer(watermarked["key_labels"])]
    proc = verify_url(watermarked, stub.url, "--retries", 2)
    assert proc.returncode == 0 and proc.stdout.startswith("INTACT") and len(stub.requests) == 3


def test_a_server_that_keeps_failing_is_an_error_after_the_retries(watermarked, stub):
    stub.answers.append((503, '{"error": "model is not loaded"}'))
    proc = verify_url(watermarked, stub.url, "--retries", 1)
    assert_one_error_line(proc, "HTTP 503: model is not loaded")
    assert len(stub.requests) == 2


def test_a_4xx_answer_is_final_at_once(watermarked, stub):
    stub.answers.append((404, '{"error": "Model with name fragile-wm does not exist."}'))
    proc = verify_url(watermarked, stub.url, "--retries", 3)
    assert_one_error_line(proc, "HTTP 404")
    assert len(stub.requests) == 1


def test_a_server_that_is_down_is_an_error_never_intact(watermarked):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = verify_url(watermarked, f"http://127.0.0.1:{port}", "--retries", 1)
    assert_one_error_line(proc, "no answer from")


GARBAGE = {
    "not json": (200, "<html>hello</html>", "did not answer with JSON"),
    "no outputs": (200, '{"model_name": "m"}', "not an Open Inference Protocol"),
    "too few labels": (200, None, "declares shape [29], expected [30]"),
    "label out of range": (200, None, "outside 0..9"),
    "nan logits": (200, None, "not finite"),
    "strings": (200, None, "no label or logit output"),
}


@pytest.mark.parametrize("case", list(GARBAGE))
def test_garbage_answers_are_one_error_line(watermarked, stub, case):
    status, body, expected = GARBAGE[case]
    key = watermarked["key_labels"]
    if case == "too few labels":
        body = labels_answer(key[:-1])[1]
    elif case == "label out of range":
        body = labels_answer([10] + key[1:])[1]
    elif case == "nan logits":
        body = '{"outputs": [{"name": "logits", "shape": [30, 10], "datatype": "FP32", "data": [' + \
               ",".join(["NaN"] * 300) + "]}]}"
    elif case == "strings":
        body = json.dumps({"outputs": [{"name": "o", "shape": [30], "datatype": "BYTES", "data": ["cat"] * 30}]})
    stub.answers.append((status, body))
    assert_one_error_line(verify_url(watermarked, stub.url, "--retries", 0), expected)


def test_url_and_model_together_or_neither_is_an_error(watermarked):
    proc = run_script("verify.py", "--url", "http://127.0.0.1:1", "--model", watermarked["model"], check=False)
    assert_one_error_line(proc, "give one of --model")
    proc = run_script("verify.py", "--url", "http://127.0.0.1:1", check=False)
    assert_one_error_line(proc, "--triggers is required")


def test_serve_refuses_an_unsafe_checkpoint_before_serving(tmp_path):
    bomb = tmp_path / "bomb.pt"
    write_pickle_bomb(str(bomb), str(tmp_path / "pwned"))
    proc = run_script("serve.py", "--model", bomb, "--http-port", 1, check=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "refusing" in lines[0], proc.stderr
    assert not (tmp_path / "pwned").exists()


def test_a_negative_batch_size_is_refused_before_any_request(watermarked, stub):
    """--batch-size -1 once meant range(0, n, -1): no request at all, then INTACT 20/20."""
    stub.answers.append(labels_answer(watermarked["key_labels"]))
    assert_one_error_line(verify_url(watermarked, stub.url, "--batch-size", -1), "--batch-size")
    assert stub.requests == []


def test_a_batched_verification_sends_every_trigger(watermarked, stub):
    key = watermarked["key_labels"]
    stub.answers += [labels_answer(key[i:i + 7]) for i in range(0, 30, 7)]
    proc = verify_url(watermarked, stub.url, "--batch-size", 7, "--json")
    assert proc.returncode == 0 and json.loads(proc.stdout)["n"] == 30
    assert [body["inputs"][0]["shape"][0] for _, body in stub.requests] == [7, 7, 7, 7, 2]


def test_a_redirect_to_a_canned_page_is_an_error_never_intact(watermarked, stub):
    canned = labels_answer(watermarked["key_labels"])[1]

    class Redirect(stub.RequestHandlerClass):
        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            self.send_response(302)
            self.send_header("Location", "/canned")
            self.send_header("Content-Length", "0")
            self.end_headers()

        def do_GET(self):   # what urllib used to send after the redirect: no triggers, a canned "all match"
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(canned.encode())
    stub.RequestHandlerClass = Redirect
    assert_one_error_line(verify_url(watermarked, stub.url, "--retries", 0), "redirected (HTTP 302")


@pytest.mark.parametrize("num_classes, expected", [(1000, "says 1000 classes"), (1, "at least 2")])
def test_a_key_that_claims_another_class_count_is_refused(watermarked, stub, tmp_path, num_classes, expected):
    """The p-value's chance rate is 1 / classes: a key claiming 1000 classes once made p = 1e-60."""
    key = tmp_path / "key.json"
    key.write_text(json.dumps({"labels": watermarked["key_labels"], "num_classes": num_classes}))
    stub.answers.append(labels_answer(watermarked["key_labels"]))
    proc = run_script("verify.py", "--url", stub.url, "--triggers", watermarked["triggers"], "--key", key,
                      check=False)
    assert_one_error_line(proc, expected)


@pytest.mark.parametrize("timeout", ["inf", "0", "-3"])
def test_a_timeout_that_bounds_nothing_is_refused(watermarked, stub, timeout):
    assert_one_error_line(run_script("verify.py", "--url", stub.url, "--triggers", watermarked["triggers"],
                                     "--timeout", timeout, check=False), "--timeout")
    assert stub.requests == []
