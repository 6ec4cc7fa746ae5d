"""The field bench's metrics (fragile/report/field_bench.py) and its benign runs (fragile/tamper/field_bench.py):
thresholds calibrated on benign runs at a target FPR, TPR and queries computed at them, cells merged only with equal
settings, dynamic batching that gives every trigger its own label back."""
import pytest
import torch

from fragile.core.cli import UserError
from fragile.report import field_bench as report
from fragile.tamper import field_bench


@pytest.mark.parametrize("flips, fpr, expected", [
    ([0] * 1000, 1e-3, 0),
    ([0] * 999 + [7], 1e-3, 0),          # one false alarm in 1000 is allowed at FPR 1e-3
    ([0] * 998 + [7, 3], 1e-3, 3),       # two are not: tolerate the second largest
    ([0] * 98 + [2, 5], 1e-2, 2),
    ([0, 1, 4], 1e-2, 4),                # too few runs to allow any: tolerate the largest seen
])
def test_the_threshold_lets_at_most_fpr_times_n_benign_runs_exceed_it(flips, fpr, expected):
    t = report.decision_threshold(flips, fpr)
    assert t == expected
    assert sum(f > t for f in flips) <= int(fpr * len(flips))


def test_calibration_says_when_the_benign_runs_are_too_few_to_resolve_the_fpr():
    method = {"benign_runs": [{"name": f"r{i}", "flipped": 0} for i in range(150)]}
    cal = report.calibration(method, [1e-2, 1e-3])
    assert cal["0.01"]["fpr_resolved"] and not cal["0.001"]["fpr_resolved"]
    assert cal["0.001"]["benign_runs"] == 150 and cal["0.001"]["benign_false_alarms"] == 0


def cell(trial, flipped, changed=True, modification="noise"):
    return {"modification": modification, "trial": trial, "model_changed": changed, "tampered_sha256": str(trial),
            "clean_accuracy": 0.9, "attack_success": None, "seconds": 1.0, "methods": {"m": {"flipped": flipped}}}


def test_tpr_counts_trials_beyond_the_threshold_and_queries_follow_the_recorded_order():
    method = {"num_triggers": 10, "query_order": [9, 8, 7, 6, 5, 4, 3, 2, 1, 0],
              "benign_runs": [{"name": "a", "flipped": 1}] + [{"name": "b", "flipped": 0}] * 5}
    cal = report.calibration(method, [1e-2])          # 6 runs: none may exceed, so t = 1
    metrics = report.method_metrics("m", method, [cell(0, [9, 8]), cell(1, [0]), cell(2, [])], [1e-2], cal)
    assert cal["0.01"]["threshold"] == 1
    assert metrics["detection_rate"] == pytest.approx(2 / 3)      # any flip at all
    assert metrics["tpr_at_fpr_0.01"] == pytest.approx(1 / 3)     # more than one flip
    assert metrics["flip_fraction"] == pytest.approx(3 / 30)
    assert metrics["queries_recorded_order"] == 2                 # triggers 9 then 8 are asked first


def test_a_modification_that_changed_nothing_is_no_change_never_a_miss():
    prepared = {"model": "m.pt", "model_sha256": "x", "dataset": "synthetic", "arch": "resnet8",
                "methods": {"m": {"num_triggers": 10, "generation_seconds": 1.0, "envelope": ["exact"],
                                  "benign_runs": [{"name": "a", "flipped": 0}]}}}
    grid = [("noise", 0), ("noise", 1), ("prune", 0)]
    bench = report.bench_record(prepared, grid, [cell(0, [], False), cell(1, [], False)], [1e-2])
    rows = {r["modification"]: r for r in bench["table"]}
    assert rows["noise"]["status"] == "no change" and "tpr_at_fpr_0.01" not in rows["noise"]
    assert rows["prune"]["status"] == "not run" and not bench["complete"] and bench["missing"] == ["prune trial 0"]


def test_cells_with_other_settings_are_refused_in_one_line(tmp_path):
    import json
    paths = {}
    hashes = {"model_sha256": "x", "triggers_sha256": {"m": "y"}}
    prepared = {"model_sha256": "x", "methods": {"m": {"triggers_sha256": "y"}}}
    for trial, epochs in ((0, 1), (1, 2)):
        paths[trial] = tmp_path / f"trial{trial}.json"
        paths[trial].write_text(json.dumps({**cell(trial, []), "settings": {"finetune_epochs": epochs, **hashes}}))
    grid = [("noise", 0), ("noise", 1)]
    with pytest.raises(UserError, match=r"trial1.json was made with other settings .*finetune_epochs differs"):
        report.read_cells(grid, lambda m, t: str(paths[t]), prepared)
    other_model = {**prepared, "model_sha256": "z"}
    with pytest.raises(UserError, match=r"trial0.json was made with other settings \(the prepared .*model_sha256"):
        report.read_cells(grid, lambda m, t: str(paths[t]), other_model)
    assert report.cell_done(str(paths[0]), {"finetune_epochs": 1, **hashes}, overwrite=False)
    assert not report.cell_done(str(paths[0]), {"finetune_epochs": 3, **hashes}, overwrite=True)
    with pytest.raises(UserError, match="finetune_epochs differs"):
        report.cell_done(str(paths[0]), {"finetune_epochs": 3, **hashes}, overwrite=False)


def test_dynamic_batching_gives_every_query_back_its_own_label():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 5)).eval()
    with torch.no_grad():
        model[1].weight.mul_(50)   # wide margins: no benign flip can come from rounding
    sets = {}
    for name in ("a", "b"):
        images = torch.randint(0, 256, (12, 3, 4, 4), dtype=torch.uint8)
        sets[name] = (images, model(images.float() / 255).argmax(1))
    traffic = torch.randint(0, 256, (40, 3, 4, 4), dtype=torch.uint8)
    runs = field_bench.dynamic_batch_runs(model, sets, traffic, runs=25)
    assert set(runs) == {"a", "b"} and all(len(r) == 25 for r in runs.values())
    assert all(r["flipped"] == 0 for r in runs["a"] + runs["b"])
    assert len({r["name"] for r in runs["a"]}) == 25               # every run named, each its own draw
    wrong = {"a": (sets["a"][0], (sets["a"][1] + 1) % 5), "b": sets["b"]}
    assert all(r["flipped"] == 12 for r in field_bench.dynamic_batch_runs(model, wrong, traffic, runs=5)["a"])
