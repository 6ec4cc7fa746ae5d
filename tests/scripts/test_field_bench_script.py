"""scripts/field_bench.py: every method against the zoo, sharded. Bad settings are one error line before any work;
a smoke run prepared as two shards (the last one records the benign runs), run as two shards and merged writes the
report, whose numbers are the cells'; a shard rerun skips its cells; a cell made with other settings is refused at
the merge."""
import collections
import importlib.util
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT

pytestmark = pytest.mark.integration
SCRIPT = os.path.join(ROOT, "scripts", "field_bench.py")


def bench(out, *args):
    return subprocess.run([sys.executable, SCRIPT, "--out", str(out), *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": ROOT})


def load_bench_script():
    spec = importlib.util.spec_from_file_location("field_bench_under_test", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_shards_cover_the_grid_once_trial_by_trial_and_share_every_modification():
    script = load_bench_script()
    order = script.cell_order()
    grid = [(m, t) for m in script.MODIFICATIONS for t in range(script.TRIALS)]
    assert sorted(order) == sorted(grid) and len(set(order)) == len(grid)
    assert [t for _, t in order] == sorted(t for _, t in order)   # a bench stopped early has every row
    shards = []
    for index in range(2):
        script.SHARD = f"{index}/2"
        shards.append(script.my_cells())
    assert sorted(shards[0] + shards[1]) == sorted(grid)
    for shard in shards:   # an even shard count does not leave one half of the zoo to one node
        assert set(collections.Counter(m for m, _ in shard).values()) == {script.TRIALS // 2}


@pytest.mark.parametrize("args, message", [
    (["--methods", "paper", "sff"], "--methods: unknown sff; choose from paper, random, natural"),
    (["--modifications", "finetune", "distil"], "--modifications: unknown distil; choose from finetune, poison"),
    (["--modifications"], "--modifications: unknown (none given)"),
    (["--shard", "2/2"], "--shard 2/2: I must be 0..N-1"), (["--shard", "a"], "write it as I/N"),
    (["--trials", 0], "--trials must be a positive integer"),
    (["--modifications", "restore"], "restore needs a robust watermark"),
    (["--stage", "merge"], "--stage 'merge': choose one of all, prepare, run, report"),
])
def test_a_bad_setting_is_one_error_line_before_any_work(tmp_path, args, message):
    out = tmp_path / "out"
    proc = bench(out, *args)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and message in lines[0], proc.stderr
    assert not out.exists()


def test_two_shards_merge_into_the_report_of_their_cells(watermarked, tmp_path):
    out = tmp_path / "bench"
    common = ["--model", watermarked["model"], "--dataset", "synthetic", "--methods", "natural", "random",
              "--modifications", "noise", "prune", "finetune", "--trials", 2, "--num-triggers", 10,
              "--attack-subset", 256, "--test-subset", 256, "--dynamic-batch-runs", 30, "--noise-sigma", 1e-2]
    for stage in (["--stage", "prepare", "--shard", "0/2"], ["--stage", "prepare", "--shard", "1/2"],
                  ["--stage", "run", "--shard", "0/2"], ["--stage", "run", "--shard", "1/2"]):
        proc = bench(out, *common, *stage)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        if stage == ["--stage", "prepare", "--shard", "0/2"]:   # natural only: the benign runs wait for random
            assert "the benign runs wait for random" in proc.stdout and not (out / "prepared.json").exists()
            assert os.listdir(out / "methods") == ["natural"]
    rerun = bench(out, *common, "--stage", "run", "--shard", "1/2")
    assert "shard 1/2: 0 cells to run of 3" in rerun.stdout
    proc = bench(out, *common, "--stage", "report")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.load(open(out / "bench.json"))
    assert result["complete"] and (out / "bench.md").exists() and (out / "bench.png").stat().st_size > 0
    cells = [json.load(open(out / "cells" / m / f"trial{t}.json")) for m in ("noise", "prune", "finetune")
             for t in (0, 1)]
    # the report's numbers are the cells': prune is one deterministic model, noise two draws
    assert result["modifications"]["prune"]["distinct_models"] == 1
    assert result["modifications"]["noise"]["distinct_models"] == 2
    prepared = json.load(open(out / "prepared.json"))
    # the compute line adds up the stages' own records; the classifier was given (--model), not trained here
    generation = sum(json.load(open(out / "methods" / m / "generate.json"))["seconds"] for m in ("natural", "random"))
    cost = result["compute"]
    assert cost["train_seconds"] is None and cost["generation_seconds"] == pytest.approx(generation)
    assert cost["cell_seconds"] == pytest.approx(sum(c["seconds"] for c in cells)) and cost["cell_seconds"] > 0
    assert cost["total_seconds"] == pytest.approx(generation + cost["cell_seconds"] + prepared["calibration_seconds"])
    for method in ("natural", "random"):
        names = [r["name"] for r in prepared["methods"][method]["benign_runs"]]
        assert sum(n.startswith("dynamic batching") for n in names) == 30 and "batch size 1" in names
        t = result["methods"][method]["calibration"]["0.01"]["threshold"]
        row = next(r for r in result["table"] if r["method"] == method and r["modification"] == "noise")
        flips = [len(c["methods"][method]["flipped"]) for c in cells if c["modification"] == "noise"]
        assert row["tpr_at_fpr_0.01"] == sum(f > t for f in flips) / 2
    # a cell made with other settings is refused at the merge, in one line naming it
    tampered = out / "cells" / "noise" / "trial1.json"
    record = json.load(open(tampered))
    record["settings"]["finetune_epochs"] = 5
    tampered.write_text(json.dumps(record))
    proc = bench(out, *common, "--stage", "report")
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "trial1.json was made with other settings" in lines[0]
