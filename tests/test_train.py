"""train.py: learning, checkpoints (round trip, hashing, refusing pickles), resume, bad input."""
import json
import os

import pytest
import torch

from conftest import interrupted_train, requires_fashion_mnist, run_script
from fragile.checkpoint_io import load_classifier, read_checkpoint, weights_sha256
from fragile.cli import UserError
from fragile.data import get_spec, load_split
from fragile.training import accuracy


def test_resnet8_learns_synthetic_well_above_chance(watermarked):
    model, meta = load_classifier(watermarked["model"])
    test = load_split(get_spec("synthetic"), "unused", train=False)
    assert accuracy(model, test) > 0.5  # chance is 0.1
    assert meta["test_accuracy"] == pytest.approx(accuracy(model, test), abs=1e-6)


def test_checkpoint_round_trip_keeps_weights_hash_and_metadata(watermarked, tmp_path):
    from fragile.checkpoint_io import save_classifier
    model, meta = load_classifier(watermarked["model"])
    for key in ("arch", "dataset", "num_classes", "input_shape", "test_accuracy", "epochs", "seed",
                "torch_version", "torchvision_version", "weights_sha256"):
        assert key in meta
    assert weights_sha256(model.state_dict()) == meta["weights_sha256"]
    copy_path = tmp_path / "copy.pt"
    save_classifier(str(copy_path), model, {k: v for k, v in meta.items() if k != "weights_sha256"})
    again, meta2 = load_classifier(str(copy_path))
    test = load_split(get_spec("synthetic"), "unused", train=False)
    assert meta2["weights_sha256"] == meta["weights_sha256"]
    assert accuracy(again, test) == accuracy(model, test)


class _Payload:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def write_pickle_bomb(path, marker):
    payload = _Payload()
    payload.marker = marker
    torch.save({"format": "fragile-wm/1", "state_dict": {}, "meta": payload}, path)


def test_pickle_payload_is_refused_without_running(tmp_path):
    bomb, marker = tmp_path / "bomb.pt", tmp_path / "pwned"
    write_pickle_bomb(str(bomb), str(marker))
    with pytest.raises(UserError, match="refusing"):
        read_checkpoint(str(bomb))
    assert not marker.exists()


def test_checkpoint_for_another_arch_is_refused(watermarked):
    with pytest.raises(UserError, match="arch"):
        load_classifier(watermarked["model"], expect_arch="resnet18")


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
