"""The method comparison: every method faces the same perturbations, and its records cover every attack."""
import copy

import pytest
import torch

from fragile.core.io import load_classifier
from fragile.core.weights import add_gaussian_noise, all_weights, entry_name, flatten, write_flat
from fragile.tamper.compare import perturbation_generator, rival_correlation
from fragile.tamper.perturbation import nudge_one_weight


def test_perturbations_are_the_same_for_every_method(watermarked):
    model, _ = load_classifier(watermarked["model"])
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    add_gaussian_noise(a.parameters(), 1e-4, perturbation_generator(0, 10, 3))
    add_gaussian_noise(b.parameters(), 1e-4, perturbation_generator(0, 10, 3))
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    flat = flatten(all_weights(a))
    name, index = entry_name(a, nudge_one_weight(flat, perturbation_generator(0, 2, 0), 1e-3, relative=False))
    write_flat(all_weights(a), flat)
    assert (dict(a.named_parameters())[name].view(-1)[index] - dict(b.named_parameters())[name].view(-1)[index]).item() \
        == pytest.approx(1e-3, rel=1e-3)


def test_compare_records_every_attack_and_the_benign_matrix(compare_results):
    _, results = compare_results
    records = results["runs"][0]["records"]
    attacks = {r["attack"] for r in records}
    assert attacks == {"finetune", "noise", "single-weight", "obfuscate", "benign"}
    noise = [r for r in records if r["attack"] == "noise"]
    assert len(noise) == 3 * 3
    assert all(-1 <= r["rival_correlation"] <= 1 for r in noise)  # measured on every noise setting
    assert all("rival_correlation" not in r for r in records if r["attack"] != "noise")
    assert not any(r["detected"] for r in records if r["attack"] == "benign")
    assert all(r["mean_queries_to_detection"] is None or r["mean_queries_to_detection"] >= 1
               for r in records if r["attack"] != "benign")
    tampered = [r for r in records if r["attack"] != "benign"]
    for r in tampered:  # the fragility-order count exists exactly when something flipped
        assert (r["queries_in_fragility_order"] is None) == (r["flipped"] == 0)
        if r["flipped"]:
            assert 1 <= r["queries_in_fragility_order"] <= results["num_triggers"] - r["flipped"] + 1
    weight = next(r for r in records if r["attack"] == "single-weight")["weight"]
    assert weight.endswith("]") and "." in weight   # the parameter name and the index inside it


def test_rival_correlation_tells_exchangeable_noise_from_structured_noise():
    """0.5 when every class logit moves independently and equally (the 1 - 1/K ceiling applies), about 0 when
    the key logit stays put while the rivals move independently, about 1 when the rivals move together."""
    gen = torch.Generator().manual_seed(0)
    trials, n, k = 400, 30, 10
    clean = torch.randn(n, k, generator=gen)
    key = torch.randint(0, k, (n,), generator=gen)
    independent = clean + torch.randn(trials, n, k, generator=gen)
    assert rival_correlation(clean, independent, key) == pytest.approx(0.5, abs=0.05)
    still_key = independent.clone()
    still_key[:, torch.arange(n), key] = clean[torch.arange(n), key]
    assert rival_correlation(clean, still_key, key) == pytest.approx(0.0, abs=0.05)
    together = clean + torch.randn(trials, 1, 1, generator=gen) + 0.1 * torch.randn(trials, n, k, generator=gen)
    together[:, torch.arange(n), key] = clean[torch.arange(n), key]
    assert rival_correlation(clean, together, key) > 0.95
    assert rival_correlation(clean, independent[:2], key) is None  # too few trials to say
