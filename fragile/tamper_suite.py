"""The tamper suite beyond fine-tuning: every way a deployed model's weights can be changed, from one bit
of one weight to pruning a layer, each measured against the fragile watermark.

Every attack is ``attack(ctx, seed) -> (run, tampered model or None)``, registered in ``TAMPER_ATTACKS``
(``eval.py --attack NAME``); its parameters are eval.py header constants (``ctx.config``). Sweep records
carry a ``setting`` label and their coordinate (``sigma``, ``k``, ``epsilon``, ``ratio``, ``mode``...);
trial-based records add ``detection_probability``, ``mean_flipped`` and ``mean_queries_to_detection``.

"Weights" are every trainable parameter (convolution and linear weights, biases, BatchNorm scales and
shifts). Pruning and obfuscation act on convolution and linear weights only, as their originals do.
BatchNorm running statistics are buffers and are only touched by the precision round trips.
"""
import dataclasses
import math
import zlib

import torch
import torch.nn.functional as F

from .attacks import attack_success_rate, fine_tune, watermark_state
from .checkpoint_io import read_checkpoint
from .cli import UserError
from .data import train_batches
from .training import accuracy
from .verification import query_labels

# float32 bit positions of each class: the low half of the mantissa barely moves a weight, the exponent
# can multiply it by 2^128.
BIT_CLASSES = {"mantissa-low": tuple(range(0, 12)), "mantissa-high": tuple(range(12, 23)),
               "exponent": tuple(range(23, 31)), "sign": (31,)}
QUANTIZE_MODES = ("fp16", "bf16", "int8", "int8-tensor")


# ----------------------------------------------------------------------------- weights as one vector

def all_weights(model):
    return list(model.parameters())


def matrix_weights(model):
    """Convolution and linear weights: what pruning and NNSplitter-style obfuscation act on."""
    return [p for p in model.parameters() if p.ndim > 1]


@torch.no_grad()
def flatten(params):
    """A detached copy of ``params`` as one vector."""
    return torch.cat([p.detach().reshape(-1) for p in params]).clone()


@torch.no_grad()
def write_flat(params, flat):
    """Copy the vector ``flat`` back into ``params`` (in place: the model object stays the same)."""
    offset = 0
    for p in params:
        p.copy_(flat[offset:offset + p.numel()].view_as(p))
        offset += p.numel()


def count_changed(model, reference):
    """Parameter entries that differ, bit for bit, between two models of the same architecture."""
    a, b = flatten(all_weights(model)), flatten(all_weights(reference))
    return int((a.view(torch.int32) != b.view(torch.int32)).sum()) if a.dtype == torch.float32 else int((a != b).sum())


def generator(seed, *salt):
    """A CPU generator seeded by the run's seed and the sweep point: trials reproduce and stay independent.
    (crc32, not hash(): Python salts string hashes per process.)"""
    return torch.Generator().manual_seed(zlib.crc32(repr((seed,) + salt).encode()))


# ----------------------------------------------------------------------------- tampering primitives

def flip_bits(flat, positions, bits):
    """A copy of the float32 vector ``flat`` with bit ``bits[i]`` of entry ``positions[i]`` flipped."""
    if flat.dtype != torch.float32:
        raise UserError(f"bit flips are defined here for float32 weights, not {flat.dtype}")
    flipped = flat.clone()
    as_int = flipped.view(torch.int32)
    masks = torch.tensor([(1 << b) if b < 31 else -(1 << 31) for b in bits], dtype=torch.int32, device=flat.device)
    as_int[positions] = torch.bitwise_xor(as_int[positions], masks)
    return flipped


def magnitude_prune(params, ratio):
    """Global magnitude pruning: zero the ``ratio`` fraction of entries with the smallest |w|. Returns the count."""
    flat = flatten(params)
    n = int(round(ratio * flat.numel()))
    if n:
        flat[torch.topk(flat.abs(), n, largest=False).indices] = 0
        write_flat(params, flat)
    return n


@torch.no_grad()
def precision_round_trip(model, dtype):
    """Store every float tensor (weights and BatchNorm statistics) in ``dtype`` and read it back as float32."""
    for tensor in model.state_dict().values():
        if tensor.is_floating_point():
            tensor.copy_(tensor.to(dtype).to(tensor.dtype))


@torch.no_grad()
def int8_weight_only(model, per_channel=True):
    """Symmetric absmax int8 quantization of convolution and linear weights, dequantized back (weight-only
    int8 inference computes with exactly these values); per output channel, or one scale per tensor."""
    for p in matrix_weights(model):
        rows = p.reshape(len(p), -1)
        absmax = rows.abs().amax(dim=1, keepdim=True) if per_channel else rows.abs().max().expand(len(p), 1)
        scale = (absmax / 127).clamp_min(torch.finfo(torch.float32).tiny)
        p.copy_((rows / scale).round().clamp(-127, 127).mul(scale).view_as(p))


# ----------------------------------------------------------------------------- measurements

def expected_queries(flipped, n, max_mismatches):
    """Mean queries until verification has seen ``max_mismatches + 1`` flipped triggers, over uniformly
    random query orders: the (m+1)-th of ``flipped`` marked positions among n sits at (m+1)(n+1)/(f+1)."""
    if flipped <= max_mismatches:
        return None
    return (max_mismatches + 1) * (n + 1) / (flipped + 1)


def queries_to_detection(flipped_mask, order, max_mismatches):
    """1-based query at which verification, asking the triggers in ``order``, first has a detection (or None)."""
    hits = flipped_mask[order].nonzero().flatten()
    return int(hits[max_mismatches]) + 1 if len(hits) > max_mismatches else None


def state_record(model, ctx, **coords):
    """The record of one deterministic tampering: watermark state, clean accuracy, expected queries."""
    m = ctx.config["MAX_MISMATCHES"]
    state = watermark_state(model, ctx, m)
    return {**coords, **state, "clean_accuracy": accuracy(model, ctx.test, ctx.config["EVAL_BATCH_SIZE"]),
            "mean_queries_to_detection": expected_queries(state["flipped"], len(ctx.key), m)}


def trial_outcome(model, ctx, gen):
    """One random trial: flipped triggers, and queries to detection with the triggers asked in a shuffled order."""
    flipped_mask = query_labels(model, ctx.triggers) != ctx.key
    order = torch.randperm(len(ctx.key), generator=gen)
    return {"flipped": int(flipped_mask.sum()),
            "queries": queries_to_detection(flipped_mask, order, ctx.config["MAX_MISMATCHES"])}


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


def run_trials(model, params, original, tamper, ctx, trials, gen):
    """``trials`` independent tamperings, each starting from the original weights; the model keeps the last.
    Clean accuracy (a test-set pass) is measured on the first ``TAMPER_ACCURACY_TRIALS`` detected and the
    first ``TAMPER_ACCURACY_TRIALS`` missed trials."""
    outcomes, measured = [], {True: 0, False: 0}
    for _ in range(trials):
        write_flat(params, tamper(original.clone(), gen))
        outcome = trial_outcome(model, ctx, gen)
        detected = outcome["queries"] is not None
        if measured[detected] < ctx.config["TAMPER_ACCURACY_TRIALS"]:
            measured[detected] += 1
            outcome["clean_accuracy"] = accuracy(model, ctx.test, ctx.config["EVAL_BATCH_SIZE"])
        outcomes.append(outcome)
    return outcomes


def scientific(value):
    """1e-04 style, with more digits only where they are needed (2.5e-04)."""
    short = f"{value:.0e}"
    return short if float(short) == value else f"{value:.3g}"


def log_point(ctx, record):
    probability = record.get("detection_probability", float(record["detected"]))
    accuracy_text = "n/a" if record["clean_accuracy"] is None else f"{record['clean_accuracy']:.4f}"
    ctx.log(f"  {record['setting']}: {record.get('mean_flipped', record['flipped']):.2f} flipped, "
            f"detection {probability:.2f}, clean acc {accuracy_text}")


# ----------------------------------------------------------------------------- config checks

def positive_int(ctx, name):
    value = ctx.config[name]
    if not isinstance(value, int) or value < 1:
        raise UserError(f"--{name.lower().replace('_', '-')} must be a positive integer, got {value!r}")
    return value


def sweep(ctx, name, low=0.0, high=math.inf):
    """A non-empty list of numbers in [low, high], named by its flag in the error."""
    values, flag = ctx.config[name], "--" + name.lower().replace("_", "-")
    if not values:
        raise UserError(f"{flag} needs at least one value")
    bad = [v for v in values if not low <= v <= high]
    if bad:
        raise UserError(f"{flag} values must lie in [{low:g}, {high:g}], got {bad[0]!r}")
    return values


# ----------------------------------------------------------------------------- noise, single weights, bit flips

def run_noise(ctx, seed):
    """Gaussian noise of standard deviation sigma (absolute) on every weight, ``NOISE_TRIALS`` trials per sigma."""
    trials = positive_int(ctx, "NOISE_TRIALS")
    model = ctx.fresh_copy()
    params = all_weights(model)
    original = flatten(params)
    records = []
    for sigma in sweep(ctx, "NOISE_SIGMAS"):
        def add_noise(flat, gen, sigma=sigma):
            return flat + sigma * torch.randn(flat.shape, generator=gen).to(flat.device)
        outcomes = run_trials(model, params, original, add_noise, ctx, trials, generator(seed, "noise", sigma))
        records.append(summarize_trials(outcomes, ctx, setting=f"sigma={scientific(sigma)}", sigma=sigma))
        log_point(ctx, records[-1])
    return {"seed": seed, "records": records}, model


def run_single_weight(ctx, seed):
    """One weight scaled by (1 +- epsilon): at a random nonzero weight, and at the weight of largest |w|
    (the same weight every trial, with a random sign)."""
    trials = positive_int(ctx, "SINGLE_WEIGHT_TRIALS")
    model = ctx.fresh_copy()
    params = all_weights(model)
    original = flatten(params)
    nonzero = original.nonzero().flatten()
    largest = int(original.abs().argmax())
    records = []
    for position in ("random", "largest"):
        for epsilon in sweep(ctx, "SINGLE_WEIGHT_EPSILONS"):
            def scale_one(flat, gen, position=position, epsilon=epsilon):
                index = largest if position == "largest" else int(nonzero[torch.randint(len(nonzero), (1,),
                                                                                          generator=gen)])
                sign = 1 if torch.rand(1, generator=gen).item() < 0.5 else -1
                flat[index] *= 1 + sign * epsilon
                return flat
            gen = generator(seed, "single-weight", position, epsilon)
            outcomes = run_trials(model, params, original, scale_one, ctx, trials, gen)
            records.append(summarize_trials(outcomes, ctx, setting=f"eps={epsilon:g} ({position})", epsilon=epsilon,
                                            position=position, weights_changed=int(epsilon != 0)))
            log_point(ctx, records[-1])
    return {"seed": seed, "records": records, "largest_weight": float(original[largest])}, model


def run_bitflip(ctx, seed):
    """One bit flipped in each of k distinct random weights, for each k and each bit class."""
    trials = positive_int(ctx, "BITFLIP_TRIALS")
    model = ctx.fresh_copy()
    params = all_weights(model)
    original = flatten(params)
    classes = ctx.config["BITFLIP_CLASSES"]
    unknown = [c for c in classes if c not in BIT_CLASSES]
    if unknown or not classes:
        raise UserError(f"--bitflip-classes: choose from {', '.join(BIT_CLASSES)} (got {unknown or 'none'})")
    records = []
    for bit_class in classes:
        for k in sweep(ctx, "BITFLIP_KS", 1, len(original)):
            def flip_k(flat, gen, k=int(k), bits=BIT_CLASSES[bit_class]):
                positions = torch.randperm(len(flat), generator=gen)[:k].to(flat.device)
                chosen = [bits[i] for i in torch.randint(len(bits), (k,), generator=gen).tolist()]
                return flip_bits(flat, positions, chosen)
            gen = generator(seed, "bitflip", bit_class, k)
            outcomes = run_trials(model, params, original, flip_k, ctx, trials, gen)
            records.append(summarize_trials(outcomes, ctx, setting=f"k={k} ({bit_class})", k=int(k),
                                            bit_class=bit_class, weights_changed=int(k)))
            log_point(ctx, records[-1])
    return {"seed": seed, "records": records}, model


# ----------------------------------------------------------------------------- pruning and quantization

def run_prune(ctx, seed):
    """Global magnitude pruning of convolution and linear weights, one point per ratio (deterministic)."""
    records, model = [], None
    for ratio in sweep(ctx, "PRUNE_RATIOS", 0.0, 1.0):
        model = ctx.fresh_copy()
        zeroed = magnitude_prune(matrix_weights(model), ratio)
        records.append(state_record(model, ctx, setting=f"ratio={ratio:g}", ratio=ratio, weights_zeroed=zeroed,
                                    weights_changed=count_changed(model, ctx.model)))
        log_point(ctx, records[-1])
    return {"seed": seed, "records": records}, model


QUANTIZERS = {"fp16": lambda m: precision_round_trip(m, torch.float16),
              "bf16": lambda m: precision_round_trip(m, torch.bfloat16),
              "int8": lambda m: int8_weight_only(m, per_channel=True),
              "int8-tensor": lambda m: int8_weight_only(m, per_channel=False)}


def run_quantize(ctx, seed):
    """fp16 and bf16 storage round trips; int8 weight-only quantization per output channel and per tensor."""
    modes = ctx.config["QUANTIZE_MODES"]
    unknown = [m for m in modes if m not in QUANTIZERS]
    if unknown or not modes:
        raise UserError(f"--quantize-modes: choose from {', '.join(QUANTIZERS)} (got {unknown or 'none'})")
    records, model = [], None
    for mode in modes:
        model = ctx.fresh_copy()
        QUANTIZERS[mode](model)
        records.append(state_record(model, ctx, setting=mode, mode=mode,
                                    weights_changed=count_changed(model, ctx.model)))
        log_point(ctx, records[-1])
    return {"seed": seed, "records": records}, model


# ----------------------------------------------------------------------------- obfuscation (NNSplitter-style)

def cycling_batches(ctx, seed):
    """Clean, unaugmented training batches, reshuffled each pass, forever. The shuffle is drawn where the
    data lives (the CPU under --no-data-on-device), as train_batches requires."""
    gen = torch.Generator(device=ctx.train.images.device)
    gen.manual_seed(seed)
    while True:
        yield from train_batches(ctx.train, ctx.config["OBFUSCATE_BATCH_SIZE"], ctx.spec, gen, augmented=False)


def loss_and_grad(model, params, batch):
    """Clean loss of the deployed (eval-mode) model and its gradient over ``params`` as one vector."""
    images, labels = batch
    model.eval()
    loss = F.cross_entropy(model(images), labels)
    grads = torch.autograd.grad(loss, params)
    return loss.item(), torch.cat([g.reshape(-1) for g in grads])


def obfuscate(model, ctx, k, seed):
    """Pick the k weights with the largest loss gradient and push only those, by signed-gradient ascent,
    to maximize the clean loss. Each stays within its layer's range of values (NNSplitter keeps obfuscated
    weights in range so a range check cannot spot them). Returns the clean loss before and after, both on
    the batch that chose the weights."""
    cfg = ctx.config
    model.requires_grad_(True)
    params = matrix_weights(model)
    original = flatten(params)
    bound = torch.cat([p.detach().abs().max().expand(p.numel()) for p in params])
    batches = cycling_batches(ctx, seed)
    first_batch = next(batches)
    loss_before, grad = loss_and_grad(model, params, first_batch)
    chosen = torch.topk(grad.abs(), k).indices
    limit, step = bound[chosen], cfg["OBFUSCATE_STEP_SIZE"] * bound[chosen]
    values = original[chosen].clone()
    for _ in range(cfg["OBFUSCATE_STEPS"]):
        values = torch.maximum(torch.minimum(values + step * grad[chosen].sign(), limit), -limit)
        write_flat(params, original.index_put((chosen,), values))
        _, grad = loss_and_grad(model, params, next(batches))
    # A weight the ascent left exactly where it started (pinned at its layer's bound, or stepped out and
    # back) moves one step toward zero: obfuscation changes exactly k weights, and stays in range.
    stuck = values == original[chosen]
    toward_zero = torch.where(values == 0, torch.ones_like(values), -values.sign())
    values[stuck] += step[stuck] * toward_zero[stuck]
    write_flat(params, original.index_put((chosen,), values))
    loss_after, _ = loss_and_grad(model, params, first_batch)
    return loss_before, loss_after


def run_obfuscate(ctx, seed):
    """NNSplitter-style obfuscation for every k in ``OBFUSCATE_KS``, each from the untouched model."""
    positive_int(ctx, "OBFUSCATE_STEPS")
    positive_int(ctx, "OBFUSCATE_BATCH_SIZE")
    total = sum(p.numel() for p in matrix_weights(ctx.model))
    records, model = [], None
    for k in sweep(ctx, "OBFUSCATE_KS", 1, total):
        model = ctx.fresh_copy()
        loss_before, loss_after = obfuscate(model, ctx, int(k), seed)
        records.append(state_record(model, ctx, setting=f"k={k}", k=int(k),
                                    weights_changed=count_changed(model, ctx.model), weights_fraction=k / total,
                                    loss_before=loss_before, loss_after=loss_after))
        log_point(ctx, records[-1])
    return {"seed": seed, "records": records, "obfuscatable_weights": total}, model


# ----------------------------------------------------------------------------- fine-pruning (Liu et al. 2018)

def classifier_layer(model):
    """The final linear layer. Its inputs are the last convolutional layer's channels, globally pooled."""
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    if not linears:
        raise UserError("fine-prune needs a model that ends in a linear classifier over pooled channels")
    return linears[-1]


@torch.no_grad()
def mean_channel_activation(model, images, batch_size):
    """Mean activation of each channel of the last convolutional layer's output over clean images (the
    classifier's input is exactly that output, averaged over positions)."""
    fc = classifier_layer(model)
    pooled = []
    handle = fc.register_forward_hook(lambda module, inputs, output: pooled.append(inputs[0].detach()))
    try:
        model.eval()
        for start in range(0, len(images), batch_size):
            model(images[start:start + batch_size].float().div(255))
    finally:
        handle.remove()
    return torch.cat(pooled).mean(0).cpu()


def prune_channel(model, channel):
    """Silence a channel of the final feature map. In a ResNet the last convolution's output is summed with
    the shortcut, so zeroing its filter would not silence the channel: we cut it where it is consumed."""
    with torch.no_grad():
        classifier_layer(model).weight[:, channel] = 0


def keep_pruned(model, pruned):
    """A gradient mask so fine-tuning never regrows pruned channels (zero weights under SGD with momentum
    and weight decay then stay exactly zero). Returns the hook handle."""
    weight = classifier_layer(model).weight
    mask = torch.ones_like(weight)
    mask[:, pruned] = 0
    return weight.register_hook(lambda grad: grad * mask)


def fine_prune_model(model, ctx, seed, target, track_asr):
    """Prune in increasing order of mean activation until clean accuracy has dropped by
    ``FINE_PRUNE_ACCURACY_DROP``, then fine-tune on clean data. Returns (records, pruning order).
    ``track_asr``: also measure the backdoor's attack success rate (the defense view; a test-set pass each)."""
    cfg = ctx.config
    asr = [("attack_success_rate", lambda m: attack_success_rate(m, ctx))] if track_asr else []
    metrics = asr + list(ctx.extras.get("metrics", ()))  # and the robust watermark, when the model has one
    rank_images = ctx.train.images[:cfg["FINE_PRUNE_RANK_SAMPLES"]]
    activation = mean_channel_activation(model, rank_images, cfg["EVAL_BATCH_SIZE"])
    order = torch.argsort(activation, stable=True).tolist()

    def measure(**coords):
        record = state_record(model, ctx, phase="prune", target=target, **coords)
        record.update({name: fn(model) for name, fn in metrics})
        return record

    start = measure(setting=f"unpruned ({target})", pruned_channels=0)
    records, pruned = [start], []
    for channel in order[:-1]:  # never the last channel: the classifier would have no input left
        prune_channel(model, channel)
        pruned.append(channel)
        records.append(measure(setting=f"pruned ({target})", pruned_channels=len(pruned), channel=channel,
                               mean_activation=float(activation[channel])))
        if start["clean_accuracy"] - records[-1]["clean_accuracy"] >= cfg["FINE_PRUNE_ACCURACY_DROP"]:
            break
    ctx.log(f"  {target}: pruned {len(pruned)} of {len(order)} channels: clean acc {start['clean_accuracy']:.4f} -> "
            f"{records[-1]['clean_accuracy']:.4f}, {records[-1]['flipped']} flipped"
            + (f", ASR {start['attack_success_rate']:.3f} -> {records[-1]['attack_success_rate']:.3f}" if asr else ""))
    handle = keep_pruned(model, pruned)
    try:
        tuned, _ = fine_tune(model, ctx, seed, cfg["FINE_PRUNE_EPOCHS"], extra_metrics=metrics, phase="fine-tune",
                             step_offset=0)
    finally:
        handle.remove()
    n = len(ctx.key)
    for record in tuned:
        record.update(setting=f"fine-pruned ({target})", target=target, pruned_channels=len(pruned),
                      mean_queries_to_detection=expected_queries(record["flipped"], n, cfg["MAX_MISMATCHES"]))
    return records + tuned, order


def load_poisoned(ctx, path):
    """The poisoned copy to defend (``eval.py --attack poison --save-tampered X.pt`` writes one)."""
    payload = read_checkpoint(path)
    if payload["meta"].get("dataset") != ctx.spec.name:
        raise UserError(f"--fine-prune-poisoned-model {path} is for dataset {payload['meta'].get('dataset')!r}, "
                        f"not {ctx.spec.name!r}")
    model = ctx.fresh_copy()
    try:
        model.load_state_dict(payload["state_dict"])
    except RuntimeError:
        raise UserError(f"--fine-prune-poisoned-model {path} does not have the watermarked model's "
                        f"architecture") from None
    return model.eval()


def asr_summary(records):
    """The defense view: the backdoor's attack success rate before, after pruning, after fine-tuning."""
    prune = [r for r in records if r["phase"] == "prune"]
    return {"before": prune[0]["attack_success_rate"], "after_pruning": prune[-1]["attack_success_rate"],
            "after_fine_tuning": records[-1]["attack_success_rate"], "pruned_channels": prune[-1]["pruned_channels"]}


def run_fine_prune(ctx, seed):
    """Fine-pruning as a tampering of the watermarked model and, given a poisoned copy
    (``FINE_PRUNE_POISONED_MODEL``), as a defense: attack success rate before, after pruning and after
    fine-tuning, with the fragile watermark tracked on both."""
    positive_int(ctx, "FINE_PRUNE_RANK_SAMPLES")
    if not 0 < ctx.config["FINE_PRUNE_ACCURACY_DROP"] <= 1:
        raise UserError("--fine-prune-accuracy-drop must lie in (0, 1]")
    poisoned_path = ctx.config["FINE_PRUNE_POISONED_MODEL"]
    poisoned = load_poisoned(ctx, poisoned_path) if poisoned_path else None  # a bad path fails before any work
    model = ctx.fresh_copy()
    records, order = fine_prune_model(model, ctx, seed, "watermarked", track_asr=False)
    run = {"seed": seed, "records": records, "prune_order": order}
    if poisoned is not None:
        poisoned_records, poisoned_order = fine_prune_model(poisoned, ctx, seed, "poisoned", track_asr=True)
        run["records"] += poisoned_records
        run.update(poisoned_model=poisoned_path, poisoned_prune_order=poisoned_order,
                   attack_success_rate=asr_summary(poisoned_records))
    return run, model


# ----------------------------------------------------------------------------- restoration (Ngo et al. 2025)

def with_config(ctx, **changes):
    return dataclasses.replace(ctx, config={**ctx.config, **changes})


def run_restore(ctx, seed):
    """Fine-tune (the attacker, at ``RESTORE_ATTACK_LR``), then briefly train on the original training data
    (``RESTORE_LR``, ``RESTORE_EPOCHS``): does the robust backdoor watermark come back while the fragile
    one stays broken?"""
    if "backdoor" not in ctx.extras:
        raise UserError("--attack restore needs a model trained with `train.py --backdoor-watermark` "
                        "(this checkpoint carries no robust watermark)")
    cfg = ctx.config
    metrics = ctx.extras.get("metrics", ())
    model = ctx.fresh_copy()
    attacked, _ = fine_tune(model, with_config(ctx, LR=cfg["RESTORE_ATTACK_LR"]), seed, cfg["RESTORE_ATTACK_EPOCHS"],
                            extra_metrics=metrics, phase="fine-tune")
    restored, _ = fine_tune(model, with_config(ctx, LR=cfg["RESTORE_LR"], EARLY_STEPS=[]), seed + 1,
                            cfg["RESTORE_EPOCHS"], extra_metrics=metrics, phase="restore",
                            step_offset=attacked[-1]["step"], data=ctx.train)
    records = attacked + restored[1:]  # the restore phase's first record repeats the attack's last
    n = len(ctx.key)
    for record in records:
        record.update(setting=record["phase"], mean_queries_to_detection=expected_queries(
            record["flipped"], n, cfg["MAX_MISMATCHES"]))
    before, faded, back = (r["backdoor_accuracy"] for r in (attacked[0], attacked[-1], restored[-1]))
    run = {"seed": seed, "records": records,
           "backdoor_accuracy": {"before": before, "after_fine_tuning": faded, "after_restore": back},
           "robust_restored": back >= cfg["RESTORE_RECOVERED"] * before,
           "fragile_broken_after_restore": restored[-1]["detected"]}
    ctx.log(f"  robust watermark {before:.2f} -> {faded:.2f} -> {back:.2f} "
            f"({'restored' if run['robust_restored'] else 'not restored'}); fragile watermark "
            f"{'still broken' if run['fragile_broken_after_restore'] else 'verifies again'} "
            f"({restored[-1]['flipped']} flipped)")
    return run, model


TAMPER_ATTACKS = {"fine-prune": run_fine_prune, "obfuscate": run_obfuscate, "noise": run_noise,
                  "single-weight": run_single_weight, "bitflip": run_bitflip, "prune": run_prune,
                  "quantize": run_quantize, "restore": run_restore}
