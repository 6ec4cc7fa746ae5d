"""Restoration (Ngo et al., arXiv 2501.02704): the opposite property to ours, measured side by side.

A robust (ownership) watermark embedded as a backdoor fades under fine-tuning, and brief training on the
original data can bring it back when the weights did not move far. Here the attacker fine-tunes, then the
model trains briefly on the original data: does the robust watermark come back while the fragile one
stays broken?

    eval.py --attack restore   RestoreParams; needs a checkpoint trained with `train.py --backdoor-watermark`
"""
from dataclasses import dataclass

from ..core.cli import UserError
from . import records
from .finetune import fine_tune


@dataclass(frozen=True)
class RestoreParams:
    attack_epochs: int = 2        # the attacker's fine-tuning first...
    attack_lr: float = 0.05       # ...at a learning rate high enough to fade a robust watermark
    epochs: int = 1               # then brief training on the original training data
    lr: float = 1e-3
    recovered: float = 0.9        # the robust watermark counts as restored at >= this fraction of its accuracy before


def run_restore(ctx, p, seed):
    """Fine-tune (the attacker, at ``p.attack_lr``), then briefly train on the original training data
    (``p.lr``, ``p.epochs``), the robust and the fragile watermark tracked through both phases."""
    if ctx.probe.backdoor is None:
        raise UserError("--attack restore needs a model trained with `train.py --backdoor-watermark` "
                        "(this checkpoint carries no robust watermark)")
    metrics = ctx.probe.extra_metrics
    model = ctx.fresh_copy()
    attacked, _ = fine_tune(model, ctx.with_finetune(lr=p.attack_lr), seed, p.attack_epochs, extra_metrics=metrics,
                            phase="fine-tune")
    restored, _ = fine_tune(model, ctx.with_finetune(lr=p.lr, early_steps=[]), seed + 1, p.epochs,
                            extra_metrics=metrics, phase="restore", step_offset=attacked[-1]["step"])
    trajectory = attacked + restored[1:]  # the restore phase's first record repeats the attack's last
    for record in trajectory:
        record["setting"] = record["phase"]
    before, faded, back = (r["backdoor_accuracy"] for r in (attacked[0], attacked[-1], restored[-1]))
    run = records.run_record(seed, trajectory,
                             backdoor_accuracy={"before": before, "after_fine_tuning": faded, "after_restore": back},
                             robust_restored=back >= p.recovered * before,
                             fragile_broken_after_restore=restored[-1]["detected"])
    ctx.log(f"  robust watermark {before:.2f} -> {faded:.2f} -> {back:.2f} "
            f"({'restored' if run['robust_restored'] else 'not restored'}); fragile watermark "
            f"{'still broken' if run['fragile_broken_after_restore'] else 'verifies again'} "
            f"({restored[-1]['flipped']} flipped)")
    return run, model
