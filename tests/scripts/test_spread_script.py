"""scripts/spread.py: the headline number's spread over independent classifiers and trigger sets. Bad settings
are one error line before any work; a smoke run (synthetic data, one tiny unit) writes the report, and a run
stopped after its classifier resumes from there."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT

pytestmark = pytest.mark.integration
SCRIPT = os.path.join(ROOT, "scripts", "spread.py")
SMOKE = ["--dataset", "synthetic", "--groups", "table", "--table-seeds", 0, "--key-seeds", 1, "--table-subset", 2000,
         "--table-epochs", 2, "--table-paper-pairs", 0, "--num-triggers", 10, "--threads", 1]


def spread(out, *args):
    return subprocess.run([sys.executable, SCRIPT, "--out", str(out), *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": ROOT})


@pytest.mark.parametrize("args, message", [
    (["--table-seeds"], "--table-seeds is empty"), (["--key-seeds"], "no key seeds"),
    (["--table-subset", 0], "--table-subset (training images) must be a positive integer"),
    (["--table-epochs", 0], "--table-epochs must be a positive integer"),
    (["--groups", "imagenet"], "--groups: choose from table, converged, resnet18"),
    (["--table-seeds", 1, 1], "repeats a seed"), (["--workers", 0], "--workers"),
])
def test_a_seed_list_or_scale_that_cannot_run_is_one_error_line_before_any_work(tmp_path, args, message):
    out = tmp_path / "out"
    proc = spread(out, "--groups", "table", *args)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and message in lines[0], proc.stderr
    assert not out.exists()


def test_a_smoke_run_reports_the_spread_and_a_stopped_run_resumes_per_unit(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, SCRIPT, "--out", str(out), *map(str, SMOKE)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "PYTHONPATH": ROOT}, start_new_session=True)
    model = out / "table" / "seed0" / "resnet8_synthetic.pt"
    deadline = time.time() + 600
    while not model.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)   # the script and the step it was running: stopped after its classifier
    proc.wait()
    done = spread(out, *SMOKE)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "table seed 0 train" not in done.stdout and "== table seed 0 key 1 fast finetune" in done.stdout
    report = json.load(open(out / "spread.json"))
    assert report["complete"] and report["threads_per_process"] == 1
    (unit,) = report["units"]
    assert unit["classifier_seed"] == 0 and unit["key_seed"] == 1 and unit["threads"] == 1
    (row,) = [s for s in report["summary"] if s["generator_recipe"] == "fast"]
    assert row["finetune_flipped"]["n"] == 1 and row["finetune_flipped"]["mean"] == unit["finetune_flipped"]
    assert row["poison_flipped"]["min"] == row["poison_flipped"]["max"] == unit["poison_flipped"]
    assert (out / "spread.png").stat().st_size > 0 and "| table:" in (out / "spread.md").read_text()
    again = spread(out, *SMOKE)
    assert again.returncode == 0 and "==" not in again.stdout.split("| classifiers")[0]   # nothing ran again
