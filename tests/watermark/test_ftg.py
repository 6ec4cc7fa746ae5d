"""ftg as FTG's code does it, in process on the session's resnet8: the first training images as starts, FTG's signed
step on the 8-bit image, a lower softmax variance, the model's own labels as the key; the options (key-class start,
lowest-variance selection) and the one-line errors."""
import pytest
import torch

from fragile.core.cli import UserError
from fragile.core.data import get_spec, load_split, to_float
from fragile.core.io import load_classifier
from fragile.core.training import predict_logits
from fragile.watermark import methods
from fragile.watermark.methods import ftg
from fragile.watermark.queries import query_labels
from fragile.watermark.trigger_io import quantize

SPEC = get_spec("synthetic")
CPU = torch.device("cpu")
DRAWN = [9, 9, 9, 9]   # a drawn key the faithful default must replace by the model's labels


@pytest.fixture(scope="module")
def model(watermarked):
    return load_classifier(watermarked["model"])[0]


@pytest.fixture(scope="module")
def splits():
    return load_split(SPEC, "data", True), load_split(SPEC, "data", False)


def run(model, splits, key=DRAWN, train=True, **changes):
    """(triggers, info, the key after the run) of ftg with ``changes`` to its defaults."""
    job = methods.TriggerJob(model, SPEC, list(key), CPU, splits[1], splits[0] if train else None,
                             log=lambda *_: None)
    triggers, info = methods.generate("ftg", job, ftg.FTGParams(**changes))
    return triggers, info, job.key


def variance(model, images):
    return ftg.softmax_variance(predict_logits(model, images))


def test_defaults_are_ftgs_and_the_faithful_start_needs_the_training_split():
    p = ftg.FTGParams()
    assert (p.steps, p.step_size, p.start, p.select) == (10000, 1e-5, "train", "last")
    assert methods.needs_training_data("ftg", p)
    assert not methods.needs_training_data("ftg", ftg.FTGParams(start="key-class"))


def test_starts_are_the_first_training_images_and_the_key_the_models_labels(model, splits):
    triggers, info, key = run(model, splits, steps=0)
    first = splits[0].images[:len(DRAWN)]
    assert triggers.dtype == torch.uint8 and torch.equal(triggers, first) and torch.equal(info["start_images"], first)
    assert key == query_labels(model, first).tolist() and key != DRAWN
    assert info["meta"]["key_source"] == "the model's labels of the triggers"


def test_one_step_is_ftgs_signed_step_against_the_variance_gradient(model, splits):
    triggers, info, key = run(model, splits, steps=1, step_size=1 / 255)
    x = to_float(info["start_images"]).requires_grad_(True)
    grad, = torch.autograd.grad(ftg.softmax_variance(model(x)).sum(), x)
    assert torch.equal(triggers, quantize((x - grad.sign() / 255).clamp(0, 1)))   # one grey level down the gradient
    assert not torch.equal(triggers, info["start_images"]) and query_labels(model, triggers).tolist() == key


def test_ftgs_step_size_moves_no_grey_level_before_196_steps(model, splits):
    """0.5/255 / 1e-5 = 196 steps of one sign before a pixel of a start on the grid changes level."""
    assert torch.equal(run(model, splits, steps=150)[0], splits[0].images[:len(DRAWN)])
    assert not torch.equal(run(model, splits, steps=200)[0], splits[0].images[:len(DRAWN)])


@pytest.fixture(scope="module")
def descents(model, splits):
    """The same 60-step descent kept by each selection rule."""
    return {select: run(model, splits, steps=60, step_size=2 / 255, select=select) for select in ftg.SELECTIONS}


def test_the_descent_lowers_the_softmax_variance_on_the_models_own_labels(model, descents):
    triggers, info, key = descents["last"]
    before, after = variance(model, info["start_images"]), variance(model, triggers)
    assert after.mean() < 0.5 * before.mean()
    assert query_labels(model, triggers).tolist() == key
    assert info["meta"]["softmax_variance_mean"] == pytest.approx(after.mean().item(), rel=1e-5)


def test_lowest_keeps_no_higher_variance_than_last_on_the_same_descent(model, descents):
    lowest, last = variance(model, descents["lowest"][0]), variance(model, descents["last"][0])
    assert (lowest <= last + 1e-7).all()
    assert descents["lowest"][2] == query_labels(model, descents["lowest"][0]).tolist()


def test_key_class_option_keeps_the_drawn_key_from_test_images_of_its_classes(model, splits):
    key = [0, 1, 2, 3]
    triggers, info, kept = run(model, splits, key=key, train=False, start="key-class", steps=20, step_size=2 / 255)
    assert kept == key and query_labels(model, triggers).tolist() == key
    test = splits[1]
    for start, k in zip(info["start_images"], key):
        match = (test.images == start).flatten(1).all(1)
        assert match.any() and (test.labels[match] == k).all()
    assert variance(model, triggers).mean() < variance(model, info["start_images"]).mean()


def test_bad_options_a_missing_split_and_an_unreachable_floor_are_one_line_errors(model, splits, monkeypatch):
    with pytest.raises(UserError, match="--ftg-start"):
        run(model, splits, start="nope", steps=0)
    with pytest.raises(UserError, match="--ftg-select"):
        run(model, splits, select="nope", steps=0)
    with pytest.raises(UserError, match="first 4 training images and 0 were given.*--ftg-start key-class"):
        run(model, splits, train=False, steps=0)
    monkeypatch.setattr(ftg, "label_floor", lambda *a: ({}, 1e9))   # no margin clears it
    with pytest.raises(UserError, match="0 of 4 triggers kept a label"):
        run(model, splits, steps=1)
