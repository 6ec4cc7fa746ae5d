"""docs/deployment.md's table, from what scripts/compare_deployments.sh wrote: per deployment the verifier queries,
each trigger set (calibrated in that deployment, or today's envelopes) with its false alarms within the deployment,
the comparison attacks' detections there, and the physical limit (fragile.tamper.limit).

    .venv/bin/python scripts/reproduction_tables.py deployment results/deployments
"""
import glob
import os

from ..core.cli import UserError
from ..tamper.records import read_results
from .comparison import method_label, method_summary, summarize_method
from .statistics import fmt


def _set_label(results):
    """The trigger set's label without where it was verified (the table has a column for that)."""
    return method_label(results).split(" @ ")[0]


def _verified_in(results):
    return results.get("settings", {}).get("run", {}).get("deployment") or "torch-fp32"


def _detections(results):
    """{setting: "detected/trials"} of the comparison attacks."""
    return {r["setting"]: f"{round(r['detection_probability'] * r['trials'])}/{r['trials']}"
            for r in summarize_method(results)}


def deployment_rows(folder):
    """One row per (deployment, trigger set): the comparison's detections and false alarms, and the limit."""
    found = {}
    for path in sorted(glob.glob(os.path.join(folder, "**", "*.json"), recursive=True)):
        if not path.endswith(("_compare.json", "_limit.json")):
            continue
        results = read_results(path)
        row = found.setdefault((_verified_in(results), _set_label(results)),
                               {"deployment": _verified_in(results), "trigger_set": _set_label(results)})
        if results["attack"] == "compare":
            summary = method_summary(results)
            row.update(false_alarms=summary["false_alarms"], benign_settings=summary["benign_settings"],
                       delta=summary["delta"], detections=_detections(results))
        else:
            run = results["runs"][0]
            row.update({k: run.get(k) for k in ("jitter", "resolution", "sigma_at_jitter", "smallest_sigma_detected",
                                               "ratio_to_limit")})
    if not found:
        raise UserError(f"no *_compare.json or *_limit.json results under {folder}: run scripts/compare_deployments.sh")
    return [found[k] for k in sorted(found)]


def deployment_table(folder):
    """(markdown, payload) of the price and limit table."""
    rows = deployment_rows(folder)
    settings = list(dict.fromkeys(s for r in rows for s in r.get("detections", {})))
    lines = ["| deployment | trigger set | delta | false alarms | " + " | ".join(settings)
             + " | jitter | sigma at jitter | smallest sigma 19/20 | ratio |",
             "|---|---|---:|---:|" + "---:|" * len(settings) + "---:|---:|---:|---:|"]
    for r in rows:
        alarms = "-" if r.get("false_alarms") is None else f"{r['false_alarms']}/{r['benign_settings']}"
        detections = " | ".join(r.get("detections", {}).get(s, "-") for s in settings)
        lines.append(f"| {r['deployment']} | {r['trigger_set']} | {fmt(r.get('delta'), '.1e')} | {alarms} | "
                     f"{detections} | {fmt(r.get('jitter'), '.1e')} | {fmt(r.get('sigma_at_jitter'), '.1e')} | "
                     f"{fmt(r.get('smallest_sigma_detected'), 'g')} | {fmt(r.get('ratio_to_limit'), '.0f')} |")
    return "\n".join(lines), {"rows": rows}
