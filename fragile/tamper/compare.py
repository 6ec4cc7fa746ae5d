"""Every trigger method side by side, on the same model and under the same attacks: an experiment that calls
the tamper suite's attacks (fine_tune, nudge_one_weight, obfuscate) and the benign matrix.

``eval.py --attack compare --method M`` runs, on method M's trigger set, one results file
``<arch>_<dataset>_<M>_compare.json`` whose records cover
  - clean fine-tuning with the paper's SGD settings, ``finetune_epochs`` epochs,
  - Gaussian noise on every weight at each of ``noise_sigmas``, ``trials`` trials each,
  - one randomly chosen weight moved by ``single_weight_eps``, ``trials`` trials,
  - NNSplitter-style obfuscation of ``obfuscate_k`` weights,
  - the benign-change matrix (fragile.tamper.benign; ``detected`` there is a false alarm).
The perturbations are the tamper suite's own (fragile.tamper.perturbation, fragile.tamper.obfuscate), each drawn from a generator seeded
by (seed, attack, trial) alone, so every method faces the very same tampered models.
scripts/compare_methods.sh runs it for every method; fragile.report.comparison renders the results.
"""
import itertools
from dataclasses import dataclass, field

import torch

from ..core.data import to_float
from ..core.training import predict_logits
from ..core.weights import add_gaussian_noise, all_weights, entry_name, flatten, write_flat
from . import records
from .benign import BenignParams, benign_run_records, summarize_benign
from .finetune import fine_tune
from .obfuscate import obfuscate
from .perturbation import nudge_one_weight


@dataclass(frozen=True)
class CompareParams:
    finetune_epochs: int = 1
    noise_sigmas: list = field(default_factory=lambda: [1e-5, 1e-4, 1e-3])
    trials: int = 20                  # noise and single-weight trials
    single_weight_eps: float = 1e-3   # added to one weight
    obfuscate_k: int = 1
    obfuscate_scale: float = 10.0     # obfuscated weights move this many standard deviations of their tensor
    benign: BenignParams = field(default_factory=BenignParams)


def perturbation_generator(seed, attack_index, trial):
    """The same (seed, attack, trial) always gives the same perturbation, whatever the trigger method."""
    return torch.Generator().manual_seed(1_000_003 * seed + 10_007 * attack_index + trial)


def attack_record(model, ctx, attack, setting_label, **extra):
    return records.comparison_record(attack, setting_label, ctx.probe.state(model), **extra)


def finetune_records(ctx, p, seed):
    epochs = p.finetune_epochs
    model = ctx.fresh_copy()
    trajectory, first = fine_tune(model, ctx, seed, epochs, phase="compare")
    last = trajectory[-1]
    return [attack_record(model, ctx, "finetune", f"fine-tune {epochs} epoch{'s' if epochs != 1 else ''}",
                          clean_accuracy=last["clean_accuracy"], first_detection_step=first)]


def rival_correlation(clean_logits, noisy_logits, key):
    """How the noise moves each trigger's rivals relative to its key class, averaged over the triggers.

    With d_j = (change of logit j) - (change of the key logit) for every rival class j, the mean pairwise
    correlation of the d_j across the trials. 0.5 means the class logits move exchangeably (independently,
    equally): then no trigger, however it was made, leaves its key with probability above 1 - 1/K for K
    classes, the chance that the key is not the largest of K exchangeable draws. Lower means the rivals
    move apart from each other (a trigger can beat that ceiling); higher, that they move together against
    the key. ``noisy_logits`` is (trials, N, K); needs 3 or more trials (None otherwise)."""
    if noisy_logits.shape[0] < 3 or noisy_logits.shape[2] < 3:
        return None
    change = noisy_logits.double() - clean_logits.double()
    d = change - change.gather(2, key.view(1, -1, 1).expand(change.shape[0], -1, 1))
    values = []
    for i in range(d.shape[1]):
        rivals = d[:, i, torch.arange(d.shape[2]) != key[i]]
        corr = torch.corrcoef(rivals.T)
        off_diagonal = corr[~torch.eye(len(corr), dtype=torch.bool)]
        if torch.isfinite(off_diagonal).all():
            values.append(off_diagonal.mean().item())
    return sum(values) / len(values) if values else None


def noise_records(ctx, p, seed):
    rows, triggers = [], ctx.probe.triggers
    clean = predict_logits(ctx.model, triggers, len(triggers)).cpu()
    for s, sigma in enumerate(p.noise_sigmas):
        label, noisy, trials = f"noise sigma {sigma:g}", [], []
        for trial in range(p.trials):
            model = ctx.fresh_copy()
            add_gaussian_noise(model.parameters(), sigma, perturbation_generator(seed, 10 + s, trial))
            noisy.append(predict_logits(model, triggers, len(triggers)).cpu())
            trials.append(attack_record(model, ctx, "noise", label, sigma=sigma, trial=trial))
        correlation = rival_correlation(clean, torch.stack(noisy), ctx.probe.key.cpu()) if noisy else None
        rows += [dict(r, rival_correlation=correlation) for r in trials]
    return rows


def single_weight_records(ctx, p, seed):
    eps = p.single_weight_eps
    rows = []
    for trial in range(p.trials):
        model = ctx.fresh_copy()
        params = all_weights(model)
        flat = flatten(params)
        name, index = entry_name(model, nudge_one_weight(flat, perturbation_generator(seed, 2, trial), eps,
                                                         relative=False))
        write_flat(params, flat)
        rows.append(attack_record(model, ctx, "single-weight", f"single weight eps {eps:g}", epsilon=eps,
                                  trial=trial, weight=f"{name}[{index}]"))
    return rows


def obfuscate_records(ctx, p, seed):
    """One step of the tamper suite's obfuscation: the k weights of largest loss gradient on 256 random training
    images, each moved ``obfuscate_scale`` standard deviations of its tensor, unbounded."""
    k = p.obfuscate_k
    gen = perturbation_generator(seed, 3, 0)
    index = torch.randperm(len(ctx.train), generator=gen)[:256].to(ctx.train.images.device)
    batch = (to_float(ctx.train.images[index]), ctx.train.labels[index])
    model = ctx.fresh_copy()
    obfuscate(model, k, itertools.repeat(batch), steps=1, step_size=p.obfuscate_scale, scale="std", bounded=False)
    return [attack_record(model, ctx, "obfuscate", f"obfuscate k={k}", k=k,
                          clean_accuracy=ctx.probe.clean_accuracy(model))]


def run_comparison(ctx, p, seed):
    """eval.py --attack compare: every comparison attack on this trigger set, plus the benign matrix."""
    rows, n = [], ctx.probe.num_triggers
    for name, fn in (("fine-tuning", finetune_records), ("weight noise", noise_records),
                     ("single weights", single_weight_records), ("obfuscation", obfuscate_records)):
        ctx.log(f"  {name} ...")
        new = fn(ctx, p, seed)
        for label in dict.fromkeys(r["setting"] for r in new):
            same = [r for r in new if r["setting"] == label]
            ctx.log(f"    {label}: {sum(r['flipped'] for r in same) / len(same) / n:.0%} of triggers "
                    f"flipped, detected in {sum(r['detected'] for r in same)}/{len(same)}")
        rows += new
    benign = benign_run_records(ctx, p.benign)
    for r in benign:
        r["attack"] = "benign"
    summary = summarize_benign(benign)
    ctx.log(f"    benign matrix: {summary['false_alarms']} false alarms in {summary['settings']} settings, "
            f"largest jitter {summary['max_logit_jitter']:.2e}")
    rows += benign
    meta = ctx.deployment.trigger_meta   # delta, PSNR and margins, as recorded at generation
    return records.run_record(seed, rows, benign=summary, delta=meta.get("delta"),
                              psnr_to_start=meta.get("psnr_to_start"), trigger_margins=meta.get("margins")), None
