"""The tamper suite's summary table: one row per setting, final states, seeds averaged, attacks in order."""
import csv

from fragile.report.tables import markdown_table, rows_of, summary_rows, write_table
from fragile.tamper import records


def results(attack, runs, num_triggers=10):
    return {"attack": attack, "arch": "resnet8", "dataset": "synthetic", "method": "paper", "num_triggers": num_triggers,
            "settings": {"run": {"max_mismatches": 0}}, "runs": runs}


def sweep_run(seed, flipped):
    return {"seed": seed, "records": [
        {"setting": "sigma=0e+00", "sigma": 0.0, "flipped": 0, "mean_flipped": 0.0, "match_rate": 1.0,
         "detected": False, "detection_probability": 0.0, "mean_queries_to_detection": None, "clean_accuracy": 0.9},
        {"setting": "sigma=1e-01", "sigma": 0.1, "flipped": flipped, "mean_flipped": float(flipped),
         "match_rate": 1 - flipped / 10, "detected": True, "detection_probability": 1.0,
         "mean_queries_to_detection": 11 / (flipped + 1), "clean_accuracy": 0.5}]}


def trajectory_run(seed, first_detection):
    trajectory = [records.step_record(s, e, "finetune", records.verdict(f, 10, 0), 0.8)
                  for s, e, f in ((0, 0.0, 0), (4, 1.0, 3), (8, 2.0, 5))]
    return records.run_record(seed, trajectory, first_detection_step=first_detection)


def test_sweep_rows_average_the_seeds_per_setting():
    rows = rows_of("n.json", results("noise", [sweep_run(0, 2), sweep_run(1, 4)]))
    assert [r["setting"] for r in rows] == ["sigma=0e+00", "sigma=1e-01"]
    zero, hit = rows
    assert zero["triggers_flipped"] == 0 and not zero["detected"] and zero["queries_to_detection"] is None
    assert hit["triggers_flipped"] == 3 and hit["detected"] and hit["clean_accuracy"] == 0.5
    assert hit["queries_to_detection"] == (11 / 3 + 11 / 5) / 2


def test_trajectory_rows_end_at_the_last_epoch_and_note_the_first_detection():
    row, = rows_of("f.json", results("finetune", [trajectory_run(0, 3), trajectory_run(1, None)]))
    assert row["setting"] == "finetune, epoch 2" and row["triggers_flipped"] == 5
    assert row["queries_to_detection"] == 11 / 6   # expected over random orders, from the flipped count
    assert "first detected at step 3 (1/2 seeds)" in row["notes"]


def test_the_table_lists_attacks_in_the_suites_order(tmp_path):
    listed = [("q.json", results("quantize", [sweep_run(0, 1)])), ("f.json", results("finetune", [trajectory_run(0, 1)]))]
    assert [r["attack"] for r in summary_rows(listed)] == ["finetune", "quantize", "quantize"]
    md, csv_path = write_table(listed, str(tmp_path))
    assert "| resnet8/synthetic | paper | finetune | finetune, epoch 2 | 5/10 | yes |" in open(md).read()
    assert [row["attack"] for row in csv.DictReader(open(csv_path))] == ["finetune", "quantize", "quantize"]
    assert markdown_table([]).count("\n") == 6   # an empty table is still a table
