"""The band and the 8-bit grid phase of ``margin`` triggers (margin.py runs them): where a trigger must sit, how
far it is from there, and greedy single-pixel moves on the uint8 image until it is there, in the model's own
arithmetic or in each named deployment's (margin_deploy.py)."""
import functools
import math

import torch
import torch.nn.functional as F

from ...core.data import to_float
from ...core.training import predict_logits
from .common import key_margins


# ----------------------------------------------------------------------------- the band
# Every other class between delta and band x delta below the key class on the deployed model: close enough
# that tampering moves it across, far enough that no benign change does. Scores, checks and statistics of
# where a trigger sits relative to that band; both phases of margin.py minimise ``grid_score``.

INVALID = 1e9   # any 8-bit image with a margin below the band's floor scores worse than every valid one


def band_limits(delta, band):
    """The band optimised for: [1.25 delta, band x delta]. The quarter delta of headroom absorbs the jitter
    between the batches margins are measured in here and the all-at-once export check."""
    return 1.25 * delta, band * delta


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


def describe_margins(margins, delta, high):
    finite = torch.where(torch.isfinite(margins), margins, torch.full_like(margins, math.nan))
    runner_up = margins.min(1).values
    in_band = ((finite >= delta) & (finite <= high)).sum(1).float()
    return (f"runner-up margin median {runner_up.median().item():.2e} (min {runner_up.min().item():.2e}), "
            f"classes in band {in_band.mean().item():.1f}/{margins.shape[1] - 1}, "
            f"on key {int((runner_up > 0).sum())}/{len(runner_up)}")


def combined_score(targets, band):
    """``grid_score`` over several ``targets``, a list of (margins, delta): one per arithmetic a trigger must sit in
    the band of (the model itself, or each named deployment with its own delta). Still lexicographic: invalid in
    any one of them (by the summed violations) is worse than valid in all (by the summed excess), so no gain in
    one deployment's excess ever buys a violation in another. One target scores exactly as ``grid_score``."""
    scores = [band_scores(m, *band_limits(d, band), d) for m, d in targets]
    violation = functools.reduce(torch.add, [v for v, _ in scores])
    excess = functools.reduce(torch.add, [e for _, e in scores])
    return torch.where(violation > 0, INVALID + violation, excess)


def margin_jacobian(model, images, key):
    """Margins (N, K) of uint8 ``images`` and their Jacobian (N, K, pixels) per 0..255 level."""
    x = to_float(images).requires_grad_(True)
    logits = model(x)
    rows = [torch.autograd.grad(logits[:, c].sum(), x, retain_graph=c < logits.shape[1] - 1)[0].flatten(1)
            for c in range(logits.shape[1])]  # samples are independent (eval mode): one pass per class
    # d/dx is per unit of [0, 1]; one 8-bit level is 1/255 of that. Margin j = logit[key] - logit[j].
    jac = torch.stack(rows, 1) / 255
    jac = jac.gather(1, key[:, None, None].expand(-1, 1, jac.shape[2])) - jac
    return key_margins(logits.detach(), key), jac


def candidate_moves(images, targets, jac, band, count):
    """The ``count`` single-pixel +-1 moves per image with the best objective predicted by the linearised
    margins of every target (margins, delta), plus compound moves (the best 2, 4, 8 and 16 applied together)
    that cover ground faster. The model's Jacobian linearises every target: a deployment computes the same
    function up to a small offset, which the exact evaluation of each candidate then accounts for.

    Returns a list of (flat pixel indices, signs) pairs per image."""
    flat = images.flatten(1).long()
    pixels = flat.shape[1]
    # first order: a +1 move of pixel i shifts every margin by jac[:, :, i], a -1 move by minus that
    predicted = [(torch.cat([m[:, :, None] + jac, m[:, :, None] - jac], 2).transpose(1, 2), d)   # (N, 2P, K)
                 for m, d in targets]
    objective = combined_score(predicted, band)                                                # (N, 2P)
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


def grid_margin_phase(model, images, key, delta, band, rounds, count, device, log, exact=None):
    """Greedy moves on the 8-bit grid: each of ``rounds`` rounds, every trigger takes the exactly evaluated best
    of its ``count`` candidate moves (ranked by the linearised margins) if that lowers the band penalty. What is
    optimised here is exactly the uint8 image that will be exported. ``exact`` (uint8 images, key) -> a list of
    (margins, delta) measures the margins in other arithmetic (margin_deploy: each named deployment, with its own
    delta); by default they are the model's own, against ``delta``."""
    images = images.clone().to(device)
    active = torch.ones(len(key), dtype=torch.bool, device=device)
    for round_ in range(rounds + 1):
        idx = torch.nonzero(active).flatten()
        if len(idx) == 0:
            break
        margins, jac = margin_jacobian(model, images[idx], key[idx])
        targets = [(margins, delta)] if exact is None else exact(images[idx], key[idx])
        current = combined_score(targets, band)
        if round_ % 25 == 0:
            log(f"grid round {round_}: " + "; ".join(describe_margins(m, d, band * d) for m, d in targets)
                + f" ({len(idx)} triggers still moving)")
        moves = candidate_moves(images[idx], targets, jac, band, count)
        per_image = len(moves[0])
        candidates = apply_moves(images[idx], moves)
        cand_key = key[idx].repeat_interleave(per_image)
        with torch.no_grad():
            cand_targets = ([(key_margins(predict_logits(model, candidates, 4096), cand_key), delta)] if exact is None
                            else exact(candidates, cand_key))
        cand_obj = combined_score(cand_targets, band).view(len(idx), per_image)
        best_obj, best = cand_obj.min(1)
        improves = best_obj < current - 1e-6
        images[idx[improves]] = candidates.view(len(idx), per_image, *images.shape[1:])[improves, best[improves]]
        # finished (every margin in the band) or stuck (no move helps): as good as the grid gets here
        active[idx[~improves | (best_obj <= 0)]] = False
    return images
