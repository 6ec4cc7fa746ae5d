"""Shared logic of the fragile-watermarking suite; the top-level scripts stay thin.

Stages, each importing only the ones before it (tests/test_architecture.py checks this from the source):

    core         cli, devices, io, data, training, weights, distributed, results
    watermark    keys, trigger I/O, paths, verification, jitter, trigger methods
    attacks      tampering a copy of the model while tracking the watermark
    experiments  the benign-change matrix and the method comparison
    report       figures and tables from results files

``models`` (the model zoo) sits below all of them. docs/architecture.md has the tree and the data flow.
"""
