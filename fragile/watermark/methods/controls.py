"""Controls: triggers that nothing optimised, to show what the optimised methods add.

    random   uniform-noise images; the key becomes the model's own labels for them
    natural  the least-confident correctly classified test images of each key class
"""
from dataclasses import dataclass

import torch

from .common import labels_of, natural_starts


@dataclass(frozen=True)
class ControlParams:
    control_seed: int = 0    # which noise images are drawn


def generate_random(job, p):
    """Uniform-noise images, labelled by the model. Nothing is optimised, so the drawn key is replaced in place
    by the model's labels (the caller saves the list it passed in)."""
    gen = torch.Generator().manual_seed(p.control_seed)
    images = torch.randint(0, 256, (len(job.key), *job.spec.shape), generator=gen, dtype=torch.uint8)
    job.key[:] = labels_of(job.model, images, job.device).tolist()
    return images, {"meta": {"key_source": "the model's labels of the noise images"}}


def generate_natural(job, p=None):
    """The least-confident correctly classified test images, one per key entry, of the key's class."""
    images = natural_starts(job.model, job.test, job.key, job.spec.num_classes, job.device, least_confident=True)
    return images, {"meta": {"start": "least-confident correctly classified test images"}}
