"""BIVBench's data-poisoning degradations, in process on the session's resnet8: exactly the chosen labels change,
training from the protected model raises the poisoning's success and lowers the affected class's accuracy, the
minimal-update rule stops it early, and nothing poisoned is recorded as no change."""
import dataclasses

import pytest
import torch

from conftest import session_context
from fragile.core.cli import UserError
from fragile.core.weights import count_changed
from fragile.tamper.degrade import (DEGRADATIONS, DegradeParams, copied_sample, other_class, relabelled_class,
                                    run_random_class, run_random_sample, run_specific_class)
from fragile.tamper.registry import lookup


@pytest.fixture(scope="module")
def ctx(watermarked):
    return session_context(watermarked, train_size=256, test_size=200)


@pytest.mark.parametrize("portion", [1.0, 0.5])
def test_the_class_level_relabels_only_the_source_class_and_adds_it_once_more(ctx, portion):
    train, source, target = ctx.train, 4, 1
    members = int((train.labels == source).sum())
    data, poisoned = relabelled_class(train, source, target, portion, torch.Generator().manual_seed(0))
    relabelled = data.labels[:len(train)] != train.labels
    assert int(relabelled.sum()) == len(poisoned) == int(members * portion) == len(data) - len(train)
    assert bool((train.labels[relabelled] == source).all()) and bool((data.labels[len(train):] == target).all())
    assert torch.equal(data.images[:len(train)], train.images)
    assert torch.equal(data.images[len(train):], train.images[relabelled])


def test_the_sample_level_appends_copies_of_one_image_and_keeps_the_clean_data(ctx):
    train = ctx.train
    data, poisoned = copied_sample(train, 17, 3, 0.1)
    assert len(data) - len(train) == int(len(train) * 0.1) and len(poisoned) == 1
    assert torch.equal(data.images[:len(train)], train.images) and torch.equal(data.labels[:len(train)], train.labels)
    assert bool((data.images[len(train):] == train.images[17]).all()) and bool((data.labels[len(train):] == 3).all())


def test_a_drawn_class_is_never_the_excluded_one_and_covers_every_other():
    gen = torch.Generator().manual_seed(0)
    assert {other_class(10, 3, gen) for _ in range(300)} == set(range(10)) - {3}


def test_random_class_degradation_takes_the_source_class_away(ctx):
    """Two epochs without early stopping: the relabelled training images take their new label, and the test images
    of the source class lose their accuracy."""
    run, model = run_random_class(ctx, DegradeParams(epochs=2, stop_above=1.0), seed=0)
    first, last = run["records"][0], run["records"][-1]
    assert run["source_class"] != run["target_class"] and run["model_changed"] and run["stopped_at_step"] is None
    assert last["attack_success_rate"] > first["attack_success_rate"] + 0.5
    assert last["affected_class_accuracy"] < first["affected_class_accuracy"] - 0.5
    assert run["poisoned_samples"] == int((ctx.train.labels == run["source_class"]).sum())


def test_specific_class_degradation_relabels_to_its_target_and_refuses_a_class_that_is_not_there(ctx):
    zero = DegradeParams(target=3, epochs=0)
    runs = [run_specific_class(ctx, zero, seed=s)[0] for s in range(4)]
    assert all(r["target_class"] == 3 and r["source_class"] != 3 for r in runs)
    with pytest.raises(UserError, match="--degrade-target must be a class"):
        run_specific_class(ctx, DegradeParams(target=ctx.spec.num_classes), seed=0)


def test_random_sample_stops_at_the_first_check_where_the_image_has_its_new_label(ctx):
    """BIVBench's minimal update: checks after steps 1, 11, 21, ...; the last record is the step it stopped at."""
    run, _ = run_random_sample(ctx, DegradeParams(epochs=3, batch_size=32), seed=1)
    stop, last = run["stopped_at_step"], run["records"][-1]
    assert stop is not None and (stop - 1) % 10 == 0 and last["step"] == stop and last["epoch"] < 3
    assert last["attack_success_rate"] == 1.0 and run["records"][0]["attack_success_rate"] == 0.0
    assert run["sample_class"] == int(ctx.train.labels[run["train_index"]]) != run["target_class"]
    never, _ = run_random_sample(ctx, DegradeParams(epochs=2, batch_size=32, stop_above=1.0), seed=1)
    assert never["stopped_at_step"] is None and never["records"][-1]["epoch"] == 2.0


def test_the_seed_draws_the_classes(ctx):
    zero = DegradeParams(epochs=0)
    a, b, c = (run_random_class(ctx, zero, seed=s)[0] for s in (0, 0, 1))
    assert (a["source_class"], a["target_class"]) == (b["source_class"], b["target_class"])
    assert (a["source_class"], a["target_class"]) != (c["source_class"], c["target_class"])


@pytest.mark.parametrize("run, params", [(run_random_sample, DegradeParams(sample_portion=0.0)),
                                         (run_random_sample, DegradeParams(sample_portion=0.001)),
                                         (run_random_class, DegradeParams(class_portion=0.0)),
                                         (run_specific_class, DegradeParams(epochs=0))])
def test_nothing_poisoned_or_no_epochs_is_recorded_as_no_change(ctx, run, params):
    logged = []
    record, model = run(dataclasses.replace(ctx, log=logged.append), params, seed=0)
    assert record["model_changed"] is False and count_changed(model, ctx.model) == 0
    assert len(record["records"]) == 1 and record["records"][0]["flipped"] == 0
    assert any("recorded as no change" in line for line in logged)


def test_the_registry_names_all_three_on_one_parameter_object():
    assert all(lookup(name).params is DegradeParams for name in DEGRADATIONS)
    p = DegradeParams()
    assert (p.class_portion, p.sample_portion, p.target, p.epochs, p.stop_above, p.check_every, p.batch_size, p.lr) \
        == (1.0, 0.1, 0, 1, 0.9, 10, 64, 1e-3)
