"""Knowledge distillation: a fresh network of the protected model's architecture trained on its labels.

    eval.py --attack distill    DistillParams

BIVBench's (ACM MM 2024, CGCL-codes/BIVBench) ``wrt/attacks/removal/distillation.py`` as its
``train_tampered_model.py`` runs it: the student is a new, untrained surrogate; the training loader's labels are
the protected model's predictions on the training images, made once on the images without augmentation; the
student trains on augmented images against them. Its ``KDLoss`` as shipped is ``F.cross_entropy(pred,
argmax(teacher outputs))``: the temperature (T 3) and alpha are read but unused, the KL term being commented out,
so the shipped distillation is hard-label distillation, and so is this one (no T, no alpha). The optimizer and
schedule are its CIFAR-10 ``configs/cifar10/attack_configs/distillation.yaml``: SGD lr 0.1, momentum 0.9,
Nesterov, weight decay 5e-4 (every parameter), MultiStepLR at epochs 20, 35 and 50 with gamma 0.2, 60 epochs,
batches of 64. The defaults of ``DistillParams`` are those numbers; ``epochs`` is the strength.

Every record has, beside the watermark and clean accuracy, ``teacher_agreement``: the share of the test images on
which the student's label is the protected model's. A student is always another model: even 0 epochs gives the
untrained student (its seed's initialisation), recorded as a change (``model_changed`` True, recomputed) whose
flips are those of a random network, the floor of what distillation can leave of the triggers.

Differences from BIVBench, each deliberate:

- The student has the protected model's own architecture (the checkpoint's ``arch``, built by models/ from the
  seed); BIVBench's config distils into a wide ResNet (``cifar_wide_resnet_features``) whatever the protected
  architecture.
- Each image is paired with the label predicted for it. The shipped loader, as we read it, is not: its
  ``CIFAR10StolenDataset`` pairs the prediction for image i with image i of a seeded shuffle of the augmented set
  (``CIFAR10ShuffledSubset``, seed 1337, whose shuffle on the predicted set is commented out), and leaves the
  targets of the last, incomplete prediction batch uninitialised (``torch.empty`` with ``drop_last``).
- Batches of 64, the attack config's: the shipped script builds the distillation loader from the protected
  model's training config instead (128 for resnet20).
- The student kept is the last epoch's; BIVBench keeps the epoch of best test accuracy (``save_best``).
- The training images are eval.py's fine-tuning split (``--train-subset``), not the whole training set.
"""
from dataclasses import dataclass, field

import torch

from models import build_classifier

from ..core.data import Split
from ..core.devices import seed_everything
from ..core.training import make_sgd, predict_logits, sgd_kernels
from .finetune import fine_tune_run


@dataclass(frozen=True)
class DistillParams:
    epochs: int = 60              # the student's training from scratch (0: the untrained student)
    batch_size: int = 64
    lr: float = 0.1               # SGD, Nesterov
    momentum: float = 0.9
    weight_decay: float = 5e-4
    milestones: list = field(default_factory=lambda: [20, 35, 50])   # epochs where the rate is multiplied by gamma
    gamma: float = 0.2


def labels_of(model, images, batch_size):
    """The model's top-1 labels for uint8 images, where the images live."""
    return predict_logits(model, images, batch_size).argmax(1).to(images.device)


def fresh_student(ctx, seed):
    """An untrained network of the protected model's architecture, initialised from ``seed``."""
    seed_everything(seed)
    return build_classifier(ctx.probe.model_meta["arch"], ctx.spec).to(ctx.device)


def multistep(p, steps_per_epoch):
    """step -> learning rate: MultiStepLR stepped once per epoch (the rate times gamma at every milestone passed)."""
    def lr_for_step(step):
        return p.lr * p.gamma ** sum(milestone <= step // steps_per_epoch for milestone in p.milestones)
    return lr_for_step


def agreement_metric(ctx):
    """model -> the share of test images where it agrees with the protected model."""
    batch = ctx.probe.eval_batch_size
    teacher = labels_of(ctx.model, ctx.probe.test.images, batch)

    def metrics(model):
        agree = (labels_of(model, ctx.probe.test.images, batch) == teacher).float().mean().item()
        return {"teacher_agreement": agree}
    return metrics


def run_distill(ctx, p, seed):
    """Train a fresh student on the protected model's labels of the training images, recording the watermark."""
    stolen = Split(ctx.train.images, labels_of(ctx.model, ctx.train.images, ctx.probe.eval_batch_size))
    ctx.log(f"  distill: the protected model labels {len(stolen)} training images; it agrees with their own labels "
            f"on {(stolen.labels == ctx.train.labels).float().mean().item():.3f}")
    if p.epochs == 0:
        ctx.log("  distill with 0 epochs: the untrained student, another model, recorded as a change")
    student = fresh_student(ctx, seed)
    steps_per_epoch = -(-len(stolen) // p.batch_size)
    optimizer = (lambda m: make_sgd(m, p.lr, p.momentum, p.weight_decay, nesterov=True, decay_all=True,
                                    kernels=sgd_kernels(ctx.finetune.fused_optimizer)))
    run, student = fine_tune_run(ctx.with_finetune(batch_size=p.batch_size), student, seed, p.epochs, "distill",
                                 f"distill with {p.epochs} epochs", data=stolen, make_optimizer=optimizer,
                                 lr_for_step=multistep(p, steps_per_epoch), extra_metrics=agreement_metric(ctx))
    last = run["records"][-1]
    ctx.log(f"  distill: student agrees with the protected model on {last['teacher_agreement']:.3f} of the test "
            f"images, clean acc {last['clean_accuracy']:.4f}, {last['flipped']} triggers flipped")
    return run, student
