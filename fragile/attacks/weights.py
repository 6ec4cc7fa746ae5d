"""Random weight tampering, trial by trial: Gaussian noise on every weight, one weight scaled, bits flipped.

Each sweep point runs independent trials from the original weights, each with a generator seeded by the
run's seed and the point; its record carries ``detection_probability``, ``mean_flipped`` and
``mean_queries_to_detection`` (the triggers asked in a shuffled order), with clean accuracy measured on a
few detected and a few missed trials.
"""
from dataclasses import dataclass, field

import torch

from ..core.training import accuracy
from ..core.weights import add_gaussian_noise, all_weights, flatten, write_flat
from ..watermark.verify import queries_to_detection, query_labels
from .context import choices, log_point, positive_int, scientific, sweep
from .perturb import BIT_CLASSES, flip_bits, nudge_one_weight, trial_generator


@dataclass(frozen=True)
class TrialParams:
    """What every trial-based attack shares: independent trials per sweep point, and how many detected and how
    many missed trials of each measure clean accuracy (a test-set pass each)."""
    trials: int
    accuracy_trials: int = field(metadata={"header": "TAMPER_ACCURACY_TRIALS"})


@dataclass(frozen=True)
class NoiseParams(TrialParams):
    """Gaussian noise of standard deviation sigma (absolute) on every weight."""
    HEADER_PREFIX = "NOISE_"
    sigmas: list


@dataclass(frozen=True)
class SingleWeightParams(TrialParams):
    """One weight times (1 +- epsilon), at a random nonzero weight and at the largest."""
    HEADER_PREFIX = "SINGLE_WEIGHT_"
    epsilons: list


@dataclass(frozen=True)
class BitflipParams(TrialParams):
    """One bit flipped in each of k distinct random weights, per bit class."""
    HEADER_PREFIX = "BITFLIP_"
    ks: list
    classes: list              # of BIT_CLASSES


# ----------------------------------------------------------------------------- trials

def trial_outcome(model, ctx, gen):
    """One random trial: flipped triggers, and queries to detection with the triggers asked in a shuffled order."""
    flipped_mask = query_labels(model, ctx.triggers) != ctx.key
    order = torch.randperm(len(ctx.key), generator=gen)
    return {"flipped": int(flipped_mask.sum()), "queries": queries_to_detection(flipped_mask, order, ctx.max_mismatches)}


def mean_or_none(values):
    return sum(values) / len(values) if values else None


def summarize_trials(outcomes, ctx, **coords):
    """One sweep point's record from its trials. ``detected`` is the majority verdict; the probability is
    ``detection_probability``; ``flipped`` is the mean rounded (the schema wants an int). Clean accuracy is
    kept apart for detected and missed trials (a missed tampering that costs accuracy is the one that
    matters); ``clean_accuracy`` weighs the two by the detection probability."""
    n, trials = len(ctx.key), len(outcomes)
    flips = [o["flipped"] for o in outcomes]
    queries = [o["queries"] for o in outcomes]
    found = [q for q in queries if q is not None]
    mean_flipped = sum(flips) / trials
    probability = len(found) / trials
    caught = mean_or_none([o["clean_accuracy"] for o in outcomes if "clean_accuracy" in o and o["queries"] is not None])
    missed = mean_or_none([o["clean_accuracy"] for o in outcomes if "clean_accuracy" in o and o["queries"] is None])
    parts = [(w, a) for w, a in ((probability, caught), (1 - probability, missed)) if w > 0 and a is not None]
    clean = sum(w * a for w, a in parts) / sum(w for w, _ in parts) if parts else None
    return {**coords, "flipped": int(round(mean_flipped)), "match_rate": 1 - mean_flipped / n,
            "detected": probability >= 0.5, "detection_probability": probability, "mean_flipped": mean_flipped,
            "max_flipped": max(flips), "mean_queries_to_detection": mean_or_none(found),
            "clean_accuracy": clean, "clean_accuracy_detected": caught, "clean_accuracy_missed": missed,
            "trials": trials, "flipped_per_trial": flips, "queries_per_trial": queries}


def run_trials(model, params, original, tamper, ctx, trials, accuracy_trials, gen):
    """``trials`` independent tamperings ``tamper(flat copy of the original weights, gen)``, each from the
    original weights; the model keeps the last. Clean accuracy (a test-set pass) is measured on the first
    ``accuracy_trials`` detected and the first ``accuracy_trials`` missed trials."""
    outcomes, measured = [], {True: 0, False: 0}
    for _ in range(trials):
        write_flat(params, tamper(original.clone(), gen))
        outcome = trial_outcome(model, ctx, gen)
        detected = outcome["queries"] is not None
        if measured[detected] < accuracy_trials:
            measured[detected] += 1
            outcome["clean_accuracy"] = accuracy(model, ctx.test, ctx.eval_batch_size)
        outcomes.append(outcome)
    return outcomes


def sweep_point(ctx, model, params, original, tamper, p, gen, **coords):
    """Run one sweep point's trials, summarize them into its record, and log it."""
    outcomes = run_trials(model, params, original, tamper, ctx, p.trials, p.accuracy_trials, gen)
    record = summarize_trials(outcomes, ctx, **coords)
    log_point(ctx, record)
    return record


# ----------------------------------------------------------------------------- the attacks

def tamper_setup(ctx, p):
    """A checked trial count, then the copy every trial tampers with, its weights and their original values."""
    positive_int(p, "trials")
    model = ctx.fresh_copy()
    params = all_weights(model)
    return model, params, flatten(params)


def run_noise(ctx, p, seed):
    """Gaussian noise of standard deviation sigma (absolute) on every weight, ``p.trials`` trials per sigma."""
    model, params, original = tamper_setup(ctx, p)
    records = []
    for sigma in sweep(p, "sigmas"):
        def add_noise(flat, gen, sigma=sigma):
            add_gaussian_noise([flat], sigma, gen)
            return flat
        records.append(sweep_point(ctx, model, params, original, add_noise, p, trial_generator(seed, "noise", sigma),
                                   setting=f"sigma={scientific(sigma)}", sigma=sigma))
    return {"seed": seed, "records": records}, model


def run_single_weight(ctx, p, seed):
    """One weight scaled by (1 +- epsilon): at a random nonzero weight, and at the weight of largest |w|
    (the same weight every trial, with a random sign)."""
    model, params, original = tamper_setup(ctx, p)
    nonzero = original.nonzero().flatten()
    largest = int(original.abs().argmax())
    records = []
    for position in ("random", "largest"):
        for epsilon in sweep(p, "epsilons"):
            def scale_one(flat, gen, position=position, epsilon=epsilon):
                nudge_one_weight(flat, gen, epsilon, index=largest if position == "largest" else None,
                                 candidates=nonzero)
                return flat
            gen = trial_generator(seed, "single-weight", position, epsilon)
            records.append(sweep_point(ctx, model, params, original, scale_one, p, gen,
                                       setting=f"eps={epsilon:g} ({position})", epsilon=epsilon, position=position,
                                       weights_changed=int(epsilon != 0)))
    return {"seed": seed, "records": records, "largest_weight": float(original[largest])}, model


def run_bitflip(ctx, p, seed):
    """One bit flipped in each of k distinct random weights, for each k and each bit class."""
    model, params, original = tamper_setup(ctx, p)
    records = []
    for bit_class in choices(p, "classes", BIT_CLASSES):
        for k in sweep(p, "ks", 1, len(original)):
            def flip_k(flat, gen, k=int(k), bits=BIT_CLASSES[bit_class]):
                positions = torch.randperm(len(flat), generator=gen)[:k].to(flat.device)
                chosen = [bits[i] for i in torch.randint(len(bits), (k,), generator=gen).tolist()]
                return flip_bits(flat, positions, chosen)
            gen = trial_generator(seed, "bitflip", bit_class, k)
            records.append(sweep_point(ctx, model, params, original, flip_k, p, gen, setting=f"k={k} ({bit_class})",
                                       k=int(k), bit_class=bit_class, weights_changed=int(k)))
    return {"seed": seed, "records": records}, model
