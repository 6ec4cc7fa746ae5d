"""The one record module: every record kind spelled the same way, results files written atomically with their
CSV, the previous schema read through its upgrade, and the per-seed files of one experiment merged."""
import csv
import glob
import json
import os

import pytest

from conftest import ROOT
from fragile.core.cli import UserError
from fragile.tamper import records
from fragile.tamper.records import merge_results, read_results, write_results
from fragile.watermark.queries import expected_queries


def results(seed, attack="finetune", lr=1e-3):
    state = records.verdict(seed, 10, 0)
    run = records.run_record(seed, [records.step_record(0, 0.0, "finetune", state, 0.5)])
    settings = records.settings_record({"seeds": [seed], "max_mismatches": 0}, finetune={"lr": lr}, attack=None)
    meta = {"arch": "resnet8", "dataset": "synthetic", "weights_sha256": "ab"}
    return records.results_record(attack, "paper", "m.pt", meta, {}, 10, settings, {"SEEDS": [seed]}, {}, "cpu", 1,
                                  1.5, [run])


def write(tmp_path, name, data):
    path = str(tmp_path / name)
    write_results(data, path)
    return path


def test_every_record_kind_carries_the_verdict_under_the_same_keys():
    state = records.verdict(3, 10, 1)
    assert state == {"flipped": 3, "match_rate": 0.7, "detected": True, "mean_flipped": 3.0,
                     "detection_probability": 1.0, "mean_queries_to_detection": expected_queries(3, 10, 1)}
    outcomes = [{"flipped": 0, "queries": None, "clean_accuracy": 0.9}, {"flipped": 4, "queries": 2}]
    kinds = [records.step_record(5, 1.0, "finetune", state, 0.9), records.point_record("k=1", state, 0.9, k=1),
             records.trials_record("sigma=1e-03", outcomes, 10, {"sigma": 1e-3}),
             records.comparison_record("single-weight", "eps", state), records.benign_record("fp16", "protocol",
                                                                                             "fp16", state)]
    for record in kinds:
        assert set(records.VERDICT_KEYS) <= set(record)
    trials = kinds[2]
    assert trials["mean_flipped"] == 2.0 and trials["flipped"] == 2 and trials["detection_probability"] == 0.5
    assert trials["mean_queries_to_detection"] == 2 and trials["clean_accuracy"] == 0.9   # only the missed one measured


def test_results_are_written_with_their_csv_and_read_back(tmp_path):
    path = write(tmp_path, "a.json", results(3))
    assert read_results(path)["runs"][0]["records"][0]["flipped"] == 3
    rows = list(csv.DictReader(open(path[:-5] + ".csv")))
    assert len(rows) == 1 and rows[0]["seed"] == "3" and rows[0]["flipped"] == "3" and rows[0]["phase"] == "finetune"


def test_merge_keeps_every_seed_and_refuses_other_experiments(tmp_path):
    parts = [write(tmp_path, f"s{seed}.json", results(seed)) for seed in (1, 0)]
    merged = merge_results(parts, str(tmp_path / "merged.json"))
    assert [run["seed"] for run in merged["runs"]] == [0, 1] and merged["settings"]["run"]["seeds"] == [0, 1]
    assert merged["wall_time_s"] == 3.0
    assert read_results(str(tmp_path / "merged.json"))["runs"] == merged["runs"]
    with pytest.raises(UserError, match="attack"):
        merge_results([parts[0], write(tmp_path, "p.json", results(2, attack="poison"))], str(tmp_path / "x.json"))
    with pytest.raises(UserError, match=r"settings differ \(finetune.lr\)"):
        merge_results([parts[0], write(tmp_path, "lr.json", results(2, lr=1e-2))], str(tmp_path / "x.json"))


def previous_schema_file(tmp_path):
    """A schema-1 file as eval.py wrote it: a trajectory without the mean keys, and a comparison row spelled the
    old way."""
    data = {"schema": "fragile-wm-results/1", "attack": "compare", "arch": "resnet8", "dataset": "synthetic",
            "method": "paper", "num_triggers": 10, "config": {"SEEDS": [0], "MAX_MISMATCHES": 1, "TRIGGERS": "t"},
            "versions": {}, "device": "cpu", "wall_time_s": 1.0,
            "runs": [{"seed": 0, "records": [
                {"step": 0, "epoch": 0.0, "flipped": 3, "match_rate": 0.7, "detected": True},
                {"attack": "single_weight", "setting": "eps", "flipped": 1, "match_rate": 0.9, "detected": False,
                 "queries_to_detection": None},
                {"setting": "sigma", "flipped": 2, "match_rate": 0.8, "detected": True, "mean_flipped": 2.4,
                 "detection_probability": 0.6, "mean_queries_to_detection": 4.0}]}]}
    path = tmp_path / "old.json"
    path.write_text(json.dumps(data))
    return str(path)


def test_the_previous_schema_is_read_through_its_upgrade(tmp_path):
    upgraded = read_results(previous_schema_file(tmp_path))
    trajectory, row, sweep = upgraded["runs"][0]["records"]
    assert upgraded["schema"] == records.SCHEMA
    assert upgraded["settings"]["run"] == {"seeds": [0], "max_mismatches": 1, "triggers": "t"}
    assert trajectory["mean_flipped"] == 3.0 and trajectory["detection_probability"] == 1.0
    assert trajectory["mean_queries_to_detection"] == expected_queries(3, 10, 1)   # with the file's own tolerance
    assert row["attack"] == "single-weight" and "queries_to_detection" not in row
    assert row["mean_queries_to_detection"] is None
    assert (sweep["mean_flipped"], sweep["detection_probability"], sweep["mean_queries_to_detection"]) == (2.4, 0.6, 4.0)


def test_every_committed_results_file_still_loads():
    paths = [p for p in glob.glob(os.path.join(ROOT, "docs", "**", "*.json"), recursive=True)
             if json.load(open(p)).__class__ is dict and str(json.load(open(p)).get("schema", "")).startswith(
                 "fragile-wm-results")]
    assert paths, "the committed reproduction results are results files"
    for path in paths:
        loaded = read_results(path)
        assert all(set(records.VERDICT_KEYS) <= set(r) for run in loaded["runs"] for r in run["records"])


@pytest.mark.parametrize("change, message", [(lambda r: r.pop("runs"), "missing runs"),
                                              (lambda r: r["runs"][0]["records"][0].pop("detected"), "lacks detected"),
                                              (lambda r: r.update(schema="other/1"), "is not a fragile-wm-results"),
                                              (lambda r: r.update(runs={}), "runs must be a list")])
def test_a_malformed_results_file_is_one_clear_error(tmp_path, change, message):
    data = results(0)
    change(data)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(UserError, match=message):
        read_results(str(path))


def test_a_malformed_previous_schema_file_is_one_clear_error(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"schema": "fragile-wm-results/1", "runs": []}))
    with pytest.raises(UserError, match="needs config, num_triggers and runs"):
        read_results(str(path))
