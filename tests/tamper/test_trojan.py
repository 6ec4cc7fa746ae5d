"""The weight-editing trojan, in process on the session's resnet8: the patch goes to the target class afterwards
(and hardly before), clean accuracy barely moves, exactly one channel's weights in the last two layers change, and
strength 0 is no change."""
import dataclasses

import pytest
import torch

from conftest import session_context
from fragile.core.cli import UserError
from fragile.core.weights import count_changed
from fragile.tamper.registry import lookup
from fragile.tamper.trojan import TrojanParams, locate, run_trojan

SMALL = TrojanParams(samples=256)


@pytest.fixture(scope="module")
def ctx(watermarked):
    return session_context(watermarked, train_size=256, test_size=300)


@pytest.fixture(scope="module")
def trojaned(ctx):
    return run_trojan(ctx, SMALL, seed=0)


def test_the_patch_now_leads_to_the_target_and_clean_accuracy_barely_moves(ctx, trojaned):
    run, model = trojaned
    before, after = run["records"]
    assert before["attack_success_rate"] < 0.1 and after["attack_success_rate"] > before["attack_success_rate"] + 0.3
    assert after["clean_accuracy"] >= before["clean_accuracy"] - 0.02
    assert run["model_changed"] is True and 0 < run["detector_fire_rate"] <= 1 and run["clean_fire_rate"] < 0.05


def test_exactly_one_channel_of_the_last_two_layers_is_edited(ctx, trojaned):
    """Its filter and batch-norm scale and shift, its final-layer column and the final biases; nothing else."""
    run, model = trojaned
    parts, original = locate(model), locate(ctx.model)
    channel, classes = run["channel"], parts.fc.out_features
    filter_size = parts.conv.weight[channel].numel()
    assert run["weights_changed"] == count_changed(model, ctx.model) == filter_size + 2 + 2 * classes
    others = [c for c in range(parts.conv.out_channels) if c != channel]
    assert torch.equal(parts.conv.weight[others], original.conv.weight[others])
    assert torch.equal(parts.fc.weight[:, others], original.fc.weight[:, others])
    column = parts.fc.weight[:, channel]
    assert column[0] > 0 and torch.count_nonzero(column) == 1   # the channel now speaks for the target alone
    for buffer in ("running_mean", "running_var"):
        assert torch.equal(getattr(parts.norm, buffer), getattr(original.norm, buffer))


def test_the_same_seed_gives_the_same_edit_and_strength_scales_the_target_weight(ctx, trojaned):
    run, model = trojaned
    again, same = run_trojan(ctx, SMALL, seed=0)
    assert again["channel"] == run["channel"]
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), same.parameters()))
    _, double = run_trojan(ctx, dataclasses.replace(SMALL, strength=2 * SMALL.strength), seed=0)
    target_weight = [locate(m).fc.weight[0, run["channel"]].item() for m in (model, double)]
    assert target_weight[1] == pytest.approx(2 * target_weight[0], rel=1e-5)


def test_strength_zero_edits_nothing_and_is_recorded_as_no_change(ctx):
    logged = []
    run, model = run_trojan(dataclasses.replace(ctx, log=logged.append), TrojanParams(strength=0.0), seed=0)
    assert run["model_changed"] is False and run["weights_changed"] == 0 and count_changed(model, ctx.model) == 0
    assert run["records"][0]["attack_success_rate"] == run["records"][1]["attack_success_rate"]
    assert any("recorded as no change" in line for line in logged)


def test_a_model_that_is_not_a_resnet_is_one_error_line(ctx):
    flat = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 10))
    with pytest.raises(UserError, match="trojan edits a ResNet"):
        run_trojan(dataclasses.replace(ctx, model=flat), SMALL, seed=0)
    with pytest.raises(UserError, match="--trojan-target 10 is not a class"):
        run_trojan(ctx, TrojanParams(target=10), seed=0)
    assert lookup("trojan").params is TrojanParams
