"""Tables for REPRODUCTION.md, computed from what scripts/reproduce.sh and scripts/recipe_table.sh wrote
(scripts/reproduction_tables.py prints and writes them): the match rate per epoch over seeds (``summary``), and
the classifier recipe x generator recipe table (``recipe-table``). Each returns (Markdown, its numbers).
"""
import glob
import os

from ..core.cli import UserError
from ..core.io import read_checkpoint, read_json, safe_torch_load
from ..tamper.records import read_results
from .statistics import mean_std

RECIPES = ("fast", "paper")


def per_epoch(results, field):
    """{epoch: [value of ``field`` at that epoch, one per seed]} over the whole-epoch records."""
    table = {}
    for run in results["runs"]:
        for record in run["records"]:
            if float(record["epoch"]).is_integer() and field in record:
                table.setdefault(int(record["epoch"]), []).append(record[field])
    return dict(sorted(table.items()))


def trajectory_rows(results):
    """Per epoch: the match rate, clean accuracy and (poisoning) attack success rate, mean and std over seeds."""
    fields = ("match_rate", "clean_accuracy", "attack_success_rate")
    columns = {field: per_epoch(results, field) for field in fields}
    rows = []
    for epoch, rates in columns["match_rate"].items():
        row = {"epoch": epoch, "seeds": len(rates)}
        for field in fields:
            row[field], row[field + "_std"] = mean_std(columns[field].get(epoch, []))
        rows.append(row)
    return rows


def first_detections(results):
    return [run.get("first_detection_step") for run in results["runs"]]


def fmt(mean, std, digits=3):
    return "-" if mean is None else f"{mean:.{digits}f} ± {std:.{digits}f}"


def summary(folder):
    """The paper's figure as a table: clean and poisoned fine-tuning, match rate per epoch over the seeds."""
    found = {attack: sorted(glob.glob(os.path.join(folder, f"*_paper_{attack}.json"))) for attack in ("finetune", "poison")}
    if not all(found.values()):
        raise UserError(f"{folder} lacks the merged finetune and poison results (run scripts/reproduce.sh)")
    results = {attack: read_results(paths[0]) for attack, paths in found.items()}
    rows = {attack: trajectory_rows(r) for attack, r in results.items()}
    lines = ["| epoch | match rate, clean fine-tuning | match rate, poisoned | clean accuracy (clean / poisoned) "
             "| attack success rate (poisoned) |", "|---:|---:|---:|---:|---:|"]
    for clean, poisoned in zip(rows["finetune"], rows["poison"]):
        lines.append(f"| {clean['epoch']} | {fmt(clean['match_rate'], clean['match_rate_std'])} "
                     f"| {fmt(poisoned['match_rate'], poisoned['match_rate_std'])} "
                     f"| {fmt(clean['clean_accuracy'], clean['clean_accuracy_std'], 4)} / "
                     f"{fmt(poisoned['clean_accuracy'], poisoned['clean_accuracy_std'], 4)} "
                     f"| {fmt(poisoned['attack_success_rate'], poisoned['attack_success_rate_std'])} |")
    detections = {attack: first_detections(r) for attack, r in results.items()}
    lines.append("")
    lines.append("First detection (fine-tuning step at which a trigger label first differs from the key), per seed: "
                 + "; ".join(f"{attack} {detections[attack]}" for attack in results))
    payload = {"rows": rows, "first_detection_step": detections,
               "seeds": results["finetune"]["settings"]["run"]["seeds"]}
    return "\n".join(lines), payload


def triggers_steps(folder):
    payload = safe_torch_load(os.path.join(folder, "triggers.pt"), "trigger file")
    return payload.get("steps")


def flipped_after_one_epoch(results_path):
    results = read_results(results_path)
    records = [r for r in results["runs"][0]["records"] if r["epoch"] == 1.0]
    return (records[-1]["flipped"] if records else None), results["num_triggers"]


def recipe_row(root, train_recipe, gen_recipe):
    folder = os.path.join(root, f"classifier-{train_recipe}")
    meta = read_checkpoint(os.path.join(folder, "resnet8_fashion-mnist.pt"))["meta"]
    triggers = os.path.join(folder, f"triggers-{gen_recipe}")
    flipped, n = flipped_after_one_epoch(
        os.path.join(folder, f"finetune-{gen_recipe}", "resnet8_fashion-mnist_paper_finetune.json"))
    wall = os.path.join(triggers, "wall_time.json")
    seconds = read_json(wall, "wall time file")["seconds"] if os.path.exists(wall) else None
    return {"classifier_recipe": train_recipe, "label_smoothing": meta["config"]["LABEL_SMOOTHING"],
            "test_accuracy": meta["test_accuracy"], "generator_recipe": gen_recipe,
            "generator_steps": triggers_steps(triggers), "generator_seconds": seconds,
            "flipped_after_one_epoch": flipped, "num_triggers": n}


def recipe_table(root):
    rows = [recipe_row(root, t, g) for t in RECIPES for g in RECIPES]
    lines = ["| classifier recipe | test accuracy | generator recipe | generator steps | generator wall time "
             "| triggers flipped after 1 epoch |", "|---|---:|---|---:|---:|---:|"]
    for r in rows:
        seconds = "-" if r["generator_seconds"] is None else f"{r['generator_seconds']} s"
        lines.append(f"| {r['classifier_recipe']} (label smoothing {r['label_smoothing']:g}) | {r['test_accuracy']:.4f} "
                     f"| {r['generator_recipe']} | {r['generator_steps']} | {seconds} "
                     f"| {r['flipped_after_one_epoch']} / {r['num_triggers']} |")
    return "\n".join(lines), {"rows": rows}


TABLES = {"summary": summary, "recipe-table": recipe_table}   # scripts/reproduction_tables.py
