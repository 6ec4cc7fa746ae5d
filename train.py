"""Train the classifier that will be watermarked (ResNet-18 on CIFAR-10 by default).

    python train.py                                   # the paper's setup and recipe, GPU when present
    python train.py --recipe fast                     # our faster recipe (one-cycle, label smoothing, nesterov)
    python train.py --dataset fashion-mnist --arch resnet8 --epochs 1 --train-subset 5000 --device cpu
    torchrun --standalone --nproc_per_node 4 train.py  # data parallel: --batch-size is the global batch

Every constant below can be overridden from the command line (--help lists them). The constants marked
(recipe) are the paper's; `--recipe fast` replaces them (recipe_settings in fragile/core/training.py, applied by
apply_recipe below), except those passed explicitly as flags.
"""
# ----------------------------------------------------------------------------- config
DATASET = "cifar10"          # cifar10 | cifar100 | fashion-mnist | mnist | synthetic
ARCH = "resnet18"            # resnet8 | resnet18 | resnet34 | resnet50
DATA_DIR = "data"            # datasets are downloaded here (or found offline)
TRAIN_SUBSET = 0             # >0: train on this many samples, class-balanced
EPOCHS = 40
RECIPE = "paper"             # paper: the constants below as they are | fast: ours (device-aware batch and lr)
BATCH_SIZE = 128             # (recipe)
LR = 0.1                     # (recipe) peak learning rate, SGD
SCHEDULE = "cosine"          # (recipe) cosine (per epoch, no warm-up) | onecycle (warm-up, cosine per step) | constant
WARMUP_EPOCHS = 0.0          # (recipe) onecycle's warm-up, capped at 20% of the run
MOMENTUM = 0.9               # (recipe)
NESTEROV = False             # (recipe)
WEIGHT_DECAY = 5e-4          # (recipe)
DECAY_ALL = True             # (recipe) weight decay on batch norm and biases too, as plain SGD(model.parameters()) does
LABEL_SMOOTHING = 0.0        # (recipe) the paper: plain cross-entropy
AUGMENT = True               # the dataset's train-time augmentation (on the device)
SEED = 0
DEVICE = "auto"              # auto | cpu | cuda | cuda:N (under torchrun: each rank takes cuda:LOCAL_RANK)
BACKEND = "auto"             # torchrun only: auto (nccl on GPUs, gloo on CPU) | nccl | gloo
SYNC_BN = False              # torchrun on GPUs: batch-norm statistics over the global batch (SyncBatchNorm), not per rank
AMP = True                   # mixed precision on GPU: bf16 where native, else fp16 with loss scaling (CPU: fp32)
FAST_MATH = True             # TF32 matmuls/convolutions and cuDNN autotuning on GPU
DATA_ON_DEVICE = True        # keep the uint8 dataset on the training device (off: on the CPU, batches copied over)
CHANNELS_LAST = True         # channels_last memory format on GPU
FUSED_OPTIMIZER = True       # fused (GPU) / foreach optimizer kernels
COMPILE = False              # torch.compile the model
EVAL_BATCH_SIZE = 1024
OUT = ""                     # checkpoint path; default checkpoints/<arch>_<dataset>.pt
OVERWRITE = False            # replace an existing checkpoint at OUT (its trigger sets will no longer verify)
RESUME = False               # continue from <out>.resume.pt (written every epoch)
BACKDOOR_WATERMARK = False   # also embed a robust (Adi et al. 2018) backdoor watermark while training
BACKDOOR_TRIGGERS = 100      # size of that robust trigger set
PROGRESS = True              # tqdm progress bars
# -----------------------------------------------------------------------------

import functools
import glob
import json
import math
import os
import time

import torch

from fragile.core import distributed as dist
from fragile.core.cli import UserError, apply_overrides, apply_preset, check_range, progress_bar, run_main
from fragile.core.data import DATASETS, device_generator, load_dataset, train_batches
from fragile.core.devices import describe_device, resolve_device, seed_everything, set_fast_math, versions
from fragile.core.io import (atomic_write_text, check_writable, default_checkpoint_path, read_checkpoint,
                             save_classifier, training_log_path)
from fragile.core.training import (RECIPES, SCHEDULES, accuracy, capture_rng, grad_scaler, lr_at, make_sgd,
                                   prepare_model, recipe_settings, restore_rng, sgd_kernels, train_steps)
from fragile.watermark import robust
from models import ARCHS, build_classifier


def resume_path(out):
    return out[:-3] + ".resume.pt" if out.endswith(".pt") else out + ".resume.pt"


def apply_recipe(config, device):
    """--recipe over the header's constants (the paper's recipe, so ``paper`` changes nothing); flags given
    explicitly win. The recipe names its settings by meaning: here they meet this header's names."""
    r = recipe_settings(RECIPE, device)
    if r is None:
        return config
    return apply_preset(globals(), config, {
        "BATCH_SIZE": r.batch_size, "LR": r.lr, "SCHEDULE": r.schedule, "WARMUP_EPOCHS": r.warmup_epochs,
        "MOMENTUM": r.momentum, "NESTEROV": r.nesterov, "WEIGHT_DECAY": r.weight_decay, "DECAY_ALL": r.decay_all,
        "LABEL_SMOOTHING": r.label_smoothing})


def read_resume(out):
    """The interrupted run's checkpoint, refused when it is for another model or dataset, or is not a resume file."""
    path = resume_path(out)
    if not os.path.exists(path):
        raise UserError(f"--resume: no interrupted run to continue at {path}")
    payload = read_checkpoint(path, "resume file")
    if payload["meta"].get("arch") != ARCH or payload["meta"].get("dataset") != DATASET:
        raise UserError(f"--resume: {path} is for {payload['meta'].get('arch')} on "
                        f"{payload['meta'].get('dataset')}, not {ARCH} on {DATASET}")
    state = payload.get("train_state")
    if not isinstance(state, dict) or not all(k in state for k in ("optimizer", "rng", "epoch", "elapsed")):
        raise UserError(f"--resume: {path} holds no training state (a finished checkpoint, not a resume file): "
                        f"train afresh with --overwrite")
    return payload


def check_settings():
    """Every number checked before any work starts: one error line naming the flag."""
    check_range("--epochs", EPOCHS, 1)
    check_range("--batch-size", BATCH_SIZE, 1)
    check_range("--eval-batch-size", EVAL_BATCH_SIZE, 1)
    check_range("--train-subset", TRAIN_SUBSET, 0)
    check_range("--lr", LR, 0, low_open=True)
    check_range("--momentum", MOMENTUM, 0, 1, high_open=True)
    check_range("--weight-decay", WEIGHT_DECAY, 0)
    check_range("--warmup-epochs", WARMUP_EPOCHS, 0)
    check_range("--label-smoothing", LABEL_SMOOTHING, 0, 1, high_open=True)
    check_range("--backdoor-triggers", BACKDOOR_TRIGGERS, 1)


def check_output(out):
    """The checkpoint is written only where it may be: a file path in a writable folder, and never over an existing
    checkpoint (whose trigger sets would stop verifying) unless --overwrite or --resume says so. With --resume, the
    interrupted run's payload, read and checked now, before the data is loaded (None otherwise)."""
    check_writable(out)
    resume = read_resume(out) if RESUME else None
    if os.path.exists(out) and not (OVERWRITE or RESUME):
        stem = out[:-3] if out.endswith(".pt") else out
        triggers = sorted(glob.glob(glob.escape(stem) + "_triggers_*"))
        has = f" and has trigger sets ({', '.join(os.path.basename(t) for t in triggers)}), which would no " \
              f"longer verify" if triggers else ""
        raise UserError(f"checkpoint {out} exists{has}: pass --overwrite to replace it, or --out elsewhere")
    if os.path.exists(resume_path(out)) and not (OVERWRITE or RESUME):
        raise UserError(f"an interrupted run left {resume_path(out)}: pass --resume to continue it, or --overwrite "
                        f"to start afresh")
    return resume


def build_model(spec, device):
    """(model, the module the steps run through, optimizer, loss scaler). The steps run through the model
    DDP-wrapped under torchrun and compiled when asked; measurements and checkpoints use the plain model."""
    model = prepare_model(build_classifier(ARCH, spec), device, CHANNELS_LAST and device.type == "cuda")
    if SYNC_BN and dist.world_size() > 1:   # same parameters and buffers: checkpoints load into the plain model
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    optimizer = make_sgd(model, LR, MOMENTUM, WEIGHT_DECAY, nesterov=NESTEROV, kernels=sgd_kernels(FUSED_OPTIMIZER),
                         decay_all=DECAY_ALL)
    scaler = grad_scaler(device, AMP)   # fp16 autocast only: its loss scale carries across epochs (and resumes)
    train_model = dist.wrap(model, device)
    train_model = torch.compile(train_model) if COMPILE else train_model
    return model, train_model, optimizer, scaler


def lr_schedule(steps_per_epoch):
    """The learning rate for each step of the whole run; onecycle's warm-up is capped at 20% of the run, so
    short runs still decay."""
    warmup = int(min(WARMUP_EPOCHS, 0.2 * EPOCHS) * steps_per_epoch)
    return functools.partial(lr_at, total_steps=EPOCHS * steps_per_epoch, peak_lr=LR, warmup_steps=warmup,
                             schedule=SCHEDULE, steps_per_epoch=steps_per_epoch)


def restore_run(payload, model, optimizer, scaler, gen, out):
    """The interrupted run's state put back: weights, optimizer, loss scale, random state, and its log as the
    resume file recorded it (a run killed between an epoch's log line and its resume file would otherwise log
    that epoch twice). Returns (epochs done, seconds spent, last test accuracy, log records)."""
    state = payload["train_state"]
    model.load_state_dict(payload["state_dict"])
    optimizer.load_state_dict(state["optimizer"])
    restore_rng(state["rng"], gen, reseed=SEED + state["epoch"])
    if state.get("scaler"):  # empty when saved without fp16 loss scaling
        scaler.load_state_dict(state["scaler"])
    log_records = list(state.get("log", []))
    if dist.is_main() and "log" in state:
        atomic_write_text("".join(json.dumps(r) + "\n" for r in log_records), training_log_path(out))
    print(f"resuming {resume_path(out)} after epoch {state['epoch']}")
    # a run stopped after its last epoch saves that epoch's test accuracy
    return state["epoch"], state["elapsed"], payload["meta"].get("test_accuracy"), log_records


def epoch_means(bar, steps_per_epoch, device):
    """Run an epoch's steps (``bar`` over train_steps), showing the running loss and accuracy now and then (the
    loss stays on the device between); (mean loss, accuracy) over every rank's images."""
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    seen = 0
    for step, loss, n_correct, n in bar:
        loss_sum += loss * n
        correct += n_correct
        seen += n
        if step % 20 == 0 or step % steps_per_epoch == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}", acc=f"{correct.item() / seen:.3f}")
    seen = torch.tensor(seen, device=device)
    dist.sum_across(loss_sum, correct, seen)
    return (loss_sum / int(seen)).item(), correct.item() / int(seen)


def append_log(out, record):
    """An epoch's line in <out>.log.jsonl (written as each epoch ends, so a long run can be followed), printed too."""
    with open(training_log_path(out), "a") as f:
        f.write(json.dumps(record) + "\n")
    print(json.dumps(record))


def checkpoint_meta(config, spec, device, backdoor, epochs, test_acc):
    """What a checkpoint (and each resume file) says about the run that made it."""
    return dict(arch=ARCH, dataset=DATASET, num_classes=spec.num_classes, input_shape=list(spec.shape),
                test_accuracy=test_acc, epochs=epochs, seed=SEED, train_subset=TRAIN_SUBSET, config=config,
                world_size=dist.world_size(), **versions(device), backdoor_watermark=robust.describe(backdoor))


def main():
    config = apply_overrides(globals(), __doc__, choices={"DATASET": list(DATASETS), "ARCH": list(ARCHS),
                                                           "SCHEDULE": list(SCHEDULES), "RECIPE": list(RECIPES),
                                                           "BACKEND": list(dist.BACKENDS)})
    out = OUT or default_checkpoint_path(ARCH, DATASET)
    device = resolve_device(DEVICE)
    config = apply_recipe(config, device)
    check_settings()
    device = dist.setup(BACKEND, device, [("batch-size", BATCH_SIZE)])
    resume = check_output(out) if dist.is_main() else None   # only rank 0 writes (and reads the resume file)
    if SYNC_BN and device.type != "cuda":
        raise UserError("--sync-bn needs GPUs: torch's SyncBatchNorm does not run on the CPU")
    set_fast_math(FAST_MATH and device.type == "cuda")
    seed_everything(SEED)
    spec, train, test = dist.local_main_first(load_dataset, DATASET, DATA_DIR, device if DATA_ON_DEVICE else "cpu",
                                              TRAIN_SUBSET, SEED)
    print(f"{DATASET}: {len(train)} train / {len(test)} test images {spec.shape}, {ARCH} on {describe_device(device)}")
    model, train_model, optimizer, scaler = build_model(spec, device)
    backdoor = robust.make_trigger_set(spec, BACKDOOR_TRIGGERS, SEED) if BACKDOOR_WATERMARK else None
    gen = device_generator(train.images.device, SEED)   # the data order and augmentation draws
    steps_per_epoch = -(-len(train) // BATCH_SIZE)
    lr_for_step = lr_schedule(steps_per_epoch)
    if RESUME:   # rank 0's resume file, read by check_output
        start_epoch, elapsed, test_acc, log_records = restore_run(dist.broadcast_from_main(resume), model, optimizer,
                                                                  scaler, gen, out)
    else:
        start_epoch, elapsed, test_acc, log_records = 0, 0.0, None, []
        if os.path.exists(training_log_path(out)) and dist.is_main():
            os.remove(training_log_path(out))  # a fresh run starts a fresh log
    batch_transform = robust.mixer(backdoor, device) if backdoor else None

    for epoch in range(start_epoch, EPOCHS):
        t0 = time.time()
        batches = train_batches(train, BATCH_SIZE, spec, gen, AUGMENT, rank=dist.rank(), world_size=dist.world_size())
        steps = train_steps(train_model, optimizer, batches, AMP, scaler, lr_for_step=lr_for_step,
                            first_step=epoch * steps_per_epoch, label_smoothing=LABEL_SMOOTHING,
                            batch_transform=batch_transform)
        bar = progress_bar(steps, total=steps_per_epoch, desc=f"epoch {epoch + 1}/{EPOCHS}",
                           enabled=PROGRESS and dist.is_main())
        train_loss, train_accuracy = epoch_means(bar, steps_per_epoch, device)
        if not math.isfinite(train_loss):
            kept = resume_path(out) if epoch > start_epoch or RESUME else "none (first epoch)"
            raise UserError(f"loss became {train_loss} in epoch {epoch + 1}; stopped. Last good checkpoint: {kept}")
        if dist.is_main():   # rank 0 measures, logs and saves the resume file; the others wait at the barrier
            test_acc = accuracy(model, test, EVAL_BATCH_SIZE)
            elapsed = elapsed + time.time() - t0
            record = dict(epoch=epoch + 1, train_loss=train_loss, train_accuracy=train_accuracy,
                          test_accuracy=test_acc, seconds=round(elapsed, 2), lr=optimizer.param_groups[0]["lr"])
            if backdoor:
                record["backdoor_accuracy"] = robust.trigger_accuracy(model, backdoor)
            log_records.append(record)
            append_log(out, record)
            meta = checkpoint_meta(config, spec, device, backdoor, epoch + 1, test_acc)
            save_classifier(resume_path(out), model, meta,
                            train_state={"optimizer": optimizer.state_dict(), "rng": capture_rng(gen),
                                         "scaler": scaler.state_dict(), "epoch": epoch + 1, "elapsed": elapsed,
                                         "log": log_records},
                            backdoor=robust.to_payload(backdoor))
        dist.barrier()

    if dist.is_main():   # the checkpoint replaces the resume file
        if test_acc is None:  # nothing trained and nothing recorded (an old resume file): measure it
            test_acc = accuracy(model, test, EVAL_BATCH_SIZE)
        final = save_classifier(out, model, checkpoint_meta(config, spec, device, backdoor, EPOCHS, test_acc),
                                backdoor=robust.to_payload(backdoor))
        if os.path.exists(resume_path(out)):
            os.remove(resume_path(out))
        print(f"test accuracy {test_acc:.4f}  wall time {elapsed:.1f}s  weights sha256 "
              f"{final['weights_sha256'][:16]}…  -> {out}")
    dist.barrier()
    dist.cleanup()


if __name__ == "__main__":
    run_main(main, interrupted="interrupted; rerun with the same flags and --resume to continue after the last "
                               "finished epoch (saved in <out>.resume.pt)")
