"""The two commands that were hidden in library modules, now scripts: merging per-seed results files, and
REPRODUCTION.md's tables, which redraw from the committed (previous-schema) results exactly as committed."""
import json
import os
import shutil

import pytest

from conftest import ROOT, run_script
from fragile.tamper import records
from fragile.tamper.records import read_results, write_results

pytestmark = pytest.mark.integration
REPRODUCTION = os.path.join(ROOT, "docs", "reproduction")


def test_the_summary_table_redraws_from_the_committed_results_as_committed(tmp_path):
    for name in ("resnet8_fashion-mnist_paper_finetune.json", "resnet8_fashion-mnist_paper_poison.json"):
        shutil.copy(os.path.join(REPRODUCTION, name), tmp_path / name)
    proc = run_script("scripts/reproduction_tables.py", "summary", tmp_path)
    committed = open(os.path.join(REPRODUCTION, "summary.md")).read()
    assert open(tmp_path / "summary.md").read() == committed and committed.strip() in proc.stdout
    assert json.load(open(tmp_path / "summary.json")) == json.load(open(os.path.join(REPRODUCTION, "summary.json")))


def part(tmp_path, seed):
    state = records.verdict(seed, 10, 0)
    run = records.run_record(seed, [records.step_record(0, 0.0, "finetune", state, 0.5)])
    settings = records.settings_record({"seeds": [seed], "max_mismatches": 0}, attack=None)
    meta = {"arch": "resnet8", "dataset": "synthetic", "weights_sha256": "ab"}
    path = str(tmp_path / f"part{seed}.json")
    write_results(records.results_record("finetune", "paper", "m.pt", meta, {}, 10, settings, {}, {}, "cpu", 1, 1.0,
                                         [run]), path)
    return path


def test_merge_results_joins_the_seeds_and_bad_input_is_one_line(tmp_path):
    out = tmp_path / "merged.json"
    proc = run_script("scripts/merge_results.py", out, part(tmp_path, 1), part(tmp_path, 0))
    assert "merged 2 files" in proc.stdout
    assert [run["seed"] for run in read_results(str(out))["runs"]] == [0, 1]
    for args, message in ((["only-out.json"], "usage: scripts/merge_results.py"),
                          ([tmp_path / "x.json", tmp_path / "missing.json"], "cannot read results file")):
        proc = run_script("scripts/merge_results.py", *args, check=False)
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and message in proc.stderr
    proc = run_script("scripts/reproduction_tables.py", "summary", tmp_path / "nowhere", check=False)
    assert proc.returncode == 2 and "no such folder" in proc.stderr
