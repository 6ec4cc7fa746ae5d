"""The tables of REPRODUCTION.md and docs/deployment.md, from what scripts/reproduce.sh, scripts/recipe_table.sh and
scripts/compare_deployments.sh wrote.

    .venv/bin/python scripts/reproduction_tables.py summary results/reproduction-fashion-mnist   # per epoch, seeds
    .venv/bin/python scripts/reproduction_tables.py recipe-table results/recipe-table           # recipe x generator
    .venv/bin/python scripts/reproduction_tables.py deployment results/deployments              # price and limit

Each command prints a Markdown table and writes it, with its numbers as JSON, beside the inputs
(FOLDER/summary.md and summary.json, recipe-table.md and .json, or deployment.md and .json); fragile.report.reproduction
and fragile.report.deployment compute them.
"""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from fragile.core.cli import UserError, run_main  # noqa: E402
from fragile.core.io import atomic_write_json, atomic_write_text  # noqa: E402
from fragile.report.deployment import deployment_table  # noqa: E402
from fragile.report.reproduction import TABLES as REPRODUCTION_TABLES  # noqa: E402

TABLES = {**REPRODUCTION_TABLES, "deployment": deployment_table}


def main(argv):
    if len(argv) != 2 or argv[0] not in TABLES:
        raise UserError(f"usage: scripts/reproduction_tables.py {{{'|'.join(TABLES)}}} FOLDER")
    command, folder = argv
    if not os.path.isdir(folder):
        raise UserError(f"no such folder: {folder}")
    markdown, payload = TABLES[command](folder)
    atomic_write_text(markdown + "\n", os.path.join(folder, f"{command}.md"))
    atomic_write_json(payload, os.path.join(folder, f"{command}.json"))
    print(markdown)


if __name__ == "__main__":
    run_main(lambda: main(sys.argv[1:]))
