"""Where triggers come from. Every method returns uint8 triggers that carry the key's labels.

    paper    the ICIP-2022 generator (fragile.triggers.generate_paper), unchanged
    random   control: uniform-noise images; the key becomes the model's own labels for them
    natural  control: the least-confident correctly classified test images of each key class
    ftg      FTG-style: signed-gradient pixel steps minimising the softmax variance, from natural images
    margin   ours: every trigger's margin over the other classes driven into [delta, band x delta],
             delta calibrated from the measured benign jitter, on the 8-bit grid throughout, while the
             owner's own fine-tuned copies of the model (fragile/surrogates.py) label it off the key

All of them optimise (if at all) the 8-bit image itself -- straight-through rounding while the
pixels are continuous, then moves on the 0..255 grid -- so the exported PNG is what was optimised.
A method returns ``(uint8 triggers on the CPU, info)``; ``info["meta"]`` (plain values) goes into
the trigger metadata, every other entry (tensors) into triggers.pt.
"""
import copy
import math

import torch
import torch.nn.functional as F

from .attacks import add_weight_noise
from .benign import calibrate_delta, measure_jitter
from .cli import UserError
from .data import to_float
from .surrogates import fine_tuned_surrogates, surrogate_flip_fraction
from .training import predict_logits
from .triggers import generate_paper, quantize, straight_through_quantize

# Defaults for the knobs generate_samples.py exposes as header constants (a caller that passes a
# bare config, such as a test, gets these).
DEFAULTS = {
    "ENVELOPE": ["exact"],        # ftg / margin: the benign changes whose largest jitter calibrates delta (fragile/envelope.py)
    "CONTROL_SEED": 0,            # random / natural / ftg / margin: which noise or test images are drawn
    "FTG_STEPS": 1000,            # signed-gradient steps (FTG takes thousands)
    "FTG_STEP_SIZE": 0.25 / 255,  # per step, in [0, 1] pixel units
    "MARGIN_START": "natural",    # natural | noise | paper: where the margin optimisation starts
    "MARGIN_SAFETY": 10.0,        # delta = this x the largest benign logit jitter measured
    "MARGIN_BAND": 4.0,           # every other class is driven to within band x delta of the key class
    "MARGIN_STEPS": 200,          # continuous (straight-through 8-bit) Adam steps
    "MARGIN_LR": 2.0 / 255,       # their initial step, in [0, 1] pixel units (cosine decay)
    "MARGIN_POOL": 2,             # candidates optimised per key entry; the most fragile one is kept
    "MARGIN_SELECT_DRAWS": 32,    # random weight-noise copies of the model that measure fragility
    "MARGIN_NOISE_SIGMA": 1e-4,   # their standard deviation (absolute, on every parameter)
    "MARGIN_GRID_ROUNDS": 200,    # rounds of single-pixel +-1 moves on the 8-bit grid
    "MARGIN_CANDIDATES": 32,      # moves per trigger evaluated exactly in each round
    "MARGIN_SURROGATES": 2,       # owner-side fine-tuned copies the triggers must flip on (fragile/surrogates.py)
    "MARGIN_SURROGATE_STEPS": 80, # their SGD steps (about one epoch of 20k images at batch 256)
    "MARGIN_SURROGATE_SUBSET": 20000,  # class-balanced training images they fine-tune on (0: all)
    "MARGIN_SURROGATE_LR": 1e-3,  # their recipe: the paper's fine-tuning (SGD, momentum, weight decay, batch)
    "MARGIN_SURROGATE_MOMENTUM": 0.9,
    "MARGIN_SURROGATE_WEIGHT_DECAY": 1e-3,
    "MARGIN_SURROGATE_BATCH_SIZE": 256,
    "MARGIN_SURROGATE_MIX_BN": True,   # every second surrogate fine-tunes with batch-norm statistics frozen
    "MARGIN_SURROGATE_GAP": 0.3,  # on every surrogate, some other class must beat the key by this many logits
}


def setting(config, name):
    return config.get(name, DEFAULTS[name])


# ----------------------------------------------------------------------------- shared helpers

def key_margins(logits, key):
    """(N, K) margins of the key logit over every class; +inf in the key's own column."""
    key_logit = logits.gather(1, key[:, None])
    margins = key_logit - logits
    return margins.scatter(1, key[:, None], math.inf)


def psnr(a_uint8, b_uint8):
    """Per-image PSNR in dB of two uint8 batches (inf where identical)."""
    mse = (a_uint8.double() - b_uint8.double()).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(255.0 ** 2 / mse)


def psnr_summary(triggers, starts):
    values = psnr(triggers.cpu(), starts.cpu())
    finite = values[torch.isfinite(values)]
    return {"mean_db": finite.mean().item() if len(finite) else None,
            "min_db": finite.min().item() if len(finite) else None,
            "identical": int((~torch.isfinite(values)).sum())}


def labels_of(model, images, device):
    return predict_logits(model, images.to(device), max(1, len(images))).argmax(1).cpu()


def correctly_classified_by_class(model, test, num_classes, device):
    """For every class: indices of correctly classified test images, least confident (smallest margin) first."""
    if test is None or len(test) == 0:
        raise UserError("natural-image trigger sources need the test split (--data-dir)")
    logits = predict_logits(model, test.images.to(device), 1024).cpu()
    top2 = logits.topk(2, dim=1).values
    margin = top2[:, 0] - top2[:, 1]
    correct = logits.argmax(1) == test.labels.cpu()
    pools = []
    for k in range(num_classes):
        index = torch.nonzero(correct & (test.labels.cpu() == k)).flatten()
        pools.append(index[margin[index].argsort()])
    return pools


def natural_starts(model, test, key, num_classes, device, least_confident=True, seed=0):
    """One distinct correctly classified test image per key entry, of the key's class."""
    pools = correctly_classified_by_class(model, test, num_classes, device)
    gen = torch.Generator().manual_seed(seed)
    chosen, used = [], [0] * num_classes
    for k in key:
        pool = pools[k] if least_confident else pools[k][torch.randperm(len(pools[k]), generator=gen)]
        pools[k] = pool
        if used[k] >= len(pool):
            raise UserError(f"only {len(pool)} correctly classified test images of class {k}: "
                            f"ask for fewer triggers")
        chosen.append(pool[used[k]].item())
        used[k] += 1
    return test.images[torch.tensor(chosen)].cpu()


def benign_delta(model, images, config, device, log=print):
    """Measure the benign jitter on ``images`` across the deployment envelope and turn its largest value into
    delta (recorded in the trigger metadata)."""
    jitter = measure_jitter(model, images.to(device), envelope=setting(config, "ENVELOPE"))
    delta = calibrate_delta(jitter, setting(config, "MARGIN_SAFETY"))
    per_entry = ", ".join(f"{k} {v:.1e}" for k, v in jitter["per_entry"].items())
    log(f"benign logit jitter {jitter['max']:.2e} over the envelope ({per_entry}; largest logit "
        f"{jitter['logit_scale']:.1f}): delta = {delta:.2e}")
    return jitter, delta


# ----------------------------------------------------------------------------- paper and the controls

def _paper(model, spec, key, config, device, test, train=None):
    cfg = {"latent_seed": config["LATENT_SEED"], "latent_dim": config["LATENT_DIM"],
           "gen_channels": config["GEN_CHANNELS"], "lr": config["LR"], "beta1": config["BETA1"],
           "beta2": config["BETA2"], "max_steps": config["MAX_STEPS"], "lam": config["LAMBDA"],
           "progress": config.get("PROGRESS", False)}
    return generate_paper(model, spec, key, cfg, device)


def _random(model, spec, key, config, device, test, train=None):
    """Uniform-noise images, labelled by the model. A control: nothing is optimised, so the drawn key is
    replaced in place by the model's labels (the caller saves the list it passed in)."""
    gen = torch.Generator().manual_seed(setting(config, "CONTROL_SEED"))
    images = torch.randint(0, 256, (len(key), *spec.shape), generator=gen, dtype=torch.uint8)
    key[:] = labels_of(model, images, device).tolist()
    return images, {"meta": {"key_source": "the model's labels of the noise images"}}


def _natural(model, spec, key, config, device, test, train=None):
    """The least-confident correctly classified test images, one per key entry, of the key's class."""
    images = natural_starts(model, test, key, spec.num_classes, device, least_confident=True)
    return images, {"meta": {"start": "least-confident correctly classified test images"}}


# ----------------------------------------------------------------------------- FTG

def softmax_variance(logits):
    """Per-image variance of the softmax: 0 when every class is equally likely."""
    return F.softmax(logits, dim=1).var(dim=1)


def _ftg(model, spec, key, config, device, test, train=None, log=print):
    """FTG-style: signed-gradient steps on the 8-bit image (straight-through rounding) that minimise the
    softmax variance, from natural images of the key class. FTG has no label term; to keep the secret
    key each trigger keeps its lowest-variance iterate that still carries its key label by at least the
    measured benign jitter (without that floor the export itself would be a coin toss)."""
    starts = natural_starts(model, test, key, spec.num_classes, device, least_confident=False,
                            seed=setting(config, "CONTROL_SEED"))
    jitter = measure_jitter(model, starts.to(device), envelope=setting(config, "ENVELOPE"))
    floor = calibrate_delta(jitter, 1.0)  # the jitter itself (safety factor 1): just enough to export
    key_t = torch.tensor(key, device=device)
    x = to_float(starts.to(device)).requires_grad_(True)
    best, best_var = starts.clone().to(device), torch.full((len(key),), math.inf, device=device)
    model.eval().requires_grad_(False)
    steps, step_size = setting(config, "FTG_STEPS"), setting(config, "FTG_STEP_SIZE")
    for step in range(steps + 1):
        logits = model(straight_through_quantize(x))
        variance = softmax_variance(logits)
        with torch.no_grad():  # the forward pass saw exactly the 8-bit images: keep the best valid ones
            valid = (key_margins(logits, key_t).min(1).values > floor) & (variance < best_var)
            best[valid] = quantize(x[valid])
            best_var[valid] = variance[valid]
        if step == steps:
            break
        grad, = torch.autograd.grad(variance.sum(), x)
        with torch.no_grad():
            x.sub_(step_size * grad.sign()).clamp_(0, 1)
        if step % 250 == 0:
            log(f"ftg step {step}: mean softmax variance {variance.mean().item():.3e}")
    return best.cpu(), {"start_images": starts,
                        "meta": {"start": "random correctly classified test images of the key class",
                                 "benign_jitter": jitter, "label_floor": floor,
                                 "psnr_to_start": psnr_summary(best, starts)}}


# ----------------------------------------------------------------------------- margin (ours)

INVALID = 1e9   # any 8-bit image with a margin below the band's floor scores worse than every valid one


def band_scores(margins, low, high, delta):
    """Per trigger: (violation, excess) in units of delta. The violation is how far margins fall below
    ``low`` (a false alarm waiting to happen), the excess sum_j log(1 + (m_j - high) / delta) over margins
    above ``high`` (a less sensitive trigger): logarithmic, so a margin of 10 and one of 10 delta both
    count. ``margins`` is (..., K) with +inf in the key column (ignored)."""
    finite = torch.isfinite(margins)
    m = torch.where(finite, margins, torch.full_like(margins, high)).double()  # INVALID + v needs float64
    violation = (F.relu(low - m) / delta).sum(-1)
    excess = torch.log1p(F.relu(m - high) / delta).sum(-1)
    return violation, excess


def grid_score(margins, low, high, delta):
    """Lexicographic: valid triggers by their excess; invalid ones, all worse, by their violation."""
    violation, excess = band_scores(margins, low, high, delta)
    return torch.where(violation > 0, INVALID + violation, excess)


def band_limits(delta, config):
    """The band optimised for: [1.25 delta, band x delta]. The quarter delta of headroom absorbs the jitter
    between the batches margins are measured in here and the all-at-once export check."""
    return 1.25 * delta, setting(config, "MARGIN_BAND") * delta


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


def continuous_margin_phase(model, starts, key, delta, config, device, log, surrogates=()):
    """Adam on continuous pixels whose forward pass is the 8-bit image (straight-through rounding): every
    other class is pulled toward the band on the model, while on every surrogate (an owner-side fine-tuned
    copy) some other class is pushed ``MARGIN_SURROGATE_GAP`` logits above the key. Returns the last 8-bit
    iterate (where the key may have slipped to second place by a hair: the grid phase restores it first)
    and, per trigger, the best valid 8-bit iterate as a fallback."""
    low, high = band_limits(delta, config)
    steps, gap = setting(config, "MARGIN_STEPS"), setting(config, "MARGIN_SURROGATE_GAP")
    x = to_float(starts.to(device)).requires_grad_(True)
    best = starts.clone().to(device)
    best_score = torch.full((len(key),), math.inf, device=device, dtype=torch.float64)
    optimizer = torch.optim.Adam([x], lr=setting(config, "MARGIN_LR"))
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


def describe_margins(margins, delta, high):
    finite = torch.where(torch.isfinite(margins), margins, torch.full_like(margins, math.nan))
    runner_up = margins.min(1).values
    in_band = ((finite >= delta) & (finite <= high)).sum(1).float()
    return (f"runner-up margin median {runner_up.median().item():.2e} (min {runner_up.min().item():.2e}), "
            f"classes in band {in_band.mean().item():.1f}/{margins.shape[1] - 1}, "
            f"on key {int((runner_up > 0).sum())}/{len(runner_up)}")


def margin_jacobian(model, images, key):
    """Margins (N, K) of uint8 ``images`` and their Jacobian (N, K, pixels) per 0..255 level."""
    x = to_float(images).requires_grad_(True)
    logits = model(x)
    rows = [torch.autograd.grad(logits[:, c].sum(), x, retain_graph=c < logits.shape[1] - 1)[0].flatten(1)
            for c in range(logits.shape[1])]  # samples are independent (eval mode): one pass per class
    jac = torch.stack(rows, 1) / 255
    jac = jac.gather(1, key[:, None, None].expand(-1, 1, jac.shape[2])) - jac
    return key_margins(logits.detach(), key), jac


def candidate_moves(images, margins, jac, low, high, delta, count):
    """The ``count`` single-pixel +-1 moves per image with the best objective predicted by the linearised
    margins, plus compound moves (the best 2, 4, 8 and 16 applied together) that cover ground faster.

    Returns a list of (flat pixel indices, signs) pairs per image."""
    flat = images.flatten(1).long()
    pixels = flat.shape[1]
    predicted = torch.cat([margins[:, :, None] + jac, margins[:, :, None] - jac], 2)  # (N, K, 2P)
    objective = grid_score(predicted.transpose(1, 2), low, high, delta)               # (N, 2P)
    at_edge = torch.cat([flat >= 255, flat <= 0], 1)
    objective = objective.masked_fill(at_edge, math.inf)
    order = objective.argsort(1)[:, :max(count, 16)]
    moves = []
    for row in order:
        pix, sign = row % pixels, torch.where(row < pixels, 1, -1)
        single = [(pix[i:i + 1], sign[i:i + 1]) for i in range(count)]
        compound = []
        for size in (2, 4, 8, 16):
            unique, first = _first_per_pixel(pix[:size])
            compound.append((unique, sign[:size][first]))
        moves.append(single + compound)
    return moves


def _first_per_pixel(pixels):
    """Distinct pixels in order of first appearance, and where each first appears (a +1 and a -1 move of the
    same pixel must not both be applied)."""
    seen, unique, first = set(), [], []
    for i, p in enumerate(pixels.tolist()):
        if p not in seen:
            seen.add(p)
            unique.append(p)
            first.append(i)
    return torch.tensor(unique, device=pixels.device), torch.tensor(first, device=pixels.device)


def apply_moves(images, moves):
    """One candidate image per (image, move): uint8 (N * moves per image, C, H, W)."""
    out = []
    for image, image_moves in zip(images, moves):
        base = image.flatten().long()
        for pixels, signs in image_moves:
            candidate = base.clone()
            candidate[pixels] += signs
            out.append(candidate.clamp(0, 255))
    return torch.stack(out).to(torch.uint8).view(-1, *images.shape[1:])


def grid_margin_phase(model, images, key, delta, config, device, log):
    """Greedy moves on the 8-bit grid: each round, every trigger takes the exactly evaluated best of its
    candidate moves (ranked by the linearised margins) if that lowers the band penalty. What is optimised
    here is exactly the uint8 image that will be exported."""
    low, high = band_limits(delta, config)
    count = setting(config, "MARGIN_CANDIDATES")
    images = images.clone().to(device)
    active = torch.ones(len(key), dtype=torch.bool, device=device)
    for round_ in range(setting(config, "MARGIN_GRID_ROUNDS") + 1):
        idx = torch.nonzero(active).flatten()
        if len(idx) == 0:
            break
        margins, jac = margin_jacobian(model, images[idx], key[idx])
        current = grid_score(margins, low, high, delta)
        if round_ % 25 == 0:
            log(f"grid round {round_}: {describe_margins(margins, delta, high)} ({len(idx)} triggers still moving)")
        moves = candidate_moves(images[idx], margins, jac, low, high, delta, count)
        per_image = len(moves[0])
        candidates = apply_moves(images[idx], moves)
        with torch.no_grad():
            cand_margins = key_margins(predict_logits(model, candidates, 4096), key[idx].repeat_interleave(per_image))
        cand_obj = grid_score(cand_margins, low, high, delta).view(len(idx), per_image)
        best_obj, best = cand_obj.min(1)
        improves = best_obj < current - 1e-6
        images[idx[improves]] = candidates.view(len(idx), per_image, *images.shape[1:])[improves, best[improves]]
        # finished (every margin in the band) or stuck (no move helps): as good as the grid gets here
        active[idx[~improves | (best_obj <= 0)]] = False
    return images


def keep_valid(model, images, fallback, key, delta):
    """Any trigger the grid phase left below delta falls back to its best valid continuous iterate."""
    with torch.no_grad():
        runner_up = key_margins(predict_logits(model, images, len(images)), key).min(1).values
    invalid = runner_up < delta
    images = images.clone()
    images[invalid] = fallback[invalid]
    return images


def margin_stats(model, triggers, key, delta, band, device):
    with torch.no_grad():
        margins = key_margins(predict_logits(model, triggers.to(device), len(triggers)), key).cpu()
    finite = torch.where(torch.isfinite(margins), margins, torch.full_like(margins, math.nan))
    runner_up = margins.min(1).values
    return {"runner_up_min": runner_up.min().item(), "runner_up_median": runner_up.median().item(),
            "runner_up_max": runner_up.max().item(),
            "mean_classes_in_band": ((finite >= delta) & (finite <= band * delta)).sum(1).float().mean().item(),
            "mean_classes_within_100_delta": (finite <= 100 * delta).sum(1).float().mean().item()}


def margin_starts(model, spec, key, config, device, test):
    start = setting(config, "MARGIN_START")
    if start == "natural":
        return natural_starts(model, test, key, spec.num_classes, device, least_confident=True)
    if start == "noise":
        gen = torch.Generator().manual_seed(setting(config, "CONTROL_SEED"))
        return torch.randint(0, 256, (len(key), *spec.shape), generator=gen, dtype=torch.uint8)
    if start == "paper":
        return _paper(model, spec, key, config, device, test)[0]
    raise UserError(f"unknown margin start {start!r}: choose natural, noise or paper")


# Fragility is measured with noise drawn from this seed (plus CONTROL_SEED): far from the small seeds the
# comparison's attacks use (fragile/comparison.py), so selection never sees the perturbations it is scored on.
SELECTION_SEED = 987_654_321


@torch.no_grad()
def estimated_flip_rate(model, images, key, sigma, draws, seed):
    """Per trigger: the fraction of ``draws`` copies of the model with Gaussian noise of ``sigma`` on every
    parameter under which its label leaves the key -- how likely a random tamper is to expose it."""
    gen = torch.Generator().manual_seed(seed)
    flips = torch.zeros(len(images))
    for _ in range(draws):
        noisy = copy.deepcopy(model)
        add_weight_noise(noisy, sigma, gen)
        flips += (predict_logits(noisy, images, 4096).argmax(1).cpu() != key.cpu()).float()
    return flips / max(1, draws)


def fragility_order(model, triggers, key, config):
    """Trigger indices, most fragile first: by the estimated flip rate under random weight noise (the
    selection's draws, never the evaluation's), ties broken by the smaller runner-up margin. A verifier
    that queries in this order and stops at the first mismatch needs the fewest queries. Returns
    (order, estimated flip rates)."""
    key = torch.as_tensor(key, device=triggers.device)
    rate = estimated_flip_rate(model, triggers, key, setting(config, "MARGIN_NOISE_SIGMA"),
                               setting(config, "MARGIN_SELECT_DRAWS"), SELECTION_SEED + 1)
    with torch.no_grad():
        runner_up = key_margins(predict_logits(model, triggers, len(triggers)), key).min(1).values.cpu()
    order = sorted(range(len(triggers)), key=lambda i: (-rate[i].item(), runner_up[i].item()))
    return order, rate


def select_most_fragile(model, candidates, key, pool, delta, config, surrogates=()):
    """Of the ``pool`` candidates made for each key entry (entry i's are i, i + n, i + 2n, ...), keep the
    valid one (every margin >= delta) that is off its key on the most surrogates and, among those, that
    random weight noise flips most often. Returns (choice, noise flip rate, surrogate flip fraction)."""
    n = len(key) // pool
    with torch.no_grad():
        runner_up = key_margins(predict_logits(model, candidates, len(candidates)), key).min(1).values.cpu()
    rate = estimated_flip_rate(model, candidates, key, setting(config, "MARGIN_NOISE_SIGMA"),
                               setting(config, "MARGIN_SELECT_DRAWS"), SELECTION_SEED + setting(config, "CONTROL_SEED"))
    off_key = surrogate_flip_fraction(surrogates, candidates, key)
    score = torch.where(runner_up >= delta, 2 * off_key + rate, torch.full_like(rate, -1.0)).view(pool, n)
    choice = score.argmax(0) * n + torch.arange(n)
    return choice, rate, off_key


def surrogate_settings(config):
    return {"count": setting(config, "MARGIN_SURROGATES"), "steps": setting(config, "MARGIN_SURROGATE_STEPS"),
            "subset": setting(config, "MARGIN_SURROGATE_SUBSET"), "lr": setting(config, "MARGIN_SURROGATE_LR"),
            "momentum": setting(config, "MARGIN_SURROGATE_MOMENTUM"),
            "weight_decay": setting(config, "MARGIN_SURROGATE_WEIGHT_DECAY"),
            "batch_size": setting(config, "MARGIN_SURROGATE_BATCH_SIZE"),
            "mix_bn": setting(config, "MARGIN_SURROGATE_MIX_BN")}


def _margin(model, spec, key, config, device, test, train=None, log=print):
    """Ours: calibrate delta from the benign jitter; drive the margin of the key over every other class into
    [delta, band x delta] while the owner's fine-tuned surrogates put another class first, first with
    straight-through 8-bit Adam, then on the 8-bit grid; of several such candidates per key entry keep the
    one off its key on the most surrogates and, among those, flipped most often by random weight noise."""
    pool = setting(config, "MARGIN_POOL")
    if pool < 1:
        raise UserError(f"--margin-pool must be at least 1 (got {pool})")
    pooled_key = list(key) * pool
    starts = margin_starts(model, spec, pooled_key, config, device, test)
    jitter, delta = benign_delta(model, starts, config, device, log)
    key_t = torch.tensor(pooled_key, device=device)
    band = setting(config, "MARGIN_BAND")
    surrogates = fine_tuned_surrogates(model, train, spec, surrogate_settings(config), device, log)
    images, fallback = continuous_margin_phase(model, starts, key_t, delta, config, device, log, surrogates)
    images = grid_margin_phase(model, images, key_t, delta, config, device, log)
    images = keep_valid(model, images, fallback, key_t, delta)
    choice, rate, off_key = select_most_fragile(model, images, key_t, pool, delta, config, surrogates)
    images, starts, key_t = images[choice], starts[choice.to(starts.device)], key_t[choice.to(device)]
    final_jitter = measure_jitter(model, images, envelope=setting(config, "ENVELOPE"))
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
    meta = {"delta": delta, "delta_safety_factor": setting(config, "MARGIN_SAFETY"), "band": band,
            "benign_jitter": jitter, "benign_jitter_on_triggers": final_jitter, "margins": stats,
            "start": setting(config, "MARGIN_START"), "pool": pool,
            "selection_noise_sigma": setting(config, "MARGIN_NOISE_SIGMA"),
            "surrogates": dict(surrogate_settings(config), gap=setting(config, "MARGIN_SURROGATE_GAP"))}
    if setting(config, "MARGIN_START") == "natural":
        meta["psnr_to_start"] = psnr_summary(images, starts)
    return images.cpu(), {"start_images": starts.cpu(), "meta": meta}


METHODS = {"paper": _paper, "random": _random, "natural": _natural, "ftg": _ftg, "margin": _margin}


def generate(method, model, spec, key, config, device, test, train=None):
    """(uint8 triggers on the CPU, info dict) for ``method``. ``train`` is needed by ``margin`` with surrogates."""
    if method not in METHODS:
        raise UserError(f"unknown trigger method {method!r}: choose one of {', '.join(METHODS)}")
    return METHODS[method](model, spec, key, config, device, test, train=train)


def needs_training_data(method, config):
    return method == "margin" and setting(config, "MARGIN_SURROGATES") > 0
