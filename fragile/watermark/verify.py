"""Black-box verification: query top-1 labels of the triggers and compare them with the secret key, and
the statistics of a verdict (p-value, queries until a verifier sees the tampering)."""
import math

import torch

from ..core.cli import UserError
from ..core.devices import tf32
from ..core.training import predict_logits


def check_compatible(triggers, key, input_shape, num_classes):
    """One clear error for triggers or keys that cannot belong to this model."""
    if list(triggers.shape[1:]) != list(input_shape):
        raise UserError(f"triggers have shape {tuple(triggers.shape[1:])} but the model takes {tuple(input_shape)}")
    if len(key) != len(triggers):
        raise UserError(f"key has {len(key)} labels but there are {len(triggers)} triggers")
    bad = [k for k in key if not 0 <= k < num_classes]
    if bad:
        raise UserError(f"key labels out of range for {num_classes} classes: {bad[:5]}")


@torch.no_grad()
def query_labels(model, triggers, batch_size=None):
    """The deployed model's top-1 labels for uint8 triggers, in exact fp32 (no TF32: the decision must not
    depend on fast-math settings). ``batch_size=None`` queries all triggers at once."""
    with tf32(False):
        logits = predict_logits(model, triggers, batch_size or len(triggers))
    return logits.argmax(1).cpu()


def chance_p_value(matches, n, num_classes):
    """P(at least ``matches`` of ``n`` uniformly random labels agree with the key)."""
    p = 1.0 / num_classes
    return min(1.0, sum(math.comb(n, k) * p ** k * (1 - p) ** (n - k) for k in range(matches, n + 1)))


def queries_to_detection(flipped_mask, order, max_mismatches=0):
    """How many single-trigger queries, made in ``order``, a verifier that stops once it has seen more than
    ``max_mismatches`` mismatches needs: 1-based, None if it never gets there. ``flipped_mask[i]`` is True
    where trigger i's label differs from the key."""
    hits = torch.as_tensor(flipped_mask, dtype=torch.bool)[torch.as_tensor(order, dtype=torch.long)].nonzero().flatten()
    return int(hits[max_mismatches]) + 1 if len(hits) > max_mismatches else None


def expected_queries(flipped, n, max_mismatches=0):
    """The same count averaged over uniformly random query orders: the (m+1)-th of ``flipped`` marked positions
    among n sits at (m+1)(n+1)/(f+1) on average. None when ``flipped`` cannot be detected."""
    if flipped <= max_mismatches:
        return None
    return (max_mismatches + 1) * (n + 1) / (flipped + 1)


def top2_margins(logits):
    """Top-1 minus runner-up logit, per row."""
    top2 = logits.topk(2, dim=1).values
    return top2[:, 0] - top2[:, 1]


@torch.no_grad()
def labels_and_margins(model, images_uint8, batch_size=1024):
    """Top-1 labels and top-1 minus runner-up logit margins of uint8 images, in fp32."""
    logits = predict_logits(model, images_uint8, batch_size)
    return logits.argmax(1).cpu(), top2_margins(logits).cpu()


def margin_summary(margins):
    m = margins.double()
    return {"min": m.min().item(), "median": m.median().item(), "mean": m.mean().item(), "max": m.max().item()}


def compare(returned, key, num_classes, max_mismatches=0, order=None):
    """The verification report: matches, mismatches with expected and returned labels, verdict, p-value, and
    (given the trigger set's query order) the queries a stop-at-first-mismatch verifier would have made."""
    returned = [int(x) for x in returned]
    mismatched = [{"index": i, "expected": k, "returned": r} for i, (k, r) in enumerate(zip(key, returned)) if k != r]
    matches = len(key) - len(mismatched)
    return {"matches": matches, "n": len(key), "match_rate": matches / len(key), "mismatches": mismatched,
            "verdict": "tampered" if len(mismatched) > max_mismatches else "intact",
            "p_value": chance_p_value(matches, len(key), num_classes),
            "queries_to_first_mismatch": (queries_to_detection([r != k for r, k in zip(returned, key)], order)
                                          if order else None)}
