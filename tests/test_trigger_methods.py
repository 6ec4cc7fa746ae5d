"""Trigger sources (issue 6): every method's triggers carry the key after 8-bit export, the controls are far
less sensitive than margin triggers, and margin triggers record the delta they were built with."""
import json
import os

import pytest
import torch

from conftest import run_script
from fragile import trigger_methods
from fragile.benign import calibrate_delta
from fragile.checkpoint_io import load_classifier
from fragile.cli import UserError
from fragile.comparison import add_weight_noise, perturbation_generator
from fragile.training import predict_logits
from fragile.triggers import load_key, load_triggers
from fragile.verification import query_labels

NUM_TRIGGERS = 20
# Few steps: the synthetic resnet8 is small and these tests check behaviour, not the best numbers.
FAST_FLAGS = {"random": [], "natural": [],
              "ftg": ["--ftg-steps", 60],
              "margin": ["--margin-steps", 60, "--margin-grid-rounds", 40, "--margin-pool", 2, "--margin-select-draws", 8,
                         "--margin-surrogates", 1, "--margin-surrogate-steps", 16, "--margin-surrogate-subset", 1024,
                         "--margin-surrogate-batch-size", 64]}


@pytest.fixture(scope="module")
def method_triggers(watermarked):
    """{method: (trigger folder, key file)} for the session's resnet8; paper is the fixture's own set."""
    sets = {"paper": (watermarked["triggers"], watermarked["key"])}
    for method, flags in FAST_FLAGS.items():
        folder = watermarked["root"] / f"issue6_{method}_triggers"
        key = watermarked["root"] / f"issue6_{method}_key.json"
        run_script("generate_samples.py", "--model", watermarked["model"], "--method", method,
                   "--num-triggers", NUM_TRIGGERS, "--key-seed", 3, "--device", "cpu", "--out", folder,
                   "--key-out", key, "--no-progress", *flags)
        sets[method] = (str(folder), str(key))
    return sets


@pytest.fixture(scope="module")
def model(watermarked):
    return load_classifier(watermarked["model"])[0]


def flipped_fraction_under_noise(model, triggers, key, sigma, trials=4):
    """Mean fraction of triggers whose label leaves the key under Gaussian weight noise (seeded trials)."""
    import copy
    key = torch.tensor(key)
    fractions = []
    for trial in range(trials):
        noisy = copy.deepcopy(model)
        add_weight_noise(noisy, sigma, perturbation_generator(0, 10, trial))
        fractions.append((query_labels(noisy, triggers) != key).float().mean().item())
    return sum(fractions) / trials


@pytest.mark.parametrize("method", ["paper", "random", "natural", "ftg", "margin"])
def test_every_method_matches_the_key_after_8bit_export(method_triggers, model, method):
    folder, key_path = method_triggers[method]
    key, _ = load_key(key_path)
    from_png, meta = load_triggers(folder)
    from_tensor, _ = load_triggers(os.path.join(folder, "triggers.pt"))
    assert from_png.dtype == torch.uint8 and torch.equal(from_png, from_tensor)
    assert query_labels(model, from_png).tolist() == key
    assert query_labels(model, from_png, batch_size=1).tolist() == key
    assert meta["method"] == method
    assert sorted(meta["query_order"]) == list(range(len(key)))  # a permutation: every trigger queried once


def test_margin_triggers_record_delta_and_keep_it(method_triggers, model):
    folder, key_path = method_triggers["margin"]
    meta = json.load(open(os.path.join(folder, "meta.json")))
    assert meta["delta"] > 0
    assert meta["delta"] == pytest.approx(calibrate_delta(meta["benign_jitter"], meta["delta_safety_factor"]))
    assert meta["benign_jitter"]["per_setting"]  # measured, not assumed
    triggers, _ = load_triggers(folder)
    key = torch.tensor(load_key(key_path)[0])
    margins = trigger_methods.key_margins(predict_logits(model, triggers), key)
    assert margins.min().item() >= meta["delta"]
    assert meta["margins"]["runner_up_median"] <= 100 * meta["delta"]  # driven toward the boundary


def test_controls_flip_far_less_than_margin(method_triggers, model):
    """The same weight noise on the same model: the unoptimised controls barely move, margin triggers do."""
    fractions = {}
    for method in ("random", "natural", "margin"):
        folder, key_path = method_triggers[method]
        fractions[method] = flipped_fraction_under_noise(model, load_triggers(folder)[0], load_key(key_path)[0], 1e-3)
    assert fractions["margin"] >= 0.5, fractions
    assert fractions["random"] <= fractions["margin"] / 3, fractions
    assert fractions["natural"] <= fractions["margin"] / 3, fractions


def test_ftg_and_margin_record_psnr_to_their_natural_start(method_triggers):
    for method in ("ftg", "margin"):
        meta = json.load(open(os.path.join(method_triggers[method][0], "meta.json")))
        assert meta["psnr_to_start"]["mean_db"] is None or meta["psnr_to_start"]["mean_db"] > 10


def test_random_control_keys_are_the_models_labels(model):
    from fragile.data import get_spec
    key = [0] * 8
    images, info = trigger_methods.generate("random", model, get_spec("synthetic"), key, {}, torch.device("cpu"), None)
    assert query_labels(model, images).tolist() == key  # the key list was rewritten in place
    assert "key_source" in info["meta"]


def test_unknown_method_and_start_are_one_line_errors(model):
    from fragile.data import get_spec
    with pytest.raises(UserError, match="unknown trigger method"):
        trigger_methods.generate("nope", model, get_spec("synthetic"), [0], {}, torch.device("cpu"), None)
    with pytest.raises(UserError, match="unknown margin start"):
        trigger_methods.margin_starts(model, get_spec("synthetic"), [0], {"MARGIN_START": "nope"},
                                      torch.device("cpu"), None)
    with pytest.raises(UserError, match="test split"):
        trigger_methods.generate("natural", model, get_spec("synthetic"), [0], {}, torch.device("cpu"), None)


def test_generate_samples_rejects_an_unknown_method(watermarked):
    proc = run_script("generate_samples.py", "--model", watermarked["model"], "--method", "nope", check=False)
    assert proc.returncode == 2 and "invalid choice" in proc.stderr


def test_key_margins_and_psnr():
    logits = torch.tensor([[3.0, 1.0, 2.5], [0.0, 4.0, 1.0]])
    margins = trigger_methods.key_margins(logits, torch.tensor([0, 1]))
    assert margins[0, 0] == float("inf") and margins[0, 2].item() == pytest.approx(0.5)
    assert margins[1].tolist() == [4.0, float("inf"), 3.0]
    a = torch.zeros(2, 1, 4, 4, dtype=torch.uint8)
    b = a.clone()
    b[1, 0, 0, 0] = 16
    values = trigger_methods.psnr(a, b)
    assert torch.isinf(values[0]) and values[1].item() == pytest.approx(10 * torch.log10(torch.tensor(255.0 ** 2 / 16)).item())


def fine_tuned_flip_fraction(model, watermarked, triggers, key, steps=16):
    """An attacker's fine-tuning (the paper's SGD settings, eval.py's seed 0 and data) for a few steps."""
    import copy
    from fragile.data import balanced_subset, get_spec, load_split
    from fragile.devices import seed_everything
    from fragile.training import make_sgd, train_steps
    spec = get_spec("synthetic")
    data = balanced_subset(load_split(spec, "data", True), 1024, spec.num_classes)
    tampered = copy.deepcopy(model).requires_grad_(True)
    seed_everything(0)
    optimizer = make_sgd(tampered, 1e-3, 0.9, 1e-3, kernels="for-loop", decay_all=False)
    for step, _, _, _ in train_steps(tampered, optimizer, data, spec, torch.Generator().manual_seed(0), 64, "cpu"):
        if step >= steps:
            break
    return (query_labels(tampered.eval(), triggers) != torch.tensor(key)).float().mean().item()


def test_margin_triggers_flip_under_fine_tuning_they_never_saw(method_triggers, model, watermarked):
    """The surrogates were fine-tuned with other seeds on another data sample; the attacker's run still
    flips most margin triggers and far more than the controls."""
    fractions = {m: fine_tuned_flip_fraction(model, watermarked, load_triggers(method_triggers[m][0])[0],
                                             load_key(method_triggers[m][1])[0])
                 for m in ("random", "natural", "margin")}
    assert fractions["margin"] >= 0.7, fractions
    assert fractions["random"] <= fractions["margin"] / 3, fractions
    assert fractions["natural"] <= fractions["margin"] / 2, fractions


def test_margin_metadata_records_the_surrogates(method_triggers):
    meta = json.load(open(os.path.join(method_triggers["margin"][0], "meta.json")))
    assert meta["surrogates"]["count"] == 1 and meta["surrogates"]["steps"] == 16
    assert meta["margins"]["surrogate_off_key_kept"] >= 0.9  # built to be off its key there


def test_surrogates_are_reproducible_fine_tuned_copies(model):
    from fragile.data import get_spec, load_split
    from fragile.surrogates import fine_tuned_surrogates, surrogate_flip_fraction
    spec = get_spec("synthetic")
    train = load_split(spec, "data", True)
    settings = {"count": 2, "steps": 3, "subset": 256, "lr": 1e-2, "momentum": 0.9, "weight_decay": 0.0,
                "batch_size": 32}
    before = [p.clone() for p in model.parameters()]
    first = fine_tuned_surrogates(model, train, spec, settings, torch.device("cpu"), log=lambda *_: None)
    again = fine_tuned_surrogates(model, train, spec, settings, torch.device("cpu"), log=lambda *_: None)
    assert all(torch.equal(p, q) for p, q in zip(before, model.parameters()))  # the model itself is untouched
    assert len(first) == 2 and not first[0].training
    assert all(torch.equal(p, q) for p, q in zip(first[0].parameters(), again[0].parameters()))
    assert not all(torch.equal(p, q) for p, q in zip(first[0].parameters(), first[1].parameters()))
    assert not all(torch.equal(p, q) for p, q in zip(first[0].parameters(), model.parameters()))
    images = load_split(spec, "data", False).images[:16]
    labels = query_labels(model, images)
    assert surrogate_flip_fraction([], images, labels).sum() == 0
    assert surrogate_flip_fraction([model], images, labels).sum() == 0
    with pytest.raises(UserError, match="training split"):
        fine_tuned_surrogates(model, None, spec, settings, torch.device("cpu"))


def test_every_second_surrogate_keeps_batch_norm_statistics_frozen(model):
    from fragile.data import get_spec, load_split
    from fragile.surrogates import fine_tuned_surrogates
    spec = get_spec("synthetic")
    settings = {"count": 2, "steps": 2, "subset": 128, "lr": 1e-2, "momentum": 0.9, "weight_decay": 0.0,
                "batch_size": 32, "mix_bn": True}
    moving, frozen = fine_tuned_surrogates(model, load_split(spec, "data", True), spec, settings,
                                           torch.device("cpu"), log=lambda *_: None)
    original = model.state_dict()
    stats = [k for k in original if "running_" in k]
    assert all(torch.equal(frozen.state_dict()[k], original[k]) for k in stats)
    assert not any(torch.equal(moving.state_dict()[k], original[k]) for k in stats)
    assert not all(torch.equal(frozen.state_dict()[k], original[k]) for k in original if k.endswith("weight"))
