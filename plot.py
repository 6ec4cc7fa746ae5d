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
TABLE = False              # also the summary table and sweep figures (fragile/summary.py)
COMPARE = False            # also the method comparison (fragile/comparison.py)
# -----------------------------------------------------------------------------

import glob
import importlib
import math
import os
from dataclasses import dataclass

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import FuncFormatter, MaxNLocator  # noqa: E402

from fragile.cli import UserError, apply_overrides, run_main  # noqa: E402
from fragile.results import read_results  # noqa: E402

_ROOT = os.path.dirname(os.path.abspath(__file__))

# ----------------------------------------------------------------------------- shared styling
# (underscored names: module constants, not command-line flags)

_STYLE = {"font.size": 9, "axes.titlesize": 10, "axes.labelsize": 9, "legend.fontsize": 7.5, "axes.grid": True,
         "grid.alpha": 0.3, "axes.spines.top": False, "axes.spines.right": False, "savefig.bbox": "tight",
         "figure.constrained_layout.use": True}
_PANEL_SIZE = (4.6, 3.4)     # inches per subplot
_BAND_ALPHA = 0.2
_ATTACK_ORDER = ("finetune", "poison", "fine-prune", "restore")
_ATTACK_COLORS = {"finetune": "tab:blue", "poison": "tab:red", "fine-prune": "tab:green", "restore": "tab:purple"}
_SPARE_COLORS = ("tab:orange", "tab:brown", "tab:pink", "tab:olive", "tab:cyan", "tab:gray")
_ATTACK_MARKERS = {"finetune": "o", "poison": "s", "fine-prune": "^", "restore": "D"}
_ATTACK_NAMES = {"finetune": "clean fine-tuning", "poison": "poisoned fine-tuning (BadNets)",
                "fine-prune": "fine-pruning", "restore": "restore"}
_METRIC_NAMES = {"match_rate": "trigger match rate", "clean_accuracy": "clean test accuracy",
                "attack_success_rate": "attack success rate", "backdoor_accuracy": "robust watermark accuracy"}


def new_figure(ncols, title):
    fig, axes = plt.subplots(1, ncols, figsize=(_PANEL_SIZE[0] * ncols, _PANEL_SIZE[1]), squeeze=False)
    fig.suptitle(title)
    return fig, list(axes[0])


def style_axis(ax, xlabel, metric, title=None):
    ax.set_xlabel(xlabel)
    ax.set_ylabel(_METRIC_NAMES.get(metric, metric))
    ax.set_ylim(-0.03, 1.05)
    if title:
        ax.set_title(title)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="best")


def epoch_axis(ax):
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def step_axis(ax):
    """Log steps with step 0 (the untouched model) kept on the axis: linear in [0, 1], log beyond."""
    ax.set_xscale("symlog", linthresh=1, linscale=0.4)
    ax.set_xlim(left=0)
    ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))


def save(fig, name):
    """Write the figure in every format, print each file, close it. Returns the paths."""
    try:
        os.makedirs(FIGURES_DIR, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create figures folder {FIGURES_DIR}: {e.strerror}") from None
    paths = []
    for ext in FORMATS:
        path = os.path.join(FIGURES_DIR, f"{name}.{ext}")
        try:
            fig.savefig(path, dpi=DPI)
        except OSError as e:
            raise UserError(f"cannot write {path}: {e.strerror}") from None
        print(f"figure -> {path}")
        paths.append(path)
    plt.close(fig)
    return paths


# ----------------------------------------------------------------------------- data

@dataclass
class Entry:
    """One trajectory results file, as drawn: its label and colour are fixed once for every figure."""
    path: str
    results: dict
    label: str
    color: str
    marker: str
    width: float            # earlier entries are drawn wider, so a line hidden under a later one still shows

    @property
    def runs(self):
        return self.results["runs"]


@dataclass
class Series:
    """A metric over seeds at each x: mean, std (0 for one seed) and how many seeds had a value."""
    x: np.ndarray
    mean: np.ndarray
    std: np.ndarray
    n: np.ndarray

    @property
    def seeds(self):
        return int(self.n.max()) if len(self.n) else 0


def _number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def is_trajectory(results):
    """Fine-tuning-like runs (finetune, poison, fine-prune, restore...): every record has a step and an epoch."""
    records = [r for run in results["runs"] for r in run["records"]]
    return bool(records) and all(_number(r.get("epoch")) and _number(r.get("step")) for r in records)


def phased(records):
    """(phase index, record) with the phase counted in order of appearance; a run without phases is phase 0."""
    index, last = 0, None
    for i, record in enumerate(records):
        phase = record.get("phase")
        if i and phase != last:
            index += 1
        last = phase
        yield index, record


def whole_epochs(records):
    """(phase, epoch offset, record) for the records at whole epochs. A later phase (say, restore after
    fine-tuning) continues the epoch count where the previous phase ended, its offset."""
    offset, end, current = 0.0, 0.0, 0
    for phase, record in phased(records):
        if phase != current:
            current, offset = phase, end
        if record["epoch"] == round(record["epoch"]):
            end = max(end, offset + record["epoch"])
            yield phase, offset, record


def epoch_points(records):
    """(key, epoch, record) at whole epochs; steps inside an epoch belong to the early-steps view."""
    return [((phase, offset + r["epoch"]), offset + r["epoch"], r) for phase, offset, r in whole_epochs(records)]


def step_points(records):
    return [((phase, record["step"]), record["step"], record) for phase, record in phased(records)]


def aggregate(runs, points_of, metric):
    """Mean and std over seeds of ``metric`` at each point (sample std; 0 where one seed has it)."""
    table = {}
    for run in runs:
        for key, x, record in points_of(run["records"]):
            if _number(record.get(metric)):
                table.setdefault(key, (x, []))[1].append(float(record[metric]))
    keys = sorted(table)
    values = [table[k][1] for k in keys]
    return Series(x=np.array([table[k][0] for k in keys], dtype=float),
                  mean=np.array([np.mean(v) for v in values]),
                  std=np.array([np.std(v, ddof=1) if len(v) > 1 else 0.0 for v in values]),
                  n=np.array([len(v) for v in values], dtype=int))


def phase_boundaries(runs):
    """(epoch, phase name) where each later phase begins, from the first run."""
    if not runs:
        return []
    starts, last = [], 0
    for phase, offset, record in whole_epochs(runs[0]["records"]):
        if phase != last:
            starts.append((offset, record.get("phase") or ""))
            last = phase
    return starts


def first_epoch_end(runs):
    """The step at which the first epoch ends (from the first run), or None."""
    for run in runs:
        for phase, record in phased(run["records"]):
            if phase == 0 and record["epoch"] == 1.0:
                return record["step"]
    return None


def detection_summary(runs):
    """(mean, std, detected seeds, seeds) of the first detection step; mean is None if never detected."""
    steps = [run.get("first_detection_step") for run in runs]
    found = [s for s in steps if _number(s)]
    if not found:
        return None, 0.0, 0, len(steps)
    return float(np.mean(found)), float(np.std(found, ddof=1)) if len(found) > 1 else 0.0, len(found), len(steps)


# ----------------------------------------------------------------------------- drawing

def draw_series(ax, series, label, color, marker, width, linestyle="-"):
    """A line with markers; a mean +- std band when several seeds contributed."""
    if not len(series.x):
        return False
    if series.seeds > 1:
        label = f"{label} (mean ± std, {series.seeds} seeds)"
    ax.plot(series.x, series.mean, linestyle=linestyle, marker=marker, markersize=2 * width + 1, linewidth=width,
            color=color, label=label)
    if series.seeds > 1:
        ax.fill_between(series.x, np.clip(series.mean - series.std, 0, 1), np.clip(series.mean + series.std, 0, 1),
                        color=color, alpha=_BAND_ALPHA, linewidth=0)
    return True


def draw_metric_panel(ax, entries, points_of, metric, **line_style):
    """Every entry's ``metric`` on one axis; returns how many entries had it."""
    return sum(draw_series(ax, aggregate(e.runs, points_of, metric), e.label, e.color, e.marker, e.width,
                           **line_style) for e in entries)


def mark_phases(ax, entries):
    """Dotted dividers where a later phase begins (e.g. restoration after fine-tuning)."""
    seen = set()
    for entry in entries:
        for x, name in phase_boundaries(entry.runs):
            if (x, name) in seen:
                continue
            seen.add((x, name))
            ax.axvline(x, color="0.4", linestyle=":", linewidth=1)
            ax.annotate(name, (x, 0.5), xycoords=("data", "axes fraction"), rotation=90, fontsize=7, color="0.3",
                        xytext=(2, 0), textcoords="offset points", va="center")


def group_title(key, entries, what):
    arch, dataset, method = key
    triggers = entries[0].results.get("num_triggers")
    return f"{arch} on {dataset}, {method} triggers ({triggers}): {what}"


# ----------------------------------------------------------------------------- figures, one helper per kind

def match_rate_figure(key, entries):
    """The paper's figure: match rate against fine-tuning epoch, clean vs poisoned on the same axes.
    If the robust watermark was tracked, its trigger-set accuracy goes in a panel beside it."""
    robust = [e for e in entries if any("backdoor_accuracy" in r for run in e.runs for r in run["records"])]
    fig, axes = new_figure(2 if robust else 1, group_title(key, entries, "fragile watermark under fine-tuning"))
    draw_metric_panel(axes[0], entries, epoch_points, "match_rate")
    mark_phases(axes[0], entries)
    epoch_axis(axes[0])
    style_axis(axes[0], "fine-tuning epoch", "match_rate", "fragile watermark (this paper)")
    if robust:
        draw_metric_panel(axes[1], robust, epoch_points, "backdoor_accuracy", linestyle="--")
        mark_phases(axes[1], robust)
        epoch_axis(axes[1])
        style_axis(axes[1], "fine-tuning epoch", "backdoor_accuracy", "robust watermark (Adi et al. 2018)")
    return fig


def accuracy_figure(key, entries):
    """Clean accuracy and, where poisoned, attack success rate against epoch."""
    poisoned = [e for e in entries if any("attack_success_rate" in r for run in e.runs for r in run["records"])]
    fig, axes = new_figure(2 if poisoned else 1, group_title(key, entries, "model under fine-tuning"))
    panels = [("clean_accuracy", entries, "clean accuracy")]
    if poisoned:
        panels.append(("attack_success_rate", poisoned, "backdoor attack success rate"))
    for ax, (metric, drawn, title) in zip(axes, panels):
        draw_metric_panel(ax, drawn, epoch_points, metric)
        mark_phases(ax, drawn)
        epoch_axis(ax)
        style_axis(ax, "fine-tuning epoch", metric, title)
    return fig


def early_steps_figure(key, entries):
    """Match rate against optimizer step on a log axis, the first detection of every attack marked."""
    fig, axes = new_figure(1, group_title(key, entries, "the first steps"))
    ax = axes[0]
    draw_metric_panel(ax, entries, step_points, "match_rate")
    for entry in entries:
        mean, std, found, seeds = detection_summary(entry.runs)
        if mean is None:
            continue
        text = f"first detection, {entry.label}: step {mean:g}" + (f" ± {std:.2g}" if found > 1 else "")
        if found < seeds:
            text += f" ({found}/{seeds} seeds)"
        ax.axvline(mean, color=entry.color, linestyle="-.", linewidth=1, label=text)
    end = first_epoch_end(entries[0].runs)
    if end is not None:
        ax.axvline(end, color="0.5", linestyle=":", linewidth=1, label=f"end of epoch 1 (step {end})")
    step_axis(ax)
    style_axis(ax, "optimizer step (step 0 = untouched model; log scale beyond 1)", "match_rate")
    return fig


def trigger_grid_figure(images, labels, class_names, title):
    """The triggers in a grid, each titled with its index and key label."""
    n = len(images)
    cols = min(GRID_COLUMNS, n)
    rows = -(-n // cols)
    # a fixed layout: the constrained one is slow on a grid of many image axes, and they need no tick room
    fig, axes = plt.subplots(rows, cols, figsize=(1.15 * cols, 1.3 * rows + 0.4), squeeze=False, layout="none")
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=1 - 0.5 / (1.3 * rows + 0.4), wspace=0.08,
                        hspace=0.3)
    fig.suptitle(title)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i >= n:
            continue
        image = images[i]
        if image.shape[0] == 1:
            ax.imshow(image[0], cmap="gray", vmin=0, vmax=255)
        else:
            ax.imshow(image.transpose(1, 2, 0))
        if labels is not None:
            label = labels[i]
            name = class_names[label] if 0 <= label < len(class_names) else str(label)
            ax.set_title(f"{i}: {name}", fontsize=6.5)
        else:
            ax.set_title(f"{i}", fontsize=6.5)
    return fig


# ----------------------------------------------------------------------------- triggers on disk

def candidate_paths(path, results_file):
    """A path as written in the results, then relative to the repository and to the results folder's parent."""
    if os.path.isabs(path):
        return [path]
    results_parent = os.path.dirname(os.path.dirname(os.path.abspath(results_file)))
    return list(dict.fromkeys([path, os.path.join(_ROOT, path), os.path.join(results_parent, path)]))


def locate_triggers(results, results_file):
    """(trigger path, key path or None), or (None, the path looked for) when the triggers are absent."""
    from fragile.triggers import default_paths
    config = results["config"] if isinstance(results.get("config"), dict) else {}
    model = results.get("model") or ""
    default_triggers, default_key = default_paths(model, results["method"]) if model else ("", "")
    wanted = config.get("TRIGGERS") or default_triggers
    if not wanted:
        return None, "(no model path in the results)"
    for candidate in candidate_paths(wanted, results_file):
        if os.path.exists(candidate):
            key = config.get("KEY") or ""
            key_candidates = candidate_paths(key, results_file) if key else []
            meta_path = os.path.join(candidate, "meta.json")
            if os.path.isdir(candidate) and os.path.exists(meta_path):
                from fragile.triggers import read_json
                meta = read_json(meta_path, "trigger metadata")
                key_file = meta.get("key_file") if isinstance(meta, dict) else None
                if key_file:
                    key_candidates.append(os.path.join(os.path.dirname(os.path.abspath(candidate)), key_file))
            if default_key:
                key_candidates += candidate_paths(default_key, results_file)
            return candidate, next((k for k in key_candidates if os.path.exists(k)), None)
    return None, wanted


def load_trigger_images(path):
    """uint8 triggers as a numpy (N, C, H, W) array: triggers.pt when the folder has one, else its PNGs."""
    from fragile.triggers import load_triggers
    tensor_file = os.path.join(path, "triggers.pt")
    images, _ = load_triggers(tensor_file if os.path.isdir(path) and os.path.exists(tensor_file) else path)
    return images.numpy()


def trigger_figure(results, results_file):
    """The trigger grid of one results file's model and method, or None (with a printed note)."""
    from fragile.data import DATASETS
    from fragile.triggers import load_key
    try:
        path, key_path = locate_triggers(results, results_file)
    except UserError as e:  # e.g. an unreadable meta.json: the other figures are still worth drawing
        print(f"note: no trigger grid for {results_file}: {e}")
        return None
    if path is None:
        print(f"note: no trigger grid for {results_file}: triggers not found at {key_path}")
        return None
    try:
        images = load_trigger_images(path)
    except UserError as e:
        print(f"note: no trigger grid for {results_file}: {e}")
        return None
    labels = None
    if key_path is None:
        print(f"note: no key file found beside {path}: the trigger grid has no labels")
    else:
        try:
            labels, _ = load_key(key_path)
        except UserError as e:
            print(f"note: the trigger grid has no labels: {e}")
    if labels is not None and len(labels) != len(images):
        print(f"note: key {key_path} has {len(labels)} labels for {len(images)} triggers: the grid has no labels")
        labels = None
    shown = min(len(images), MAX_TRIGGERS)
    spec = DATASETS.get(results["dataset"])
    class_names = spec.class_names if spec else ()
    title = (f"{results['arch']} on {results['dataset']}: {results['method']} triggers"
             + (" with their key labels" if labels is not None else "")
             + (f" (first {shown} of {len(images)})" if shown < len(images) else f" ({len(images)})"))
    return trigger_grid_figure(images[:shown], labels[:shown] if labels is not None else None, class_names, title)


# ----------------------------------------------------------------------------- orchestration

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
    supported = plt.figure().canvas.get_supported_filetypes()
    plt.close("all")
    bad = [f for f in FORMATS if f not in supported]
    if bad:
        raise UserError(f"unsupported figure format {', '.join(bad)}: choose from {', '.join(sorted(supported))}")


def attack_rank(attack):
    return (_ATTACK_ORDER.index(attack), "") if attack in _ATTACK_ORDER else (len(_ATTACK_ORDER), attack)


def trajectory_groups(results_list):
    """{(arch, dataset, method): [Entry, ...]} of the fine-tuning-like files; other attacks get a note."""
    groups = {}
    for path, results in results_list:
        if not is_trajectory(results):
            print(f"note: {path} (attack {results['attack']}): not every record has a step and an epoch, "
                  f"so no trajectory figures for it (--table draws sweeps)")
            continue
        groups.setdefault((results["arch"], results["dataset"], results["method"]), []).append((path, results))
    colors = iter(_SPARE_COLORS * 8)
    spare = {}
    out = {}
    for key in sorted(groups):
        files = sorted(groups[key], key=lambda f: (attack_rank(f[1]["attack"]), f[0]))
        attacks = [r["attack"] for _, r in files]
        entries = []
        for index, (path, results) in enumerate(files):
            attack = results["attack"]
            label = _ATTACK_NAMES.get(attack, attack)
            if attacks.count(attack) > 1:
                label += f" [{os.path.basename(path)}]"
            color = _ATTACK_COLORS.get(attack) or spare.setdefault(attack, next(colors))
            entries.append(Entry(path, results, label, color, _ATTACK_MARKERS.get(attack, "v"),
                                 width=max(1.0, 2.6 - 0.6 * index)))
        out[key] = entries
    return out


def figure_name(key, kind):
    return "_".join(str(part).replace(os.sep, "-") for part in (*key, kind))


def draw_all(results_list):
    """Every figure of the results; returns the paths written."""
    written = []
    for key, entries in trajectory_groups(results_list).items():
        for kind, make in (("match_rate", match_rate_figure), ("accuracy", accuracy_figure),
                           ("early_steps", early_steps_figure)):
            written += save(make(key, entries), figure_name(key, kind))
    if TRIGGER_GRID:
        done = set()
        for path, results in results_list:
            key = (results["arch"], results["dataset"], results["method"])
            if key in done:
                continue
            fig = trigger_figure(results, path)
            if fig is not None:
                done.add(key)
                written += save(fig, figure_name(key, "triggers"))
    return written


def run_hook(flag, module_name, functions, results_list):
    """Hand the results to a module written beside this one, imported only when its flag is given."""
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name != module_name:
            raise
        raise UserError(f"{flag} needs {module_name.replace('.', '/')}.py, which this checkout does not have") from None
    for function in functions:
        written = getattr(module, function)(results_list, FIGURES_DIR)
        for path in (written.values() if isinstance(written, dict) else written or ()):
            print(f"{flag[2:]}: {path}")


def main():
    apply_overrides(globals(), __doc__)
    check_config()
    plt.rcParams.update(_STYLE)
    results_list = [(path, read_results(path)) for path in results_files()]
    written = draw_all(results_list)
    if TABLE:
        run_hook("--table", "fragile.summary", ("write_table", "sweep_figures"), results_list)
    if COMPARE:  # only the `eval.py --attack compare` files: render_comparison refuses any other
        comparisons = [(path, results) for path, results in results_list if results["attack"] == "compare"]
        run_hook("--compare", "fragile.comparison", ("render_comparison",), comparisons)
    print(f"{len(written)} figure files in {FIGURES_DIR}/ from {len(results_list)} results file(s)")


if __name__ == "__main__":
    run_main(main)
