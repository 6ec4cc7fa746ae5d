"""scripts/gpu_check.sh, the one prepared GPU command: refused without a GPU before doing anything, and its CPU dry
run (every step at tiny size) completes, writes a results folder plot.py and the reproduction table read, resumes
by skipping what is done, and names the step that fails."""
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT, requires_fashion_mnist
from fragile.tamper.records import read_results

pytestmark = pytest.mark.integration
SCRIPT = os.path.join(ROOT, "scripts", "gpu_check.sh")


def gpu_check(out, *args, env=None):
    return subprocess.run(["bash", SCRIPT, *args], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHON": sys.executable, "OUT": str(out), "PYTHONPATH": ROOT,
                               **(env or {})})


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="a GPU is visible here")
def test_without_a_gpu_it_says_so_in_one_line_before_doing_anything(tmp_path):
    proc = gpu_check(tmp_path / "out")
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: no GPU visible"), proc.stderr
    assert not (tmp_path / "out").exists() and proc.stdout == ""


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-check") / "out"
    return out, gpu_check(out, "--dry-run")


@requires_fashion_mnist
def test_the_dry_run_runs_every_step_and_writes_what_plot_and_the_tables_read(dry_run):
    out, proc = dry_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    steps = [json.loads(line)["step"] for line in open(out / "timings.jsonl")]
    assert [s.split()[0] for s in steps] == ["stage", "1", "2", "3a", "3b", "4", "4", "5", "5", "6a", "6b"]
    assert all(json.loads(line)["seconds"] >= 0 for line in open(out / "timings.jsonl"))
    finetune = read_results(str(out / "results" / "resnet8_fashion-mnist_paper_finetune.json"))
    assert [run["seed"] for run in finetune["runs"]] == [0, 1]
    steps_recorded = [r["step"] for r in finetune["runs"][0]["records"]]
    assert steps_recorded[:3] == [0, 1, 2]                      # every step of the first epoch
    benign = read_results(str(out / "results" / "resnet8_fashion-mnist_margin_benign.json"))
    assert {r["envelope_entry"] for r in benign["runs"][0]["records"]} >= {"fp16", "bf16", "batch"}
    assert all("max_logit_jitter" in r for r in benign["runs"][0]["records"])
    assert (out / "figures" / "resnet8_fashion-mnist_paper_match_rate.png").stat().st_size > 0
    assert "| 1 |" in (out / "results" / "summary.md").read_text()
    assert "bench.json" in os.listdir(out) and json.load(open(out / "bench.json"))["ratio"] > 0


@requires_fashion_mnist
def test_a_rerun_resumes_and_a_failing_step_names_itself_and_keeps_the_rest(dry_run):
    out, first = dry_run
    assert first.returncode == 0
    again = gpu_check(out, "--dry-run")
    assert again.returncode == 0 and again.stdout.count("done before") == 9, again.stdout   # all but the drawing
    os.remove(out / "results" / "resnet8_fashion-mnist_paper_poison.json")
    broken = out / "resnet8_fashion-mnist_triggers_paper" / "meta.json"
    meta = broken.read_text()
    broken.write_text("{ not json")
    failed = gpu_check(out, "--dry-run")
    broken.write_text(meta)
    assert failed.returncode != 0 and 'error: step "4 poison' in failed.stderr, failed.stderr
    assert (out / "results" / "resnet8_fashion-mnist_paper_finetune.json").exists()   # earlier steps kept
    resumed = gpu_check(out, "--dry-run")
    assert resumed.returncode == 0 and "== 4 poison" in resumed.stdout and resumed.stdout.count("done before") == 8


def test_an_unknown_argument_is_one_error_line(tmp_path):
    proc = gpu_check(tmp_path, "--tpu")
    assert proc.returncode == 2 and proc.stderr.strip() == \
        f"error: unknown argument --tpu (usage: {SCRIPT} [--dry-run])"
