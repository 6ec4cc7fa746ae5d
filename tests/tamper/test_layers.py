"""BIVBench's fine-tuning family, in process on the session's resnet8: which weights each variant moves, which it
re-initialises, and that a run that changes nothing is recorded as no change."""
import dataclasses

import pytest
import torch

from conftest import session_context
from fragile.tamper.fine_prune import classifier_layer
from fragile.tamper.layers import VARIANTS, LayerTuneParams, runner
from fragile.tamper.registry import ATTACKS, lookup

ONE_EPOCH = LayerTuneParams(ftal_epochs=1, ftll_epochs=1, fzll_epochs=1, rtal_epochs=1, rtll_epochs=1, batch_size=32)


@pytest.fixture(scope="module")
def ctx(watermarked):
    return session_context(watermarked, train_size=96, test_size=100)


def moved(before, after):
    """{'head': moved?, 'body': any other weight moved?}, over the learned weights (batch-norm statistics aside)."""
    head_names = {f"{name}.{p}" for name, m in before.named_modules() if m is classifier_layer(before)
                  for p in ("weight", "bias")}
    changed = {name for (name, a), b in zip(before.named_parameters(), after.parameters()) if not torch.equal(a, b)}
    return {"head": bool(changed & head_names), "body": bool(changed - head_names)}


@pytest.mark.parametrize("variant, head, body", [("ftal", True, True), ("ftll", True, False), ("fzll", False, True),
                                                 ("rtal", True, True), ("rtll", True, False)])
def test_each_variant_moves_exactly_the_layers_it_names(ctx, variant, head, body):
    run, tampered = runner(variant)(ctx, ONE_EPOCH, seed=0)
    assert moved(ctx.model, tampered) == {"head": head, "body": body}
    assert run["model_changed"] is True and run["records"][-1]["epoch"] == 1.0
    assert 0 <= run["records"][-1]["clean_accuracy"] <= 1 and "flipped" in run["records"][-1]


def test_retraining_starts_the_last_layer_again_from_the_seed(ctx):
    """rtll with 0 epochs: the head is a fresh initialisation (a change, so it is never "no change"), the same for
    the same seed, another for another seed."""
    zero = LayerTuneParams(rtll_epochs=0)
    (run, a), (_, b), (_, c) = (runner("rtll")(ctx, zero, seed=s) for s in (0, 0, 1))
    head = [classifier_layer(m).weight for m in (ctx.model, a, b, c)]
    assert run["model_changed"] is True and not torch.equal(head[0], head[1])
    assert torch.equal(head[1], head[2]) and not torch.equal(head[1], head[3])


def test_zero_epochs_of_fine_tuning_is_recorded_as_no_change_not_as_a_miss(ctx):
    logged = []
    quiet = dataclasses.replace(ctx, log=logged.append)
    run, tampered = runner("ftal")(quiet, LayerTuneParams(ftal_epochs=0), seed=0)
    assert run["model_changed"] is False and not moved(ctx.model, tampered)["body"]
    assert any("recorded as no change" in line for line in logged)


def test_the_registry_names_every_variant():
    assert set(VARIANTS) <= set(ATTACKS) and all(lookup(v).params is LayerTuneParams for v in VARIANTS)
