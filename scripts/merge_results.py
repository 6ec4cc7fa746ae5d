"""One results file from several of the same experiment run one seed at a time (scripts/reproduce.sh runs each
seed apart, so that an interrupted reproduction resumes per seed, then merges them with this).

    .venv/bin/python scripts/merge_results.py OUT.json IN.json [IN.json ...]

The parts must agree on everything but their seeds (fragile.tamper.records.merge_results says what differs);
the merged file holds every run, sorted by seed, and its wall time is the sum.
"""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from fragile.core.cli import UserError, run_main  # noqa: E402
from fragile.tamper.records import merge_results  # noqa: E402


def main(argv):
    if len(argv) < 2:
        raise UserError("usage: scripts/merge_results.py OUT.json IN.json [IN.json ...]")
    out, parts = argv[0], argv[1:]
    merge_results(parts, out)
    print(f"merged {len(parts)} files -> {out}")


if __name__ == "__main__":
    run_main(lambda: main(sys.argv[1:]))
