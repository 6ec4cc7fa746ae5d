"""train.py as a user runs it: it learns, records its recipe, resumes, and refuses bad input in one line."""
import json
import os

import pytest
import torch

from conftest import interrupted_train, requires_fashion_mnist, run_script
from fragile.core.data import get_spec, load_split
from fragile.core.io import atomic_save_torch, load_classifier, read_checkpoint, safe_torch_load
from fragile.core.training import accuracy

pytestmark = pytest.mark.integration
TINY = ["--dataset", "synthetic", "--arch", "resnet8", "--device", "cpu", "--no-progress"]


def test_resnet8_learns_synthetic_well_above_chance(watermarked):
    model, meta = load_classifier(watermarked["model"])
    test = load_split(get_spec("synthetic"), "unused", train=False)
    assert accuracy(model, test) > 0.5  # chance is 0.1
    assert meta["test_accuracy"] == pytest.approx(accuracy(model, test), abs=1e-6)


def _log_epochs(out):
    log = str(out)[:-3] + ".log.jsonl"
    return [json.loads(line)["epoch"] for line in open(log)] if os.path.exists(log) else []


def test_resume_continues_and_matches_an_uninterrupted_run(tmp_path):
    args = ["--dataset", "synthetic", "--arch", "resnet8", "--epochs", 3, "--train-subset", 600,
            "--batch-size", 64, "--device", "cpu", "--no-progress"]
    straight = tmp_path / "straight.pt"
    run_script("train.py", *args, "--out", straight)
    interrupted = tmp_path / "interrupted.pt"
    resume_file = interrupted_train(args, interrupted)
    done = _log_epochs(interrupted)
    if len(done) >= 3:
        pytest.skip("the run finished before it could be interrupted")
    resumed = run_script("train.py", *args, "--out", interrupted, "--resume")
    assert f"resuming {resume_file} after epoch {done[-1]}" in resumed.stdout
    assert _log_epochs(interrupted) == [1, 2, 3]  # no epoch repeated, none missing
    a, b = read_checkpoint(str(straight)), read_checkpoint(str(interrupted))
    assert a["meta"]["weights_sha256"] == b["meta"]["weights_sha256"]  # optimizer and RNG state restored too
    assert not os.path.exists(resume_file)


def test_resume_without_interrupted_run_is_one_clear_error(tmp_path):
    proc = run_script("train.py", "--dataset", "synthetic", "--arch", "resnet8", "--out", tmp_path / "x.pt",
                      "--resume", "--device", "cpu", check=False)
    assert proc.returncode != 0 and proc.stderr.strip().startswith("error:") and "Traceback" not in proc.stderr


@pytest.mark.parametrize("args,message", [
    (["--dataset", "imagenet"], "invalid choice"),
    (["--arch", "vgg"], "invalid choice"),
    (["--out", "/proc/forbidden/x.pt"], "output folder"),
    (["--dataset", "cifar10", "--data-dir", "/nonexistent-offline"], "--data-dir"),
    (["--lr", "1e12", "--epochs", "1", "--train-subset", "200", "--batch-size", "32"], "loss became"),
])
def test_bad_input_is_one_line_and_nonzero_exit(tmp_path, args, message):
    base = ["--dataset", "synthetic", "--arch", "resnet8", "--device", "cpu", "--no-progress", "--out", tmp_path / "m.pt"]
    proc = run_script("train.py", *base, *args, check=False)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], proc.stderr


@requires_fashion_mnist
def test_fashion_mnist_resnet8_reaches_stated_accuracy(tmp_path):
    """The README's quick start, with the paper's recipe (the default)."""
    out = tmp_path / "fm.pt"
    proc = run_script("train.py", "--dataset", "fashion-mnist", "--arch", "resnet8", "--epochs", 3,
                      "--train-subset", 20000, "--device", "cpu", "--no-progress", "--out", out,
                      "--data-dir", tmp_path / "data")
    meta = read_checkpoint(str(out))["meta"]
    assert meta["config"]["RECIPE"] == "paper" and meta["test_accuracy"] > 0.80, proc.stdout
    model, _ = load_classifier(str(out))
    test = load_split(get_spec("fashion-mnist"), str(tmp_path / "data"), train=False)
    assert accuracy(model, test) == pytest.approx(meta["test_accuracy"], abs=1e-6)


def test_train_header_is_the_paper_recipe():
    """The paper's public code trains the classifier with plain cross-entropy, SGD lr 0.1, momentum 0.9,
    weight decay 5e-4 on every parameter, batch 128 and cosine annealing per epoch: the header's defaults."""
    import train
    paper = dict(RECIPE="paper", BATCH_SIZE=128, LR=0.1, SCHEDULE="cosine", WARMUP_EPOCHS=0.0, MOMENTUM=0.9,
                 NESTEROV=False, WEIGHT_DECAY=5e-4, DECAY_ALL=True, LABEL_SMOOTHING=0.0)
    assert {name: getattr(train, name) for name in paper} == paper


@pytest.mark.parametrize("recipe_flags,expected", [
    ([], dict(RECIPE="paper", BATCH_SIZE=128, LR=0.1, SCHEDULE="cosine", LABEL_SMOOTHING=0.0, NESTEROV=False,
              DECAY_ALL=True)),
    (["--recipe", "fast", "--lr", "0.05"], dict(RECIPE="fast", BATCH_SIZE=64, LR=0.05, SCHEDULE="onecycle",
                                                LABEL_SMOOTHING=0.1, NESTEROV=True, DECAY_ALL=False)),
], ids=["default-is-paper", "fast-with-explicit-lr"])
def test_train_records_the_recipe_it_ran(tmp_path, recipe_flags, expected):
    out = tmp_path / "m.pt"
    run_script("train.py", *TINY, "--epochs", 1, "--train-subset", 256, "--out", out, *recipe_flags)
    config = read_checkpoint(str(out))["meta"]["config"]
    assert {k: config[k] for k in expected} == expected


RESUMABLE = [*TINY, "--epochs", 3, "--train-subset", 600, "--batch-size", 64]


def test_resume_after_the_last_epoch_records_the_real_accuracy(tmp_path):
    out = tmp_path / "m.pt"
    resume_file = interrupted_train(RESUMABLE, out)
    done = safe_torch_load(resume_file)
    epochs_done = done["train_state"]["epoch"]
    proc = run_script("train.py", *TINY, "--epochs", epochs_done, "--train-subset", 600, "--batch-size", 64,
                      "--out", out, "--resume")
    meta = read_checkpoint(str(out))["meta"]
    assert meta["test_accuracy"] == done["meta"]["test_accuracy"] > 0.0, proc.stdout
    assert meta["weights_sha256"] == done["meta"]["weights_sha256"]


def test_resume_on_another_device_reseeds_the_data_order(tmp_path):
    out = tmp_path / "m.pt"
    resume_file = interrupted_train(RESUMABLE, out)
    payload = safe_torch_load(resume_file)
    payload["train_state"]["rng"]["device_gen_type"] = "cuda"   # as if saved on a GPU
    payload["train_state"]["rng"]["device_gen"] = torch.zeros(16, dtype=torch.uint8)   # a state that cannot fit
    atomic_save_torch(payload, resume_file)
    proc = run_script("train.py", *RESUMABLE, "--out", out, "--resume")
    assert "reseeded" in proc.stdout and "Traceback" not in proc.stderr
    assert read_checkpoint(str(out))["meta"]["epochs"] == 3
