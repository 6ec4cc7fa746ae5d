"""Black-box verification: query top-1 labels of the triggers and compare them with the secret key."""
import math

import torch

from .cli import UserError
from .devices import tf32
from .training import predict_logits


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


def queries_until_mismatch(returned, key, order):
    """How many single-trigger queries, made in ``order`` (most fragile trigger first, as recorded at
    generation), a verifier that stops at the first mismatch needs: 1-based, None if nothing mismatches."""
    for position, index in enumerate(order, start=1):
        if int(returned[index]) != int(key[index]):
            return position
    return None


def compare(returned, key, num_classes, max_mismatches=0, order=None):
    """The verification report: matches, mismatches with expected and returned labels, verdict, p-value, and
    (given the trigger set's query order) the queries a stop-at-first-mismatch verifier would have made."""
    returned = [int(x) for x in returned]
    mismatched = [{"index": i, "expected": k, "returned": r} for i, (k, r) in enumerate(zip(key, returned)) if k != r]
    matches = len(key) - len(mismatched)
    return {"matches": matches, "n": len(key), "match_rate": matches / len(key), "mismatches": mismatched,
            "verdict": "tampered" if len(mismatched) > max_mismatches else "intact",
            "p_value": chance_p_value(matches, len(key), num_classes),
            "queries_to_first_mismatch": queries_until_mismatch(returned, key, order) if order else None}


def match_rate(model, triggers, key_tensor):
    """Fraction of trigger labels equal to the key (the paper's metric) and the flipped count."""
    labels = query_labels(model, triggers)
    flipped = (labels != key_tensor.cpu()).sum().item()
    return 1 - flipped / len(key_tensor), flipped
