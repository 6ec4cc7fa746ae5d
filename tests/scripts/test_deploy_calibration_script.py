"""Triggers calibrated in named deployments, as a user runs it: generate_samples.py --deploy puts every margin trigger
on its key in each deployment's own arithmetic with at least that deployment's delta; the benign matrix runs within
each and reports false alarms per deployment; verify.py through a calibrated deployment says intact without a
warning, through another with one; eval.py --attack limit measures the physical limit; bad input is one line."""
import json

import pytest
import torch

from conftest import run_script
from fragile.core.io import load_classifier
from fragile.deploy.arithmetic import arithmetic
from fragile.deploy.targets import calibrated_for
from fragile.watermark.methods.common import key_margins
from fragile.watermark.trigger_io import load_triggers

pytestmark = pytest.mark.integration

DEPLOY = ["onnxruntime", "torch-bf16"]
SMALL_MARGIN = ("--method", "margin", "--num-triggers", 8, "--key-seed", 1, "--margin-steps", 40,
                "--margin-grid-rounds", 80, "--margin-surrogates", 0, "--margin-select-draws", 4, "--margin-pool", 2,
                "--device", "cpu", "--no-progress")


@pytest.fixture(scope="module")
def calibrated(watermarked, tmp_path_factory):
    root = tmp_path_factory.mktemp("deploy")
    triggers, key = root / "triggers", root / "key.json"
    proc = run_script("generate_samples.py", "--model", watermarked["model"], *SMALL_MARGIN, "--deploy",
                      ",".join(DEPLOY), "--out", triggers, "--key-out", key)
    return {"triggers": triggers, "key": key, "root": root, "stdout": proc.stdout}


def one_error_line(proc, code, expected):
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == code and len(lines) == 1 and lines[0].startswith("error:") and expected in lines[0], \
        proc.stderr


def test_every_trigger_sits_on_its_key_above_each_deployments_delta(watermarked, calibrated):
    images, meta = load_triggers(str(calibrated["triggers"]))   # the PNGs, as they will be queried
    key = torch.tensor(json.load(open(calibrated["key"]))["labels"])
    assert meta["deployments"] == DEPLOY and calibrated_for(meta) == DEPLOY
    model, model_meta = load_classifier(watermarked["model"])
    for name in DEPLOY:   # margins recomputed here, in each deployment; delta from its recorded jitter
        delta = meta["deployment_calibration"][name]["delta"]
        assert delta >= 10 * meta["deployment_calibration"][name]["jitter"]["max"]
        margins = key_margins(arithmetic(name, model, model_meta).predict(images), key)
        assert margins.min().item() >= delta, name
    # bf16 is another arithmetic: its delta is its own, far above fp32's
    calibration = meta["deployment_calibration"]
    assert calibration["torch-bf16"]["delta"] > 100 * calibration["onnxruntime"]["delta"]
    assert "calibrated for onnxruntime, torch-bf16" in calibrated["stdout"]


def test_the_benign_matrix_runs_within_each_calibrated_deployment_without_false_alarms(watermarked, calibrated):
    out = calibrated["root"] / "benign"
    run_script("eval.py", "--model", watermarked["model"], "--triggers", calibrated["triggers"], "--key",
               calibrated["key"], "--attack", "benign", "--device", "cpu", "--no-progress", "--results-dir", out)
    results = json.load(open(next(out.glob("*_benign.json"))))
    run = results["runs"][0]
    assert set(run["per_entry"]) == set(DEPLOY) and run["false_alarms"] == 0
    settings = {r["setting"] for r in run["records"]}
    assert {"onnxruntime: graph optimizations none", "torch-bf16: batch size 1"} <= settings


def test_verify_through_a_calibrated_deployment_has_no_warning_and_through_another_it_has(watermarked, calibrated):
    args = ("verify.py", "--model", watermarked["model"], "--triggers", calibrated["triggers"], "--key",
            calibrated["key"], "--json")
    inside = run_script(*args, "--deployment", "torch-bf16", check=False)
    assert inside.returncode == 0 and json.loads(inside.stdout)["verdict"] == "intact" and not inside.stderr.strip()
    outside = run_script(*args, "--deployment", "openvino", check=False)
    assert outside.stderr.startswith("warning:") and "not for openvino" in outside.stderr


def test_the_physical_limit_is_measured_in_the_deployment(watermarked, calibrated):
    out = calibrated["root"] / "limit"
    run_script("eval.py", "--model", watermarked["model"], "--triggers", calibrated["triggers"], "--key",
               calibrated["key"], "--attack", "limit", "--deployment", "onnxruntime", "--limit-sigmas", 1e-9, 1.0,
               "--limit-trials", 4, "--device", "cpu", "--no-progress", "--results-dir", out)
    run = json.load(open(next(out.glob("*_limit.json"))))["runs"][0]
    assert run["deployment"] == "onnxruntime" and run["sigma_at_jitter"] > 0
    assert run["resolution"] >= run["jitter"]
    # sigma 1 destroys the model (every trial detected); 1e-9 moves no label beyond an fp32 deployment's jitter
    assert run["smallest_sigma_detected"] == 1.0 and run["ratio_to_limit"] == pytest.approx(1.0 / run["sigma_at_jitter"])
    low = [r for r in run["records"] if r["sigma"] == 1e-9]
    assert len(low) == 4 and not any(r["detected"] for r in low)


@pytest.mark.parametrize("case", ["unknown", "method", "cuda", "eval-two"])
def test_bad_input_is_one_error_line_before_any_work(watermarked, tmp_path, case):
    out = ("--out", tmp_path / "t", "--key-out", tmp_path / "k.json")
    if case == "unknown":
        proc = run_script("generate_samples.py", "--model", watermarked["model"], *SMALL_MARGIN, "--deploy",
                          "onnxruntime,tensorrt", *out, check=False)
        one_error_line(proc, 2, "unknown deployment 'tensorrt'")
    elif case == "method":
        proc = run_script("generate_samples.py", "--model", watermarked["model"], "--method", "paper", "--deploy",
                          "onnxruntime", *out, check=False)
        one_error_line(proc, 2, "add --method margin")
    elif case == "cuda":
        if torch.cuda.is_available():
            pytest.skip("a GPU is present: the CUDA deployment runs here")
        proc = run_script("generate_samples.py", "--model", watermarked["model"], *SMALL_MARGIN, "--deploy",
                          "torch-cuda-bf16", *out, check=False)
        one_error_line(proc, 2, "needs a GPU")
    else:
        proc = run_script("eval.py", "--model", watermarked["model"], "--attack", "benign", "--deployment",
                          "onnxruntime,openvino", "--results-dir", tmp_path, check=False)
        one_error_line(proc, 2, "--deployment takes one deployment")
    assert not (tmp_path / "t").exists()
