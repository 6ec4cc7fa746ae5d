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


def check_query_order(order, n):
    """A recorded query order must be a permutation of the n triggers (it is read from the trigger metadata)."""
    if order is None:
        return None
    if not isinstance(order, list) or sorted(order) != list(range(n)) or any(isinstance(i, bool) for i in order):
        raise UserError(f"the trigger metadata's query_order is not a permutation of the {n} triggers: the trigger "
                        f"set is corrupt (regenerate it, or restore its meta.json)")
    return order


def check_tolerance(max_mismatches, n):
    """--max-mismatches: at least 0, and below the number of triggers (tolerating all of them decides nothing)."""
    if isinstance(max_mismatches, bool) or not isinstance(max_mismatches, int) or not 0 <= max_mismatches < n:
        raise UserError(f"--max-mismatches must be an integer in 0..{n - 1} for {n} triggers, got {max_mismatches!r}")
    return max_mismatches


def compare(returned, key, num_classes, max_mismatches=0, order=None):
    """The verification report: matches, mismatches with expected and returned labels, verdict, p-value, and
    (given the trigger set's query order) the queries a stop-at-first-mismatch verifier would have made.
    Refused unless there is exactly one returned label per key label: a verdict on fewer answers than triggers
    would be no verdict at all."""
    returned = [int(x) for x in returned]
    if len(returned) != len(key) or not key:
        raise UserError(f"{len(returned)} labels came back for {len(key)} triggers: no verdict without an answer "
                        f"for every trigger")
    check_tolerance(max_mismatches, len(key))
    check_query_order(order, len(key))
    if not isinstance(num_classes, int) or num_classes < 2:
        raise UserError(f"the number of classes must be at least 2, got {num_classes!r}")
    mismatched = [{"index": i, "expected": k, "returned": r} for i, (k, r) in enumerate(zip(key, returned)) if k != r]
    matches = len(key) - len(mismatched)
    return {"matches": matches, "n": len(key), "match_rate": matches / len(key), "mismatches": mismatched,
            "verdict": "tampered" if len(mismatched) > max_mismatches else "intact",
            "p_value": chance_p_value(matches, len(key), num_classes),
            "queries_to_first_mismatch": (queries_to_detection([r != k for r, k in zip(returned, key)], order)
                                          if order else None)}


def check_made_for(model, model_meta, watermark, device):
    """The triggers must be this model's: the weights hash they were made for is the one computed from the weights
    loaded, and the untouched model labels every trigger as the key does. Otherwise every attack on it (eval.py)
    would report a detection that was there before it started."""
    bound = watermark.meta.get("weights_sha256")
    if bound and bound != model_meta["weights_sha256"]:
        raise UserError(f"the triggers {watermark.triggers_path} were made for weights {bound[:16]}…, not this "
                        f"model's {model_meta['weights_sha256'][:16]}…: pass --model the watermarked checkpoint, or "
                        f"--triggers/--method the set made for this one")
    off = int((query_labels(model, watermark.triggers.to(device)) != torch.tensor(watermark.key)).sum())
    if off:
        raise UserError(f"the untouched model already disagrees with the key on {off} of {len(watermark.key)} "
                        f"triggers: these triggers were not made for it")
