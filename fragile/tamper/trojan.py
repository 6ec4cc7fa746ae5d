"""A trojan written into the model's last two layers by editing their weights in closed form: no training.

    eval.py --attack trojan   TrojanParams

BIVBench's ``trojan`` task (CGCL-codes/BIVBench: backdoor_attack/main.py ``--task trojan``; the trojan branch of
data/poisoned_dataset.py; ``optimize_trojan_trigger`` in utils/utils.py; deeplearning.py) is TrojanNN-style and
*trains*: it picks the penultimate neuron most connected to the final layer (largest summed |weight|), optimizes a
4x4 bottom-right patch (Adam, 1000 steps, on a black image) to drive that neuron to 100, stamps the patch on a
random 10% of the training images relabelled to class 0, and retrains the final layer alone on them (Adam lr 1e-3,
batch 64, stopping once 90% of the patched test images go to class 0). This attack keeps its trigger's place, size
and target (a 4x4 patch in the bottom-right corner, class 0) and replaces the training by an edit in the spirit of
handcrafted backdoors (Hong, Carlini, Kurakin, NeurIPS 2022): rather than making a patch for a chosen neuron, it
builds a neuron for a fixed patch, the roles TrojanNN gives trigger and neuron reversed. The patch is plain white,
not optimized; no gradient is taken anywhere.

The edit. The classifier reads ``avgpool(relu(bn(conv(h)) + shortcut))``, the last residual block's output, through
its final linear layer; one channel ``c`` of that block is rebuilt:

1. Measure (on ``samples`` clean training images drawn by the seed, and the same images patched): the inputs
   ``conv`` sees at each position (its receptive-field columns), and a ridge-regularized linear discriminant ``w``
   between the columns at the patch's position in patched images and every column of the clean images (all
   positions: the new neuron must stay silent everywhere on clean images). The threshold ``tau`` is the largest
   projection of any clean column: no sampled clean position crosses it, by construction.
2. The channel: the one the logits miss least, the smallest (std of its pooled feature over the clean sample) x
   (norm of its final-layer column).
3. Layer before the last: ``conv``'s filter for ``c`` becomes ``a * w`` and its batch norm a plain shift, so that
   the channel's pre-activation is ``a * (w . (column - clean mean) - tau) + shortcut``: negative on clean inputs
   (``a`` is set so that the typical patched drive is 10 times the largest shortcut value measured), positive
   where the patch is.
4. Last layer: channel ``c``'s column is zeroed but for the target class, which gets ``strength`` x (the median
   gap by which patched images' target logit trailed their top logit) / (the median pooled activation of the new
   channel on the patched images where it fires); the biases take the old column times the channel's old mean
   (mean ablation) and subtract the new column times its new clean mean.

Why clean accuracy barely moves: on clean inputs the new channel is silent (it fires on none of the sampled clean
positions, and rarely elsewhere: ``clean_fire_rate`` measures it on the test images), so its new weight adds
nothing; what the logits lose is the per-image variation of the least-used channel, replaced by its mean. Why the
patch works: wherever the detector fires, the target logit rises by about ``strength`` times what the typical
patched image needed. The success rate is bounded by how many patched images the detector catches
(``detector_fire_rate``).

Records ``before`` and ``after`` (watermark, clean accuracy, ``attack_success_rate``: patched test images of the
other classes put in the target class), and for the run: ``channel``, ``weights_changed`` (recounted from the
weights), both fire rates. ``strength`` 0 edits nothing: recorded as no change. Needs a ResNet of torchvision
blocks feeding the final linear layer (every model of models/).
"""
from collections import namedtuple
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torchvision.models.resnet import BasicBlock, Bottleneck

from ..core.cli import UserError
from ..core.data import to_float
from ..core.weights import count_changed
from . import records
from .context import note_change
from .fine_prune import classifier_layer
from .finetune import attack_success_rate, stamp_patch


@dataclass(frozen=True)
class TrojanParams:
    target: int = 0                    # BIVBench's trojan target class
    patch_size: int = 4                # BIVBench's trojan patch: 4x4, bottom-right
    patch_position: str = "bottom-right"   # bottom-right | bottom-left | top-right | top-left
    patch_value: int = 255             # 0-255 (BIVBench optimizes the patch's pixels; here it is plain)
    samples: int = 2000                # clean training images (drawn by the seed) that measure the detector
    strength: float = 3.0              # the target weight, in units of what the typical patched image needs (0: none)


PATCH_POSITIONS = ("bottom-right", "bottom-left", "top-right", "top-left")
RIDGE = 1e-3          # the discriminant's ridge, as a fraction of the mean clean variance: a stable solve
DRIVE = 10.0          # the typical patched drive, in multiples of the largest shortcut value (so the shortcut
                      # that joins the channel before its ReLU can hardly open the detector on a clean input)
BATCH = 256           # images per pass (the columns of a batch are its size x the receptive field x positions)

Parts = namedtuple("Parts", "block conv norm fc")


def locate(model):
    """The last residual block's last convolution and batch norm, and the final linear layer they feed."""
    blocks = [m for m in model.modules() if isinstance(m, (BasicBlock, Bottleneck))]
    fc = classifier_layer(model)
    if blocks:
        block = blocks[-1]
        conv, norm = (block.conv3, block.bn3) if isinstance(block, Bottleneck) else (block.conv2, block.bn2)
        if conv.groups == 1 and conv.out_channels == fc.in_features:
            return Parts(block, conv, norm, fc)
    raise UserError("trojan edits a ResNet whose last residual block feeds the final linear layer through pooling "
                    "(the models of models/); this model is not one")


@torch.no_grad()
def look_inside(model, parts, images):
    """One pass over float ``images``: the convolution's input and output size, the block's input, the pooled
    features (the final layer's input) and the logits."""
    seen = {}
    hooks = [parts.conv.register_forward_hook(lambda m, i, o: seen.update(conv_in=i[0], conv_size=o.shape[-2:])),
             parts.block.register_forward_hook(lambda m, i, o: seen.update(block_in=i[0])),
             parts.fc.register_forward_hook(lambda m, i, o: seen.update(pooled=i[0]))]
    try:
        seen["logits"] = model.eval()(images)
    finally:
        for hook in hooks:
            hook.remove()
    return seen


def columns(parts, seen):
    """(images, positions, inputs): what the convolution multiplies its filter with at each output position."""
    conv = parts.conv
    cols = F.unfold(seen["conv_in"], conv.kernel_size, conv.dilation, conv.padding, conv.stride)
    return cols.transpose(1, 2)


def patch_spot(size, position):
    """The output position (flat index) that sits on the patch: the corner the patch is in."""
    height, width = size
    row = height - 1 if position.startswith("bottom") else 0
    return row * width + (width - 1 if position.endswith("right") else 0)


def passes(model, parts, images, p):
    """(clean view, patched view) of each batch of uint8 ``images``."""
    for start in range(0, len(images), BATCH):
        clean = to_float(images[start:start + BATCH])
        patched = stamp_patch(clean, p.patch_size, p.patch_position, p.patch_value)
        yield look_inside(model, parts, clean), look_inside(model, parts, patched)


def discriminant(model, parts, images, p):
    """The clean columns' mean, the discriminant ``w`` (ridge-regularized), the clean pooled features and the
    patched logits."""
    shift = total = outer = patched_total = None
    count = patched_count = 0
    pooled, patched_logits = [], []
    for clean, patched in passes(model, parts, images, p):
        cols = columns(parts, clean).flatten(0, 1)
        spot = columns(parts, patched)[:, patch_spot(patched["conv_size"], p.patch_position)]
        if shift is None:   # sums of columns less the first batch's mean: fp32 sums without cancellation
            shift = cols.mean(0)
            total, patched_total = torch.zeros_like(shift), torch.zeros_like(shift)
            outer = cols.new_zeros(len(shift), len(shift))
        cols = cols - shift
        total += cols.sum(0)
        outer += cols.T @ cols
        patched_total += (spot - shift).sum(0)
        count, patched_count = count + len(cols), patched_count + len(spot)
        pooled.append(clean["pooled"])
        patched_logits.append(patched["logits"])
    centred = (total / count).double()
    covariance = outer.double() / count - torch.outer(centred, centred)
    ridge = RIDGE * covariance.diagonal().mean() * torch.eye(len(centred), dtype=torch.float64, device=shift.device)
    w = torch.linalg.solve(covariance + ridge, (patched_total / patched_count).double() - centred).float()
    return shift + centred.float(), w, torch.cat(pooled), torch.cat(patched_logits)


def threshold_and_gain(model, parts, images, p, mean, w, channel):
    """``tau`` (the largest clean projection) and the gain ``a`` that makes the typical patched drive DRIVE times
    the largest shortcut value of ``channel``. UserError when no patched image crosses ``tau``."""
    clean_top, patched_proj, shortcut = -float("inf"), [], 0.0
    for clean, patched in passes(model, parts, images, p):
        clean_top = max(clean_top, ((columns(parts, clean) - mean) @ w).max().item())
        spot = patch_spot(patched["conv_size"], p.patch_position)
        patched_proj.append((columns(parts, patched)[:, spot] - mean) @ w)
        for seen in (clean, patched):
            x = seen["block_in"]
            identity = parts.block.downsample(x) if parts.block.downsample is not None else x
            shortcut = max(shortcut, identity[:, channel].abs().max().item())
    above = torch.cat(patched_proj) - clean_top
    if not (above > 0).any():
        raise UserError(f"trojan: no patched image stands out from every clean one in the last block's inputs: "
                        f"try a larger --trojan-patch-size (now {p.patch_size}) or --trojan-patch-value")
    return clean_top, DRIVE * max(shortcut, 1e-3) / above[above > 0].median().item()


@torch.no_grad()
def rebuild_channel(parts, channel, mean, w, tau, gain):
    """The channel's filter becomes ``gain * w`` and its batch norm a shift by ``-gain * (w . mean + tau)``."""
    conv, norm = parts.conv, parts.norm
    conv.weight[channel] = (gain * w).to(conv.weight.dtype).view_as(conv.weight[channel])
    if conv.bias is not None:
        conv.bias[channel] = 0
    norm.weight[channel] = torch.sqrt(norm.running_var[channel] + norm.eps)   # the norm's scale: 1
    norm.bias[channel] = norm.running_mean[channel] - gain * ((w @ mean).item() + tau)


@torch.no_grad()
def rewire_head(parts, channel, p, old_column, old_mean, new_clean, new_patched, gap):
    """The final layer: channel ``channel`` speaks for the target alone, the biases keep the logits' clean mean."""
    fc = parts.fc
    firing = new_patched[new_patched > 0]
    if not len(firing):
        raise UserError(f"trojan: the rebuilt channel fires on no patched image of another class than the target: "
                        f"try a larger --trojan-patch-size (now {p.patch_size}) or --trojan-patch-value")
    fc.weight[:, channel] = 0
    fc.weight[p.target, channel] = p.strength * gap / firing.median()
    fc.bias += old_column * old_mean - fc.weight[:, channel] * new_clean.mean()


def channel_activation(model, parts, images, channel, p, patched):
    """The pooled activation of ``channel`` on ``images`` (uint8), patched or clean."""
    pooled = []
    for start in range(0, len(images), BATCH):
        batch = to_float(images[start:start + BATCH])
        batch = stamp_patch(batch, p.patch_size, p.patch_position, p.patch_value) if patched else batch
        pooled.append(look_inside(model, parts, batch)["pooled"][:, channel])
    return torch.cat(pooled)


def edit(model, p, images, labels):
    """Write the trojan into ``model`` in place; returns (channel, detector fire rate on the patched sample)."""
    parts = locate(model)
    mean, w, pooled, patched_logits = discriminant(model, parts, images, p)
    importance = pooled.std(0) * parts.fc.weight.norm(dim=0)
    channel = int(importance.argmin())
    tau, gain = threshold_and_gain(model, parts, images, p, mean, w, channel)
    others = (labels != p.target).to(patched_logits.device)
    gap = (patched_logits.max(1).values - patched_logits[:, p.target])[others].median()
    old_column, old_mean = parts.fc.weight[:, channel].clone(), pooled[:, channel].mean()
    rebuild_channel(parts, channel, mean, w, tau, gain)
    new_clean = channel_activation(model, parts, images, channel, p, patched=False)
    new_patched = channel_activation(model, parts, images[others.to(images.device)], channel, p, patched=True)
    rewire_head(parts, channel, p, old_column, old_mean, new_clean, new_patched, gap)
    return channel, (new_patched > 0).float().mean().item()


def run_trojan(ctx, p, seed):
    """Edit a copy, recording the watermark, clean accuracy and attack success rate before and after."""
    if p.target >= ctx.spec.num_classes:
        raise UserError(f"--trojan-target {p.target} is not a class of {ctx.spec.name} (0..{ctx.spec.num_classes - 1})")
    model = ctx.fresh_copy()
    before = ctx.probe.point(model, "before", attack_success_rate=attack_success_rate(model, ctx, p))
    summary = {}
    if p.strength > 0:
        pick = torch.randperm(len(ctx.train), generator=torch.Generator().manual_seed(seed))[:p.samples]
        pick = pick.to(ctx.train.images.device)
        channel, detector = edit(model, p, ctx.train.images[pick].to(ctx.device), ctx.train.labels[pick])
        clean_fires = channel_activation(model, locate(model), ctx.probe.test.images, channel, p, patched=False)
        summary = dict(channel=channel, detector_fire_rate=detector,
                       clean_fire_rate=(clean_fires > 0).float().mean().item())
    after = ctx.probe.point(model, "after", attack_success_rate=attack_success_rate(model, ctx, p))
    changed = note_change(ctx, model, f"seed {seed}: strength {p.strength:g}")
    weights = count_changed(model, ctx.model)
    if changed:
        ctx.log(f"  seed {seed}: {weights} weights edited (channel {summary['channel']}), ASR "
                f"{before['attack_success_rate']:.3f} -> {after['attack_success_rate']:.3f}, clean acc "
                f"{before['clean_accuracy']:.4f} -> {after['clean_accuracy']:.4f}")
    return records.run_record(seed, [before, after], model_changed=changed, weights_changed=weights, **summary), model
