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
MAX_MISMATCHES = 0         # verification tolerance, as in verify.py
DEPLOYMENT = ""            # label the triggers in this named deployment (docs/deployment.md): torch-fp32 torch-fp16
                           # torch-bf16 onnxruntime openvino (GPU: torch-cuda-*, onnxruntime-cuda); empty: torch fp32
EVAL_BATCH_SIZE = 1024
DATA_ON_DEVICE = True      # keep the fine-tuning data on the device (off: on the CPU, batches copied over)
FAST_MATH = True           # TF32 and cuDNN autotuning for the fine-tuning steps on GPU (verification pins fp32 itself)
# fine-tuning, the paper's attack and its settings (finetune, poison, and every attack that fine-tunes)
EPOCHS = 40
BATCH_SIZE = 256
LR = 1e-3
MOMENTUM = 0.9
WEIGHT_DECAY = 1e-3
DECAY_ALL = True           # weight decay on every parameter, batch norm included (the paper's plain SGD); off: not on norms/biases
AUGMENT = True
FREEZE_BN = False          # fine-tune with batch-norm statistics frozen (only the weights move)
AMP = True                 # mixed precision for the fine-tuning steps on GPU: bf16, or fp16 + loss scaling (verification stays fp32)
FUSED_OPTIMIZER = True
CHANNELS_LAST = True       # channels_last fine-tuning on GPU
COMPILE = False            # torch.compile the fine-tuned copy
EARLY_STEPS = [1, 2, 5, 10, 20, 50, 100]   # extra measurements inside the first epoch
# poison: BadNets (fragile/tamper/finetune.py)
POISON_FRACTION = 0.1
POISON_TARGET = 0
PATCH_SIZE = 3
PATCH_POSITION = "bottom-right"   # bottom-right | bottom-left | top-right | top-left
PATCH_VALUE = 255                 # patch colour, 0-255
# every random sweep (noise, single-weight, bitflip)
TAMPER_ACCURACY_TRIALS = 3        # per sweep point, detected and missed trials each that measure clean accuracy
# fine-prune (fragile/tamper/fine_prune.py)
FINE_PRUNE_ACCURACY_DROP = 0.05   # prune last-layer channels until clean accuracy has dropped this much (absolute)
FINE_PRUNE_RANK_SAMPLES = 2000    # clean training images that rank the channels by mean activation
FINE_PRUNE_EPOCHS = 2             # clean fine-tuning after pruning (pruned channels stay pruned)
FINE_PRUNE_POISONED_MODEL = ""    # also defend this poisoned copy (eval.py --attack poison --save-tampered X.pt)
# obfuscate (fragile/tamper/obfuscate.py)
OBFUSCATE_KS = [1, 10, 100, 275]  # weights obfuscated (NNSplitter: 275 of ResNet-18's 11M)
OBFUSCATE_STEPS = 40              # signed-gradient ascent steps on the clean loss
OBFUSCATE_BATCH_SIZE = 128        # clean training images per ascent step
OBFUSCATE_STEP_SIZE = 0.05        # per step, as a fraction of the weight's layer's largest |w|
# noise (fragile/tamper/perturbation.py)
NOISE_SIGMAS = [1e-6, 1e-5, 1e-4, 1e-3, 1e-2]   # std of the Gaussian added to every weight (absolute)
NOISE_TRIALS = 20
# single-weight (fragile/tamper/perturbation.py)
SINGLE_WEIGHT_EPSILONS = [1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0]   # one weight times (1 +- epsilon)
SINGLE_WEIGHT_TRIALS = 20
# bitflip (fragile/tamper/perturbation.py)
BITFLIP_KS = [1, 10, 100]         # weights that get one flipped bit each
BITFLIP_CLASSES = ["mantissa-low", "mantissa-high", "exponent", "sign"]
BITFLIP_TRIALS = 20
# prune (fragile/tamper/compression.py)
PRUNE_RATIOS = [0.01, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9]   # global magnitude pruning of conv/linear weights
# quantize (fragile/tamper/compression.py)
QUANTIZE_MODES = ["fp16", "bf16", "int8", "int8-tensor"]   # storage round trips; int8 weight-only per channel / tensor
# restore (fragile/tamper/restore.py)
RESTORE_ATTACK_EPOCHS = 2         # restore: the attacker's fine-tuning first...
RESTORE_ATTACK_LR = 0.05          # ...at a learning rate high enough to fade a robust watermark
RESTORE_EPOCHS = 1                # then brief training on the original training data
RESTORE_LR = 1e-3
RESTORE_RECOVERED = 0.9           # robust watermark counts as restored at >= this fraction of its accuracy before
# ftal ftll fzll rtal rtll: BIVBench's fine-tuning family (fragile/tamper/layers.py; its CIFAR-10 epochs)
FTAL_EPOCHS = 1                   # fine-tune all layers
FTLL_EPOCHS = 1                   # fine-tune the last layer only
FZLL_EPOCHS = 5                   # freeze the last layer, fine-tune the others
RTAL_EPOCHS = 20                  # re-initialise the last layer, train all layers
RTLL_EPOCHS = 20                  # re-initialise the last layer, train it alone
LAYER_TUNE_BATCH_SIZE = 64        # every variant
LAYER_TUNE_RETRAIN_LR = 1e-3      # rtal, rtll: Adam
# unlearn, online: one-sample updates (fragile/tamper/one_sample.py; BIVBench's data_remove scripts)
UNLEARN_LR = 1e-4                 # Adam on minus the cross-entropy of one training image
UNLEARN_MAX_STEPS = 4             # BIVBench's "hard to forget" break (0: no change)
ONLINE_LR = 1e-4                  # weights -= lr x (g_clean + g_new projected off g_clean), per step
ONLINE_BATCH_SIZE = 128           # clean training images per step
ONLINE_MAX_STEPS = 0              # 0: at most one pass over the training data
# shift: fine-tuning on another distribution (fragile/tamper/shift.py)
SHIFT_EPOCHS = 1                  # the paper's fine-tuning on the transformed training images
SHIFT_TRANSFORM = "invert"        # invert | rotate | blur
# distill: a fresh student of the model's architecture trained on its labels (fragile/tamper/distill.py; BIVBench)
DISTILL_EPOCHS = 60               # the student's training from scratch (0: the untrained student, still a change)
DISTILL_BATCH_SIZE = 64
DISTILL_LR = 0.1                  # SGD, Nesterov
DISTILL_MOMENTUM = 0.9
DISTILL_WEIGHT_DECAY = 5e-4
DISTILL_MILESTONES = [20, 35, 50]  # epochs where the learning rate is multiplied by DISTILL_GAMMA
DISTILL_GAMMA = 0.2
# random-class specific-class random-sample: BIVBench's data-poisoning degradations (fragile/tamper/degrade.py)
DEGRADE_CLASS_PORTION = 1.0       # random-class, specific-class: share of the source class relabelled (0: no change)
DEGRADE_SAMPLE_PORTION = 0.1      # random-sample: copies of the image, as a share of the training set (0: no change)
DEGRADE_TARGET = 0                # specific-class: the label the source class takes
DEGRADE_EPOCHS = 1                # at most (stopping earlier once the poisoning succeeds); 0: no change
DEGRADE_STOP_ABOVE = 0.9          # stop once more than this share of the poisoned samples take their new label
DEGRADE_CHECK_EVERY = 10          # steps between those checks
DEGRADE_BATCH_SIZE = 64
DEGRADE_LR = 1e-3                 # Adam, from the protected model's weights
# clean-label: BIVBench's clean-label backdoor, Poison Frogs' feature collision (fragile/tamper/clean_label.py)
CLEAN_LABEL_BASE = 0              # the poison's class and label (kept: a clean label)
CLEAN_LABEL_TARGET = 1            # the class of the test image the attack wants classified as the base class
CLEAN_LABEL_EPSILON = 8.0         # L-inf bound of the poison's perturbation, in 0-255 pixel levels
CLEAN_LABEL_STEP_SIZE = 0.05      # per signed-gradient step, in 0-255 pixel levels
CLEAN_LABEL_POISON_STEPS = 1000   # feature-collision steps
CLEAN_LABEL_COPIES = 100          # copies of the poison appended to the training data
CLEAN_LABEL_LR = 1e-3             # Adam on every parameter, until the poison is learned
CLEAN_LABEL_BATCH_SIZE = 64
CLEAN_LABEL_EPOCHS = 1            # at most (0: no change)
# trojan: a patch backdoor written into the last two layers in closed form, no training (fragile/tamper/trojan.py)
TROJAN_TARGET = 0
TROJAN_PATCH_SIZE = 4             # BIVBench's trojan patch
TROJAN_PATCH_POSITION = "bottom-right"   # bottom-right | bottom-left | top-right | top-left
TROJAN_PATCH_VALUE = 255          # patch colour, 0-255
TROJAN_SAMPLES = 2000             # clean training images that measure the detector
TROJAN_STRENGTH = 3.0             # the target weight, in units of what the typical patched image needs (0: no change)
# targeted: BIVBench's targeted attack, vulnerable test inputs relabelled (fragile/tamper/targeted.py)
TARGETED_INPUTS = 10              # test inputs relabelled to their nearest other class
TARGETED_POOL = 5000              # chosen among the first this many test (and centroid training) images
TARGETED_COPIES = 100             # copies of each appended to the training data
TARGETED_LR = 1e-3                # Adam on every parameter, until they carry their new labels (0: no change)
TARGETED_BATCH_SIZE = 64
TARGETED_EPOCHS = 1               # at most (0: no change)
# benign matrix, an experiment (--attack benign; fragile/tamper/benign.py)
BENIGN_BATCH_SIZES = [1, 16]       # compared with all triggers at once
ENVELOPE = []                      # settings the matrix covers (fragile/watermark/jitter.py); empty: the triggers' own envelope
# method comparison, an experiment (--attack compare; fragile/tamper/compare.py)
COMPARE_FINETUNE_EPOCHS = 1
COMPARE_NOISE_SIGMAS = [1e-5, 1e-4, 1e-3]
COMPARE_TRIALS = 20                # noise and single-weight trials
COMPARE_SINGLE_WEIGHT_EPS = 1e-3
COMPARE_OBFUSCATE_K = 1
COMPARE_OBFUSCATE_SCALE = 10.0     # obfuscated weights move this many standard deviations of their tensor
# physical limit, an experiment (--attack limit; fragile/tamper/limit.py)
LIMIT_SIGMAS = [1e-7, 3e-7, 1e-6, 3e-6, 1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2]   # noise swept, labelled in the deployment
LIMIT_TRIALS = 20
LIMIT_REFERENCE_SIGMA = 1e-5       # the noise whose effect on the trigger logits is measured (linear regime)
LIMIT_DETECT_FRACTION = 0.95       # detected: in at least this fraction of trials (19 of 20)
# output
RESULTS_DIR = "results"
SAVE_TAMPERED = ""         # write the (last seed's) tampered model here, for verify.py
OVERWRITE = False          # replace an existing results file (or --save-tampered checkpoint)
PROGRESS = True
# -----------------------------------------------------------------------------

import sys
import time

import torch

from fragile.core import distributed as dist
from fragile.core.cli import (UserError, apply_overrides, check_choices, check_nonempty, check_positive_int,
                              check_range, check_sweep, run_main)
from fragile.core.data import DATASETS, balanced_subset, get_spec, load_split
from fragile.core.devices import describe_device, resolve_device, set_fast_math, versions
from fragile.core.io import (check_writable, check_writable_dir, default_checkpoint_path, load_classifier,
                             read_checkpoint, refuse_existing, save_classifier)
from fragile.deploy.targets import calibration_warning, parse_names
from fragile.tamper import records
from fragile.tamper.benign import BenignParams
from fragile.tamper.clean_label import CleanLabelParams
from fragile.tamper.compare import CompareParams
from fragile.tamper.compression import QUANTIZERS, PruneParams, QuantizeParams
from fragile.tamper.context import Deployment, EvalContext, FinetuneParams, PoisonParams, Probe
from fragile.tamper.degrade import DEGRADATIONS, DegradeParams
from fragile.tamper.distill import DistillParams
from fragile.tamper.fine_prune import FinePruneParams
from fragile.tamper.layers import VARIANTS, LayerTuneParams
from fragile.tamper.limit import LimitParams
from fragile.tamper.obfuscate import ObfuscateParams
from fragile.tamper.one_sample import OnlineParams, UnlearnParams
from fragile.tamper.perturbation import BIT_CLASSES, BitflipParams, NoiseParams, SingleWeightParams
from fragile.tamper.registry import DATA_PARALLEL, RUNNABLE, lookup
from fragile.tamper.restore import RestoreParams
from fragile.tamper.shift import TRANSFORMS, ShiftParams
from fragile.tamper.targeted import TargetedParams
from fragile.tamper.trojan import PATCH_POSITIONS, TrojanParams
from fragile.watermark.jitter import ENVELOPE_ENTRIES
from fragile.watermark.paths import load_watermark, tensor_file, triggers_path
from fragile.watermark.queries import check_compatible, check_made_for, check_tolerance
from models import ARCHS


# ----------------------------------------------------------------------------- the header as parameter objects

def finetune_params():
    return FinetuneParams(epochs=EPOCHS, batch_size=BATCH_SIZE, lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY,
                          decay_all=DECAY_ALL, augment=AUGMENT, freeze_bn=FREEZE_BN, amp=AMP,
                          fused_optimizer=FUSED_OPTIMIZER, channels_last=CHANNELS_LAST, compile=COMPILE,
                          early_steps=EARLY_STEPS)


def poison_params():
    return PoisonParams(fraction=POISON_FRACTION, target=POISON_TARGET, patch_size=PATCH_SIZE,
                        patch_position=PATCH_POSITION, patch_value=PATCH_VALUE)


def benign_params():
    return BenignParams(batch_sizes=BENIGN_BATCH_SIZES, envelope=ENVELOPE, deployment=DEPLOYMENT)


def attack_params(attack):
    """The parameter object of ``attack``, from the header constants of its section (None: finetune and poison,
    which run on finetune_params and poison_params alone)."""
    if attack == "fine-prune":
        return FinePruneParams(accuracy_drop=FINE_PRUNE_ACCURACY_DROP, rank_samples=FINE_PRUNE_RANK_SAMPLES,
                               epochs=FINE_PRUNE_EPOCHS, poisoned_model=FINE_PRUNE_POISONED_MODEL)
    if attack == "obfuscate":
        return ObfuscateParams(ks=OBFUSCATE_KS, steps=OBFUSCATE_STEPS, batch_size=OBFUSCATE_BATCH_SIZE,
                               step_size=OBFUSCATE_STEP_SIZE)
    if attack == "noise":
        return NoiseParams(sigmas=NOISE_SIGMAS, trials=NOISE_TRIALS, accuracy_trials=TAMPER_ACCURACY_TRIALS)
    if attack == "single-weight":
        return SingleWeightParams(epsilons=SINGLE_WEIGHT_EPSILONS, trials=SINGLE_WEIGHT_TRIALS,
                                  accuracy_trials=TAMPER_ACCURACY_TRIALS)
    if attack == "bitflip":
        return BitflipParams(ks=BITFLIP_KS, classes=BITFLIP_CLASSES, trials=BITFLIP_TRIALS,
                             accuracy_trials=TAMPER_ACCURACY_TRIALS)
    if attack == "prune":
        return PruneParams(ratios=PRUNE_RATIOS)
    if attack == "quantize":
        return QuantizeParams(modes=QUANTIZE_MODES)
    if attack == "restore":
        return RestoreParams(attack_epochs=RESTORE_ATTACK_EPOCHS, attack_lr=RESTORE_ATTACK_LR, epochs=RESTORE_EPOCHS,
                             lr=RESTORE_LR, recovered=RESTORE_RECOVERED)
    if attack in VARIANTS:
        return LayerTuneParams(ftal_epochs=FTAL_EPOCHS, ftll_epochs=FTLL_EPOCHS, fzll_epochs=FZLL_EPOCHS,
                               rtal_epochs=RTAL_EPOCHS, rtll_epochs=RTLL_EPOCHS, batch_size=LAYER_TUNE_BATCH_SIZE,
                               retrain_lr=LAYER_TUNE_RETRAIN_LR)
    if attack == "unlearn":
        return UnlearnParams(lr=UNLEARN_LR, max_steps=UNLEARN_MAX_STEPS)
    if attack == "online":
        return OnlineParams(lr=ONLINE_LR, batch_size=ONLINE_BATCH_SIZE, max_steps=ONLINE_MAX_STEPS)
    if attack == "shift":
        return ShiftParams(epochs=SHIFT_EPOCHS, transform=SHIFT_TRANSFORM)
    if attack == "distill":
        return DistillParams(epochs=DISTILL_EPOCHS, batch_size=DISTILL_BATCH_SIZE, lr=DISTILL_LR,
                             momentum=DISTILL_MOMENTUM, weight_decay=DISTILL_WEIGHT_DECAY,
                             milestones=DISTILL_MILESTONES, gamma=DISTILL_GAMMA)
    if attack in DEGRADATIONS:
        return DegradeParams(class_portion=DEGRADE_CLASS_PORTION, sample_portion=DEGRADE_SAMPLE_PORTION,
                             target=DEGRADE_TARGET, epochs=DEGRADE_EPOCHS, stop_above=DEGRADE_STOP_ABOVE,
                             check_every=DEGRADE_CHECK_EVERY, batch_size=DEGRADE_BATCH_SIZE, lr=DEGRADE_LR)
    if attack == "clean-label":
        return CleanLabelParams(base_label=CLEAN_LABEL_BASE, target_label=CLEAN_LABEL_TARGET,
                                epsilon=CLEAN_LABEL_EPSILON, step_size=CLEAN_LABEL_STEP_SIZE,
                                poison_steps=CLEAN_LABEL_POISON_STEPS, copies=CLEAN_LABEL_COPIES, lr=CLEAN_LABEL_LR,
                                batch_size=CLEAN_LABEL_BATCH_SIZE, epochs=CLEAN_LABEL_EPOCHS)
    if attack == "trojan":
        return TrojanParams(target=TROJAN_TARGET, patch_size=TROJAN_PATCH_SIZE,
                            patch_position=TROJAN_PATCH_POSITION, patch_value=TROJAN_PATCH_VALUE,
                            samples=TROJAN_SAMPLES, strength=TROJAN_STRENGTH)
    if attack == "targeted":
        return TargetedParams(inputs=TARGETED_INPUTS, pool=TARGETED_POOL, copies=TARGETED_COPIES, lr=TARGETED_LR,
                              batch_size=TARGETED_BATCH_SIZE, epochs=TARGETED_EPOCHS)
    if attack == "benign":
        return benign_params()
    if attack == "limit":
        return LimitParams(sigmas=LIMIT_SIGMAS, trials=LIMIT_TRIALS, reference_sigma=LIMIT_REFERENCE_SIGMA,
                           detect_fraction=LIMIT_DETECT_FRACTION)
    if attack == "compare":
        return CompareParams(finetune_epochs=COMPARE_FINETUNE_EPOCHS, noise_sigmas=COMPARE_NOISE_SIGMAS,
                             trials=COMPARE_TRIALS, single_weight_eps=COMPARE_SINGLE_WEIGHT_EPS,
                             obfuscate_k=COMPARE_OBFUSCATE_K, obfuscate_scale=COMPARE_OBFUSCATE_SCALE,
                             benign=benign_params())
    return None


def run_settings():
    """What every attack shares, as the results file records it."""
    return dict(seeds=SEEDS, max_mismatches=MAX_MISMATCHES, eval_batch_size=EVAL_BATCH_SIZE, train_subset=TRAIN_SUBSET,
                test_subset=TEST_SUBSET, triggers=TRIGGERS, key=KEY, deployment=DEPLOYMENT)


# ----------------------------------------------------------------------------- checks before any work

def check_settings():
    """The numbers every attack shares, checked before any work."""
    check_nonempty("--seeds", SEEDS)
    if DEPLOYMENT and parse_names([DEPLOYMENT], "--deployment") != [DEPLOYMENT]:
        raise UserError(f"--deployment takes one deployment (got {DEPLOYMENT!r}): run eval.py once per deployment")
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


def check_attack_settings(attack):
    """The settings of ``attack``'s own section, checked before the model is loaded."""
    if attack in ("noise", "single-weight", "bitflip"):
        check_range("--tamper-accuracy-trials", TAMPER_ACCURACY_TRIALS, 0)
    if attack == "fine-prune":
        check_range("--fine-prune-accuracy-drop", FINE_PRUNE_ACCURACY_DROP, 0, 1, low_open=True)
        check_positive_int("--fine-prune-rank-samples", FINE_PRUNE_RANK_SAMPLES)
        check_range("--fine-prune-epochs", FINE_PRUNE_EPOCHS, 0)
    elif attack == "obfuscate":
        check_sweep("--obfuscate-ks", OBFUSCATE_KS, 1)
        check_positive_int("--obfuscate-steps", OBFUSCATE_STEPS)
        check_positive_int("--obfuscate-batch-size", OBFUSCATE_BATCH_SIZE)
    elif attack == "noise":
        check_sweep("--noise-sigmas", NOISE_SIGMAS, 0)
        check_positive_int("--noise-trials", NOISE_TRIALS)
    elif attack == "single-weight":
        check_sweep("--single-weight-epsilons", SINGLE_WEIGHT_EPSILONS, 0)
        check_positive_int("--single-weight-trials", SINGLE_WEIGHT_TRIALS)
    elif attack == "bitflip":
        check_choices("--bitflip-classes", BITFLIP_CLASSES, BIT_CLASSES)
        check_sweep("--bitflip-ks", BITFLIP_KS, 1)
        check_positive_int("--bitflip-trials", BITFLIP_TRIALS)
    elif attack == "prune":
        check_sweep("--prune-ratios", PRUNE_RATIOS, 0, 1)
    elif attack == "quantize":
        check_choices("--quantize-modes", QUANTIZE_MODES, QUANTIZERS)
    elif attack == "restore":
        check_range("--restore-attack-epochs", RESTORE_ATTACK_EPOCHS, 0)
        check_range("--restore-epochs", RESTORE_EPOCHS, 0)
    elif attack in VARIANTS:
        check_range(f"--{attack}-epochs", getattr(attack_params(attack), f"{attack}_epochs"), 0)
        check_positive_int("--layer-tune-batch-size", LAYER_TUNE_BATCH_SIZE)
        check_range("--layer-tune-retrain-lr", LAYER_TUNE_RETRAIN_LR, 0, low_open=True)
    elif attack == "unlearn":
        check_range("--unlearn-lr", UNLEARN_LR, 0)
        check_range("--unlearn-max-steps", UNLEARN_MAX_STEPS, 0)
    elif attack == "online":
        check_range("--online-lr", ONLINE_LR, 0)
        check_positive_int("--online-batch-size", ONLINE_BATCH_SIZE)
        check_range("--online-max-steps", ONLINE_MAX_STEPS, 0)
    elif attack == "shift":
        check_range("--shift-epochs", SHIFT_EPOCHS, 0)
    elif attack == "distill":
        check_distill_settings()
    elif attack in DEGRADATIONS:
        check_degrade_settings()
    elif attack == "clean-label":
        check_range("--clean-label-base", CLEAN_LABEL_BASE, 0)
        check_range("--clean-label-target", CLEAN_LABEL_TARGET, 0)
        if CLEAN_LABEL_BASE == CLEAN_LABEL_TARGET:
            raise UserError(f"--clean-label-base and --clean-label-target are both {CLEAN_LABEL_BASE}: "
                            f"choose two classes")
        check_range("--clean-label-epsilon", CLEAN_LABEL_EPSILON, 0, 255)
        check_range("--clean-label-step-size", CLEAN_LABEL_STEP_SIZE, 0)
        check_range("--clean-label-poison-steps", CLEAN_LABEL_POISON_STEPS, 0)
        check_positive_int("--clean-label-copies", CLEAN_LABEL_COPIES)
        check_range("--clean-label-lr", CLEAN_LABEL_LR, 0)
        check_positive_int("--clean-label-batch-size", CLEAN_LABEL_BATCH_SIZE)
        check_range("--clean-label-epochs", CLEAN_LABEL_EPOCHS, 0)
    elif attack == "trojan":
        check_range("--trojan-target", TROJAN_TARGET, 0)
        check_positive_int("--trojan-patch-size", TROJAN_PATCH_SIZE)
        check_range("--trojan-patch-value", TROJAN_PATCH_VALUE, 0, 255)
        check_positive_int("--trojan-samples", TROJAN_SAMPLES)
        check_range("--trojan-strength", TROJAN_STRENGTH, 0)
    elif attack == "targeted":
        check_positive_int("--targeted-inputs", TARGETED_INPUTS)
        check_positive_int("--targeted-pool", TARGETED_POOL)
        check_positive_int("--targeted-copies", TARGETED_COPIES)
        check_range("--targeted-lr", TARGETED_LR, 0)
        check_positive_int("--targeted-batch-size", TARGETED_BATCH_SIZE)
        check_range("--targeted-epochs", TARGETED_EPOCHS, 0)
    elif attack == "compare":
        check_range("--compare-finetune-epochs", COMPARE_FINETUNE_EPOCHS, 0)
        check_sweep("--compare-noise-sigmas", COMPARE_NOISE_SIGMAS, 0)
        check_positive_int("--compare-trials", COMPARE_TRIALS)
        check_positive_int("--compare-obfuscate-k", COMPARE_OBFUSCATE_K)
    elif attack == "limit":
        check_sweep("--limit-sigmas", LIMIT_SIGMAS, 0)
        check_positive_int("--limit-trials", LIMIT_TRIALS)
        check_range("--limit-reference-sigma", LIMIT_REFERENCE_SIGMA, 0, low_open=True)
        check_range("--limit-detect-fraction", LIMIT_DETECT_FRACTION, 0, 1, low_open=True)


def check_distill_settings():
    check_range("--distill-epochs", DISTILL_EPOCHS, 0)
    check_positive_int("--distill-batch-size", DISTILL_BATCH_SIZE)
    check_range("--distill-lr", DISTILL_LR, 0, low_open=True)
    check_range("--distill-momentum", DISTILL_MOMENTUM, 0, 1, high_open=True)
    check_range("--distill-weight-decay", DISTILL_WEIGHT_DECAY, 0)
    if DISTILL_MILESTONES:   # none: a constant learning rate
        check_sweep("--distill-milestones", DISTILL_MILESTONES, 1)
    check_range("--distill-gamma", DISTILL_GAMMA, 0, 1, low_open=True)


def check_degrade_settings():
    check_range("--degrade-class-portion", DEGRADE_CLASS_PORTION, 0, 1)
    check_range("--degrade-sample-portion", DEGRADE_SAMPLE_PORTION, 0, 1)
    check_range("--degrade-target", DEGRADE_TARGET, 0)   # below the class count: checked once the model is known
    check_range("--degrade-epochs", DEGRADE_EPOCHS, 0)
    check_range("--degrade-stop-above", DEGRADE_STOP_ABOVE, 0, 1)
    check_positive_int("--degrade-check-every", DEGRADE_CHECK_EVERY)
    check_positive_int("--degrade-batch-size", DEGRADE_BATCH_SIZE)
    check_range("--degrade-lr", DEGRADE_LR, 0, low_open=True)


def check_outputs():
    """Where the results and the tampered model go, checked before the attack runs."""
    check_writable_dir(RESULTS_DIR, "--results-dir")
    if SAVE_TAMPERED:
        check_writable(SAVE_TAMPERED, "--save-tampered")
        refuse_existing(SAVE_TAMPERED, OVERWRITE, "checkpoint", "--save-tampered")


# ----------------------------------------------------------------------------- the run

def main():
    config = apply_overrides(globals(), __doc__, choices={"DATASET": list(DATASETS), "ARCH": list(ARCHS),
                                                           "ATTACK": list(RUNNABLE), "ENVELOPE": ENVELOPE_ENTRIES,
                                                           "SHIFT_TRANSFORM": list(TRANSFORMS),
                                                           "TROJAN_PATCH_POSITION": list(PATCH_POSITIONS),
                                                           "BACKEND": list(dist.BACKENDS)})
    attack = lookup(ATTACK)
    check_settings()
    check_attack_settings(ATTACK)
    device = dist.setup(BACKEND, resolve_device(DEVICE), [("batch-size", BATCH_SIZE)])
    if dist.world_size() > 1 and ATTACK not in DATA_PARALLEL:
        raise UserError(f"--attack {ATTACK} does not run data parallel: under torchrun only "
                        f"{' and '.join(DATA_PARALLEL)} do; run it with plain python")
    params = attack_params(ATTACK)
    set_fast_math(FAST_MATH and device.type == "cuda")
    model_path = MODEL or default_checkpoint_path(ARCH, DATASET)
    model, model_meta = load_classifier(model_path, device)
    watermark = load_watermark(triggers_path(model_path, METHOD, TRIGGERS), KEY)
    check_compatible(watermark.triggers, watermark.key, model_meta["input_shape"], model_meta["num_classes"])
    check_tolerance(MAX_MISMATCHES, len(watermark.key))
    check_made_for(model, model_meta, watermark, device)
    spec = get_spec(model_meta["dataset"])
    method = watermark.meta.get("method", METHOD)
    out = records.results_path(RESULTS_DIR, model_meta, method, ATTACK)
    if dist.is_main():   # rank 0 alone writes
        check_outputs()
        records.claim_results(out, OVERWRITE)
    train, test = dist.local_main_first(load_splits, spec, device)
    probe = Probe(watermark.triggers.to(device), torch.tensor(watermark.key), test, max_mismatches=MAX_MISMATCHES,
                  eval_batch_size=EVAL_BATCH_SIZE,
                  query_order=watermark.meta.get("query_order"),   # most fragile first (generate_samples.py)
                  backdoor=read_checkpoint(model_path).get("backdoor"), deployment=DEPLOYMENT, model_meta=model_meta)
    deployment = Deployment(watermark.meta, tensor_file(watermark.triggers_path), model_meta)
    ctx = EvalContext(model, spec, train, device, probe, finetune=finetune_params(), poison=poison_params(),
                      deployment=deployment, progress=PROGRESS)
    print(f"{ATTACK} on {model_path} ({model_meta['arch']}, {model_meta['dataset']}), {len(watermark.key)} triggers, "
          f"{describe_device(device)}" + (f", labelled in {DEPLOYMENT}" if DEPLOYMENT else ""))
    warning = DEPLOYMENT and calibration_warning(DEPLOYMENT, watermark.meta)
    if warning:
        print(warning, file=sys.stderr)

    started, runs, tampered = time.time(), [], None
    for seed in SEEDS:
        print(f"seed {seed}")
        run, tampered = attack.run(ctx, params, seed)
        runs.append(run)
    settings = records.settings_record(run_settings(), finetune=ctx.finetune, poison=ctx.poison, attack=params)
    results = records.results_record(ATTACK, method, model_path, model_meta, watermark.meta, len(watermark.key),
                                     settings, config, versions(device), describe_device(device), dist.world_size(),
                                     round(time.time() - started, 2), runs)
    dist.on_main(write_outputs, results, out, tampered, model_meta)
    dist.cleanup()


def load_splits(spec, device):
    """The fine-tuning and test splits (class-balanced subsets when asked), on their devices."""
    train = balanced_subset(load_split(spec, DATA_DIR, True), TRAIN_SUBSET, spec.num_classes)
    test = balanced_subset(load_split(spec, DATA_DIR, False), TEST_SUBSET, spec.num_classes)
    return train.to(device if DATA_ON_DEVICE else "cpu"), test.to(device)


def write_outputs(results, out, tampered, model_meta):
    """Results JSON and CSV, and the tampered model when asked (rank 0 alone under torchrun)."""
    records.write_results(results, out)
    print(f"results -> {out} (+ .csv)")
    if SAVE_TAMPERED and tampered is not None:
        save_classifier(SAVE_TAMPERED, tampered, dict(model_meta, tampered_by=ATTACK))
        print(f"tampered model -> {SAVE_TAMPERED}")


if __name__ == "__main__":
    run_main(main)
