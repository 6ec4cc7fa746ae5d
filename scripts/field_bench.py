"""The field on one bench: every trigger method against the tamper zoo, detection at a fixed false-positive rate.

    .venv/bin/python scripts/field_bench.py                              # everything below, resumable
    .venv/bin/python scripts/field_bench.py --stage prepare              # classifier, trigger sets, benign runs
    .venv/bin/python scripts/field_bench.py --stage prepare --shard 1/4  # one slice of the methods' trigger sets
    .venv/bin/python scripts/field_bench.py --stage run --shard 3/16     # one slice of the cells
    .venv/bin/python scripts/field_bench.py --stage report               # merge the cells: JSON, markdown, heatmap

prepare: train the classifier (train.py, unless --model names one), make NUM_TRIGGERS triggers with every method
on it (generate_samples.py, the same number for each; the paper's generator with PAPER_RECIPE), and record the
benign runs that calibrate each method's decision threshold (fragile/tamper/field_bench.py: the trigger set's
envelope settings by name, and DYNAMIC_BATCH_RUNS runs of dynamic batching). --stage prepare --shard I/N makes
every N-th method's set from the I-th (the first shard to start trains the classifier, the others wait for it);
the shard that finishes last finds every set and records the benign runs.
run: the cells, one (modification, trial) each: the modification applied once at seed = trial to a copy of the
model, every method verified on that same copy (a paired comparison). --shard I/N runs every N-th cell from the
I-th, so N nodes of a job array cover the grid between them; each cell is its own file, so any stage resumes.
report: merges the cells (refusing cells made with other settings), computes the metrics
(fragile/report/field_bench.py) and writes OUT/bench.json, OUT/bench.md and OUT/bench.png.
Every modification runs at its module's defaults (fragile/tamper/, the published numbers) except the strengths in
the header; the fine-tuning family uses the paper's fine-tuning SGD (eval.py's defaults) on ATTACK_SUBSET images.
"""
# ----------------------------------------------------------------------------- config
OUT = "results/field-bench"
STAGE = "all"                  # all | prepare | run | report
SHARD = "0/1"                  # I/N: this process runs cells I, I+N, ... (with --stage prepare: methods I, I+N, ...)
METHODS = ["paper", "ftg", "ssf", "ibsf", "aid", "margin", "natural", "random"]
MODIFICATIONS = ["finetune", "poison", "ftal", "ftll", "fzll", "rtal", "rtll", "fine-prune", "prune", "quantize",
                 "distill", "shift", "random-class", "specific-class", "random-sample", "clean-label", "trojan",
                 "targeted", "unlearn", "online", "noise", "single-weight", "bitflip", "obfuscate"]
TRIALS = 10                    # seeds 0..TRIALS-1 per modification
NUM_TRIGGERS = 100
KEY_SEED = 0
DATASET = "fashion-mnist"
DATA_DIR = "data"
ARCH = "resnet8"
MODEL = ""                     # a trained checkpoint; empty: train.py trains one into OUT/model/
TRAIN_SUBSET = 20000           # the classifier's training images (class-balanced)
TRAIN_EPOCHS = 3
ATTACK_SUBSET = 5000           # the modifications' training images (class-balanced)
TEST_SUBSET = 2000             # clean accuracy and the dynamic-batching traffic
PAPER_RECIPE = "fast"          # the paper's generator: fast (a CPU minute) | paper (its code's recipe, 20-35 CPU min)
GENERATE_FLAGS = ""            # more generate_samples.py flags for every method (a smoke run: fewer steps)
DYNAMIC_BATCH_RUNS = 1000      # benign runs of dynamic batching (FPR 1e-3 needs 1000 to be resolved)
FPR_TARGETS = [1e-2, 1e-3]
THREADS = 1                    # per process (the determinism contract)
DEVICE = "cpu"
OVERWRITE = False              # remake cells whose file holds other settings (else refused)
# the strengths (every other parameter: the modification's defaults in fragile/tamper/)
FINETUNE_EPOCHS = 1            # finetune, poison, shift (the paper's SGD fine-tuning)
LAYER_TUNE_EPOCHS = [1, 1, 5, 5, 5]   # ftal ftll fzll rtal rtll (BIVBench: 1 1 5 20 20)
PRUNE_RATIO = 0.7              # global magnitude pruning (BIVBench's sparsity)
QUANTIZE_MODE = "int8"         # 8-bit weights (BIVBench)
DISTILL_EPOCHS = 10            # the student's training from scratch (BIVBench: 60)
NOISE_SIGMA = 1e-3             # Gaussian noise on every weight (FTG's MNIST sigma)
SINGLE_WEIGHT_EPSILON = 1e-2   # the largest weight times (1 +- epsilon)
BITFLIP_CLASS = "exponent"     # one bit of this class flipped in one random weight
OBFUSCATE_K = 1                # weights obfuscated
# -----------------------------------------------------------------------------

import dataclasses
import fcntl
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from fragile.core.cli import (UserError, apply_overrides, check_positive_int, check_range, run_logged,  # noqa: E402
                              run_main)
from fragile.core.data import DATASETS, balanced_subset, get_spec, load_split  # noqa: E402
from fragile.core.io import (atomic_write_json, load_classifier, logged_training_seconds, model_sha256,  # noqa: E402
                             read_json)
from fragile.tamper import field_bench  # noqa: E402
from fragile.tamper.clean_label import CleanLabelParams  # noqa: E402
from fragile.tamper.compression import PruneParams, QuantizeParams  # noqa: E402
from fragile.tamper.context import Deployment, EvalContext, FinetuneParams, Probe  # noqa: E402
from fragile.tamper.degrade import DEGRADATIONS, DegradeParams  # noqa: E402
from fragile.tamper.distill import DistillParams  # noqa: E402
from fragile.tamper.fine_prune import FinePruneParams  # noqa: E402
from fragile.tamper.layers import VARIANTS, LayerTuneParams  # noqa: E402
from fragile.tamper.obfuscate import ObfuscateParams  # noqa: E402
from fragile.tamper.one_sample import OnlineParams, UnlearnParams  # noqa: E402
from fragile.tamper.perturbation import BIT_CLASSES, BitflipParams, NoiseParams, SingleWeightParams  # noqa: E402
from fragile.tamper.registry import ATTACKS  # noqa: E402
from fragile.tamper.shift import ShiftParams  # noqa: E402
from fragile.tamper.targeted import TargetedParams  # noqa: E402
from fragile.tamper.trojan import TrojanParams  # noqa: E402
from fragile.report import field_bench as report  # noqa: E402
from fragile.watermark.methods import METHODS as TRIGGER_METHODS  # noqa: E402
from fragile.watermark.paths import load_watermark  # noqa: E402

STAGES = ("all", "prepare", "run", "report")


# ----------------------------------------------------------------------------- the zoo at the bench's strengths

def zoo_params(name):
    """The parameter object of modification ``name`` at the bench's strength (None: finetune and poison, which
    run on the context's fine-tuning settings)."""
    one_shot = dict(trials=1, accuracy_trials=0)   # a cell is one trial: its seed is the cell's
    if name in VARIANTS:
        return LayerTuneParams(**{f"{v}_epochs": e for v, e in zip(VARIANTS, LAYER_TUNE_EPOCHS)})
    if name in DEGRADATIONS:
        return DegradeParams()
    return {"finetune": None, "poison": None,
            "fine-prune": FinePruneParams(),
            "prune": PruneParams(ratios=[PRUNE_RATIO]),
            "quantize": QuantizeParams(modes=[QUANTIZE_MODE]),
            "distill": DistillParams(epochs=DISTILL_EPOCHS),
            "shift": ShiftParams(epochs=FINETUNE_EPOCHS),
            "clean-label": CleanLabelParams(),
            "trojan": TrojanParams(),
            "targeted": TargetedParams(),
            "unlearn": UnlearnParams(),
            "online": OnlineParams(),
            "noise": NoiseParams(sigmas=[NOISE_SIGMA], **one_shot),
            "single-weight": SingleWeightParams(epsilons=[SINGLE_WEIGHT_EPSILON], **one_shot),
            "bitflip": BitflipParams(ks=[1], classes=[BITFLIP_CLASS], **one_shot),
            "obfuscate": ObfuscateParams(ks=[OBFUSCATE_K]),
            }[name]


def cell_settings(model_sha, trigger_shas):
    """Everything a cell's measurement depends on: two cells may be merged only when these are equal."""
    return {"model_sha256": model_sha, "triggers_sha256": trigger_shas, "trials": TRIALS,
            "attack_subset": ATTACK_SUBSET, "test_subset": TEST_SUBSET, "finetune_epochs": FINETUNE_EPOCHS,
            "device": DEVICE, "threads": THREADS, "torch": torch.__version__,
            "modifications": {m: params_record(zoo_params(m)) for m in MODIFICATIONS}}


def params_record(params):
    return dataclasses.asdict(params) if params is not None else None


# ----------------------------------------------------------------------------- checks before any work

def parse_shard(text):
    """``I/N`` -> (I, N), with 0 <= I < N."""
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError:
        raise UserError(f"--shard {text!r}: write it as I/N, e.g. 3/16 (slice 3 of 16, counted from 0)") from None
    if count < 1 or not 0 <= index < count:
        raise UserError(f"--shard {text}: I must be 0..N-1 and N at least 1")
    return index, count


def check_settings():
    if STAGE not in STAGES:
        raise UserError(f"--stage {STAGE!r}: choose one of {', '.join(STAGES)}")
    for flag, names, valid in (("--methods", METHODS, TRIGGER_METHODS), ("--modifications", MODIFICATIONS, ATTACKS)):
        unknown = [n for n in names if n not in valid]
        if unknown or not names:
            raise UserError(f"{flag}: unknown {' '.join(unknown) or '(none given)'}; choose from {', '.join(valid)}")
        if len(set(names)) != len(names):
            raise UserError(f"{flag} repeats a name: give each once")
    if "restore" in MODIFICATIONS:
        raise UserError("--modifications: restore needs a robust watermark in the checkpoint; the bench leaves it out")
    check_range("--layer-tune-epochs", len(LAYER_TUNE_EPOCHS), len(VARIANTS), len(VARIANTS))
    for flag, value in (("--trials", TRIALS), ("--num-triggers", NUM_TRIGGERS), ("--train-subset", TRAIN_SUBSET),
                        ("--train-epochs", TRAIN_EPOCHS), ("--attack-subset", ATTACK_SUBSET),
                        ("--test-subset", TEST_SUBSET), ("--threads", THREADS)):
        check_positive_int(flag, value)
    check_range("--dynamic-batch-runs", DYNAMIC_BATCH_RUNS, 0)
    check_range("--finetune-epochs", FINETUNE_EPOCHS, 0)
    check_range("--noise-sigma", NOISE_SIGMA, 0)
    check_range("--prune-ratio", PRUNE_RATIO, 0, 1)
    check_range("--distill-epochs", DISTILL_EPOCHS, 0)
    if BITFLIP_CLASS not in BIT_CLASSES:
        raise UserError(f"--bitflip-class {BITFLIP_CLASS!r}: choose one of {', '.join(BIT_CLASSES)}")
    for fpr in FPR_TARGETS:
        check_range("--fpr-targets", fpr, 0, 1, low_open=True, high_open=True)
    parse_shard(SHARD)


# ----------------------------------------------------------------------------- where everything lives

def model_path():
    return MODEL or os.path.join(OUT, "model", f"{ARCH}_{DATASET}.pt")


def method_dir(method):
    return os.path.join(OUT, "methods", method)


def timing_path(method):
    """The method's generation seconds, written when its trigger set is done (so it also marks the set done)."""
    return os.path.join(method_dir(method), "generate.json")


def cell_path(modification, trial):
    return os.path.join(OUT, "cells", modification, f"trial{trial}.json")


def prepared_path():
    return os.path.join(OUT, "prepared.json")


# ----------------------------------------------------------------------------- prepare

def run_script(name, script, args, log):
    """One step as the user would run it (THREADS threads); its output goes to ``log``. Returns its seconds."""
    print(f"== {name}", flush=True)
    return run_logged(ROOT, script, args, log, THREADS, name)


def my_methods():
    """The trigger sets this process generates: with --stage prepare --shard I/N every N-th method from the I-th;
    otherwise all (--stage all goes on to the cells, which need every set)."""
    index, count = parse_shard(SHARD) if STAGE == "prepare" else (0, 1)
    return METHODS[index::count]


def train_once(common):
    """The classifier, trained by the first shard that gets here; the others wait on the lock, then find it."""
    os.makedirs(os.path.dirname(model_path()), exist_ok=True)
    with open(os.path.join(OUT, "model", ".train.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not os.path.exists(model_path()):
            run_script("train", "train.py", ["--dataset", DATASET, "--arch", ARCH, "--epochs", TRAIN_EPOCHS,
                                             "--train-subset", TRAIN_SUBSET, "--seed", 0, "--out", model_path(),
                                             *common], os.path.join(OUT, "model", "train.log"))


def prepare():
    """The classifier, this shard's trigger sets (with their generation times) and, once every method's set
    exists, the benign runs (dynamic batching mixes every method's triggers, so they wait for the last shard);
    each part is skipped when done, so a stopped prepare resumes."""
    common = ["--device", DEVICE, "--data-dir", DATA_DIR, "--no-progress"]
    if not MODEL:
        train_once(common)
    for method in my_methods():
        folder = method_dir(method)
        if os.path.exists(timing_path(method)):
            continue
        seconds = run_script(f"generate {method}", "generate_samples.py",
                             ["--model", model_path(), "--method", method, "--num-triggers", NUM_TRIGGERS,
                              "--key-seed", KEY_SEED, "--recipe", PAPER_RECIPE, "--out", os.path.join(folder, "triggers"),
                              "--key-out", os.path.join(folder, "key.json"), "--overwrite", *common,
                              *GENERATE_FLAGS.split()], os.path.join(folder, "generate.log"))
        atomic_write_json({"seconds": seconds}, timing_path(method))
    waiting = [m for m in METHODS if not os.path.exists(timing_path(m))]
    if waiting:
        print(f"prepare shard {SHARD}: its trigger sets are done; the benign runs wait for {' '.join(waiting)} "
              f"(the shard that finishes last runs them, or rerun --stage prepare without --shard)", flush=True)
        return
    prepared = read_json(prepared_path(), "prepare record") if os.path.exists(prepared_path()) else None
    if prepared is None or list(prepared["methods"]) != METHODS:   # dynamic batching mixes every method's triggers
        atomic_write_json(benign_calibration(), prepared_path())


def load_sets(device):
    """The model, its metadata and every method's watermark (triggers checked against the key count)."""
    model, meta = load_classifier(model_path(), device)
    return model, meta, {m: load_watermark(os.path.join(method_dir(m), "triggers")) for m in METHODS}


def benign_calibration():
    """Per method: its benign runs (named envelope settings, then dynamic batching), its cost, and the hashes
    (recomputed) of the model and trigger set every cell must be made with; the classifier's training seconds
    (None when --model gave it) and this calibration's own, for the report's compute line."""
    started = time.time()
    model, meta, sets = load_sets("cpu")
    spec = get_spec(meta["dataset"])
    traffic = balanced_subset(load_split(spec, DATA_DIR, False), TEST_SUBSET, spec.num_classes).images
    print(f"== benign runs: the envelope's settings and {DYNAMIC_BATCH_RUNS} of dynamic batching", flush=True)
    dynamic = field_bench.dynamic_batch_runs(model, {m: (w.triggers, w.key) for m, w in sets.items()}, traffic,
                                             DYNAMIC_BATCH_RUNS)
    methods = {}
    for m, w in sets.items():
        envelope = w.meta.get("envelope") or ["exact"]
        methods[m] = {"num_triggers": len(w.key), "query_order": w.meta.get("query_order"),
                      "generation_seconds": read_json(timing_path(m), "timing")["seconds"],
                      "envelope": envelope, "triggers_sha256": field_bench.trigger_set_sha256(w.triggers, w.key),
                      "benign_runs": field_bench.envelope_runs(model, w.triggers, w.key, meta, envelope) + dynamic[m]}
    return {"model": model_path(), "model_sha256": model_sha256(model), "dataset": meta["dataset"],
            "arch": meta["arch"], "methods": methods,
            "train_seconds": None if MODEL else logged_training_seconds(model_path()),
            "calibration_seconds": round(time.time() - started, 1)}


# ----------------------------------------------------------------------------- run

def evaluation_context(model, meta, sets, device):
    """The context every modification runs in (its probe: the first method's triggers) and one probe per method."""
    spec = get_spec(meta["dataset"])
    train = balanced_subset(load_split(spec, DATA_DIR, True), ATTACK_SUBSET, spec.num_classes).to(device)
    test = balanced_subset(load_split(spec, DATA_DIR, False), TEST_SUBSET, spec.num_classes).to(device)
    probes = {m: Probe(w.triggers.to(device), torch.tensor(w.key), test, query_order=w.meta.get("query_order"),
                       model_meta=meta) for m, w in sets.items()}
    first = sets[METHODS[0]]
    ctx = EvalContext(model, spec, train, device, probes[METHODS[0]], finetune=FinetuneParams(epochs=FINETUNE_EPOCHS),
                      deployment=Deployment(first.meta, None, meta), log=lambda line: None)
    return ctx, probes


def check_prepared(prepared, settings):
    """The model and trigger sets, hashed afresh, must be those the benign runs were calibrated on."""
    missing = [m for m in METHODS if m not in prepared["methods"]]
    if missing:
        raise UserError(f"{prepared_path()} has no trigger set of {' '.join(missing)}: run --stage prepare with "
                        f"these --methods")
    report.check_same(report.prepared_hashes(prepared), {k: settings[k] for k in ("model_sha256", "triggers_sha256")},
                      "hashes", prepared_path())


def cell_order():
    """Every (modification, trial), trial by trial: a bench stopped early has every modification at fewer trials
    (the report of the cells done so far has every row). Each trial starts one modification later, so that with
    an even number of shards no shard gets the same half of the zoo in every trial."""
    count = len(MODIFICATIONS)
    return [(MODIFICATIONS[(i + t) % count], t) for t in range(TRIALS) for i in range(count)]


def my_cells():
    index, count = parse_shard(SHARD)
    return cell_order()[index::count]


def run_cells():
    """This shard's cells, each skipped when its file holds the same settings; refused when it holds others."""
    prepared = read_json(prepared_path(), "the bench's prepare record (run --stage prepare first)")
    torch.set_num_threads(THREADS)
    model, meta, sets = load_sets(DEVICE)
    shas = {m: field_bench.trigger_set_sha256(w.triggers, w.key) for m, w in sets.items()}
    settings = cell_settings(model_sha256(model), shas)
    check_prepared(prepared, settings)
    ctx, probes = evaluation_context(model, meta, sets, torch.device(DEVICE))
    todo = [(m, t) for m, t in my_cells() if not report.cell_done(cell_path(m, t), settings, OVERWRITE)]
    print(f"shard {SHARD}: {len(todo)} cells to run of {len(my_cells())}", flush=True)
    for modification, trial in todo:
        cell = field_bench.run_cell(ctx, ATTACKS[modification], zoo_params(modification), trial, probes)
        atomic_write_json({"modification": modification, "trial": trial, "settings": settings, **cell},
                          cell_path(modification, trial))
        flips = " ".join(f"{m} {len(c['flipped'])}" for m, c in cell["methods"].items())
        print(f"  {modification} trial {trial}: {cell['seconds']} s, clean acc {cell['clean_accuracy']:.4f}; "
              f"flipped: {flips}", flush=True)


# ----------------------------------------------------------------------------- main

def main():
    apply_overrides(globals(), __doc__, choices={"DATASET": list(DATASETS)})
    check_settings()
    os.makedirs(OUT, exist_ok=True)
    lock = open(os.path.join(OUT, f".shard-{SHARD.replace('/', '-of-')}.lock"), "w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise UserError(f"another field_bench.py runs shard {SHARD} on {OUT}: wait for it, or use --out") from None
    if STAGE in ("all", "prepare"):
        prepare()
    if STAGE in ("all", "run"):
        run_cells()
    if STAGE in ("all", "report"):
        prepared = read_json(prepared_path(), "the bench's prepare record (run --stage prepare first)")
        bench = report.write_report(OUT, prepared, [(m, t) for m in MODIFICATIONS for t in range(TRIALS)],
                                    cell_path, FPR_TARGETS)
        print(bench["markdown"])
        print(f"bench -> {os.path.join(OUT, 'bench.json')} (+ .md, .png)")
        return 0 if bench["complete"] else 1
    return 0


if __name__ == "__main__":
    run_main(main, interrupted="interrupted; rerun the same command to resume (finished cells are kept)")
