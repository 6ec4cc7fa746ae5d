"""Benign jitter: how far harmless deployment changes move an untouched model's logits, per envelope entry, and
the delta it calibrates."""
import pytest
import torch

from fragile.core.cli import UserError
from fragile.core.data import get_spec, load_split
from fragile.core.io import load_classifier
from fragile.watermark import jitter
from fragile.watermark.jitter import resolve_envelope


@pytest.fixture(scope="module")
def model_and_meta(watermarked):
    return load_classifier(watermarked["model"])


def test_measure_jitter_covers_the_settings(model_and_meta, watermarked):
    model, meta = model_and_meta
    images = load_split(get_spec("synthetic"), "data", False).images[:20]
    measured = jitter.measure_jitter(model, images, model_meta=meta)
    names = set(measured["per_setting"])
    assert {"batch size 1", "1 thread", "channels_last", "checkpoint round trip"} <= names
    assert measured["per_setting"]["checkpoint round trip"] == 0.0  # bit-exact weights
    assert 0 <= measured["max"] < 1e-3 and measured["logit_scale"] > 0


def test_calibrate_delta_has_an_ulp_floor_and_rejects_a_small_safety_factor():
    exact = {"max": 0.0, "logit_scale": 10.0, "per_setting": {}}
    floor = jitter.ULP_FLOOR_FACTOR * torch.finfo(torch.float32).eps * 10.0
    assert jitter.calibrate_delta(exact, 10) == pytest.approx(10 * floor)
    assert jitter.calibrate_delta({"max": 1e-3, "logit_scale": 10.0}, 4) == pytest.approx(4e-3)
    with pytest.raises(UserError, match="safety factor"):
        jitter.calibrate_delta(exact, 0.5)


def test_envelope_expands_exact_and_refuses_what_it_cannot_measure():
    gpu = ("cuda",) if torch.cuda.is_available() else ()
    assert resolve_envelope(["exact"]) == ("batch", "threads", "channels_last") + gpu
    assert resolve_envelope([]) == resolve_envelope(["exact"])
    assert resolve_envelope(["fp16", "batch", "fp16"]) == ("fp16", "batch")
    with pytest.raises(UserError, match="unknown envelope entry 'int8'"):
        resolve_envelope(["exact", "int8"])
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="needs a GPU"):
            resolve_envelope(["exact", "cuda"])
        assert resolve_envelope(["bf16", "cuda"], strict=False) == ("bf16",)


def test_half_precision_jitter_is_measured_per_entry_and_dwarfs_the_exact_one(model_and_meta):
    model, _ = model_and_meta
    images = load_split(get_spec("synthetic"), "data", False).images[:20]
    default = jitter.measure_jitter(model, images)
    assert not any(name.startswith(("fp16", "bf16")) for name in default["per_setting"])  # the default is unchanged
    wide = jitter.measure_jitter(model, images, envelope=["exact", "fp16", "bf16"])
    assert {"fp16", "fp16, batch size 1", "bf16", "bf16, batch size 16"} <= set(wide["per_setting"])
    exact = max(wide["per_entry"][e] for e in ("batch", "threads", "channels_last"))
    assert wide["per_entry"]["bf16"] > wide["per_entry"]["fp16"] > 10 * exact
    assert wide["max"] == wide["per_entry"]["bf16"]
    assert jitter.calibrate_delta(wide, 10) > 10 * jitter.calibrate_delta(default, 10)
    only_batch = jitter.measure_jitter(model, images, envelope=["batch"])
    assert set(only_batch["per_setting"]) == {"batch size 1", "batch size 16"}
