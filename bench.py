"""Benchmark our training step against a reference-style loop, side by side, then trigger generation and verification.

    python bench.py                    # GPU when present: ResNet-18, 3x32x32, batch 512
    python bench.py --device cpu       # CPU: resnet8 and small sizes, about a minute
    torchrun --standalone --nproc_per_node 2 bench.py --device cpu --threads 1   # our loop, data parallel

Both loops train the same architecture (identical initial weights) on the same in-memory images
with the same batch size. Ours: uint8 images on the device, augmentation on the device, bf16
autocast, channels_last, fused SGD, TF32 (each can be turned off). Reference: a DataLoader with
per-sample PIL transforms, fp32, NCHW (fragile/core/reference_loop.py). Steady-state images/s are
timed after warm-up steps, the GPU synchronized at both ends. Then: generating 100 triggers
(time per generator step, and for a fixed number of steps) and verification latency (median of
repeats, one trigger per query and all at once). Prints a table and writes JSON.
Under torchrun only our loop is timed, in DistributedDataParallel: BATCH_SIZE is the global batch,
split across the ranks, and images/s counts the whole job's images.
"""
# ----------------------------------------------------------------------------- config
DEVICE = "auto"            # auto | cpu | cuda | cuda:N
ARCH = "auto"              # auto: resnet18 on GPU, resnet8 on CPU
DATASET = "synthetic"      # synthetic (in memory, 3x32x32 like CIFAR-10, no download) | cifar10 | fashion-mnist | ...
DATA_DIR = "data"
CIFAR_AUGMENT = True       # synthetic only: CIFAR-10's augmentation (4-pixel crop + flip), as the reference code used
NUM_IMAGES = -1            # training images in memory (rounded down to whole batches); -1: 50000 GPU, 2048 CPU
BATCH_SIZE = -1            # the same for both loops; -1: 512 on GPU, 32 on CPU
WARMUP_STEPS = -1          # untimed steps first (cuDNN autotuning, compile, worker start); -1: 30 on GPU, 2 on CPU
MEASURE_STEPS = -1         # timed steps per loop; -1: 200 on GPU, 6 on CPU
NUM_WORKERS = -1           # reference DataLoader workers; -1: 2 on GPU, 0 on CPU
LR = 0.05
# our loop's speed paths: each has an off switch (--no-amp, --no-channels-last, ...)
AMP = True                 # bf16 autocast on GPU (a no-op on CPU)
CHANNELS_LAST = True       # channels_last memory format on GPU
FUSED_OPTIMIZER = True     # fused SGD on GPU, foreach kernels on CPU
FAST_MATH = True           # TF32 and cuDNN autotuning on GPU
COMPILE = False            # torch.compile our model (compile time falls in the warm-up)
# trigger generation (the paper's generator) and verification
NUM_TRIGGERS = 100
GEN_STEPS = -1             # generator steps timed (stops early if every trigger is on its key); -1: 200 GPU, 4 CPU
LATENT_DIM = 512
GEN_CHANNELS = 64
VERIFY_REPEATS = -1        # verification timings, median reported; -1: 50 on GPU, 5 on CPU
THREADS = 0                # CPU threads for torch (0: torch's default); 1 is far faster on an oversubscribed machine
SEED = 0
OUT = ""                   # JSON; default bench/bench_<arch>_<device>.json
# -----------------------------------------------------------------------------

import copy
import dataclasses
import os
import statistics
import time

import torch

from fragile.core import distributed as dist
from fragile.core.cli import UserError, apply_overrides, run_main
from fragile.core.data import (DATASETS, balanced_subset, device_generator, get_spec, load_split, synthetic_split,
                               train_batches)
from fragile.core.devices import describe_device, resolve_device, seed_everything, set_fast_math, versions
from fragile.core.io import atomic_write_json
from fragile.core.reference_loop import pytorch_default_backends, reference_loader, reference_sgd, reference_steps
from fragile.core.training import make_sgd, prepare_model, sgd_kernels, train_steps
from fragile.watermark import methods
from fragile.watermark.keys import make_key
from fragile.watermark.methods.paper import RECIPES, PaperParams
from fragile.watermark.queries import query_labels
from models import ARCHS, build_classifier


def auto(value, on_gpu, gpu, cpu):
    """``value``, or its GPU or CPU default when it is auto (-1 / "auto")."""
    if value in (-1, "auto"):
        return gpu if on_gpu else cpu
    return value


def resolve_auto(device):
    """Fill every auto setting with its GPU or CPU default, once, in the header's constants; reject impossible
    ones. The values it settled, for the JSON's record of the config."""
    global ARCH, NUM_IMAGES, BATCH_SIZE, WARMUP_STEPS, MEASURE_STEPS, NUM_WORKERS, GEN_STEPS, VERIFY_REPEATS
    on_gpu = device.type == "cuda"
    ARCH = auto(ARCH, on_gpu, "resnet18", "resnet8")
    NUM_IMAGES = auto(NUM_IMAGES, on_gpu, 50000, 2048)
    BATCH_SIZE = auto(BATCH_SIZE, on_gpu, 512, 32)
    WARMUP_STEPS = auto(WARMUP_STEPS, on_gpu, 30, 2)
    MEASURE_STEPS = auto(MEASURE_STEPS, on_gpu, 200, 6)
    NUM_WORKERS = auto(NUM_WORKERS, on_gpu, 2, 0)
    GEN_STEPS = auto(GEN_STEPS, on_gpu, 200, 4)
    VERIFY_REPEATS = auto(VERIFY_REPEATS, on_gpu, 50, 5)
    for flag, value in (("--num-images", NUM_IMAGES), ("--batch-size", BATCH_SIZE), ("--measure-steps", MEASURE_STEPS),
                        ("--num-triggers", NUM_TRIGGERS), ("--gen-steps", GEN_STEPS),
                        ("--verify-repeats", VERIFY_REPEATS)):
        if value < 1:
            raise UserError(f"{flag} must be at least 1 (or -1 for the default)")
    if WARMUP_STEPS < 0 or NUM_WORKERS < 0:
        raise UserError("--warmup-steps and --num-workers must be 0 or more (or -1 for the default)")
    if BATCH_SIZE > NUM_IMAGES:
        raise UserError(f"--batch-size {BATCH_SIZE} is larger than --num-images {NUM_IMAGES}")
    # whole batches only, in both loops: no ragged last step (and no recompile for it under --compile)
    NUM_IMAGES -= NUM_IMAGES % BATCH_SIZE
    if ARCH not in ARCHS:
        raise UserError(f"unknown arch {ARCH!r}: choose auto or one of {', '.join(ARCHS)}")
    return dict(ARCH=ARCH, NUM_IMAGES=NUM_IMAGES, BATCH_SIZE=BATCH_SIZE, WARMUP_STEPS=WARMUP_STEPS,
                MEASURE_STEPS=MEASURE_STEPS, NUM_WORKERS=NUM_WORKERS, GEN_STEPS=GEN_STEPS,
                VERIFY_REPEATS=VERIFY_REPEATS)


def bench_data():
    """(spec, training split on the CPU): synthetic images stand in for CIFAR-10, with its augmentation."""
    spec = get_spec(DATASET)
    if spec.name == "synthetic":
        if CIFAR_AUGMENT:
            spec = dataclasses.replace(spec, crop_padding=4, horizontal_flip=True)
        return spec, synthetic_split(spec, True, n=NUM_IMAGES, seed=SEED)
    split = balanced_subset(load_split(spec, DATA_DIR, True), NUM_IMAGES, spec.num_classes)
    return spec, split.subset(torch.arange(len(split) - len(split) % BATCH_SIZE))


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(steps, warmup, measure, device):
    """Steady-state throughput of an endless iterator of per-step image counts."""
    started = time.perf_counter()
    for _ in range(warmup):
        next(steps)
    synchronize(device)
    t0 = time.perf_counter()
    images = sum(next(steps) for _ in range(measure))
    synchronize(device)
    seconds = time.perf_counter() - t0
    return {"images_per_s": images / seconds, "images": images, "steps": measure, "seconds": seconds,
            "warmup_s": t0 - started}


def our_steps(model, optimizer, split, spec, device):
    """Endless steps of fragile.core.training.train_steps (the loop train.py and eval.py run); under torchrun each
    rank's share of the global batch, counted as the whole global batch (every rank steps together)."""
    gen = device_generator(device, SEED)
    while True:
        batches = train_batches(split, BATCH_SIZE, spec, gen, rank=dist.rank(), world_size=dist.world_size())
        for _, _, _, n in train_steps(model, optimizer, batches, AMP):
            yield n * dist.world_size()


def bench_ours(model, split, spec, device):
    on_gpu = device.type == "cuda"
    set_fast_math(FAST_MATH and on_gpu)
    model = prepare_model(model, device, CHANNELS_LAST and on_gpu)
    optimizer = make_sgd(model, LR, 0.9, 5e-4, kernels=sgd_kernels(FUSED_OPTIMIZER))
    train_model = dist.wrap(model, device)
    train_model = torch.compile(train_model) if COMPILE else train_model
    result = time_steps(our_steps(train_model, optimizer, split.to(device), spec, device), WARMUP_STEPS,
                        MEASURE_STEPS, device)
    paths = {"amp": AMP and on_gpu, "channels_last": CHANNELS_LAST and on_gpu,
             "optimizer": ("fused" if on_gpu else "foreach") if FUSED_OPTIMIZER else "for-loop",
             "fast_math": FAST_MATH and on_gpu, "compile": COMPILE}
    return dict(result, pipeline="uint8 on device, on-device augmentation", speed_paths=paths,
                world_size=dist.world_size()), model


def bench_reference(model, split, spec, device):
    pytorch_default_backends()
    model = model.to(device)
    loader = reference_loader(split, spec, BATCH_SIZE, NUM_WORKERS, SEED)
    steps = reference_steps(model, reference_sgd(model, LR), loader, device)
    result = time_steps(steps, WARMUP_STEPS, MEASURE_STEPS, device)
    steps.close()  # ends the loop; the DataLoader (and any workers) go with it
    return dict(result, pipeline="DataLoader, per-sample PIL transforms, fp32, NCHW", num_workers=NUM_WORKERS)


def bench_trigger_generation(model, spec, device):
    """Wall time of the paper's generator for NUM_TRIGGERS triggers, capped at GEN_STEPS generator steps (the
    paper's loss, lambda and Adam betas: PaperParams' defaults; the fast recipe's learning rate)."""
    set_fast_math(False)  # generation runs in exact fp32, as generate_samples.py runs it
    key, _ = make_key(NUM_TRIGGERS, spec.num_classes, seed=SEED)
    params = PaperParams(latent_dim=LATENT_DIM, latent_seed=SEED, gen_channels=GEN_CHANNELS, lr=RECIPES["fast"].lr,
                         max_steps=GEN_STEPS)
    job = methods.TriggerJob(model, spec, key, device, log=lambda *_: None)
    synchronize(device)
    t0 = time.perf_counter()
    try:
        _, info = methods.generate("paper", job, params)
        steps, completed = info["steps"], True
    except UserError:  # the step cap came first: the expected outcome for a short timing run
        steps, completed = GEN_STEPS, False
    synchronize(device)
    seconds = time.perf_counter() - t0
    return {"num_triggers": NUM_TRIGGERS, "step_cap": GEN_STEPS, "steps": steps, "all_on_key": completed,
            "seconds": seconds, "ms_per_step": 1000 * seconds / steps}


def median_ms(fn, repeats):
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()  # query_labels returns CPU labels: the device is synchronized
        times.append(1000 * (time.perf_counter() - t0))
    return statistics.median(times)


def bench_verification(model, spec):
    """query_labels (fp32, no TF32) on NUM_TRIGGERS uint8 triggers held on the CPU, as verify.py queries them."""
    gen = torch.Generator().manual_seed(SEED)
    triggers = torch.randint(0, 256, (NUM_TRIGGERS, *spec.shape), generator=gen, dtype=torch.uint8)
    return {"num_triggers": NUM_TRIGGERS, "repeats": VERIFY_REPEATS,
            "all_at_once_ms": median_ms(lambda: query_labels(model, triggers), VERIFY_REPEATS),
            "one_per_query_ms": median_ms(lambda: query_labels(model, triggers, 1), VERIFY_REPEATS)}


def table(r):
    ours, ref, gen, ver = r["ours"], r["reference"], r["trigger_generation"], r["verification"]
    lines = [f"device: {r['device']}   arch: {r['arch']}   data: {r['dataset']} {tuple(r['image_shape'])}   "
             f"batch {r['batch_size']}",
             f"{'training loop':<58}{'images/s':>12}",
             f"{'ours (' + ours['pipeline'] + ')':<58}{ours['images_per_s']:>12.1f}",
             f"{'reference (' + ref['pipeline'] + ')':<58}{ref['images_per_s']:>12.1f}",
             f"{'ratio ours / reference':<58}{r['ratio']:>11.2f}x",
             f"trigger generation, {gen['num_triggers']} triggers: {gen['steps']} generator steps in "
             f"{gen['seconds']:.2f} s ({gen['ms_per_step']:.1f} ms/step; "
             f"{'all on key' if gen['all_on_key'] else 'step cap reached'})",
             f"verification latency, {ver['num_triggers']} triggers (median of {ver['repeats']}): "
             f"all at once {ver['all_at_once_ms']:.1f} ms, one per query {ver['one_per_query_ms']:.1f} ms"]
    return "\n".join(lines)


def bench_data_parallel(config, device):
    """Under torchrun: our loop alone, in DDP; rank 0 reports the job's images/s."""
    spec, split = bench_data()
    seed_everything(SEED)
    ours, _ = bench_ours(build_classifier(ARCH, spec), split, spec, device)
    world = dist.world_size()
    print(f"{ARCH} on {world} x {describe_device(device)}, global batch {BATCH_SIZE} ({BATCH_SIZE // world} per rank), "
          f"{WARMUP_STEPS} warm-up + {MEASURE_STEPS} timed steps: {ours['images_per_s']:.1f} images/s")
    result = {"device": describe_device(device), "device_type": device.type, "arch": ARCH,
              "dataset": spec.name, "batch_size": BATCH_SIZE, "world_size": world, "ours": ours,
              "config": config, "versions": versions(device), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    out = OUT or os.path.join("bench", f"bench_{ARCH}_{device.type}_ddp{world}.json")
    dist.on_main(atomic_write_json, result, out)
    print(f"-> {out}")
    dist.cleanup()


def main():
    config = apply_overrides(globals(), __doc__, choices={"DATASET": list(DATASETS)})
    device = resolve_device(DEVICE)
    if THREADS < 0:
        raise UserError("--threads must be 0 (torch's default) or more")
    if THREADS:
        torch.set_num_threads(THREADS)
    config.update(resolve_auto(device))
    device = dist.setup("auto", device, [("batch-size", BATCH_SIZE)])
    if dist.launched():
        return bench_data_parallel(config, device)
    out = OUT or os.path.join("bench", f"bench_{ARCH}_{device.type}.json")
    spec, split = bench_data()
    seed_everything(SEED)
    initial = build_classifier(ARCH, spec)
    print(f"{ARCH} on {describe_device(device)}: {len(split)} images {spec.shape}, batch {BATCH_SIZE}, "
          f"{WARMUP_STEPS} warm-up + {MEASURE_STEPS} timed steps per loop", flush=True)

    ours, trained = bench_ours(copy.deepcopy(initial), split, spec, device)
    print(f"ours: {ours['images_per_s']:.1f} images/s", flush=True)
    reference = bench_reference(copy.deepcopy(initial), split, spec, device)
    print(f"reference: {reference['images_per_s']:.1f} images/s", flush=True)
    generation = bench_trigger_generation(copy.deepcopy(trained), spec, device)
    verification = bench_verification(trained, spec)

    result = {"device": describe_device(device), "device_type": device.type, "arch": ARCH,
              "dataset": spec.name, "image_shape": list(spec.shape), "batch_size": BATCH_SIZE,
              "num_images": len(split), "warmup_steps": WARMUP_STEPS, "measure_steps": MEASURE_STEPS,
              "ours": ours, "reference": reference, "ratio": ours["images_per_s"] / reference["images_per_s"],
              "trigger_generation": generation, "verification": verification, "config": config,
              "versions": versions(device), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    print(table(result))
    atomic_write_json(result, out)
    print(f"-> {out}")


if __name__ == "__main__":
    run_main(main)
