"""generate_samples.py as a user runs it: every method's triggers carry the key after 8-bit export, the model
is unchanged, margin triggers flip under fine-tuning they never saw, bad input is one line."""
import copy
import json
import os

import pytest
import torch

from conftest import run_script
from fragile.core.data import balanced_subset, get_spec, load_split
from fragile.core.devices import seed_everything
from fragile.core.io import load_classifier
from fragile.core.training import make_sgd, train_steps
from fragile.core.weights import add_gaussian_noise
from fragile.experiments.compare import perturbation_generator
from fragile.watermark.keys import load_key, make_key
from fragile.watermark.trigger_io import load_triggers
from fragile.watermark.verify import query_labels

pytestmark = pytest.mark.integration
NUM_TRIGGERS = 20


# Few steps: the synthetic resnet8 is small and these tests check behaviour, not the best numbers.
FAST_FLAGS = {"random": [], "natural": [],
              "ftg": ["--ftg-steps", 60],
              "margin": ["--margin-steps", 60, "--margin-grid-rounds", 40, "--margin-pool", 2, "--margin-select-draws", 8,
                         "--margin-surrogates", 1, "--margin-surrogate-steps", 16, "--margin-surrogate-subset", 1024,
                         "--margin-surrogate-batch-size", 64]}


@pytest.fixture(scope="module")
def method_triggers(watermarked):
    """{method: (trigger folder, key file)} for the session's resnet8; paper is the fixture's own set."""
    sets = {"paper": (watermarked["triggers"], watermarked["key"])}
    for method, flags in FAST_FLAGS.items():
        folder = watermarked["root"] / f"{method}_triggers"
        key = watermarked["root"] / f"{method}_key.json"
        run_script("generate_samples.py", "--model", watermarked["model"], "--method", method,
                   "--num-triggers", NUM_TRIGGERS, "--key-seed", 3, "--device", "cpu", "--out", folder,
                   "--key-out", key, "--no-progress", *flags)
        sets[method] = (str(folder), str(key))
    return sets


@pytest.fixture(scope="module")
def model(watermarked):
    return load_classifier(watermarked["model"])[0]


def flipped_fraction_under_noise(model, triggers, key, sigma, trials=4):
    """Mean fraction of triggers whose label leaves the key under Gaussian weight noise (seeded trials)."""
    key = torch.tensor(key)
    fractions = []
    for trial in range(trials):
        noisy = copy.deepcopy(model)
        add_gaussian_noise(noisy.parameters(), sigma, perturbation_generator(0, 10, trial))
        fractions.append((query_labels(noisy, triggers) != key).float().mean().item())
    return sum(fractions) / trials


@pytest.mark.parametrize("method", ["paper", "random", "natural", "ftg", "margin"])
def test_every_method_matches_the_key_after_8bit_export(method_triggers, model, method):
    folder, key_path = method_triggers[method]
    key, _ = load_key(key_path)
    from_png, meta = load_triggers(folder)
    from_tensor, _ = load_triggers(os.path.join(folder, "triggers.pt"))
    assert from_png.dtype == torch.uint8 and torch.equal(from_png, from_tensor)
    assert query_labels(model, from_png).tolist() == key
    assert query_labels(model, from_png, batch_size=1).tolist() == key
    assert meta["method"] == method
    assert sorted(meta["query_order"]) == list(range(len(key)))  # a permutation: every trigger queried once


def test_controls_flip_far_less_than_margin(method_triggers, model):
    """The same weight noise on the same model: the unoptimised controls barely move, margin triggers do."""
    fractions = {}
    for method in ("random", "natural", "margin"):
        folder, key_path = method_triggers[method]
        fractions[method] = flipped_fraction_under_noise(model, load_triggers(folder)[0], load_key(key_path)[0], 1e-3)
    assert fractions["margin"] >= 0.5, fractions
    assert fractions["random"] <= fractions["margin"] / 3, fractions
    assert fractions["natural"] <= fractions["margin"] / 3, fractions


def test_ftg_and_margin_record_psnr_to_their_natural_start(method_triggers):
    for method in ("ftg", "margin"):
        meta = json.load(open(os.path.join(method_triggers[method][0], "meta.json")))
        assert meta["psnr_to_start"]["mean_db"] is None or meta["psnr_to_start"]["mean_db"] > 10


def test_generate_samples_rejects_an_unknown_method(watermarked):
    proc = run_script("generate_samples.py", "--model", watermarked["model"], "--method", "nope", check=False)
    assert proc.returncode == 2 and "invalid choice" in proc.stderr


def fine_tuned_flip_fraction(model, watermarked, triggers, key, steps=16):
    """An attacker's fine-tuning (the paper's SGD settings, eval.py's seed 0 and data) for a few steps."""
    spec = get_spec("synthetic")
    data = balanced_subset(load_split(spec, "data", True), 1024, spec.num_classes)
    tampered = copy.deepcopy(model).requires_grad_(True)
    seed_everything(0)
    optimizer = make_sgd(tampered, 1e-3, 0.9, 1e-3, kernels="for-loop", decay_all=False)
    for step, _, _, _ in train_steps(tampered, optimizer, data, spec, torch.Generator().manual_seed(0), 64, "cpu"):
        if step >= steps:
            break
    return (query_labels(tampered.eval(), triggers) != torch.tensor(key)).float().mean().item()


def test_margin_triggers_flip_under_fine_tuning_they_never_saw(method_triggers, model, watermarked):
    """The surrogates were fine-tuned with other seeds on another data sample; the attacker's run still
    flips most margin triggers and far more than the controls."""
    fractions = {m: fine_tuned_flip_fraction(model, watermarked, load_triggers(method_triggers[m][0])[0],
                                             load_key(method_triggers[m][1])[0])
                 for m in ("random", "natural", "margin")}
    assert fractions["margin"] >= 0.7, fractions
    assert fractions["random"] <= fractions["margin"] / 3, fractions
    assert fractions["natural"] <= fractions["margin"] / 2, fractions


def test_margin_metadata_records_the_surrogates(method_triggers):
    meta = json.load(open(os.path.join(method_triggers["margin"][0], "meta.json")))
    assert meta["surrogates"]["count"] == 1 and meta["surrogates"]["steps"] == 16
    assert meta["margins"]["surrogate_off_key_kept"] >= 0.9  # built to be off its key there


def test_model_weights_are_unchanged_by_generation(watermarked, tmp_path):
    _, meta = load_classifier(watermarked["model"])
    out = run_script("generate_samples.py", "--model", watermarked["model"], "--num-triggers", 10, "--key-seed", 3,
                     "--device", "cpu", "--out", tmp_path / "t", "--key-out", tmp_path / "k.json", "--no-progress",
                     "--recipe", "fast")
    before = [l for l in out.stdout.splitlines() if l.startswith("before:")][0].split()
    after = [l for l in out.stdout.splitlines() if l.startswith("after:")][0].split()
    assert before[3] == after[3] == meta["weights_sha256"]  # sha256 before/after, and as in the checkpoint
    assert before[6] == after[6]                              # test accuracy
    assert json.load(open(tmp_path / "k.json"))["labels"] == make_key(10, 10, 3)[0]


@pytest.mark.parametrize("envelope, expected", [(["fp32"], "invalid choice"), (["cuda"], "needs a GPU")])
def test_generate_refuses_a_bad_envelope_in_one_line(watermarked, tmp_path, envelope, expected):
    if "cuda" in envelope and torch.cuda.is_available():
        pytest.skip("a GPU is present: the cuda entry is valid here")
    proc = run_script("generate_samples.py", "--model", watermarked["model"], "--envelope", *envelope,
                      "--out", tmp_path / "t", "--device", "cpu", check=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and expected in lines[0], proc.stderr


def test_generator_header_is_the_paper_generator():
    import generate_samples
    assert generate_samples.RECIPE == "paper"
    paper = {"GEN_CHANNELS": 512, "LR": 1e-4, "LAMBDA": 150.0, "BETA1": 0.5, "BETA2": 0.999, "LATENT_DIM": 512}
    assert {k: getattr(generate_samples, k) for k in paper} == paper   # the paper's code
