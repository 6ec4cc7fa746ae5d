"""Every ``eval.py --attack`` name, mapped to its function ``attack(ctx, seed) -> (run, tampered model or None)``."""
from .attacks import ATTACKS as FINETUNE_ATTACKS
from .benign import BENIGN_ATTACKS
from .tamper_suite import TAMPER_ATTACKS

ATTACKS = {**FINETUNE_ATTACKS, **TAMPER_ATTACKS, **BENIGN_ATTACKS}
