"""Shared fixtures: a tiny watermarked model on synthetic data, built once per test session.

Tests mirror the packages (tests/core, tests/watermark, tests/tamper, tests/report,
tests/models); tests/scripts runs the scripts as a user runs them (subprocesses: exit codes and error lines
are tested too) and is marked ``integration`` (``pytest -m integration`` / ``-m "not integration"``).
"""
import dataclasses
import fcntl
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest
import torch

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)
sys.path[:0] = [ROOT, TESTS]   # the suite, and this file as ``conftest`` from every test folder
# every core, unless OMP_NUM_THREADS gives this process its share (scripts/test.sh does, per worker)
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or 0) or max(1, os.cpu_count() or 1))

FASHION_PACKAGE = "/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz"
requires_fashion_mnist = pytest.mark.skipif(not os.path.exists(FASHION_PACKAGE),
                                            reason="Debian's dataset-fashion-mnist package is not installed")


def run_script(script, *args, check=True, cwd=None, env=None):
    """Run one of the suite's scripts; returns the CompletedProcess (stdout/stderr as text)."""
    proc = subprocess.run([sys.executable, os.path.join(ROOT, script), *map(str, args)], cwd=cwd or ROOT,
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ROOT, **(env or {})})
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} {' '.join(map(str, args))} exited {proc.returncode}\n"
                             f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}")
    return proc


def interrupted_train(args, out):
    """Start train.py, SIGKILL it as soon as its first resume file exists; that resume file's path.
    Skips the test when the run finished (or failed) before it could be interrupted."""
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), *map(str, args), "--out", str(out)],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    resume_file = str(out)[:-3] + ".resume.pt"
    deadline = time.time() + 300
    while not os.path.exists(resume_file) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    if not os.path.exists(resume_file):
        pytest.skip("the run finished before it could be interrupted")
    return resume_file


class _Payload:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def write_pickle_bomb(path, marker):
    """A checkpoint whose metadata, if ever unpickled with code execution, creates ``marker``."""
    payload = _Payload()
    payload.marker = marker
    torch.save({"format": "fragile-wm/1", "state_dict": {}, "meta": payload}, path)


def built_once(tmp_path_factory, name, build):
    """What ``build(folder)`` returns (JSON), built once for the whole run: xdist's workers share the folder above
    their own temp folders, the first to ask builds there under a lock, the others read what it recorded. Why: each
    worker would otherwise train and watermark its own copy of the same model (minutes of CI time)."""
    own = tmp_path_factory.getbasetemp()
    shared = own.parent if os.environ.get("PYTEST_XDIST_WORKER") else own
    record = shared / f"{name}.json"
    with open(shared / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)   # released when the file closes, also when a build fails
        if not record.exists():
            folder = shared / name
            folder.mkdir(exist_ok=True)
            record.write_text(json.dumps(build(folder)))
    return json.loads(record.read_text())


@pytest.fixture(scope="session")
def watermarked(tmp_path_factory):
    """resnet8 trained on synthetic data, with 30 paper triggers and a seeded key.

    Returns a dict of paths: model, triggers (folder), key, root (the tmp folder).
    """
    def build(root):
        model = root / "resnet8_synthetic.pt"
        run_script("train.py", "--dataset", "synthetic", "--arch", "resnet8", "--epochs", "3", "--device", "cpu",
                   "--recipe", "fast", "--out", model, "--no-progress")
        run_script("generate_samples.py", "--model", model, "--num-triggers", 30, "--key-seed", 0, "--device", "cpu",
                   "--recipe", "fast", "--no-progress")
        triggers, key = root / "resnet8_synthetic_triggers_paper", root / "resnet8_synthetic_key_paper.json"
        return {"model": str(model), "triggers": str(triggers), "key": str(key), "root": str(root),
                "key_labels": json.load(open(key))["labels"]}
    paths = built_once(tmp_path_factory, "wm", build)
    return {**paths, "root": pathlib.Path(paths["root"])}


@pytest.fixture(scope="session")
def trajectories(watermarked, tmp_path_factory):
    """Clean fine-tuning with two seeds and poisoned fine-tuning with one, written by eval.py (100 samples in
    batches of 25: 4 steps an epoch, so early steps 1 and 2 fall inside the first epoch)."""
    def build(out):
        args = ("--epochs", 2, "--train-subset", 100, "--test-subset", 100, "--batch-size", 25, "--device", "cpu",
                "--no-progress", "--results-dir", out, "--model", watermarked["model"])
        run_script("eval.py", "--attack", "finetune", "--seeds", 0, 1, *args)
        run_script("eval.py", "--attack", "poison", "--seeds", 0, *args)
        return {attack: str(out / f"resnet8_synthetic_paper_{attack}.json") for attack in ("finetune", "poison")}
    paths = built_once(tmp_path_factory, "plot_results", build)
    return {**paths, "dir": pathlib.Path(paths["finetune"]).parent,
            "loaded": {a: json.load(open(p)) for a, p in paths.items()}}


def tiny_model():
    """A tiny untrained resnet8 on synthetic data in eval mode and the metadata a checkpoint of it would carry
    (enough for every named deployment, the ONNX ones included); the same weights on every call."""
    from fragile.core.data import DATASETS
    from fragile.core.io import model_sha256
    from models import build_classifier
    spec = DATASETS["synthetic"]
    torch.manual_seed(0)
    model = build_classifier("resnet8", spec).eval()
    meta = {"arch": "resnet8", "dataset": "synthetic", "num_classes": spec.num_classes,
            "input_shape": list(spec.shape), "weights_sha256": model_sha256(model)}
    return model, meta


# ----------------------------------------------------------------------------- parameters, built directly

def paper_params(**changes):
    """The paper generator's parameters at test size (the fast recipe's width and learning rate)."""
    from fragile.watermark.methods.paper import PaperParams
    values = dict(latent_dim=512, latent_seed=0, gen_channels=64, lam=150.0, lr=3e-3, beta1=0.5, beta2=0.999,
                  max_steps=2000)
    return PaperParams(**{**values, **changes})


def margin_params(surrogates=0, select_draws=8, **changes):
    """``margin``'s parameters for the synthetic resnet8: a short run, ``surrogates`` fine-tuned copies."""
    from fragile.watermark.methods.fragility import FragilityParams
    from fragile.watermark.methods.margin import MarginParams
    from fragile.watermark.methods.surrogates import SurrogateParams
    values = dict(start="natural", safety=10.0, band=4.0, steps=40, lr=2.0 / 255, pool=2, grid_rounds=30,
                  candidates=32, control_seed=0, envelope=["exact"],
                  surrogates=SurrogateParams(count=surrogates, steps=16, subset=1024, lr=1e-3, momentum=0.9,
                                             weight_decay=1e-3, batch_size=64, mix_bn=True, gap=0.3),
                  fragility=FragilityParams(noise_sigma=1e-4, select_draws=select_draws), paper=paper_params())
    return MarginParams(**{**values, **changes})


@pytest.fixture(scope="session")
def margin_set(watermarked, tmp_path_factory):
    """A few margin triggers made in-process on the session model: the closest to the boundary any method gets
    (the band alone: no fine-tuned copies). (uint8 triggers, key, trigger metadata)."""
    def build(folder):
        from fragile.core.data import get_spec, load_split
        from fragile.core.io import load_classifier
        from fragile.watermark import methods
        model, _ = load_classifier(watermarked["model"])
        spec = get_spec("synthetic")
        key = torch.randint(0, spec.num_classes, (12,), generator=torch.Generator().manual_seed(5)).tolist()
        job = methods.TriggerJob(model, spec, key, torch.device("cpu"), load_split(spec, "data", False))
        triggers, info = methods.generate("margin", job, margin_params())
        torch.save(triggers, folder / "triggers.pt")
        return {"triggers": str(folder / "triggers.pt"), "key": key, "meta": info["meta"]}
    made = built_once(tmp_path_factory, "margin_set", build)
    return torch.load(made["triggers"], weights_only=True), made["key"], made["meta"]


def finetune_params(**changes):
    """The paper's fine-tuning at test size: one epoch, batch 64, no early steps, fp32."""
    from fragile.tamper.context import FinetuneParams
    return FinetuneParams(**{**dict(epochs=1, batch_size=64, amp=False, early_steps=[]), **changes})


def poison_params(**changes):
    from fragile.tamper.context import PoisonParams
    return PoisonParams(**changes)


def eval_context(model, triggers, key, train_size=256, test_size=300, probe=None, deployment=None, **changes):
    """What eval.py hands an attack, on class-balanced synthetic splits of the given sizes; ``probe`` and
    ``deployment`` (dicts) replace fields of those parts (``probe={"backdoor": ...}``), ``changes`` fields of the
    context itself."""
    from fragile.core.data import balanced_subset, get_spec, load_split
    from fragile.tamper.context import Deployment, EvalContext, Probe
    spec = get_spec("synthetic")
    train = balanced_subset(load_split(spec, "data", True), train_size, spec.num_classes)
    test = balanced_subset(load_split(spec, "data", False), test_size, spec.num_classes)
    the_probe = Probe(triggers, torch.as_tensor(key), test, **(probe or {}))
    ctx = EvalContext(model, spec, train, torch.device("cpu"), the_probe, finetune_params(), poison_params(),
                      Deployment(**(deployment or {})), log=lambda *args: None)
    return dataclasses.replace(ctx, **changes)


def session_context(watermarked, train_size, test_size):
    """eval_context around a fresh load of the session model and its paper triggers (each caller its own copy)."""
    from fragile.core.io import load_classifier
    from fragile.watermark.trigger_io import load_triggers
    model, _ = load_classifier(watermarked["model"], "cpu")
    triggers, _ = load_triggers(watermarked["triggers"])
    return eval_context(model, triggers, watermarked["key_labels"], train_size=train_size, test_size=test_size)


def results_file(run, attack, model_path, num_triggers, method="paper", params=None):
    """A results record as eval.py builds it, around one run made in process."""
    from fragile.core.io import read_checkpoint
    from fragile.tamper import records
    meta = read_checkpoint(model_path)["meta"]
    settings = records.settings_record({"seeds": [run["seed"]], "max_mismatches": 0}, attack=params)
    return records.results_record(attack, method, model_path, meta, {}, num_triggers, settings, {}, {}, "cpu", 1,
                                  0.0, [run])


@pytest.fixture(scope="session")
def compare_results(watermarked, tmp_path_factory):
    """The comparison on the session's paper triggers, run in process with few trials and a small fine-tuning
    set, written as eval.py writes it. (path, results)."""
    from fragile.tamper.records import read_results

    def build(folder):
        from fragile.core.io import load_classifier
        from fragile.tamper.compare import CompareParams, run_comparison
        from fragile.tamper.records import write_results
        from fragile.watermark.paths import load_watermark, tensor_file
        model, meta = load_classifier(watermarked["model"])
        watermark = load_watermark(watermarked["triggers"])
        ctx = eval_context(model, watermark.triggers, watermark.key, train_size=512, test_size=200,
                           probe={"query_order": watermark.meta["query_order"]},
                           deployment={"trigger_meta": watermark.meta,
                                       "tensor_file": tensor_file(watermark.triggers_path), "model_meta": meta})
        params = CompareParams(trials=3)
        run, _ = run_comparison(ctx, params, seed=0)
        path = str(folder / "resnet8_synthetic_paper_compare.json")
        write_results(results_file(run, "compare", watermarked["model"], len(watermark.key), params=params), path)
        return {"path": path}
    path = built_once(tmp_path_factory, "compare", build)["path"]
    return path, read_results(path)
