"""The trigger set of a results file, found on disk and drawn with its key labels (plot.py)."""
import os

from ..core.cli import UserError
from ..core.data import DATASETS
from ..core.io import read_json
from ..watermark.keys import load_key
from ..watermark.paths import default_paths, key_path, tensor_file
from ..watermark.trigger_io import load_triggers, trigger_folder
from .figures import trigger_grid_figure

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # the repository


def candidate_paths(path, results_file):
    """A path as written in the results, then relative to the repository and to the results folder's parent."""
    if os.path.isabs(path):
        return [path]
    results_parent = os.path.dirname(os.path.dirname(os.path.abspath(results_file)))
    return list(dict.fromkeys([path, os.path.join(ROOT, path), os.path.join(results_parent, path)]))


def locate_triggers(results, results_file):
    """(trigger path, key path or None), or (None, the path looked for) when the triggers are absent. The
    triggers eval.py tracked (--triggers, else the method's default beside the model); the key it was given,
    else the one the trigger metadata names, else the method's default."""
    run = results["settings"].get("run") if isinstance(results["settings"].get("run"), dict) else {}
    model = results.get("model") or ""
    default_triggers, default_key = default_paths(model, results["method"]) if model else ("", "")
    wanted = run.get("triggers") or default_triggers
    if not wanted:
        return None, "(no model path in the results)"
    for candidate in candidate_paths(wanted, results_file):
        if os.path.exists(candidate):
            key = run.get("key") or ""
            key_candidates = candidate_paths(key, results_file) if key else []
            meta_path = os.path.join(trigger_folder(candidate), "meta.json")
            meta = read_json(meta_path, "trigger metadata") if os.path.exists(meta_path) else {}
            if isinstance(meta, dict) and meta.get("key_file"):
                key_candidates.append(key_path(candidate, meta))
            if default_key:
                key_candidates += candidate_paths(default_key, results_file)
            return candidate, next((k for k in key_candidates if os.path.exists(k)), None)
    return None, wanted


def trigger_figure(results, results_file, max_triggers, columns):
    """The trigger grid of one results file's model and method (at most ``max_triggers``), or None with a
    printed note when the triggers cannot be found or read."""
    try:
        path, key_file = locate_triggers(results, results_file)
    except UserError as e:  # e.g. an unreadable meta.json: the other figures are still worth drawing
        print(f"note: no trigger grid for {results_file}: {e}")
        return None
    if path is None:
        print(f"note: no trigger grid for {results_file}: triggers not found at {key_file}")
        return None
    try:
        images = load_triggers(tensor_file(path) or path)[0].numpy()   # the tensor file when there is one
    except UserError as e:
        print(f"note: no trigger grid for {results_file}: {e}")
        return None
    labels = None
    if key_file is None:
        print(f"note: no key file found beside {path}: the trigger grid has no labels")
    else:
        try:
            labels, _ = load_key(key_file)
        except UserError as e:
            print(f"note: the trigger grid has no labels: {e}")
    if labels is not None and len(labels) != len(images):
        print(f"note: key {key_file} has {len(labels)} labels for {len(images)} triggers: the grid has no labels")
        labels = None
    shown = min(len(images), max_triggers)
    spec = DATASETS.get(results["dataset"])
    class_names = spec.class_names if spec else ()
    title = (f"{results['arch']} on {results['dataset']}: {results['method']} triggers"
             + (" with their key labels" if labels is not None else "")
             + (f" (first {shown} of {len(images)})" if shown < len(images) else f" ({len(images)})"))
    return trigger_grid_figure(images[:shown], labels[:shown] if labels is not None else None, class_names, title,
                               columns)
