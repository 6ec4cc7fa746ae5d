"""The field bench's measurements, made in process (scripts/field_bench.py runs them; fragile.report.field_bench
turns them into metrics).

Two kinds of measurement, both kept raw (which triggers are off their key), so that every decision threshold and
metric is computed afterwards from the same records:

- **benign runs** of the untouched model, which calibrate each method's decision threshold. Named ones: every
  setting of the trigger set's own deployment envelope (fragile.watermark.jitter, as the benign matrix runs them).
  Then ``dynamic_batch_runs``: every method's triggers mixed, in a random order, with a random number of natural
  test images (other users' traffic) and cut into batches of a random serving size -- what a server with dynamic
  batching (KServe, Triton) does to each query. Each such run is named by its seed.
- **a cell**: one modification at one trial seed, applied once to a copy of the model, and then every method's
  triggers verified on that same tampered copy. Why one copy for all: the comparison is paired (every method
  faces exactly the same tampered models), and the modification, the dear part, is paid once per cell instead of
  once per method.
"""
import hashlib
import time
import zlib

import torch

from ..core.cli import UserError
from ..core.io import model_sha256
from ..core.training import accuracy, predict_logits
from ..core.weights import state_changed
from .benign import benign_records

SERVING_BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64)   # what a dynamic batcher forms, drawn uniformly per run


def seeded(*parts):
    """A CPU generator whose seed is a stable hash of ``parts`` (so every run and shard draws the same)."""
    return torch.Generator().manual_seed(zlib.crc32(repr(parts).encode()))


def trigger_set_sha256(triggers, key):
    """SHA-256 of a trigger set as verified: the uint8 images (shape and bytes) and the key's labels."""
    h = hashlib.sha256(f"{tuple(triggers.shape)}|".encode())
    h.update(triggers.cpu().contiguous().numpy().tobytes())
    h.update(",".join(map(str, torch.as_tensor(key).tolist())).encode())
    return h.hexdigest()


def off_key(labels, key):
    """The indices of the triggers whose label differs from the key, as plain ints."""
    return (torch.as_tensor(labels).cpu() != torch.as_tensor(key).cpu()).nonzero().flatten().tolist()


# ----------------------------------------------------------------------------- benign runs

def envelope_runs(model, triggers, key, model_meta, envelope):
    """One run per setting of ``envelope`` the verifier must tolerate (the benign matrix's protocol rows):
    [{"name", "kind": "envelope", "flipped": n}]."""
    rows = benign_records(model, triggers, key, model_meta=model_meta, envelope=envelope)
    return [{"name": r["setting"], "kind": "envelope", "flipped": r["flipped"]} for r in rows if r["kind"] == "protocol"]


def dynamic_batch_runs(model, trigger_sets, traffic, runs, seed=0):
    """``runs`` benign runs of dynamic batching: in each, every trigger of every set (``trigger_sets``: name ->
    (uint8 triggers, key)) and 0..(all triggers) random ``traffic`` images are shuffled together and cut into
    batches of one size drawn from SERVING_BATCH_SIZES. Returns name -> [{"name", "kind", "flipped"}]."""
    names = list(trigger_sets)
    images = torch.cat([trigger_sets[n][0].cpu() for n in names])
    owner = torch.cat([torch.full((len(trigger_sets[n][0]),), i) for i, n in enumerate(names)])
    keys = {n: torch.as_tensor(trigger_sets[n][1]).cpu() for n in names}
    out = {n: [] for n in names}
    for run in range(runs):
        gen = seeded("dynamic batching", seed, run)
        extra = int(torch.randint(len(images) + 1, (1,), generator=gen))
        picked = traffic[torch.randint(len(traffic), (extra,), generator=gen)].cpu() if extra else images[:0]
        order = torch.randperm(len(images) + extra, generator=gen)
        batch_size = SERVING_BATCH_SIZES[int(torch.randint(len(SERVING_BATCH_SIZES), (1,), generator=gen))]
        labels = predict_logits(model, torch.cat([images, picked])[order], batch_size).argmax(1).cpu()
        mine = torch.empty_like(labels)
        mine[order] = labels   # back to the queries' own positions
        for i, n in enumerate(names):
            flipped = len(off_key(mine[:len(images)][owner == i], keys[n]))
            out[n].append({"name": f"dynamic batching {run} (batch {batch_size}, {extra} traffic images)",
                           "kind": "dynamic-batching", "flipped": flipped})
    return out


# ----------------------------------------------------------------------------- one cell

# Where each attack's run record keeps its own success (what the modification was for), first found wins: a
# backdoor's or poisoning's success rate, a distilled student's agreement with the model.
SUCCESS_KEYS = ("attack_success_rate", "teacher_agreement")


def attack_success(run):
    """The modification's own success from its run record (its last record, then its summary), or None."""
    last = (run.get("records") or [{}])[-1]
    for source in (last, run):
        for key in SUCCESS_KEYS:
            value = source.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return float(value)
    return None


def run_cell(ctx, attack, params, trial, probes):
    """Apply ``attack`` (a registry entry, with ``params``) once at seed ``trial`` to a copy of the model, then
    verify every method's triggers (``probes``: method -> Probe) on that copy. Returns the cell's measurements:
    whether the weights changed at all (recomputed), the copy's hash, clean accuracy, the attack's success, and per
    method the triggers off their key."""
    started = time.time()
    run, tampered = attack.run(ctx, params, trial)
    if tampered is None:
        raise UserError("this modification returns no tampered model, so the bench cannot verify it: leave it out")
    tampered.eval()
    return {"model_changed": state_changed(tampered, ctx.model),
            "tampered_sha256": model_sha256(tampered),
            "clean_accuracy": accuracy(tampered, ctx.probe.test, ctx.probe.eval_batch_size),
            "attack_success": attack_success(run),
            "methods": {name: {"flipped": probe.flipped_mask(tampered).nonzero().flatten().tolist()}
                        for name, probe in probes.items()},
            "seconds": round(time.time() - started, 2)}
