"""A deployment's own arithmetic as calibration sees it: the harmless changes within it, the delta it gets, the
grid score over several deployments, the names a flag accepts, and a probe that labels in a deployment."""
import math
import sys

import pytest
import torch

from conftest import tiny_model
from fragile.core.cli import UserError
from fragile.core.data import DATASETS, Split
from fragile.deploy import arithmetic as arith_mod
from fragile.deploy import targets
from fragile.deploy.onnx_export import check_images
from fragile.tamper.context import Probe
from fragile.tamper.limit import smallest_detected
from fragile.watermark.jitter import ULP_FLOOR_FACTOR
from fragile.watermark.methods.common import key_margins
from fragile.watermark.methods.margin_deploy import deployment_delta
from fragile.watermark.methods.margin_grid import INVALID, band_limits, combined_score, grid_score
from models import build_classifier


@pytest.fixture(scope="module")
def tiny():
    model, meta = tiny_model()
    return model, meta, check_images(list(meta["input_shape"]), 24)


# ----------------------------------------------------------------------------- within a deployment

@pytest.mark.parametrize("name, expected", [
    ("onnxruntime", {"batch size 1", "batch size 16", "1 thread", "graph optimizations basic",
                     "graph optimizations none"}),
    ("openvino", {"batch size 1", "batch size 16", "1 thread"}),
    ("torch-bf16", {"batch size 1", "batch size 16", "1 thread", "channels_last"})])
def test_the_jitter_within_a_deployment_covers_its_own_configuration(tiny, name, expected):
    model, meta, images = tiny
    arith = arith_mod.arithmetic(name, model, meta)
    jitter = arith.jitter(images)
    assert expected <= set(jitter["per_setting"]) and jitter["deployment"] == name
    reference = arith.predict(images)
    # each setting really is that deployment under a change: the same labels, logits within its precision
    for setting, logits in arith_mod.within_settings(arith, images):
        assert logits.shape == reference.shape
        assert (logits - reference).abs().max().item() <= 64 * arith.eps * max(1.0, jitter["logit_scale"]), setting
    assert jitter["max"] == max(jitter["per_setting"].values())


def test_half_precision_deployments_compute_in_their_own_precision(tiny):
    model, meta, images = tiny
    assert targets.DEPLOYMENTS["torch-bf16"].eps == torch.finfo(torch.bfloat16).eps
    assert targets.DEPLOYMENTS["onnxruntime"].eps == torch.finfo(torch.float32).eps
    fp32 = arith_mod.arithmetic("torch-fp32", model, meta).predict(images)
    bf16 = arith_mod.arithmetic("torch-bf16", model, meta).predict(images)
    assert not torch.equal(fp32, bf16)   # another arithmetic, not fp32 relabelled


def test_a_deployment_that_moved_nothing_gets_a_few_ulps_of_its_own_precision_not_safety_times_that():
    eps = torch.finfo(torch.bfloat16).eps
    still = deployment_delta({"max": 0.0, "logit_scale": 8.0}, 10.0, eps)
    assert still == pytest.approx(ULP_FLOOR_FACTOR * eps * 8.0)
    moving = deployment_delta({"max": 1e-3, "logit_scale": 8.0}, 10.0, torch.finfo(torch.float32).eps)
    assert moving == pytest.approx(1e-2)   # safety x the measured jitter where it is above the floor


# ----------------------------------------------------------------------------- the grid score over deployments

def test_one_target_scores_exactly_as_grid_score_and_several_stay_lexicographic():
    torch.manual_seed(1)
    margins = key_margins(torch.randn(6, 5), torch.tensor([0, 1, 2, 3, 4, 0]))
    delta = 0.1
    assert torch.equal(combined_score([(margins, delta)], 4.0), grid_score(margins, *band_limits(delta, 4.0), delta))
    # two triggers both below the second deployment's floor: the one closer to it is better, however far above
    # the band the first deployment puts it (summing each deployment's own score would pick the other one)
    far, near = torch.full((1, 3), math.inf), torch.full((1, 3), math.inf)
    far[0, 1:] = torch.tensor([50.0, 60.0])     # first deployment: far above its band (a large excess)
    near[0, 1:] = torch.tensor([0.02, 0.03])    # first deployment: in its band
    closer, further = torch.full((1, 3), math.inf), torch.full((1, 3), math.inf)
    closer[0, 1:] = torch.tensor([0.11, 0.3])   # second deployment: just below 1.25 x its delta 0.1
    further[0, 1:] = torch.tensor([0.01, 0.3])
    a = combined_score([(far, 0.01), (closer, 0.1)], 4.0)
    b = combined_score([(near, 0.01), (further, 0.1)], 4.0)
    assert INVALID <= a.item() < b.item()
    # and valid in both beats invalid in one
    assert combined_score([(far, 0.01), (torch.where(closer < 1, closer + 0.1, closer), 0.1)], 4.0).item() < INVALID


# ----------------------------------------------------------------------------- names from a flag

def test_deployment_names_come_comma_or_space_separated_and_each_is_checked_before_any_work(monkeypatch):
    assert targets.parse_names(["onnxruntime,torch-bf16", "onnxruntime"]) == ["onnxruntime", "torch-bf16"]
    with pytest.raises(UserError, match="unknown deployment 'tensorrt'.*choose from torch-fp32"):
        targets.parse_names(["tensorrt"])
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="--deploy torch-cuda-fp16 needs a GPU"):
            targets.parse_names(["torch-cuda-fp16"])
    monkeypatch.setitem(sys.modules, "openvino", None)   # what an absent package looks like to import
    with pytest.raises(UserError, match="package openvino"):
        targets.parse_names(["openvino"])


# ----------------------------------------------------------------------------- a probe in a deployment

def test_a_probe_in_a_deployment_labels_each_copy_as_that_deployment_computes_it(tiny):
    model, meta, images = tiny
    labels = arith_mod.arithmetic("onnxruntime", model, meta).predict(images).argmax(1)
    empty = Split(images[:0], torch.zeros(0, dtype=torch.long))
    probe = Probe(images, labels, empty, deployment="onnxruntime", model_meta=meta)
    assert int(probe.flipped_mask(model).sum()) == 0
    noisy = build_classifier("resnet8", DATASETS["synthetic"]).eval()   # other weights: another exported file
    expected = arith_mod.arithmetic("onnxruntime", noisy, meta).predict(images).argmax(1) != labels
    assert torch.equal(probe.flipped_mask(noisy), expected) and expected.any()


def test_the_smallest_sigma_detected_needs_the_fraction_of_its_own_trials():
    rows = [{"sigma": s, "detected": d} for s, hits in ((1e-5, 10), (1e-4, 19), (1e-3, 20)) for d in
            [True] * hits + [False] * (20 - hits)]
    assert smallest_detected(rows, [1e-3, 1e-4, 1e-5], 0.95) == 1e-4
    assert smallest_detected(rows, [1e-5], 0.95) is None
