"""The method comparison rendered (``plot.py --compare``, scripts/compare_methods.sh): comparison.md,
comparison.csv and comparison.png from the ``eval.py --attack compare`` results of several trigger methods
on one model (fragile.tamper.compare makes them)."""
import os

from ..core.cli import UserError
from ..core.io import atomic_write, atomic_write_text
from ..tamper.records import to_csv
from ..tamper.benign import summarize_benign
from ..watermark.methods import METHODS
from .statistics import fmt, mean
from .style import plt

COMPARED_ATTACKS = ("finetune", "noise", "single-weight", "obfuscate")   # the comparison's records, in table order
METHOD_ORDER = tuple(METHODS)


def summarize_method(results):
    """One row per attack setting of one method: flip fraction, detection probability, mean queries."""
    n = results["num_triggers"]
    groups = {}
    for run in results["runs"]:
        for r in run["records"]:
            if r.get("attack") in COMPARED_ATTACKS:
                groups.setdefault((r["attack"], r["setting"]), []).append(r)
    rows = []
    for (attack, label), recs in sorted(groups.items(), key=lambda kv: (COMPARED_ATTACKS.index(kv[0][0]),
                                                                         _setting_order(kv[1][0]))):
        rows.append({"method": method_label(results), "attack": attack, "setting": label, "trials": len(recs),
                     "flipped_fraction": sum(r["flipped"] for r in recs) / (len(recs) * n),
                     "detection_probability": sum(bool(r["detected"]) for r in recs) / len(recs),
                     "mean_queries_to_detection": _mean_of(recs, "mean_queries_to_detection"),
                     "mean_queries_fragility_order": _mean_of(recs, "queries_in_fragility_order"),
                     "rival_correlation": _mean_of(recs, "rival_correlation")})
    return rows


def _mean_of(records, key):
    """Mean of ``key`` over the records that have it (the trials that detected)."""
    return mean(r.get(key) for r in records)


def _setting_order(record):
    return record.get("sigma", 0.0)


def method_summary(results):
    """Per method: false alarms over the benign matrix, largest jitter, delta, margins and PSNR."""
    benign = [r for run in results["runs"] for r in run["records"] if r.get("attack") == "benign"]
    runs = results["runs"]
    psnr = next((run.get("psnr_to_start") for run in runs if run.get("psnr_to_start")), None)
    summary = summarize_benign(benign) if benign else {"false_alarms": None, "settings": 0, "max_logit_jitter": None}
    reference = next((r for r in benign if r["setting"].startswith("reference")), {})
    per_entry = ", ".join(f"{k} {v['false_alarms']}/{v['settings']}" for k, v in summary.get("per_entry", {}).items())
    return {"method": method_label(results), "false_alarms": summary["false_alarms"],
            "benign_settings": summary["settings"], "false_alarms_per_entry": per_entry or None,
            "max_benign_jitter": summary["max_logit_jitter"], "min_trigger_margin": reference.get("min_margin"),
            "delta": next((run.get("delta") for run in runs if run.get("delta")), None),
            "psnr_mean_db": psnr.get("mean_db") if psnr else None, "psnr_min_db": psnr.get("min_db") if psnr else None}


def check_same_model(results_list):
    if not results_list:
        raise UserError("no comparison results to render: run scripts/compare_methods.sh (eval.py --attack compare)")
    for path, results in results_list:
        if results.get("attack") != "compare":
            raise UserError(f"{path} holds {results.get('attack')!r} results, not a comparison "
                            f"(make them with eval.py --attack compare)")
    hashes = {results.get("weights_sha256") for _, results in results_list}
    if len(hashes) > 1:
        raise UserError("the comparison results are for different models (weights hashes differ): "
                        "compare methods on one model")
    methods = [method_label(results) for _, results in results_list]
    duplicated = sorted({m for m in methods if methods.count(m) > 1})
    if duplicated:
        raise UserError(f"more than one comparison results file for method(s) {', '.join(duplicated)}")


def method_label(results):
    """The method; what its triggers were calibrated for when not the default (an envelope, or ``deploy`` and the
    named deployments); and ``@ deployment`` when the labels were computed in one (eval.py --deployment)."""
    envelope, deployments = results.get("envelope") or ["exact"], results.get("deployments")
    label = results["method"]
    if deployments:
        label += f" [deploy {'+'.join(deployments)}]"
    elif list(envelope) != ["exact"]:
        label += f" [{'+'.join(envelope)}]"
    verified = results.get("settings", {}).get("run", {}).get("deployment")
    return label + (f" @ {verified}" if verified else "")


def _method_key(results):
    method = results["method"]
    return (METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER), method_label(results))


def comparison_markdown(attack_rows, method_rows, model_line):
    lines = ["# Trigger methods compared", "", model_line, "",
             "| method | attack | trials | triggers flipped | detection probability | mean queries to detection "
             "(random order) | (fragility order) | rival correlation |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in attack_rows:
        lines.append(f"| {r['method']} | {r['setting']} | {r['trials']} | {fmt(r['flipped_fraction'], '.1%')} | "
                     f"{fmt(r['detection_probability'], '.2f')} | {fmt(r['mean_queries_to_detection'], '.2f')} | "
                     f"{fmt(r.get('mean_queries_fragility_order'), '.2f')} | "
                     f"{fmt(r.get('rival_correlation'), '.2f')} |")
    lines += ["", "| method | false alarms (benign matrix) | per envelope entry | largest benign jitter | delta | "
              "smallest trigger margin | PSNR to natural start (mean / min, dB) |", "|---|---:|---|---:|---:|---:|---:|"]
    for m in method_rows:
        alarms = "-" if m["false_alarms"] is None else f"{m['false_alarms']} / {m['benign_settings']}"
        psnr = "-" if m["psnr_mean_db"] is None else f"{m['psnr_mean_db']:.1f} / {m['psnr_min_db']:.1f}"
        lines.append(f"| {m['method']} | {alarms} | {m['false_alarms_per_entry'] or '-'} | "
                     f"{fmt(m['max_benign_jitter'], '.1e')} | {fmt(m['delta'], '.1e')} | "
                     f"{fmt(m['min_trigger_margin'], '.1e')} | {psnr} |")
    lines += ["", "Queries to detection, random order: the expected number of single-trigger queries, in a uniformly "
              "random order, until the first mismatch, (n + 1) / (flipped + 1). Fragility order: the queries a "
              "verifier needs when it asks the triggers in the order recorded at generation (most fragile under "
              "weight noise first, estimated with draws the evaluation never uses) and stops at the first mismatch. "
              "Both are averaged over the trials that detected. A benign-matrix detection is a false alarm. "
              "Rival correlation (weight noise): the mean pairwise correlation, over the trials, of how much each "
              "rival class's logit moved relative to the key's; 0.5 means the classes move exchangeably, and then no "
              "trigger leaves its key with probability above 1 - 1/K for K classes."]
    return "\n".join(lines) + "\n"


def comparison_figure(attack_rows, path):
    settings = list(dict.fromkeys(r["setting"] for r in attack_rows))
    methods = list(dict.fromkeys(r["method"] for r in attack_rows))
    lookup = {(r["method"], r["setting"]): r for r in attack_rows}
    fig, axes = plt.subplots(1, 2, figsize=(max(8, 1.6 * len(settings)) * 1.6, 4.2), layout="constrained")
    width = 0.8 / max(1, len(methods))
    for ax, metric, title in ((axes[0], "flipped_fraction", "fraction of triggers flipped"),
                              (axes[1], "detection_probability", "detection probability")):
        for i, method in enumerate(methods):
            values = [lookup.get((method, s), {}).get(metric) or 0.0 for s in settings]
            ax.bar([x + i * width for x in range(len(settings))], values, width, label=method)
        ax.set_xticks([x + 0.4 - width / 2 for x in range(len(settings))])
        ax.set_xticklabels(settings, rotation=30, ha="right", fontsize=8)
        ax.set_ylim(0, 1.05)
        ax.set_title(title)
    axes[0].legend(fontsize=8)
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120))
    plt.close(fig)


def render_comparison(results_list, out_dir):
    """comparison.md, comparison.csv and comparison.png in ``out_dir`` from (path, results) pairs of
    ``eval.py --attack compare`` files, one per method, all on the same model. Returns the paths written."""
    check_same_model(results_list)
    ordered = sorted((results for _, results in results_list), key=_method_key)
    attack_rows = [row for results in ordered for row in summarize_method(results)]
    method_rows = [method_summary(results) for results in ordered]
    first = ordered[0]
    model_line = (f"Model: {first['arch']} on {first['dataset']} ({first.get('model', '?')}, weights sha256 "
                  f"{str(first.get('weights_sha256', '?'))[:12]}...), {first['num_triggers']} triggers per method, "
                  f"{first.get('device', '?')}.")
    os.makedirs(out_dir, exist_ok=True)
    paths = {name: os.path.join(out_dir, f"comparison.{name}") for name in ("md", "csv", "png")}
    atomic_write_text(comparison_markdown(attack_rows, method_rows, model_line), paths["md"])
    csv_rows = attack_rows + [{"method": m["method"], "attack": "benign", "setting": "benign matrix",
                               "trials": m["benign_settings"], "false_alarms": m["false_alarms"],
                               "max_benign_jitter": m["max_benign_jitter"], "delta": m["delta"],
                               "min_trigger_margin": m["min_trigger_margin"], "psnr_mean_db": m["psnr_mean_db"]}
                              for m in method_rows]
    atomic_write_text(to_csv(csv_rows), paths["csv"])
    comparison_figure(attack_rows, paths["png"])
    return paths
