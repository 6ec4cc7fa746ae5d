"""Fine-pruning (Liu, Dolan-Gavitt, Garg, RAID 2018), as a tampering and as a defense.

    eval.py --attack fine-prune   FinePruneParams

Rank the last convolutional layer's channels by mean activation on clean data, prune the least active
until clean accuracy has dropped by a set amount, then fine-tune on clean data. On the watermarked model
it is a tampering to detect; on a BadNets-poisoned copy, a defense: the attack success rate is tracked
before, after pruning and after fine-tuning, with the fragile watermark tracked on both.
"""
from dataclasses import dataclass

import torch

from ..core.cli import UserError
from ..core.data import to_float
from ..core.io import read_checkpoint
from . import records
from .finetune import attack_success_rate, fine_tune


@dataclass(frozen=True)
class FinePruneParams:
    accuracy_drop: float = 0.05   # prune until clean accuracy has dropped this much (absolute)
    rank_samples: int = 2000      # clean training images that rank the channels by mean activation
    epochs: int = 2               # clean fine-tuning after pruning (pruned channels stay pruned)
    poisoned_model: str = ""      # also defend this poisoned copy (eval.py --attack poison --save-tampered X.pt)


def classifier_layer(model):
    """The final linear layer (fine-prune: its inputs are the last convolutional layer's channels, globally pooled;
    BIVBench's fine-tuning family: the layer it freezes or re-initialises)."""
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    if not linears:
        raise UserError("this attack needs a model that ends in a linear classifier (over pooled channels)")
    return linears[-1]


@torch.no_grad()
def mean_channel_activation(model, images, batch_size):
    """Mean activation of each channel of the last convolutional layer's output over clean images (the
    classifier's input is exactly that output, averaged over positions)."""
    fc = classifier_layer(model)
    pooled = []
    handle = fc.register_forward_hook(lambda module, inputs, output: pooled.append(inputs[0].detach()))
    try:
        model.eval()
        for start in range(0, len(images), batch_size):
            model(to_float(images[start:start + batch_size]))
    finally:
        handle.remove()
    return torch.cat(pooled).mean(0).cpu()


def prune_channel(model, channel):
    """Silence a channel of the final feature map. In a ResNet the last convolution's output is summed with
    the shortcut, so zeroing its filter would not silence the channel: we cut it where it is consumed."""
    with torch.no_grad():
        classifier_layer(model).weight[:, channel] = 0


def keep_pruned(model, pruned):
    """A gradient mask so fine-tuning never regrows pruned channels (zero weights under SGD with momentum
    and weight decay then stay exactly zero). Returns the hook handle."""
    weight = classifier_layer(model).weight
    mask = torch.ones_like(weight)
    mask[:, pruned] = 0
    return weight.register_hook(lambda grad: grad * mask)


def fine_prune_model(model, ctx, p, seed, target, track_asr):
    """Prune in increasing order of mean activation until clean accuracy has dropped by ``p.accuracy_drop``,
    then fine-tune on clean data. Returns (its records, pruning order). ``track_asr``: also measure the backdoor's
    attack success rate (the defense view; a test-set pass each)."""
    def metrics(m):   # the defended backdoor's success rate, and the robust watermark when the model has one
        asr = {"attack_success_rate": attack_success_rate(m, ctx)} if track_asr else {}
        return {**asr, **ctx.probe.extra_metrics(m)}

    rank_images = ctx.train.images[:p.rank_samples]
    activation = mean_channel_activation(model, rank_images, ctx.probe.eval_batch_size)
    order = torch.argsort(activation, stable=True).tolist()
    start = pruning_point(model, ctx, metrics, f"unpruned ({target})", target, pruned_channels=0)
    points, pruned = [start], []
    for channel in order[:-1]:  # never the last channel: the classifier would have no input left
        prune_channel(model, channel)
        pruned.append(channel)
        points.append(pruning_point(model, ctx, metrics, f"pruned ({target})", target, pruned_channels=len(pruned),
                                    channel=channel, mean_activation=float(activation[channel])))
        if start["clean_accuracy"] - points[-1]["clean_accuracy"] >= p.accuracy_drop:
            break
    ctx.log(f"  {target}: pruned {len(pruned)} of {len(order)} channels: clean acc {start['clean_accuracy']:.4f} -> "
            f"{points[-1]['clean_accuracy']:.4f}, {points[-1]['flipped']} flipped"
            + (f", ASR {start['attack_success_rate']:.3f} -> {points[-1]['attack_success_rate']:.3f}"
               if track_asr else ""))
    handle = keep_pruned(model, pruned)
    try:
        tuned, _ = fine_tune(model, ctx, seed, p.epochs, extra_metrics=metrics, phase="fine-tune")
    finally:
        handle.remove()
    for record in tuned:
        record.update(setting=f"fine-pruned ({target})", target=target, pruned_channels=len(pruned))
    return points + tuned, order


def pruning_point(model, ctx, metrics, setting, target, **coords):
    """A record of the pruning phase: the watermark and clean accuracy, then ``metrics``."""
    record = ctx.probe.point(model, setting, phase="prune", target=target, **coords)
    record.update(metrics(model))
    return record


def load_poisoned(ctx, path):
    """The poisoned copy to defend (``eval.py --attack poison --save-tampered X.pt`` writes one)."""
    payload = read_checkpoint(path)
    if payload["meta"].get("dataset") != ctx.spec.name:
        raise UserError(f"--fine-prune-poisoned-model {path} is for dataset {payload['meta'].get('dataset')!r}, "
                        f"not {ctx.spec.name!r}")
    model = ctx.fresh_copy()
    try:
        model.load_state_dict(payload["state_dict"])
    except RuntimeError:
        raise UserError(f"--fine-prune-poisoned-model {path} does not have the watermarked model's "
                        f"architecture") from None
    return model.eval()


def asr_summary(trajectory):
    """The defense view: the backdoor's attack success rate before, after pruning, after fine-tuning."""
    prune = [r for r in trajectory if r["phase"] == "prune"]
    return {"before": prune[0]["attack_success_rate"], "after_pruning": prune[-1]["attack_success_rate"],
            "after_fine_tuning": trajectory[-1]["attack_success_rate"], "pruned_channels": prune[-1]["pruned_channels"]}


def run_fine_prune(ctx, p, seed):
    """Fine-pruning as a tampering of the watermarked model and, given a poisoned copy (``p.poisoned_model``),
    as a defense: attack success rate before, after pruning and after fine-tuning, with the fragile watermark
    tracked on both."""
    poisoned_path = p.poisoned_model
    poisoned = load_poisoned(ctx, poisoned_path) if poisoned_path else None  # a bad path fails before any work
    model = ctx.fresh_copy()
    points, order = fine_prune_model(model, ctx, p, seed, "watermarked", track_asr=False)
    run = records.run_record(seed, points, prune_order=order)
    if poisoned is not None:
        poisoned_records, poisoned_order = fine_prune_model(poisoned, ctx, p, seed, "poisoned", track_asr=True)
        run["records"] += poisoned_records
        run.update(poisoned_model=poisoned_path, poisoned_prune_order=poisoned_order,
                   attack_success_rate=asr_summary(poisoned_records))
    return run, model
