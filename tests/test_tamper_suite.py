"""The tamper suite (fragile/tamper_suite.py): what each attack does to the weights, and what it records.

Most tests call the attacks in-process on the session's watermarked resnet8 with tiny sweeps; one runs
eval.py and plot.py --table end to end, as a user does.
"""
import csv
import functools
import importlib

import pytest
import torch

from conftest import run_script
from fragile import robust_watermark, tamper_suite as ts
from fragile.attacks import EvalContext
from fragile.checkpoint_io import load_classifier, read_checkpoint, save_classifier
from fragile.cli import UserError, _is_config_name
from fragile.data import balanced_subset, get_spec, load_split
from fragile.results import read_results
from fragile.triggers import load_triggers

SPEC = get_spec("synthetic")


def eval_config(**overrides):
    """eval.py's header constants (the same dict eval.py hands an attack), with test-sized overrides."""
    header = importlib.import_module("eval")
    config = {k: v for k, v in vars(header).items() if _is_config_name(k, v)}
    config.update(EPOCHS=1, BATCH_SIZE=64, EARLY_STEPS=[], AMP=False, TAMPER_ACCURACY_TRIALS=1, **overrides)
    return config


@functools.lru_cache(maxsize=None)
def small_splits():
    """256 training and 300 test images: enough to see each attack's effect, cheap to measure on."""
    return (balanced_subset(load_split(SPEC, "data", True), 256, SPEC.num_classes),
            balanced_subset(load_split(SPEC, "data", False), 300, SPEC.num_classes))


def make_context(model, triggers, key, **overrides):
    train, test = small_splits()
    return EvalContext(model, SPEC, train, test, triggers, torch.as_tensor(key), eval_config(**overrides),
                       torch.device("cpu"), log=lambda *args: None)


@pytest.fixture(scope="module")
def wm(watermarked):
    model, _ = load_classifier(watermarked["model"], "cpu")
    triggers, _ = load_triggers(watermarked["triggers"])
    return {"model": model, "triggers": triggers, "key": watermarked["key_labels"], "paths": watermarked}


def context(wm, **overrides):
    return make_context(wm["model"], wm["triggers"], wm["key"], **overrides)


def untouched(wm):
    """The session model is shared: every attack must leave it bit for bit as it was."""
    model, _ = load_classifier(wm["paths"]["model"], "cpu")
    return ts.count_changed(wm["model"], model) == 0


# ----------------------------------------------------------------------------- primitives

def test_a_bit_flip_changes_exactly_one_bit_of_each_chosen_weight():
    gen = torch.Generator().manual_seed(0)
    flat = torch.randn(1000, generator=gen)
    positions = torch.randperm(1000, generator=gen)[:50]
    for bit_class, bits in ts.BIT_CLASSES.items():
        chosen = [bits[i] for i in torch.randint(len(bits), (50,), generator=gen).tolist()]
        flipped = ts.flip_bits(flat, positions, chosen)
        diff = torch.bitwise_xor(flat.view(torch.int32), flipped.view(torch.int32))
        changed = diff.nonzero().flatten()
        assert sorted(changed.tolist()) == sorted(positions.tolist()), bit_class
        for position, bit in zip(positions.tolist(), chosen):
            assert int(diff[position]) & 0xFFFFFFFF == 1 << bit  # exactly that one bit
        if bit_class == "sign":
            assert torch.equal(flipped[positions], -flat[positions])


def test_magnitude_pruning_zeroes_the_stated_fraction_smallest_first():
    layer = torch.nn.Linear(40, 25)
    params = ts.matrix_weights(layer)
    before = ts.flatten(params)
    zeroed = ts.magnitude_prune(params, 0.3)
    after = ts.flatten(params)
    assert zeroed == round(0.3 * 1000) and int((after == 0).sum()) == zeroed
    assert before[after == 0].abs().max() <= before[after != 0].abs().min()
    assert torch.equal(after[after != 0], before[after != 0])


def test_queries_to_detection_count_from_one_in_the_shuffled_order():
    mask = torch.tensor([False, False, True, False, True])
    assert ts.queries_to_detection(mask, torch.tensor([0, 1, 2, 3, 4]), 0) == 3
    assert ts.queries_to_detection(mask, torch.tensor([4, 0, 1, 2, 3]), 0) == 1
    assert ts.queries_to_detection(mask, torch.tensor([4, 0, 1, 2, 3]), 1) == 4  # tolerance: second mismatch
    assert ts.queries_to_detection(torch.zeros(5, dtype=torch.bool), torch.arange(5), 0) is None
    assert ts.expected_queries(1, 5, 0) == 3.0 and ts.expected_queries(0, 5, 0) is None


# ----------------------------------------------------------------------------- attacks, in-process

def test_noise_with_sigma_zero_flips_nothing_and_large_sigma_flips_some(wm):
    run, tampered = ts.run_noise(context(wm, NOISE_SIGMAS=[0.0, 0.2], NOISE_TRIALS=3), seed=0)
    zero, large = run["records"]
    assert zero["sigma"] == 0 and zero["mean_flipped"] == 0 and zero["detection_probability"] == 0
    assert zero["mean_queries_to_detection"] is None and not zero["detected"]
    assert large["mean_flipped"] > 0 and large["detection_probability"] > 0
    assert all(q is None or 1 <= q <= len(wm["key"]) for q in large["queries_per_trial"])
    assert len(large["flipped_per_trial"]) == 3 and large["trials"] == 3
    assert ts.count_changed(tampered, wm["model"]) > 0 and untouched(wm)


def test_obfuscation_changes_exactly_k_weights_and_raises_the_loss(wm):
    run, tampered = ts.run_obfuscate(context(wm, OBFUSCATE_KS=[1, 7], OBFUSCATE_STEPS=4), seed=0)
    assert [r["k"] for r in run["records"]] == [1, 7]
    assert [r["weights_changed"] for r in run["records"]] == [1, 7]
    assert ts.count_changed(tampered, wm["model"]) == 7
    assert all(r["loss_after"] > r["loss_before"] for r in run["records"])
    assert untouched(wm)


def test_prune_attack_zeroes_the_stated_fraction_of_conv_and_linear_weights(wm):
    run, tampered = ts.run_prune(context(wm, PRUNE_RATIOS=[0.0, 0.25, 0.5]), seed=0)
    total = sum(p.numel() for p in ts.matrix_weights(wm["model"]))
    assert [r["weights_zeroed"] for r in run["records"]] == [0, round(0.25 * total), round(0.5 * total)]
    assert run["records"][0]["flipped"] == 0 and not run["records"][0]["detected"]
    zeros = int((ts.flatten(ts.matrix_weights(tampered)) == 0).sum())
    assert zeros == round(0.5 * total)


def test_single_weight_changes_one_weight_and_epsilon_zero_nothing(wm):
    run, tampered = ts.run_single_weight(context(wm, SINGLE_WEIGHT_EPSILONS=[0.0, 100.0], SINGLE_WEIGHT_TRIALS=2),
                                         seed=0)
    settings = [(r["position"], r["epsilon"]) for r in run["records"]]
    assert settings == [("random", 0.0), ("random", 100.0), ("largest", 0.0), ("largest", 100.0)]
    assert all(r["mean_flipped"] == 0 for r in run["records"] if r["epsilon"] == 0)
    assert ts.count_changed(tampered, wm["model"]) == 1  # the last trial: the largest weight, scaled
    largest = ts.flatten(ts.all_weights(wm["model"])).abs().max()
    assert float(abs(run["largest_weight"])) == float(largest)


def test_bitflip_attack_records_each_class_and_k(wm):
    run, tampered = ts.run_bitflip(context(wm, BITFLIP_KS=[1, 3], BITFLIP_CLASSES=["mantissa-low", "sign"],
                                           BITFLIP_TRIALS=2), seed=0)
    assert [r["setting"] for r in run["records"]] == ["k=1 (mantissa-low)", "k=3 (mantissa-low)", "k=1 (sign)",
                                                       "k=3 (sign)"]
    assert ts.count_changed(tampered, wm["model"]) == 3
    with pytest.raises(UserError, match="bitflip-classes"):
        ts.run_bitflip(context(wm, BITFLIP_CLASSES=["mantissa"]), seed=0)


def test_quantize_records_every_mode_and_int8_moves_weights(wm):
    run, _ = ts.run_quantize(context(wm), seed=0)
    records = {r["mode"]: r for r in run["records"]}
    assert set(records) == set(ts.QUANTIZE_MODES)
    assert all(r["weights_changed"] > 0 for r in records.values())
    with pytest.raises(UserError, match="quantize-modes"):
        ts.run_quantize(context(wm, QUANTIZE_MODES=["int4"]), seed=0)


def test_fine_pruning_removes_channels_in_increasing_activation_order(wm, tmp_path):
    poisoned_path = tmp_path / "poisoned.pt"  # any same-arch checkpoint exercises the defense path
    save_classifier(str(poisoned_path), wm["model"], dict(read_checkpoint(wm["paths"]["model"])["meta"]))
    ctx = context(wm, FINE_PRUNE_ACCURACY_DROP=0.03, FINE_PRUNE_EPOCHS=1, FINE_PRUNE_RANK_SAMPLES=256,
                  FINE_PRUNE_POISONED_MODEL=str(poisoned_path))
    run, tampered = ts.run_fine_prune(ctx, seed=0)
    activation = ts.mean_channel_activation(wm["model"], ctx.train.images[:256], 1024)
    assert run["prune_order"] == torch.argsort(activation, stable=True).tolist()
    mine = [r for r in run["records"] if r["target"] == "watermarked"]
    pruned = [r["channel"] for r in mine if r["phase"] == "prune" and "channel" in r]
    assert pruned == run["prune_order"][:len(pruned)] and pruned
    assert [r["mean_activation"] for r in mine if "channel" in r] == sorted(activation[pruned].tolist())
    last_prune = [r for r in mine if r["phase"] == "prune"][-1]
    assert mine[0]["clean_accuracy"] - last_prune["clean_accuracy"] >= 0.03 or len(pruned) == len(activation) - 1
    assert {r["phase"] for r in mine} == {"prune", "fine-tune"}
    columns = ts.classifier_layer(tampered).weight[:, pruned]
    assert torch.count_nonzero(columns) == 0  # still pruned after fine-tuning
    assert {"before", "after_pruning", "after_fine_tuning"} <= set(run["attack_success_rate"])
    assert all("attack_success_rate" in r for r in run["records"] if r["target"] == "poisoned")
    assert not any("attack_success_rate" in r for r in mine)
    assert untouched(wm)


# ----------------------------------------------------------------------------- the robust comparator

@pytest.fixture(scope="module")
def backdoored(tmp_path_factory):
    out = tmp_path_factory.mktemp("robust") / "resnet8_synthetic.pt"
    run_script("train.py", "--dataset", "synthetic", "--arch", "resnet8", "--epochs", 3, "--train-subset", 1500,
               "--backdoor-watermark", "--backdoor-triggers", 30, "--device", "cpu", "--out", out, "--no-progress",
               "--recipe", "fast")   # 3 short epochs: the fast recipe's small batches embed the backdoor
    return str(out)


def test_backdoor_watermark_reaches_high_trigger_accuracy_after_training(backdoored):
    backdoor = read_checkpoint(backdoored)["backdoor"]
    model, _ = load_classifier(backdoored, "cpu")
    assert robust_watermark.trigger_accuracy(model, backdoor) >= 0.9


def test_restore_tracks_both_watermarks_through_both_phases(backdoored):
    model, _ = load_classifier(backdoored, "cpu")
    backdoor = read_checkpoint(backdoored)["backdoor"]
    # A stand-in fragile watermark: test images with the model's own labels as the key.
    triggers = small_splits()[1].images[:30]
    key = model(triggers.float() / 255).argmax(1).tolist()
    ctx = make_context(model, triggers, key, RESTORE_ATTACK_EPOCHS=1, RESTORE_EPOCHS=1)
    ctx.extras.update(backdoor=backdoor, metrics=[("backdoor_accuracy",
                                                   lambda m: robust_watermark.trigger_accuracy(m, backdoor))])
    run, _ = ts.run_restore(ctx, seed=0)
    assert [r["phase"] for r in run["records"]] == ["fine-tune", "fine-tune", "restore"]
    assert all("backdoor_accuracy" in r and "step" in r and "epoch" in r for r in run["records"])
    assert run["backdoor_accuracy"]["before"] >= 0.9
    assert isinstance(run["robust_restored"], bool) and isinstance(run["fragile_broken_after_restore"], bool)


# ----------------------------------------------------------------------------- as a user runs it

def test_eval_and_plot_table_end_to_end(watermarked, tmp_path):
    common = ["--model", watermarked["model"], "--device", "cpu", "--test-subset", 200, "--results-dir", tmp_path,
              "--no-progress"]
    run_script("eval.py", *common, "--attack", "noise", "--noise-sigmas", 0, 0.2, "--noise-trials", 2)
    run_script("eval.py", *common, "--attack", "quantize", "--quantize-modes", "fp16", "int8")
    noise = read_results(str(tmp_path / "resnet8_synthetic_paper_noise.json"))
    assert [r["setting"] for r in noise["runs"][0]["records"]] == ["sigma=0e+00", "sigma=2e-01"]
    figures = tmp_path / "figures"
    run_script("plot.py", "--results-dir", tmp_path, "--figures-dir", figures, "--table", "--no-trigger-grid")
    rows = list(csv.DictReader(open(figures / "summary.csv")))
    assert [(r["attack"], r["setting"]) for r in rows] == [("noise", "sigma=0e+00"), ("noise", "sigma=2e-01"),
                                                            ("quantize", "fp16"), ("quantize", "int8")]
    assert rows[0]["triggers_flipped"] == "0.0" and rows[0]["detected"] == "False"
    assert "| noise | sigma=0e+00 | 0/30 | no |" in (figures / "summary.md").read_text()
    assert (figures / "tamper_detection_vs_sigma.png").stat().st_size > 0
    assert (figures / "tamper_detection_vs_sigma.pdf").stat().st_size > 0


@pytest.mark.parametrize("args, message", [
    (["--attack", "noise", "--noise-sigmas", -1], "--noise-sigmas values must lie in"),
    (["--attack", "noise", "--noise-trials", 0], "--noise-trials must be a positive integer"),
    (["--attack", "obfuscate", "--obfuscate-ks"], "--obfuscate-ks needs at least one value"),
    (["--attack", "restore"], "needs a model trained with `train.py --backdoor-watermark`"),
    (["--attack", "fine-prune", "--fine-prune-poisoned-model", "missing.pt"], "checkpoint not found: missing.pt"),
])
def test_bad_input_is_one_error_line(watermarked, tmp_path, args, message):
    proc = run_script("eval.py", "--model", watermarked["model"], "--device", "cpu", "--results-dir", tmp_path,
                      "--test-subset", 100, "--train-subset", 100, "--fine-prune-epochs", 0, *args, check=False)
    assert proc.returncode == 2 and message in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
