"""The paper's recipes as the defaults, `--recipe fast` beside them, and the reproduction tooling."""
import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, interrupted_train, run_script
from fragile.checkpoint_io import atomic_save_torch, read_checkpoint, safe_torch_load
from fragile.cli import apply_overrides, apply_preset
from fragile.results import merge_results, read_results
from fragile.training import lr_at, make_sgd, recipe_settings
from fragile.triggers import GENERATOR_RECIPES
from models import build_classifier
from fragile.data import get_spec

CPU, CUDA = torch.device("cpu"), torch.device("cuda")   # CUDA is only a device *name* here: nothing runs on it
TINY = ["--dataset", "synthetic", "--arch", "resnet8", "--device", "cpu", "--no-progress"]


def test_train_header_is_the_paper_recipe():
    import train
    assert train.RECIPE == "paper"
    for name, value in recipe_settings("paper", CPU).items():
        assert getattr(train, name) == value, name


def test_generator_header_is_the_paper_generator():
    import generate_samples
    assert generate_samples.RECIPE == "paper"
    assert {k: getattr(generate_samples, k) for k in GENERATOR_RECIPES["paper"]} == {"GEN_CHANNELS": 512, "LR": 1e-4}


def test_fast_recipe_batch_and_lr_follow_the_device():
    assert (recipe_settings("fast", CUDA)["BATCH_SIZE"], recipe_settings("fast", CUDA)["LR"]) == (512, 0.4)
    assert (recipe_settings("fast", CPU)["BATCH_SIZE"], recipe_settings("fast", CPU)["LR"]) == (64, 0.1)
    assert recipe_settings("paper", CUDA) == recipe_settings("paper", CPU)   # the paper's batch is the paper's


def test_a_preset_never_overrides_a_flag_the_user_typed():
    namespace = {"RECIPE": "paper", "LR": 0.1, "BATCH_SIZE": 128, "SCHEDULE": "cosine"}
    config = apply_overrides(namespace, argv=["--recipe", "fast", "--lr", "0.05"])
    apply_preset(namespace, config, {"LR": 0.4, "BATCH_SIZE": 512, "SCHEDULE": "onecycle"})
    assert (namespace["LR"], namespace["BATCH_SIZE"], namespace["SCHEDULE"]) == (0.05, 512, "onecycle")
    assert config == {"RECIPE": "fast", "LR": 0.05, "BATCH_SIZE": 512, "SCHEDULE": "onecycle"}


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


@pytest.mark.parametrize("script", ["train.py", "generate_samples.py"])
def test_unknown_recipe_is_one_error_line(script, tmp_path):
    proc = run_script(script, "--recipe", "slow", "--out", tmp_path / "x", check=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error:") and "--recipe" in lines[0]


def test_cosine_schedule_anneals_once_per_epoch_without_warm_up():
    steps_per_epoch, epochs = 10, 4
    lrs = [lr_at(s, epochs * steps_per_epoch, 0.1, 0, "cosine", steps_per_epoch) for s in range(epochs * steps_per_epoch)]
    assert lrs[0] == 0.1 and len(set(lrs[:steps_per_epoch])) == 1           # constant within an epoch
    assert lrs[2 * steps_per_epoch] == pytest.approx(0.05)                  # half-way: half the peak
    assert all(a > b for a, b in zip(lrs[::steps_per_epoch], lrs[steps_per_epoch::steps_per_epoch]))


def test_decay_all_is_what_plain_sgd_does_and_the_option_spares_norms():
    spec = get_spec("synthetic")
    torch.manual_seed(0)
    model = build_classifier("resnet8", spec)
    plain, ours, spared = (build_classifier("resnet8", spec) for _ in range(3))
    for copy in (plain, ours, spared):
        copy.load_state_dict(model.state_dict())
    optimizers = [torch.optim.SGD(plain.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01),
                  make_sgd(ours, 0.1, 0.9, 0.01, kernels="for-loop", decay_all=True),
                  make_sgd(spared, 0.1, 0.9, 0.01, kernels="for-loop", decay_all=False)]
    for net, optimizer in zip((plain, ours, spared), optimizers):
        for _ in range(2):   # zero gradients: only weight decay moves the parameters
            for p in net.parameters():
                p.grad = torch.zeros_like(p)
            optimizer.step()
    for (name, a), b in zip(plain.named_parameters(), ours.parameters()):
        assert torch.equal(a, b), name
    bn = next(name for name, _ in model.named_parameters() if name.endswith("bn1.weight"))
    start = dict(model.named_parameters())[bn]
    assert not torch.equal(dict(plain.named_parameters())[bn], start)   # decayed
    assert torch.equal(dict(spared.named_parameters())[bn], start)      # spared


def test_fine_tuning_attack_decays_every_parameter_by_default():
    import eval as eval_script
    assert eval_script.DECAY_ALL is True and eval_script.WEIGHT_DECAY == 1e-3 and eval_script.LR == 1e-3


# ----------------------------------------------------------------------------- resume corner cases

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


# ----------------------------------------------------------------------------- reproduction tooling

def results_of(watermarked, tmp_path, seed, attack="finetune"):
    folder = tmp_path / f"seed{seed}"
    run_script("eval.py", "--model", watermarked["model"], "--attack", attack, "--seeds", seed, "--epochs", 2,
               "--train-subset", 128, "--test-subset", 50, "--early-steps", "--device", "cpu", "--results-dir", folder,
               "--no-progress")
    return str(folder / f"resnet8_synthetic_paper_{attack}.json")


def test_merge_keeps_every_seed_and_refuses_other_experiments(watermarked, tmp_path):
    parts = [results_of(watermarked, tmp_path, seed) for seed in (1, 0)]
    merged = merge_results(parts, str(tmp_path / "merged.json"))
    assert [run["seed"] for run in merged["runs"]] == [0, 1] and merged["config"]["SEEDS"] == [0, 1]
    assert read_results(str(tmp_path / "merged.json"))["runs"] == merged["runs"]
    poison = results_of(watermarked, tmp_path / "p", 2, attack="poison")
    from fragile.cli import UserError
    with pytest.raises(UserError, match="attack"):
        merge_results([parts[0], poison], str(tmp_path / "bad.json"))


def stage_reproduction(watermarked, out):
    """An OUT folder as scripts/reproduce.sh leaves it after its train and trigger steps (the fixture's model)."""
    out.mkdir()
    shutil.copy(watermarked["model"], out / "resnet8_fashion-mnist.pt")
    shutil.copytree(watermarked["triggers"], out / "resnet8_fashion-mnist_triggers_paper")
    shutil.copy(watermarked["key"], out / os.path.basename(watermarked["key"]))


def reproduce(out):
    env = {**os.environ, "OUT": str(out), "SEEDS": "0 1", "FINETUNE_EPOCHS": "1", "SUBSET": "128",
           "PYTHON": sys.executable}
    return subprocess.run(["bash", os.path.join(ROOT, "scripts", "reproduce.sh")], cwd=ROOT, env=env,
                          capture_output=True, text=True)


def steps_run(out):
    return [json.loads(line)["step"] for line in open(out / "timings.jsonl")]


def test_reproduce_script_resumes_from_what_it_finished(watermarked, tmp_path):
    out = tmp_path / "repro"
    stage_reproduction(watermarked, out)
    first = reproduce(out)
    assert first.returncode == 0, first.stderr[-2000:]
    assert steps_run(out) == ["finetune seed 0", "finetune seed 1", "poison seed 0", "poison seed 1"]
    os.remove(out / "runs" / "seed1" / "resnet8_synthetic_paper_poison.json")   # as if stopped in that step
    again = reproduce(out)
    assert again.returncode == 0, again.stderr[-2000:]
    assert steps_run(out)[4:] == ["poison seed 1"]       # only the missing step ran
    merged = read_results(str(out / "resnet8_fashion-mnist_paper_poison.json"))
    assert [run["seed"] for run in merged["runs"]] == [0, 1]
    assert (out / "figures" / "resnet8_synthetic_paper_match_rate.png").exists()
    from fragile.reproduction import summary
    markdown, payload = summary(str(out))
    assert payload["seeds"] == [0, 1] and [row["epoch"] for row in payload["rows"]["finetune"]] == [0, 1]
    assert payload["rows"]["poison"][0]["seeds"] == 2 and "| 1 |" in markdown


def test_reproduce_script_rejects_unknown_arguments():
    proc = subprocess.run(["bash", os.path.join(ROOT, "scripts", "reproduce.sh"), "--tpu"], capture_output=True,
                          text=True)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: unknown argument --tpu")
