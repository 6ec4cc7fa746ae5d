"""plot.py: figures from real eval.py results files, mean +- std bands over seeds, hooks, one-line errors."""
import copy
import importlib.util
import json
import os
import sys
import types

import matplotlib
import numpy as np
import pytest

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib import image as mpimg  # noqa: E402
from matplotlib.collections import PolyCollection  # noqa: E402

from conftest import ROOT, run_script
from fragile.cli import UserError

KINDS = ("match_rate", "accuracy", "early_steps", "triggers")
# 100 samples in batches of 25: 4 steps an epoch, so early steps 1 and 2 fall inside the first epoch
EVAL_ARGS = ("--epochs", 2, "--train-subset", 100, "--test-subset", 100, "--batch-size", 25, "--device", "cpu",
             "--no-progress")


def load_plot():
    """A fresh plot.py module (main() rewrites its globals, so every test gets its own)."""
    spec = importlib.util.spec_from_file_location("plot_under_test", os.path.join(ROOT, "plot.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


def plot_main(monkeypatch, *args):
    """plot.py's main() in this process (cheaper than a subprocess: no second torch import)."""
    monkeypatch.setattr(sys, "argv", ["plot.py", *map(str, args)])
    load_plot().main()


@pytest.fixture(scope="module")
def evaluated(watermarked, tmp_path_factory):
    """Clean fine-tuning with two seeds and poisoned fine-tuning with one, written by eval.py."""
    out = tmp_path_factory.mktemp("plot_results")
    run_script("eval.py", "--model", watermarked["model"], "--attack", "finetune", "--seeds", 0, 1,
               "--results-dir", out, *EVAL_ARGS)
    run_script("eval.py", "--model", watermarked["model"], "--attack", "poison", "--seeds", 0,
               "--results-dir", out, *EVAL_ARGS)
    paths = {attack: str(out / f"resnet8_synthetic_paper_{attack}.json") for attack in ("finetune", "poison")}
    return {**paths, "dir": out, "loaded": {a: json.load(open(p)) for a, p in paths.items()}}


def assert_real_image(path):
    image = mpimg.imread(path)
    assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 200, image.shape
    assert image.std() > 0.05, f"{path} is (nearly) blank"
    colours = np.unique(image[..., :3].reshape(-1, 3).round(3), axis=0)
    assert len(colours) > 10, f"{path} has only {len(colours)} distinct colours"


def test_every_figure_written_as_png_and_pdf(evaluated, tmp_path):
    figs = tmp_path / "figs"
    proc = run_script("plot.py", "--results", evaluated["finetune"], evaluated["poison"], "--figures-dir", figs)
    for kind in KINDS:
        for ext in ("png", "pdf"):
            path = figs / f"resnet8_synthetic_paper_{kind}.{ext}"
            assert path.exists(), f"{path.name} missing; stdout:\n{proc.stdout}"
            assert str(path) in proc.stdout  # every file written is printed
        assert (figs / f"resnet8_synthetic_paper_{kind}.pdf").read_bytes().startswith(b"%PDF")
        assert_real_image(figs / f"resnet8_synthetic_paper_{kind}.png")
    assert sorted(os.listdir(figs)) == sorted(f"resnet8_synthetic_paper_{k}.{e}" for k in KINDS for e in ("png", "pdf"))


def test_default_reads_every_results_json(evaluated, tmp_path, monkeypatch, capsys):
    figs = tmp_path / "figs"
    plot_main(monkeypatch, "--results-dir", evaluated["dir"], "--figures-dir", figs, "--no-trigger-grid",
              "--formats", "png")
    assert "from 2 results file(s)" in capsys.readouterr().out
    assert sorted(os.listdir(figs)) == [f"resnet8_synthetic_paper_{k}.png" for k in ("accuracy", "early_steps",
                                                                                      "match_rate")]


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


def test_seeds_drawn_as_mean_and_std_band(evaluated):
    plot = load_plot()
    results = [(p, evaluated["loaded"][a]) for a, p in (("finetune", evaluated["finetune"]),
                                                        ("poison", evaluated["poison"]))]
    (key, entries), = plot.trajectory_groups(results).items()
    assert key == ("resnet8", "synthetic", "paper")
    assert [e.results["attack"] for e in entries] == ["finetune", "poison"]

    # the aggregate is the mean and sample std over seeds, at whole epochs only
    finetune = evaluated["loaded"]["finetune"]
    assert len(finetune["runs"]) == 2
    series = plot.aggregate(finetune["runs"], plot.epoch_points, "clean_accuracy")
    expected = per_seed(finetune, "clean_accuracy")
    assert list(series.x) == [0.0, 1.0, 2.0] == sorted(expected)
    assert np.allclose(series.mean, [np.mean(expected[x]) for x in sorted(expected)])
    assert np.allclose(series.std, [np.std(expected[x], ddof=1) for x in sorted(expected)])
    assert list(series.n) == [2, 2, 2]
    steps = plot.aggregate(finetune["runs"], plot.step_points, "match_rate")
    assert list(steps.x) == [0, 1, 2, 4, 8]  # the early steps inside epoch 1, then the epoch ends

    # the figure: one band (two seeds of clean fine-tuning), none for the single poisoned seed
    for make, metric in ((plot.match_rate_figure, "match_rate"), (plot.accuracy_figure, "clean_accuracy")):
        fig = make(key, entries)
        ax = fig.axes[0]
        bands = [c for c in ax.collections if isinstance(c, PolyCollection)]
        assert len(bands) == 1
        lines = lines_by_label(ax)
        clean = lines["clean fine-tuning (mean ± std, 2 seeds)"]
        assert np.allclose(clean.get_ydata(), [np.mean(v) for _, v in sorted(per_seed(finetune, metric).items())])
        poisoned = lines["poisoned fine-tuning (BadNets)"]
        assert list(poisoned.get_xdata()) == [0.0, 1.0, 2.0]
    accuracy = plot.accuracy_figure(key, entries)
    assert len(accuracy.axes) == 2  # attack success rate beside clean accuracy
    asr = per_seed(evaluated["loaded"]["poison"], "attack_success_rate")
    assert np.allclose(list(lines_by_label(accuracy.axes[1]).values())[0].get_ydata(), [asr[x][0] for x in sorted(asr)])

    early = plot.early_steps_figure(key, entries).axes[0]
    assert early.get_xscale() == "symlog"
    assert list(lines_by_label(early)["clean fine-tuning (mean ± std, 2 seeds)"].get_xdata()) == [0, 1, 2, 4, 8]


def test_other_attacks_phases_and_robust_watermark(evaluated, tmp_path, monkeypatch, capsys):
    """A sweep attack (no epochs) is skipped with a note; a two-phase run continues the epoch count;
    a tracked robust watermark gets its own panel beside the fragile one."""
    plot = load_plot()
    noise = copy.deepcopy(evaluated["loaded"]["finetune"])
    noise["attack"] = "noise"
    for run in noise["runs"]:
        run["records"] = [{"setting": s, "sigma": s, "flipped": 3, "match_rate": 0.9, "detected": True}
                          for s in (0.01, 0.1)]
    restore = copy.deepcopy(evaluated["loaded"]["finetune"])
    restore["attack"] = "restore"
    for run in restore["runs"]:
        first = [dict(r, backdoor_accuracy=0.9) for r in run["records"]]
        second = [dict(r, phase="restore", step=r["step"] + 8, backdoor_accuracy=1.0) for r in run["records"]]
        run["records"] = first + second[1:]  # as run_restore writes it: no repeat of the attack's last record
    results = [("noise.json", noise), ("restore.json", restore),
               (evaluated["finetune"], evaluated["loaded"]["finetune"])]
    groups = plot.trajectory_groups(results)
    assert "noise.json" in capsys.readouterr().out
    (key, entries), = groups.items()
    assert [e.results["attack"] for e in entries] == ["finetune", "restore"]
    assert list(plot.aggregate(restore["runs"], plot.epoch_points, "match_rate").x) == [0, 1, 2, 3, 4]
    assert plot.phase_boundaries(restore["runs"]) == [(2.0, "restore")]
    fig = plot.match_rate_figure(key, entries)
    assert len(fig.axes) == 2
    robust = list(lines_by_label(fig.axes[1]).values())
    assert len(robust) == 1 and robust[0].get_linestyle() == "--"
    assert list(robust[0].get_ydata()) == [0.9, 0.9, 0.9, 1.0, 1.0]
    dividers = [line for line in fig.axes[0].get_lines() if line.get_label().startswith("_")]
    assert [list(d.get_xdata()) for d in dividers] == [[2.0, 2.0]]

    # the same files through main(): no error, no figure for the sweep
    paths = []
    for name, data in (("noise.json", noise), ("restore.json", restore)):
        (tmp_path / name).write_text(json.dumps(data))
        paths.append(tmp_path / name)
    figs = tmp_path / "figs"
    plot_main(monkeypatch, "--results", *paths, "--figures-dir", figs, "--formats", "png", "--no-trigger-grid")
    assert "noise.json (attack noise): not every record has a step and an epoch" in capsys.readouterr().out
    assert sorted(os.listdir(figs)) == [f"resnet8_synthetic_paper_{k}.png" for k in ("accuracy", "early_steps",
                                                                                      "match_rate")]
    assert_real_image(figs / "resnet8_synthetic_paper_match_rate.png")


def test_trigger_grid_labels_and_missing_triggers(evaluated, watermarked, capsys):
    plot = load_plot()
    results = evaluated["loaded"]["finetune"]
    fig = plot.trigger_figure(results, evaluated["finetune"])
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert len(titles) == len(watermarked["key_labels"]) == 30
    assert titles[:3] == [f"{i}: proto{label}" for i, label in enumerate(watermarked["key_labels"][:3])]

    gone = dict(results, model="/nonexistent/resnet8_synthetic.pt", config=dict(results["config"], TRIGGERS=""))
    assert plot.trigger_figure(gone, "gone.json") is None
    assert "note: no trigger grid for gone.json: triggers not found" in capsys.readouterr().out


def test_table_and_compare_hooks(evaluated, tmp_path, monkeypatch, capsys):
    calls = []
    summary = types.SimpleNamespace(write_table=lambda res, out: calls.append(("table", res, out)),
                                    sweep_figures=lambda res, out: calls.append(("sweep", res, out)))
    comparison = types.SimpleNamespace(render_comparison=lambda res, out: calls.append(("compare", res, out)))
    monkeypatch.setitem(sys.modules, "fragile.summary", summary)
    monkeypatch.setitem(sys.modules, "fragile.comparison", comparison)
    figs = str(tmp_path / "figs")
    compare = dict(evaluated["loaded"]["finetune"], attack="compare")
    for run in compare["runs"]:  # a sweep: records with settings, no epochs
        run["records"] = [{"attack": "noise", "setting": "sigma 0.01", "flipped": 1, "match_rate": 0.97,
                           "detected": True}]
    (tmp_path / "compare.json").write_text(json.dumps(compare))
    args = ("--results", evaluated["finetune"], tmp_path / "compare.json", "--figures-dir", figs, "--table",
            "--compare", "--no-trigger-grid", "--formats", "png")
    plot_main(monkeypatch, *args)
    assert [c[0] for c in calls] == ["table", "sweep", "compare"]
    assert all(out_dir == figs for _, _, out_dir in calls)
    for _, results_list, _ in calls[:2]:  # the table sees every file
        assert [(p, r["attack"]) for p, r in results_list] == [(evaluated["finetune"], "finetune"),
                                                                (str(tmp_path / "compare.json"), "compare")]
    assert [(p, r["attack"]) for p, r in calls[2][1]] == [(str(tmp_path / "compare.json"), "compare")]
    assert sorted(os.listdir(figs)) == [f"resnet8_synthetic_paper_{k}.png" for k in ("accuracy", "early_steps",
                                                                                      "match_rate")]

    # a hook whose module is absent is one clear error, not an ImportError
    monkeypatch.setitem(sys.modules, "fragile.comparison", None)
    with pytest.raises(UserError, match="--compare needs fragile/comparison.py"):
        plot_main(monkeypatch, *args)


@pytest.mark.parametrize("case", ["missing", "malformed"])
def test_bad_results_file_is_one_error_line(case, evaluated, tmp_path):
    """Through the script: a non-zero exit, exactly one ``error:`` line, no traceback, no figures."""
    path = tmp_path / ("absent.json" if case == "missing" else "bad.json")
    if case == "malformed":
        path.write_text('{"runs": [')
    proc = run_script("plot.py", "--results", evaluated["finetune"], path, "--figures-dir", tmp_path / "figs",
                      check=False)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and str(path) in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "figs").exists()  # every file is read before anything is drawn


@pytest.mark.parametrize("case, message", [("not-results", "is not a fragile-wm-results"),
                                           ("no-runs-key", "malformed: missing"),
                                           ("empty-folder", "no results files in"),
                                           ("bad-format", "unsupported figure format xyz"),
                                           ("bad-columns", "--grid-columns must be positive")])
def test_other_bad_input_is_a_user_error(case, message, evaluated, tmp_path, monkeypatch):
    bad = tmp_path / "bad.json"
    loaded = dict(evaluated["loaded"]["finetune"])
    del loaded["runs"]
    bad.write_text(json.dumps(loaded) if case == "no-runs-key" else '{"hello": 1}')
    (tmp_path / "empty").mkdir()
    args = {"not-results": ["--results", bad], "no-runs-key": ["--results", bad],
            "empty-folder": ["--results-dir", tmp_path / "empty"],
            "bad-format": ["--results", evaluated["finetune"], "--formats", "png", "xyz"],
            "bad-columns": ["--results", evaluated["finetune"], "--grid-columns", 0]}[case]
    with pytest.raises(UserError, match=message):
        plot_main(monkeypatch, *args, "--figures-dir", tmp_path / "figs")
    assert not (tmp_path / "figs").exists()
