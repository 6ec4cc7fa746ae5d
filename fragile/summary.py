"""The tamper suite's summary: one row per attack setting (markdown and CSV) and the sweep figures.

``plot.py --table`` calls ``write_table(results_list, out_dir)`` and ``sweep_figures(results_list, out_dir)``
with ``results_list`` = [(path, validated results dict), ...]. Both print and return the paths they write.

A row is the final state of one setting: a sweep point (``setting`` label: ``sigma=1e-04``, ``k=10 (exponent)``)
or, for trajectories without one (``finetune``, ``poison``), the end of each phase. Several seeds are averaged.
"""
import math
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from .checkpoint_io import atomic_write, atomic_write_text  # noqa: E402
from .results import to_csv  # noqa: E402

ATTACK_ORDER = ("finetune", "poison", "fine-prune", "restore", "obfuscate", "noise", "single-weight", "bitflip",
                "prune", "quantize")
COLUMNS = ("model", "method", "attack", "setting", "triggers_flipped", "num_triggers", "detection_probability",
           "detected", "clean_accuracy", "queries_to_detection", "notes")
FIGURE_FORMATS = ("png", "pdf")
METRIC_LABELS = {"match_rate": "fragile match rate", "clean_accuracy": "clean accuracy",
                 "attack_success_rate": "BadNets attack success rate", "backdoor_accuracy": "robust watermark accuracy"}
DPI = 150


# ----------------------------------------------------------------------------- rows

def _number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _mean(values):
    values = [float(v) for v in values if _number(v)]
    return sum(values) / len(values) if values else None


def expected_queries(flipped, n, max_mismatches):
    """Mean queries to detection over random query orders (see tamper_suite.expected_queries)."""
    return None if flipped <= max_mismatches else (max_mismatches + 1) * (n + 1) / (flipped + 1)


def setting_of(record):
    """The row a record belongs to: its sweep label, else its phase (trajectories), else the attack itself."""
    if record.get("setting"):
        return str(record["setting"])
    return str(record.get("phase") or "end")


def final_records(run):
    """{setting: last record of that setting in this run}, in order of first appearance."""
    last = {}
    for record in run["records"]:
        last[setting_of(record)] = record
    return last


def row_label(setting, record):
    """Trajectory rows say where they end ("finetune, epoch 40")."""
    if record.get("setting") or not _number(record.get("epoch")):
        return setting
    return f"{setting}, epoch {record['epoch']:g}"


def notes(records, runs):
    """Side measurements worth a glance: weights changed, ASR, robust watermark, pruning, first detection."""
    parts = []
    for key, text, fmt in (("weights_changed", "weights changed", "{:.0f}"),
                           ("pruned_channels", "channels pruned", "{:.0f}"), ("attack_success_rate", "ASR", "{:.3f}"),
                           ("backdoor_accuracy", "robust wm acc", "{:.2f}"), ("trials", "trials", "{:.0f}")):
        value = _mean(r.get(key) for r in records)
        if value is not None:
            parts.append(f"{text} {fmt.format(value)}")
    partly = [r for r in records if 0 < (r.get("detection_probability") or 0) < 1]
    missed = _mean(r.get("clean_accuracy_missed") for r in partly)
    if missed is not None:  # the tampering that got through: what did it cost?
        parts.append(f"clean acc when missed {missed:.4f}")
    steps = [run.get("first_detection_step") for run in runs if "first_detection_step" in run]
    if steps and all(not r.get("setting") for r in records):
        found = [s for s in steps if _number(s)]
        parts.append(f"first detected at step {_mean(found):.0f}" + (f" ({len(found)}/{len(steps)} seeds)"
                                                                      if len(found) < len(steps) else "")
                     if found else "never detected")
    return "; ".join(parts)


def rows_of(path, results):
    """The summary rows of one results file."""
    n = results["num_triggers"]
    config = results.get("config") if isinstance(results.get("config"), dict) else {}
    tolerance = config.get("MAX_MISMATCHES", 0) or 0
    per_setting = {}
    for run in results["runs"]:
        for setting, record in final_records(run).items():
            per_setting.setdefault(setting, []).append(record)
    rows = []
    for setting, records in per_setting.items():
        flipped = _mean(r.get("mean_flipped", r["flipped"]) for r in records)
        probability = _mean(r.get("detection_probability", float(bool(r["detected"]))) for r in records)
        queries = [r["mean_queries_to_detection"] if "mean_queries_to_detection" in r
                   else expected_queries(r["flipped"], n, tolerance) for r in records]
        rows.append({"model": f"{results['arch']}/{results['dataset']}", "method": results["method"],
                     "attack": results["attack"], "setting": row_label(setting, records[-1]),
                     "triggers_flipped": flipped, "num_triggers": n, "detection_probability": probability,
                     "detected": probability >= 0.5, "clean_accuracy": _mean(r.get("clean_accuracy") for r in records),
                     "queries_to_detection": _mean(queries), "notes": notes(records, results["runs"])})
    return rows


def attack_rank(attack):
    return (ATTACK_ORDER.index(attack), "") if attack in ATTACK_ORDER else (len(ATTACK_ORDER), attack)


def summary_rows(results_list):
    """Every row of every file, grouped by model and method, attacks in the suite's order."""
    ordered = sorted(results_list, key=lambda item: (item[1]["arch"], item[1]["dataset"], item[1]["method"],
                                                     attack_rank(item[1]["attack"]), item[0]))
    return [row for path, results in ordered for row in rows_of(path, results)]


# ----------------------------------------------------------------------------- table

def _fmt(value, digits):
    return "-" if value is None else f"{value:.{digits}f}"


def markdown_row(row):
    flipped = ("-" if row["triggers_flipped"] is None else f"{row['triggers_flipped']:.3g}") + f"/{row['num_triggers']}"
    detected = ("yes" if row["detected"] else "no") + (
        f" ({row['detection_probability']:.2f})" if 0 < row["detection_probability"] < 1 else "")
    cells = (row["model"], row["method"], row["attack"], row["setting"], flipped, detected,
             _fmt(row["clean_accuracy"], 4), _fmt(row["queries_to_detection"], 1), row["notes"] or "")
    return "| " + " | ".join(str(c).replace("|", "/") for c in cells) + " |"


def markdown_table(rows):
    header = ("model", "triggers", "attack", "setting", "triggers flipped", "detected (probability)",
              "clean accuracy after", "queries to detection", "notes")
    lines = ["# Tamper suite summary", "",
             "One row per attack setting: its final state, averaged over seeds and trials. *Detected* is the "
             "majority verdict, with the detection probability in brackets when it is neither 0 nor 1. "
             "*Queries to detection*: mean 1-based index of the first query that reveals the tampering, the "
             "triggers asked in a random order (\"-\": never detected).", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + [markdown_row(r) for r in rows]) + "\n"


def csv_rows(rows):
    def clean(value):
        return round(value, 6) if isinstance(value, float) else value
    return [{c: clean(r[c]) for c in COLUMNS} for r in rows]


def write_table(results_list, out_dir):
    """summary.md and summary.csv in ``out_dir``; returns their paths."""
    rows = summary_rows(results_list)
    paths = [os.path.join(out_dir, "summary.md"), os.path.join(out_dir, "summary.csv")]
    atomic_write_text(markdown_table(rows), paths[0])
    atomic_write_text(to_csv(csv_rows(rows)) if rows else ",".join(COLUMNS) + "\n", paths[1])
    for path in paths:
        print(f"table -> {path}")
    return paths


# ----------------------------------------------------------------------------- sweep figures

def sweep_series(results_list, attack, x_key, group_key=None):
    """{line label: sorted [(x, detection probability, flipped fraction, clean accuracy)]} for one attack's
    sweep, seeds averaged. One line per model/method, split by ``group_key`` (bit class, position)."""
    lines = {}
    for path, results in results_list:
        if results["attack"] != attack:
            continue
        n = results["num_triggers"]
        points = {}
        for run in results["runs"]:
            for record in run["records"]:
                if not _number(record.get(x_key)):
                    continue
                group = record.get(group_key) if group_key else None
                label = (f"{attack}" + (f" {group}" if group else "")
                         + f" ({results['arch']}/{results['dataset']}, {results['method']} triggers)")
                points.setdefault(label, {}).setdefault(float(record[x_key]), []).append(record)
        for label, by_x in points.items():
            lines[label] = [(x, _mean(r.get("detection_probability", float(bool(r["detected"]))) for r in rs),
                             _mean(r.get("mean_flipped", r["flipped"]) for r in rs) / n,
                             _mean(r.get("clean_accuracy") for r in rs)) for x, rs in sorted(by_x.items())]
    return lines


def save_figure(fig, out_dir, name):
    """Every format, each written atomically; returns the paths."""
    paths = []
    for ext in FIGURE_FORMATS:
        path = os.path.join(out_dir, f"{name}.{ext}")
        atomic_write(path, lambda f, ext=ext: fig.savefig(f, format=ext, dpi=DPI))
        print(f"figure -> {path}")
        paths.append(path)
    plt.close(fig)
    return paths


def log_axis(ax, xs):
    """A log x axis; symlog when zero is swept too (sigma = 0, the untouched control)."""
    positive = [x for x in xs if x > 0]
    if len(positive) < len(xs):
        ax.set_xscale("symlog", linthresh=min(positive or [1.0]))
    else:
        ax.set_xscale("log")


def sweep_figure(panels, xlabel, title, log_x=True):
    """Detection probability, fraction of triggers flipped and clean accuracy against the swept coordinate.
    ``panels``: [(line label, points, marker)]."""
    fig, axes = plt.subplots(1, 3, figsize=(13.5, 4.2), layout="constrained")
    fig.suptitle(title)
    ylabels = ("detection probability", "fraction of triggers flipped", "clean accuracy after")
    for column, (ax, ylabel) in enumerate(zip(axes, ylabels)):
        for label, points, marker in panels:
            xs = [p[0] for p in points if p[column + 1] is not None]
            ys = [p[column + 1] for p in points if p[column + 1] is not None]
            if xs:
                ax.plot(xs, ys, marker=marker, markersize=4, label=label)
        if log_x:
            log_axis(ax, [p[0] for _, points, _ in panels for p in points])
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_ylim(-0.03, 1.05)
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    if handles:  # below the panels, where it hides no point
        fig.legend(handles, labels, loc="outside lower center", ncols=min(3, len(handles)), fontsize=7)
    return fig


MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")


def with_markers(*line_dicts):
    panels = []
    for lines in line_dicts:
        for label, points in lines.items():
            panels.append((label, points, MARKERS[len(panels) % len(MARKERS)]))
    return panels


def fine_prune_figure(results_list):
    """Fine-pruning trajectories: match rate, clean accuracy and ASR against channels pruned, then against
    fine-tuning epoch, for the watermarked model and (if defended) the poisoned one."""
    files = [(p, r) for p, r in results_list if r["attack"] == "fine-prune"]
    if not files:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2), layout="constrained")
    fig.suptitle("fine-pruning: the fragile watermark and the backdoor, through pruning and fine-tuning")
    styles = {"match_rate": "-", "clean_accuracy": "--", "attack_success_rate": ":", "backdoor_accuracy": "-."}
    colors = iter(plt.rcParams["axes.prop_cycle"].by_key()["color"] * 4)
    for path, results in files:
        run = results["runs"][0]  # one seed is drawn: pruning orders differ between seeds
        for target in dict.fromkeys(r.get("target") for r in run["records"]):
            color = next(colors)
            mine = [r for r in run["records"] if r.get("target") == target]
            prune = [r for r in mine if r.get("phase") == "prune"]
            tune = [r for r in mine if r.get("phase") != "prune" and _number(r.get("epoch"))
                    and r["epoch"] == round(r["epoch"])]
            for metric, style in styles.items():
                if not any(_number(r.get(metric)) for r in mine):
                    continue
                label = f"{target}: {METRIC_LABELS[metric]}"
                axes[0].plot([r["pruned_channels"] for r in prune], [r.get(metric) for r in prune], style,
                             color=color, label=label)
                axes[1].plot([r["epoch"] for r in tune], [r.get(metric) for r in tune], style, marker="o",
                             markersize=3, color=color, label=label)
    axes[0].set_xlabel("last-layer channels pruned (lowest mean activation first)")
    axes[1].set_xlabel("clean fine-tuning epoch after pruning")
    for ax in axes:
        ax.set_ylim(-0.03, 1.05)
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=4, fontsize=7)
    return fig


def sweep_figures(results_list, out_dir):
    """Detection against sigma (noise), k (obfuscation, bit flips), epsilon (single weight) and pruning ratio,
    plus the fine-pruning trajectories. Only figures with data are written; returns the paths."""
    figures = (("tamper_detection_vs_sigma", "Gaussian noise std sigma on every weight",
                "Gaussian weight noise", [sweep_series(results_list, "noise", "sigma")]),
               ("tamper_detection_vs_k", "weights changed k",
                "k weights: obfuscated (NNSplitter-style) or one bit flipped in each",
                [sweep_series(results_list, "obfuscate", "k"),
                 sweep_series(results_list, "bitflip", "k", "bit_class")]),
               ("tamper_detection_vs_epsilon", "relative change epsilon of one weight",
                "one weight times (1 +- epsilon)",
                [sweep_series(results_list, "single-weight", "epsilon", "position")]),
               ("tamper_detection_vs_prune_ratio", "fraction of conv/linear weights pruned (global magnitude)",
                "magnitude pruning", [sweep_series(results_list, "prune", "ratio")]))
    paths = []
    for name, xlabel, title, line_dicts in figures:
        panels = with_markers(*line_dicts)
        if panels:
            paths += save_figure(sweep_figure(panels, xlabel, title), out_dir, name)
    fig = fine_prune_figure(results_list)
    if fig is not None:
        paths += save_figure(fig, out_dir, "tamper_fine_prune")
    return paths
