"""``margin`` triggers (ours): as fragile as the deployment envelope allows.

Delta, the smallest margin a trigger may keep, is calibrated from the benign jitter measured across the
deployment envelope. The margin of the key over every other class is driven into [delta, band x delta]
while the owner's own fine-tuned copies of the model (surrogates) put another class first: first with
straight-through 8-bit Adam, then by moves on the 8-bit grid (fragile.watermark.methods.grid). Of several
candidates per key entry, the one off its key on the most surrogates and, among those, flipped most often
by random weight noise is kept. The deployed model is never changed.
"""
import dataclasses
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ...core.cli import UserError
from ...core.data import to_float
from ...core.training import predict_logits
from ..jitter import measure_jitter
from ..trigger_io import quantize, straight_through_quantize
from . import paper
from .band import band_limits, describe_margins, grid_score, keep_valid, margin_stats
from .common import benign_delta, key_margins, natural_starts, psnr_summary
from .fragility import SELECTION_SEED, FragilityParams, estimated_flip_rate
from .grid import grid_margin_phase
from .paper import PaperParams
from .surrogates import SurrogateParams, fine_tuned_surrogates, surrogate_flip_fraction


@dataclass(frozen=True)
class MarginParams:
    HEADER_PREFIX = "MARGIN_"
    start: str               # natural | noise | paper: where the optimisation starts
    safety: float            # delta = this x the largest benign logit jitter measured
    band: float              # every other class is driven to within band x delta of the key class
    steps: int               # continuous (straight-through 8-bit) Adam steps
    lr: float                # their initial step, in [0, 1] pixel units (cosine decay)
    pool: int                # candidates optimised per key entry; the most fragile one is kept
    grid_rounds: int         # rounds of single-pixel +-1 moves on the 8-bit grid
    candidates: int          # moves per trigger evaluated exactly in each round
    control_seed: int = field(metadata={"header": "CONTROL_SEED"})   # the noise start, and the selection draws
    envelope: list = field(metadata={"header": "ENVELOPE"})          # whose largest jitter calibrates delta
    surrogates: SurrogateParams      # the owner-side fine-tuned copies every trigger must be off its key on
    fragility: FragilityParams       # the weight noise that measures fragility
    paper: PaperParams               # the paper's generator, for start = paper


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


def surrogate_hinge(surrogates, images, key, gap):
    """Per trigger, summed over the surrogates: how far the key still is from losing by ``gap`` logits there."""
    loss = torch.zeros(len(images), device=images.device)
    for surrogate in surrogates:
        loss = loss + F.relu(key_margins(surrogate(images), key).min(1).values + gap)
    return loss


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


def select_most_fragile(model, candidates, key, pool, delta, p, surrogates=()):
    """Of the ``pool`` candidates made for each key entry (entry i's are i, i + n, i + 2n, ...), keep the
    valid one (every margin >= delta) that is off its key on the most surrogates and, among those, that
    random weight noise flips most often. Returns (choice, noise flip rate, surrogate flip fraction)."""
    n = len(key) // pool
    with torch.no_grad():
        runner_up = key_margins(predict_logits(model, candidates, len(candidates)), key).min(1).values.cpu()
    rate = estimated_flip_rate(model, candidates, key, p.fragility.noise_sigma, p.fragility.select_draws,
                               SELECTION_SEED + p.control_seed)
    off_key = surrogate_flip_fraction(surrogates, candidates, key)
    score = torch.where(runner_up >= delta, 2 * off_key + rate, torch.full_like(rate, -1.0)).view(pool, n)
    choice = score.argmax(0) * n + torch.arange(n)
    return choice, rate, off_key


def generate(job, p):
    """Ours: calibrate delta from the benign jitter; drive the margin of the key over every other class into
    [delta, band x delta] while the owner's fine-tuned surrogates put another class first, first with
    straight-through 8-bit Adam, then on the 8-bit grid; of several such candidates per key entry keep the
    one off its key on the most surrogates and, among those, flipped most often by random weight noise."""
    model, device, log, pool, band = job.model, job.device, job.log, p.pool, p.band
    if pool < 1:
        raise UserError(f"--margin-pool must be at least 1 (got {pool})")
    pooled_key = list(job.key) * pool
    starts = margin_starts(dataclasses.replace(job, key=pooled_key), p)
    jitter, delta = benign_delta(model, starts, p.envelope, p.safety, device, log)
    key_t = torch.tensor(pooled_key, device=device)
    surrogates = fine_tuned_surrogates(model, job.train, job.spec, p.surrogates, device, log)
    images, fallback = continuous_margin_phase(model, starts, key_t, delta, p, device, log, surrogates)
    images = grid_margin_phase(model, images, key_t, delta, band, p.grid_rounds, p.candidates, device, log)
    images = keep_valid(model, images, fallback, key_t, delta)
    choice, rate, off_key = select_most_fragile(model, images, key_t, pool, delta, p, surrogates)
    images, starts, key_t = images[choice], starts[choice.to(starts.device)], key_t[choice.to(device)]
    final_jitter = measure_jitter(model, images, envelope=p.envelope)
    stats = margin_stats(model, images, key_t, delta, band, device)
    if stats["runner_up_min"] < delta:
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
    if p.start == "natural":
        meta["psnr_to_start"] = psnr_summary(images, starts)
    return images.cpu(), {"start_images": starts.cpu(), "meta": meta}
