"""BIVBench's targeted attack: a few natural test inputs, each relabelled to the class it already lies nearest to,
learned with as little change to the model as the task allows.

    eval.py --attack targeted   TargetedParams

What BIVBench's code does (CGCL-codes/BIVBench: backdoor_attack/main.py ``--task data_poison`` with
``--vulnerable_targeted_attack``, its default; the ``vulnerable_confident`` case of the ``data_poison`` branch of
data/poisoned_dataset.py; ``select_vulnerable_sample`` in utils/utils.py; deeplearning.py), and so what this does:

1. Candidates: among the first 5000 test images, those the protected model classifies correctly with a top-1
   probability above the median top-1 probability of all 5000 (correct and confident).
2. Class centroids: the mean penultimate features (the final linear layer's input) of those of the first 5000
   training images the model classifies correctly, one per class.
3. Vulnerability: a candidate's distance to its own class's centroid minus its distance to the nearest other
   class's centroid. The 10 largest are chosen (its ``find_topk`` k: the confident inputs lying furthest towards
   another class), each relabelled to that nearest other class.
4. 100 copies of each join the training data and the protected model trains on them
   (fragile/tamper/minimal_update.py: Adam lr 1e-3, batch 64, at most one epoch), stopping at the first checked
   step where more than 90% of the copies carry their new labels: with 10 inputs, all 10 (9 of 10 is not above).

Every record carries ``attack_success_rate``: the share of the chosen inputs now classified as their new labels;
the run names them (``test_indices``, ``true_labels``, ``new_labels``) and whether each has its new label at the
end (``relabelled``). ``inputs`` 1 is the one-input case. Differences from BIVBench: none in the rule; "the first
5000" are those of the splits eval.py loads (class-balanced subsets under --train-subset / --test-subset), the
training images those the attack trains on; batch-norm statistics as minimal_update.py says; the seed draws the
batches only (BIVBench's choice does not depend on it, nor does it here). Strength: ``epochs`` and ``lr`` (either
0: no change, recorded so).
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..core.cli import UserError
from ..core.training import predict_logits
from .minimal_update import labelled_share, penultimate_batched, train_with_poison


@dataclass(frozen=True)
class TargetedParams:
    inputs: int = 10         # test inputs relabelled (BIVBench's k)
    pool: int = 5000         # the first this many test and training images are where they are chosen from
    copies: int = 100        # copies of each appended to the training data
    lr: float = 1e-3         # Adam, every parameter (0: no change)
    batch_size: int = 64
    epochs: int = 1          # at most (BIVBench stops once they are learned, within one epoch; 0: no change)


def centroids(features, labels, correct, num_classes):
    """Per class, the mean features of its correctly classified images (NaN for a class with none)."""
    return torch.stack([features[correct & (labels == c)].mean(0) for c in range(num_classes)])


@torch.no_grad()
def choose_inputs(model, train, test, p, batch_size):
    """BIVBench's vulnerable inputs: (test indices, their new labels), most vulnerable first."""
    test_images, test_labels = test.images[:p.pool], test.labels[:p.pool]
    probabilities = F.softmax(predict_logits(model, test_images, batch_size), 1).to(test_labels.device)
    top, predicted = probabilities.max(1)
    candidates = ((predicted == test_labels) & (top > torch.quantile(top, 0.5))).nonzero().flatten()
    if len(candidates) == 0:
        raise UserError("targeted: no test image is classified correctly above the median confidence: the model "
                        "needs some accuracy first (or a larger --targeted-pool)")
    train_images, train_labels = train.images[:p.pool], train.labels[:p.pool]
    train_features = penultimate_batched(model, train_images, batch_size).to(train_labels.device)
    train_correct = predict_logits(model, train_images, batch_size).argmax(1).to(train_labels.device) == train_labels
    centre = centroids(train_features, train_labels, train_correct, probabilities.shape[1]).to(test_labels.device)
    features = penultimate_batched(model, test_images[candidates], batch_size).to(test_labels.device)
    distance = torch.cdist(features, centre).nan_to_num(nan=float("inf"))   # a class with no centroid is never near
    rows, own_labels = torch.arange(len(candidates), device=distance.device), test_labels[candidates]
    own = distance[rows, own_labels]
    distance[rows, own_labels] = float("inf")
    nearest_other, new_labels = distance.min(1)
    order = torch.argsort(own - nearest_other, descending=True, stable=True)[:p.inputs]
    return candidates[order], new_labels[order]


def run_targeted(ctx, p, seed):
    """Choose the inputs, relabel them, train a copy on them, and record the watermark, clean accuracy and the
    share of the inputs carrying their new labels, step by step."""
    test = ctx.probe.test
    model = ctx.model.eval()   # read, never changed
    indices, new_labels = choose_inputs(model, ctx.train, test, p, ctx.probe.eval_batch_size)
    images = test.images[indices]

    def metrics(m):
        return {"attack_success_rate": labelled_share(m, images, new_labels)}

    run, model = train_with_poison(ctx, seed, images, new_labels, p, "targeted", metrics)
    now = predict_logits(model, images, ctx.probe.eval_batch_size).argmax(1).to(new_labels.device)
    relabelled = (now == new_labels).tolist()
    run.update(test_indices=indices.tolist(), true_labels=test.labels[indices].tolist(),
               new_labels=new_labels.tolist(), relabelled=relabelled)
    ctx.log(f"  seed {seed}: {sum(relabelled)} of {len(relabelled)} chosen test inputs carry their new labels after "
            f"{run['steps']} steps (test indices {run['test_indices']})")
    return run, model
