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
from fragile.core.data import DATASETS, balanced_subset, device_generator, get_spec, load_split, synthetic_split
from fragile.core.devices import describe_device, resolve_device, seed_everything, set_fast_math, versions
from fragile.core.io import atomic_write_json
from fragile.core.reference_loop import pytorch_default_backends, reference_loader, reference_sgd, reference_steps
from fragile.core.training import make_sgd, prepare_model, sgd_kernels, train_steps
from fragile.watermark import methods
from fragile.watermark.keys import make_key
from fragile.watermark.methods.paper import RECIPES, PaperParams
from fragile.watermark.verify import query_labels
from models import ARCHS, build_classifier

GPU_CPU_DEFAULTS = {"ARCH": ("resnet18", "resnet8"), "NUM_IMAGES": (50000, 2048), "BATCH_SIZE": (512, 32),
                    "WARMUP_STEPS": (30, 2), "MEASURE_STEPS": (200, 6), "NUM_WORKERS": (2, 0),
                    "GEN_STEPS": (200, 4), "VERIFY_REPEATS": (50, 5)}


def resolve_auto(config, device):
    """Fill every auto (-1 / "auto") setting with its GPU or CPU default; reject impossible ones."""
    for name, (gpu, cpu) in GPU_CPU_DEFAULTS.items():
        if config[name] in (-1, "auto"):
            config[name] = gpu if device.type == "cuda" else cpu
    for name in ("NUM_IMAGES", "BATCH_SIZE", "MEASURE_STEPS", "NUM_TRIGGERS", "GEN_STEPS", "VERIFY_REPEATS"):
        if config[name] < 1:
            raise UserError(f"--{name.lower().replace('_', '-')} must be at least 1 (or -1 for the default)")
    if config["WARMUP_STEPS"] < 0 or config["NUM_WORKERS"] < 0:
        raise UserError("--warmup-steps and --num-workers must be 0 or more (or -1 for the default)")
    if config["BATCH_SIZE"] > config["NUM_IMAGES"]:
        raise UserError(f"--batch-size {config['BATCH_SIZE']} is larger than --num-images {config['NUM_IMAGES']}")
    # whole batches only, in both loops: no ragged last step (and no recompile for it under --compile)
    config["NUM_IMAGES"] -= config["NUM_IMAGES"] % config["BATCH_SIZE"]
    if config["ARCH"] not in ARCHS:
        raise UserError(f"unknown arch {config['ARCH']!r}: choose auto or one of {', '.join(ARCHS)}")
    return config


def bench_data(cfg):
    """(spec, training split on the CPU): synthetic images stand in for CIFAR-10, with its augmentation."""
    spec = get_spec(cfg["DATASET"])
    if spec.name == "synthetic":
        if cfg["CIFAR_AUGMENT"]:
            spec = dataclasses.replace(spec, crop_padding=4, horizontal_flip=True)
        return spec, synthetic_split(spec, True, n=cfg["NUM_IMAGES"], seed=cfg["SEED"])
    split = balanced_subset(load_split(spec, cfg["DATA_DIR"], True), cfg["NUM_IMAGES"], spec.num_classes)
    return spec, split.subset(torch.arange(len(split) - len(split) % cfg["BATCH_SIZE"]))


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


def our_steps(model, optimizer, split, spec, cfg, device):
    """Endless steps of fragile.core.training.train_steps (the loop train.py and eval.py run); under torchrun each
    rank's share of the global batch, counted as the whole global batch (every rank steps together)."""
    gen = device_generator(device, cfg["SEED"])
    while True:
        for _, _, _, n in train_steps(model, optimizer, split, spec, gen, cfg["BATCH_SIZE"], device, cfg["AMP"],
                                      rank=dist.rank(), world_size=dist.world_size()):
            yield n * dist.world_size()


def bench_ours(model, split, spec, cfg, device):
    set_fast_math(cfg["FAST_MATH"] and device.type == "cuda")
    model = prepare_model(model, device, cfg["CHANNELS_LAST"] and device.type == "cuda")
    optimizer = make_sgd(model, cfg["LR"], 0.9, 5e-4, kernels=sgd_kernels(cfg["FUSED_OPTIMIZER"]))
    train_model = dist.wrap(model, device)
    train_model = torch.compile(train_model) if cfg["COMPILE"] else train_model
    result = time_steps(our_steps(train_model, optimizer, split.to(device), spec, cfg, device),
                        cfg["WARMUP_STEPS"], cfg["MEASURE_STEPS"], device)
    paths = {"amp": cfg["AMP"] and device.type == "cuda", "channels_last": cfg["CHANNELS_LAST"] and device.type == "cuda",
             "optimizer": ("fused" if device.type == "cuda" else "foreach") if cfg["FUSED_OPTIMIZER"] else "for-loop",
             "fast_math": cfg["FAST_MATH"] and device.type == "cuda", "compile": cfg["COMPILE"]}
    return dict(result, pipeline="uint8 on device, on-device augmentation", speed_paths=paths,
                world_size=dist.world_size()), model


def bench_reference(model, split, spec, cfg, device):
    pytorch_default_backends()
    model = model.to(device)
    loader = reference_loader(split, spec, cfg["BATCH_SIZE"], cfg["NUM_WORKERS"], cfg["SEED"])
    steps = reference_steps(model, reference_sgd(model, cfg["LR"]), loader, device)
    result = time_steps(steps, cfg["WARMUP_STEPS"], cfg["MEASURE_STEPS"], device)
    steps.close()  # ends the loop; the DataLoader (and any workers) go with it
    return dict(result, pipeline="DataLoader, per-sample PIL transforms, fp32, NCHW", num_workers=cfg["NUM_WORKERS"])


def bench_trigger_generation(model, spec, cfg, device):
    """Wall time of the paper's generator for NUM_TRIGGERS triggers, capped at GEN_STEPS generator steps (the
    paper's loss and Adam betas, the fast recipe's learning rate)."""
    set_fast_math(False)  # generation runs in exact fp32, as generate_samples.py runs it
    key, _ = make_key(cfg["NUM_TRIGGERS"], spec.num_classes, seed=cfg["SEED"])
    params = PaperParams(latent_dim=cfg["LATENT_DIM"], latent_seed=cfg["SEED"], gen_channels=cfg["GEN_CHANNELS"],
                         lam=150.0, lr=RECIPES["fast"]["LR"], beta1=0.5, beta2=0.999, max_steps=cfg["GEN_STEPS"])
    job = methods.TriggerJob(model, spec, key, device, log=lambda *_: None)
    synchronize(device)
    t0 = time.perf_counter()
    try:
        _, info = methods.generate("paper", job, params)
        steps, completed = info["steps"], True
    except UserError:  # the step cap came first: the expected outcome for a short timing run
        steps, completed = cfg["GEN_STEPS"], False
    synchronize(device)
    seconds = time.perf_counter() - t0
    return {"num_triggers": cfg["NUM_TRIGGERS"], "step_cap": cfg["GEN_STEPS"], "steps": steps,
            "all_on_key": completed, "seconds": seconds, "ms_per_step": 1000 * seconds / steps}


def median_ms(fn, repeats):
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()  # query_labels returns CPU labels: the device is synchronized
        times.append(1000 * (time.perf_counter() - t0))
    return statistics.median(times)


def bench_verification(model, spec, cfg):
    """query_labels (fp32, no TF32) on NUM_TRIGGERS uint8 triggers held on the CPU, as verify.py queries them."""
    gen = torch.Generator().manual_seed(cfg["SEED"])
    triggers = torch.randint(0, 256, (cfg["NUM_TRIGGERS"], *spec.shape), generator=gen, dtype=torch.uint8)
    return {"num_triggers": cfg["NUM_TRIGGERS"], "repeats": cfg["VERIFY_REPEATS"],
            "all_at_once_ms": median_ms(lambda: query_labels(model, triggers), cfg["VERIFY_REPEATS"]),
            "one_per_query_ms": median_ms(lambda: query_labels(model, triggers, 1), cfg["VERIFY_REPEATS"])}


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


def bench_data_parallel(cfg, device):
    """Under torchrun: our loop alone, in DDP; rank 0 reports the job's images/s."""
    spec, split = bench_data(cfg)
    seed_everything(SEED)
    ours, _ = bench_ours(build_classifier(cfg["ARCH"], spec), split, spec, cfg, device)
    world = dist.world_size()
    print(f"{cfg['ARCH']} on {world} x {describe_device(device)}, global batch {cfg['BATCH_SIZE']} "
          f"({cfg['BATCH_SIZE'] // world} per rank), {cfg['WARMUP_STEPS']} warm-up + {cfg['MEASURE_STEPS']} timed steps: "
          f"{ours['images_per_s']:.1f} images/s")
    result = {"device": describe_device(device), "device_type": device.type, "arch": cfg["ARCH"],
              "dataset": spec.name, "batch_size": cfg["BATCH_SIZE"], "world_size": world, "ours": ours,
              "config": cfg, "versions": versions(device), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    out = OUT or os.path.join("bench", f"bench_{cfg['ARCH']}_{device.type}_ddp{world}.json")
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
    cfg = resolve_auto(dict(config), device)
    device = dist.setup("auto", device, [("batch-size", cfg["BATCH_SIZE"])])
    if dist.launched():
        return bench_data_parallel(cfg, device)
    out = OUT or os.path.join("bench", f"bench_{cfg['ARCH']}_{device.type}.json")
    spec, split = bench_data(cfg)
    seed_everything(SEED)
    initial = build_classifier(cfg["ARCH"], spec)
    print(f"{cfg['ARCH']} on {describe_device(device)}: {len(split)} images {spec.shape}, batch {cfg['BATCH_SIZE']}, "
          f"{cfg['WARMUP_STEPS']} warm-up + {cfg['MEASURE_STEPS']} timed steps per loop", flush=True)

    ours, trained = bench_ours(copy.deepcopy(initial), split, spec, cfg, device)
    print(f"ours: {ours['images_per_s']:.1f} images/s", flush=True)
    reference = bench_reference(copy.deepcopy(initial), split, spec, cfg, device)
    print(f"reference: {reference['images_per_s']:.1f} images/s", flush=True)
    generation = bench_trigger_generation(copy.deepcopy(trained), spec, cfg, device)
    verification = bench_verification(trained, spec, cfg)

    result = {"device": describe_device(device), "device_type": device.type, "arch": cfg["ARCH"],
              "dataset": spec.name, "image_shape": list(spec.shape), "batch_size": cfg["BATCH_SIZE"],
              "num_images": len(split), "warmup_steps": cfg["WARMUP_STEPS"], "measure_steps": cfg["MEASURE_STEPS"],
              "ours": ours, "reference": reference, "ratio": ours["images_per_s"] / reference["images_per_s"],
              "trigger_generation": generation, "verification": verification, "config": cfg,
              "versions": versions(device), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    print(table(result))
    atomic_write_json(result, out)
    print(f"-> {out}")


if __name__ == "__main__":
    run_main(main)
