"""Random weight tampering, trial by trial: Gaussian noise on every weight, one weight scaled, bits flipped.

    eval.py --attack noise           NoiseParams: sigma (absolute) on every weight
    eval.py --attack single-weight   SingleWeightParams: one weight times (1 +- epsilon)
    eval.py --attack bitflip         BitflipParams: one bit flipped in each of k weights, per bit class

Each sweep point runs independent trials from the original weights, each with a CPU generator seeded by the
run's seed and the point (so a seeded generator gives the same tampered model on any device and for every
trigger method); its record (fragile.tamper.records.trials_record) carries the detection probability, the
mean flips and the queries to detection (the triggers asked in a shuffled order), with clean accuracy
measured on a few detected and a few missed trials. The method comparison calls the same perturbations.
Gaussian noise on the weights is ``fragile.core.weights.add_gaussian_noise``: trigger generation ranks
triggers by it too, and it lives below both.
"""
import zlib
from dataclasses import dataclass, field

import torch

from ..core.cli import UserError
from ..core.weights import add_gaussian_noise, all_weights, flatten, write_flat
from ..watermark.queries import queries_to_detection
from . import records
from .context import log_point, scientific


@dataclass(frozen=True)
class NoiseParams:
    """Gaussian noise of standard deviation sigma (absolute) on every weight."""
    sigmas: list = field(default_factory=lambda: [1e-6, 1e-5, 1e-4, 1e-3, 1e-2])
    trials: int = 20                 # independent trials per sigma
    accuracy_trials: int = 3         # detected and missed trials each that measure clean accuracy


@dataclass(frozen=True)
class SingleWeightParams:
    """One weight times (1 +- epsilon), at a random nonzero weight and at the largest."""
    epsilons: list = field(default_factory=lambda: [1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0])
    trials: int = 20
    accuracy_trials: int = 3


@dataclass(frozen=True)
class BitflipParams:
    """One bit flipped in each of k distinct random weights, per bit class."""
    ks: list = field(default_factory=lambda: [1, 10, 100])
    classes: list = field(default_factory=lambda: ["mantissa-low", "mantissa-high", "exponent", "sign"])
    trials: int = 20
    accuracy_trials: int = 3


# ----------------------------------------------------------------------------- the perturbations

# float32 bit positions of each class: the low half of the mantissa barely moves a weight, the exponent
# can multiply it by 2^128.
BIT_CLASSES = {"mantissa-low": tuple(range(0, 12)), "mantissa-high": tuple(range(12, 23)),
               "exponent": tuple(range(23, 31)), "sign": (31,)}


def trial_generator(seed, *salt):
    """A CPU generator seeded by the run's seed and the trial's coordinates (the sweep point): trials
    reproduce and stay independent. (crc32, not hash(): Python salts string hashes per process.)"""
    return torch.Generator().manual_seed(zlib.crc32(repr((seed,) + salt).encode()))


def nudge_one_weight(flat, gen, epsilon, relative=True, index=None, candidates=None):
    """Change one entry of the weight vector ``flat`` in place: times (1 +- epsilon), the sign drawn at random,
    when ``relative``; plus epsilon otherwise. The entry is ``index``, else drawn uniformly from the indices
    ``candidates`` (default: every entry). Returns its index."""
    if index is None:
        drawn = int(torch.randint(len(flat) if candidates is None else len(candidates), (1,), generator=gen))
        index = drawn if candidates is None else int(candidates[drawn])
    if relative:
        sign = 1 if torch.rand(1, generator=gen).item() < 0.5 else -1
        flat[index] *= 1 + sign * epsilon
    else:
        flat[index] += epsilon
    return index


def flip_bits(flat, positions, bits):
    """A copy of the float32 vector ``flat`` with bit ``bits[i]`` of entry ``positions[i]`` flipped."""
    if flat.dtype != torch.float32:
        raise UserError(f"bit flips are defined here for float32 weights, not {flat.dtype}")
    flipped = flat.clone()
    as_int = flipped.view(torch.int32)
    masks = torch.tensor([(1 << b) if b < 31 else -(1 << 31) for b in bits], dtype=torch.int32, device=flat.device)
    as_int[positions] = torch.bitwise_xor(as_int[positions], masks)
    return flipped


# ----------------------------------------------------------------------------- trials

def trial_outcome(model, probe, gen):
    """One random trial: flipped triggers, and queries to detection with the triggers asked in a shuffled order."""
    flipped_mask = probe.flipped_mask(model)
    order = torch.randperm(probe.num_triggers, generator=gen)
    return {"flipped": int(flipped_mask.sum()),
            "queries": queries_to_detection(flipped_mask, order, probe.max_mismatches)}


def run_trials(model, params, original, tamper, probe, p, gen):
    """``p.trials`` independent tamperings ``tamper(flat copy of the original weights, gen)``, each from the
    original weights; the model keeps the last. Clean accuracy (a test-set pass) is measured on the first
    ``p.accuracy_trials`` detected and the first ``p.accuracy_trials`` missed trials."""
    outcomes, measured = [], {True: 0, False: 0}
    for _ in range(p.trials):
        write_flat(params, tamper(original.clone(), gen))
        outcome = trial_outcome(model, probe, gen)
        detected = outcome["queries"] is not None
        if measured[detected] < p.accuracy_trials:
            measured[detected] += 1
            outcome["clean_accuracy"] = probe.clean_accuracy(model)
        outcomes.append(outcome)
    return outcomes


def sweep_point(ctx, model, params, original, tamper, p, gen, setting, **coords):
    """Run one sweep point's trials, summarize them into its record, and log it."""
    outcomes = run_trials(model, params, original, tamper, ctx.probe, p, gen)
    record = records.trials_record(setting, outcomes, ctx.probe.num_triggers, coords)
    log_point(ctx, record)
    return record


# ----------------------------------------------------------------------------- the attacks

def tamper_setup(ctx):
    """The copy every trial tampers with, its weights and their original values."""
    model = ctx.fresh_copy()
    params = all_weights(model)
    return model, params, flatten(params)


def run_noise(ctx, p, seed):
    """Gaussian noise of standard deviation sigma (absolute) on every weight, ``p.trials`` trials per sigma."""
    model, params, original = tamper_setup(ctx)
    points = []
    for sigma in p.sigmas:
        def add_noise(flat, gen, sigma=sigma):
            add_gaussian_noise([flat], sigma, gen)
            return flat
        points.append(sweep_point(ctx, model, params, original, add_noise, p, trial_generator(seed, "noise", sigma),
                                   setting=f"sigma={scientific(sigma)}", sigma=sigma))
    return records.run_record(seed, points), model


def run_single_weight(ctx, p, seed):
    """One weight scaled by (1 +- epsilon): at a random nonzero weight, and at the weight of largest |w|
    (the same weight every trial, with a random sign)."""
    model, params, original = tamper_setup(ctx)
    nonzero = original.nonzero().flatten()
    largest = int(original.abs().argmax())
    points = []
    for position in ("random", "largest"):
        for epsilon in p.epsilons:
            def scale_one(flat, gen, position=position, epsilon=epsilon):
                nudge_one_weight(flat, gen, epsilon, index=largest if position == "largest" else None,
                                 candidates=nonzero)
                return flat
            gen = trial_generator(seed, "single-weight", position, epsilon)
            points.append(sweep_point(ctx, model, params, original, scale_one, p, gen,
                                       setting=f"eps={epsilon:g} ({position})", epsilon=epsilon, position=position,
                                       weights_changed=int(epsilon != 0)))
    return records.run_record(seed, points, largest_weight=float(original[largest])), model


def run_bitflip(ctx, p, seed):
    """One bit flipped in each of k distinct random weights, for each k and each bit class."""
    model, params, original = tamper_setup(ctx)
    points = []
    for bit_class in p.classes:
        for k in p.ks:
            if k > len(original):
                raise UserError(f"cannot flip bits in {k} weights: the model has {len(original)}")
            def flip_k(flat, gen, k=int(k), bits=BIT_CLASSES[bit_class]):
                positions = torch.randperm(len(flat), generator=gen)[:k].to(flat.device)
                chosen = [bits[i] for i in torch.randint(len(bits), (k,), generator=gen).tolist()]
                return flip_bits(flat, positions, chosen)
            gen = trial_generator(seed, "bitflip", bit_class, k)
            points.append(sweep_point(ctx, model, params, original, flip_k, p, gen, setting=f"k={k} ({bit_class})",
                                       k=int(k), bit_class=bit_class, weights_changed=int(k)))
    return records.run_record(seed, points), model
