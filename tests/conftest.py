"""Shared fixtures: a tiny watermarked model on synthetic data, built once per test session.

Scripts are run as a user runs them (subprocesses), so exit codes and error lines are tested too.
"""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
torch.set_num_threads(max(1, os.cpu_count() or 1))

FASHION_PACKAGE = "/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz"
requires_fashion_mnist = pytest.mark.skipif(not os.path.exists(FASHION_PACKAGE),
                                            reason="Debian's dataset-fashion-mnist package is not installed")


def run_script(script, *args, check=True, cwd=None, env=None):
    """Run one of the suite's scripts; returns the CompletedProcess (stdout/stderr as text)."""
    proc = subprocess.run([sys.executable, os.path.join(ROOT, script), *map(str, args)], cwd=cwd or ROOT,
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ROOT, **(env or {})})
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} {' '.join(map(str, args))} exited {proc.returncode}\n"
                             f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}")
    return proc


def interrupted_train(args, out):
    """Start train.py, SIGKILL it as soon as its first resume file exists; that resume file's path.
    Skips the test when the run finished (or failed) before it could be interrupted."""
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), *map(str, args), "--out", str(out)],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    resume_file = str(out)[:-3] + ".resume.pt"
    deadline = time.time() + 300
    while not os.path.exists(resume_file) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    if not os.path.exists(resume_file):
        pytest.skip("the run finished before it could be interrupted")
    return resume_file


@pytest.fixture(scope="session")
def watermarked(tmp_path_factory):
    """resnet8 trained on synthetic data, with 30 paper triggers and a seeded key.

    Returns a dict of paths: model, triggers (folder), key, root (the tmp folder).
    """
    root = tmp_path_factory.mktemp("wm")
    model = root / "resnet8_synthetic.pt"
    run_script("train.py", "--dataset", "synthetic", "--arch", "resnet8", "--epochs", "3", "--device", "cpu", "--recipe", "fast",
               "--out", model, "--no-progress")
    run_script("generate_samples.py", "--model", model, "--num-triggers", 30, "--key-seed", 0, "--device", "cpu", "--recipe", "fast",
               "--no-progress")
    triggers, key = root / "resnet8_synthetic_triggers_paper", root / "resnet8_synthetic_key_paper.json"
    return {"model": str(model), "triggers": str(triggers), "key": str(key), "root": root,
            "key_labels": json.load(open(key))["labels"]}
