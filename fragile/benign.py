"""The benign-change matrix: the untouched model must verify under every harmless change.

Triggers that sit close to a decision boundary are only useful if nothing *harmless* moves them
across it. This module evaluates the untouched model's trigger logits under each change a deployer
may make without touching a weight -- another batch size, thread count, memory format, device,
precision setting, a checkpoint save/load round trip, PNG instead of tensor triggers -- and reports
the largest logit jitter against the reference (all triggers at once, fp32, default threads) and any
label flip. Trigger generation reuses ``measure_jitter`` to calibrate ``delta``, the smallest margin a
trigger may keep: ``delta = safety factor x the largest jitter measured``.

``eval.py --attack benign`` runs the matrix on a deployed trigger set (a record per setting;
``detected`` true means a FALSE ALARM); ``eval.py --attack compare`` runs the whole method comparison
(fragile/comparison.py), which includes this matrix.
"""
import contextlib
import copy
import os
import tempfile

import torch

from .checkpoint_io import load_classifier, save_classifier
from .cli import UserError
from .devices import tf32
from .envelope import DEFAULT_ENVELOPE, PRECISIONS, CastModel, resolve_envelope
from .training import predict_logits
from .verification import query_labels

DEFAULT_BATCH_SIZES = (1, 16)     # compared with "all triggers at once"
DEFAULT_SAFETY_FACTOR = 10.0      # delta = this x the largest benign jitter measured
# An fp32 logit of magnitude L cannot be trusted below a few ulps of L: the floor for the jitter when the
# measured jitter happens to be 0 (a deterministic CPU where every setting hits the same kernels).
ULP_FLOOR_FACTOR = 4


# ----------------------------------------------------------------------------- the settings

@contextlib.contextmanager
def torch_threads(n):
    """Run a block with ``n`` intra-op threads, restoring the previous count afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def reference_logits(model, images):
    """The logits every setting is compared with: all images at once, fp32, no TF32, default threads."""
    with tf32(False):
        return predict_logits(model, images, max(1, len(images))).cpu()


def channels_last_copy(model):
    return copy.deepcopy(model).to(memory_format=torch.channels_last)


def benign_settings(model, images, batch_sizes=DEFAULT_BATCH_SIZES, model_meta=None, alternatives=None,
                    envelope=DEFAULT_ENVELOPE):
    """(name, kind, entry, thunk) for every harmless change of the ``envelope`` that applies here; each thunk
    returns CPU fp32 logits, and ``entry`` names the envelope entry the setting belongs to.

    ``kind`` is "protocol" for changes the verifier must tolerate, or "raw-tf32" for TF32 logits that
    the verifier never sees (query_labels pins fp32) but that are worth reporting.
    ``alternatives`` maps a name to other uint8 images of the same triggers (e.g. the tensor file
    beside the PNGs); they must give the reference logits too. The checkpoint round trip and the
    alternatives are in every envelope: they must be bit-exact whatever the deployment.
    """
    entries = set(resolve_envelope(envelope))
    device = next(model.parameters()).device
    n = max(1, len(images))
    settings = []
    if "batch" in entries:
        settings += [(f"batch size {bs}", "protocol", "batch", lambda bs=bs: _logits(model, images, bs))
                     for bs in batch_sizes if bs < n]
    many = os.cpu_count() or 1
    if "threads" in entries:
        settings.append(("1 thread", "protocol", "threads", lambda: _with_threads(1, model, images, n)))
        if many > 1:
            settings.append((f"{many} threads", "protocol", "threads", lambda: _with_threads(many, model, images, n)))
    if "channels_last" in entries:
        settings.append(("channels_last", "protocol", "channels_last",
                         lambda: _logits(channels_last_copy(model), images, n)))
    if model_meta is not None:
        settings.append(("checkpoint round trip", "protocol", "exact",
                         lambda: _logits(_round_trip(model, model_meta), images, n)))
    for name, other in (alternatives or {}).items():
        settings.append((name, "protocol", "exact", lambda other=other: _logits(model, other.to(device), n)))
    if "cuda" in entries:
        settings.extend(_cross_device_settings(model, images, n))
    for precision in PRECISIONS:
        if precision in entries:
            settings.extend(_precision_settings(model, images, precision, batch_sizes if "batch" in entries else (),
                                                "cuda" in entries))
    return settings


def _logits(model, images, batch_size):
    with tf32(False):
        return predict_logits(model, images, batch_size).cpu()


def _with_threads(threads, model, images, batch_size):
    with torch_threads(threads):
        return _logits(model, images, batch_size)


def _round_trip(model, model_meta):
    device = next(model.parameters()).device
    with tempfile.TemporaryDirectory(prefix="fragile-benign-") as folder:
        path = os.path.join(folder, "round_trip.pt")
        save_classifier(path, model, model_meta)
        loaded, _ = load_classifier(path, device)
    return loaded


def _cross_device_settings(model, images, n):
    """CPU vs GPU, TF32 and channels_last on the GPU: only when a GPU is present."""
    if not torch.cuda.is_available():
        return []
    device = next(model.parameters()).device
    other = torch.device("cpu") if device.type == "cuda" else torch.device("cuda")
    gpu_model = model if device.type == "cuda" else copy.deepcopy(model).to("cuda")
    settings = [(f"on {other.type}", "protocol", "cuda",
                 lambda: _logits(copy.deepcopy(model).to(other), images.to(other), n)),
                ("gpu channels_last", "protocol", "cuda", lambda: _logits(channels_last_copy(gpu_model), images.cuda(), n))]

    def tf32_logits():
        with tf32(True):
            return predict_logits(gpu_model, images.cuda(), n).cpu()
    settings.append(("gpu tf32 (raw, never used by the verifier)", "raw-tf32", "cuda", tf32_logits))
    return settings


def _precision_settings(model, images, precision, batch_sizes, with_gpu):
    """fp16 or bf16 inference, all triggers at once and at each of ``batch_sizes``, on the model's device and,
    with ``with_gpu`` and a GPU present, on the other device too."""
    device, n = next(model.parameters()).device, max(1, len(images))
    devices = [device]
    if with_gpu and torch.cuda.is_available():
        devices.append(torch.device("cpu") if device.type == "cuda" else torch.device("cuda"))
    settings = []
    for target in devices:
        where = "" if target == device else f" on {target.type}"
        for bs in (n, *[b for b in batch_sizes if b < n]):
            label = f"{precision}{where}" + ("" if bs == n else f", batch size {bs}")
            settings.append((label, "protocol", precision,
                             lambda target=target, bs=bs: _logits(CastModel(model, PRECISIONS[precision]).to(target),
                                                                  images.to(target), bs)))
    return settings


# ----------------------------------------------------------------------------- jitter and delta

def max_abs_jitter(logits, reference):
    return (logits.double() - reference.double()).abs().max().item() if len(reference) else 0.0


def measure_jitter(model, images, batch_sizes=DEFAULT_BATCH_SIZES, model_meta=None, envelope=DEFAULT_ENVELOPE):
    """The largest logit difference from the reference under each protocol setting of ``envelope``, on ``images``.

    Returns {"per_setting": {name: jitter}, "per_entry": {envelope entry: largest}, "max": largest,
    "logit_scale": largest |logit|, "envelope": the resolved entries}. Used by trigger generation (on its
    starting images: delta is calibrated on the largest jitter of the whole envelope) and by the benign
    matrix (on the deployed triggers).
    """
    reference = reference_logits(model, images)
    per_setting, per_entry = {}, {}
    for name, kind, entry, thunk in benign_settings(model, images, batch_sizes, model_meta, envelope=envelope):
        if kind == "protocol":
            per_setting[name] = max_abs_jitter(thunk(), reference)
            per_entry[entry] = max(per_entry.get(entry, 0.0), per_setting[name])
    return {"per_setting": per_setting, "per_entry": per_entry, "max": max(per_setting.values(), default=0.0),
            "logit_scale": reference.abs().max().item() if len(reference) else 0.0,
            "envelope": list(resolve_envelope(envelope))}


def calibrate_delta(jitter, safety_factor=DEFAULT_SAFETY_FACTOR):
    """delta = safety factor x max(measured jitter, a few fp32 ulps of the largest logit)."""
    if safety_factor < 1:
        raise UserError(f"the delta safety factor must be at least 1 (got {safety_factor})")
    ulp_floor = ULP_FLOOR_FACTOR * torch.finfo(torch.float32).eps * max(1.0, jitter["logit_scale"])
    return safety_factor * max(jitter["max"], ulp_floor)


# ----------------------------------------------------------------------------- the matrix on a trigger set

def top2_margins(logits):
    top2 = logits.topk(2, dim=1).values
    return top2[:, 0] - top2[:, 1]


def benign_records(model, triggers, key, batch_sizes=DEFAULT_BATCH_SIZES, model_meta=None, alternatives=None,
                   max_mismatches=0, envelope=DEFAULT_ENVELOPE):
    """One record per setting of ``envelope``: label flips against the key (``detected``: a false alarm), the
    largest logit jitter against the reference, and the smallest top-1 margin in that setting."""
    key = torch.as_tensor(key).cpu()
    reference = reference_logits(model, triggers)
    records = [_record("reference (all at once, fp32)", "protocol", "exact", reference, reference, key,
                       max_mismatches)]
    for name, kind, entry, thunk in benign_settings(model, triggers, batch_sizes, model_meta, alternatives, envelope):
        records.append(_record(name, kind, entry, thunk(), reference, key, max_mismatches))
    if "cuda" in resolve_envelope(envelope):  # the verifier itself, asked to verify while the deployer left TF32 on
        with tf32(True):
            labels = query_labels(model, triggers)
        records.append(_label_record("verifier with TF32 requested", labels, key, max_mismatches))
    return records


def _record(setting, kind, entry, logits, reference, key, max_mismatches):
    labels = logits.argmax(1)
    flipped = int((labels != key).sum())
    raw = kind != "protocol"
    return {"setting": setting, "kind": kind, "envelope_entry": entry, "flipped": flipped,
            "match_rate": 1 - flipped / len(key),
            # a raw TF32 row is information, not a verdict: the verifier never computes in TF32
            "detected": (flipped > max_mismatches) and not raw,
            "max_logit_jitter": max_abs_jitter(logits, reference),
            "label_changes_vs_reference": int((labels != reference.argmax(1)).sum()),
            "min_margin": top2_margins(logits).min().item()}


def _label_record(setting, labels, key, max_mismatches):
    flipped = int((labels.cpu() != key).sum())
    return {"setting": setting, "kind": "protocol", "envelope_entry": "cuda", "flipped": flipped,
            "match_rate": 1 - flipped / len(key), "detected": flipped > max_mismatches, "max_logit_jitter": 0.0, "label_changes_vs_reference": None,
            "min_margin": None}


def summarize_benign(records):
    """False alarms and the largest jitter over the settings the verifier must tolerate, in all and per
    envelope entry (``per_entry``: {entry: {"false_alarms", "settings", "max_logit_jitter"}})."""
    protocol = [r for r in records if r["kind"] == "protocol"]
    per_entry = {}
    for r in protocol:
        entry = per_entry.setdefault(r.get("envelope_entry", "exact"),
                                     {"false_alarms": 0, "settings": 0, "max_logit_jitter": 0.0})
        entry["false_alarms"] += int(r["detected"])
        entry["settings"] += 1
        entry["max_logit_jitter"] = max(entry["max_logit_jitter"], r["max_logit_jitter"])
    return {"false_alarms": sum(r["detected"] for r in protocol),
            "settings": len(protocol),
            "max_logit_jitter": max((r["max_logit_jitter"] for r in protocol), default=0.0),
            "label_flips": sum(r["flipped"] > 0 for r in protocol), "per_entry": per_entry}


# ----------------------------------------------------------------------------- eval.py --attack benign

def trigger_files(config):
    """(triggers.pt path or None, trigger metadata) of the trigger set eval.py loaded, by eval.py's own rule:
    --triggers if given, else <checkpoint stem>_triggers_<method>."""
    from .checkpoint_io import default_checkpoint_path
    from .triggers import default_paths, load_triggers, read_json
    model_path = config.get("MODEL") or default_checkpoint_path(config.get("ARCH", ""), config.get("DATASET", ""))
    path = config.get("TRIGGERS") or default_paths(model_path, config.get("METHOD", "paper"))[0]
    if os.path.isfile(path):
        return path, load_triggers(path)[1]
    folder = path if os.path.isdir(os.path.join(path, "png")) else os.path.dirname(os.path.abspath(path))
    pt = os.path.join(folder, "triggers.pt")
    meta_path = os.path.join(folder, "meta.json")
    meta = read_json(meta_path, "trigger metadata") if os.path.exists(meta_path) else {}
    return (pt if os.path.exists(pt) else None), meta


def tensor_alternative(ctx, pt_path):
    """The triggers.pt images beside the PNGs eval.py read, as an alternative input of the same triggers."""
    from .triggers import load_triggers
    if pt_path is None:
        return {}
    images, _ = load_triggers(pt_path)
    if images.shape != ctx.triggers.shape:
        raise UserError(f"{pt_path} holds {tuple(images.shape)} triggers but {tuple(ctx.triggers.shape)} were loaded")
    return {"tensor triggers (triggers.pt) vs PNG": images}


def model_meta_of(ctx):
    """What save_classifier needs for the round trip: the checkpoint's own metadata."""
    from .checkpoint_io import default_checkpoint_path, read_checkpoint
    cfg = ctx.config
    path = cfg.get("MODEL") or default_checkpoint_path(cfg.get("ARCH", ""), cfg.get("DATASET", ""))
    return read_checkpoint(path)["meta"] if os.path.exists(path) else None


def benign_run_records(ctx):
    """The matrix on eval.py's context: records plus the trigger metadata (for delta and PSNR)."""
    pt_path, meta = trigger_files(ctx.config)
    batch_sizes = ctx.config.get("BENIGN_BATCH_SIZES") or DEFAULT_BATCH_SIZES
    envelope = matrix_envelope(ctx, meta)
    records = benign_records(ctx.model, ctx.triggers, ctx.key, batch_sizes, model_meta_of(ctx),
                             tensor_alternative(ctx, pt_path), ctx.config.get("MAX_MISMATCHES", 0), envelope)
    return records, meta


def matrix_envelope(ctx, meta):
    """eval.py --envelope if given, else the envelope the triggers were calibrated for (recorded in their
    metadata), else ``exact``. A recorded ``cuda`` entry is left out, with a note, where there is no GPU."""
    requested = ctx.config.get("ENVELOPE") or meta.get("envelope") or list(DEFAULT_ENVELOPE)
    envelope = resolve_envelope(requested, strict=False)
    if "cuda" in requested and "cuda" not in envelope:
        ctx.log("  envelope entry cuda: not measured, no GPU here")
    return envelope


def run_benign(ctx, seed):
    """eval.py --attack benign: the untouched model under every harmless change; nothing is tampered."""
    records, meta = benign_run_records(ctx)
    summary = summarize_benign(records)
    for r in records:
        ctx.log(f"  {r['setting']:<45} flipped {r['flipped']:>3}  jitter {r['max_logit_jitter']:.2e}"
                + ("  FALSE ALARM" if r["detected"] else ""))
    for entry, s in summary["per_entry"].items():
        ctx.log(f"  envelope entry {entry:<14} {s['false_alarms']} false alarms in {s['settings']} settings, "
                f"largest jitter {s['max_logit_jitter']:.2e}")
    delta = meta.get("delta")
    ctx.log(f"  {summary['false_alarms']} false alarms in {summary['settings']} settings; largest jitter "
            f"{summary['max_logit_jitter']:.2e}" + (f", delta used at generation {delta:.2e}" if delta else ""))
    return {"seed": seed, "records": records, **summary, "delta": delta}, None


def run_compare(ctx, seed):
    from .comparison import run_comparison  # lazy: comparison.py builds on this module
    return run_comparison(ctx, seed)


BENIGN_ATTACKS = {"benign": run_benign, "compare": run_compare}
