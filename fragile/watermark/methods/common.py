"""What the trigger methods share: the job they work on, margins over the key, natural starting images and
PSNR to them."""
import math
from dataclasses import dataclass

import torch

from ...core.cli import UserError
from ...core.data import Split
from ...core.training import predict_logits
from ..queries import top2_margins


@dataclass
class TriggerJob:
    """What every trigger method works on. ``key`` is the list of labels the triggers must carry (a control
    may rewrite it in place); ``test`` feeds the methods that start from natural images, ``train`` the
    surrogates of ``margin``."""
    model: torch.nn.Module          # frozen, in eval mode; never changed
    spec: object
    key: list
    device: torch.device
    test: Split = None
    train: Split = None
    progress: bool = False
    log: callable = print


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
    margin = top2_margins(logits)
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

