"""scripts/reproduce.sh: the paper's experiment end to end, resumable per step and seed, and its tables."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT
from fragile.tamper.records import read_results
from fragile.report.reproduction import summary

pytestmark = pytest.mark.integration


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
    markdown, payload = summary(str(out))
    assert payload["seeds"] == [0, 1] and [row["epoch"] for row in payload["rows"]["finetune"]] == [0, 1]
    assert payload["rows"]["poison"][0]["seeds"] == 2 and "| 1 |" in markdown


def test_reproduce_script_rejects_unknown_arguments():
    proc = subprocess.run(["bash", os.path.join(ROOT, "scripts", "reproduce.sh"), "--tpu"], capture_output=True,
                          text=True)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: unknown argument --tpu")
