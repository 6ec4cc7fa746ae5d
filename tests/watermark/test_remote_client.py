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
        labels_from_response({"outputs": [{"name": "labels", "datatype": "INT32", "data": [True, 1]}]}, 2, 3)


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
