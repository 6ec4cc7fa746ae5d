"""Make fragile triggers for a trained classifier, without changing a single weight of it.

    python generate_samples.py                        # the paper's generator and settings (GPU: seconds)
    python generate_samples.py --dataset fashion-mnist --arch resnet8 --device cpu --recipe fast

A generator is trained with the secret-key loss so that its images carry the key's labels while
sitting near decision boundaries. The triggers are exported as 8-bit images (tensor file and
PNGs) and accepted only if the PNGs, read back, are all labelled as the key. The constants marked
(recipe) are the paper's code's; `--recipe fast` takes a narrow generator that converges in a CPU minute.
"""
# ----------------------------------------------------------------------------- config
DATASET = "cifar10"
ARCH = "resnet18"
MODEL = ""                 # checkpoint; default checkpoints/<arch>_<dataset>.pt, as train.py writes it
METHOD = "paper"           # paper | random | natural | ftg | ibsf | ssf | aid | margin (methods/__init__.py)
NUM_TRIGGERS = 100
KEY_SEED = -1              # -1: key from the OS's secure random source; >=0: reproducible key
OUT = ""                   # trigger folder; default <checkpoint stem>_triggers_<method>
KEY_OUT = ""               # key file; default <checkpoint stem>_key_<method>.json
OVERWRITE = False          # replace an existing trigger set and key (only once the new pair is complete)
DATA_DIR = "data"          # test images for the accuracy check (and natural-image methods)
DEVICE = "auto"
ENVELOPE = ["exact"]       # benign deployment changes accepted: exact fp16 bf16 batch threads channels_last cuda
                           # (margin and ftg calibrate delta on their largest jitter; the benign matrix covers each)
DEPLOY = []                # margin: named deployments to calibrate in, each on its own jitter (docs/deployment.md):
                           # torch-fp32 torch-fp16 torch-bf16 onnxruntime openvino (GPU: torch-cuda-*, onnxruntime-cuda)
# paper: generator and loss (arXiv 2208.07585)
LATENT_DIM = 512
LATENT_SEED = 0            # the fixed latent batch is drawn from this seed (and stored)
RECIPE = "paper"           # paper: the two (recipe) constants as they are | fast: 64 wide, lr 3e-3 (CPU-friendly)
GEN_CHANNELS = 512         # (recipe) generator width at its first stage, halving per stage
LAMBDA = 150.0             # weight of the softmax-variance term
LR = 1e-4                  # (recipe) Adam
BETA1 = 0.5
BETA2 = 0.999
MAX_STEPS = 2000           # step cap; generation stops as soon as every 8-bit trigger carries its key label
# controls (random, natural), ftg, ibsf, ssf, aid and margin (fragile/watermark/methods/; docs/sensitivity.md)
CONTROL_SEED = 0           # which noise / test images the controls and the optimising methods start from
# ftg: FTG, J. Inf. Intell. 2024 (fragile/watermark/methods/ftg.py); the values of its code for CIFAR-10
FTG_STEPS = 10000          # signed-gradient steps minimising the softmax variance (straight-through 8-bit rounding)
FTG_STEP_SIZE = 1e-5       # per step, in [0, 1] pixel units (its MNIST: 1e-4)
FTG_START = "train"        # train: the first training images, key = the model's labels (FTG) | key-class: random
                           # correctly classified test images of the drawn key's classes, the key kept (ours)
FTG_SELECT = "last"        # last: the last iterate above the label floor (FTG) | lowest: the lowest-variance one
# ibsf: IBSF, ICML 2024 (fragile/watermark/methods/ibsf.py); the values of its code
IBSF_K = 2                 # top-k softmax classes whose Shannon entropy is maximised (2..classes)
IBSF_STEPS = 5000          # SGD iterations
IBSF_LR = 1.0              # SGD learning rate, pixels in [0, 1]
IBSF_EPS = 1.0             # L2 radius around the natural start, pixels in [0, 1]
# ssf: Sensitive-Sample Fingerprinting, CVPR 2019 (fragile/watermark/methods/ssf.py); the values of its code
SSF_STEPS = 1000           # Adam iterations maximising the squared gradient norm of the top logit
SSF_LR = 0.1               # Adam learning rate, in grey levels (0..255 pixels, as its code)
SSF_EPS = 1.0              # L2 radius per pixel in grey levels: eps x sqrt(C x H x W) around the natural start
SSF_POOL = 10              # candidates per trigger; Maximum Active Neuron Cover picks one of them
# aid: AID edge points, DAC 2021 (fragile/watermark/methods/aid.py); the values of its code
AID_STEPS = 15000          # gradient-descent iterations from uniform noise
AID_LR = 1e-4              # their step size, pixels in [0, 1]; halved after 1/3, quartered after 2/3 of them
# margin (fragile/watermark/methods/margin.py)
MARGIN_START = "natural"   # natural | noise | paper
MARGIN_SAFETY = 10.0       # delta = this x the largest benign logit jitter measured
MARGIN_BAND = 4.0          # every other class is driven to within band x delta of the key class
MARGIN_STEPS = 200         # straight-through 8-bit Adam steps
MARGIN_LR = 2.0 / 255      # their initial step, in [0, 1] pixel units (cosine decay)
MARGIN_POOL = 2            # candidates optimised per key entry; the most fragile one is kept
MARGIN_SELECT_DRAWS = 32   # random weight-noise copies of the model that measure fragility
MARGIN_NOISE_SIGMA = 1e-4  # their standard deviation; every method: ranks triggers for the query order
MARGIN_GRID_ROUNDS = 200   # rounds of single-pixel +-1 moves on the 8-bit grid
MARGIN_CANDIDATES = 32     # moves per trigger evaluated exactly in each round
# margin: surrogates (fragile/watermark/methods/surrogates.py)
MARGIN_SURROGATES = 2      # owner-side fine-tuned copies every trigger must be off its key on (0: none)
MARGIN_SURROGATE_STEPS = 80        # their SGD steps (one epoch of 20k images at batch 256)
MARGIN_SURROGATE_SUBSET = 20000    # class-balanced training images they use (0: all), drawn apart from eval's
MARGIN_SURROGATE_LR = 1e-3         # their recipe, the paper's fine-tuning...
MARGIN_SURROGATE_MOMENTUM = 0.9
MARGIN_SURROGATE_WEIGHT_DECAY = 1e-3
MARGIN_SURROGATE_BATCH_SIZE = 256
MARGIN_SURROGATE_MIX_BN = True     # every second surrogate fine-tunes with batch-norm statistics frozen
MARGIN_SURROGATE_GAP = 0.3         # on each surrogate another class beats the key by this many logits
PROGRESS = True
# -----------------------------------------------------------------------------

import os

import torch

from fragile.core import distributed as dist
from fragile.core.cli import UserError, apply_overrides, apply_preset, check_range, run_main
from fragile.core.data import DATASETS, get_spec, load_split
from fragile.core.devices import describe_device, resolve_device, set_fast_math
from fragile.core.io import check_writable, default_checkpoint_path, load_classifier, model_sha256, refuse_existing
from fragile.core.training import accuracy
from fragile.deploy.arithmetic import arithmetic
from fragile.deploy.targets import parse_names
from fragile.watermark import methods
from fragile.watermark.jitter import ENVELOPE_ENTRIES, resolve_envelope
from fragile.watermark.keys import key_payload, key_sha256, make_key
from fragile.watermark.methods.aid import AIDParams
from fragile.watermark.methods.controls import ControlParams
from fragile.watermark.methods.fragility import FragilityParams, fragility_order
from fragile.watermark.methods.ftg import SELECTIONS as FTG_SELECTIONS, STARTS as FTG_STARTS, FTGParams
from fragile.watermark.methods.ibsf import IBSFParams
from fragile.watermark.methods.margin import MarginParams
from fragile.watermark.methods.paper import RECIPES, PaperParams
from fragile.watermark.methods.ssf import SSFParams
from fragile.watermark.methods.surrogates import SurrogateParams
from fragile.watermark.paths import STAGED, default_paths, finish_interrupted_swap, save_watermark
from fragile.watermark.trigger_io import MAX_TRIGGERS, load_triggers, trigger_meta
from fragile.watermark.queries import labels_and_margins, margin_summary
from models import ARCHS


def fingerprint(model, test):
    return model_sha256(model), accuracy(model, test)


def check_settings():
    """The numbers every method reads, checked before the model or data are loaded."""
    check_range("--num-triggers", NUM_TRIGGERS, 1, MAX_TRIGGERS)
    check_range("--max-steps", MAX_STEPS, 1)
    check_range("--lr", LR, 0, low_open=True)
    check_range("--lambda", LAMBDA, 0)
    check_range("--latent-dim", LATENT_DIM, 1)
    check_range("--gen-channels", GEN_CHANNELS, 1)
    check_range("--ftg-steps", FTG_STEPS, 1)
    check_range("--ftg-step-size", FTG_STEP_SIZE, 0, low_open=True)
    check_range("--ibsf-k", IBSF_K, 2)
    check_range("--ibsf-steps", IBSF_STEPS, 0)
    check_range("--ibsf-lr", IBSF_LR, 0, low_open=True)
    check_range("--ibsf-eps", IBSF_EPS, 0, low_open=True)
    check_range("--ssf-steps", SSF_STEPS, 0)
    check_range("--ssf-lr", SSF_LR, 0, low_open=True)
    check_range("--ssf-eps", SSF_EPS, 0, low_open=True)
    check_range("--ssf-pool", SSF_POOL, 1)
    check_range("--aid-steps", AID_STEPS, 0)
    check_range("--aid-lr", AID_LR, 0, low_open=True)
    check_range("--margin-safety", MARGIN_SAFETY, 0, low_open=True)
    check_range("--margin-band", MARGIN_BAND, 1)
    check_range("--margin-steps", MARGIN_STEPS, 0)
    check_range("--margin-pool", MARGIN_POOL, 1)
    check_range("--margin-select-draws", MARGIN_SELECT_DRAWS, 1)
    check_range("--margin-noise-sigma", MARGIN_NOISE_SIGMA, 0, low_open=True)
    check_range("--margin-surrogates", MARGIN_SURROGATES, 0)


# ----------------------------------------------------------------------------- parameters, from the header
# Each method's parameter object, built from the constants above by name (the library never reads them).

def paper_params():
    return PaperParams(latent_dim=LATENT_DIM, latent_seed=LATENT_SEED, gen_channels=GEN_CHANNELS, lam=LAMBDA, lr=LR,
                       beta1=BETA1, beta2=BETA2, max_steps=MAX_STEPS)


def control_params():
    return ControlParams(control_seed=CONTROL_SEED)


def ftg_params():
    return FTGParams(steps=FTG_STEPS, step_size=FTG_STEP_SIZE, start=FTG_START, select=FTG_SELECT,
                     control_seed=CONTROL_SEED, envelope=ENVELOPE)


def ibsf_params():
    return IBSFParams(k=IBSF_K, steps=IBSF_STEPS, lr=IBSF_LR, eps=IBSF_EPS, control_seed=CONTROL_SEED,
                      envelope=ENVELOPE)


def ssf_params():
    return SSFParams(steps=SSF_STEPS, lr=SSF_LR, eps=SSF_EPS, pool=SSF_POOL, control_seed=CONTROL_SEED,
                     envelope=ENVELOPE)


def aid_params():
    return AIDParams(steps=AID_STEPS, lr=AID_LR, control_seed=CONTROL_SEED, envelope=ENVELOPE)


def fragility_params():
    """The weight noise that ranks every method's triggers for the query order (and margin's candidates)."""
    return FragilityParams(noise_sigma=MARGIN_NOISE_SIGMA, select_draws=MARGIN_SELECT_DRAWS)


def surrogate_params():
    return SurrogateParams(count=MARGIN_SURROGATES, steps=MARGIN_SURROGATE_STEPS, subset=MARGIN_SURROGATE_SUBSET,
                           lr=MARGIN_SURROGATE_LR, momentum=MARGIN_SURROGATE_MOMENTUM,
                           weight_decay=MARGIN_SURROGATE_WEIGHT_DECAY, batch_size=MARGIN_SURROGATE_BATCH_SIZE,
                           mix_bn=MARGIN_SURROGATE_MIX_BN, gap=MARGIN_SURROGATE_GAP)


def margin_params():
    return MarginParams(start=MARGIN_START, safety=MARGIN_SAFETY, band=MARGIN_BAND, steps=MARGIN_STEPS, lr=MARGIN_LR,
                        pool=MARGIN_POOL, grid_rounds=MARGIN_GRID_ROUNDS, candidates=MARGIN_CANDIDATES,
                        control_seed=CONTROL_SEED, envelope=ENVELOPE, surrogates=surrogate_params(),
                        fragility=fragility_params(), paper=paper_params())


def method_params(method):
    """``method``'s parameters (a ``methods.METHODS[method].params`` object) from the header; natural has none."""
    return {"paper": paper_params, "random": control_params, "natural": lambda: None, "ftg": ftg_params,
            "ibsf": ibsf_params, "ssf": ssf_params,
            "aid": aid_params, "margin": margin_params}[method]()


def output_paths(model_path):
    """The trigger folder and key file, checked before any work: a swap an earlier run left unfinished is put
    right, an existing pair is replaced only with --overwrite, and both folders must be writable."""
    out, key_out = default_paths(model_path, METHOD)
    out, key_out = OUT or out, KEY_OUT or key_out
    fixed = finish_interrupted_swap(out, key_out)
    if fixed:
        print(f"note: an interrupted run left its swap unfinished at {out}: {fixed} "
              f"({'the new set is in place' if fixed == 'finished' else 'the previous set is back'})")
    refuse_existing(out, OVERWRITE, "trigger set")
    refuse_existing(key_out, OVERWRITE, "key file", "--key-out")
    check_writable(out + STAGED, "--out")   # the new set is staged beside ``out`` (no empty ``out`` is left behind)
    check_writable(key_out, "--key-out")
    return out, key_out


def main():
    config = apply_overrides(globals(), __doc__, choices={"DATASET": list(DATASETS), "ARCH": list(ARCHS),
                                                           "METHOD": list(methods.METHODS), "RECIPE": list(RECIPES),
                                                           "ENVELOPE": ENVELOPE_ENTRIES, "FTG_START": list(FTG_STARTS),
                                                           "FTG_SELECT": list(FTG_SELECTIONS)})
    recipe = RECIPES[RECIPE]
    if recipe is not None:   # the recipe's width and learning rate, except where a flag was typed
        config = apply_preset(globals(), config, {"GEN_CHANNELS": recipe.gen_channels, "LR": recipe.lr})
    check_settings()
    resolve_envelope(ENVELOPE)  # a bad entry fails now, not after the model and data are loaded
    deploy = parse_names(DEPLOY)
    if deploy and METHOD != "margin":
        raise UserError(f"--deploy calibrates margin triggers in each deployment: add --method margin (method "
                        f"{METHOD} keeps its own label floor in torch fp32)")
    config["DEPLOY"] = deploy
    device = dist.setup("auto", resolve_device(DEVICE))
    dist.on_main(generate, config, device)   # under torchrun: rank 0 alone, the others wait
    dist.cleanup()


def generate(config, device):
    set_fast_math(False)  # triggers sit near boundaries: optimise in exact fp32
    model_path = MODEL or default_checkpoint_path(ARCH, DATASET)
    model, model_meta = load_classifier(model_path, device)
    spec = get_spec(model_meta["dataset"])
    out, key_out = output_paths(model_path)
    params = method_params(METHOD)
    test = load_split(spec, DATA_DIR, train=False).to(device)
    train = load_split(spec, DATA_DIR, train=True) if methods.needs_training_data(METHOD, params) else None

    sha_before, acc_before = fingerprint(model, test)
    print(f"model {model_path}: {model_meta['arch']} on {model_meta['dataset']}, {describe_device(device)}")
    print(f"before: weights sha256 {sha_before}  test accuracy {acc_before:.4f}")

    key, source = make_key(NUM_TRIGGERS, spec.num_classes, None if KEY_SEED < 0 else KEY_SEED)
    deployed = tuple(arithmetic(name, model, model_meta) for name in config["DEPLOY"])
    job = methods.TriggerJob(model, spec, key, device, test, train, progress=PROGRESS, deployments=deployed)
    triggers, info = methods.generate(METHOD, job, params)

    fragility = fragility_params()
    order, flip_rate = fragility_order(model, triggers.to(device), key, fragility)
    meta = trigger_meta(model_meta, key_out, key_sha256(key), METHOD, config, info.pop("meta", {}))
    meta.update(query_order=order, estimated_flip_rate_mean=flip_rate.mean().item(), envelope=list(ENVELOPE))
    margins = {}

    def accept(staged):
        """Accept only what will be deployed: the PNGs, read back from disk, must all carry their key labels."""
        from_png, _ = load_triggers(staged)
        labels, margins["all"] = labels_and_margins(model, from_png.to(device))
        wrong = (labels != torch.tensor(key)).sum().item()
        if not torch.equal(from_png, triggers.cpu()) or wrong and not deployed:
            raise UserError(f"{wrong} of {len(key)} triggers lost their key label after the PNG round trip; not "
                            f"accepted (nothing was replaced)")
        for arith in deployed:   # calibrated in named deployments: each of them must label every PNG as the key
            wrong = (arith.predict(from_png).argmax(1) != torch.tensor(key)).sum().item()
            if wrong:
                raise UserError(f"{wrong} of {len(key)} triggers are off their key labels in {arith.name} after the "
                                f"PNG round trip; not accepted (nothing was replaced)")
    save_watermark(out, key_out, triggers, meta, key_payload(key, spec.num_classes, source), extra=info, check=accept)

    sha_after, acc_after = fingerprint(model, test)
    print(f"after:  weights sha256 {sha_after}  test accuracy {acc_after:.4f}")
    if (sha_after, acc_after) != (sha_before, acc_before):
        raise UserError("the model changed during trigger generation (this is a bug)")
    s = margin_summary(margins["all"])
    where = f" in {', '.join(config['DEPLOY'])}" if deployed else ""
    print(f"{len(key)} triggers ({METHOD}), all on their key labels{where} after 8-bit PNG export")
    print(f"top-1 minus runner-up logit margin{' in torch fp32' if deployed else ''}: min {s['min']:.3g}  "
          f"median {s['median']:.3g}  "
          f"mean {s['mean']:.3g}  max {s['max']:.3g}")
    print(f"estimated flip rate under weight noise sigma {fragility.noise_sigma:g}: mean "
          f"{flip_rate.mean().item():.2f}, most fragile trigger {flip_rate.max().item():.2f} (queried first)")
    uncovered = [p for p in ("fp16", "bf16") if p not in ENVELOPE]
    if deployed:
        print(f"calibrated for {', '.join(config['DEPLOY'])}: verify through "
              f"{'it' if len(deployed) == 1 else 'one of them'} (verify.py --deployment NAME); another deployment "
              f"gets a warning beside its verdict")
    elif uncovered:  # the one line the owner must not miss: half-precision serving is outside this envelope
        print(f"note: envelope {' '.join(ENVELOPE) or 'exact'} leaves out {' and '.join(uncovered)} inference: "
              f"{'these triggers' if METHOD in ('margin', 'ftg') else 'near-boundary triggers'} may raise false "
              f"alarms there (--envelope exact fp16 bf16 calibrates for it; eval.py --attack benign --envelope "
              f"exact fp16 bf16 measures it)")
    print(f"triggers -> {out}  key -> {key_out}")


if __name__ == "__main__":
    run_main(main, interrupted="interrupted; the trigger set and key already on disk (if any) are unchanged: a new "
                               "pair replaces them only once it is complete")
