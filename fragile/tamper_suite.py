"""The tamper suite beyond fine-tuning (fine-pruning, obfuscation, noise, single weights, bit flips,
pruning, quantization, robust-watermark restoration)."""
TAMPER_ATTACKS = {}
