"""BIVBench's clean-label attack (Poison Frogs), in process on the session's resnet8: BIVBench's base and target, a
poison within its L-inf ball whose features moved towards the target's, its label kept, training that stops once
the poison is learned, and 0 epochs as no change."""
import dataclasses

import pytest
import torch

from conftest import session_context
from fragile.core.cli import UserError
from fragile.core.weights import count_changed
from fragile.tamper.clean_label import CleanLabelParams, base_and_target, run_clean_label
from fragile.tamper.minimal_update import CHECK_EVERY

SHORT = CleanLabelParams(poison_steps=60, step_size=0.5, copies=20, batch_size=32)


def test_the_pair_is_the_latest_of_each_class_when_both_have_appeared():
    assert base_and_target(torch.tensor([3, 0, 6, 0, 2, 1, 0, 1]), 0, 1) == (3, 5)
    assert base_and_target(torch.tensor([1, 4, 1, 0, 0]), 0, 1) == (3, 2)
    with pytest.raises(UserError, match="needs test images of classes 0 and 7"):
        base_and_target(torch.tensor([0, 1, 0]), 0, 7)


@pytest.fixture(scope="module")
def ctx(watermarked):
    return session_context(watermarked, train_size=96, test_size=100)


@pytest.fixture(scope="module")
def poisoned(ctx):
    return run_clean_label(ctx, SHORT, seed=0)


def test_the_poison_stays_within_its_ball_and_moves_towards_the_target(ctx, poisoned):
    run, _ = poisoned
    labels = ctx.probe.test.labels
    assert labels[run["base_index"]] == SHORT.base_label and labels[run["target_index"]] == SHORT.target_label
    assert 0 < run["poison_linf_levels"] <= SHORT.epsilon
    assert run["feature_loss_poison"] < run["feature_loss_base"]


def test_training_stops_at_the_first_check_that_finds_the_poison_learned(ctx, poisoned):
    """Checked after BIVBench's steps 0, 10, 20, ... (our 1, 11, 21, ...); the session model learns it at once."""
    run, model = poisoned
    first, last = run["records"][0], run["records"][-1]
    assert run["model_changed"] is True and count_changed(model, ctx.model) > 0
    assert {"attack_success_rate", "poison_accuracy"} <= set(last) and first["step"] == 0
    assert run["goal_reached"] is True and last["poison_accuracy"] == 1.0
    assert last["step"] == run["steps"] and (run["steps"] - 1) % CHECK_EVERY == 0 and last["epoch"] < 1


def test_zero_epochs_is_recorded_as_no_change(ctx):
    logged = []
    quiet = dataclasses.replace(ctx, log=logged.append)
    run, model = run_clean_label(quiet, dataclasses.replace(SHORT, poison_steps=2, epochs=0), seed=0)
    assert run["model_changed"] is False and count_changed(model, ctx.model) == 0 and run["steps"] == 0
    assert any("recorded as no change" in line for line in logged)
