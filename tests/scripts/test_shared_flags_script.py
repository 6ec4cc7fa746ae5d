"""What every script shares: Ctrl-C tells the truth about what was saved, --progress switches the bars, an
unknown recipe is one error line."""
import os
import signal
import subprocess
import sys

import pytest

from conftest import ROOT, run_script

pytestmark = pytest.mark.integration
TINY = ["--dataset", "synthetic", "--arch", "resnet8", "--device", "cpu", "--no-progress"]


@pytest.mark.parametrize("script", ["train.py", "generate_samples.py"])
def test_unknown_recipe_is_one_error_line(script, tmp_path):
    proc = run_script(script, "--recipe", "slow", "--out", tmp_path / "x", check=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error:") and "--recipe" in lines[0]


def test_fine_tuning_attack_decays_every_parameter_by_default():
    import eval as eval_script
    assert eval_script.DECAY_ALL is True and eval_script.WEIGHT_DECAY == 1e-3 and eval_script.LR == 1e-3


def ctrl_c(script, *args):
    """Start a script, wait for its first line of output, send SIGINT; (exit code, stderr)."""
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, script), *map(str, args)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc.stdout.readline()
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    return proc.returncode, stderr


def test_ctrl_c_tells_the_truth_per_script(watermarked, tmp_path):
    code, stderr = ctrl_c("train.py", *TINY, "--epochs", 50, "--out", tmp_path / "m.pt")
    assert code == 130 and "--resume" in stderr and "Traceback" not in stderr
    code, stderr = ctrl_c("eval.py", "--model", watermarked["model"], "--epochs", 50, "--device", "cpu",
                          "--results-dir", tmp_path, "--no-progress")
    assert code == 130 and "nothing was saved" in stderr and "--resume" not in stderr
    assert not list(tmp_path.glob("*.json"))


@pytest.mark.parametrize("flag,shown", [("--progress", True), ("--no-progress", False)])
def test_progress_flag_controls_the_bars(watermarked, tmp_path, flag, shown):
    proc = run_script("eval.py", "--model", watermarked["model"], "--epochs", 1, "--train-subset", 64,
                      "--test-subset", 50, "--device", "cpu", "--results-dir", tmp_path, flag)
    assert ("finetune epoch 1/1" in proc.stderr) == shown
    proc = run_script("generate_samples.py", "--model", watermarked["model"], "--recipe", "fast", "--num-triggers", 5,
                      "--key-seed", 1, "--device", "cpu", "--out", tmp_path / "t", "--key-out", tmp_path / "k.json", flag)
    assert ("generator steps" in proc.stderr) == shown
    proc = run_script("train.py", *TINY[:-1], "--epochs", 1, "--train-subset", 64, "--out", tmp_path / "m.pt", flag)
    assert ("epoch 1/1" in proc.stderr) == shown
