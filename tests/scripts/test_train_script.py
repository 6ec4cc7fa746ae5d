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


def test_a_recipe_sets_every_constant_the_header_marks_recipe(monkeypatch):
    """--recipe fast replaces each (recipe) constant of train.py's header: none is left at the paper's value by a
    name missing from train.py's mapping of the recipe onto its constants."""
    import train
    marked = [line.split("=")[0].strip() for line in open(train.__file__) if "# (recipe)" in line]
    unset = object()
    for name in marked:
        monkeypatch.setattr(train, name, unset)
    monkeypatch.setattr(train, "RECIPE", "fast")
    config = train.apply_recipe({name: unset for name in marked}, torch.device("cpu"))
    assert len(marked) == 9 and all(getattr(train, name) is not unset and config[name] is not unset
                                    for name in marked)


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


# ----------------------------------------------------------------------------- outputs and resume files

def test_an_existing_checkpoint_with_triggers_is_replaced_only_with_overwrite(watermarked, tmp_path):
    import shutil
    out = tmp_path / "resnet8_synthetic.pt"
    shutil.copy(watermarked["model"], out)
    shutil.copytree(watermarked["triggers"], tmp_path / "resnet8_synthetic_triggers_paper")
    before = out.read_bytes()
    proc = run_script("train.py", *TINY, "--epochs", 1, "--train-subset", 200, "--out", out, check=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "--overwrite" in lines[0], proc.stderr
    assert "resnet8_synthetic_triggers_paper" in lines[0] and "no longer verify" in lines[0]
    assert out.read_bytes() == before
    run_script("train.py", *TINY, "--epochs", 1, "--train-subset", 200, "--out", out, "--overwrite")
    assert out.read_bytes() != before


@pytest.mark.parametrize("args, message", [
    (["--epochs", 0], "--epochs must be at least 1"), (["--batch-size", -1], "--batch-size"),
    (["--lr", 0], "--lr must be above 0"), (["--train-subset", -5], "--train-subset"),
])
def test_bad_numbers_fail_before_any_data_is_loaded(tmp_path, args, message):
    proc = run_script("train.py", *TINY, "--out", tmp_path / "m.pt", *args, check=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and message in lines[0] and "synthetic:" not in proc.stdout


def test_an_output_path_that_is_a_folder_fails_before_training(tmp_path):
    proc = run_script("train.py", *TINY, "--epochs", 1, "--out", tmp_path, check=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "is a folder" in lines[0] and "epoch" not in proc.stdout


def test_resume_given_a_finished_checkpoint_says_so(watermarked, tmp_path):
    import shutil
    out = tmp_path / "m.pt"
    shutil.copy(watermarked["model"], str(out)[:-3] + ".resume.pt")   # a final checkpoint where a resume file goes
    proc = run_script("train.py", *TINY, "--epochs", 3, "--out", out, "--resume", check=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "no training state" in lines[0], proc.stderr


def test_a_fresh_run_does_not_replace_an_interrupted_one_unasked(tmp_path):
    out = tmp_path / "m.pt"
    interrupted_train(RESUMABLE, out)
    proc = run_script("train.py", *RESUMABLE, "--out", out, check=False)
    assert proc.returncode == 2 and "pass --resume to continue it" in proc.stderr


def test_a_kill_between_the_log_line_and_the_resume_file_logs_each_epoch_once(tmp_path):
    """Killed after epoch 2's log line but before its resume file: the resumed run repeats epoch 2, and the log
    holds it once (it is rebuilt from the resume file's own record of the log)."""
    out = tmp_path / "m.pt"
    interrupted_train(RESUMABLE, out)
    epochs = _log_epochs(out)
    if len(epochs) >= 3:
        pytest.skip("the run finished before it could be interrupted")
    with open(str(out)[:-3] + ".log.jsonl", "a") as log:   # the line of an epoch whose resume file never came
        log.write(json.dumps({"epoch": epochs[-1] + 1, "train_loss": 1.0}) + "\n")
    run_script("train.py", *RESUMABLE, "--out", out, "--resume")
    assert _log_epochs(out) == [1, 2, 3]


# ----------------------------------------------------------------------------- the determinism contract

def test_the_same_seed_and_thread_count_give_the_same_weights_and_the_checkpoint_says_which(tmp_path):
    """REPRODUCTION.md's contract: seed, thread count, device and torch version (all recorded in the checkpoint's
    metadata) decide the weights; two runs that share them give the same hash."""
    args = [*TINY, "--epochs", 1, "--train-subset", 300, "--batch-size", 32, "--seed", 4]
    hashes = []
    for name in ("a.pt", "b.pt"):
        run_script("train.py", *args, "--out", tmp_path / name, env={"OMP_NUM_THREADS": "1"})
        meta = read_checkpoint(str(tmp_path / name))["meta"]
        assert meta["threads"] == 1 and meta["seed"] == 4 and meta["device"].startswith("cpu")
        assert meta["torch_version"] == torch.__version__ and meta["cpu"]
        hashes.append(meta["weights_sha256"])
    assert hashes[0] == hashes[1]
