"""Where triggers come from. Every method returns uint8 triggers that carry the key's labels.

``paper`` is the ICIP-2022 generator. The controls and the sensitive methods (issue 6) register
here under their names, so every script sees the same list.
"""
from .triggers import generate_paper


def _paper(model, spec, key, config, device, test):
    cfg = {"latent_seed": config["LATENT_SEED"], "latent_dim": config["LATENT_DIM"],
           "gen_channels": config["GEN_CHANNELS"], "lr": config["LR"], "beta1": config["BETA1"],
           "beta2": config["BETA2"], "max_steps": config["MAX_STEPS"], "lam": config["LAMBDA"]}
    return generate_paper(model, spec, key, cfg, device)


METHODS = {"paper": _paper}


def generate(method, model, spec, key, config, device, test):
    """(uint8 triggers on the CPU, info dict) for ``method``."""
    return METHODS[method](model, spec, key, config, device, test)
