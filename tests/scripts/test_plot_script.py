"""plot.py as a user runs it: every figure as PNG and PDF from real eval.py results, the table and the
comparison, and one error line for bad input."""
import copy
import csv
import importlib.util
import json
import os
import sys

import numpy as np
import pytest
from matplotlib import image as mpimg

from conftest import ROOT, run_script
from fragile.core.cli import UserError
from fragile.report.style import plt
from fragile.tamper import records

pytestmark = pytest.mark.integration
KINDS = ("match_rate", "accuracy", "early_steps", "triggers")


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


def assert_real_image(path):
    image = mpimg.imread(path)
    assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 200, image.shape
    assert image.std() > 0.05, f"{path} is (nearly) blank"
    colours = np.unique(image[..., :3].reshape(-1, 3).round(3), axis=0)
    assert len(colours) > 10, f"{path} has only {len(colours)} distinct colours"


def test_every_figure_written_as_png_and_pdf(trajectories, tmp_path):
    figs = tmp_path / "figs"
    proc = run_script("plot.py", "--results", trajectories["finetune"], trajectories["poison"], "--figures-dir", figs)
    for kind in KINDS:
        for ext in ("png", "pdf"):
            path = figs / f"resnet8_synthetic_paper_{kind}.{ext}"
            assert path.exists(), f"{path.name} missing; stdout:\n{proc.stdout}"
            assert str(path) in proc.stdout  # every file written is printed
        assert (figs / f"resnet8_synthetic_paper_{kind}.pdf").read_bytes().startswith(b"%PDF")
        assert_real_image(figs / f"resnet8_synthetic_paper_{kind}.png")
    assert sorted(os.listdir(figs)) == sorted(f"resnet8_synthetic_paper_{k}.{e}" for k in KINDS for e in ("png", "pdf"))


def test_default_reads_every_results_json(trajectories, tmp_path, monkeypatch, capsys):
    figs = tmp_path / "figs"
    plot_main(monkeypatch, "--results-dir", trajectories["dir"], "--figures-dir", figs, "--no-trigger-grid",
              "--formats", "png")
    assert "from 2 results file(s)" in capsys.readouterr().out
    assert sorted(os.listdir(figs)) == [f"resnet8_synthetic_paper_{k}.png" for k in ("accuracy", "early_steps",
                                                                                      "match_rate")]


def test_table_and_compare_read_every_file_they_are_given(trajectories, compare_results, tmp_path, monkeypatch):
    figs = tmp_path / "figs"
    plot_main(monkeypatch, "--results", trajectories["finetune"], compare_results[0], "--figures-dir", figs, "--table",
              "--compare", "--no-trigger-grid", "--formats", "png")
    rows = list(csv.DictReader(open(figs / "summary.csv")))
    assert {r["attack"] for r in rows} == {"finetune", "compare"}   # the table sees every file
    table = (figs / "comparison.md").read_text()
    assert "| paper | fine-tune 1 epoch |" in table   # made from the compare file alone: others are refused
    assert sorted(p.name for p in figs.iterdir() if p.name.startswith("resnet8")) == [
        f"resnet8_synthetic_paper_{k}.png" for k in ("accuracy", "early_steps", "match_rate")]   # trajectories only
    assert_real_image(figs / "comparison.png")


def test_a_sweep_file_gets_no_trajectory_figure_and_says_so(trajectories, tmp_path, monkeypatch, capsys):
    noise = copy.deepcopy(trajectories["loaded"]["finetune"])
    noise["attack"] = "noise"
    for run in noise["runs"]:
        run["records"] = [records.point_record(s, records.verdict(3, 30, 0), 0.9, sigma=s) for s in (0.01, 0.1)]
    (tmp_path / "noise.json").write_text(json.dumps(noise))
    figs = tmp_path / "figs"
    plot_main(monkeypatch, "--results", tmp_path / "noise.json", trajectories["finetune"], "--figures-dir", figs,
              "--formats", "png", "--no-trigger-grid")
    assert "noise.json (attack noise): not every record has a step and an epoch" in capsys.readouterr().out
    assert sorted(os.listdir(figs)) == [f"resnet8_synthetic_paper_{k}.png" for k in ("accuracy", "early_steps",
                                                                                      "match_rate")]
    assert_real_image(figs / "resnet8_synthetic_paper_match_rate.png")


@pytest.mark.parametrize("case", ["missing", "malformed"])
def test_bad_results_file_is_one_error_line(case, trajectories, tmp_path):
    """Through the script: a non-zero exit, exactly one ``error:`` line, no traceback, no figures."""
    path = tmp_path / ("absent.json" if case == "missing" else "bad.json")
    if case == "malformed":
        path.write_text('{"runs": [')
    proc = run_script("plot.py", "--results", trajectories["finetune"], path, "--figures-dir", tmp_path / "figs",
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
def test_other_bad_input_is_a_user_error(case, message, trajectories, tmp_path, monkeypatch):
    bad = tmp_path / "bad.json"
    loaded = dict(trajectories["loaded"]["finetune"])
    del loaded["runs"]
    bad.write_text(json.dumps(loaded) if case == "no-runs-key" else '{"hello": 1}')
    (tmp_path / "empty").mkdir()
    args = {"not-results": ["--results", bad], "no-runs-key": ["--results", bad],
            "empty-folder": ["--results-dir", tmp_path / "empty"],
            "bad-format": ["--results", trajectories["finetune"], "--formats", "png", "xyz"],
            "bad-columns": ["--results", trajectories["finetune"], "--grid-columns", 0]}[case]
    with pytest.raises(UserError, match=message):
        plot_main(monkeypatch, *args, "--figures-dir", tmp_path / "figs")
    assert not (tmp_path / "figs").exists()
