"""The one record module: every results record is built here, with one spelling of every key, and every
results file is read back through here (files of the previous schema are upgraded as they are read).

A results file (one per model, trigger method and attack: ``<arch>_<dataset>_<method>_<attack>.json`` and a
flat CSV beside it) holds ``runs``, one per seed, each with ``records``: one per measurement point. Every
record carries the watermark's verdict under the same keys, whatever made it:

    flipped                    triggers off their key (a sweep point's mean, rounded)
    match_rate                 1 - flipped / triggers
    detected                   flipped > the verification tolerance (a sweep point: in most trials)
    mean_flipped               the exact mean over trials (= flipped for a single measurement)
    detection_probability      the fraction of trials detected (0 or 1 for a single measurement)
    mean_queries_to_detection  single queries, in random order, until a mismatch is seen (None: never)

and its coordinates: ``step``/``epoch``/``phase`` on a trajectory, ``setting`` (a label) plus the swept
value on a sweep, ``attack`` in a comparison row, ``kind`` in the benign matrix. The settings of the run
are recorded under the parameter objects' own field names (``settings``); ``config`` keeps the command's
flags as typed, for provenance only: library code never reads it.
"""
import csv
import dataclasses
import fcntl
import hashlib
import io
import json
import os
import tempfile

from ..core.cli import UserError
from ..core.io import atomic_write_json, atomic_write_text
from ..watermark.queries import expected_queries

SCHEMA = "fragile-wm-results/2"
PREVIOUS_SCHEMA = "fragile-wm-results/1"   # read, upgraded on the fly (upgrade_previous)
REQUIRED_KEYS = ("schema", "attack", "arch", "dataset", "method", "num_triggers", "settings", "config", "versions",
                 "device", "wall_time_s", "runs")
VERDICT_KEYS = ("flipped", "match_rate", "detected", "mean_flipped", "detection_probability",
                "mean_queries_to_detection")


# ----------------------------------------------------------------------------- records

def verdict(flipped, num_triggers, max_mismatches):
    """The verdict keys of one measurement: ``flipped`` of ``num_triggers`` triggers off their key, detected
    beyond ``max_mismatches``; the expected single queries to a mismatch, the triggers asked in random order."""
    detected = flipped > max_mismatches
    return {"flipped": flipped, "match_rate": 1 - flipped / num_triggers, "detected": detected,
            "mean_flipped": float(flipped), "detection_probability": float(detected),
            "mean_queries_to_detection": expected_queries(flipped, num_triggers, max_mismatches)}


def step_record(step, epoch, phase, state, clean_accuracy, **metrics):
    """A trajectory's point (fine-tuning, poisoning, restore, fine-pruning's fine-tuning): after ``step``
    optimizer steps, ``epoch`` (fractional inside the first), in ``phase``; ``metrics``: attack success
    rate, the robust watermark's accuracy."""
    return {"step": step, "epoch": epoch, **state, "clean_accuracy": clean_accuracy, **metrics, "phase": phase}


def point_record(setting, state, clean_accuracy, **coords):
    """A deterministic sweep point (pruning ratio, quantization mode, obfuscated weights, pruned channels)."""
    return {"setting": setting, **coords, **state, "clean_accuracy": clean_accuracy}


def trials_record(setting, outcomes, num_triggers, coords):
    """A random sweep point from its independent trials (``outcomes``: flipped, queries and, for some,
    clean_accuracy). ``detected`` is the majority verdict, ``flipped`` the mean rounded; clean accuracy is kept
    apart for detected and missed trials (a missed tampering that costs accuracy is the one that matters), and
    ``clean_accuracy`` weighs the two by the detection probability."""
    trials = len(outcomes)
    flips = [o["flipped"] for o in outcomes]
    queries = [o["queries"] for o in outcomes]
    found = [q for q in queries if q is not None]
    mean_flipped = sum(flips) / trials
    probability = len(found) / trials
    caught = _mean_or_none([o["clean_accuracy"] for o in outcomes if "clean_accuracy" in o and o["queries"] is not None])
    missed = _mean_or_none([o["clean_accuracy"] for o in outcomes if "clean_accuracy" in o and o["queries"] is None])
    parts = [(w, a) for w, a in ((probability, caught), (1 - probability, missed)) if w > 0 and a is not None]
    clean = sum(w * a for w, a in parts) / sum(w for w, _ in parts) if parts else None
    return {"setting": setting, **coords, "flipped": int(round(mean_flipped)),
            "match_rate": 1 - mean_flipped / num_triggers, "detected": probability >= 0.5,
            "detection_probability": probability, "mean_flipped": mean_flipped, "max_flipped": max(flips),
            "mean_queries_to_detection": _mean_or_none(found), "clean_accuracy": clean,
            "clean_accuracy_detected": caught, "clean_accuracy_missed": missed, "trials": trials,
            "flipped_per_trial": flips, "queries_per_trial": queries}


def comparison_record(attack, setting, state, **extra):
    """A row of the method comparison: ``attack`` is the tamper suite's name for it (``single-weight``)."""
    return {"attack": attack, "setting": setting, **state, **extra}


def benign_record(setting, kind, entry, state, **measured):
    """A setting of the benign matrix: ``detected`` there is a false alarm. ``kind`` protocol: a setting the
    verifier must tolerate; raw: information, never a verdict (its ``detected`` is False)."""
    return {"setting": setting, "kind": kind, "envelope_entry": entry, **state, **measured}


def run_record(seed, records, **summary):
    """One seed's run: its records and what the attack summarizes over them."""
    return {"seed": seed, "records": records, **summary}


def settings_record(run, **params):
    """A run's settings under the parameter objects' own field names: ``run`` (what every attack shares) and
    one entry per parameter object (a dataclass, or None when the attack has none)."""
    return {"run": dict(run), **{name: dataclasses.asdict(p) if dataclasses.is_dataclass(p) else p
                                 for name, p in params.items()}}


def _mean_or_none(values):
    return sum(values) / len(values) if values else None


# ----------------------------------------------------------------------------- files

def results_path(folder, model_meta, method, attack):
    return os.path.join(folder, f"{model_meta['arch']}_{model_meta['dataset']}_{method}_{attack}.json")


_claimed = []   # lock files held until the process exits


def claim_results(path, overwrite):
    """Make ``path`` this process's to write, before any work: refused while another run writes it (an exclusive
    lock, held until this process ends however it ends, on a file in the system's temporary folder named by the
    results file's absolute path, so results folders hold results only) and when a results file is already
    there, unless ``overwrite``."""
    absolute = os.path.abspath(path)
    name = hashlib.sha256(absolute.encode()).hexdigest()[:24]
    handle = open(os.path.join(tempfile.gettempdir(), f"fragile-wm-results-{name}.lock"), "a")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise UserError(f"another run is writing {path} right now: wait for it to finish, or pass --results-dir "
                        f"elsewhere") from None
    _claimed.append(handle)
    if os.path.exists(path) and not overwrite:
        raise UserError(f"results file {path} exists: pass --overwrite to replace it, or --results-dir elsewhere")
    return path


def records_table(results):
    """Every record of every run as flat rows (seed first), for CSV and tables."""
    rows = []
    for run in results["runs"]:
        for record in run["records"]:
            rows.append({"seed": run["seed"], **{k: v for k, v in record.items() if not isinstance(v, (dict, list))}})
    return rows


def to_csv(rows):
    columns = list(dict.fromkeys(k for row in rows for k in row))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def results_record(attack, method, model_path, model_meta, watermark_meta, num_triggers, settings, config, versions,
                   device, world_size, wall_time_s, runs):
    """A whole results file (eval.py writes one per run of an attack over its seeds)."""
    return {"schema": SCHEMA, "attack": attack, "model": model_path, "arch": model_meta["arch"],
            "dataset": model_meta["dataset"], "method": method, "envelope": watermark_meta.get("envelope", ["exact"]),
            "deployments": watermark_meta.get("deployments"),
            "weights_sha256": model_meta["weights_sha256"], "num_triggers": num_triggers, "settings": settings,
            "config": config, "versions": versions, "device": device, "world_size": world_size,
            "wall_time_s": wall_time_s, "runs": runs}


def write_results(results, path):
    """JSON and CSV side by side; a rerun replaces both."""
    validate(results, path)
    atomic_write_json(results, path)
    atomic_write_text(to_csv(records_table(results)), path[:-5] + ".csv")


def validate(results, path):
    """One clear error naming what is wrong with a results file (of this schema)."""
    if not isinstance(results, dict):
        raise UserError(f"results file {path} is malformed: expected a JSON object")
    if results.get("schema") != SCHEMA:
        raise UserError(f"results file {path} is not a {SCHEMA} file")
    missing = [k for k in REQUIRED_KEYS if k not in results]
    if missing:
        raise UserError(f"results file {path} is malformed: missing {', '.join(missing)}")
    if not isinstance(results["runs"], list):
        raise UserError(f"results file {path} is malformed: runs must be a list")
    for run in results["runs"]:
        if not isinstance(run, dict) or not isinstance(run.get("records"), list) or "seed" not in run:
            raise UserError(f"results file {path} is malformed: every run needs seed and records")
        for record in run["records"]:
            absent = [k for k in VERDICT_KEYS if not isinstance(record, dict) or k not in record]
            if absent:
                raise UserError(f"results file {path} is malformed: a record lacks {', '.join(absent)}")
    return results


def read_results(path):
    """A results file of this schema, or of the previous one upgraded (upgrade_previous), validated."""
    try:
        with open(path) as f:
            results = json.load(f)
    except OSError as e:
        raise UserError(f"cannot read results file {path}: {e.strerror}") from None
    except (ValueError, RecursionError) as e:
        raise UserError(f"results file {path} is not valid JSON: {e}") from None
    if isinstance(results, dict) and results.get("schema") == PREVIOUS_SCHEMA:
        results = upgrade_previous(results, path)
    return validate(results, path)


# ----------------------------------------------------------------------------- the previous schema

# Schema 1 spelled the same things several ways: a comparison's single-weight rows were "single_weight" and
# counted "queries_to_detection"; trajectories and the benign matrix had no mean_flipped, detection_probability
# or mean_queries_to_detection; the settings were only the script's flags.
PREVIOUS_ATTACK_NAMES = {"single_weight": "single-weight"}
PREVIOUS_RUN_SETTINGS = {"seeds": "SEEDS", "max_mismatches": "MAX_MISMATCHES", "triggers": "TRIGGERS", "key": "KEY"}


def upgrade_previous(results, path):
    """A schema-1 results file in schema 2: every record given the verdict keys it lacked (computed exactly
    as schema 2 computes them), comparison rows renamed, and the run settings the reports read lifted out of
    the recorded flags. Nothing else changes."""
    config = results.get("config")
    if not isinstance(config, dict) or not isinstance(results.get("runs"), list) or \
            not isinstance(results.get("num_triggers"), int) or results["num_triggers"] < 1:
        raise UserError(f"results file {path} is malformed: a {PREVIOUS_SCHEMA} file needs config, num_triggers "
                        f"and runs")
    run_settings = {field: config[flag] for field, flag in PREVIOUS_RUN_SETTINGS.items() if flag in config}
    n, tolerance = results["num_triggers"], run_settings.get("max_mismatches") or 0
    for run in results["runs"]:
        for record in (run.get("records") or []) if isinstance(run, dict) else []:
            if not isinstance(record, dict) or "flipped" not in record or "detected" not in record:
                continue   # validate names what is missing
            if "queries_to_detection" in record:
                record["mean_queries_to_detection"] = record.pop("queries_to_detection")
            if record.get("attack") in PREVIOUS_ATTACK_NAMES:
                record["attack"] = PREVIOUS_ATTACK_NAMES[record["attack"]]
            record.setdefault("mean_flipped", float(record["flipped"]))
            record.setdefault("detection_probability", float(bool(record["detected"])))
            record.setdefault("mean_queries_to_detection", expected_queries(record["flipped"], n, tolerance))
    return {**results, "schema": SCHEMA, "settings": {"run": run_settings}}


# ----------------------------------------------------------------------------- merging per-seed files

def merge_results(paths, out):
    """One results file holding the runs of several files of the same experiment (one seed each, run
    separately so that an interrupted reproduction resumes per seed). Their settings must agree apart from
    the seeds; the wall time is the sum."""
    parts = [read_results(p) for p in paths]
    if not parts:
        raise UserError("nothing to merge")
    first = parts[0]
    for path, part in zip(paths[1:], parts[1:]):
        for key in ("attack", "arch", "dataset", "method", "weights_sha256"):
            if part.get(key) != first.get(key):
                raise UserError(f"cannot merge {path}: its {key} {part.get(key)!r} differs from {first.get(key)!r}")
        a, b = (_without_seeds(p["settings"]) for p in (first, part))
        if a != b:
            changed = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
            raise UserError(f"cannot merge {path}: its settings differ ({', '.join(changed)})")
    runs = sorted((run for part in parts for run in part["runs"]), key=lambda run: run["seed"])
    seeds = [run["seed"] for run in runs]
    merged = dict(first, runs=runs, wall_time_s=round(sum(p["wall_time_s"] for p in parts), 2),
                  settings={**first["settings"], "run": {**first["settings"]["run"], "seeds": seeds}})
    write_results(merged, out)
    return merged


def _without_seeds(settings):
    """The settings as (section.field -> value), seeds left out: the one setting merged parts differ in."""
    flat = {}
    for section, values in settings.items():
        for name, value in (values.items() if isinstance(values, dict) else [("", values)]):
            if (section, name) != ("run", "seeds"):
                flat[f"{section}.{name}"] = value
    return flat
