"""eval.py: clean and poisoned fine-tuning tracked step by step, and the results schema."""
import csv
import json

import pytest

from conftest import run_script
from fragile.results import read_results


@pytest.fixture(scope="module")
def finetune_and_poison(watermarked, tmp_path_factory):
    out = tmp_path_factory.mktemp("results")
    common = ["--model", watermarked["model"], "--epochs", 1, "--batch-size", 32, "--test-subset", 300,
              "--device", "cpu", "--results-dir", out, "--no-progress"]
    run_script("eval.py", *common, "--attack", "finetune")
    run_script("eval.py", *common, "--attack", "poison", "--lr", 1e-2, "--poison-fraction", 0.2)
    return {name: read_results(str(out / f"resnet8_synthetic_paper_{name}.json")) for name in ("finetune", "poison")}, out


def test_clean_fine_tuning_breaks_the_watermark_within_the_first_epoch(finetune_and_poison):
    results, _ = finetune_and_poison
    run = results["finetune"]["runs"][0]
    records = run["records"]
    assert records[0]["step"] == 0 and records[0]["match_rate"] == 1.0 and not records[0]["detected"]
    assert min(r["match_rate"] for r in records) < 1.0
    assert run["first_detection_step"] is not None and 1 <= run["first_detection_step"] <= records[-1]["step"]
    early = [r["step"] for r in records if 0 < r["epoch"] < 1]
    assert early == [s for s in [1, 2, 5, 10, 20, 50, 100] if s < records[-1]["step"]]


def test_poisoning_raises_the_attack_success_rate(finetune_and_poison):
    records = finetune_and_poison[0]["poison"]["runs"][0]["records"]
    before, after = records[0]["attack_success_rate"], records[-1]["attack_success_rate"]
    assert after > before + 0.2 and after > 10 * before, (before, after)


def test_results_schema(finetune_and_poison):
    results, out = finetune_and_poison
    r = results["finetune"]
    for key in ("schema", "attack", "model", "arch", "dataset", "method", "weights_sha256", "num_triggers", "config",
                "versions", "device", "wall_time_s", "runs"):
        assert key in r
    assert r["config"]["LR"] == 1e-3 and r["config"]["MOMENTUM"] == 0.9 and r["config"]["WEIGHT_DECAY"] == 1e-3
    assert r["versions"]["torch_version"] and r["wall_time_s"] > 0
    for record in r["runs"][0]["records"]:
        assert {"step", "epoch", "match_rate", "flipped", "detected", "clean_accuracy"} <= set(record)
        assert record["flipped"] == round((1 - record["match_rate"]) * r["num_triggers"])
    rows = list(csv.DictReader(open(out / "resnet8_synthetic_paper_finetune.csv")))
    assert len(rows) == len(r["runs"][0]["records"]) and rows[0]["seed"] == "0"


def test_seeds_are_all_kept_and_rerun_replaces_the_file(watermarked, tmp_path):
    args = ["--model", watermarked["model"], "--attack", "finetune", "--epochs", 1, "--train-subset", 300,
            "--test-subset", 100, "--early-steps", "--device", "cpu", "--results-dir", tmp_path, "--no-progress"]
    run_script("eval.py", *args, "--seeds", 0, 1)
    path = tmp_path / "resnet8_synthetic_paper_finetune.json"
    assert [run["seed"] for run in json.load(open(path))["runs"]] == [0, 1]
    run_script("eval.py", *args, "--seeds", 2)
    assert [run["seed"] for run in json.load(open(path))["runs"]] == [2]
    assert not list(tmp_path.glob(".*.tmp"))  # atomic writes leave no temp files


def test_freeze_bn_keeps_the_running_statistics_and_still_moves_the_weights():
    import torch
    from fragile.data import balanced_subset, get_spec, load_split
    from fragile.training import make_sgd, train_steps
    from models import build_classifier
    spec = get_spec("synthetic")
    data = balanced_subset(load_split(spec, "data", True), 128, spec.num_classes)

    def tuned(freeze_bn):
        torch.manual_seed(0)
        model = build_classifier("resnet8", spec)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        optimizer = make_sgd(model, 1e-2, 0.9, 0.0, kernels="for-loop")
        for _ in train_steps(model, optimizer, data, spec, torch.Generator().manual_seed(0), 32, "cpu",
                             freeze_bn=freeze_bn):
            pass
        after = model.state_dict()
        return ({k: torch.equal(before[k], after[k]) for k in after if "running_" in k},
                torch.equal(before["1.fc.weight"], after["1.fc.weight"]))

    frozen_stats, frozen_fc_same = tuned(True)
    moving_stats, _ = tuned(False)
    assert frozen_stats and all(frozen_stats.values()) and not frozen_fc_same
    assert not any(moving_stats.values())
