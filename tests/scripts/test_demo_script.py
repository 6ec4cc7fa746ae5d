"""make demo (scripts/demo.sh): the paper's pipeline end to end, ending with the verdicts, the flip counts and the
figure, and a rerun that skips every step. Run here at test size on synthetic data (the real demo's size is the
script's default); the environment is the one the tests run in."""
import os
import subprocess
import sys

import pytest

from conftest import ROOT

pytestmark = pytest.mark.integration


def demo(out):
    env = {**os.environ, "OUT": str(out), "SKIP_SETUP": "1", "VENV": sys.prefix, "DEMO_DATASET": "synthetic",
           "DEMO_TRIGGERS": "12", "DEMO_TRAIN_ARGS": "--epochs 2 --train-subset 2000 --recipe fast",
           "DEMO_GENERATOR_ARGS": "--recipe fast", "DEMO_FINETUNE_ARGS": "--epochs 1 --train-subset 400 "
           "--test-subset 200", "PYTHONPATH": ROOT}
    return subprocess.run(["bash", os.path.join(ROOT, "scripts", "demo.sh")], cwd=ROOT, env=env,
                          capture_output=True, text=True)


def test_the_demo_runs_the_pipeline_prints_its_verdicts_and_skips_what_is_done(tmp_path):
    out = tmp_path / "demo"
    first = demo(out)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    summary = first.stdout.split("== the demo, in short", 1)[1]
    assert "verify, untouched model: INTACT: 12/12" in summary
    assert "verify, finetuned model: TAMPERED" in summary
    assert "clean fine-tuning:" in summary and "poisoned fine-tuning (BadNets):" in summary
    figure = summary.strip().splitlines()[-1].rsplit(": ", 1)[1]
    assert figure.endswith("_match_rate.png") and os.path.getsize(figure) > 0
    again = demo(out)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("done before") == 5 and summary in again.stdout   # nothing reran, same ending
