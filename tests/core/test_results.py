"""Results files: schema checks, atomic JSON + CSV, and merging the per-seed files of one experiment."""
import csv
import json

import pytest

from fragile.core.cli import UserError
from fragile.core.results import merge_results, read_results, write_results


def results(seed, attack="finetune", **config):
    record = {"step": 0, "epoch": 0.0, "flipped": seed, "match_rate": 1 - seed / 10, "detected": seed > 0}
    return {"attack": attack, "arch": "resnet8", "dataset": "synthetic", "method": "paper", "weights_sha256": "ab",
            "num_triggers": 10, "config": {"SEEDS": [seed], "RESULTS_DIR": f"r{seed}", "LR": 1e-3, **config},
            "versions": {}, "device": "cpu", "wall_time_s": 1.5, "runs": [{"seed": seed, "records": [record]}]}


def write(tmp_path, name, data):
    path = str(tmp_path / name)
    write_results(data, path)
    return path


def test_results_are_written_with_their_csv_and_read_back(tmp_path):
    path = write(tmp_path, "a.json", results(3))
    assert read_results(path)["runs"][0]["records"][0]["flipped"] == 3
    rows = list(csv.DictReader(open(path[:-5] + ".csv")))
    assert rows == [{"seed": "3", "step": "0", "epoch": "0.0", "flipped": "3", "match_rate": "0.7",
                     "detected": "True"}]


def test_merge_keeps_every_seed_and_refuses_other_experiments(tmp_path):
    parts = [write(tmp_path, f"s{seed}.json", results(seed)) for seed in (1, 0)]
    merged = merge_results(parts, str(tmp_path / "merged.json"))
    assert [run["seed"] for run in merged["runs"]] == [0, 1] and merged["config"]["SEEDS"] == [0, 1]
    assert merged["wall_time_s"] == 3.0
    assert read_results(str(tmp_path / "merged.json"))["runs"] == merged["runs"]
    with pytest.raises(UserError, match="attack"):
        merge_results([parts[0], write(tmp_path, "p.json", results(2, attack="poison"))], str(tmp_path / "x.json"))
    with pytest.raises(UserError, match=r"settings differ \(LR\)"):
        merge_results([parts[0], write(tmp_path, "lr.json", results(2, LR=1e-2))], str(tmp_path / "x.json"))


@pytest.mark.parametrize("change, message", [(lambda r: r.pop("runs"), "missing runs"),
                                              (lambda r: r["runs"][0]["records"][0].pop("detected"), "lacks detected"),
                                              (lambda r: r.update(schema="other/1"), "is not a fragile-wm-results")])
def test_a_malformed_results_file_is_one_clear_error(tmp_path, change, message):
    data = {"schema": "fragile-wm-results/1", **results(0)}
    change(data)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(UserError, match=message):
        read_results(str(path))
