"""Fine-tuning trajectories as the figures draw them: results files grouped per model and trigger method,
records at whole epochs or at steps, and their mean and std over seeds."""
import os
from dataclasses import dataclass

import numpy as np

from .statistics import number
from .style import ATTACK_COLORS, ATTACK_MARKERS, ATTACK_NAMES, SPARE_COLORS, attack_rank


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


def is_trajectory(results):
    """Fine-tuning-like runs (finetune, poison, fine-prune, restore...): every record has a step and an epoch."""
    records = [r for run in results["runs"] for r in run["records"]]
    return bool(records) and all(number(r.get("epoch")) and number(r.get("step")) for r in records)


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
            if number(record.get(metric)):
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
    found = [s for s in steps if number(s)]
    if not found:
        return None, 0.0, 0, len(steps)
    return float(np.mean(found)), float(np.std(found, ddof=1)) if len(found) > 1 else 0.0, len(found), len(steps)


def trajectory_groups(results_list):
    """{(arch, dataset, method): [Entry, ...]} of the fine-tuning-like files; other attacks get a note."""
    groups = {}
    for path, results in results_list:
        if not is_trajectory(results):
            print(f"note: {path} (attack {results['attack']}): not every record has a step and an epoch, "
                  f"so no trajectory figures for it (--table draws sweeps)")
            continue
        groups.setdefault((results["arch"], results["dataset"], results["method"]), []).append((path, results))
    colors = iter(SPARE_COLORS * 8)
    spare = {}
    out = {}
    for key in sorted(groups):
        files = sorted(groups[key], key=lambda f: (attack_rank(f[1]["attack"]), f[0]))
        attacks = [r["attack"] for _, r in files]
        entries = []
        for index, (path, results) in enumerate(files):
            attack = results["attack"]
            label = ATTACK_NAMES.get(attack, attack)
            if attacks.count(attack) > 1:
                label += f" [{os.path.basename(path)}]"
            color = ATTACK_COLORS.get(attack) or spare.setdefault(attack, next(colors))
            entries.append(Entry(path, results, label, color, ATTACK_MARKERS.get(attack, "v"),
                                 width=max(1.0, 2.6 - 0.6 * index)))
        out[key] = entries
    return out


def figure_name(key, kind):
    return "_".join(str(part).replace(os.sep, "-") for part in (*key, kind))
