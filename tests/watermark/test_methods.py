"""Trigger methods, in process: what each returns, the margin band, the controls, the surrogates."""
import dataclasses

import pytest
import torch

from conftest import margin_params
from fragile.core.cli import UserError
from fragile.core.data import get_spec, load_split
from fragile.core.io import load_classifier
from fragile.core.training import predict_logits
from fragile.watermark import methods
from fragile.watermark.jitter import calibrate_delta
from fragile.watermark.methods.common import key_margins, psnr
from fragile.watermark.methods.controls import ControlParams
from fragile.watermark.methods.margin import MarginParams, margin_starts
from fragile.watermark.methods.paper import PaperParams
from fragile.watermark.methods.surrogates import SurrogateParams, fine_tuned_surrogates, surrogate_flip_fraction
from fragile.watermark.queries import query_labels

SPEC = get_spec("synthetic")
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def model(watermarked):
    return load_classifier(watermarked["model"])[0]


def surrogate_params(**changes):
    values = dict(count=2, steps=3, subset=256, lr=1e-2, momentum=0.9, weight_decay=0.0, batch_size=32, mix_bn=False,
                  gap=0.3)
    return SurrogateParams(**{**values, **changes})


def test_margin_triggers_keep_every_margin_in_the_band_above_delta(model, margin_set):
    triggers, key, meta = margin_set
    assert meta["delta"] == pytest.approx(calibrate_delta(meta["benign_jitter"], meta["delta_safety_factor"]))
    margins = key_margins(predict_logits(model, triggers), torch.tensor(key))
    assert margins.min().item() >= meta["delta"] and query_labels(model, triggers).tolist() == key
    assert meta["margins"]["runner_up_median"] <= 100 * meta["delta"]  # driven toward the boundary
    assert meta["surrogates"] == dataclasses.asdict(margin_params().surrogates)   # the parameters it ran with


def test_random_control_keys_are_the_models_labels(model):
    key = [0] * 8
    images, info = methods.generate("random", methods.TriggerJob(model, SPEC, key, CPU), ControlParams(control_seed=0))
    assert query_labels(model, images).tolist() == key  # the key list was rewritten in place
    assert "key_source" in info["meta"]


def test_unknown_method_and_start_are_one_line_errors(model):
    job = methods.TriggerJob(model, SPEC, [0], CPU)
    with pytest.raises(UserError, match="unknown trigger method"):
        methods.generate("nope", job, None)
    with pytest.raises(UserError, match="unknown margin start"):
        margin_starts(job, margin_params(start="nope"))
    with pytest.raises(UserError, match="test split"):
        methods.generate("natural", job, None)
    assert methods.needs_training_data("margin", margin_params(surrogates=1))
    assert not methods.needs_training_data("margin", margin_params()) and not methods.needs_training_data("paper", None)


def test_parameters_have_the_papers_defaults_without_a_script():
    p = MarginParams()
    assert p.surrogates == SurrogateParams() and p.paper == PaperParams() and p.envelope == ["exact"]
    assert MarginParams().envelope is not p.envelope   # every object its own list
    with pytest.raises(ValueError, match="pool"):      # a programmer's error: generate_samples.py checks the flag
        methods.generate("margin", methods.TriggerJob(None, SPEC, [0], CPU), margin_params(pool=0))


def test_key_margins_and_psnr():
    logits = torch.tensor([[3.0, 1.0, 2.5], [0.0, 4.0, 1.0]])
    margins = key_margins(logits, torch.tensor([0, 1]))
    assert margins[0, 0] == float("inf") and margins[0, 2].item() == pytest.approx(0.5)
    assert margins[1].tolist() == [4.0, float("inf"), 3.0]
    a = torch.zeros(2, 1, 4, 4, dtype=torch.uint8)
    b = a.clone()
    b[1, 0, 0, 0] = 16
    values = psnr(a, b)
    assert torch.isinf(values[0]) and values[1].item() == pytest.approx(10 * torch.log10(torch.tensor(255.0 ** 2 / 16)).item())


def test_surrogates_are_reproducible_fine_tuned_copies(model):
    train = load_split(SPEC, "data", True)
    before = [p.clone() for p in model.parameters()]
    first = fine_tuned_surrogates(model, train, SPEC, surrogate_params(), CPU, log=lambda *_: None)
    again = fine_tuned_surrogates(model, train, SPEC, surrogate_params(), CPU, log=lambda *_: None)
    assert all(torch.equal(p, q) for p, q in zip(before, model.parameters()))  # the model itself is untouched
    assert len(first) == 2 and not first[0].training
    assert all(torch.equal(p, q) for p, q in zip(first[0].parameters(), again[0].parameters()))
    assert not all(torch.equal(p, q) for p, q in zip(first[0].parameters(), first[1].parameters()))
    assert not all(torch.equal(p, q) for p, q in zip(first[0].parameters(), model.parameters()))
    images = load_split(SPEC, "data", False).images[:16]
    labels = query_labels(model, images)
    assert surrogate_flip_fraction([], images, labels).sum() == 0
    assert surrogate_flip_fraction([model], images, labels).sum() == 0
    assert fine_tuned_surrogates(model, None, SPEC, surrogate_params(count=0), CPU) == []
    with pytest.raises(UserError, match="training split"):
        fine_tuned_surrogates(model, None, SPEC, surrogate_params(), CPU)


def test_every_second_surrogate_keeps_batch_norm_statistics_frozen(model):
    moving, frozen = fine_tuned_surrogates(model, load_split(SPEC, "data", True), SPEC,
                                           surrogate_params(steps=2, subset=128, mix_bn=True), CPU, log=lambda *_: None)
    original = model.state_dict()
    stats = [k for k in original if "running_" in k]
    assert all(torch.equal(frozen.state_dict()[k], original[k]) for k in stats)
    assert not any(torch.equal(moving.state_dict()[k], original[k]) for k in stats)
    assert not all(torch.equal(frozen.state_dict()[k], original[k]) for k in original if k.endswith("weight"))
