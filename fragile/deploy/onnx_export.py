"""The ONNX artifact: a checkpoint exported as the file a deployment ships, and the weights that file really holds.

Export (``export_onnx``) uses torch's TorchScript-based exporter (``dynamo=False``: it needs no extra package and
runs offline), the batch dimension dynamic and constant folding off, so that every BatchNorm stays a
BatchNormalization node reading the checkpoint's own tensors (folded into the convolutions they would be new
numbers, no longer the checkpoint's). The exporter merges equal tensors into one initializer and names the others
by Identity nodes; every state-dict tensor is thus in the file under its own name, as an initializer or an
Identity alias of one. The BatchNorm counters (``num_batches_tracked``) take no part in inference and are not in
the graph: the metadata records them.

The metadata (``metadata_props["fragile-wm"]``, JSON) binds the file to its checkpoint: the weights hash of the
checkpoint (``fragile.core.io.weights_sha256``, computed from the weights loaded), arch, dataset, input shape,
class count, opset, the torch version that exported it, and the counters. After writing, the file is run in ONNX
Runtime beside torch and refused (deleted) when the two disagree beyond EXPORT_RTOL.

Verification never trusts the stored hash (``onnx_evidence``). It recomputes:
  * the weights hash of the file: the state dict rebuilt from the initializers (by name, through the Identity
    aliases) plus the recorded counters, hashed exactly as a checkpoint is. It equals the trigger set's bound hash
    only if every tensor the graph computes with is the watermarked one (an edited counter can only make it differ);
  * the graph: the arch rebuilt with those weights and exported again must give the file's graph byte for byte
    (an added node, a rewired input, a changed attribute all differ). An export is deterministic for one torch
    version; a file exported by another version is reported as not checked, never as tampered or intact by it.
"""
import hashlib
import io
import json
import os
import warnings

import torch

from ..core.cli import UserError, first_line
from ..core.data import DATASETS
from ..core.io import atomic_write, weights_sha256
from .predictors import onnx_predictor, torch_predictor
from .runtimes import ort_session, require

META_KEY = "fragile-wm"
FORMAT = "fragile-wm-onnx/1"
INPUT_NAME, OUTPUT_NAME = "images", "logits"
DEFAULT_OPSET = 17          # ONNX Runtime and OpenVINO both run it; the legacy exporter supports 7..20
COUNTER = "num_batches_tracked"
# ONNX Runtime and torch sum the same products in another order; in fp32 that moves a logit by a few ulps per
# layer (measured here: ~3e-8 on logits of ~0.15, i.e. 2e-7 relative, for resnet8). 1e-4 of the logit scale
# leaves a factor of ~500 for deeper nets and other CPUs, and is still far below any change of the graph or of a
# weight the export could make (a wrong BatchNorm epsilon, a dropped layer move logits by percents).
EXPORT_RTOL = 1e-4
CHECK_IMAGES = 32           # seeded random uint8 images: they exercise every weight, and need no data set


# ----------------------------------------------------------------------------- export

def counters(model):
    """The BatchNorm counters, by name: in the weights hash, not in the graph."""
    return {name: int(t) for name, t in model.state_dict().items() if name.endswith(COUNTER)}


def _torch_export(model, input_shape, opset):
    """The ONNX bytes torch writes for ``model`` (CPU, fp32), before any metadata is added."""
    buffer = io.BytesIO()
    with warnings.catch_warnings():   # the legacy exporter announces its deprecation on every call
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.zeros(1, *input_shape),), buffer, dynamo=False, opset_version=opset,
                          input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], do_constant_folding=False,
                          dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}})
    return buffer.getvalue()


def export_bytes(model, meta, opset=DEFAULT_OPSET):
    """The ONNX file of a loaded checkpoint (``meta`` as load_classifier returns it), with the binding metadata."""
    onnx = require("onnx")
    model = _cpu_copy(model)
    proto = onnx.load_from_string(_torch_export(model, meta["input_shape"], opset))
    bound = {"format": FORMAT, "weights_sha256": meta["weights_sha256"], "arch": meta["arch"],
             "dataset": meta["dataset"], "num_classes": meta["num_classes"], "input_shape": list(meta["input_shape"]),
             "opset": opset, "exporter": f"torch {torch.__version__}", "counters": counters(model)}
    entry = proto.metadata_props.add()
    entry.key, entry.value = META_KEY, json.dumps(bound)
    return proto.SerializeToString()


def _cpu_copy(model):
    import copy
    return copy.deepcopy(model).float().cpu().eval()


def check_images(input_shape, n=CHECK_IMAGES):
    return torch.randint(0, 256, (n, *input_shape), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))


def export_onnx(model, meta, path, opset=DEFAULT_OPSET):
    """Write the ONNX file atomically, then run the file as written in ONNX Runtime and compare with torch: a file
    that computes something else is deleted and refused. Returns (largest difference, tolerance)."""
    data = export_bytes(model, meta, opset)
    atomic_write(path, lambda f: f.write(data))
    try:
        return check_export(path, model, meta["input_shape"])
    except BaseException:
        os.remove(path)
        raise


def check_export(path, model, input_shape):
    """(largest logit difference, tolerance) between the file in ONNX Runtime and ``model`` in torch."""
    images = check_images(input_shape)
    reference = torch_predictor(_cpu_copy(model))(images)
    logits = onnx_predictor(ort_session(path))(images)
    difference = (logits.double() - reference.double()).abs().max().item()
    tolerance = EXPORT_RTOL * max(1.0, reference.abs().max().item())
    if not difference <= tolerance:
        raise UserError(f"the exported {path} computes other logits than its checkpoint in torch (largest "
                        f"difference {difference:.3g}, tolerance {tolerance:.3g}): the file was deleted")
    return difference, tolerance


# ----------------------------------------------------------------------------- reading a file back

def read_onnx(path):
    """(the ONNX model, its binding metadata): one line for a missing file, a file that is not ONNX, or one this
    suite did not export."""
    onnx = require("onnx")
    if not os.path.isfile(path):
        raise UserError(f"ONNX file not found: {path}")
    try:
        proto = onnx.load(path)
        onnx.checker.check_model(proto)
    except Exception as e:   # protobuf's DecodeError, onnx's ValidationError, ...
        raise UserError(f"{path} is not a valid ONNX file: {first_line(e)[:200]}") from None
    props = {p.key: p.value for p in proto.metadata_props}
    try:
        bound = json.loads(props[META_KEY])
        if bound.get("format") != FORMAT:
            raise ValueError
    except (KeyError, ValueError, AttributeError):
        raise UserError(f"{path} was not exported by this suite (no {FORMAT} metadata): export it with "
                        f"export.py") from None
    if bound.get("dataset") not in DATASETS:
        raise UserError(f"{path}'s metadata names unknown dataset {bound.get('dataset')!r}")
    return proto, bound


def io_shapes(proto):
    """(input shape without the batch, class count) as the graph itself declares them, not its metadata."""
    def dims(value):
        return [d.dim_value if d.HasField("dim_value") else None for d in value.type.tensor_type.shape.dim]
    inputs = [i for i in proto.graph.input if i.name not in {t.name for t in proto.graph.initializer}]
    if len(inputs) != 1 or len(proto.graph.output) != 1:
        raise UserError("the ONNX model must have one input (the images) and one output (the logits), not "
                        f"{len(inputs)} and {len(proto.graph.output)}")
    shape, out = dims(inputs[0]), dims(proto.graph.output[0])
    if len(shape) != 4 or None in shape[1:] or len(out) != 2 or out[1] is None:
        raise UserError(f"the ONNX model takes {shape} and returns {out}: expected (N, C, H, W) images and "
                        f"(N, classes) logits")
    return shape[1:], out[1]


def rebuild_state_dict(proto, bound):
    """The arch's state dict as the file holds it: each tensor from its initializer, found by name or through the
    Identity aliases the exporter made for equal tensors; the counters from the metadata. None for a tensor the file
    does not hold (a file so changed is not the checkpoint's)."""
    from onnx import numpy_helper
    model = _build(bound)
    values = {t.name: t for t in proto.graph.initializer}
    alias = {n.output[0]: n.input[0] for n in proto.graph.node if n.op_type == "Identity" and n.input[0] in values}
    state = {}
    for name, tensor in model.state_dict().items():
        if name.endswith(COUNTER):
            count = bound.get("counters", {}).get(name)
            state[name] = torch.tensor(count, dtype=tensor.dtype) if isinstance(count, int) else None
        else:
            source = values.get(name, values.get(alias.get(name)))
            state[name] = torch.from_numpy(numpy_helper.to_array(source).copy()) if source is not None else None
    return state


def _build(bound):
    from models import ARCHS, build_classifier
    if bound.get("arch") not in ARCHS:
        raise UserError(f"the ONNX file's metadata names unknown arch {bound.get('arch')!r}")
    return build_classifier(bound["arch"], DATASETS[bound["dataset"]])


def file_weights_sha256(state):
    """The weights hash of a rebuilt state dict, or None when a tensor is missing from the file."""
    return None if any(t is None for t in state.values()) else weights_sha256(state)


def graph_check(proto, bound, state):
    """Whether the file's graph is the one the arch exports with these weights, recomputed (see the docstring)."""
    exporter = f"torch {torch.__version__}"
    if bound.get("exporter") != exporter:
        return f"not checked (exported by {bound.get('exporter')}, this is {exporter})"
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    model = _build(bound).eval()
    try:
        model.load_state_dict(state)
        fresh = _torch_export(model, bound["input_shape"], opset)
    except Exception:   # a tensor missing or of another shape: no export of the arch gives this graph
        return "differs from a fresh export"
    onnx = require("onnx")
    same = _graph_digest(onnx.load_from_string(fresh)) == _graph_digest(proto)
    return "as exported" if same else "differs from a fresh export"


def _graph_digest(proto):
    return hashlib.sha256(proto.graph.SerializeToString(deterministic=True)).hexdigest()


def onnx_evidence(proto, bound):
    """What the file's own content says: its weights hash recomputed, the metadata's claim beside it, the graph."""
    state = rebuild_state_dict(proto, bound)
    computed = file_weights_sha256(state)
    return {"weights_sha256": computed,
            "onnx_metadata_hash": ("matches weights" if computed and bound.get("weights_sha256") == computed
                                   else "differs from weights"),
            "graph": graph_check(proto, bound, state),
            "opset": bound.get("opset"), "exporter": bound.get("exporter")}
