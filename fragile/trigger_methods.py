"""Where triggers come from. Every method returns uint8 triggers that carry the key's labels.

    paper    the ICIP-2022 generator (fragile.triggers.generate_paper), unchanged
    random   control: uniform-noise images; the key becomes the model's own labels for them
    natural  control: the least-confident correctly classified test images of each key class
    ftg      FTG-style: signed-gradient pixel steps minimising the softmax variance, from natural images
    margin   ours: every trigger's margin over the other classes driven into [delta, band x delta],
             delta calibrated from the measured benign jitter, on the 8-bit grid throughout

All of them optimise (if at all) the 8-bit image itself -- straight-through rounding while the
pixels are continuous, then moves on the 0..255 grid -- so the exported PNG is what was optimised.
A method returns ``(uint8 triggers on the CPU, info)``; ``info["meta"]`` (plain values) goes into
the trigger metadata, every other entry (tensors) into triggers.pt.
"""
import math

import torch
import torch.nn.functional as F

from .benign import calibrate_delta, measure_jitter
from .cli import UserError
from .data import to_float
from .training import predict_logits
from .triggers import generate_paper, quantize, straight_through_quantize

# Defaults for the knobs generate_samples.py exposes as header constants (a caller that passes a
# bare config, such as a test, gets these).
DEFAULTS = {
    "CONTROL_SEED": 0,            # random / natural / ftg / margin: which noise or test images are drawn
    "FTG_STEPS": 1000,            # signed-gradient steps (FTG takes thousands)
    "FTG_STEP_SIZE": 0.25 / 255,  # per step, in [0, 1] pixel units
    "MARGIN_START": "natural",    # natural | noise | paper: where the margin optimisation starts
    "MARGIN_SAFETY": 10.0,        # delta = this x the largest benign logit jitter measured
    "MARGIN_BAND": 4.0,           # every other class is driven to within band x delta of the key class
    "MARGIN_STEPS": 300,          # continuous (straight-through 8-bit) Adam steps
    "MARGIN_LR": 2.0 / 255,       # their initial step, in [0, 1] pixel units (cosine decay)
    "MARGIN_FRAGILITY": 1.0,      # weight of the expected-survival term (0: margins only)
    "MARGIN_NOISE_DRAWS": 4,      # weight-noise draws per step for that term
    "MARGIN_NOISE_SIGMA": 1e-3,   # their standard deviation (relative to each tensor's RMS)
    "MARGIN_GRID_ROUNDS": 200,    # rounds of single-pixel +-1 moves on the 8-bit grid
    "MARGIN_CANDIDATES": 32,      # moves per trigger evaluated exactly in each round
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
    """Measure the benign jitter on ``images`` and turn it into delta (recorded in the trigger metadata)."""
    jitter = measure_jitter(model, images.to(device))
    delta = calibrate_delta(jitter, setting(config, "MARGIN_SAFETY"))
    log(f"benign logit jitter {jitter['max']:.2e} (largest logit {jitter['logit_scale']:.1f}): "
        f"delta = {delta:.2e}")
    return jitter, delta


# ----------------------------------------------------------------------------- paper and the controls

def _paper(model, spec, key, config, device, test):
    cfg = {"latent_seed": config["LATENT_SEED"], "latent_dim": config["LATENT_DIM"],
           "gen_channels": config["GEN_CHANNELS"], "lr": config["LR"], "beta1": config["BETA1"],
           "beta2": config["BETA2"], "max_steps": config["MAX_STEPS"], "lam": config["LAMBDA"]}
    return generate_paper(model, spec, key, cfg, device)


def _random(model, spec, key, config, device, test):
    """Uniform-noise images, labelled by the model. A control: nothing is optimised, so the drawn key is
    replaced in place by the model's labels (the caller saves the list it passed in)."""
    gen = torch.Generator().manual_seed(setting(config, "CONTROL_SEED"))
    images = torch.randint(0, 256, (len(key), *spec.shape), generator=gen, dtype=torch.uint8)
    key[:] = labels_of(model, images, device).tolist()
    return images, {"meta": {"key_source": "the model's labels of the noise images"}}


def _natural(model, spec, key, config, device, test):
    """The least-confident correctly classified test images, one per key entry, of the key's class."""
    images = natural_starts(model, test, key, spec.num_classes, device, least_confident=True)
    return images, {"meta": {"start": "least-confident correctly classified test images"}}


# ----------------------------------------------------------------------------- FTG

def softmax_variance(logits):
    """Per-image variance of the softmax: 0 when every class is equally likely."""
    return F.softmax(logits, dim=1).var(dim=1)


def _ftg(model, spec, key, config, device, test, log=print):
    """FTG-style: signed-gradient steps on the 8-bit image (straight-through rounding) that minimise the
    softmax variance, from natural images of the key class. FTG has no label term; to keep the secret
    key each trigger keeps its lowest-variance iterate that still carries its key label by at least the
    measured benign jitter (without that floor the export itself would be a coin toss)."""
    starts = natural_starts(model, test, key, spec.num_classes, device, least_confident=False,
                            seed=setting(config, "CONTROL_SEED"))
    jitter, _ = benign_delta(model, starts, config, device, log)
    floor = max(jitter["max"], 1e-12)
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

def band_penalty(margins, delta, band):
    """Per trigger: how far its margins are outside [delta, band x delta]; falling below delta costs 10x.

    ``margins`` is (N, K) with +inf in the key column (ignored)."""
    finite = torch.isfinite(margins)
    m = torch.where(finite, margins, torch.zeros_like(margins))
    above = F.relu(m - band * delta)
    below = F.relu(delta - m)
    return torch.where(finite, above + 10 * below, torch.zeros_like(m)).sum(1)


def noisy_parameters(model, sigma, gen):
    """The model's parameters plus Gaussian noise of ``sigma`` x each tensor's RMS (a random tamper)."""
    noisy = {}
    for name, p in model.named_parameters():
        rms = p.detach().pow(2).mean().sqrt().clamp_min(1e-12)
        noisy[name] = p.detach() + sigma * rms * torch.randn(p.shape, generator=gen, device=p.device)
    return noisy


def survival(model, images, key, draws, sigma, gen, temperature):
    """Smooth estimate, per trigger, of P(the key stays on top under random weight noise)."""
    from torch.func import functional_call
    buffers = dict(model.named_buffers())
    total = 0
    for _ in range(draws):
        logits = functional_call(model, {**noisy_parameters(model, sigma, gen), **buffers}, (images,))
        total = total + torch.sigmoid(key_margins(logits, key).min(1).values / temperature)
    return total / draws


def continuous_margin_phase(model, starts, key, delta, config, device, log):
    """Adam on continuous pixels whose forward pass is the 8-bit image (straight-through rounding):
    every other class is pulled to within the band, and (optionally) the key is made unlikely to
    survive random weight noise."""
    band, steps = setting(config, "MARGIN_BAND"), setting(config, "MARGIN_STEPS")
    fragility, draws = setting(config, "MARGIN_FRAGILITY"), setting(config, "MARGIN_NOISE_DRAWS")
    sigma = setting(config, "MARGIN_NOISE_SIGMA")
    gen = torch.Generator(device=device).manual_seed(setting(config, "CONTROL_SEED"))
    x = to_float(starts.to(device)).requires_grad_(True)
    optimizer = torch.optim.Adam([x], lr=setting(config, "MARGIN_LR"))
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(1, steps), eta_min=0.05 / 255)
    model.eval().requires_grad_(False)
    for step in range(steps):
        images = straight_through_quantize(x)
        margins = key_margins(model(images), key)
        # log(1 + penalty/delta): scale-free, so a margin of 10 and one of 10 delta both keep moving
        loss = torch.log1p(band_penalty(margins, delta, band) / delta).sum()
        if fragility > 0 and draws > 0:
            loss = loss + fragility * survival(model, images, key, draws, sigma, gen, 10 * delta).sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        with torch.no_grad():
            x.clamp_(0, 1)
        if step % 50 == 0 or step == steps - 1:
            log(f"margin step {step}: {describe_margins(margins.detach(), delta, band)}")
    return quantize(x)


def describe_margins(margins, delta, band):
    finite = torch.where(torch.isfinite(margins), margins, torch.full_like(margins, math.nan))
    runner_up = margins.min(1).values
    in_band = ((finite >= delta) & (finite <= band * delta)).sum(1).float()
    return (f"runner-up margin median {runner_up.median().item():.2e} (min {runner_up.min().item():.2e}), "
            f"classes in band {in_band.mean().item():.1f}/{margins.shape[1] - 1}, "
            f"on key {int((runner_up > 0).sum())}/{len(runner_up)}")


def grid_objective(margins, delta, band):
    """The 8-bit pass minimises the band penalty, in units of delta."""
    return band_penalty(margins, delta, band) / delta


def candidate_moves(images, grad, count):
    """The ``count`` single-pixel +-1 moves per image that the gradient predicts to help most.

    Returns (flat pixel index, +1/-1) tensors of shape (N, count)."""
    flat_u, flat_g = images.flatten(1).long(), grad.flatten(1)
    gain_up = torch.where(flat_u < 255, -flat_g, torch.full_like(flat_g, -math.inf))  # predicted decrease
    gain_down = torch.where(flat_u > 0, flat_g, torch.full_like(flat_g, -math.inf))
    gains = torch.cat([gain_up, gain_down], dim=1)
    top = gains.topk(count, dim=1).indices
    pixels = top % flat_u.shape[1]
    signs = torch.where(top < flat_u.shape[1], 1, -1)
    return pixels, signs


def apply_moves(images, pixels, signs):
    """(N * count) candidate images: each image with one of its moves applied."""
    n, count = pixels.shape
    flat = images.flatten(1).long().repeat_interleave(count, dim=0)
    rows = torch.arange(n * count, device=images.device)
    flat[rows, pixels.flatten()] += signs.flatten()
    return flat.clamp(0, 255).to(torch.uint8).view(n * count, *images.shape[1:])


def grid_margin_phase(model, images, key, delta, config, device, log):
    """Greedy single-pixel +-1 moves on the 8-bit grid: each round, every trigger takes the exactly
    evaluated best of its gradient-ranked candidate moves, if it lowers the band penalty. What is
    optimised here is exactly the uint8 image that will be exported."""
    band, count = setting(config, "MARGIN_BAND"), setting(config, "MARGIN_CANDIDATES")
    images = images.clone().to(device)
    active = torch.ones(len(key), dtype=torch.bool, device=device)
    for round_ in range(setting(config, "MARGIN_GRID_ROUNDS")):
        x = to_float(images).requires_grad_(True)
        margins = key_margins(model(x), key)
        objective = grid_objective(margins, delta, band)
        grad, = torch.autograd.grad(objective.sum(), x)
        active &= objective.detach() > 0
        if not active.any():
            break
        idx = torch.nonzero(active).flatten()
        pixels, signs = candidate_moves(images[idx], grad[idx], count)
        candidates = apply_moves(images[idx], pixels, signs)
        with torch.no_grad():
            cand_logits = predict_logits(model, candidates, 4096)
            cand_obj = grid_objective(key_margins(cand_logits, key[idx].repeat_interleave(count)), delta, band)
        best_obj, best = cand_obj.view(len(idx), count).min(1)
        improves = best_obj < objective.detach()[idx] - 1e-9
        chosen = idx[improves]
        images[chosen] = candidates.view(len(idx), count, *images.shape[1:])[improves, best[improves]]
        active[idx[~improves]] = False  # no helpful move left for these: they are as good as the grid gets
        if round_ % 25 == 0:
            log(f"grid round {round_}: {describe_margins(margins.detach(), delta, band)}, "
                f"{int(active.sum())} still moving")
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


def _margin(model, spec, key, config, device, test, log=print):
    """Ours: calibrate delta from the benign jitter, then drive every trigger's margin over every other
    class into [delta, band x delta], first with straight-through 8-bit Adam, then on the 8-bit grid."""
    starts = margin_starts(model, spec, key, config, device, test)
    jitter, delta = benign_delta(model, starts, config, device, log)
    key_t = torch.tensor(key, device=device)
    band = setting(config, "MARGIN_BAND")
    images = continuous_margin_phase(model, starts, key_t, delta, config, device, log)
    images = grid_margin_phase(model, images, key_t, delta, config, device, log)
    final_jitter = measure_jitter(model, images)
    stats = margin_stats(model, images, key_t, delta, band, device)
    if stats["runner_up_min"] < delta:
        raise UserError(f"a margin trigger ended {stats['runner_up_min']:.2e} above its runner-up, below delta "
                        f"{delta:.2e}: raise --margin-grid-rounds or --margin-steps")
    log(f"margins: runner-up min {stats['runner_up_min']:.2e}, median {stats['runner_up_median']:.2e}; "
        f"{stats['mean_classes_in_band']:.1f} classes in band on average; jitter on the triggers "
        f"{final_jitter['max']:.2e} (delta {delta:.2e})")
    meta = {"delta": delta, "delta_safety_factor": setting(config, "MARGIN_SAFETY"), "band": band,
            "benign_jitter": jitter, "benign_jitter_on_triggers": final_jitter, "margins": stats,
            "start": setting(config, "MARGIN_START")}
    if setting(config, "MARGIN_START") == "natural":
        meta["psnr_to_start"] = psnr_summary(images, starts)
    return images.cpu(), {"start_images": starts, "meta": meta}


METHODS = {"paper": _paper, "random": _random, "natural": _natural, "ftg": _ftg, "margin": _margin}


def generate(method, model, spec, key, config, device, test):
    """(uint8 triggers on the CPU, info dict) for ``method``."""
    if method not in METHODS:
        raise UserError(f"unknown trigger method {method!r}: choose one of {', '.join(METHODS)}")
    return METHODS[method](model, spec, key, config, device, test)
