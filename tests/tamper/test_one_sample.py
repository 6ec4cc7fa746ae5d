"""One-sample updates (BIVBench's unlearning and online learning), in process on the session's resnet8: each does
what it says to its one image, keeps to its step budget, and a budget of nothing is recorded as no change."""
import dataclasses

import pytest

from conftest import session_context
from fragile.core.weights import count_changed
from fragile.tamper.one_sample import OnlineParams, UnlearnParams, confidence_and_label, run_online, run_unlearn


@pytest.fixture(scope="module")
def ctx(watermarked):
    return session_context(watermarked, train_size=256, test_size=200)


def test_unlearning_lowers_the_confidence_on_its_image_within_its_steps(ctx):
    """At least one step, at most the budget, stopping once below the confidence; the image is the seed's, the
    same for the same seed."""
    run, model = run_unlearn(ctx, UnlearnParams(lr=1e-2, max_steps=4), seed=0)
    before, after = run["records"]
    assert 1 <= run["steps"] <= 4 and run["model_changed"] and count_changed(model, ctx.model) > 0
    assert after["label_probability"] < before["label_probability"]
    assert after["image_confidence"] < 0.95 or run["steps"] == 4
    assert run_unlearn(ctx, UnlearnParams(max_steps=1), seed=0)[0]["train_index"] == run["train_index"]
    assert run_unlearn(ctx, UnlearnParams(max_steps=1), seed=1)[0]["train_index"] != run["train_index"]


def test_online_learning_picks_an_unsure_correct_image_and_raises_its_confidence(ctx):
    run, model = run_online(ctx, OnlineParams(lr=1e-2, batch_size=32, max_steps=3), seed=0)
    before, after = run["records"]
    image = ctx.probe.test.images[run["test_index"]]
    assert before["image_label"] == int(ctx.probe.test.labels[run["test_index"]])   # correctly classified...
    assert before["image_confidence"] < 0.8                                          # ...without confidence
    assert 1 <= run["steps"] <= 3 and run["model_changed"]
    assert after["label_probability"] > before["label_probability"]
    assert confidence_and_label(model, image)[0] == after["image_confidence"]


@pytest.mark.parametrize("run, params", [(run_unlearn, UnlearnParams(max_steps=0)),
                                         (run_online, OnlineParams(max_steps=0, lr=0.0)),
                                         (run_online, OnlineParams(max_steps=2, lr=0.0))])
def test_a_budget_of_nothing_is_recorded_as_no_change(ctx, run, params):
    logged = []
    quiet = dataclasses.replace(ctx, log=logged.append)
    record, model = run(quiet, params, seed=0)
    assert record["model_changed"] is False and count_changed(model, ctx.model) == 0
    assert record["records"][0]["flipped"] == record["records"][1]["flipped"]
    assert any("recorded as no change" in line for line in logged)
