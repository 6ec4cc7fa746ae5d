"""The 8-bit grid phase of ``margin`` triggers: greedy single-pixel +-1 moves (and compounds of the best
ones), ranked by the linearised margins and each evaluated exactly, until every margin sits in the band."""
import math

import torch

from ...core.data import to_float
from ...core.training import predict_logits
from .band import band_limits, describe_margins, grid_score
from .common import key_margins

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


def grid_margin_phase(model, images, key, delta, band, rounds, count, device, log):
    """Greedy moves on the 8-bit grid: each of ``rounds`` rounds, every trigger takes the exactly evaluated best
    of its ``count`` candidate moves (ranked by the linearised margins) if that lowers the band penalty. What is
    optimised here is exactly the uint8 image that will be exported."""
    low, high = band_limits(delta, band)
    images = images.clone().to(device)
    active = torch.ones(len(key), dtype=torch.bool, device=device)
    for round_ in range(rounds + 1):
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
