"""scripts/compare_deployments.sh end to end at tiny size: a set calibrated in ONNX Runtime beside today's default
envelope set, each measured there (comparison attacks, benign matrix within the deployment, physical limit), the
table built from the results; a second run resumes (every step done is skipped)."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT

pytestmark = pytest.mark.integration

SHORT = ("--method margin --num-triggers 8 --margin-steps 30 --margin-grid-rounds 40 --margin-surrogates 0 "
         "--margin-select-draws 4 --margin-pool 1")
EVAL = ["--train-subset", "100", "--test-subset", "100", "--batch-size", "50", "--compare-trials", "2",
        "--limit-sigmas", "1e-9", "1", "--limit-trials", "2"]


def run(model, out):
    env = {**os.environ, "PYTHON": sys.executable, "DEPLOYMENTS": "onnxruntime", "ENVELOPES": "exact",
           "NUM_TRIGGERS": "8", "GENERATE_FLAGS": SHORT, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    return subprocess.run([os.path.join(ROOT, "scripts", "compare_deployments.sh"), str(model), str(out), *EVAL],
                          cwd=ROOT, env=env, capture_output=True, text=True)


def test_the_price_and_the_limit_per_deployment_and_a_rerun_resumes(watermarked, tmp_path):
    model = tmp_path / "resnet8_synthetic.pt"
    shutil.copy(watermarked["model"], model)
    first = run(model, tmp_path / "results")
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
    rows = json.load(open(tmp_path / "results" / "deployment.json"))["rows"]
    by_set = {r["trigger_set"]: r for r in rows}
    assert set(by_set) == {"margin [deploy onnxruntime]", "margin"} and {r["deployment"] for r in rows} == {"onnxruntime"}
    calibrated = by_set["margin [deploy onnxruntime]"]
    assert calibrated["false_alarms"] == 0 and calibrated["benign_settings"] >= 5
    assert calibrated["detections"]["noise sigma 0.001"].endswith("/2")
    assert calibrated["sigma_at_jitter"] > 0 and calibrated["smallest_sigma_detected"] == 1.0
    assert "| onnxruntime | margin [deploy onnxruntime] |" in first.stdout
    second = run(model, tmp_path / "results")
    assert second.returncode == 0 and "== generate" not in second.stdout and "== compare" not in second.stdout
