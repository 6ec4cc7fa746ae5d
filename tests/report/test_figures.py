"""Figures of fine-tuning trajectories (fragile.report): grouping, mean +- std bands over seeds, phases, the
robust watermark's panel, and the trigger grid."""
import copy

import numpy as np
import pytest
from matplotlib.collections import PolyCollection

from fragile.report.figures import accuracy_figure, early_steps_figure, match_rate_figure
from fragile.report.style import plt
from fragile.report.trajectories import aggregate, epoch_points, phase_boundaries, step_points, trajectory_groups
from fragile.report.trigger_grid import trigger_figure


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


def per_seed(results, metric, whole_epochs=True):
    """{x: [value per seed]} straight from the JSON, as a reader of the file would compute it."""
    table = {}
    for run in results["runs"]:
        for r in run["records"]:
            if whole_epochs and r["epoch"] != round(r["epoch"]):
                continue
            table.setdefault(r["epoch"] if whole_epochs else r["step"], []).append(r[metric])
    return table


def lines_by_label(ax):
    """The labelled lines of an axis (dividers drawn without a label are left out)."""
    return {line.get_label(): line for line in ax.get_lines() if not line.get_label().startswith("_")}


def test_seeds_drawn_as_mean_and_std_band(trajectories):
    results = [(p, trajectories["loaded"][a]) for a, p in (("finetune", trajectories["finetune"]),
                                                        ("poison", trajectories["poison"]))]
    (key, entries), = trajectory_groups(results).items()
    assert key == ("resnet8", "synthetic", "paper")
    assert [e.results["attack"] for e in entries] == ["finetune", "poison"]

    # the aggregate is the mean and sample std over seeds, at whole epochs only
    finetune = trajectories["loaded"]["finetune"]
    assert len(finetune["runs"]) == 2
    series = aggregate(finetune["runs"], epoch_points, "clean_accuracy")
    expected = per_seed(finetune, "clean_accuracy")
    assert list(series.x) == [0.0, 1.0, 2.0] == sorted(expected)
    assert np.allclose(series.mean, [np.mean(expected[x]) for x in sorted(expected)])
    assert np.allclose(series.std, [np.std(expected[x], ddof=1) for x in sorted(expected)])
    assert list(series.n) == [2, 2, 2]
    steps = aggregate(finetune["runs"], step_points, "match_rate")
    assert list(steps.x) == [0, 1, 2, 4, 8]  # the early steps inside epoch 1, then the epoch ends

    # the figure: one band (two seeds of clean fine-tuning), none for the single poisoned seed
    for make, metric in ((match_rate_figure, "match_rate"), (accuracy_figure, "clean_accuracy")):
        fig = make(key, entries)
        ax = fig.axes[0]
        bands = [c for c in ax.collections if isinstance(c, PolyCollection)]
        assert len(bands) == 1
        lines = lines_by_label(ax)
        clean = lines["clean fine-tuning (mean ± std, 2 seeds)"]
        assert np.allclose(clean.get_ydata(), [np.mean(v) for _, v in sorted(per_seed(finetune, metric).items())])
        poisoned = lines["poisoned fine-tuning (BadNets)"]
        assert list(poisoned.get_xdata()) == [0.0, 1.0, 2.0]
    accuracy = accuracy_figure(key, entries)
    assert len(accuracy.axes) == 2  # attack success rate beside clean accuracy
    asr = per_seed(trajectories["loaded"]["poison"], "attack_success_rate")
    assert np.allclose(list(lines_by_label(accuracy.axes[1]).values())[0].get_ydata(), [asr[x][0] for x in sorted(asr)])

    early = early_steps_figure(key, entries).axes[0]
    assert early.get_xscale() == "symlog"
    assert list(lines_by_label(early)["clean fine-tuning (mean ± std, 2 seeds)"].get_xdata()) == [0, 1, 2, 4, 8]


def test_other_attacks_phases_and_robust_watermark(trajectories, capsys):
    """A sweep attack (no epochs) is skipped with a note; a two-phase run continues the epoch count;
    a tracked robust watermark gets its own panel beside the fragile one."""
    noise = copy.deepcopy(trajectories["loaded"]["finetune"])
    noise["attack"] = "noise"
    for run in noise["runs"]:
        run["records"] = [{"setting": s, "sigma": s, "flipped": 3, "match_rate": 0.9, "detected": True}
                          for s in (0.01, 0.1)]
    restore = copy.deepcopy(trajectories["loaded"]["finetune"])
    restore["attack"] = "restore"
    for run in restore["runs"]:
        first = [dict(r, backdoor_accuracy=0.9) for r in run["records"]]
        second = [dict(r, phase="restore", step=r["step"] + 8, backdoor_accuracy=1.0) for r in run["records"]]
        run["records"] = first + second[1:]  # as run_restore writes it: no repeat of the attack's last record
    results = [("noise.json", noise), ("restore.json", restore),
               (trajectories["finetune"], trajectories["loaded"]["finetune"])]
    groups = trajectory_groups(results)
    assert "noise.json" in capsys.readouterr().out
    (key, entries), = groups.items()
    assert [e.results["attack"] for e in entries] == ["finetune", "restore"]
    assert list(aggregate(restore["runs"], epoch_points, "match_rate").x) == [0, 1, 2, 3, 4]
    assert phase_boundaries(restore["runs"]) == [(2.0, "restore")]
    fig = match_rate_figure(key, entries)
    assert len(fig.axes) == 2
    robust = list(lines_by_label(fig.axes[1]).values())
    assert len(robust) == 1 and robust[0].get_linestyle() == "--"
    assert list(robust[0].get_ydata()) == [0.9, 0.9, 0.9, 1.0, 1.0]
    dividers = [line for line in fig.axes[0].get_lines() if line.get_label().startswith("_")]
    assert [list(d.get_xdata()) for d in dividers] == [[2.0, 2.0]]



def test_trigger_grid_labels_and_missing_triggers(trajectories, watermarked, capsys):
    results = trajectories["loaded"]["finetune"]
    fig = trigger_figure(results, trajectories["finetune"], 50, 10)
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert len(titles) == len(watermarked["key_labels"]) == 30
    assert titles[:3] == [f"{i}: proto{label}" for i, label in enumerate(watermarked["key_labels"][:3])]

    gone = dict(results, model="/nonexistent/resnet8_synthetic.pt",
                settings=dict(results["settings"], run=dict(results["settings"]["run"], triggers="")))
    assert trigger_figure(gone, "gone.json", 50, 10) is None
    assert "note: no trigger grid for gone.json: triggers not found" in capsys.readouterr().out
