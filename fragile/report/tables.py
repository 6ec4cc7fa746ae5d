"""The tamper suite's summary table: one row per attack setting, as markdown and CSV (``plot.py --table``).

A row is the final state of one setting: a sweep point (``setting`` label: ``sigma=1e-04``, ``k=10 (exponent)``)
or, for trajectories without one (``finetune``, ``poison``), the end of each phase. Several seeds are averaged.
``results_list`` is [(path, validated results dict), ...] throughout.
"""
import os

from ..core.io import atomic_write_text
from ..tamper.records import to_csv
from .statistics import fmt, mean, number
from .style import attack_rank

COLUMNS = ("model", "method", "attack", "setting", "triggers_flipped", "num_triggers", "detection_probability",
           "detected", "clean_accuracy", "queries_to_detection", "notes")


# ----------------------------------------------------------------------------- rows

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
    if record.get("setting") or not number(record.get("epoch")):
        return setting
    return f"{setting}, epoch {record['epoch']:g}"


def notes(records, runs):
    """Side measurements worth a glance: weights changed, ASR, robust watermark, pruning, first detection."""
    parts = []
    for key, text, template in (("weights_changed", "weights changed", "{:.0f}"),
                                ("pruned_channels", "channels pruned", "{:.0f}"),
                                ("attack_success_rate", "ASR", "{:.3f}"),
                                ("backdoor_accuracy", "robust wm acc", "{:.2f}"), ("trials", "trials", "{:.0f}")):
        value = mean(r.get(key) for r in records)
        if value is not None:
            parts.append(f"{text} {template.format(value)}")
    partly = [r for r in records if 0 < (r.get("detection_probability") or 0) < 1]
    missed = mean(r.get("clean_accuracy_missed") for r in partly)
    if missed is not None:  # the tampering that got through: what did it cost?
        parts.append(f"clean acc when missed {missed:.4f}")
    steps = [run.get("first_detection_step") for run in runs if "first_detection_step" in run]
    if steps and all(not r.get("setting") for r in records):
        found = [s for s in steps if number(s)]
        parts.append(f"first detected at step {mean(found):.0f}" + (f" ({len(found)}/{len(steps)} seeds)"
                                                                      if len(found) < len(steps) else "")
                     if found else "never detected")
    return "; ".join(parts)


def rows_of(path, results):
    """The summary rows of one results file."""
    n = results["num_triggers"]
    per_setting = {}
    for run in results["runs"]:
        for setting, record in final_records(run).items():
            per_setting.setdefault(setting, []).append(record)
    rows = []
    for setting, records in per_setting.items():
        flipped = mean(r["mean_flipped"] for r in records)
        probability = mean(r["detection_probability"] for r in records)
        queries = [r["mean_queries_to_detection"] for r in records]
        rows.append({"model": f"{results['arch']}/{results['dataset']}", "method": results["method"],
                     "attack": results["attack"], "setting": row_label(setting, records[-1]),
                     "triggers_flipped": flipped, "num_triggers": n, "detection_probability": probability,
                     "detected": probability >= 0.5, "clean_accuracy": mean(r.get("clean_accuracy") for r in records),
                     "queries_to_detection": mean(queries), "notes": notes(records, results["runs"])})
    return rows


def summary_rows(results_list):
    """Every row of every file, grouped by model and method, attacks in the suite's order."""
    ordered = sorted(results_list, key=lambda item: (item[1]["arch"], item[1]["dataset"], item[1]["method"],
                                                     attack_rank(item[1]["attack"]), item[0]))
    return [row for path, results in ordered for row in rows_of(path, results)]


# ----------------------------------------------------------------------------- table

def markdown_row(row):
    flipped = ("-" if row["triggers_flipped"] is None else f"{row['triggers_flipped']:.3g}") + f"/{row['num_triggers']}"
    detected = ("yes" if row["detected"] else "no") + (
        f" ({row['detection_probability']:.2f})" if 0 < row["detection_probability"] < 1 else "")
    cells = (row["model"], row["method"], row["attack"], row["setting"], flipped, detected,
             fmt(row["clean_accuracy"], ".4f"), fmt(row["queries_to_detection"], ".1f"), row["notes"] or "")
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
