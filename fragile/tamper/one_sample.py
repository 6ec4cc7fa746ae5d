"""One-sample model updates, BIVBench's subtlest modifications: forget one training image, or learn one new one.

    eval.py --attack unlearn   negative-gradient unlearning of one training image (UnlearnParams)
    eval.py --attack online    online learning of one unseen test image, with the clean loss kept (OnlineParams)

Both follow BIVBench's own scripts (CGCL-codes/BIVBench, data_remove/Unlearning.py and Online_learning.py):

- unlearn: Adam (lr 1e-4) on minus the cross-entropy of the one image, step by step, stopping after the first step
  that leaves the model's confidence on it below 0.95, at most 4 steps (its "hard to forget" break). The image is drawn from
  the training split by the run's seed (BIVBench: the i-th training image for the i-th model).
- online: one pass over the training data in batches of 128; every step moves each weight tensor by
  -lr x (g_clean + g_new projected orthogonally to g_clean), lr 1e-4, where g_clean is the gradient of the batch's
  loss and g_new that of the new image (so learning it does not undo the clean loss), stopping once the image is
  classified correctly with confidence above 0.95. The image is a correctly classified test image of confidence
  below 0.8 (drawn by the seed among those; any test image where there is none), as BIVBench picks it.

Batch-norm statistics stay frozen (eval mode) in both, as BIVBench's online learning does. One difference:
BIVBench's unlearning script turns train mode on after its first step, so its later steps also move the
batch-norm statistics with a training batch whose loss it never uses; here the update is the negative gradient
alone. ``max_steps`` 0 or ``lr`` 0 leaves the model unchanged: recorded as no change (``model_changed``,
recomputed from the weights), never as a missed detection.
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..core.data import to_float, train_batches
from ..core.devices import seed_everything
from . import records
from .context import note_change


@dataclass(frozen=True)
class UnlearnParams:
    lr: float = 1e-4            # Adam, on minus the image's cross-entropy
    max_steps: int = 4          # BIVBench's "hard to forget" break (0: no change)


@dataclass(frozen=True)
class OnlineParams:
    lr: float = 1e-4            # each step: weights -= lr x (g_clean + g_new projected off g_clean)
    batch_size: int = 128       # clean training images per step
    max_steps: int = 0          # 0: at most one pass over the training data


# BIVBench's stopping and picking rules, part of what the two modifications are (their strength is lr and steps):
FORGOTTEN_BELOW = 0.95   # unlearning stops once the model's top-1 confidence on the image is below this
LEARNED_ABOVE = 0.95     # online learning stops once the image is correct with top-1 confidence above this
UNSURE_BELOW = 0.8       # online learning's image: correctly classified with top-1 confidence below this


def probabilities(model, image):
    with torch.no_grad():
        return F.softmax(model(to_float(image[None])), dim=1)[0]


def confidence_and_label(model, image):
    """(top-1 softmax probability, top-1 label) of one uint8 image: what BIVBench's stopping rules read."""
    probs = probabilities(model, image)
    return probs.max().item(), int(probs.argmax())


def one_image(split, index):
    return split.images[index], split.labels[index:index + 1]


def pick_unseen(model, test, seed):
    """A test image the model classifies correctly but without confidence (below UNSURE_BELOW), by seed."""
    with torch.no_grad():
        probs = torch.cat([F.softmax(model(to_float(test.images[i:i + 512])), dim=1) for i in range(0, len(test), 512)])
    unsure = ((probs.argmax(1) == test.labels) & (probs.max(1).values < UNSURE_BELOW)).nonzero().flatten()
    pool = unsure if len(unsure) else torch.arange(len(test))
    return int(pool[torch.randint(len(pool), (1,), generator=torch.Generator().manual_seed(seed))])


def sample_record(ctx, model, setting, steps, image, label):
    """The watermark and clean accuracy, with the image's top-1 confidence and label and the probability of its
    own label (what unlearning lowers and online learning raises)."""
    probs = probabilities(model, image)
    return ctx.probe.point(model, setting, steps=steps, image_confidence=probs.max().item(),
                           image_label=int(probs.argmax()), label_probability=probs[int(label)].item())


def run_unlearn(ctx, p, seed):
    """Forget one training image by gradient ascent on its loss, recording the watermark before and after."""
    seed_everything(seed)
    index = int(torch.randint(len(ctx.train), (1,), generator=torch.Generator().manual_seed(seed)))
    image, label = (t.to(ctx.device) for t in one_image(ctx.train, index))
    model = ctx.fresh_copy().eval().requires_grad_(True)
    optimizer = torch.optim.Adam(model.parameters(), lr=p.lr)
    before = sample_record(ctx, model, "before", 0, image, label)
    steps = 0
    while steps < p.max_steps:   # BIVBench checks the confidence after each step, so the first is always taken
        loss = -F.cross_entropy(model(to_float(image[None])), label)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        steps += 1
        if confidence_and_label(model, image)[0] < FORGOTTEN_BELOW:
            break
    return finish(ctx, model, seed, before, steps, image, label, train_index=index)


def projected_step(model, clean_loss, new_loss, lr):
    """weights -= lr x (g_clean + g_new minus its projection on g_clean), tensor by tensor (BIVBench's rule)."""
    params = [w for w in model.parameters() if w.requires_grad]
    g_clean = torch.autograd.grad(clean_loss, params)
    g_new = torch.autograd.grad(new_loss, params)
    with torch.no_grad():
        for w, gc, gn in zip(params, g_clean, g_new):
            # why: the part of g_new along g_clean would trade clean loss for the new image; only the rest is kept
            along = (gn * gc).sum() / ((gc * gc).sum() + 1e-20)
            w -= lr * (gc + gn - along * gc)


def run_online(ctx, p, seed):
    """Learn one unseen test image by projected gradient steps on clean batches, recording before and after."""
    seed_everything(seed)
    model = ctx.fresh_copy().eval().requires_grad_(True)
    index = pick_unseen(model, ctx.probe.test, seed)
    image, label = (t.to(ctx.device) for t in one_image(ctx.probe.test, index))
    before = sample_record(ctx, model, "before", 0, image, label)
    gen = torch.Generator(device=ctx.train.images.device).manual_seed(seed)
    steps = 0
    for images, labels in train_batches(ctx.train, p.batch_size, ctx.spec, gen, ctx.finetune.augment):
        confidence, predicted = confidence_and_label(model, image)
        if (p.max_steps and steps >= p.max_steps) or (predicted == int(label) and confidence > LEARNED_ABOVE):
            break
        projected_step(model, F.cross_entropy(model(images), labels),
                       F.cross_entropy(model(to_float(image[None])), label), p.lr)
        steps += 1
    return finish(ctx, model, seed, before, steps, image, label, test_index=index)


def finish(ctx, model, seed, before, steps, image, label, **chosen):
    """The run record: the watermark and the image's confidence before and after, and whether anything changed."""
    after = sample_record(ctx, model, "after", steps, image, label)
    changed = note_change(ctx, model, f"seed {seed}: {steps} steps")
    if changed:
        ctx.log(f"  seed {seed}: {steps} steps, probability of the image's label {before['label_probability']:.3f} "
                f"-> {after['label_probability']:.3f}; {after['flipped']} triggers flipped, clean acc "
                f"{after['clean_accuracy']:.4f}")
    return records.run_record(seed, [before, after], model_changed=changed, steps=steps, **chosen), model
