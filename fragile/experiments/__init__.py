"""Experiments built from the attacks: the benign-change matrix (false alarms) and the method comparison."""
