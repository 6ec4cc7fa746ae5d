"""Where triggers come from. Every method returns uint8 triggers that carry the key's labels.

    paper    the ICIP-2022 generator, unchanged (paper.py)
    random   control: uniform-noise images; the key becomes the model's own labels for them (controls.py)
    natural  control: the least-confident correctly classified test images of each key class (controls.py)
    ftg      FTG (J. Inf. Intell. 2024): signed-gradient pixel steps minimising the softmax variance, from the first
             training images; the key becomes the model's own labels for them (ftg.py)
    ibsf     IBSF (ICML 2024): SGD maximising the entropy of the top-k softmax classes in an L2 ball around a
             natural image of the key class (ibsf.py)
    ssf      SSF (CVPR 2019): Adam maximising the squared gradient norm of the top logit w.r.t. the last layer's
             weights in an L2 ball around natural images, then Maximum Active Neuron Cover selection (ssf.py)
    aid      AID edge points (DAC 2021): gradient descent from noise to where all logits meet, neurons kept
             active; the key becomes the model's own labels for them (aid.py)
    margin   ours: every trigger's margin over the other classes driven into [delta, band x delta], delta
             calibrated from the measured benign jitter, while the owner's own fine-tuned copies of the
             model label it off the key (margin.py, surrogates.py)

All of them optimise (if at all) the 8-bit image itself -- straight-through rounding while the pixels are
continuous, then moves on the 0..255 grid -- so the exported PNG is what was optimised. A method is
``generate(job, params) -> (uint8 triggers on the CPU, info)``; ``info["meta"]`` (plain values) goes
into the trigger metadata, every other entry (tensors) into triggers.pt.
"""
from collections import namedtuple

from ...core.cli import UserError
from . import aid, controls, ftg, ibsf, margin, paper, ssf
from .common import TriggerJob

Method = namedtuple("Method", "generate params")   # params: the method's parameter dataclass, or None

METHODS = {"paper": Method(paper.generate, paper.PaperParams),
           "random": Method(controls.generate_random, controls.ControlParams),
           "natural": Method(controls.generate_natural, None),
           "ftg": Method(ftg.generate, ftg.FTGParams),
           "ibsf": Method(ibsf.generate, ibsf.IBSFParams),
           "ssf": Method(ssf.generate, ssf.SSFParams),
           "aid": Method(aid.generate, aid.AIDParams),
           "margin": Method(margin.generate, margin.MarginParams)}


def generate(method, job, params):
    """(uint8 triggers on the CPU, info dict) of ``method`` for ``job``, with that method's ``params``."""
    if method not in METHODS:
        raise UserError(f"unknown trigger method {method!r}: choose one of {', '.join(METHODS)}")
    return METHODS[method].generate(job, params)


def needs_training_data(method, params):
    """True when ``method`` fine-tunes surrogates or starts from training images, which need the training split."""
    return (method == "margin" and params.surrogates.count > 0) or (method == "ftg" and params.start == "train")


__all__ = ["METHODS", "TriggerJob", "generate", "needs_training_data"]
