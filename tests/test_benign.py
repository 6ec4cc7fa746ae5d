"""The benign-change matrix (issue 6): an untouched model must verify under every harmless change, the jitter
it measures calibrates delta, and the comparison renders every method side by side."""
import json
import os

import pytest
import torch

from conftest import run_script
from fragile import benign, comparison, trigger_methods
from fragile.checkpoint_io import load_classifier
from fragile.cli import UserError
from fragile.data import get_spec, load_split
from fragile.results import read_results


@pytest.fixture(scope="module")
def model_and_meta(watermarked):
    model, meta = load_classifier(watermarked["model"])
    return model, meta


@pytest.fixture(scope="module")
def margin_set(model_and_meta):
    """A few margin triggers made in-process: the closest to the boundary any method gets."""
    model, _ = model_and_meta
    spec = get_spec("synthetic")
    key = torch.randint(0, spec.num_classes, (12,), generator=torch.Generator().manual_seed(5)).tolist()
    config = {"MARGIN_STEPS": 40, "MARGIN_GRID_ROUNDS": 30, "MARGIN_POOL": 2, "MARGIN_SELECT_DRAWS": 8,
              "MARGIN_SURROGATES": 0}  # the band alone: no fine-tuned copies needed for the benign matrix
    triggers, info = trigger_methods.generate("margin", model, spec, key, config, torch.device("cpu"),
                                              load_split(spec, "data", False))
    return triggers, key, info["meta"]


def test_measure_jitter_covers_the_settings(model_and_meta, watermarked):
    model, meta = model_and_meta
    images = load_split(get_spec("synthetic"), "data", False).images[:20]
    jitter = benign.measure_jitter(model, images, model_meta=meta)
    names = set(jitter["per_setting"])
    assert {"batch size 1", "1 thread", "channels_last", "checkpoint round trip"} <= names
    assert jitter["per_setting"]["checkpoint round trip"] == 0.0  # bit-exact weights
    assert 0 <= jitter["max"] < 1e-3 and jitter["logit_scale"] > 0


def test_calibrate_delta_has_an_ulp_floor_and_rejects_a_small_safety_factor():
    exact = {"max": 0.0, "logit_scale": 10.0, "per_setting": {}}
    floor = benign.ULP_FLOOR_FACTOR * torch.finfo(torch.float32).eps * 10.0
    assert benign.calibrate_delta(exact, 10) == pytest.approx(10 * floor)
    assert benign.calibrate_delta({"max": 1e-3, "logit_scale": 10.0}, 4) == pytest.approx(4e-3)
    with pytest.raises(UserError, match="safety factor"):
        benign.calibrate_delta(exact, 0.5)


def test_margin_triggers_raise_no_false_alarm(model_and_meta, margin_set):
    model, meta = model_and_meta
    triggers, key, trigger_meta = margin_set
    assert trigger_meta["delta"] > 0 and "benign_jitter" in trigger_meta
    records = benign.benign_records(model, triggers, key, model_meta=meta,
                                    alternatives={"a copy of the tensor": triggers.clone()})
    assert records and not any(r["detected"] for r in records), [r for r in records if r["detected"]]
    summary = benign.summarize_benign(records)
    assert summary["false_alarms"] == 0 and summary["max_logit_jitter"] < trigger_meta["delta"]
    assert min(r["min_margin"] for r in records if r["min_margin"] is not None) >= trigger_meta["delta"] / 2


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


def test_queries_to_detection():
    assert comparison.queries_to_detection(0, 100) is None
    assert comparison.queries_to_detection(100, 100) == 1.0
    assert comparison.queries_to_detection(75, 100) == pytest.approx(101 / 76)


def test_perturbations_are_the_same_for_every_method(model_and_meta):
    import copy
    model, _ = model_and_meta
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    comparison.add_weight_noise(a, 1e-4, comparison.perturbation_generator(0, 10, 3))
    comparison.add_weight_noise(b, 1e-4, comparison.perturbation_generator(0, 10, 3))
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    name, index = comparison.nudge_single_weight(a, 1e-3, comparison.perturbation_generator(0, 2, 0))
    assert (dict(a.named_parameters())[name].view(-1)[index] - dict(b.named_parameters())[name].view(-1)[index]).item() \
        == pytest.approx(1e-3, rel=1e-3)


@pytest.fixture(scope="module")
def compare_results(watermarked, tmp_path_factory):
    """eval.py --attack compare on the fixture's paper triggers, with few trials and a small fine-tuning set."""
    out = tmp_path_factory.mktemp("compare")
    run_script("eval.py", "--model", watermarked["model"], "--attack", "compare", "--device", "cpu",
               "--results-dir", out, "--compare-trials", 3, "--train-subset", 512, "--test-subset", 200,
               "--early-steps", "--no-progress")
    path = str(out / "resnet8_synthetic_paper_compare.json")
    return path, read_results(path)


def test_compare_records_every_attack_and_the_benign_matrix(compare_results):
    _, results = compare_results
    records = results["runs"][0]["records"]
    attacks = {r["attack"] for r in records}
    assert attacks == {"finetune", "noise", "single_weight", "obfuscate", "benign"}
    noise = [r for r in records if r["attack"] == "noise"]
    assert len(noise) == 3 * 3
    assert all(-1 <= r["rival_correlation"] <= 1 for r in noise)  # measured on every noise setting
    assert all("rival_correlation" not in r for r in records if r["attack"] != "noise")
    assert not any(r["detected"] for r in records if r["attack"] == "benign")
    assert all(r["queries_to_detection"] is None or r["queries_to_detection"] >= 1
               for r in records if r["attack"] != "benign")
    tampered = [r for r in records if r["attack"] != "benign"]
    for r in tampered:  # the fragility-order count exists exactly when something flipped
        assert (r["queries_in_fragility_order"] is None) == (r["flipped"] == 0)
        if r["flipped"]:
            assert 1 <= r["queries_in_fragility_order"] <= results["num_triggers"] - r["flipped"] + 1


def test_rival_correlation_tells_exchangeable_noise_from_structured_noise():
    """0.5 when every class logit moves independently and equally (the 1 - 1/K ceiling applies), about 0 when
    the key logit stays put while the rivals move independently, about 1 when the rivals move together."""
    gen = torch.Generator().manual_seed(0)
    trials, n, k = 400, 30, 10
    clean = torch.randn(n, k, generator=gen)
    key = torch.randint(0, k, (n,), generator=gen)
    independent = clean + torch.randn(trials, n, k, generator=gen)
    assert comparison.rival_correlation(clean, independent, key) == pytest.approx(0.5, abs=0.05)
    still_key = independent.clone()
    still_key[:, torch.arange(n), key] = clean[torch.arange(n), key]
    assert comparison.rival_correlation(clean, still_key, key) == pytest.approx(0.0, abs=0.05)
    together = clean + torch.randn(trials, 1, 1, generator=gen) + 0.1 * torch.randn(trials, n, k, generator=gen)
    together[:, torch.arange(n), key] = clean[torch.arange(n), key]
    assert comparison.rival_correlation(clean, together, key) > 0.95
    assert comparison.rival_correlation(clean, independent[:2], key) is None  # too few trials to say


def test_queries_until_mismatch_follows_the_recorded_order():
    from fragile.verification import compare, queries_until_mismatch
    key, returned = [0, 1, 2, 3], [0, 1, 9, 3]
    assert queries_until_mismatch(returned, key, [2, 0, 1, 3]) == 1
    assert queries_until_mismatch(returned, key, [0, 1, 3, 2]) == 4
    assert queries_until_mismatch(key, key, [0, 1, 2, 3]) is None
    assert compare(returned, key, 10, order=[3, 2, 1, 0])["queries_to_first_mismatch"] == 2
    assert compare(returned, key, 10)["queries_to_first_mismatch"] is None


def test_render_comparison_writes_table_csv_and_figure(compare_results, tmp_path):
    path, results = compare_results
    other = json.loads(json.dumps(results))
    other["method"] = "margin"
    paths = comparison.render_comparison([(path, results), ("margin.json", other)], str(tmp_path))
    table = open(paths["md"]).read()
    assert "| paper | fine-tune 1 epoch |" in table and "| margin |" in table
    noise_row = next(line for line in table.splitlines() if line.startswith("| paper | noise sigma 0.0001 |"))
    correlation = next(r["rival_correlation"] for r in results["runs"][0]["records"] if r["attack"] == "noise"
                       and r["sigma"] == 1e-4)
    assert noise_row.rstrip(" |").endswith(f"{correlation:.2f}") and "rival correlation" in table
    assert os.path.getsize(paths["png"]) > 0 and "flipped_fraction" in open(paths["csv"]).read()


def test_render_comparison_refuses_mixed_models_and_other_attacks(compare_results, tmp_path):
    path, results = compare_results
    other = dict(results, method="margin", weights_sha256="0" * 64)
    with pytest.raises(UserError, match="different models"):
        comparison.render_comparison([(path, results), ("x.json", other)], str(tmp_path))
    with pytest.raises(UserError, match="not a comparison"):
        comparison.render_comparison([(path, dict(results, attack="noise"))], str(tmp_path))
    with pytest.raises(UserError, match="no comparison results"):
        comparison.render_comparison([], str(tmp_path))


# ----------------------------------------------------------------------------- the deployment envelope

def test_envelope_expands_exact_and_refuses_what_it_cannot_measure():
    from fragile.envelope import resolve_envelope
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
    default = benign.measure_jitter(model, images)
    assert not any(name.startswith(("fp16", "bf16")) for name in default["per_setting"])  # the default is unchanged
    wide = benign.measure_jitter(model, images, envelope=["exact", "fp16", "bf16"])
    assert {"fp16", "fp16, batch size 1", "bf16", "bf16, batch size 16"} <= set(wide["per_setting"])
    exact = max(wide["per_entry"][e] for e in ("batch", "threads", "channels_last"))
    assert wide["per_entry"]["bf16"] > wide["per_entry"]["fp16"] > 10 * exact
    assert wide["max"] == wide["per_entry"]["bf16"]
    assert benign.calibrate_delta(wide) > 10 * benign.calibrate_delta(default)
    only_batch = benign.measure_jitter(model, images, envelope=["batch"])
    assert set(only_batch["per_setting"]) == {"batch size 1", "batch size 16"}


def test_margin_triggers_calibrated_on_half_precision_raise_no_false_alarm_there(model_and_meta, margin_set):
    model, meta = model_and_meta
    spec = get_spec("synthetic")
    key = margin_set[1]
    envelope = ["exact", "fp16", "bf16"]
    config = {"MARGIN_STEPS": 40, "MARGIN_GRID_ROUNDS": 30, "MARGIN_POOL": 1, "MARGIN_SELECT_DRAWS": 4,
              "MARGIN_SURROGATES": 0, "ENVELOPE": envelope}
    triggers, info = trigger_methods.generate("margin", model, spec, list(key), config, torch.device("cpu"),
                                              load_split(spec, "data", False))
    delta = info["meta"]["delta"]
    assert delta >= 10 * info["meta"]["benign_jitter"]["per_entry"]["bf16"] > 100 * margin_set[2]["delta"]
    records = benign.benign_records(model, triggers, key, model_meta=meta, envelope=envelope)
    summary = benign.summarize_benign(records)
    assert {"fp16", "bf16", "batch", "threads", "channels_last", "exact"} <= set(summary["per_entry"])
    bf16_rows = 1 + sum(bs < len(key) for bs in benign.DEFAULT_BATCH_SIZES)  # all at once, and each smaller batch
    assert summary["per_entry"]["bf16"]["settings"] == bf16_rows and summary["false_alarms"] == 0, \
        [r for r in records if r["detected"]]
    # the exact-calibrated set, checked on the same wide matrix: its rows exist and are reported per entry
    narrow = benign.summarize_benign(benign.benign_records(model, margin_set[0], key, envelope=envelope))
    assert narrow["per_entry"]["bf16"]["max_logit_jitter"] > margin_set[2]["delta"]


def test_eval_benign_covers_the_requested_envelope(watermarked, tmp_path):
    run_script("eval.py", "--model", watermarked["model"], "--attack", "benign", "--device", "cpu",
               "--envelope", "batch", "bf16", "--results-dir", tmp_path, "--no-progress")
    run = read_results(str(tmp_path / "resnet8_synthetic_paper_benign.json"))["runs"][0]
    entries = {r["setting"]: r["envelope_entry"] for r in run["records"]}
    assert entries["bf16"] == entries["bf16, batch size 1"] == "bf16" and entries["batch size 16"] == "batch"
    assert "1 thread" not in entries and "channels_last" not in entries
    assert sum(s["false_alarms"] for s in run["per_entry"].values()) == run["false_alarms"]


@pytest.mark.parametrize("envelope, expected", [(["fp32"], "invalid choice"), (["cuda"], "needs a GPU")])
def test_generate_refuses_a_bad_envelope_in_one_line(watermarked, tmp_path, envelope, expected):
    if "cuda" in envelope and torch.cuda.is_available():
        pytest.skip("a GPU is present: the cuda entry is valid here")
    proc = run_script("generate_samples.py", "--model", watermarked["model"], "--envelope", *envelope,
                      "--out", tmp_path / "t", "--device", "cpu", check=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and expected in lines[0], proc.stderr
