"""FTG triggers: Fragile Trigger Generation (H. Yin, Z. Yin, Gao, Su, Zhang, Luo; J. Inf. Intell. 2024), on the
8-bit grid.

Each trigger is a natural image pushed by signed-gradient pixel steps down the variance of the model's softmax,
towards where every class is equally likely (the variance is the squared distance to the uniform distribution,
over K - 1); its label is whatever the model then says. Read from the public code
(edu-yinzhaoxia/FTG-Score-based-black-box-watermarking-by-fragile-trigger-generation-for-deep-model:
fragilesample_set.py, the loop it runs for CIFAR-10; effectiveness_finetune.py and test_times.py for the labels):

faithful  the loss: the unbiased variance of the K softmax probabilities of the raw logits (no temperature; the
          code's cross-entropy term is weighted 0 and its x100 scale does not change a sign); the start: the first
          N (--num-triggers; the code's 100) training images in their stored order (the code: the first batch of
          an unshuffled loader, any class, not checked for being classified correctly); the step
          ``x <- clip(x - 1e-5 sign(grad), 0, 1)``, 10000 of them (its CIFAR-10 numbers), no norm ball, no early
          stop; the key: the model's own label of each final trigger (``job.key`` is rewritten in place, as aid
          and random do); the last iterate is kept.
differs   (1) the 8-bit grid: the forward pass sees the rounded image (straight-through), so the exported PNG is
          what was optimised; the code optimises and saves float tensors. A start is on the grid and the gradient
          of the rounded image stays put until a pixel changes level, so at 1e-5 a pixel moves one grey level
          only after 196 steps of one sign (0.5/255 / 1e-5), then every 392: 10000 steps are at most 25 levels
          per pixel, taken as whole-level signed steps. (2) the label floor: the kept iterate is the last one
          whose label leads its runner-up by at least the measured benign jitter (below it the exported label is
          a coin toss); a trigger with none is an error, never a shorter set. (3) a batch of images per step,
          where the code takes one at a time: the loss and the step are per image and the model is in eval mode,
          so the steps are the same. (4) the model normalises its input itself (the code's models take raw
          [0, 1] images); steps are in [0, 1] pixel units in both. (5) the code's numbers for other datasets vary
          between its scripts (MNIST 1e-4 for 3000 or 10000 steps, CIFAR-100 1e-5 x 3000, Tiny-ImageNet 1e-3
          on 0..255 pixels): pass them with --ftg-steps and --ftg-step-size. (6) the paper also describes other target
          distributions ("prediction probability masks"); its code has only the uniform one, and so has this.
options   our earlier FTG-style choices, kept beside the faithful default: ``start="key-class"`` starts from a
          random correctly classified test image of each drawn key class and keeps the drawn key (the key stays
          secret and independent of the model; the starts are images the model never trained on);
          ``select="lowest"`` keeps the lowest-variance iterate above the floor instead of the last one; and the
          former schedule, 1000 steps of 0.25/255 (``--ftg-steps 1000 --ftg-step-size 0.00098``).
measured  one draw, one model (resnet8, 3 epochs on 5,000 Fashion-MNIST images, test accuracy 0.65), 30 triggers
          each; flipped after one epoch of fine-tuning / under Gaussian noise sigma 1e-3 on every weight (20
          draws): faithful 83% / 7.7%; select=lowest 87% / 7.8%; start=key-class 23% / 27.5%; 1000 steps of
          0.25/255 93% / 23% (PSNR to the start 14 dB, against 24); all three former choices 27% / 38%; the 30
          starts unchanged 40% / 2.7%. FTG's own float loop from the same starts: 87% / 7.3%, and rounding its
          triggers to 8 bits kept all 30 labels: the grid costs it little here. docs/sensitivity.md ("ftg: FTG's
          code against the options") has the table and the settings.
"""
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ...core.cli import UserError
from ...core.data import to_float
from ..trigger_io import straight_through_quantize
from .common import BestIterates, label_floor, labels_of, natural_starts, on_key, psnr_summary, require_all

STARTS = ("train", "key-class")
SELECTIONS = ("last", "lowest")


@dataclass(frozen=True)
class FTGParams:
    """The defaults are the FTG code's for CIFAR-10 (fragilesample_set.py)."""
    steps: int = 10000               # signed-gradient steps
    step_size: float = 1e-5          # per step, in [0, 1] pixel units
    start: str = "train"             # train: the first training images, key = the model's labels (FTG) |
                                     # key-class: random correctly classified test images of the drawn key's classes
    select: str = "last"             # last: the last iterate above the label floor (FTG keeps its last) |
                                     # lowest: the lowest-variance one above it
    control_seed: int = 0            # which test images key-class starts from
    envelope: list = field(default_factory=lambda: ["exact"])   # whose jitter sets the label floor


def softmax_variance(logits):
    """Per image: the unbiased variance of its softmax probabilities, 0 when every class is equally likely."""
    return F.softmax(logits, dim=1).var(dim=1)


def signed_step_(x, grad, step_size):
    """In place: FTG's update, one ``step_size`` against the sign of the gradient, then clipped to [0, 1]."""
    return x.sub_(step_size * grad.sign()).clamp_(0, 1)


def check_params(p):
    if p.start not in STARTS:
        raise UserError(f"unknown ftg start {p.start!r}: choose {' or '.join(STARTS)} (--ftg-start)")
    if p.select not in SELECTIONS:
        raise UserError(f"unknown ftg selection {p.select!r}: choose {' or '.join(SELECTIONS)} (--ftg-select)")


def ftg_starts(job, p):
    """``p.start`` train: the first ``len(job.key)`` training images, in order (FTG's code); key-class: one random
    correctly classified test image of each key entry's class."""
    if p.start == "key-class":
        return natural_starts(job.model, job.test, job.key, job.spec.num_classes, job.device, least_confident=False,
                              seed=p.control_seed)
    if job.train is None or len(job.train) < len(job.key):
        have = 0 if job.train is None else len(job.train)
        raise UserError(f"ftg starts from the first {len(job.key)} training images and {have} were given: "
                        f"ask for fewer triggers or pass --ftg-start key-class")
    return job.train.images[:len(job.key)].cpu()


def selection_loss(p, variance, step):
    """What the best-iterate bookkeeping minimises: the variance (lowest), or minus the step (last), so that the
    latest iterate above the floor wins."""
    return variance if p.select == "lowest" else torch.full_like(variance, -float(step))


def generate(job, p):
    """FTG's signed-gradient descent of the softmax variance on the 8-bit image (straight-through rounding); the
    kept iterate must carry its label (train: the model's own; key-class: the drawn key's) above the label floor."""
    check_params(p)
    model, device = job.model, job.device
    starts = ftg_starts(job, p)
    jitter, floor = label_floor(model, starts, p.envelope, device)   # just enough margin to export
    key = torch.tensor(job.key, device=device)
    x = to_float(starts.to(device)).requires_grad_(True)
    best = BestIterates(starts.to(device))
    model.eval().requires_grad_(False)
    for step in range(p.steps + 1):
        image = straight_through_quantize(x)
        logits = model(image)
        variance = softmax_variance(logits)
        label = logits.argmax(1) if p.start == "train" else key
        best.offer(image, selection_loss(p, variance, step), on_key(logits, label, floor))   # the 8-bit image seen
        if step == p.steps:
            break
        grad, = torch.autograd.grad(variance.sum(), x)
        with torch.no_grad():
            signed_step_(x, grad, p.step_size)
        if step % max(1, p.steps // 10) == 0:
            job.log(f"ftg step {step}: mean softmax variance {variance.mean().item():.3e}")
    require_all(best.found, f"kept a label above the benign jitter ({floor:.2e})",
                "try another --ftg-step-size or a narrower --envelope")
    triggers = best.images.cpu()
    if p.start == "train":
        job.key[:] = labels_of(model, triggers, device).tolist()   # the caller saves the list it passed in
    with torch.no_grad():
        kept_variance = softmax_variance(model(to_float(triggers.to(device))))
    return triggers, {"start_images": starts,
                      "meta": {"start": ("the first training images" if p.start == "train" else
                                         "random correctly classified test images of the key class"),
                               "key_source": ("the model's labels of the triggers" if p.start == "train" else
                                              "the drawn key"),
                               "select": p.select, "softmax_variance_mean": kept_variance.mean().item(),
                               "benign_jitter": jitter, "label_floor": floor,
                               "psnr_to_start": psnr_summary(triggers, starts)}}
