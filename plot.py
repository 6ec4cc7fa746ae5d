"""Draw the figures of the results files written by eval.py.

    python plot.py                                        # every results/*.json -> figures/
    python plot.py --results results/a.json results/b.json --figures-dir figs
    python plot.py --table --compare                      # also the summary table and the comparison

Per (arch, dataset, trigger method), from the fine-tuning trajectories (finetune, poison, and any other
attack whose records carry epochs):
  <arch>_<dataset>_<method>_match_rate    the paper's figure: match rate against epoch, clean vs poisoned
                                          (and the robust watermark's trigger accuracy beside it, if tracked)
  <arch>_<dataset>_<method>_accuracy      clean accuracy and attack success rate against epoch
  <arch>_<dataset>_<method>_early_steps   match rate against step on a log axis, with the first detection
  <arch>_<dataset>_<method>_triggers      the trigger set re-drawn with its key labels (if it can be found)
Several seeds in one results file are drawn as mean +- std bands. Headless: files only, never a window.
"""
# ----------------------------------------------------------------------------- config
RESULTS = []               # results files to plot; default: every RESULTS_DIR/*.json
RESULTS_DIR = "results"
FIGURES_DIR = "figures"
FORMATS = ["png", "pdf"]
DPI = 150
TRIGGER_GRID = True        # re-draw the trigger set with its key labels
MAX_TRIGGERS = 50          # at most this many triggers in the grid
GRID_COLUMNS = 10
TABLE = False              # also the tamper suite's summary table and sweep figures (fragile/report/tables.py)
COMPARE = False            # also the method comparison (fragile/report/comparison.py)
# -----------------------------------------------------------------------------

import glob
import os

from fragile.core.cli import UserError, apply_overrides, run_main
from fragile.tamper.records import read_results
from fragile.report import comparison, figures, sweep_figures, tables
from fragile.report.style import apply_style, save_figure, supported_formats
from fragile.report.trajectories import figure_name, trajectory_groups
from fragile.report.trigger_grid import trigger_figure

TRAJECTORY_FIGURES = (("match_rate", figures.match_rate_figure), ("accuracy", figures.accuracy_figure),
                      ("early_steps", figures.early_steps_figure))


def results_files():
    paths = RESULTS or sorted(glob.glob(os.path.join(RESULTS_DIR, "*.json")))
    if not paths:
        raise UserError(f"no results files in {RESULTS_DIR}/ (run eval.py first, or name files with --results)")
    return list(dict.fromkeys(paths))


def check_config():
    for name, value in (("--dpi", DPI), ("--max-triggers", MAX_TRIGGERS), ("--grid-columns", GRID_COLUMNS)):
        if value <= 0:
            raise UserError(f"{name} must be positive, got {value}")
    if not FORMATS:
        raise UserError("--formats needs at least one format, e.g. png pdf")
    supported = supported_formats()
    bad = [f for f in FORMATS if f not in supported]
    if bad:
        raise UserError(f"unsupported figure format {', '.join(bad)}: choose from {', '.join(sorted(supported))}")


def save(fig, name):
    return save_figure(fig, FIGURES_DIR, name, FORMATS, DPI)


def draw_all(results_list):
    """Every trajectory figure and trigger grid of the results; returns the paths written."""
    written = []
    for key, entries in trajectory_groups(results_list).items():
        for kind, make in TRAJECTORY_FIGURES:
            written += save(make(key, entries), figure_name(key, kind))
    if TRIGGER_GRID:
        done = set()
        for path, results in results_list:
            key = (results["arch"], results["dataset"], results["method"])
            if key in done:
                continue
            fig = trigger_figure(results, path, MAX_TRIGGERS, GRID_COLUMNS)
            if fig is not None:
                done.add(key)
                written += save(fig, figure_name(key, "triggers"))
    return written


def main():
    apply_overrides(globals(), __doc__)
    check_config()
    apply_style()
    results_list = [(path, read_results(path)) for path in results_files()]   # every file read before drawing
    written = draw_all(results_list)
    if TABLE:
        tables.write_table(results_list, FIGURES_DIR)
        written += sweep_figures.sweep_figures(results_list, FIGURES_DIR, FORMATS, DPI)
    if COMPARE:  # only the `eval.py --attack compare` files: render_comparison refuses any other
        compared = [(path, results) for path, results in results_list if results["attack"] == "compare"]
        for path in comparison.render_comparison(compared, FIGURES_DIR).values():
            print(f"compare: {path}")
    print(f"{len(written)} figure files in {FIGURES_DIR}/ from {len(results_list)} results file(s)")


if __name__ == "__main__":
    run_main(main)
