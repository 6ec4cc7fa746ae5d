"""The paper's figures and ours, from fine-tuning trajectories (plot.py): the match rate against epoch, clean
accuracy and attack success rate, the first steps on a log axis, and the trigger set with its key labels."""
import numpy as np
from matplotlib.ticker import FuncFormatter, MaxNLocator

from .style import BAND_ALPHA, METRIC_NAMES, PANEL_SIZE, plt
from .trajectories import (aggregate, detection_summary, epoch_points, first_epoch_end, phase_boundaries,
                           step_points)


def new_figure(ncols, title):
    fig, axes = plt.subplots(1, ncols, figsize=(PANEL_SIZE[0] * ncols, PANEL_SIZE[1]), squeeze=False)
    fig.suptitle(title)
    return fig, list(axes[0])


def style_axis(ax, xlabel, metric, title=None):
    ax.set_xlabel(xlabel)
    ax.set_ylabel(METRIC_NAMES.get(metric, metric))
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
                        color=color, alpha=BAND_ALPHA, linewidth=0)
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


def trigger_grid_figure(images, labels, class_names, title, columns):
    """The triggers in a grid of ``columns``, each titled with its index and key label."""
    n = len(images)
    cols = min(columns, n)
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
