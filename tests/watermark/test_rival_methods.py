"""The rival methods (ibsf, ssf, aid), in process on the session's resnet8: what each returns, that it is on its
key after 8-bit export, within its ball, that its own objective improved, and the one-line errors."""
import pytest
import torch

from fragile.core.cli import UserError
from fragile.core.data import get_spec, load_split, to_float
from fragile.core.io import load_classifier
from fragile.core.training import predict_logits
from fragile.watermark import methods
from fragile.watermark.methods import aid, common, ibsf, ssf
from fragile.watermark.methods.common import grid_in_ball, l2_distance
from fragile.watermark.queries import query_labels

SPEC = get_spec("synthetic")
CPU = torch.device("cpu")
KEY = [0, 1, 2, 3]


@pytest.fixture(scope="module")
def model(watermarked):
    return load_classifier(watermarked["model"])[0]


@pytest.fixture(scope="module")
def test_split():
    return load_split(SPEC, "data", False)


def job(model, test_split, key=KEY):
    return methods.TriggerJob(model, SPEC, list(key), CPU, test_split, log=lambda *_: None)


def assert_on_key_in_ball(model, triggers, starts, key, radius):
    assert triggers.dtype == torch.uint8 and triggers.shape == (len(key), *SPEC.shape)
    assert query_labels(model, triggers).tolist() == key
    assert (l2_distance(to_float(triggers), to_float(starts)) <= radius + 1e-9).all()


def test_grid_in_ball_rounds_onto_the_grid_inside_the_ball():
    start = torch.randint(0, 256, (3, 3, 8, 8)).float().div(255)
    x = (start + torch.randn_like(start)).clamp(0, 1)
    image = grid_in_ball(x, start, 0.3)
    assert torch.allclose(image.mul(255), image.mul(255).round(), atol=1e-3)   # straight-through: grid + x - x
    assert (l2_distance(image, start) <= 0.3 + 1e-6).all() and (l2_distance(image, start) > 0.2).all()


@pytest.fixture(scope="module")
def ibsf_set(model, test_split):
    p = ibsf.IBSFParams(steps=40, lr=1.0, eps=1.0)
    return methods.generate("ibsf", job(model, test_split), p)


def test_ibsf_triggers_are_on_key_in_the_ball_with_higher_topk_entropy(model, ibsf_set):
    triggers, info = ibsf_set
    starts = info["start_images"]
    assert_on_key_in_ball(model, triggers, starts, KEY, 1.0)
    before = ibsf.topk_entropy(predict_logits(model, starts), 2)
    after = ibsf.topk_entropy(predict_logits(model, triggers), 2)
    assert (after >= before).all() and after.mean() > before.mean() + 0.05
    assert info["meta"]["topk_entropy_mean"] == pytest.approx(after.mean().item(), rel=1e-4)


def test_ibsf_refuses_a_bad_k_and_a_floor_no_trigger_clears(model, test_split, monkeypatch):
    with pytest.raises(UserError, match="--ibsf-k"):
        methods.generate("ibsf", job(model, test_split), ibsf.IBSFParams(k=1, steps=0))
    monkeypatch.setattr(ibsf, "label_floor", lambda *a: ({}, 1e9))   # no margin clears it
    with pytest.raises(UserError, match="0 of 4 triggers"):
        methods.generate("ibsf", job(model, test_split), ibsf.IBSFParams(steps=1))


def test_require_all_names_the_count_and_the_flag():
    common.require_all(torch.tensor([True, True]), "x", "y")
    with pytest.raises(UserError, match="1 of 2 triggers are short: raise --z"):
        common.require_all(torch.tensor([True, False]), "are short", "raise --z")


@pytest.fixture(scope="module")
def ssf_set(model, test_split):
    return methods.generate("ssf", job(model, test_split), ssf.SSFParams(steps=15, lr=0.1, eps=1.0, pool=3))


def test_ssf_gradient_norm_is_the_autograd_one(model, test_split):
    weight = ssf.last_linear(model).weight.requires_grad_(True)   # the methods freeze the model
    logits, features = ssf.logits_and_features(model, to_float(test_split.images[:1]))
    grad, = torch.autograd.grad(logits[0].max(), weight)
    weight.requires_grad_(False)
    assert ssf.top_gradient_norm(features).item() == pytest.approx(grad.pow(2).sum().item(), rel=1e-5)


def test_ssf_triggers_are_on_key_in_the_ball_with_a_larger_gradient_norm(model, ssf_set):
    triggers, info = ssf_set
    starts = info["start_images"]
    assert_on_key_in_ball(model, triggers, starts, KEY, ssf.ball_radius(ssf.SSFParams(eps=1.0), SPEC.shape))
    assert not torch.equal(triggers, starts)
    with torch.no_grad():
        before = ssf.top_gradient_norm(ssf.logits_and_features(model, to_float(starts))[1])
        after = ssf.top_gradient_norm(ssf.logits_and_features(model, to_float(triggers))[1])
    assert (after >= before).all() and (after > before).any()


def test_ssf_picks_one_candidate_per_key_entry_from_its_pool(ssf_set):
    triggers, info = ssf_set
    chosen = info["chosen"]
    assert len(info["candidates"]) == 3 * len(KEY) and (chosen // 3).tolist() == list(range(len(KEY)))
    assert torch.equal(triggers, info["candidates"][chosen])


def test_manc_greedily_maximises_the_union_of_active_neurons():
    active = torch.tensor([[1, 1, 1, 0, 0, 0],    # slot 0: the largest alone
                           [1, 1, 0, 0, 0, 0],    # slot 0
                           [1, 1, 1, 0, 0, 0],    # slot 1: adds nothing to candidate 0
                           [0, 0, 0, 1, 1, 0],    # slot 1: adds two
                           [0, 0, 0, 0, 0, 1]], dtype=torch.bool)   # slot 1, unusable
    slot, usable = torch.tensor([0, 0, 1, 1, 1]), torch.tensor([True, True, True, True, False])
    assert ssf.manc(active, slot, usable).tolist() == [0, 3]


def test_ssf_refuses_a_floor_no_candidate_clears(model, test_split, monkeypatch):
    monkeypatch.setattr(ssf, "label_floor", lambda *a: ({}, 1e9))
    with pytest.raises(UserError, match="0 of 4 triggers have a candidate .*--ssf-pool"):
        methods.generate("ssf", job(model, test_split), ssf.SSFParams(steps=0, pool=1))


def test_aid_edge_points_meet_closer_with_the_key_their_own_labels(model):
    key = [0] * 4
    triggers, info = methods.generate("aid", methods.TriggerJob(model, SPEC, key, CPU, log=lambda *_: None),
                                      aid.AIDParams(steps=30, lr=3e-2))
    assert triggers.dtype == torch.uint8 and triggers.shape == (4, *SPEC.shape)
    assert query_labels(model, triggers).tolist() == key and info["meta"]["key_source"]   # rewritten in place
    with torch.no_grad():
        before = aid.edge_loss(model, to_float(info["start_images"]))[0]
        after = aid.edge_loss(model, to_float(triggers))[0]
    spread_before = aid.logit_spread(predict_logits(model, info["start_images"]))
    spread_after = aid.logit_spread(predict_logits(model, triggers))
    assert (after <= before).all() and after.mean() < 0.9 * before.mean() and spread_after.mean() < spread_before.mean()


def test_aid_step_size_follows_the_codes_schedule_and_refuses_an_unreachable_floor(model, monkeypatch):
    p = aid.AIDParams(steps=15000, lr=1e-4)
    steps = (0, 4999, 5000, 9999, 10000, 14999)
    assert [aid.step_size(p, s) for s in steps] == [1e-4, 1e-4, 5e-5, 5e-5, 2.5e-5, 2.5e-5]
    monkeypatch.setattr(aid, "label_floor", lambda *a: ({}, 1e9))
    with pytest.raises(UserError, match="0 of 2 triggers kept a label"):
        methods.generate("aid", methods.TriggerJob(model, SPEC, [0, 0], CPU), aid.AIDParams(steps=0))
