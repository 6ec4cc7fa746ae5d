"""The benign-change matrix, an experiment (it tampers with nothing): the untouched model must verify under
every harmless change.

``eval.py --attack benign`` runs, on a deployed trigger set, every setting of the deployment envelope
(fragile.watermark.jitter), or every harmless change within each named deployment (fragile.deploy.arithmetic:
``--deployment NAME``, or the deployments the triggers were calibrated in), and records per setting the label
flips against the key (``detected`` true means a FALSE ALARM), the largest logit jitter against the reference
and the smallest top-1 margin.
"""
from dataclasses import dataclass, field

import torch

from ..core.cli import UserError
from ..core.devices import tf32
from ..deploy.arithmetic import arithmetic, within_settings
from ..watermark.jitter import (DEFAULT_BATCH_SIZES, DEFAULT_ENVELOPE, ENVELOPE_ENTRIES, benign_settings,
                                max_abs_jitter, reference_logits, resolve_envelope)
from ..watermark.trigger_io import load_triggers
from ..watermark.queries import query_labels, top2_margins
from . import records


# ----------------------------------------------------------------------------- the matrix on a trigger set

def benign_records(model, triggers, key, batch_sizes=DEFAULT_BATCH_SIZES, model_meta=None, alternatives=None,
                   max_mismatches=0, envelope=DEFAULT_ENVELOPE):
    """One record per setting of ``envelope``: label flips against the key (``detected``: a false alarm), the
    largest logit jitter against the reference, and the smallest top-1 margin in that setting."""
    key = torch.as_tensor(key).cpu()
    reference = reference_logits(model, triggers)
    matrix = [_record("reference (all at once, fp32)", "protocol", "exact", reference, reference, key, max_mismatches)]
    for name, kind, entry, thunk in benign_settings(model, triggers, batch_sizes, model_meta, alternatives, envelope):
        matrix.append(_record(name, kind, entry, thunk(), reference, key, max_mismatches))
    if "cuda" in resolve_envelope(envelope):  # the verifier itself, asked to verify while the deployer left TF32 on
        with tf32(True):
            labels = query_labels(model, triggers)
        matrix.append(_label_record("verifier with TF32 requested", labels, key, max_mismatches))
    return matrix


def _record(setting, kind, entry, logits, reference, key, max_mismatches):
    labels = logits.argmax(1)
    state = records.verdict(int((labels != key).sum()), len(key), max_mismatches)
    if kind != "protocol":   # a raw TF32 row is information, not a verdict: the verifier never computes in TF32
        state.update(detected=False, detection_probability=0.0)
    return records.benign_record(setting, kind, entry, state, max_logit_jitter=max_abs_jitter(logits, reference),
                                 label_changes_vs_reference=int((labels != reference.argmax(1)).sum()),
                                 min_margin=top2_margins(logits).min().item())


def _label_record(setting, labels, key, max_mismatches):
    state = records.verdict(int((labels.cpu() != key).sum()), len(key), max_mismatches)
    return records.benign_record(setting, "protocol", "cuda", state, max_logit_jitter=0.0,
                                 label_changes_vs_reference=None, min_margin=None)


def summarize_benign(matrix):
    """False alarms and the largest jitter over the settings the verifier must tolerate, in all and per
    envelope entry (``per_entry``: {entry: {"false_alarms", "settings", "max_logit_jitter"}})."""
    protocol = [r for r in matrix if r["kind"] == "protocol"]
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

@dataclass(frozen=True)
class BenignParams:
    batch_sizes: list = field(default_factory=lambda: [1, 16])   # compared with all triggers at once
    envelope: list = field(default_factory=list)   # settings covered; empty: the triggers' own envelope
    deployment: str = ""   # run within this named deployment instead (empty: within those the triggers were
                           # calibrated in, if any and no envelope is given)


def tensor_alternative(ctx):
    """The triggers.pt images beside the PNGs eval.py read, as an alternative input of the same triggers."""
    tensor_file, triggers = ctx.deployment.tensor_file, ctx.probe.triggers
    if tensor_file is None:
        return {}
    images, _ = load_triggers(tensor_file)
    if images.shape != triggers.shape:
        raise UserError(f"{tensor_file} holds {tuple(images.shape)} triggers but {tuple(triggers.shape)} "
                        f"were loaded")
    return {"tensor triggers (triggers.pt) vs PNG": images}


def matrix_envelope(ctx, p):
    """``p.envelope`` if given, else the envelope the triggers were calibrated for (recorded in their metadata),
    else ``exact``. A recorded ``cuda`` entry is left out, with a note, where there is no GPU."""
    requested = p.envelope or ctx.deployment.trigger_meta.get("envelope") or list(DEFAULT_ENVELOPE)
    envelope = resolve_envelope(requested, strict=False)
    if "cuda" in requested and "cuda" not in envelope:
        ctx.log("  envelope entry cuda: not measured, no GPU here")
    return envelope


def matrix_deployments(ctx, p):
    """The named deployments the matrix runs within: ``p.deployment``, else (unless an envelope was asked for) the
    deployments the triggers were calibrated in (generate_samples.py --deploy); none: the envelope matrix."""
    if p.deployment or p.envelope:
        return [p.deployment] if p.deployment else []
    return list(ctx.deployment.trigger_meta.get("deployments") or [])


def deployment_records(model, triggers, key, names, model_meta, batch_sizes=DEFAULT_BATCH_SIZES, max_mismatches=0):
    """The matrix within each named deployment: its reference (all triggers at once, the runtime's defaults) and
    each harmless change of its own configuration (fragile.deploy.arithmetic), labels and jitter in its own
    arithmetic. ``envelope_entry`` is the deployment's name, so summarize_benign reports false alarms per
    deployment."""
    key, rows = torch.as_tensor(key).cpu(), []
    for name in names:
        arith = arithmetic(name, model, model_meta)
        reference = arith.predict(triggers.cpu())
        rows.append(_record(f"{name}: reference (all at once)", "protocol", name, reference, reference, key,
                            max_mismatches))
        rows += [_record(f"{name}: {setting}", "protocol", name, logits, reference, key, max_mismatches)
                 for setting, logits in within_settings(arith, triggers.cpu(), batch_sizes)]
    return rows


def benign_run_records(ctx, p):
    """The matrix on eval.py's context and trigger set: within named deployments, or across the envelope."""
    probe = ctx.probe
    names = matrix_deployments(ctx, p)
    if names:
        return deployment_records(ctx.model, probe.triggers, probe.key, names, ctx.deployment.model_meta,
                                  p.batch_sizes or DEFAULT_BATCH_SIZES, probe.max_mismatches)
    return benign_records(ctx.model, probe.triggers, probe.key, p.batch_sizes or DEFAULT_BATCH_SIZES,
                          ctx.deployment.model_meta, tensor_alternative(ctx), probe.max_mismatches,
                          matrix_envelope(ctx, p))


def run_benign(ctx, p, seed):
    """eval.py --attack benign: the untouched model under every harmless change; nothing is tampered."""
    matrix = benign_run_records(ctx, p)
    summary = summarize_benign(matrix)
    for r in matrix:
        ctx.log(f"  {r['setting']:<45} flipped {r['flipped']:>3}  jitter {r['max_logit_jitter']:.2e}"
                + ("  FALSE ALARM" if r["detected"] else ""))
    for entry, s in summary["per_entry"].items():
        what = f"envelope entry {entry:<14}" if entry in ENVELOPE_ENTRIES else f"deployment {entry:<18}"
        ctx.log(f"  {what} {s['false_alarms']} false alarms in {s['settings']} settings, "
                f"largest jitter {s['max_logit_jitter']:.2e}")
    delta = ctx.deployment.trigger_meta.get("delta")
    ctx.log(f"  {summary['false_alarms']} false alarms in {summary['settings']} settings; largest jitter "
            f"{summary['max_logit_jitter']:.2e}" + (f", delta used at generation {delta:.2e}" if delta else ""))
    return records.run_record(seed, matrix, **summary, delta=delta), None
