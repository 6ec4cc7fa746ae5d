"""The ONNX artifact: exported once per module from a tiny resnet8, bound to the checkpoint's weights; the
weights and graph a file really holds are recomputed, so an edited tensor, graph or metadata is evidence."""
import json
import os

import onnx
import pytest
import torch
from onnx import numpy_helper

from fragile.core.cli import UserError
from fragile.core.data import DATASETS
from fragile.core.io import model_sha256
from fragile.deploy import onnx_export
from models import build_classifier


def tiny_checkpoint(dataset="synthetic"):
    spec = DATASETS[dataset]
    torch.manual_seed(0)
    model = build_classifier("resnet8", spec).eval()
    return model, {"arch": "resnet8", "dataset": dataset, "num_classes": spec.num_classes,
                   "input_shape": list(spec.shape), "weights_sha256": model_sha256(model)}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model, meta = tiny_checkpoint()
    path = str(tmp_path_factory.mktemp("onnx") / "tiny.onnx")
    onnx_export.export_onnx(model, meta, path, opset=17)
    return path, model, meta


def evidence_of(proto):
    return onnx_export.onnx_evidence(*_with_bound(proto))


def _with_bound(proto):
    bound = json.loads({p.key: p.value for p in proto.metadata_props}[onnx_export.META_KEY])
    return proto, bound


def test_the_export_records_opset_shapes_and_the_checkpoints_hash_and_recomputes_to_it(exported):
    path, model, meta = exported
    proto, bound = onnx_export.read_onnx(path)
    assert bound["opset"] == 17 and [o.version for o in proto.opset_import if o.domain == ""] == [17]
    assert bound["weights_sha256"] == meta["weights_sha256"] and bound["arch"] == "resnet8"
    assert onnx_export.io_shapes(proto) == ([3, 32, 32], 10)
    evidence = onnx_export.onnx_evidence(proto, bound)
    assert evidence["weights_sha256"] == model_sha256(model)   # recomputed from the file's tensors
    assert evidence["onnx_metadata_hash"] == "matches weights" and evidence["graph"] == "as exported"


def test_an_edited_weight_changes_the_recomputed_hash(exported):
    path, _, meta = exported
    proto = onnx.load(path)
    tensor = proto.graph.initializer[-1]
    edited = numpy_helper.to_array(tensor).copy()
    edited.flat[0] += 1e-3
    tensor.CopyFrom(numpy_helper.from_array(edited, tensor.name))
    evidence = evidence_of(proto)
    assert evidence["weights_sha256"] != meta["weights_sha256"]
    assert evidence["onnx_metadata_hash"] == "differs from weights"


def test_an_edited_graph_with_the_same_weights_differs_from_a_fresh_export(exported):
    path, _, meta = exported
    proto = onnx.load(path)
    node = next(n for n in proto.graph.node if n.op_type == "BatchNormalization")
    next(a for a in node.attribute if a.name == "epsilon").f = 1e-1
    evidence = evidence_of(proto)
    assert evidence["weights_sha256"] == meta["weights_sha256"] and evidence["graph"] == "differs from a fresh export"


def test_an_edited_metadata_hash_is_not_believed(exported):
    path, _, meta = exported
    proto = onnx.load(path)
    entry = next(p for p in proto.metadata_props if p.key == onnx_export.META_KEY)
    entry.value = json.dumps({**json.loads(entry.value), "weights_sha256": "0" * 64})
    evidence = evidence_of(proto)
    assert evidence["weights_sha256"] == meta["weights_sha256"] and evidence["onnx_metadata_hash"] == "differs from weights"


def test_a_file_that_computes_other_logits_than_torch_is_deleted_and_refused(tmp_path, monkeypatch):
    model, meta = tiny_checkpoint()
    path = str(tmp_path / "refused.onnx")
    monkeypatch.setattr(onnx_export, "EXPORT_RTOL", -1.0)   # any difference, even none, is too much
    with pytest.raises(UserError, match="was deleted"):
        onnx_export.export_onnx(model, meta, path)
    assert os.listdir(tmp_path) == []   # nor a temp file left behind


def test_a_file_that_is_not_an_export_of_this_suite_is_one_line(exported, tmp_path):
    garbage, foreign = tmp_path / "garbage.onnx", tmp_path / "foreign.onnx"
    garbage.write_bytes(os.urandom(512))
    proto = onnx.load(exported[0])
    del proto.metadata_props[:]
    onnx.save(proto, str(foreign))
    for path, expected in ((garbage, "not a valid ONNX file"), (foreign, "not exported by this suite"),
                           (tmp_path / "absent.onnx", "not found")):
        with pytest.raises(UserError, match=expected):
            onnx_export.read_onnx(str(path))
