"""BIVBench's poisoning trainer, shared by ``clean-label``, ``targeted`` and the degradations (``random-class``,
``specific-class``, ``random-sample``): the protected model trained further on its training data with some poison
in it (copies of a few poison images, or relabelled samples), until the poison has taken.

BIVBench (CGCL-codes/BIVBench, backdoor_attack/deeplearning.py: ``backdoor_model_trainer`` with
``minimal_update=True``, which every task of its main.py uses, and ``train_with_minimal_update``) starts from the
protected model and trains every parameter with Adam (main.py's defaults: lr 1e-3, batch 64, cross-entropy) on
the training set with the poison images appended (100 copies of each: poisoned_dataset.py), shuffled, with the
dataset's own augmentation (its CIFAR-10 transform: flips and 4-pixel crops, the copies included). After its
steps 0, 10, 20, ... it measures the poison's accuracy (the copies, unaugmented, under their poison labels) and
stops once that is above 0.9; the trainer returns after the first epoch either way (its break flag is always set),
so one epoch is the most it ever trains, whatever ``--epoch`` says.

Here: fine_tune (fragile/tamper/finetune.py) with that optimizer, those batches and that stopping rule, recording
the watermark step by step; ``epochs`` (default 1) caps it. One difference: BIVBench's check leaves the model in
eval mode (its ``eval`` never switches back to train mode), so its batch-norm statistics move on its first step
only and stay frozen after; here they are frozen from the first step on (one step's statistics apart).
"""
import torch

from ..core.data import Split, to_float
from ..core.training import predict_logits
from .fine_prune import classifier_layer
from .finetune import fine_tune_run

CHECK_EVERY = 10    # BIVBench measures the poison's accuracy after its steps 0, 10, 20, ...
STOP_ABOVE = 0.9    # and stops once it is above this


def penultimate(model, images):
    """The final linear layer's input for float images in [0, 1] (BIVBench's ``model(x, latent=True)``: the pooled
    features), differentiable."""
    captured = []
    handle = classifier_layer(model).register_forward_hook(lambda module, inputs, output: captured.append(inputs[0]))
    try:
        model(images)
    finally:
        handle.remove()
    return captured[0]


@torch.no_grad()
def penultimate_batched(model, images, batch_size):
    """``penultimate`` of uint8 images (wherever they are), in eval mode and no-grad batches on the model's device."""
    model.eval()
    device = next(model.parameters()).device
    batches = (to_float(images[i:i + batch_size].to(device)) for i in range(0, len(images), batch_size))
    return torch.cat([penultimate(model, batch) for batch in batches])


def with_copies(split, images, labels, copies):
    """``split`` with ``copies`` copies of every poison image (uint8) and its label appended, as BIVBench appends
    its repeated poison to the training set."""
    images, labels = images.to(split.images.device), labels.to(split.labels.device)
    return Split(torch.cat([split.images, images.repeat_interleave(copies, 0)]),
                 torch.cat([split.labels, labels.repeat_interleave(copies, 0)]))


def labelled_share(model, images, labels, batch_size=1024):
    """The share of ``images`` (uint8) the model puts in ``labels``: BIVBench's poison accuracy."""
    predicted = predict_logits(model, images, batch_size).argmax(1).to(labels.device)
    return (predicted == labels).float().mean().item()


def train_until_poisoned(ctx, seed, data, images, labels, *, epochs, lr, batch_size, phase, what, extra_metrics,
                         check_every=CHECK_EVERY, stop_above=STOP_ABOVE):
    """BIVBench's trainer: a fresh copy of the protected model trained on ``data`` (Adam at ``lr``, batches of
    ``batch_size``, batch-norm statistics frozen, at most ``epochs`` epochs), stopping after the first checked step
    (1, 1 + check_every, ...) at which it gives more than ``stop_above`` of the poisoned ``images`` (uint8) their
    ``labels``. Returns (run record, model); the run says how many steps it took, whether the poison took
    (``goal_reached``) and at which step (``stopped_at_step``)."""
    reached = []

    def poison_taken(m, step):   # BIVBench's step 0, 10, 20, ... is our step 1, 11, 21, ... (counted after the step)
        if (step - 1) % check_every == 0 and labelled_share(m, images, labels, ctx.probe.eval_batch_size) > stop_above:
            reached.append(step)
        return bool(reached)

    def adam(m):
        return torch.optim.Adam(m.parameters(), lr=lr)

    tuned = ctx.with_finetune(batch_size=batch_size, freeze_bn=True)
    run, model = fine_tune_run(tuned, ctx.fresh_copy(), seed, epochs, phase, what, extra_metrics=extra_metrics,
                               data=data, make_optimizer=adam, stop_when=poison_taken)
    run.update(steps=run["records"][-1]["step"], goal_reached=bool(reached),
               stopped_at_step=reached[0] if reached else None)
    return run, model


def train_with_poison(ctx, seed, images, labels, p, phase, extra_metrics):
    """``train_until_poisoned`` on the training data plus ``p.copies`` copies of each poison image with its label
    (``p``: epochs, lr, batch_size, copies)."""
    return train_until_poisoned(ctx, seed, with_copies(ctx.train, images, labels, p.copies), images, labels,
                                epochs=p.epochs, lr=p.lr, batch_size=p.batch_size, phase=phase,
                                what=f"{phase} with {p.epochs} epochs at lr {p.lr:g}", extra_metrics=extra_metrics)
