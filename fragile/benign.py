"""The benign-change matrix: the untouched model must verify under every harmless change."""
BENIGN_ATTACKS = {}
