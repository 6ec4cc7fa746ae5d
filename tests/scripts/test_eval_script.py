"""eval.py as a user runs it: fine-tuning tracked step by step, the results schema, the tamper suite and the
benign matrix through their flags, and bad input in one line."""
import csv
import json

import pytest

from conftest import run_script
from fragile.tamper import records
from fragile.tamper.records import read_results

pytestmark = pytest.mark.integration


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
    for key in ("schema", "attack", "model", "arch", "dataset", "method", "weights_sha256", "num_triggers", "settings",
                "config", "versions", "device", "wall_time_s", "runs"):
        assert key in r
    finetune = r["settings"]["finetune"]   # the settings under the parameter object's own field names
    assert finetune["lr"] == 1e-3 and finetune["momentum"] == 0.9 and finetune["weight_decay"] == 1e-3
    assert r["settings"]["run"]["seeds"] == [0] and r["settings"]["attack"] is None
    assert r["config"]["LR"] == 1e-3   # the command's flags, kept for provenance
    assert r["versions"]["torch_version"] and r["wall_time_s"] > 0
    for record in r["runs"][0]["records"]:
        assert {"step", "epoch", "phase", "clean_accuracy", *records.VERDICT_KEYS} <= set(record)
        assert record["flipped"] == round((1 - record["match_rate"]) * r["num_triggers"])
    rows = list(csv.DictReader(open(out / "resnet8_synthetic_paper_finetune.csv")))
    assert len(rows) == len(r["runs"][0]["records"]) and rows[0]["seed"] == "0"


FINETUNE_TINY = ["--attack", "finetune", "--epochs", 1, "--train-subset", 300, "--test-subset", 100, "--early-steps",
                 "--device", "cpu", "--no-progress"]


def test_seeds_are_all_kept_and_a_rerun_replaces_the_file_only_with_overwrite(watermarked, tmp_path):
    args = ["--model", watermarked["model"], *FINETUNE_TINY, "--results-dir", tmp_path]
    run_script("eval.py", *args, "--seeds", 0, 1)
    path = tmp_path / "resnet8_synthetic_paper_finetune.json"
    assert [run["seed"] for run in json.load(open(path))["runs"]] == [0, 1]
    refused = run_script("eval.py", *args, "--seeds", 2, check=False)
    assert refused.returncode == 2 and "exists: pass --overwrite" in refused.stderr and "seed 2" not in refused.stdout
    assert [run["seed"] for run in json.load(open(path))["runs"]] == [0, 1]
    run_script("eval.py", *args, "--seeds", 2, "--overwrite")
    assert [run["seed"] for run in json.load(open(path))["runs"]] == [2]
    assert not list(tmp_path.glob(".*.tmp"))  # atomic writes leave no temp files


def test_a_second_writer_of_one_results_file_is_refused_before_it_works(watermarked, tmp_path):
    """Two eval.py runs on one results file: the second is refused at once (the first holds its lock), so
    neither run is lost to the other's rename."""
    from fragile.tamper.records import claim_results
    claim_results(str(tmp_path / "resnet8_synthetic_paper_finetune.json"), overwrite=False)   # this process: the first
    proc = run_script("eval.py", "--model", watermarked["model"], *FINETUNE_TINY, "--results-dir", tmp_path,
                      check=False)
    assert proc.returncode == 2 and "another run is writing" in proc.stderr and "seed 0" not in proc.stdout


@pytest.mark.parametrize("args, message", [
    (["--seeds"], "--seeds needs at least one value"), (["--seeds", 1, 1], "repeats a seed"),
    (["--max-mismatches", 30], "--max-mismatches must be an integer in 0..29"),
    (["--max-mismatches", -1], "--max-mismatches"), (["--batch-size", 0], "--batch-size"),
    (["--save-tampered", "DIR"], "is a folder"), (["--results-dir", "FILE"], "is a file, not a folder"),
])
def test_bad_settings_and_outputs_fail_before_any_work_and_write_nothing(watermarked, tmp_path, args, message):
    (tmp_path / "FILE").write_text("x")
    args = [str(tmp_path) if a == "DIR" else str(tmp_path / "FILE") if a == "FILE" else a for a in args]
    out = tmp_path / "out"
    proc = run_script("eval.py", "--model", watermarked["model"], *FINETUNE_TINY, "--results-dir", out, *args,
                      check=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and message in lines[0], proc.stderr
    assert "seed" not in proc.stdout and not (out.exists() and list(out.glob("*.json")))


def test_triggers_made_for_another_model_are_refused(watermarked, tmp_path):
    """Another classifier (a second seed) with the session model's triggers: every attack would 'detect' flips
    that were there before it began."""
    other = tmp_path / "other.pt"
    run_script("train.py", "--dataset", "synthetic", "--arch", "resnet8", "--epochs", 1, "--train-subset", 300,
               "--seed", 9, "--device", "cpu", "--no-progress", "--out", other)
    proc = run_script("eval.py", "--model", other, "--triggers", watermarked["triggers"], *FINETUNE_TINY,
                      "--results-dir", tmp_path, check=False)
    assert proc.returncode == 2 and "were made for weights" in proc.stderr and "seed 0" not in proc.stdout


def test_eval_benign_flags_nothing_on_the_untouched_model(watermarked, tmp_path):
    run_script("eval.py", "--model", watermarked["model"], "--attack", "benign", "--device", "cpu",
               "--results-dir", tmp_path, "--no-progress")
    results = read_results(str(tmp_path / "resnet8_synthetic_paper_benign.json"))
    records = results["runs"][0]["records"]
    settings = {r["setting"] for r in records}
    assert {"batch size 1", "1 thread", "checkpoint round trip", "tensor triggers (triggers.pt) vs PNG"} <= settings
    assert not any(r["detected"] for r in records)
    assert all("max_logit_jitter" in r for r in records)
    assert results["runs"][0]["false_alarms"] == 0


def test_eval_benign_covers_the_requested_envelope(watermarked, tmp_path):
    run_script("eval.py", "--model", watermarked["model"], "--attack", "benign", "--device", "cpu",
               "--envelope", "batch", "bf16", "--results-dir", tmp_path, "--no-progress")
    run = read_results(str(tmp_path / "resnet8_synthetic_paper_benign.json"))["runs"][0]
    entries = {r["setting"]: r["envelope_entry"] for r in run["records"]}
    assert entries["bf16"] == entries["bf16, batch size 1"] == "bf16" and entries["batch size 16"] == "batch"
    assert "1 thread" not in entries and "channels_last" not in entries
    assert sum(s["false_alarms"] for s in run["per_entry"].values()) == run["false_alarms"]


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
    (["--attack", "distill", "--distill-gamma", 0], "--distill-gamma must be in (0, 1]"),
    (["--attack", "random-sample", "--degrade-sample-portion", 2], "--degrade-sample-portion must be in [0, 1]"),
    (["--attack", "specific-class", "--degrade-target", 10], "--degrade-target must be a class of synthetic, 0..9"),
])
def test_bad_input_is_one_error_line(watermarked, tmp_path, args, message):
    proc = run_script("eval.py", "--model", watermarked["model"], "--device", "cpu", "--results-dir", tmp_path,
                      "--test-subset", 100, "--train-subset", 100, "--fine-prune-epochs", 0, *args, check=False)
    assert proc.returncode == 2 and message in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr


def test_a_trigger_set_named_by_its_tensor_file_finds_its_key(watermarked, tmp_path):
    run_script("eval.py", "--model", watermarked["model"], "--attack", "prune", "--prune-ratios", 0.5, "--device", "cpu",
               "--triggers", f"{watermarked['triggers']}/triggers.pt", "--test-subset", 100, "--results-dir", tmp_path,
               "--no-progress")
    results = read_results(str(tmp_path / "resnet8_synthetic_paper_prune.json"))
    assert results["num_triggers"] == 30 and results["runs"][0]["records"][0]["ratio"] == 0.5


def test_every_attack_is_a_choice_and_an_unknown_one_is_refused(watermarked):
    proc = run_script("eval.py", "--model", watermarked["model"], "--attack", "nope", check=False)
    assert proc.returncode == 2 and "invalid choice" in proc.stderr and "'compare'" in proc.stderr


def test_a_layer_variant_runs_from_its_header_and_zero_epochs_is_no_change(watermarked, tmp_path):
    """BIVBench's FTLL through eval.py: its epochs flag reaches the attack, 0 epochs is said and recorded as no
    change, and a negative count is one error line before any work."""
    args = ("--model", watermarked["model"], "--attack", "ftll", "--train-subset", 64, "--test-subset", 50,
            "--device", "cpu", "--results-dir", tmp_path, "--no-progress")
    proc = run_script("eval.py", *args, "--ftll-epochs", 0)
    results = read_results(str(tmp_path / "resnet8_synthetic_paper_ftll.json"))
    assert results["runs"][0]["model_changed"] is False and "recorded as no change" in proc.stdout + proc.stderr
    assert results["settings"]["attack"]["ftll_epochs"] == 0
    bad = run_script("eval.py", *args, "--ftll-epochs", -1, "--overwrite", check=False)
    lines = bad.stderr.strip().splitlines()
    assert bad.returncode == 2 and len(lines) == 1 and "--ftll-epochs" in lines[0], bad.stderr


@pytest.mark.parametrize("args, message", [
    (["--attack", "clean-label", "--clean-label-target", 0], "--clean-label-base and --clean-label-target are both 0"),
    (["--attack", "clean-label", "--clean-label-epochs", -1], "--clean-label-epochs must be at least 0"),
    (["--attack", "trojan", "--trojan-strength", -1], "--trojan-strength must be at least 0"),
    (["--attack", "trojan", "--trojan-target", 10], "--trojan-target 10 is not a class of synthetic"),
    (["--attack", "targeted", "--targeted-inputs", 0], "--targeted-inputs must be a positive integer"),
])
def test_bad_backdoor_settings_are_one_error_line(watermarked, tmp_path, args, message):
    """BIVBench's clean-label, trojan and targeted attacks: a bad setting is one line, and nothing is written (a
    class the model lacks is found once the model is loaded, before the attack works)."""
    proc = run_script("eval.py", "--model", watermarked["model"], "--device", "cpu", "--results-dir", tmp_path,
                      "--test-subset", 100, "--train-subset", 100, *args, check=False)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and not list(tmp_path.glob("*.json"))


def test_the_trojan_runs_from_its_header_and_strength_zero_is_no_change(watermarked, tmp_path):
    """The trojan through eval.py: its attack success rate and edited weights recorded, strength 0 no change."""
    args = ("--model", watermarked["model"], "--attack", "trojan", "--trojan-samples", 128, "--train-subset", 200,
            "--test-subset", 100, "--device", "cpu", "--results-dir", tmp_path, "--no-progress")
    run_script("eval.py", *args)
    path = str(tmp_path / "resnet8_synthetic_paper_trojan.json")
    run = read_results(path)["runs"][0]
    before, after = run["records"]
    assert run["model_changed"] is True and run["weights_changed"] > 0
    assert after["attack_success_rate"] > before["attack_success_rate"]
    proc = run_script("eval.py", *args, "--trojan-strength", 0, "--overwrite")
    results = read_results(path)
    assert results["runs"][0]["model_changed"] is False and "recorded as no change" in proc.stdout + proc.stderr
    assert results["settings"]["attack"]["strength"] == 0
