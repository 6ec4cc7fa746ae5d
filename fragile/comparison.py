"""Every trigger method side by side, on the same model and under the same attacks (issue 6).

Producing the numbers: ``eval.py --attack compare --method M`` (registered in fragile.benign's
BENIGN_ATTACKS) runs, on method M's trigger set, one results file
``<arch>_<dataset>_<M>_compare.json`` whose records cover
  - one epoch of clean fine-tuning (the paper's SGD settings),
  - Gaussian noise on every weight at each sigma of COMPARE_NOISE_SIGMAS, COMPARE_TRIALS trials each,
  - one randomly chosen weight moved by COMPARE_SINGLE_WEIGHT_EPS, COMPARE_TRIALS trials,
  - NNSplitter-style obfuscation of COMPARE_OBFUSCATE_K weights,
  - the benign-change matrix (fragile.benign; ``detected`` there is a false alarm).
Every random perturbation is seeded by (seed, attack, trial) alone, so every method faces the very
same tampered models. scripts/compare_methods.sh runs it for every method.

Rendering: ``plot.py --compare`` calls ``render_comparison(results_list, out_dir)``, which writes
comparison.md, comparison.csv and comparison.png.
"""
import math
import os

import torch
import torch.nn.functional as F

from .attacks import add_weight_noise, fine_tune, watermark_state
from .benign import benign_run_records, summarize_benign
from .checkpoint_io import atomic_write_text
from .cli import UserError
from .results import to_csv
from .training import accuracy, predict_logits

DEFAULTS = {"COMPARE_FINETUNE_EPOCHS": 1, "COMPARE_NOISE_SIGMAS": [1e-5, 1e-4, 1e-3], "COMPARE_TRIALS": 20,
            "COMPARE_SINGLE_WEIGHT_EPS": 1e-3, "COMPARE_OBFUSCATE_K": 1, "COMPARE_OBFUSCATE_SCALE": 10.0}
METHOD_ORDER = ("paper", "random", "natural", "ftg", "margin")


def setting(config, name):
    value = config.get(name)
    return DEFAULTS[name] if value is None else value


# ----------------------------------------------------------------------------- the perturbations
# Deliberately tiny: fragile/tamper_suite.py holds the full tamper suite; these are the few the
# comparison needs, kept here so the comparison does not depend on it.

def perturbation_generator(seed, attack_index, trial):
    """The same (seed, attack, trial) always gives the same perturbation, whatever the trigger method."""
    return torch.Generator().manual_seed(1_000_003 * seed + 10_007 * attack_index + trial)


@torch.no_grad()
def nudge_single_weight(model, eps, gen):
    """Add ``eps`` to one parameter entry drawn uniformly from all of them. Returns its name and index."""
    params = list(model.named_parameters())
    sizes = torch.tensor([p.numel() for _, p in params])
    flat = torch.randint(0, int(sizes.sum()), (1,), generator=gen).item()
    for name, p in params:
        if flat < p.numel():
            p.view(-1)[flat] += eps
            return name, flat
        flat -= p.numel()
    raise AssertionError("unreachable")


def obfuscate(model, k, scale, batch):
    """NNSplitter-style: the ``k`` conv/linear weights with the largest loss gradient on ``batch`` are each
    moved ``scale`` standard deviations of their tensor in the loss-increasing direction."""
    images, labels = batch
    model.eval()
    weights = [(n, p) for n, p in model.named_parameters() if p.ndim > 1]
    grads = torch.autograd.grad(F.cross_entropy(model(images), labels), [p for _, p in weights])
    scores = torch.cat([g.abs().flatten() for g in grads])
    chosen = scores.topk(k).indices
    offsets = torch.tensor([0] + [p.numel() for _, p in weights]).cumsum(0)
    with torch.no_grad():
        for flat in chosen.tolist():
            t = int(torch.searchsorted(offsets, flat, right=True)) - 1
            (_, p), g = weights[t], grads[t]
            i = flat - offsets[t].item()
            p.view(-1)[i] += scale * p.std() * g.view(-1)[i].sign()
    return len(chosen)


# ----------------------------------------------------------------------------- measurements

def queries_to_detection(flipped, n):
    """Expected number of single-trigger queries until the first mismatch, the triggers being queried one
    at a time in a uniformly random order: (n + 1) / (flipped + 1). None when nothing flipped."""
    return (n + 1) / (flipped + 1) if flipped else None


def attack_record(model, ctx, attack, setting_label, **extra):
    state = watermark_state(model, ctx, ctx.config.get("MAX_MISMATCHES", 0))
    return {"attack": attack, "setting": setting_label, **state,
            "queries_to_detection": queries_to_detection(state["flipped"], len(ctx.key)), **extra}


def finetune_records(ctx, seed):
    epochs = setting(ctx.config, "COMPARE_FINETUNE_EPOCHS")
    model = ctx.fresh_copy()
    records, first = fine_tune(model, ctx, seed, epochs, phase="compare")
    last = records[-1]
    return [attack_record(model, ctx, "finetune", f"fine-tune {epochs} epoch{'s' if epochs != 1 else ''}",
                          clean_accuracy=last["clean_accuracy"], first_detection_step=first)]


def rival_correlation(clean_logits, noisy_logits, key):
    """How the noise moves each trigger's rivals relative to its key class, averaged over the triggers.

    With d_j = (change of logit j) - (change of the key logit) for every rival class j, the mean pairwise
    correlation of the d_j across the trials. 0.5 means the class logits move exchangeably (independently,
    equally): then no trigger, however it was made, leaves its key with probability above 1 - 1/K for K
    classes, the chance that the key is not the largest of K exchangeable draws. Lower means the rivals
    move apart from each other (a trigger can beat that ceiling); higher, that they move together against
    the key. ``noisy_logits`` is (trials, N, K); needs 3 or more trials (None otherwise)."""
    if noisy_logits.shape[0] < 3 or noisy_logits.shape[2] < 3:
        return None
    change = noisy_logits.double() - clean_logits.double()
    d = change - change.gather(2, key.view(1, -1, 1).expand(change.shape[0], -1, 1))
    values = []
    for i in range(d.shape[1]):
        rivals = d[:, i, torch.arange(d.shape[2]) != key[i]]
        corr = torch.corrcoef(rivals.T)
        off_diagonal = corr[~torch.eye(len(corr), dtype=torch.bool)]
        if torch.isfinite(off_diagonal).all():
            values.append(off_diagonal.mean().item())
    return sum(values) / len(values) if values else None


def noise_records(ctx, seed):
    records = []
    clean = predict_logits(ctx.model, ctx.triggers, len(ctx.triggers)).cpu()
    for s, sigma in enumerate(setting(ctx.config, "COMPARE_NOISE_SIGMAS")):
        label, noisy, trials = f"noise sigma {sigma:g}", [], []
        for trial in range(setting(ctx.config, "COMPARE_TRIALS")):
            model = ctx.fresh_copy()
            add_weight_noise(model, sigma, perturbation_generator(seed, 10 + s, trial))
            noisy.append(predict_logits(model, ctx.triggers, len(ctx.triggers)).cpu())
            trials.append(attack_record(model, ctx, "noise", label, sigma=sigma, trial=trial))
        correlation = rival_correlation(clean, torch.stack(noisy), ctx.key.cpu()) if noisy else None
        records += [dict(r, rival_correlation=correlation) for r in trials]
    return records


def single_weight_records(ctx, seed):
    eps = setting(ctx.config, "COMPARE_SINGLE_WEIGHT_EPS")
    records = []
    for trial in range(setting(ctx.config, "COMPARE_TRIALS")):
        model = ctx.fresh_copy()
        name, index = nudge_single_weight(model, eps, perturbation_generator(seed, 2, trial))
        records.append(attack_record(model, ctx, "single_weight", f"single weight eps {eps:g}", epsilon=eps,
                                     trial=trial, weight=f"{name}[{index}]"))
    return records


def obfuscate_records(ctx, seed):
    k, scale = setting(ctx.config, "COMPARE_OBFUSCATE_K"), setting(ctx.config, "COMPARE_OBFUSCATE_SCALE")
    gen = perturbation_generator(seed, 3, 0)
    index = torch.randperm(len(ctx.train), generator=gen)[:256].to(ctx.train.images.device)
    batch = (ctx.train.images[index].float().div(255), ctx.train.labels[index])
    model = ctx.fresh_copy()
    obfuscate(model, k, scale, batch)
    return [attack_record(model, ctx, "obfuscate", f"obfuscate k={k}", k=k,
                          clean_accuracy=accuracy(model, ctx.test, ctx.config.get("EVAL_BATCH_SIZE", 1024)))]


def run_comparison(ctx, seed):
    """eval.py --attack compare: every comparison attack on this trigger set, plus the benign matrix."""
    records = []
    for name, fn in (("fine-tuning", finetune_records), ("weight noise", noise_records),
                     ("single weights", single_weight_records), ("obfuscation", obfuscate_records)):
        ctx.log(f"  {name} ...")
        new = fn(ctx, seed)
        for label in dict.fromkeys(r["setting"] for r in new):
            rows = [r for r in new if r["setting"] == label]
            ctx.log(f"    {label}: {sum(r['flipped'] for r in rows) / len(rows) / len(ctx.key):.0%} of triggers "
                    f"flipped, detected in {sum(r['detected'] for r in rows)}/{len(rows)}")
        records += new
    benign, meta = benign_run_records(ctx)
    for r in benign:
        r["attack"] = "benign"
    summary = summarize_benign(benign)
    ctx.log(f"    benign matrix: {summary['false_alarms']} false alarms in {summary['settings']} settings, "
            f"largest jitter {summary['max_logit_jitter']:.2e}")
    records += benign
    return {"seed": seed, "records": records, "benign": summary, "delta": meta.get("delta"),
            "psnr_to_start": meta.get("psnr_to_start"), "trigger_margins": meta.get("margins")}, None


# ----------------------------------------------------------------------------- aggregation and rendering

ATTACK_ORDER = ("finetune", "noise", "single_weight", "obfuscate")


def summarize_method(results):
    """One row per attack setting of one method: flip fraction, detection probability, mean queries."""
    n = results["num_triggers"]
    groups = {}
    for run in results["runs"]:
        for r in run["records"]:
            if r.get("attack") in ATTACK_ORDER:
                groups.setdefault((r["attack"], r["setting"]), []).append(r)
    rows = []
    for (attack, label), recs in sorted(groups.items(), key=lambda kv: (ATTACK_ORDER.index(kv[0][0]),
                                                                         _setting_order(kv[1][0]))):
        rows.append({"method": method_label(results), "attack": attack, "setting": label, "trials": len(recs),
                     "flipped_fraction": sum(r["flipped"] for r in recs) / (len(recs) * n),
                     "detection_probability": sum(bool(r["detected"]) for r in recs) / len(recs),
                     "mean_queries_to_detection": _mean_of(recs, "queries_to_detection"),
                     "mean_queries_fragility_order": _mean_of(recs, "queries_in_fragility_order"),
                     "rival_correlation": _mean_of(recs, "rival_correlation")})
    return rows


def _mean_of(records, key):
    """Mean of ``key`` over the records that have it (the trials that detected)."""
    values = [r[key] for r in records if r.get(key) is not None]
    return sum(values) / len(values) if values else None


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
    """The method, and its deployment envelope when it is not the default (one method, several envelopes)."""
    envelope = results.get("envelope") or ["exact"]
    return results["method"] if list(envelope) == ["exact"] else f"{results['method']} [{'+'.join(envelope)}]"


def _method_key(results):
    method = results["method"]
    return (METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER), method_label(results))


def _fmt(value, spec):
    if value is None:
        return "-"
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    return format(value, spec)


def comparison_markdown(attack_rows, method_rows, model_line):
    lines = ["# Trigger methods compared", "", model_line, "",
             "| method | attack | trials | triggers flipped | detection probability | mean queries to detection "
             "(random order) | (fragility order) | rival correlation |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in attack_rows:
        lines.append(f"| {r['method']} | {r['setting']} | {r['trials']} | {_fmt(r['flipped_fraction'], '.1%')} | "
                     f"{_fmt(r['detection_probability'], '.2f')} | {_fmt(r['mean_queries_to_detection'], '.2f')} | "
                     f"{_fmt(r.get('mean_queries_fragility_order'), '.2f')} | "
                     f"{_fmt(r.get('rival_correlation'), '.2f')} |")
    lines += ["", "| method | false alarms (benign matrix) | per envelope entry | largest benign jitter | delta | "
              "smallest trigger margin | PSNR to natural start (mean / min, dB) |", "|---|---:|---|---:|---:|---:|---:|"]
    for m in method_rows:
        alarms = "-" if m["false_alarms"] is None else f"{m['false_alarms']} / {m['benign_settings']}"
        psnr = "-" if m["psnr_mean_db"] is None else f"{m['psnr_mean_db']:.1f} / {m['psnr_min_db']:.1f}"
        lines.append(f"| {m['method']} | {alarms} | {m['false_alarms_per_entry'] or '-'} | "
                     f"{_fmt(m['max_benign_jitter'], '.1e')} | {_fmt(m['delta'], '.1e')} | "
                     f"{_fmt(m['min_trigger_margin'], '.1e')} | {psnr} |")
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
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
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
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)


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
