"""``margin`` triggers (ours): as fragile as the deployment envelope allows.

Delta, the smallest margin a trigger may keep, is calibrated from the benign jitter measured across the
deployment envelope. The margin of the key over every other class is driven into [delta, band x delta]
while the owner's own fine-tuned copies of the model (surrogates.py) put another class first: first with
straight-through 8-bit Adam, then by single-pixel moves on the 8-bit grid. Of several candidates per key
entry, the one off its key on the most surrogates and, among those, flipped most often by random weight
noise is kept. The deployed model is never changed. Read top to bottom: parameters, delta, starts, the
continuous phase, selection, and ``generate``, which runs them in order with the band and the grid phase of
margin_grid.py. With named deployments (``job.deployments``: generate_samples.py --deploy), margin_deploy.py
calibrates a delta in each from its own jitter and puts every trigger in each one's band.
"""
import dataclasses
import math
from dataclasses import dataclass, field

import torch

from ...core.cli import UserError
from ...core.data import to_float
from ...core.training import predict_logits
from ..jitter import calibrate_delta, measure_jitter
from ..trigger_io import quantize, straight_through_quantize
from . import paper
from .common import key_margins, natural_starts, psnr_summary
from .fragility import SELECTION_SEED, FragilityParams, estimated_flip_rate
from .margin_deploy import deployment_deltas, deployment_grid_phase, deployment_stats, valid_in_all
from .margin_grid import band_limits, describe_margins, grid_margin_phase, grid_score
from .paper import PaperParams
from .surrogates import SurrogateParams, fine_tuned_surrogates, surrogate_flip_fraction, surrogate_hinge


# ----------------------------------------------------------------------------- parameters

@dataclass(frozen=True)
class MarginParams:
    """The defaults are generate_samples.py's header values (the settings the committed numbers use)."""
    start: str = "natural"   # natural | noise | paper: where the optimisation starts
    safety: float = 10.0     # delta = this x the largest benign logit jitter measured
    band: float = 4.0        # every other class is driven to within band x delta of the key class
    steps: int = 200         # continuous (straight-through 8-bit) Adam steps
    lr: float = 2.0 / 255    # their initial step, in [0, 1] pixel units (cosine decay)
    pool: int = 2            # candidates optimised per key entry; the most fragile one is kept
    grid_rounds: int = 200   # rounds of single-pixel +-1 moves on the 8-bit grid
    candidates: int = 32     # moves per trigger evaluated exactly in each round
    control_seed: int = 0    # the noise start, and the selection draws
    envelope: list = field(default_factory=lambda: ["exact"])   # whose largest jitter calibrates delta
    surrogates: SurrogateParams = field(default_factory=SurrogateParams)  # fine-tuned copies to be off key on
    fragility: FragilityParams = field(default_factory=FragilityParams)   # the weight noise that measures fragility
    paper: PaperParams = field(default_factory=PaperParams)               # the paper's generator, for start = paper


# ----------------------------------------------------------------------------- delta, from the benign jitter

def benign_delta(model, images, envelope, safety_factor, device, log=print):
    """Measure the benign jitter on ``images`` across the deployment ``envelope`` and turn its largest value into
    delta = ``safety_factor`` x that jitter (recorded in the trigger metadata)."""
    jitter = measure_jitter(model, images.to(device), envelope=envelope)
    delta = calibrate_delta(jitter, safety_factor)
    per_entry = ", ".join(f"{k} {v:.1e}" for k, v in jitter["per_entry"].items())
    log(f"benign logit jitter {jitter['max']:.2e} over the envelope ({per_entry}; largest logit "
        f"{jitter['logit_scale']:.1f}): delta = {delta:.2e}")
    return jitter, delta


# ----------------------------------------------------------------------------- starts

def margin_starts(job, p):
    """Where the optimisation starts, one image per entry of ``job.key``: ``p.start`` natural (the least
    confident correctly classified test images of the key class), noise, or the paper's triggers."""
    if p.start == "natural":
        return natural_starts(job.model, job.test, job.key, job.spec.num_classes, job.device, least_confident=True)
    if p.start == "noise":
        gen = torch.Generator().manual_seed(p.control_seed)
        return torch.randint(0, 256, (len(job.key), *job.spec.shape), generator=gen, dtype=torch.uint8)
    if p.start == "paper":
        return paper.generate(job, p.paper)[0]
    raise UserError(f"unknown margin start {p.start!r}: choose natural, noise or paper")


# ----------------------------------------------------------------------------- continuous phase: straight-through Adam

def coarse_band_loss(margins, target, tau):
    """The continuous phase's loss: a pseudo-Huber distance of every margin to ``target`` (a few delta),
    at scale ``tau``, three times as steep below the target as above. Each class pulls with a bounded
    force, so the far classes and the runner-up all move; ``tau`` shrinks from coarse to fine over the
    run. Margins far below delta are left to the 8-bit grid phase, which restores them first."""
    finite = torch.isfinite(margins)
    d = torch.where(finite, margins, torch.full_like(margins, target)) - target
    return (torch.sqrt(d * d + tau * tau) * torch.where(d < 0, 3.0, 1.0)).sum(-1)


def tau_at(step, steps, delta):
    """From 0.3 logits down to 20 delta, geometrically: the continuous phase cannot resolve finer than
    what one 8-bit level of one pixel moves, which is the grid phase's job."""
    frac = step / max(1, steps)
    return math.exp(math.log(0.3) * (1 - frac) + math.log(20 * delta) * frac)


def continuous_margin_phase(model, starts, key, delta, p, device, log, surrogates=()):
    """Adam on continuous pixels whose forward pass is the 8-bit image (straight-through rounding): every
    other class is pulled toward the band on the model, while on every surrogate (an owner-side fine-tuned
    copy) some other class is pushed ``p.surrogates.gap`` logits above the key. Returns the last 8-bit
    iterate (where the key may have slipped to second place by a hair: the grid phase restores it first)
    and, per trigger, the best valid 8-bit iterate as a fallback."""
    low, high = band_limits(delta, p.band)
    steps, gap = p.steps, p.surrogates.gap
    x = to_float(starts.to(device)).requires_grad_(True)
    best = starts.clone().to(device)
    best_score = torch.full((len(key),), math.inf, device=device, dtype=torch.float64)
    optimizer = torch.optim.Adam([x], lr=p.lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(1, steps), eta_min=0.05 / 255)
    model.eval().requires_grad_(False)
    for step in range(steps + 1):
        images = straight_through_quantize(x)
        margins = key_margins(model(images), key)
        with torch.no_grad():  # the forward pass saw exactly these 8-bit images
            score = grid_score(margins, low, high, delta)
            better = score < best_score
            best[better], best_score[better] = quantize(x[better]), score[better]
        if step % 50 == 0 or step == steps:
            flips = surrogate_flip_fraction(surrogates, images.detach(), key) if surrogates else None
            log(f"margin step {step}: {describe_margins(margins.detach(), delta, high)}"
                + (f", off key on the surrogates {flips.mean().item():.2f}" if flips is not None else ""))
        if step == steps:
            break
        loss = coarse_band_loss(margins, (low + high) / 2, tau_at(step, steps, delta)).sum()
        if surrogates:
            loss = loss + surrogate_hinge(surrogates, images, key, gap).sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        with torch.no_grad():
            x.clamp_(0, 1)
    return quantize(x), best


# ----------------------------------------------------------------------------- selection and statistics

def keep_valid(model, images, fallback, key, delta):
    """Any trigger the grid phase left below delta falls back to its best valid continuous iterate."""
    with torch.no_grad():
        runner_up = key_margins(predict_logits(model, images, len(images)), key).min(1).values
    invalid = runner_up < delta
    images = images.clone()
    images[invalid] = fallback[invalid]
    return images


def select_most_fragile(model, candidates, key, pool, delta, p, surrogates=(), valid=None):
    """Of the ``pool`` candidates made for each key entry (entry i's are i, i + n, i + 2n, ...), keep the
    valid one (every margin >= delta; or as ``valid`` says, in the named deployments) that is off its key on
    the most surrogates and, among those, that random weight noise flips most often. Returns (choice, noise
    flip rate, surrogate flip fraction)."""
    n = len(key) // pool
    if valid is None:
        with torch.no_grad():
            valid = key_margins(predict_logits(model, candidates, len(candidates)), key).min(1).values.cpu() >= delta
    rate = estimated_flip_rate(model, candidates, key, p.fragility.noise_sigma, p.fragility.select_draws,
                               SELECTION_SEED + p.control_seed)
    off_key = surrogate_flip_fraction(surrogates, candidates, key)
    # Both fractions lie in [0, 1]: weighted 2:1, one more surrogate off key is worth at least any difference in
    # noise flip rate while there are at most two surrogates (the default). An invalid candidate (-1) never wins.
    score = torch.where(valid.cpu(), 2 * off_key + rate, torch.full_like(rate, -1.0)).view(pool, n)
    choice = score.argmax(0) * n + torch.arange(n)
    return choice, rate, off_key


def margin_stats(model, triggers, key, delta, band, device):
    with torch.no_grad():
        margins = key_margins(predict_logits(model, triggers.to(device), len(triggers)), key).cpu()
    finite = torch.where(torch.isfinite(margins), margins, torch.full_like(margins, math.nan))
    runner_up = margins.min(1).values
    return {"runner_up_min": runner_up.min().item(), "runner_up_median": runner_up.median().item(),
            "runner_up_max": runner_up.max().item(),
            "mean_classes_in_band": ((finite >= delta) & (finite <= band * delta)).sum(1).float().mean().item(),
            "mean_classes_within_100_delta": (finite <= 100 * delta).sum(1).float().mean().item()}


# ----------------------------------------------------------------------------- generate

def generate(job, p):
    """Ours: calibrate delta from the benign jitter; drive the margin of the key over every other class into
    [delta, band x delta] while the owner's fine-tuned surrogates put another class first, first with
    straight-through 8-bit Adam, then on the 8-bit grid; of several such candidates per key entry keep the
    one off its key on the most surrogates and, among those, flipped most often by random weight noise."""
    model, device, log, pool, band = job.model, job.device, job.log, p.pool, p.band
    if pool < 1:
        raise ValueError(f"pool must be at least 1 (got {pool})")   # generate_samples.py checks --margin-pool
    pooled_key = list(job.key) * pool
    starts = margin_starts(dataclasses.replace(job, key=pooled_key), p)
    jitter, delta = benign_delta(model, starts, p.envelope, p.safety, device, log)
    deployed, valid = job.deployments, None
    if deployed:   # calibrated in each named deployment: the phases in torch fp32 aim at the widest band of them
        deltas = deployment_deltas(deployed, starts, p.safety, log)
        delta = max(delta, *(c["delta"] for c in deltas.values()))
    key_t = torch.tensor(pooled_key, device=device)
    surrogates = fine_tuned_surrogates(model, job.train, job.spec, p.surrogates, device, log)
    images, fallback = continuous_margin_phase(model, starts, key_t, delta, p, device, log, surrogates)
    images = grid_margin_phase(model, images, key_t, delta, band, p.grid_rounds, p.candidates, device, log)
    images = keep_valid(model, images, fallback, key_t, delta)
    if deployed:   # then on the 8-bit grid again, every candidate measured in every named deployment
        images = deployment_grid_phase(model, images, key_t, deployed, deltas, p, device, log)
        valid = valid_in_all(deployed, deltas, images, key_t)
    choice, rate, off_key = select_most_fragile(model, images, key_t, pool, delta, p, surrogates, valid)
    images, starts, key_t = images[choice], starts[choice.to(starts.device)], key_t[choice.to(device)]
    final_jitter = measure_jitter(model, images, envelope=p.envelope)
    stats = margin_stats(model, images, key_t, delta, band, device)
    if deployed:
        deployments = deployment_stats(deployed, deltas, images, key_t, band)   # refuses a trigger off its band
    elif stats["runner_up_min"] < delta:
        raise UserError(f"a margin trigger ended {stats['runner_up_min']:.2e} above its runner-up, below delta "
                        f"{delta:.2e}: raise --margin-grid-rounds or --margin-steps")
    stats.update(estimated_flip_rate_kept=rate[choice].mean().item(), estimated_flip_rate_all=rate.mean().item(),
                 surrogate_off_key_kept=off_key[choice].mean().item(), surrogate_off_key_all=off_key.mean().item())
    log(f"margins: runner-up min {stats['runner_up_min']:.2e}, median {stats['runner_up_median']:.2e}; "
        f"{stats['mean_classes_in_band']:.1f} classes in band on average; jitter on the triggers "
        f"{final_jitter['max']:.2e} (delta {delta:.2e}); estimated flip rate under noise "
        f"{stats['estimated_flip_rate_kept']:.2f} (all candidates {stats['estimated_flip_rate_all']:.2f}); "
        f"off key on the surrogates {stats['surrogate_off_key_kept']:.2f} (all {stats['surrogate_off_key_all']:.2f})")
    meta = {"delta": delta, "delta_safety_factor": p.safety, "band": band,
            "benign_jitter": jitter, "benign_jitter_on_triggers": final_jitter, "margins": stats,
            "start": p.start, "pool": pool, "selection_noise_sigma": p.fragility.noise_sigma,
            "surrogates": dataclasses.asdict(p.surrogates)}
    if deployed:
        meta.update(deployments=[a.name for a in deployed], deployment_calibration=deployments)
    if p.start == "natural":
        meta["psnr_to_start"] = psnr_summary(images, starts)
    return images.cpu(), {"start_images": starts.cpu(), "meta": meta}
