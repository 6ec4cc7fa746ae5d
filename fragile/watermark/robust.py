"""The robust comparator: an ownership watermark embedded as a backdoor (Adi et al. 2018).

A set of abstract images (seeded random patterns) with random labels is mixed into every training
batch, so the model memorizes them. It is the opposite property to ours: a robust watermark should
survive fine-tuning (or come back after brief training on the original data), where the fragile
one must break.
"""
import torch
import torch.nn.functional as F

from ..core.data import to_float
from ..core.training import predict_logits

PER_BATCH = 16  # trigger samples appended to every batch


def make_trigger_set(spec, n, seed):
    """n abstract images (smooth random colour blobs) with random labels, reproducible from ``seed``."""
    gen = torch.Generator().manual_seed(10_000 + seed)
    c, h, w = spec.shape
    coarse = torch.rand(n, c, h // 4, w // 4, generator=gen)
    images = F.interpolate(coarse, size=(h, w), mode="nearest")
    images = (images * 255).round().to(torch.uint8)
    labels = torch.randint(0, spec.num_classes, (n,), generator=gen)
    return {"images": images, "labels": labels}


def mixer(trigger_set, device, per_batch=PER_BATCH):
    """A batch transform appending ``per_batch`` random trigger samples to each training batch."""
    images = to_float(trigger_set["images"].to(device))
    labels = trigger_set["labels"].to(device)

    def transform(batch_images, batch_labels):
        pick = torch.randint(0, len(labels), (per_batch,), device=device)
        return torch.cat([batch_images, images[pick]]), torch.cat([batch_labels, labels[pick]])
    return transform


def trigger_accuracy(model, trigger_set):
    logits = predict_logits(model, trigger_set["images"])
    return (logits.argmax(1).cpu() == trigger_set["labels"].cpu()).float().mean().item()


def to_payload(trigger_set):
    return None if trigger_set is None else {k: v.cpu() for k, v in trigger_set.items()}


def describe(trigger_set):
    return None if trigger_set is None else {"kind": "adi2018-abstract", "n": len(trigger_set["labels"])}
