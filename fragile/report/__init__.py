"""Figures and tables from results files (plot.py), and the reproduction's tables."""
