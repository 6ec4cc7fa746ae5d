"""BIVBench's data-poisoning degradations: the protected model trained on, with some training labels made wrong.

    eval.py --attack random-class     two random classes: the first's training images relabelled the second
    eval.py --attack specific-class   a random class's training images relabelled ``target``
    eval.py --attack random-sample    one random training image, copied many times, labelled another class

All three are ``DegradeParams``. They are BIVBench's (ACM MM 2024, CGCL-codes/BIVBench) Degradation_Random-C,
Degradation_Specific-C and Degradation-S: the ``data_poison`` branches of ``backdoor_attack/data/
poisoned_dataset.py`` (``PoisonedDataset.add_trigger``), trained by ``backdoor_attack/deeplearning.py``:

- class level: every training image of the source class is relabelled in place, and the same images are appended
  once more with the new label (so the class counts twice, wrongly labelled); random-class draws two distinct
  classes, specific-class a source class for the given ``--trigger_label`` (``target`` here, default 0).
- sample level: one random training image is appended ``int(N x poisoned_portion)`` times (N: the training set)
  with one random label; the clean training set stays as it was.
- training: from the protected model's weights (``load_protect_model``), cross-entropy, Adam lr 1e-3, batches of
  64 (main.py's defaults), every image augmented alike. Its "minimal update" loop measures, after the 1st, 11th,
  21st, ... step, the accuracy on the poisoned samples with their poisoned labels and stops once it is above 0.9;
  the loop always reports "done" at the end of its first epoch, so main.py's ``--epoch 50`` trains one epoch at
  most. The defaults here are those numbers (``epochs`` 1, ``stop_above`` 0.9, ``check_every`` 10). The trainer is
  the one ``clean-label`` and ``targeted`` use (fragile/tamper/minimal_update.py), batch-norm statistics frozen as
  it explains (BIVBench's check leaves the model in eval mode).

Every record has, beside the watermark and clean accuracy, ``attack_success_rate``: the share of the poisoned
samples the model gives their poisoned label (what BIVBench stops on and reports as "trigger accuracy"); the class
level adds ``affected_class_accuracy``, the test accuracy on the source class (what the degradation destroys).

Differences from the shipped code, each deliberate:

- The shipped main.py cannot reach these branches: it never passes ``--poison_level`` to the dataset (whose
  default is ``sample``), its ``--vulnerable_targeted_attack`` (``type=bool``, default True: any non-empty value
  is true) sends ``data_poison`` to the targeted attack instead, and ``--trigger_label`` is never None from the
  command line (the generic, random-class case). They are implemented as ``add_trigger`` writes them.
- Specific-class draws its source among the classes other than ``target``, and random-sample its label among the
  classes other than the image's own: BIVBench draws from all classes, so it can "relabel" a class or an image to
  the label it already has, which degrades nothing.
- ``class_portion`` relabels that share of the source class (drawn by the seed; default 1.0, the whole class, as
  BIVBench, whose ``--poisoned_portion`` does not reach the class level); ``sample_portion`` is BIVBench's
  ``--poisoned_portion`` (default 0.1) and sets the copies of the one image.
- The training data is eval.py's fine-tuning split (``--train-subset``), not the full training set; ``epochs``
  above 1 continues past BIVBench's one epoch with the same stopping rule.
- Nothing poisoned (a portion of 0, or one too small for a single sample) or 0 epochs trains nothing: the model is
  the protected one, recorded as no change (``model_changed`` False, recomputed from the weights), never a miss.
  (BIVBench would still train on the clean data: that is fine-tuning, ``--attack ftal``, not a degradation.)
"""
from dataclasses import dataclass

import torch

from ..core.cli import UserError
from ..core.data import Split
from ..core.training import accuracy
from .minimal_update import labelled_share, train_until_poisoned


@dataclass(frozen=True)
class DegradeParams:
    class_portion: float = 1.0    # random-class, specific-class: share of the source class relabelled (0: no change)
    sample_portion: float = 0.1   # random-sample: copies of the image, as a share of the training set (0: no change)
    target: int = 0               # specific-class: the label the source class takes (BIVBench's --trigger_label)
    epochs: int = 1               # at most (BIVBench's minimal-update loop ends after one); 0: no change
    stop_above: float = 0.9       # stop once more than this share of the poisoned samples take their new label
    check_every: int = 10         # steps between those checks (after the 1st, 11th, 21st, ...)
    batch_size: int = 64
    lr: float = 1e-3              # Adam, from the protected model's weights


DEGRADATIONS = ("random-class", "specific-class", "random-sample")   # the eval.py names, all run on DegradeParams


# ----------------------------------------------------------------------------- what is poisoned

def draw(count, gen):
    return int(torch.randint(count, (1,), generator=gen))


def other_class(num_classes, excluded, gen):
    """A class drawn uniformly among all but ``excluded`` (so a relabelling always changes the label)."""
    drawn = draw(num_classes - 1, gen)
    return drawn + (drawn >= excluded)


def appended(train, images, labels):
    """The training split with ``images`` and ``labels`` appended (on the split's device)."""
    device = train.images.device
    return Split(torch.cat([train.images, images.to(device)]), torch.cat([train.labels, labels.to(device)]))


def relabelled_class(train, source, target, portion, gen):
    """(training data, poisoned samples): ``portion`` of ``source``'s training images, drawn by ``gen``, relabelled
    ``target`` in place and appended once more with that label, as BIVBench's class-level branches do."""
    members = (train.labels == source).nonzero().flatten().cpu()
    drawn = torch.randperm(len(members), generator=gen)[:int(len(members) * portion)]
    chosen = members[drawn.sort().values].to(train.labels.device)   # in the split's order, as a class mask keeps them
    labels = train.labels.clone()
    labels[chosen] = target
    poisoned = Split(train.images[chosen], labels[chosen])
    return appended(Split(train.images, labels), poisoned.images, poisoned.labels), poisoned


def copied_sample(train, index, target, portion):
    """(training data, poisoned samples): training image ``index`` appended ``int(N x portion)`` times labelled
    ``target``, the clean data unchanged; the poisoned samples are that one image with its new label."""
    copies = int(len(train) * portion)
    image = train.images[index:index + 1]
    label = torch.full((1,), target, dtype=train.labels.dtype, device=train.labels.device)
    return appended(train, image.expand(copies, *image.shape[1:]), label.expand(copies)), Split(image, label)


# ----------------------------------------------------------------------------- what is measured

def success_rate(model, poisoned, batch_size):
    """The share of the poisoned samples the model gives their poisoned label (BIVBench's "trigger accuracy");
    None when nothing is poisoned."""
    return labelled_share(model, poisoned.images, poisoned.labels, batch_size) if len(poisoned) else None


def class_accuracy(model, test, label, batch_size):
    """Test accuracy on one class (None when the test split has none of it)."""
    members = test.labels == label
    return accuracy(model, test.subset(members), batch_size) if bool(members.any()) else None


def degradation_metrics(ctx, poisoned, source=None):
    """model -> the records' own metrics: the attack success and, at class level, the source's accuracy."""
    batch = ctx.probe.eval_batch_size

    def metrics(model):
        found = {"attack_success_rate": success_rate(model, poisoned, batch)}
        if source is not None:
            found["affected_class_accuracy"] = class_accuracy(model, ctx.probe.test, source, batch)
        return found
    return metrics


# ----------------------------------------------------------------------------- the runs

def degrade(ctx, p, seed, name, data, poisoned, metrics, **chosen):
    """Train a copy of the protected model on ``data`` with BIVBench's trainer (fragile/tamper/minimal_update.py:
    Adam, its stopping rule at ``p.check_every`` and ``p.stop_above``), recording the watermark and ``metrics`` step
    by step; nothing poisoned or 0 epochs trains nothing and is recorded as no change."""
    count = len(data) - len(ctx.train)   # every poisoned sample is an appended one, so this counts them
    epochs = p.epochs if count else 0
    if p.epochs and not count:
        ctx.log(f"  {name}: no sample poisoned at this portion, so no training")
    run, model = train_until_poisoned(ctx, seed, data, poisoned.images, poisoned.labels, epochs=epochs, lr=p.lr,
                                      batch_size=p.batch_size, phase=name,
                                      what=f"{name} with {count} poisoned samples and {epochs} epochs",
                                      extra_metrics=metrics, check_every=p.check_every, stop_above=p.stop_above)
    last, stopped_at = run["records"][-1], run["stopped_at_step"]
    success = "n/a" if last["attack_success_rate"] is None else f"{last['attack_success_rate']:.3f}"
    ctx.log(f"  {name}: attack success {success}, clean acc {last['clean_accuracy']:.4f}, "
            f"{last['flipped']} triggers flipped" + (f", stopped at step {stopped_at}" if stopped_at else ""))
    run.update(poisoned_samples=count, **chosen)
    return run, model


def class_degradation(ctx, p, seed, name, source, target, gen):
    data, poisoned = relabelled_class(ctx.train, source, target, p.class_portion, gen)
    ctx.log(f"  {name}: class {source} -> {target}, {len(poisoned)} training images relabelled")
    return degrade(ctx, p, seed, name, data, poisoned, degradation_metrics(ctx, poisoned, source),
                   source_class=source, target_class=target)


def run_random_class(ctx, p, seed):
    """Degradation_Random-C: two distinct classes drawn by the seed; the first's images take the second's label."""
    gen = torch.Generator().manual_seed(seed)
    source, target = torch.randperm(ctx.spec.num_classes, generator=gen)[:2].tolist()
    return class_degradation(ctx, p, seed, "random-class", source, target, gen)


def run_specific_class(ctx, p, seed):
    """Degradation_Specific-C: a class drawn by the seed (not ``target``) takes the label ``target``."""
    if not 0 <= p.target < ctx.spec.num_classes:
        raise UserError(f"--degrade-target must be a class of {ctx.spec.name}, 0..{ctx.spec.num_classes - 1}, "
                        f"got {p.target}")
    gen = torch.Generator().manual_seed(seed)
    source = other_class(ctx.spec.num_classes, p.target, gen)
    return class_degradation(ctx, p, seed, "specific-class", source, p.target, gen)


def run_random_sample(ctx, p, seed):
    """Degradation-S: one training image drawn by the seed, copied, labelled a class drawn among the others."""
    gen = torch.Generator().manual_seed(seed)
    index = draw(len(ctx.train), gen)
    own = int(ctx.train.labels[index])
    target = other_class(ctx.spec.num_classes, own, gen)
    data, poisoned = copied_sample(ctx.train, index, target, p.sample_portion)
    ctx.log(f"  random-sample: training image {index} (class {own}) -> class {target}, "
            f"{len(data) - len(ctx.train)} copies")
    return degrade(ctx, p, seed, "random-sample", data, poisoned, degradation_metrics(ctx, poisoned),
                   train_index=index, sample_class=own, target_class=target)
