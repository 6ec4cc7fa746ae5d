"""BIVBench's targeted attack, in process on the session's resnet8: the chosen inputs are correct, confident test
images relabelled to another class, training stops once they carry their new labels, and a strength of nothing
(0 epochs, lr 0) is no change."""
import dataclasses

import pytest
import torch
import torch.nn.functional as F

from conftest import session_context
from fragile.core.training import predict_logits
from fragile.core.weights import count_changed
from fragile.tamper import minimal_update
from fragile.tamper.minimal_update import CHECK_EVERY
from fragile.tamper.targeted import TargetedParams, choose_inputs, run_targeted

SMALL = TargetedParams(inputs=3, copies=20, batch_size=32, lr=1e-3)


@pytest.fixture(scope="module")
def ctx(watermarked):
    return session_context(watermarked, train_size=96, test_size=100)


def test_the_chosen_inputs_are_correct_confident_and_relabelled_to_another_class(ctx):
    test = ctx.probe.test
    indices, new_labels = choose_inputs(ctx.model, ctx.train, test, SMALL, 1024)
    probabilities = F.softmax(predict_logits(ctx.model, test.images), 1)
    top, predicted = probabilities.max(1)
    assert len(indices) == 3 and len(set(indices.tolist())) == 3
    assert torch.equal(predicted[indices], test.labels[indices])            # correctly classified...
    assert (top[indices] > torch.quantile(top, 0.5)).all()                  # ...above the median confidence
    assert (new_labels != test.labels[indices]).all()
    one, _ = choose_inputs(ctx.model, ctx.train, test, dataclasses.replace(SMALL, inputs=1), 1024)
    assert one.tolist() == indices[:1].tolist()                             # the most vulnerable comes first


def test_the_chosen_inputs_take_their_new_labels_and_training_stops_there(ctx):
    run, model = run_targeted(ctx, SMALL, seed=0)
    images = ctx.probe.test.images[run["test_indices"]]
    now = predict_logits(model, images).argmax(1).tolist()
    assert now == run["new_labels"] and run["relabelled"] == [True] * 3 and run["goal_reached"] is True
    assert run["model_changed"] is True and run["records"][0]["attack_success_rate"] == 0.0
    assert run["records"][-1]["attack_success_rate"] == 1.0 and (run["steps"] - 1) % CHECK_EVERY == 0


def test_the_goal_is_checked_after_every_tenth_step_only(ctx, monkeypatch):
    """BIVBench checks after its steps 0, 10, 20, ...: a poison learned by the second check stops the run at our
    step 11, never in between."""
    checks = []

    def learned_at_second_check(model, images, labels, batch_size=1024):
        checks.append(len(checks))
        return float(len(checks) >= 2)

    monkeypatch.setattr(minimal_update, "labelled_share", learned_at_second_check)
    run, _ = run_targeted(ctx, dataclasses.replace(SMALL, batch_size=8, lr=1e-6), seed=0)
    assert len(checks) == 2 and run["steps"] == 1 + CHECK_EVERY and run["goal_reached"] is True
    assert run["records"][-1]["step"] == 1 + CHECK_EVERY and run["records"][-1]["epoch"] < 1


@pytest.mark.parametrize("params", [dataclasses.replace(SMALL, epochs=0), dataclasses.replace(SMALL, lr=0.0)])
def test_a_strength_of_nothing_is_recorded_as_no_change(ctx, params):
    logged = []
    run, model = run_targeted(dataclasses.replace(ctx, log=logged.append), params, seed=0)
    assert run["model_changed"] is False and count_changed(model, ctx.model) == 0
    assert not any(run["relabelled"]) and any("recorded as no change" in line for line in logged)
