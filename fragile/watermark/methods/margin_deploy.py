"""``margin`` triggers calibrated in named deployments (generate_samples.py --deploy NAME[,NAME...]).

Each deployment (fragile.deploy.arithmetic: ONNX Runtime, OpenVINO, torch in fp16 or bf16, ...) gets its own delta,
``safety x`` the jitter measured *within* it (its batch sizes, threads, graph optimisations), floored at a few ulps
of its own precision. After margin.py's phases in torch fp32 (aimed at the widest of those bands), the 8-bit grid
phase runs again with every candidate measured exactly in every named deployment: a trigger is kept only where,
in each one, its key leads every other class by at least that deployment's delta. The Jacobian that ranks the
moves stays torch fp32's: a deployment computes the same function up to an offset the exact evaluation absorbs.
Here, ``deployments`` is a sequence of fragile.deploy.arithmetic.Arithmetic (name, predict, jitter, eps).
"""
import torch

from ...core.cli import UserError
from ..jitter import calibrate_delta
from .common import key_margins
from .margin_grid import grid_margin_phase

EXACT_BATCH = 4096   # candidates per call into a deployment (its jitter across batch sizes is in its delta)


def deployment_delta(jitter, safety, eps):
    """``safety`` x the jitter measured within the deployment, and never below a few ulps of its largest logit in its
    own precision. Why the floor is not multiplied too: a deployment whose harmless changes moved nothing at all
    (bf16 on a CPU is bitwise stable across batch sizes and threads) has no measured spread to inflate, and in
    half precision ``safety`` x a few ulps would be as blind as the cross-precision envelope (delta ~2.6 logits for
    bf16 against ~0.26)."""
    floor = calibrate_delta({"max": 0.0, "logit_scale": jitter["logit_scale"]}, 1.0, eps)
    return max(safety * jitter["max"], floor)


def deployment_deltas(deployments, starts, safety, log=print):
    """{name: {"jitter": within-deployment jitter on ``starts``, "delta": its delta}}."""
    deltas = {}
    for arith in deployments:
        jitter = arith.jitter(starts.cpu())
        deltas[arith.name] = {"jitter": jitter, "delta": deployment_delta(jitter, safety, arith.eps)}
        log(f"{arith.name}: logit jitter within the deployment {jitter['max']:.2e} (largest logit "
            f"{jitter['logit_scale']:.1f}): delta = {deltas[arith.name]['delta']:.2e}")
    return deltas


def deployment_margins(deployments, deltas, images, key):
    """[(margins (N, K) in that deployment, its delta)] for each named deployment, on ``key``'s device."""
    out = []
    for arith in deployments:
        logits = torch.cat([arith.predict(images[i:i + EXACT_BATCH].cpu())
                            for i in range(0, len(images), EXACT_BATCH)])
        out.append((key_margins(logits.to(key.device), key), deltas[arith.name]["delta"]))
    return out


def deployment_grid_phase(model, images, key, deployments, deltas, p, device, log):
    """The grid phase with every margin measured in every named deployment, against each one's delta."""
    widest = max(c["delta"] for c in deltas.values())
    return grid_margin_phase(model, images, key, widest, p.band, p.grid_rounds, p.candidates, device, log,
                             exact=lambda imgs, k: deployment_margins(deployments, deltas, imgs, k))


def valid_in_all(deployments, deltas, images, key):
    """Per trigger: on its key with a margin of at least delta in every named deployment."""
    valid = torch.ones(len(key), dtype=torch.bool)
    for margins, delta in deployment_margins(deployments, deltas, images, key):
        valid &= (margins.min(1).values >= delta).cpu()
    return valid


def deployment_stats(deployments, deltas, images, key, band):
    """Per deployment, what the trigger metadata records: the jitter on the starts and on the triggers, delta, and
    the runner-up margins. A trigger below delta in any deployment is refused with the fix."""
    stats = {}
    for arith, (margins, delta) in zip(deployments, deployment_margins(deployments, deltas, images, key)):
        runner_up = margins.min(1).values
        if runner_up.min().item() < delta:
            raise UserError(f"a margin trigger ended {runner_up.min().item():.2e} above its runner-up in {arith.name}, "
                            f"below that deployment's delta {delta:.2e}: raise --margin-grid-rounds or --margin-pool, "
                            f"or name fewer deployments in --deploy")
        finite = torch.where(torch.isfinite(margins), margins, torch.full_like(margins, float("nan")))
        stats[arith.name] = {
            "delta": delta, "jitter": deltas[arith.name]["jitter"], "jitter_on_triggers": arith.jitter(images.cpu()),
            "runner_up_min": runner_up.min().item(), "runner_up_median": runner_up.median().item(),
            "mean_classes_in_band": ((finite >= delta) & (finite <= band * delta)).sum(1).float().mean().item()}
    return stats
