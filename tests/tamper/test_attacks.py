"""The attacks, in process, on the session's watermarked resnet8 with tiny sweeps: what each does to the
weights, and what it records. The watermarked model itself must never change."""
import pytest
import torch

from conftest import eval_context, finetune_params, poison_params, run_script
from fragile.core.cli import UserError
from fragile.core.data import get_spec
from fragile.core.io import load_classifier, read_checkpoint, save_classifier
from fragile.core.weights import all_weights, count_changed, flatten, matrix_weights
from fragile.tamper.compression import QUANTIZERS, PruneParams, QuantizeParams, run_prune, run_quantize
from fragile.tamper.fine_prune import FinePruneParams, classifier_layer, mean_channel_activation, run_fine_prune
from fragile.tamper.finetune import run_finetune, run_poison
from fragile.tamper.obfuscate import ObfuscateParams, cycling_batches, run_obfuscate
from fragile.tamper.perturbation import (BitflipParams, NoiseParams, SingleWeightParams, run_bitflip, run_noise,
                                         run_single_weight)
from fragile.tamper.restore import RestoreParams, run_restore
from fragile.watermark import robust
from fragile.watermark.trigger_io import load_triggers

make_context = eval_context   # 256 training and 300 test images: enough to see each attack's effect


@pytest.fixture(scope="module")
def wm(watermarked):
    model, _ = load_classifier(watermarked["model"], "cpu")
    triggers, _ = load_triggers(watermarked["triggers"])
    return {"model": model, "triggers": triggers, "key": watermarked["key_labels"], "paths": watermarked}


def context(wm, **changes):
    return make_context(wm["model"], wm["triggers"], wm["key"], **changes)


def untouched(wm):
    """The session model is shared: every attack must leave it bit for bit as it was."""
    model, _ = load_classifier(wm["paths"]["model"], "cpu")
    return count_changed(wm["model"], model) == 0


def test_fine_tuning_records_the_first_detection_and_poisoning_raises_the_attack_success_rate(wm):
    run, tampered = run_finetune(context(wm), None, seed=0)
    records = run["records"]
    assert records[0]["step"] == 0 and records[0]["match_rate"] == 1.0 and records[-1]["epoch"] == 1.0
    assert count_changed(tampered, wm["model"]) > 0 and untouched(wm)
    assert run["first_detection_step"] is None or 1 <= run["first_detection_step"] <= records[-1]["step"]
    poisoned, _ = run_poison(context(wm, finetune=finetune_params(lr=1e-2), poison=poison_params(fraction=0.3)),
                             None, seed=0)
    before, after = (poisoned["records"][i]["attack_success_rate"] for i in (0, -1))
    assert after > before


def test_noise_with_sigma_zero_flips_nothing_and_large_sigma_flips_some(wm):
    run, tampered = run_noise(context(wm), NoiseParams(sigmas=[0.0, 0.2], trials=3, accuracy_trials=1), seed=0)
    zero, large = run["records"]
    assert zero["sigma"] == 0 and zero["mean_flipped"] == 0 and zero["detection_probability"] == 0
    assert zero["mean_queries_to_detection"] is None and not zero["detected"]
    assert large["mean_flipped"] > 0 and large["detection_probability"] > 0
    assert all(q is None or 1 <= q <= len(wm["key"]) for q in large["queries_per_trial"])
    assert len(large["flipped_per_trial"]) == 3 and large["trials"] == 3
    assert count_changed(tampered, wm["model"]) > 0 and untouched(wm)


def test_obfuscation_changes_exactly_k_weights_and_raises_the_loss(wm):
    run, tampered = run_obfuscate(context(wm), ObfuscateParams(ks=[1, 7], steps=4, batch_size=128, step_size=0.05),
                                  seed=0)
    assert [r["k"] for r in run["records"]] == [1, 7]
    assert [r["weights_changed"] for r in run["records"]] == [1, 7]
    assert count_changed(tampered, wm["model"]) == 7
    assert all(r["loss_after"] > r["loss_before"] for r in run["records"])
    assert untouched(wm)


def test_obfuscation_batches_are_drawn_where_the_data_lives(wm):
    """--no-data-on-device keeps the data on the CPU while the model is on the GPU: the shuffle generator must
    be the data's (a CUDA generator cannot shuffle CPU data)."""
    train = context(wm).train
    images, labels = next(cycling_batches(train, 16, get_spec("synthetic"), 0))
    assert images.shape[0] == 16 and images.device == train.images.device


def test_prune_attack_zeroes_the_stated_fraction_of_conv_and_linear_weights(wm):
    run, tampered = run_prune(context(wm), PruneParams(ratios=[0.0, 0.25, 0.5]), seed=0)
    total = sum(p.numel() for p in matrix_weights(wm["model"]))
    assert [r["weights_zeroed"] for r in run["records"]] == [0, round(0.25 * total), round(0.5 * total)]
    assert run["records"][0]["flipped"] == 0 and not run["records"][0]["detected"]
    zeros = int((flatten(matrix_weights(tampered)) == 0).sum())
    assert zeros == round(0.5 * total)


def test_single_weight_changes_one_weight_and_epsilon_zero_nothing(wm):
    run, tampered = run_single_weight(context(wm), SingleWeightParams(epsilons=[0.0, 100.0], trials=2, accuracy_trials=1),
                                      seed=0)
    settings = [(r["position"], r["epsilon"]) for r in run["records"]]
    assert settings == [("random", 0.0), ("random", 100.0), ("largest", 0.0), ("largest", 100.0)]
    assert all(r["mean_flipped"] == 0 for r in run["records"] if r["epsilon"] == 0)
    assert count_changed(tampered, wm["model"]) == 1  # the last trial: the largest weight, scaled
    largest = flatten(all_weights(wm["model"])).abs().max()
    assert float(abs(run["largest_weight"])) == float(largest)


def test_bitflip_attack_records_each_class_and_k(wm):
    run, tampered = run_bitflip(context(wm), BitflipParams(ks=[1, 3], classes=["mantissa-low", "sign"], trials=2,
                                                           accuracy_trials=1), seed=0)
    assert [r["setting"] for r in run["records"]] == ["k=1 (mantissa-low)", "k=3 (mantissa-low)", "k=1 (sign)",
                                                       "k=3 (sign)"]
    assert count_changed(tampered, wm["model"]) == 3
    with pytest.raises(UserError, match="cannot flip bits in"):
        run_bitflip(context(wm), BitflipParams(ks=[10 ** 9], classes=["sign"], trials=2, accuracy_trials=1), seed=0)


def test_quantize_records_every_mode_and_int8_moves_weights(wm):
    run, _ = run_quantize(context(wm), QuantizeParams(modes=list(QUANTIZERS)), seed=0)
    records = {r["mode"]: r for r in run["records"]}
    assert set(records) == set(QUANTIZERS)
    assert all(r["weights_changed"] > 0 for r in records.values())


def test_fine_pruning_removes_channels_in_increasing_activation_order(wm, tmp_path):
    poisoned_path = tmp_path / "poisoned.pt"  # any same-arch checkpoint exercises the defense path
    save_classifier(str(poisoned_path), wm["model"], dict(read_checkpoint(wm["paths"]["model"])["meta"]))
    ctx = context(wm)
    p = FinePruneParams(accuracy_drop=0.03, rank_samples=256, epochs=1, poisoned_model=str(poisoned_path))
    run, tampered = run_fine_prune(ctx, p, seed=0)
    activation = mean_channel_activation(wm["model"], ctx.train.images[:256], 1024)
    assert run["prune_order"] == torch.argsort(activation, stable=True).tolist()
    mine = [r for r in run["records"] if r["target"] == "watermarked"]
    pruned = [r["channel"] for r in mine if r["phase"] == "prune" and "channel" in r]
    assert pruned == run["prune_order"][:len(pruned)] and pruned
    assert [r["mean_activation"] for r in mine if "channel" in r] == sorted(activation[pruned].tolist())
    last_prune = [r for r in mine if r["phase"] == "prune"][-1]
    assert mine[0]["clean_accuracy"] - last_prune["clean_accuracy"] >= 0.03 or len(pruned) == len(activation) - 1
    assert {r["phase"] for r in mine} == {"prune", "fine-tune"}
    columns = classifier_layer(tampered).weight[:, pruned]
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
    assert robust.trigger_accuracy(model, backdoor) >= 0.9


def test_restore_tracks_both_watermarks_through_both_phases(backdoored):
    model, _ = load_classifier(backdoored, "cpu")
    backdoor = read_checkpoint(backdoored)["backdoor"]
    # A stand-in fragile watermark: test images with the model's own labels as the key.
    triggers = make_context(model, None, []).probe.test.images[:30]
    key = model(triggers.float() / 255).argmax(1).tolist()
    p = RestoreParams(attack_epochs=1, attack_lr=0.05, epochs=1, lr=1e-3, recovered=0.9)
    with pytest.raises(UserError, match="needs a model trained with `train.py --backdoor-watermark`"):
        run_restore(make_context(model, triggers, key), p, seed=0)
    run, _ = run_restore(make_context(model, triggers, key, probe={"backdoor": backdoor}), p, seed=0)
    assert [r["phase"] for r in run["records"]] == ["fine-tune", "fine-tune", "restore"]
    assert all("backdoor_accuracy" in r and "step" in r and "epoch" in r for r in run["records"])
    assert run["backdoor_accuracy"]["before"] >= 0.9
    assert isinstance(run["robust_restored"], bool) and isinstance(run["fragile_broken_after_restore"], bool)


# ----------------------------------------------------------------------------- the worked example

def test_the_worked_example_in_the_architecture_doc_is_a_working_attack(wm):
    """docs/architecture.md shows how to add an attack in one file: that file, run as written, is an attack whose
    records carry every verdict key."""
    import os
    import re
    import types

    from conftest import ROOT
    from fragile.tamper import records
    doc = open(os.path.join(ROOT, "docs", "architecture.md")).read()
    source = re.search(r"## Adding an attack.*?```python\n(.*?)```", doc, re.S).group(1)
    module = types.ModuleType("fragile.tamper.rounding")
    module.__package__ = "fragile.tamper"
    exec(compile(source, "fragile/tamper/rounding.py", "exec"), module.__dict__)
    run, tampered = module.run_rounding(context(wm), module.RoundingParams(decimals=[6, 1]), seed=0)
    fine, coarse = run["records"]
    assert all(set(records.VERDICT_KEYS) <= set(r) for r in run["records"])
    assert fine["setting"] == "decimals=6" and coarse["mean_flipped"] >= fine["mean_flipped"]
    assert count_changed(tampered, wm["model"]) > 0 and untouched(wm)
