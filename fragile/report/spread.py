"""The spread of the paper's headline number (triggers flipped by one epoch of fine-tuning) across independent
classifiers and trigger sets: where scripts/spread.py keeps each run, and the report it draws from them.

    OUT/<group>/seed<S>/<arch>_fashion-mnist.pt           classifier S of the group (train.py)
    OUT/<group>/seed<S>/train.json                        its wall time
    OUT/<group>/seed<S>/key<K>-<recipe>/triggers/         trigger set (generate_samples.py --key-seed K --recipe R)
    OUT/<group>/seed<S>/key<K>-<recipe>/key.json          its key
    OUT/<group>/seed<S>/key<K>-<recipe>/generate.json     its wall time
    OUT/<group>/seed<S>/key<K>-<recipe>/finetune/, poison/   one epoch of the paper's fine-tuning (eval.py)
"""
import os
import statistics
from dataclasses import dataclass

from ..core.cli import UserError, check_positive_int
from ..core.io import atomic_write_json, atomic_write_text, read_checkpoint, read_json, safe_torch_load
from ..tamper.records import read_results
from .style import apply_style, plt, save_figure

ATTACKS = ("finetune", "poison")
# Published fraction of ICIP triggers changed after the first round of clean fine-tuning (method.md, field.md):
# 0.40 MNIST / ResNet-18 and ~0.53 CIFAR-10 / ResNet-50 (the FTG paper's re-run of this method).
PUBLISHED_RANGE = (0.40, 0.53)


@dataclass(frozen=True)
class Group:
    """One classifier scale of the spread: its classifiers (seeds) and the trigger sets made for each."""
    name: str
    arch: str
    subset: int              # training images (class-balanced); the fine-tuning uses as many
    epochs: int
    seeds: list              # classifier seeds
    key_seeds: list
    paper_pairs: int         # the first this many (classifier, key) pairs also get the paper's generator
    test_subset: int = 0     # eval.py's clean-accuracy images (0: the whole test set)
    dataset: str = "fashion-mnist"

    def check(self):
        """One error line before any work for a group that cannot run."""
        flag = f"--{self.name}"
        if not self.seeds:
            raise UserError(f"{flag}-seeds is empty: give at least one classifier seed")
        if not self.key_seeds:
            raise UserError(f"the {self.name} group has no key seeds: give at least one")
        if len(set(self.seeds)) != len(self.seeds) or len(set(self.key_seeds)) != len(self.key_seeds):
            raise UserError(f"the {self.name} group repeats a seed: every classifier and key seed must be distinct")
        if min(self.seeds) < 0 or min(self.key_seeds) < 0:
            raise UserError(f"the {self.name} group's seeds must be 0 or more")
        check_positive_int(f"{flag}-subset (training images)", self.subset)
        check_positive_int(f"{flag}-epochs", self.epochs)
        if self.paper_pairs < 0 or self.test_subset < 0:
            raise UserError(f"{flag}-paper-pairs and the test subset must be 0 or more")

    def pairs(self):
        return [(s, k) for s in self.seeds for k in self.key_seeds]

    def units(self, seed):
        """(key seed, generator recipe) of classifier ``seed``: the fast generator for every key, the paper's
        for the group's first ``paper_pairs`` (classifier, key) pairs."""
        paper = set(self.pairs()[:self.paper_pairs])
        return [(k, r) for k in self.key_seeds for r in ("fast", "paper") if r == "fast" or (seed, k) in paper]

    # -- where each run lives
    def classifier_dir(self, out, seed):
        return os.path.join(out, self.name, f"seed{seed}")

    def model_path(self, out, seed):
        return os.path.join(self.classifier_dir(out, seed), f"{self.arch}_{self.dataset}.pt")

    def unit_dir(self, out, seed, key_seed, recipe):
        return os.path.join(self.classifier_dir(out, seed), f"key{key_seed}-{recipe}")

    def results_file(self, out, seed, key_seed, recipe, attack):
        return os.path.join(self.unit_dir(out, seed, key_seed, recipe), attack,
                            f"{self.arch}_{self.dataset}_paper_{attack}.json")


# ----------------------------------------------------------------------------- reading one unit

def _flipped_after(results_path, epoch):
    results = read_results(results_path)
    records = [r for r in results["runs"][0]["records"] if r["epoch"] == float(epoch)]
    run = results["runs"][0]
    return (records[-1]["flipped"] if records else None), results["num_triggers"], run.get("first_detection_step"), \
        results["wall_time_s"]


def _seconds(path):
    return read_json(path, "wall time file")["seconds"] if os.path.exists(path) else None


def unit_row(group, out, seed, key_seed, recipe, finetune_epochs):
    """What one (classifier, key, generator) unit measured, or None if it has not finished."""
    paths = {a: group.results_file(out, seed, key_seed, recipe, a) for a in ATTACKS}
    if not all(os.path.exists(p) for p in paths.values()):
        return None
    meta = read_checkpoint(group.model_path(out, seed))["meta"]
    unit = group.unit_dir(out, seed, key_seed, recipe)
    trigger_file = safe_torch_load(os.path.join(unit, "triggers", "triggers.pt"), "trigger file")
    row = {"group": group.name, "arch": group.arch, "classifier_seed": seed, "key_seed": key_seed,
           "generator_recipe": recipe, "test_accuracy": meta["test_accuracy"],
           "weights_sha256": meta["weights_sha256"], "threads": meta.get("threads"),
           "train_seconds": _seconds(os.path.join(group.classifier_dir(out, seed), "train.json")),
           "generator_steps": trigger_file.get("steps"),
           "generator_seconds": _seconds(os.path.join(unit, "generate.json"))}
    for attack, path in paths.items():
        flipped, n, first, seconds = _flipped_after(path, finetune_epochs)
        row.update({f"{attack}_flipped": flipped, f"{attack}_first_detection_step": first,
                    f"{attack}_seconds": seconds, "num_triggers": n})
    return row


# ----------------------------------------------------------------------------- the report

def describe(values):
    """n, mean, sample std, min and max of the numbers (None entries left out); all None when there are none."""
    values = [v for v in values if v is not None]
    if not values:
        return {"n": 0, "mean": None, "std": None, "min": None, "max": None}
    return {"n": len(values), "mean": statistics.fmean(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0, "min": min(values), "max": max(values)}


def settings(groups):
    """(group, generator recipe) in the report's order, for the recipes any unit of the group uses."""
    return [(g, r) for g in groups for r in ("fast", "paper") if any(r in {u[1] for u in g.units(s)} for s in g.seeds)]


def summarize(rows, groups):
    """Per (group, generator recipe): the flips of each attack and the classifiers' test accuracy, described."""
    table = []
    for group, recipe in settings(groups):
        mine = [r for r in rows if r["group"] == group.name and r["generator_recipe"] == recipe]
        expected = sum(1 for s in group.seeds for u in group.units(s) if u[1] == recipe)
        entry = {"group": group.name, "arch": group.arch, "subset": group.subset, "epochs": group.epochs,
                 "generator_recipe": recipe, "units_done": len(mine), "units_expected": expected,
                 "classifiers": len({r["classifier_seed"] for r in mine}),
                 "test_accuracy": describe([r["test_accuracy"] for r in mine])}
        for attack in ATTACKS:
            entry[f"{attack}_flipped"] = describe([r[f"{attack}_flipped"] for r in mine])
            entry[f"{attack}_first_detection_step"] = describe([r[f"{attack}_first_detection_step"] for r in mine])
        table.append(entry)
    return table


def _cell(stats, digits=1):
    if not stats["n"]:
        return "-"
    return (f"{stats['mean']:.{digits}f} ± {stats['std']:.{digits}f} "
            f"({stats['min']:g}-{stats['max']:g})")


def markdown(summary, num_triggers):
    lines = [f"| classifiers | generator | units | test accuracy | clean fine-tuning: flipped / {num_triggers} "
             f"(mean ± std, min-max) | poisoned: flipped / {num_triggers} |", "|---|---|---:|---:|---:|---:|"]
    for e in summary:
        lines.append(f"| {e['group']}: {e['arch']}, {e['subset']} images, {e['epochs']} epochs, "
                     f"{e['classifiers']} seeds | {e['generator_recipe']} | {e['units_done']}/{e['units_expected']} "
                     f"| {_cell(e['test_accuracy'], 4)} | {_cell(e['finetune_flipped'])} "
                     f"| {_cell(e['poison_flipped'])} |")
    return "\n".join(lines)


def figure(rows, summary, num_triggers, finetune_epochs):
    """Flips per unit (one dot each) for every setting, clean and poisoned side by side, beside the published range
    of clean fine-tuning."""
    fig, ax = plt.subplots(figsize=(max(5.0, 1.3 * len(summary) + 2), 3.6))
    ax.grid(axis="x", visible=False)
    low, high = (num_triggers * x for x in PUBLISHED_RANGE)
    ax.axhspan(low, high, color="tab:gray", alpha=0.2, lw=0,
               label=f"published, clean fine-tuning ({PUBLISHED_RANGE[0]:.0%}-{PUBLISHED_RANGE[1]:.0%})")
    for i, e in enumerate(summary):
        mine = [r for r in rows if r["group"] == e["group"] and r["generator_recipe"] == e["generator_recipe"]]
        for offset, attack, color, marker in ((-0.15, "finetune", "tab:blue", "o"), (0.15, "poison", "tab:red", "s")):
            ys = [r[f"{attack}_flipped"] for r in mine if r[f"{attack}_flipped"] is not None]
            xs = [i + offset + 0.04 * (j % 3 - 1) for j in range(len(ys))]
            label = ("clean fine-tuning" if attack == "finetune" else "poisoned (BadNets)") if i == 0 else None
            ax.scatter(xs, ys, color=color, marker=marker, s=18, alpha=0.8, label=label)
            if ys:
                ax.hlines(statistics.fmean(ys), i + offset - 0.1, i + offset + 0.1, color=color, lw=2)
    ax.set_xticks(range(len(summary)))
    ax.set_xticklabels([f"{e['group']}\n{e['arch']}, {e['generator_recipe']} gen.\n"
                        f"n={e['units_done']}" for e in summary], fontsize=7.5)
    ax.set_ylabel(f"triggers flipped after {finetune_epochs} epoch(s), of {num_triggers}")
    ax.set_ylim(0, num_triggers)
    ax.legend(loc="upper left", fontsize=7)
    ax.set_title("flips per (classifier seed, key seed); bar: mean")
    return fig


def write_report(out, groups, threads, finetune_epochs=1):
    """spread.json, spread.md and spread.png in ``out`` from every finished unit; ``complete`` says whether every
    unit of the chosen groups has finished."""
    rows = [row for g in groups for s in g.seeds for k, r in g.units(s)
            if (row := unit_row(g, out, s, k, r, finetune_epochs)) is not None]
    summary = summarize(rows, groups)
    num_triggers = rows[0]["num_triggers"] if rows else 100
    complete = all(e["units_done"] == e["units_expected"] for e in summary)
    text = markdown(summary, num_triggers)
    payload = {"complete": complete, "threads_per_process": threads, "finetune_epochs": finetune_epochs,
               "published_clean_range": list(PUBLISHED_RANGE), "summary": summary, "units": rows}
    os.makedirs(out, exist_ok=True)
    atomic_write_json(payload, os.path.join(out, "spread.json"))
    atomic_write_text(text + "\n", os.path.join(out, "spread.md"))
    if rows:
        apply_style()
        save_figure(figure(rows, summary, num_triggers, finetune_epochs), out, "spread", ["png"], 150)
    return {"complete": complete, "markdown": text, "rows": rows, "summary": summary}
