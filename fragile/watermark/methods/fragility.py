"""How easily a random tamper exposes each trigger, estimated on the owner's side.

Every trigger set records a query order, most fragile trigger first, so that a verifier that stops at the
first mismatch asks as few queries as it can; ``margin`` also keeps, of several candidates per key entry,
the most fragile one. Fragility is the fraction of noisy copies of the model (Gaussian noise on every
weight) under which a trigger's label leaves its key.
"""
import copy
from dataclasses import dataclass

import torch

from ...core.training import predict_logits
from ...core.weights import add_gaussian_noise
from .common import key_margins

# Fragility is measured with noise drawn from this seed (plus an offset): far from the small seeds the
# evaluation's attacks use, so selection never sees the perturbations it is scored on.
SELECTION_SEED = 987_654_321


@dataclass(frozen=True)
class FragilityParams:
    noise_sigma: float = 1e-4    # standard deviation of the noise on every weight (absolute)
    select_draws: int = 32       # noisy copies of the model per estimate


@torch.no_grad()
def estimated_flip_rate(model, images, key, sigma, draws, seed):
    """Per trigger: the fraction of ``draws`` copies of the model with Gaussian noise of ``sigma`` on every
    parameter under which its label leaves the key -- how likely a random tamper is to expose it."""
    gen = torch.Generator().manual_seed(seed)
    flips = torch.zeros(len(images))
    for _ in range(draws):
        noisy = copy.deepcopy(model)
        add_gaussian_noise(noisy.parameters(), sigma, gen)
        flips += (predict_logits(noisy, images, 4096).argmax(1).cpu() != key.cpu()).float()
    return flips / max(1, draws)


def fragility_order(model, triggers, key, p):
    """Trigger indices, most fragile first: by the estimated flip rate under random weight noise (the
    selection's draws, never the evaluation's), ties broken by the smaller runner-up margin. A verifier
    that queries in this order and stops at the first mismatch needs the fewest queries. Returns
    (order, estimated flip rates)."""
    key = torch.as_tensor(key, device=triggers.device)
    rate = estimated_flip_rate(model, triggers, key, p.noise_sigma, p.select_draws, SELECTION_SEED + 1)
    with torch.no_grad():
        runner_up = key_margins(predict_logits(model, triggers, len(triggers)), key).min(1).values.cpu()
    order = sorted(range(len(triggers)), key=lambda i: (-rate[i].item(), runner_up[i].item()))
    return order, rate
