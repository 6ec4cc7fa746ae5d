"""Tamper with a watermarked model and track, step by step, how many trigger labels still match the key.

    python eval.py --dataset fashion-mnist --arch resnet8 --attack finetune --epochs 2 --device cpu
    python eval.py --attack poison --seeds 0 1 2
    torchrun --standalone --nproc_per_node 4 eval.py --attack finetune   # data-parallel fine-tuning

The watermarked checkpoint is never modified: every attack works on a copy.
"""
# ----------------------------------------------------------------------------- config
DATASET = "cifar10"
ARCH = "resnet18"
MODEL = ""                 # default checkpoints/<arch>_<dataset>.pt
METHOD = "paper"           # trigger set to track (default paths derive from it)
TRIGGERS = ""              # default <checkpoint stem>_triggers_<method>
KEY = ""                   # default: the key named in the trigger metadata
ATTACK = "finetune"
SEEDS = [0]
DATA_DIR = "data"
TRAIN_SUBSET = 0           # >0: fine-tune on this many samples, class-balanced
TEST_SUBSET = 0            # >0: measure clean accuracy / ASR on this many test images
DEVICE = "auto"            # under torchrun: each rank takes cuda:LOCAL_RANK
BACKEND = "auto"           # torchrun only: auto (nccl on GPUs, gloo on CPU) | nccl | gloo
# fine-tuning: the paper's settings
EPOCHS = 40
BATCH_SIZE = 256
LR = 1e-3
MOMENTUM = 0.9
WEIGHT_DECAY = 1e-3
DECAY_ALL = True           # weight decay on every parameter, batch norm included (the paper's plain SGD); off: not on norms/biases
AUGMENT = True
FREEZE_BN = False          # fine-tune with batch-norm statistics frozen (only the weights move)
AMP = True                 # mixed precision for the fine-tuning steps on GPU: bf16, or fp16 + loss scaling (verification stays fp32)
FAST_MATH = True           # TF32 and cuDNN autotuning for the fine-tuning steps on GPU (verification pins fp32 itself)
FUSED_OPTIMIZER = True
DATA_ON_DEVICE = True      # keep the fine-tuning data on the device (off: on the CPU, batches copied over)
EARLY_STEPS = [1, 2, 5, 10, 20, 50, 100]   # extra measurements inside the first epoch
MAX_MISMATCHES = 0         # verification tolerance, as in verify.py
EVAL_BATCH_SIZE = 1024
# poison (BadNets)
POISON_FRACTION = 0.1
POISON_TARGET = 0
PATCH_SIZE = 3
PATCH_POSITION = "bottom-right"   # bottom-right | bottom-left | top-right | top-left
PATCH_VALUE = 255                 # patch colour, 0-255
CHANNELS_LAST = True       # channels_last fine-tuning on GPU
COMPILE = False            # torch.compile the fine-tuned copy
# tamper suite (fine-prune, obfuscate, noise, single-weight, bitflip, prune, quantize, restore)
TAMPER_ACCURACY_TRIALS = 3        # per sweep point, detected and missed trials each that measure clean accuracy
FINE_PRUNE_ACCURACY_DROP = 0.05   # prune last-layer channels until clean accuracy has dropped this much (absolute)
FINE_PRUNE_RANK_SAMPLES = 2000    # clean training images that rank the channels by mean activation
FINE_PRUNE_EPOCHS = 2             # clean fine-tuning after pruning (pruned channels stay pruned)
FINE_PRUNE_POISONED_MODEL = ""    # also defend this poisoned copy (eval.py --attack poison --save-tampered X.pt)
OBFUSCATE_KS = [1, 10, 100, 275]  # weights obfuscated (NNSplitter: 275 of ResNet-18's 11M)
OBFUSCATE_STEPS = 40              # signed-gradient ascent steps on the clean loss
OBFUSCATE_BATCH_SIZE = 128        # clean training images per ascent step
OBFUSCATE_STEP_SIZE = 0.05        # per step, as a fraction of the weight's layer's largest |w|
NOISE_SIGMAS = [1e-6, 1e-5, 1e-4, 1e-3, 1e-2]   # std of the Gaussian added to every weight (absolute)
NOISE_TRIALS = 20
SINGLE_WEIGHT_EPSILONS = [1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0]   # one weight times (1 +- epsilon)
SINGLE_WEIGHT_TRIALS = 20
BITFLIP_KS = [1, 10, 100]         # weights that get one flipped bit each
BITFLIP_CLASSES = ["mantissa-low", "mantissa-high", "exponent", "sign"]
BITFLIP_TRIALS = 20
PRUNE_RATIOS = [0.01, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9]   # global magnitude pruning of conv/linear weights
QUANTIZE_MODES = ["fp16", "bf16", "int8", "int8-tensor"]   # storage round trips; int8 weight-only per channel / tensor
RESTORE_ATTACK_EPOCHS = 2         # restore: the attacker's fine-tuning first...
RESTORE_ATTACK_LR = 0.05          # ...at a learning rate high enough to fade a robust watermark
RESTORE_EPOCHS = 1                # then brief training on the original training data
RESTORE_LR = 1e-3
RESTORE_RECOVERED = 0.9           # robust watermark counts as restored at >= this fraction of its accuracy before
# benign matrix
BENIGN_BATCH_SIZES = [1, 16]       # compared with all triggers at once
ENVELOPE = []                      # settings the matrix covers (fragile/watermark/jitter.py); empty: the triggers' own envelope
# method comparison (--attack compare; fragile/experiments/compare.py)
COMPARE_FINETUNE_EPOCHS = 1
COMPARE_NOISE_SIGMAS = [1e-5, 1e-4, 1e-3]
COMPARE_TRIALS = 20                # noise and single-weight trials
COMPARE_SINGLE_WEIGHT_EPS = 1e-3
COMPARE_OBFUSCATE_K = 1
COMPARE_OBFUSCATE_SCALE = 10.0     # obfuscated weights move this many standard deviations of their tensor
# output
RESULTS_DIR = "results"
SAVE_TAMPERED = ""         # write the (last seed's) tampered model here, for verify.py
OVERWRITE = False          # replace an existing results file (or --save-tampered checkpoint)
PROGRESS = True
# -----------------------------------------------------------------------------

import time

import torch

from fragile.attacks.context import EvalContext, FinetuneParams, PoisonParams
from fragile.core import distributed as dist
from fragile.core.cli import UserError, apply_overrides, check_nonempty, check_range, from_header, run_main
from fragile.core.data import DATASETS, balanced_subset, get_spec, load_split
from fragile.core.devices import describe_device, resolve_device, set_fast_math, versions
from fragile.core.io import (check_writable, check_writable_dir, default_checkpoint_path, load_classifier,
                             read_checkpoint, refuse_existing, save_classifier)
from fragile.core.results import claim_results, results_path, write_results
from fragile.experiments.registry import ATTACKS, DATA_PARALLEL
from fragile.watermark.jitter import ENVELOPE_ENTRIES
from fragile.watermark.paths import load_watermark, tensor_file, triggers_path
from fragile.watermark.verify import check_compatible, check_tolerance, query_labels
from models import ARCHS


def check_settings():
    """The numbers every attack shares, checked before any work (each attack checks its own)."""
    check_nonempty("--seeds", SEEDS)
    if len(set(SEEDS)) != len(SEEDS):
        raise UserError(f"--seeds repeats a seed ({' '.join(map(str, SEEDS))}): each run needs its own")
    check_range("--epochs", EPOCHS, 0)
    check_range("--batch-size", BATCH_SIZE, 1)
    check_range("--eval-batch-size", EVAL_BATCH_SIZE, 1)
    check_range("--train-subset", TRAIN_SUBSET, 0)
    check_range("--test-subset", TEST_SUBSET, 0)
    check_range("--lr", LR, 0)
    check_range("--momentum", MOMENTUM, 0, 1, high_open=True)
    check_range("--weight-decay", WEIGHT_DECAY, 0)
    check_range("--max-mismatches", MAX_MISMATCHES, 0)
    check_range("--poison-fraction", POISON_FRACTION, 0, 1)
    check_range("--patch-value", PATCH_VALUE, 0, 255)
    check_range("--patch-size", PATCH_SIZE, 1)


def check_outputs():
    """Where the results and the tampered model go, checked before the attack runs."""
    check_writable_dir(RESULTS_DIR, "--results-dir")
    if SAVE_TAMPERED:
        check_writable(SAVE_TAMPERED, "--save-tampered")
        refuse_existing(SAVE_TAMPERED, OVERWRITE, "checkpoint", "--save-tampered")


def check_made_for(model, model_meta, watermark, device):
    """The triggers must be this model's: the weights hash they were made for is the one computed from the weights
    loaded, and the untouched model labels every trigger as the key does. Otherwise every attack would report a
    detection that was there before it started."""
    bound = watermark.meta.get("weights_sha256")
    if bound and bound != model_meta["weights_sha256"]:
        raise UserError(f"the triggers {watermark.triggers_path} were made for weights {bound[:16]}…, not this "
                        f"model's {model_meta['weights_sha256'][:16]}…: pass --model the watermarked checkpoint, or "
                        f"--triggers/--method the set made for this one")
    off = int((query_labels(model, watermark.triggers.to(device)) != torch.tensor(watermark.key)).sum())
    if off:
        raise UserError(f"the untouched model already disagrees with the key on {off} of {len(watermark.key)} "
                        f"triggers: these triggers were not made for it")


def main():
    config = apply_overrides(globals(), __doc__, choices={"DATASET": list(DATASETS), "ARCH": list(ARCHS),
                                                           "ATTACK": list(ATTACKS), "ENVELOPE": ENVELOPE_ENTRIES,
                                                           "BACKEND": list(dist.BACKENDS)})
    check_settings()
    device = dist.setup(BACKEND, resolve_device(DEVICE), [("batch-size", BATCH_SIZE)])
    if dist.world_size() > 1 and ATTACK not in DATA_PARALLEL:
        raise UserError(f"--attack {ATTACK} does not run data parallel: under torchrun only "
                        f"{' and '.join(DATA_PARALLEL)} do; run it with plain python")
    attack = ATTACKS[ATTACK]
    params = from_header(attack.params, globals()) if attack.params else None
    set_fast_math(FAST_MATH and device.type == "cuda")
    model_path = MODEL or default_checkpoint_path(ARCH, DATASET)
    model, model_meta = load_classifier(model_path, device)
    watermark = load_watermark(triggers_path(model_path, METHOD, TRIGGERS), KEY)
    check_compatible(watermark.triggers, watermark.key, model_meta["input_shape"], model_meta["num_classes"])
    check_tolerance(MAX_MISMATCHES, len(watermark.key))
    check_made_for(model, model_meta, watermark, device)
    spec = get_spec(model_meta["dataset"])
    method = watermark.meta.get("method", METHOD)
    out = results_path(RESULTS_DIR, model_meta, method, ATTACK)
    if dist.is_main():   # rank 0 alone writes
        check_outputs()
        claim_results(out, OVERWRITE)
    train, test = dist.local_main_first(load_splits, spec, device)
    ctx = EvalContext(model, spec, train, test, watermark.triggers.to(device), torch.tensor(watermark.key), device,
                      finetune=from_header(FinetuneParams, globals()), poison=from_header(PoisonParams, globals()),
                      max_mismatches=MAX_MISMATCHES, eval_batch_size=EVAL_BATCH_SIZE,
                      query_order=watermark.meta.get("query_order"),   # most fragile first (generate_samples.py)
                      trigger_meta=watermark.meta, tensor_file=tensor_file(watermark.triggers_path),
                      model_meta=model_meta, backdoor=read_checkpoint(model_path).get("backdoor"), progress=PROGRESS)
    print(f"{ATTACK} on {model_path} ({model_meta['arch']}, {model_meta['dataset']}), {len(watermark.key)} triggers, "
          f"{describe_device(device)}")

    started, runs, tampered = time.time(), [], None
    for seed in SEEDS:
        print(f"seed {seed}")
        run, tampered = attack.run(ctx, params, seed)
        runs.append(run)
    results = {"attack": ATTACK, "model": model_path, "arch": model_meta["arch"], "dataset": model_meta["dataset"],
               "method": method, "envelope": watermark.meta.get("envelope", ["exact"]),
               "weights_sha256": model_meta["weights_sha256"],
               "num_triggers": len(watermark.key), "config": config, "versions": versions(device),
               "device": describe_device(device), "world_size": dist.world_size(),
               "wall_time_s": round(time.time() - started, 2), "runs": runs}
    dist.on_main(write_outputs, results, out, tampered, model_meta)
    dist.cleanup()


def load_splits(spec, device):
    """The fine-tuning and test splits (class-balanced subsets when asked), on their devices."""
    train = balanced_subset(load_split(spec, DATA_DIR, True), TRAIN_SUBSET, spec.num_classes)
    test = balanced_subset(load_split(spec, DATA_DIR, False), TEST_SUBSET, spec.num_classes)
    return train.to(device if DATA_ON_DEVICE else "cpu"), test.to(device)


def write_outputs(results, out, tampered, model_meta):
    """Results JSON and CSV, and the tampered model when asked (rank 0 alone under torchrun)."""
    write_results(results, out)
    print(f"results -> {out} (+ .csv)")
    if SAVE_TAMPERED and tampered is not None:
        save_classifier(SAVE_TAMPERED, tampered, dict(model_meta, tampered_by=ATTACK))
        print(f"tampered model -> {SAVE_TAMPERED}")


if __name__ == "__main__":
    run_main(main)
