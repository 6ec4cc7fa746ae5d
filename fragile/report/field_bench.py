"""The field bench's report: the cells merged, each method's decision threshold calibrated on its benign runs, and
per method x modification the metrics the field reports (scripts/field_bench.py writes the cells).

    OUT/prepared.json                       the model's and trigger sets' hashes, generation times, benign runs
    OUT/cells/<modification>/trial<T>.json  one modification at seed T, every method verified on the same copy
    OUT/bench.json, bench.md, bench.png     this module's output

Detection at a fixed false-positive rate. A verifier declares "tampered" when more than t triggers are off their
key. For a target FPR alpha, t is the smallest count such that at most floor(alpha x n) of the method's n benign
runs exceed it: zero false alarms over the runs when alpha x n < 1, in which case the runs only show
FPR <= 1/n, so ``fpr_resolved`` records whether n >= 1/alpha. TPR is then the fraction of the trials (where the
modification changed the model at all) with more than t triggers off their key.
"""
import math
import os
import statistics

import torch

from ..core.cli import UserError
from ..core.io import atomic_write_json, atomic_write_text, read_json
from ..tamper.field_bench import seeded
from ..watermark.queries import queries_to_detection
from .style import apply_style, plt, save_figure


# ----------------------------------------------------------------------------- merging cells

def first_difference(a, b, path=""):
    """The first key path where two settings records differ ("" when equal)."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            found = first_difference(a.get(key), b.get(key), f"{path}.{key}" if path else key)
            if found:
                return found
        return ""
    return "" if a == b else (path or "(the whole record)")


def check_same(expected, got, what, where):
    """One error line when a record made elsewhere disagrees with this run on ``what``."""
    key = first_difference(expected, got)
    if key:
        raise UserError(f"{where} was made with other settings ({what}: {key} differs): merge only cells of one "
                        f"bench, or remake them with --overwrite")


def cell_done(path, settings, overwrite):
    """True when the cell at ``path`` exists with these settings; refused when it holds others (unless
    ``overwrite``, which remakes it)."""
    if not os.path.exists(path):
        return False
    cell = read_json(path, "bench cell")
    if first_difference(cell.get("settings"), settings):
        if overwrite:
            return False
        check_same(settings, cell.get("settings"), "settings", path)
    return True


def prepared_hashes(prepared):
    """The model and trigger-set hashes the prepare stage recorded (every cell must carry the same)."""
    return {"model_sha256": prepared["model_sha256"],
            "triggers_sha256": {m: p["triggers_sha256"] for m, p in prepared["methods"].items()}}


def read_cells(grid, cell_path, prepared):
    """The cells of ``grid`` that exist, all made on the prepared model and trigger sets and with one settings
    record (else one error line naming the file and what differs)."""
    cells, reference = [], None
    for modification, trial in grid:
        path = cell_path(modification, trial)
        if not os.path.exists(path):
            continue
        cell = read_json(path, "bench cell")
        settings = cell.get("settings") or {}
        check_same(prepared_hashes(prepared), {k: settings.get(k) for k in ("model_sha256", "triggers_sha256")},
                   "the prepared model and trigger sets", path)
        if reference is None:
            reference = (settings, path)
        else:
            check_same(reference[0], settings, f"settings of {reference[1]}", path)
        cells.append(cell)
    return cells


# ----------------------------------------------------------------------------- thresholds and metrics

def decision_threshold(benign_flips, fpr):
    """The fewest mismatches t a verifier may tolerate so that at most floor(fpr x n) benign runs exceed t."""
    allowed = math.floor(fpr * len(benign_flips) + 1e-9)
    ranked = sorted(benign_flips, reverse=True)
    return ranked[allowed] if allowed < len(ranked) else 0


def calibration(method, fprs):
    """Per target FPR: the threshold, the benign runs it rests on, and whether their count resolves that FPR."""
    flips = [r["flipped"] for r in method["benign_runs"]]
    thresholds = {fpr: decision_threshold(flips, fpr) for fpr in fprs}
    return {f"{fpr:g}": {"threshold": t, "benign_runs": len(flips), "benign_false_alarms": sum(f > t for f in flips),
                         "fpr_resolved": len(flips) >= 1 / fpr}
            for fpr, t in thresholds.items()}


def mean_or_none(values):
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None


def queries(flipped, n, order, threshold):
    """Single queries, asked in ``order``, until more than ``threshold`` mismatches are seen (None: never)."""
    mask = torch.zeros(n, dtype=torch.bool)
    mask[list(flipped)] = True
    return queries_to_detection(mask, order, threshold)


def method_metrics(name, method, cells, fprs, calibrated):
    """Detection, TPR at each FPR, flip fraction and queries to detection of one method over one modification's
    cells (those that changed the model)."""
    n = method["num_triggers"]
    strict = calibrated[f"{min(fprs):g}"]["threshold"]
    recorded = method.get("query_order") or list(range(n))
    flips = [c["methods"][name]["flipped"] for c in cells]
    random_orders = [torch.randperm(n, generator=seeded("query order", name, c["modification"], c["trial"]))
                     for c in cells]
    return {"detection_rate": statistics.fmean(len(f) > 0 for f in flips),
            **{f"tpr_at_fpr_{fpr:g}": statistics.fmean(len(f) > calibrated[f"{fpr:g}"]["threshold"] for f in flips)
               for fpr in fprs},
            "flip_fraction": statistics.fmean(len(f) / n for f in flips),
            "queries_recorded_order": mean_or_none([queries(f, n, recorded, strict) for f in flips]),
            "queries_random_order": mean_or_none([queries(f, n, o, strict) for f, o in zip(flips, random_orders)]),
            "trials": len(flips)}


def modification_summary(cells):
    changed = [c for c in cells if c["model_changed"]]
    spread = lambda xs: {"mean": mean_or_none(xs), "std": statistics.pstdev(xs) if len(xs) > 1 else 0.0}  # noqa: E731
    return {"trials": len(cells), "changed": len(changed),
            "distinct_models": len({c["tampered_sha256"] for c in cells}),
            "clean_accuracy": spread([c["clean_accuracy"] for c in cells]),
            "attack_success": spread([c["attack_success"] for c in cells if c["attack_success"] is not None])
            if any(c["attack_success"] is not None for c in cells) else None,
            "seconds": sum(c["seconds"] for c in cells)}


def bench_record(prepared, grid, cells, fprs):
    """The whole bench as one record: per method its cost and thresholds, per modification its effect, and the
    metrics of every (method, modification) pair."""
    methods = {m: {"num_triggers": p["num_triggers"], "generation_seconds": p["generation_seconds"],
                   "queries_per_verification": p["num_triggers"], "envelope": p["envelope"],
                   "calibration": calibration(p, fprs), "benign_run_names": [r["name"] for r in p["benign_runs"]]}
               for m, p in prepared["methods"].items()}
    by_modification = {}
    for c in cells:
        by_modification.setdefault(c["modification"], []).append(c)
    modifications, table = {}, []
    for modification in dict.fromkeys(m for m, _ in grid):
        mine = by_modification.get(modification, [])
        modifications[modification] = modification_summary(mine) if mine else None
        changed = [c for c in mine if c["model_changed"]]
        for m in methods:
            row = {"method": m, "modification": modification}
            if not mine:
                row["status"] = "not run"
            elif not changed:
                row["status"] = "no change"   # the strength left the model as it was: never a miss
            else:
                row.update(status="measured", **method_metrics(m, prepared["methods"][m], changed, fprs,
                                                               methods[m]["calibration"]))
            table.append(row)
    done = {(c["modification"], c["trial"]) for c in cells}
    missing = [f"{m} trial {t}" for m, t in grid if (m, t) not in done]
    return {"model": prepared["model"], "model_sha256": prepared["model_sha256"], "dataset": prepared["dataset"],
            "arch": prepared["arch"], "fpr_targets": list(fprs), "complete": not missing, "missing": missing,
            "compute": compute(prepared, cells), "methods": methods, "modifications": modifications, "table": table}


def compute(prepared, cells):
    """What the bench cost, in process seconds per stage (shards run at once overlap in wall time, so the wall
    time end to end is measured outside); the classifier's training is None when it was given, not trained."""
    parts = {"train_seconds": prepared.get("train_seconds"),
             "generation_seconds": sum(p["generation_seconds"] for p in prepared["methods"].values()),
             "calibration_seconds": prepared.get("calibration_seconds"),
             "cell_seconds": sum(c["seconds"] for c in cells)}
    return {**parts, "total_seconds": sum(v for v in parts.values() if v is not None)}


# ----------------------------------------------------------------------------- markdown and heatmap

def fmt(value, digits=2):
    return "-" if value is None else f"{value:.{digits}f}"


def cell_text(row, fpr):
    if row["status"] != "measured":
        return row["status"]
    return f"{row[f'tpr_at_fpr_{fpr:g}']:.2f} ({row['flip_fraction']:.2f})"


def markdown(bench):
    fpr = min(bench["fpr_targets"])
    methods = list(bench["methods"])
    rows = {(r["method"], r["modification"]): r for r in bench["table"]}
    lines = [f"# Field bench: {bench['arch']} on {bench['dataset']}", "",
             f"TPR at FPR {fpr:g} (mean fraction of triggers flipped), per modification and trigger method." +
             ("" if bench["complete"] else f" **Incomplete: {len(bench['missing'])} cells missing.**"), "",
             "| modification | " + " | ".join(methods) + " | clean acc | attack success | trials (changed) |",
             "|---" * (len(methods) + 4) + "|"]
    for modification, summary in bench["modifications"].items():
        if summary is None:
            continue
        success = summary["attack_success"]
        lines.append(f"| {modification} | " + " | ".join(cell_text(rows[(m, modification)], fpr) for m in methods)
                     + f" | {fmt(summary['clean_accuracy']['mean'], 4)} | "
                     + f"{fmt(success['mean'] if success else None)} | {summary['trials']} ({summary['changed']}) |")
    lines += ["", "| method | triggers (queries per verification) | generation s | "
              + " | ".join(f"threshold at FPR {f:g} (benign runs)" for f in bench["fpr_targets"]) + " |",
              "|---" * (3 + len(bench["fpr_targets"])) + "|"]
    for m, info in bench["methods"].items():
        cal = info["calibration"]
        lines.append(f"| {m} | {info['num_triggers']} | {info['generation_seconds']:.0f} | " + " | ".join(
            f"{cal[f'{f:g}']['threshold']} ({cal[f'{f:g}']['benign_runs']}"
            + ("" if cal[f"{f:g}"]["fpr_resolved"] else ", FPR not resolved") + ")" for f in bench["fpr_targets"]) + " |")
    lines += ["", "Compute, in process seconds (one thread each): " + ", ".join(
        f"{part.removesuffix('_seconds')} {fmt(seconds, 0)}" for part, seconds in bench["compute"].items())]
    missed = uncaught(bench, fpr)
    lines += ["", "Caught by no method at this FPR (TPR below 0.5 for every method): " + (", ".join(missed) or "none")]
    return "\n".join(lines) + "\n"


def uncaught(bench, fpr):
    """The modifications every method detects in fewer than half of the trials, at FPR ``fpr``."""
    out = []
    for modification in bench["modifications"]:
        rows = [r for r in bench["table"] if r["modification"] == modification and r["status"] == "measured"]
        if rows and all(r[f"tpr_at_fpr_{fpr:g}"] < 0.5 for r in rows):
            out.append(modification)
    return out


def heatmap(bench, out_dir):
    """Method x modification, TPR at the strictest FPR, annotated; grey where nothing changed or nothing ran."""
    apply_style()
    fpr = min(bench["fpr_targets"])
    methods, modifications = list(bench["methods"]), list(bench["modifications"])
    rows = {(r["method"], r["modification"]): r for r in bench["table"]}
    values = torch.full((len(methods), len(modifications)), float("nan"))
    for i, m in enumerate(methods):
        for j, mod in enumerate(modifications):
            if rows[(m, mod)]["status"] == "measured":
                values[i, j] = rows[(m, mod)][f"tpr_at_fpr_{fpr:g}"]
    fig, ax = plt.subplots(figsize=(1.0 + 0.55 * len(modifications), 1.2 + 0.45 * len(methods)))
    ax.imshow(values.numpy(), vmin=0, vmax=1, cmap="viridis", aspect="auto")
    for i in range(len(methods)):
        for j in range(len(modifications)):
            v = values[i, j].item()
            ax.text(j, i, "-" if math.isnan(v) else f"{v:.1f}", ha="center", va="center", fontsize=7,
                    color="black" if not math.isnan(v) and v > 0.6 else "white")
    ax.set_xticks(range(len(modifications)), modifications, rotation=60, ha="right")
    ax.set_yticks(range(len(methods)), methods)
    ax.set_title(f"TPR at FPR {fpr:g}: {bench['arch']} on {bench['dataset']}")
    return save_figure(fig, out_dir, "bench", ["png"], 150)


def write_report(out, prepared, grid, cell_path, fprs):
    """Merge the cells, write OUT/bench.json, bench.md and bench.png; returns the record with its markdown."""
    bench = bench_record(prepared, grid, read_cells(grid, cell_path, prepared), fprs)
    text = markdown(bench)
    atomic_write_json(bench, os.path.join(out, "bench.json"))
    atomic_write_text(text, os.path.join(out, "bench.md"))
    heatmap(bench, out)
    return {**bench, "markdown": text}
