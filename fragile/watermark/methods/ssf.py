"""SSF triggers: Sensitive-Sample Fingerprinting (He, Zhang, Lee; CVPR 2019).

A sensitive sample maximises the squared norm of the gradient of the model's top output with respect to the
last layer's weights, so that a change of those weights moves its output most; from a larger bag of such
samples, Maximum Active Neuron Cover (MANC) picks greedily the ones that together activate the most neurons of
the layer before the output. Read from the public code (zechenghe/Sensitive_Sample_Fingerprinting:
sensitive-sample-gen.py ``sensitive_sample_gen``, utils.py ``similarity_projection``, manc.py ``manc``):

faithful  the loss ``-||d logit_top / d W_last||^2`` (the first version of sensitive-sample-gen.py; the
          latest sums log-softmax over 40 classes and takes the mean, with lr 1.0 or 1e-2 and eps 10, which
          the notes and the paper's description do not follow); Adam on the pixels, lr 0.1; after each step
          the projection into the L2 ball around the natural start, whose radius is per pixel as in the code:
          ``eps x sqrt(C x H x W)`` in 0..255 grey levels (eps 1.0), then into the valid pixel range; 1000
          iterations (the code's n_iter); MANC: a neuron of the last hidden layer (the input of the last
          linear layer, the code's fc7) is active when > 0, and each pick maximises the union of active
          neurons; the code's bag is ~100 candidates for 10 samples, so 10 candidates per trigger.
differs   (1) the gradient norm is computed in closed form: for a linear last layer the gradient of the top
          logit with respect to its weight matrix is the feature vector in the top class's row, so its squared
          norm is ``||features||^2`` (the same number autograd gives, for a batch at once). (2) the 8-bit grid:
          the forward pass sees the rounded image, kept inside the ball (grid_in_ball); lr and eps, given in
          the code's 0..255 units, are divided by 255. (3) the key: SSF has no label term; each candidate
          starts from a random correctly classified test image of its key class, the best-loss iterate that
          keeps the key label by the benign jitter is kept (the code keeps the last one), and MANC picks one
          candidate per key entry (the code picks from one unlabelled bag). A key entry without such a
          candidate is an error, never a shorter set.
"""
import math
from dataclasses import dataclass, field

import torch

from ...core.data import to_float
from .common import BestIterates, grid_in_ball, label_floor, natural_starts, on_key, project_l2_, psnr_summary, \
    require_all


@dataclass(frozen=True)
class SSFParams:
    """The defaults are the SSF code's (sensitive-sample-gen.py, manc.py)."""
    steps: int = 1000         # Adam iterations
    lr: float = 0.1           # Adam learning rate, in grey levels (0..255 pixels, as the code's)
    eps: float = 1.0          # L2 radius per pixel, in grey levels: eps x sqrt(C x H x W) around the start
    pool: int = 10            # candidates per trigger, from which MANC picks one
    control_seed: int = 0     # which test images it starts from
    envelope: list = field(default_factory=lambda: ["exact"])   # whose jitter sets the label floor


def last_linear(model):
    """The model's last nn.Linear: the layer whose weights SSF's gradient is taken with respect to."""
    linear = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    if not linear:
        raise ValueError("SSF needs a model whose output layer is nn.Linear")
    return linear[-1]


def logits_and_features(model, images):
    """(logits, the input of the last linear layer) in one forward pass."""
    seen = []
    handle = last_linear(model).register_forward_hook(lambda module, args, out: seen.append(args[0]))
    try:
        logits = model(images)
    finally:
        handle.remove()
    return logits, seen[-1].flatten(1)


def top_gradient_norm(features):
    """Per image ||d logit_top / d W_last||^2: that gradient is ``features`` in the top row, zero elsewhere."""
    return features.pow(2).sum(1)


def ball_radius(p, shape):
    """The code's per-pixel eps, in grey levels, as an L2 radius in [0, 1] pixel units."""
    return p.eps * math.sqrt(math.prod(shape)) / 255


def sensitive_samples(job, p, starts, key, floor):
    """Adam on -||d logit_top / d W_last||^2 from ``starts``, in the ball, on the 8-bit grid: the best iterates
    that keep their ``key`` label by more than ``floor`` (BestIterates)."""
    model, device = job.model, job.device
    start = to_float(starts.to(device))
    radius = ball_radius(p, job.spec.shape)
    x = start.clone().requires_grad_(True)
    optimiser = torch.optim.Adam([x], lr=p.lr / 255)
    best = BestIterates(starts.to(device))
    for step in range(p.steps + 1):
        image = grid_in_ball(x, start, radius)
        logits, features = logits_and_features(model, image)
        sensitivity = top_gradient_norm(features)
        best.offer(image, -sensitivity, on_key(logits, key, floor))
        if step == p.steps:
            break
        optimiser.zero_grad()
        (-sensitivity.sum()).backward()
        optimiser.step()
        with torch.no_grad():
            project_l2_(x, start, radius)
        if step % 250 == 0:
            job.log(f"ssf step {step}: mean gradient norm^2 {sensitivity.mean().item():.4e}")
    return best


def manc(active, slot, usable):
    """Maximum Active Neuron Cover, one candidate per slot: greedily the usable candidate whose active neurons
    (rows of the bool matrix ``active``) add most to the union so far; ``slot`` says which key entry each
    candidate is for. Returns the chosen candidate index of every slot."""
    slots = int(slot.max()) + 1
    covered = torch.zeros(active.shape[1], dtype=torch.bool, device=active.device)
    free, chosen = usable.clone(), torch.full((slots,), -1, dtype=torch.long)
    for _ in range(slots):
        cover = (covered | active).sum(1).masked_fill(~free, -1)
        pick = int(cover.argmax())
        chosen[slot[pick]] = pick
        covered |= active[pick]
        free &= slot != slot[pick]   # that key entry is filled
    return chosen


def generate(job, p):
    """``p.pool`` sensitive samples per key entry, then MANC picks one of them for each."""
    if p.pool < 1:
        raise ValueError(f"pool must be at least 1 (got {p.pool})")   # generate_samples.py checks the flag
    model, device = job.model, job.device
    pool_key = [k for k in job.key for _ in range(p.pool)]
    slot = torch.arange(len(job.key)).repeat_interleave(p.pool)
    starts = natural_starts(model, job.test, pool_key, job.spec.num_classes, device, least_confident=False,
                            seed=p.control_seed)
    jitter, floor = label_floor(model, starts, p.envelope, device)
    model.eval().requires_grad_(False)
    best = sensitive_samples(job, p, starts, torch.tensor(pool_key, device=device), floor)
    found = best.found.cpu()
    require_all(found.view(len(job.key), p.pool).any(1),
                f"have a candidate that keeps its key label by the benign jitter ({floor:.2e})",
                "raise --ssf-pool, or try another --control-seed")
    with torch.no_grad():
        active = logits_and_features(model, to_float(best.images))[1].cpu() > 0
    chosen = manc(active, slot, found)
    triggers = best.images.cpu()[chosen]
    return triggers, {"start_images": starts[chosen], "candidates": best.images.cpu(), "chosen": chosen,
                      "meta": {"start": "random correctly classified test images of the key class",
                               "benign_jitter": jitter, "label_floor": floor, "pool": p.pool,
                               "gradient_norm2_mean": (-best.loss.cpu()[chosen]).mean().item(),
                               "active_neurons_covered": int(active[chosen].any(0).sum()),
                               "psnr_to_start": psnr_summary(triggers, starts[chosen])}}
