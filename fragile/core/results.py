"""Results files: one JSON (and a flat CSV) per model, trigger method and attack, written atomically."""
import csv
import fcntl
import hashlib
import io
import json
import os
import tempfile

from .io import atomic_write_json, atomic_write_text
from .cli import UserError

SCHEMA = "fragile-wm-results/1"
REQUIRED_KEYS = ("schema", "attack", "arch", "dataset", "method", "num_triggers", "config", "versions", "device",
                 "wall_time_s", "runs")
RECORD_KEYS = ("flipped", "match_rate", "detected")


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


def write_results(results, path):
    """JSON and CSV side by side; a rerun replaces both."""
    results = {"schema": SCHEMA, **results}
    validate(results, path)
    atomic_write_json(results, path)
    atomic_write_text(to_csv(records_table(results)), path[:-5] + ".csv")


def validate(results, path):
    """One clear error naming what is wrong with a results file."""
    if not isinstance(results, dict):
        raise UserError(f"results file {path} is malformed: expected a JSON object")
    if results.get("schema") != SCHEMA:
        raise UserError(f"results file {path} is not a {SCHEMA} file")
    missing = [k for k in REQUIRED_KEYS if k not in results]
    if missing:
        raise UserError(f"results file {path} is malformed: missing {', '.join(missing)}")
    for run in results["runs"]:
        if not isinstance(run, dict) or "records" not in run or "seed" not in run:
            raise UserError(f"results file {path} is malformed: every run needs seed and records")
        for record in run["records"]:
            absent = [k for k in RECORD_KEYS if k not in record]
            if absent:
                raise UserError(f"results file {path} is malformed: a record lacks {', '.join(absent)}")
    return results


def read_results(path):
    try:
        with open(path) as f:
            results = json.load(f)
    except OSError as e:
        raise UserError(f"cannot read results file {path}: {e.strerror}") from None
    except ValueError as e:
        raise UserError(f"results file {path} is not valid JSON: {e}") from None
    return validate(results, path)


RUN_PLACEMENT = ("SEEDS", "RESULTS_DIR", "PROGRESS", "BACKEND")   # settings that may differ between merged parts


def merge_results(paths, out):
    """One results file holding the runs of several files of the same experiment (one seed each, run
    separately so that an interrupted reproduction resumes per seed). Their settings must agree apart
    from the seeds and where they were written; the wall time is the sum."""
    parts = [read_results(p) for p in paths]
    if not parts:
        raise UserError("nothing to merge")
    first = parts[0]
    for path, part in zip(paths[1:], parts[1:]):
        for key in ("attack", "arch", "dataset", "method", "weights_sha256"):
            if part.get(key) != first.get(key):
                raise UserError(f"cannot merge {path}: its {key} {part.get(key)!r} differs from {first.get(key)!r}")
        a, b = ({k: v for k, v in p["config"].items() if k not in RUN_PLACEMENT} for p in (first, part))
        if a != b:
            changed = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
            raise UserError(f"cannot merge {path}: its settings differ ({', '.join(changed)})")
    runs = sorted((run for part in parts for run in part["runs"]), key=lambda run: run["seed"])
    merged = {k: v for k, v in first.items() if k != "schema"}
    merged.update(runs=runs, wall_time_s=round(sum(p["wall_time_s"] for p in parts), 2),
                  config={**first["config"], "SEEDS": [run["seed"] for run in runs]})
    write_results(merged, out)
    return merged


if __name__ == "__main__":  # python -m fragile.core.results merge OUT.json IN.json [IN.json ...]
    import sys
    from .cli import run_main

    def _merge_command():
        if len(sys.argv) < 4 or sys.argv[1] != "merge":
            raise UserError("usage: python -m fragile.core.results merge OUT.json IN.json [IN.json ...]")
        merge_results(sys.argv[3:], sys.argv[2])
        print(f"merged {len(sys.argv) - 3} files -> {sys.argv[2]}")

    run_main(_merge_command)
