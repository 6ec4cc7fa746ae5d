"""The band ``margin`` triggers are driven into: every other class between delta and band x delta below the
key class on the deployed model -- close enough that tampering moves it across, far enough that no benign
change does. Scores, checks and statistics of where a trigger sits relative to that band."""
import math

import torch
import torch.nn.functional as F

from ...core.training import predict_logits
from .common import key_margins

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


def band_limits(delta, band):
    """The band optimised for: [1.25 delta, band x delta]. The quarter delta of headroom absorbs the jitter
    between the batches margins are measured in here and the all-at-once export check."""
    return 1.25 * delta, band * delta


def describe_margins(margins, delta, high):
    finite = torch.where(torch.isfinite(margins), margins, torch.full_like(margins, math.nan))
    runner_up = margins.min(1).values
    in_band = ((finite >= delta) & (finite <= high)).sum(1).float()
    return (f"runner-up margin median {runner_up.median().item():.2e} (min {runner_up.min().item():.2e}), "
            f"classes in band {in_band.mean().item():.1f}/{margins.shape[1] - 1}, "
            f"on key {int((runner_up > 0).sum())}/{len(runner_up)}")


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
