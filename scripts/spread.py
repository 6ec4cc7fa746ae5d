"""The paper's headline number with its spread: independent classifiers x independent trigger sets, each then
fine-tuned for one epoch with the paper's settings (clean and BadNets-poisoned); how many triggers flipped.

    .venv/bin/python scripts/spread.py                      # every group below, resumable; then the report
    .venv/bin/python scripts/spread.py --groups table       # one group
    .venv/bin/python scripts/spread.py --report-only        # the JSON, markdown and figure from what is done
    .venv/bin/python scripts/spread.py --workers 2          # two classifiers at a time (one thread each)

Groups (each a classifier scale; a unit is one (classifier seed, key seed, generator recipe)):
  table      resnet8, 20k images, 3 epochs: the README's recipe-table scale
  converged  resnet8, all 60k images, 10 epochs: REPRODUCTION.md's converged classifier
  resnet18   ResNet-18 (the paper's architecture), 20k images, 3 epochs
Every classifier, trigger set and fine-tuning is a plain run of train.py, generate_samples.py and eval.py, with
THREADS threads per process (the determinism contract: the same seed, thread count, device and torch version give
the same weights). Stopped anywhere, the same command resumes per (classifier seed, key seed): finished steps are
skipped, an interrupted classifier resumes from its last epoch. Writes OUT/spread.json, OUT/spread.md and
OUT/spread.png; docs/reproduction/spread/ holds the committed copy.
"""
# ----------------------------------------------------------------------------- config
OUT = "results/spread"
GROUPS = ["table", "converged", "resnet18"]
KEY_SEEDS = [3, 4]               # trigger sets per classifier (3 is the README's recipe-table key)
NUM_TRIGGERS = 100
FINETUNE_EPOCHS = 1
FINETUNE_SEED = 0
THREADS = 1                      # per process: part of the determinism contract
WORKERS = 1                      # classifiers trained (with their trigger sets and fine-tunings) at the same time
DATASET = "fashion-mnist"        # the real data; synthetic for a quick smoke run
DATA_DIR = "data"
DEVICE = "cpu"
REPORT_ONLY = False
# table: resnet8 at the recipe-table scale
TABLE_SEEDS = [0, 1, 2, 3, 4]
TABLE_SUBSET = 20000
TABLE_EPOCHS = 3
TABLE_PAPER_PAIRS = 3            # the first this many (classifier, key) pairs also get the paper's generator
# converged: resnet8 on the full training set, as REPRODUCTION.md
CONVERGED_SEEDS = [0, 1, 2]
CONVERGED_SUBSET = 60000
CONVERGED_EPOCHS = 10
CONVERGED_PAPER_PAIRS = 1
# resnet18: the paper's architecture at the recipe-table scale
RESNET18_SEEDS = [0, 1]
RESNET18_SUBSET = 20000
RESNET18_EPOCHS = 3
RESNET18_KEY_SEEDS = [3]
RESNET18_PAPER_PAIRS = 0
RESNET18_TEST_SUBSET = 2000      # eval.py's clean-accuracy images (ResNet-18 forwards cost minutes on a CPU)
# -----------------------------------------------------------------------------

import fcntl
import os
import sys
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from fragile.core.cli import UserError, apply_overrides, check_positive_int, run_logged, run_main  # noqa: E402
from fragile.core.data import DATASETS  # noqa: E402
from fragile.core.io import atomic_write_json, logged_training_seconds  # noqa: E402
from fragile.report import spread  # noqa: E402


class Runner:
    """Runs each step as the user would (a subprocess of the suite's script, THREADS threads), skipping steps whose
    output exists; each step's output goes to a log file beside it."""

    def __init__(self, out):
        self.out = out

    def step(self, name, script, args, done, log_dir):
        if os.path.exists(done):
            return None
        log = os.path.join(log_dir, name.replace(" ", "_") + ".log")
        print(f"== {name}", flush=True)
        seconds = run_logged(ROOT, script, args, log, THREADS, f"step {name!r}")
        print(f"   {name}: {seconds} s", flush=True)
        return seconds

    def classifier(self, group, seed):
        """Train classifier ``seed`` of ``group``, then make and fine-tune each of its trigger sets."""
        common = ["--device", DEVICE, "--data-dir", DATA_DIR, "--no-progress"]
        folder, model = group.classifier_dir(self.out, seed), group.model_path(self.out, seed)
        resume = ["--resume"] if os.path.exists(model[:-3] + ".resume.pt") else []
        tag = f"{group.name} seed {seed}"
        if self.step(f"{tag} train", "train.py",
                     ["--dataset", group.dataset, "--arch", group.arch, "--epochs", group.epochs, "--train-subset",
                      group.subset, "--seed", seed, "--out", model, *resume, *common], model, folder) is not None:
            atomic_write_json({"seconds": logged_training_seconds(model)}, os.path.join(folder, "train.json"))
        for key_seed, recipe in group.units(seed):
            unit = group.unit_dir(self.out, seed, key_seed, recipe)
            triggers, key = os.path.join(unit, "triggers"), os.path.join(unit, "key.json")
            seconds = self.step(f"{tag} key {key_seed} {recipe} generate", "generate_samples.py",
                                ["--model", model, "--key-seed", key_seed, "--recipe", recipe, "--num-triggers",
                                 NUM_TRIGGERS, "--out", triggers,
                                 "--key-out", key, *common], os.path.join(triggers, "triggers.pt"), unit)
            if seconds is not None:
                atomic_write_json({"seconds": seconds}, os.path.join(unit, "generate.json"))
            for attack in spread.ATTACKS:
                self.step(f"{tag} key {key_seed} {recipe} {attack}", "eval.py",
                          ["--model", model, "--triggers", triggers, "--key", key, "--attack", attack,
                           "--epochs", FINETUNE_EPOCHS, "--seeds", FINETUNE_SEED, "--train-subset", group.subset,
                           "--test-subset", group.test_subset, "--results-dir", os.path.join(unit, attack), *common],
                          group.results_file(self.out, seed, key_seed, recipe, attack), unit)

    def run(self, groups, workers):
        """Every classifier of every group, ``workers`` at a time; the first failure stops the rest."""
        os.makedirs(self.out, exist_ok=True)
        lock = open(os.path.join(self.out, ".spread.lock"), "w")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(f"another scripts/spread.py is running on {self.out}: wait for it, or use --out") from None
        with ThreadPoolExecutor(workers) as pool:
            futures = [pool.submit(self.classifier, g, s) for g in groups for s in g.seeds]
            done, pending = wait(futures, return_when=FIRST_EXCEPTION)
            for f in pending:
                f.cancel()
            for f in futures:
                if f.done() and not f.cancelled() and f.exception():
                    raise f.exception()


def groups():
    """The groups to run, as ``spread.Group`` objects built from the header."""
    known = {
        "table": spread.Group("table", "resnet8", TABLE_SUBSET, TABLE_EPOCHS, TABLE_SEEDS, KEY_SEEDS,
                              TABLE_PAPER_PAIRS, test_subset=0, dataset=DATASET),
        "converged": spread.Group("converged", "resnet8", CONVERGED_SUBSET, CONVERGED_EPOCHS, CONVERGED_SEEDS,
                                  KEY_SEEDS, CONVERGED_PAPER_PAIRS, test_subset=0, dataset=DATASET),
        "resnet18": spread.Group("resnet18", "resnet18", RESNET18_SUBSET, RESNET18_EPOCHS, RESNET18_SEEDS,
                                 RESNET18_KEY_SEEDS, RESNET18_PAPER_PAIRS, test_subset=RESNET18_TEST_SUBSET,
                                 dataset=DATASET),
    }
    unknown = [g for g in GROUPS if g not in known]
    if unknown or not GROUPS:
        raise UserError(f"--groups: choose from {', '.join(known)} (got {', '.join(unknown) or 'none'})")
    return [known[g] for g in dict.fromkeys(GROUPS)]


def main():
    apply_overrides(globals(), __doc__, choices={"DATASET": list(DATASETS)})
    chosen = groups()
    for group in chosen:
        group.check()
    check_positive_int("--threads", THREADS)
    check_positive_int("--workers", WORKERS)
    check_positive_int("--finetune-epochs", FINETUNE_EPOCHS)
    check_positive_int("--num-triggers", NUM_TRIGGERS)
    if not REPORT_ONLY:
        Runner(OUT).run(chosen, WORKERS)
    report = spread.write_report(OUT, chosen, THREADS, FINETUNE_EPOCHS)
    print(report["markdown"])
    print(f"spread -> {os.path.join(OUT, 'spread.json')} (+ .md, .png)")
    return 0 if report["complete"] else 1


if __name__ == "__main__":
    run_main(main, interrupted="interrupted; rerun the same command to resume (finished steps are kept)")
