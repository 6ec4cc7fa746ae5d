"""The tamper suite's sweep figures (``plot.py --table``): detection probability, fraction of triggers flipped
and clean accuracy against what each attack sweeps, and the fine-pruning trajectories."""
from matplotlib.ticker import MaxNLocator

from .statistics import mean, number
from .style import MARKERS, METRIC_NAMES, plt, save_figure


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
                if not number(record.get(x_key)):
                    continue
                group = record.get(group_key) if group_key else None
                label = (f"{attack}" + (f" {group}" if group else "")
                         + f" ({results['arch']}/{results['dataset']}, {results['method']} triggers)")
                points.setdefault(label, {}).setdefault(float(record[x_key]), []).append(record)
        for label, by_x in points.items():
            lines[label] = [(x, mean(r["detection_probability"] for r in rs), mean(r["mean_flipped"] for r in rs) / n,
                             mean(r.get("clean_accuracy") for r in rs)) for x, rs in sorted(by_x.items())]
    return lines


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
            tune = [r for r in mine if r.get("phase") != "prune" and number(r.get("epoch"))
                    and r["epoch"] == round(r["epoch"])]
            for metric, style in styles.items():
                if not any(number(r.get(metric)) for r in mine):
                    continue
                label = f"{target}: {METRIC_NAMES[metric]}"
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


def sweep_figures(results_list, out_dir, formats, dpi):
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
            paths += save_figure(sweep_figure(panels, xlabel, title), out_dir, name, formats, dpi)
    fig = fine_prune_figure(results_list)
    if fig is not None:
        paths += save_figure(fig, out_dir, "tamper_fine_prune", formats, dpi)
    return paths
