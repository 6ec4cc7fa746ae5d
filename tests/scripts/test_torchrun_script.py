"""torchrun: data-parallel training and fine-tuning on the CPU with gloo, two processes.

train.py, eval.py, generate_samples.py, verify.py and bench.py run under ``python -m torch.distributed.run``
as a user runs them, one thread per process (tests/core/test_data.py checks the sharding in process).
"""
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT, requires_fashion_mnist, run_script
from fragile.core.data import get_spec, synthetic_split
from fragile.core.io import load_classifier, read_checkpoint
from fragile.core.training import accuracy

pytestmark = pytest.mark.integration

TRAIN = ["--dataset", "synthetic", "--arch", "resnet8", "--epochs", 3, "--train-subset", 2000, "--recipe", "fast",
         "--batch-size", 64, "--device", "cpu", "--no-progress"]
# Seeds 0-2 of one process ended at 0.692-0.708 with TRAIN; two processes differ from one in their batch-norm
# statistics (per rank), so they are held to this distance, several times that spread.
ACCURACY_NOISE = 0.06


def torchrun(script, *args, nproc=2, env=None):
    """``torchrun --standalone --nproc_per_node nproc script args`` (a free port each time)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
               os.path.join(ROOT, script), *map(str, args)]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1", **(env or {})})


def succeeded(proc):
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
    return proc


def error_lines(proc):
    return [line for line in proc.stderr.splitlines() if line.startswith("error:")]


def no_traceback_from_our_code(proc):
    return all(f'File "{os.path.join(ROOT, part)}' not in proc.stderr for part in ("train.py", "eval.py", "fragile"))


# ----------------------------------------------------------------------------- scripts under torchrun

@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same recipe and global batch: plain python, torchrun with 1 process, torchrun with 2."""
    root = tmp_path_factory.mktemp("ddp")
    paths = {name: root / f"{name}.pt" for name in ("plain", "one", "two")}
    # torchrun gives each worker one thread (OMP_NUM_THREADS=1); the plain run gets the same, since another
    # thread count sums in another order and the weights differ in the last bits.
    succeeded(run_script("train.py", *TRAIN, "--out", paths["plain"], check=False, env={"OMP_NUM_THREADS": "1"}))
    succeeded(torchrun("train.py", *TRAIN, "--out", paths["one"], nproc=1))
    two = succeeded(torchrun("train.py", *TRAIN, "--out", paths["two"]))
    return dict(paths, root=root, two_stdout=two.stdout)


def meta(path):
    return read_checkpoint(str(path))["meta"]


def test_plain_run_is_what_torchrun_with_one_process_trains(runs):
    assert meta(runs["plain"])["weights_sha256"] == meta(runs["one"])["weights_sha256"]
    assert meta(runs["plain"])["world_size"] == 1


def test_two_processes_reach_the_accuracy_of_one_with_the_same_global_batch(runs):
    one, two = meta(runs["plain"])["test_accuracy"], meta(runs["two"])["test_accuracy"]
    print(f"test accuracy: 1 process {one:.4f}, 2 processes {two:.4f}")
    assert one > 0.5 and two > 0.5   # both learned (chance is 0.1)
    assert abs(one - two) <= ACCURACY_NOISE, (one, two)
    assert meta(runs["two"])["world_size"] == 2
    assert meta(runs["two"])["weights_sha256"] != meta(runs["plain"])["weights_sha256"]  # really two shards


def test_only_rank_0_writes_and_prints(runs):
    epochs = [json.loads(line)["epoch"] for line in open(str(runs["two"])[:-3] + ".log.jsonl")]
    assert epochs == [1, 2, 3]   # one writer: no line twice
    assert runs["two_stdout"].count("test accuracy") == 1 and "rank 0" in runs["two_stdout"]
    assert sorted(p.name for p in runs["root"].glob("two.*")) == ["two.log.jsonl", "two.pt"]
    assert not list(runs["root"].glob(".*.tmp"))


@pytest.fixture(scope="module")
def watermarked_two(runs):
    """Triggers generated under torchrun (rank 0 alone) for the two-process checkpoint."""
    succeeded(torchrun("generate_samples.py", "--model", runs["two"], "--num-triggers", 20, "--key-seed", 0,
                       "--device", "cpu", "--recipe", "fast", "--no-progress"))
    return runs["two"]


def test_two_process_checkpoint_loads_and_verifies_like_any_other(watermarked_two):
    model, info = load_classifier(str(watermarked_two))
    test = synthetic_split(get_spec("synthetic"), False)
    assert accuracy(model, test) == pytest.approx(info["test_accuracy"], abs=1e-6)
    proc = run_script("verify.py", "--model", watermarked_two, "--device", "cpu", check=False)
    assert proc.returncode == 0 and "INTACT" in proc.stdout, proc.stdout + proc.stderr


@pytest.mark.parametrize("attack", ["finetune", "poison"])
def test_eval_fine_tunes_data_parallel_and_rank_0_writes_the_results(watermarked_two, tmp_path, attack):
    proc = succeeded(torchrun("eval.py", "--model", watermarked_two, "--attack", attack, "--epochs", 1,
                              "--batch-size", 32, "--train-subset", 640, "--test-subset", 200, "--lr", 1e-2,
                              "--device", "cpu", "--results-dir", tmp_path, "--no-progress"))
    results = json.load(open(tmp_path / f"resnet8_synthetic_paper_{attack}.json"))
    records = results["runs"][0]["records"]
    assert results["world_size"] == 2 and proc.stdout.count("results ->") == 1
    assert [r["step"] for r in records] == [0, 1, 2, 5, 10, 20]   # 20 global steps of 32: one epoch
    assert records[0]["match_rate"] == 1.0 and records[-1]["epoch"] == 1.0
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"resnet8_synthetic_paper_{attack}.{e}" for e in ("csv", "json")]


def test_a_rank_that_dies_ends_the_job_and_the_run_resumes(runs, tmp_path):
    out = tmp_path / "dies.pt"
    steps_per_epoch = 2000 // 64 + 1
    proc = torchrun("train.py", *TRAIN, "--out", out,
                    env={"FRAGILE_TEST_FAIL_RANK": "1", "FRAGILE_TEST_FAIL_AT_STEP": str(steps_per_epoch + 3)})
    assert proc.returncode != 0
    assert error_lines(proc) == [f"error: rank 1 of 2: RuntimeError: injected failure at step {steps_per_epoch + 3} "
                                 "(FRAGILE_TEST_FAIL_RANK) (set FRAGILE_DEBUG=1 for the traceback)"], proc.stderr
    assert no_traceback_from_our_code(proc), proc.stderr
    assert not out.exists() and not list(tmp_path.glob(".*.tmp"))   # no final checkpoint, no half-written one
    resume = read_checkpoint(str(out)[:-3] + ".resume.pt")             # the epoch before the failure, complete
    assert resume["train_state"]["epoch"] == 1

    resumed = succeeded(torchrun("train.py", *TRAIN, "--out", out, "--resume"))
    assert "resuming" in resumed.stdout
    assert meta(out)["weights_sha256"] == meta(runs["two"])["weights_sha256"]   # as if never interrupted


def test_a_world_size_that_does_not_divide_the_batch_is_one_error_line(tmp_path):
    proc = torchrun("train.py", *TRAIN, "--batch-size", 63, "--out", tmp_path / "x.pt")
    assert proc.returncode != 0
    assert len(error_lines(proc)) == 1 and "--batch-size 63 does not split across 2" in error_lines(proc)[0]
    assert no_traceback_from_our_code(proc) and not list(tmp_path.iterdir())


def test_a_fine_tuning_attack_that_is_not_data_parallel_is_refused_under_torchrun(watermarked_two, tmp_path):
    proc = torchrun("eval.py", "--model", watermarked_two, "--attack", "noise", "--device", "cpu",
                    "--results-dir", tmp_path)
    assert proc.returncode != 0 and len(error_lines(proc)) == 1 and "noise does not run data parallel" in proc.stderr


@pytest.mark.parametrize("script,flag,message", [("train.py", "--backend nccl", "--backend nccl needs GPUs"),
                                                  ("eval.py", "--backend nccl", "--backend nccl needs GPUs"),
                                                  ("train.py", "--sync-bn", "--sync-bn needs GPUs")])
def test_a_gpu_only_setting_with_the_cpu_is_one_error_line(script, flag, message, tmp_path):
    proc = run_script(script, *flag.split(), "--device", "cpu", "--model" if script == "eval.py" else "--out",
                      tmp_path / "m.pt", check=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode != 0 and len(lines) == 1 and lines[0].startswith(f"error: {message}"), proc.stderr


def test_bench_times_the_data_parallel_loop_with_the_global_batch(tmp_path):
    out = tmp_path / "bench.json"
    proc = succeeded(torchrun("bench.py", "--device", "cpu", "--num-images", 64, "--batch-size", 16, "--warmup-steps", 1,
                              "--measure-steps", 2, "--threads", 1, "--out", out))
    result = json.loads(out.read_text())
    assert result["world_size"] == 2 and result["ours"]["world_size"] == 2
    assert result["ours"]["images"] == 2 * 16 and result["ours"]["images_per_s"] > 0   # global images, counted once
    assert proc.stdout.count("images/s") == 1 and "8 per rank" in proc.stdout


@requires_fashion_mnist
def test_the_readmes_torchrun_command_works_on_a_fresh_data_folder(tmp_path):
    """Every rank used to unpack Debian's files through the same temporary name and trip over the other's rename;
    now each node's local rank 0 stages them while the others wait."""
    succeeded(torchrun("train.py", "--dataset", "fashion-mnist", "--arch", "resnet8", "--epochs", 1,
                       "--train-subset", 512, "--device", "cpu", "--no-progress", "--data-dir", tmp_path / "data",
                       "--out", tmp_path / "m.pt"))
    assert read_checkpoint(str(tmp_path / "m.pt"))["meta"]["world_size"] == 2
