"""The physical limit of a deployment, an experiment: the weight noise a label-only verifier querying that deployment
cannot see, and how close a trigger set comes to it.

``eval.py --attack limit [--deployment NAME]`` measures, on a trigger set, in one named deployment (torch-fp32 when
none is named):
  - ``jitter``: the largest logit change the deployment's own harmless changes cause on the triggers (its batch sizes,
    threads, graph optimisations; fragile.deploy.arithmetic), and ``resolution``: that jitter, or one ulp of the
    largest logit in the deployment's precision where it measured none (nothing finer can show in its output);
  - ``sigma_at_jitter``: the Gaussian weight-noise sigma whose effect on the triggers' logits (the largest change over
    triggers and classes, median over ``trials`` draws, exact fp32) equals that resolution;
  - for each sigma of ``sigmas``, ``trials`` noisy copies labelled in the deployment: how many are detected;
  - ``smallest_sigma_detected``: the smallest sigma detected in at least ``detect_fraction`` of its trials (19 of 20),
    and ``ratio_to_limit``, that sigma over sigma_at_jitter; none where the untouched model already fails in the
    deployment (``untouched_detected``: a false alarm, the triggers were not made for it).

Why sigma_at_jitter is a limit: noise that moves no trigger logit further than the deployment's own jitter leaves every
label where a harmless change of the deployment could leave it, so a verifier that flagged it would also flag benign
queries. At these scales a logit's change is linear in sigma (first order in the weights), so the effect is measured
once, at ``reference_sigma``, and scaled: sigma_at_jitter = reference_sigma x resolution / effect(reference_sigma).
The noise draws are compare.py's (seeded by seed, sweep point and trial alone), so every trigger set of a model faces
the same noisy copies.
"""
from dataclasses import dataclass, field

import torch

from ..core.training import predict_logits
from ..core.weights import add_gaussian_noise
from ..deploy.arithmetic import arithmetic
from ..deploy.targets import DEFAULT_DEPLOYMENT
from . import records
from .compare import perturbation_generator

LIMIT_ATTACK_INDEX = 40   # perturbation_generator's sweep index of the first sigma (compare.py uses 2, 3, 10...)


@dataclass(frozen=True)
class LimitParams:
    sigmas: list = field(default_factory=lambda: [1e-7, 3e-7, 1e-6, 3e-6, 1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2])
    trials: int = 20
    reference_sigma: float = 1e-5     # where the effect of noise on the logits is measured (linear regime)
    detect_fraction: float = 0.95     # "detected": in at least this fraction of the trials (19 of 20)


def noisy_copy(ctx, sigma, gen):
    model = ctx.fresh_copy()
    add_gaussian_noise(model.parameters(), sigma, gen)
    return model


def noise_effect(ctx, p, seed):
    """Median over trials of the largest change of any trigger logit under noise of ``p.reference_sigma``, in fp32."""
    triggers = ctx.probe.triggers
    clean = predict_logits(ctx.model, triggers, len(triggers)).cpu().double()
    effects = []
    for trial in range(p.trials):
        model = noisy_copy(ctx, p.reference_sigma, perturbation_generator(seed, LIMIT_ATTACK_INDEX - 1, trial))
        effects.append((predict_logits(model, triggers, len(triggers)).cpu().double() - clean).abs().max().item())
    return torch.tensor(effects).median().item()


def detection_sweep(ctx, p, seed):
    """One record per (sigma, trial): the noisy copy labelled in the probe's deployment."""
    rows = []
    for s, sigma in enumerate(p.sigmas):
        for trial in range(p.trials):
            model = noisy_copy(ctx, sigma, perturbation_generator(seed, LIMIT_ATTACK_INDEX + s, trial))
            rows.append(records.comparison_record("limit", f"noise sigma {sigma:g}", ctx.probe.state(model),
                                                  sigma=sigma, trial=trial))
    return rows


def smallest_detected(rows, sigmas, fraction):
    """The smallest sigma whose trials were detected in at least ``fraction`` of them (None: no such sigma)."""
    for sigma in sorted(sigmas):
        trials = [r["detected"] for r in rows if r["sigma"] == sigma]
        if trials and sum(trials) >= fraction * len(trials):
            return sigma
    return None


def run_limit(ctx, p, seed):
    """eval.py --attack limit: the deployment's jitter, the noise sigma that equals it, and the detection sweep."""
    name = ctx.probe.deployment or DEFAULT_DEPLOYMENT
    arith = arithmetic(name, ctx.model, ctx.deployment.model_meta)
    jitter = arith.jitter(ctx.probe.triggers.cpu())
    resolution = max(jitter["max"], arith.eps * jitter["logit_scale"])
    effect = noise_effect(ctx, p, seed)
    sigma_at_jitter = p.reference_sigma * resolution / effect if effect > 0 else None
    ctx.log(f"  {name}: jitter on the triggers {jitter['max']:.2e}, resolution {resolution:.2e}; noise sigma "
            f"{p.reference_sigma:g} moves a trigger logit by {effect:.2e} (median): sigma at the jitter "
            + (f"{sigma_at_jitter:.2e}" if sigma_at_jitter else "unmeasured (no logit moved)"))
    untouched = ctx.probe.state(ctx.model)
    if untouched["detected"]:   # a false alarm on the untouched model: no sweep can say anything here
        ctx.log(f"  the untouched model already fails in {name} ({untouched['flipped']} triggers off their key): "
                f"these triggers were not made for it, there is no limit to measure")
    rows = detection_sweep(ctx, p, seed)
    for sigma in p.sigmas:
        same = [r for r in rows if r["sigma"] == sigma]
        ctx.log(f"    noise sigma {sigma:g}: detected in {sum(r['detected'] for r in same)}/{len(same)}")
    smallest = None if untouched["detected"] else smallest_detected(rows, p.sigmas, p.detect_fraction)
    ratio = smallest / sigma_at_jitter if smallest and sigma_at_jitter else None
    ctx.log(f"  smallest sigma detected in {p.detect_fraction:.0%} of trials: "
            + (f"{smallest:g}, {ratio:.1f}x the limit" if smallest else "none of the sweep"))
    return records.run_record(seed, rows, deployment=name, untouched_flipped=untouched["flipped"],
                              untouched_detected=untouched["detected"], jitter=jitter["max"],
                              jitter_per_setting=jitter["per_setting"], resolution=resolution, noise_effect=effect, sigma_at_jitter=sigma_at_jitter,
                              smallest_sigma_detected=smallest, ratio_to_limit=ratio), None
