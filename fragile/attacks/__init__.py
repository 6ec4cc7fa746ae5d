"""Tampering with a copy of the watermarked model, from fine-tuning to a single bit, while tracking how many
trigger labels still match the key. Every attack is ``attack(ctx, params, seed) -> (run, tampered model)``."""
