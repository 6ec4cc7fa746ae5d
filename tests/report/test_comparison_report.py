"""The method comparison rendered: table, CSV and figure, and the refusals that keep it honest."""
import json
import os

import pytest

from fragile.core.cli import UserError
from fragile.report.comparison import render_comparison


def test_render_comparison_writes_table_csv_and_figure(compare_results, tmp_path):
    path, results = compare_results
    other = json.loads(json.dumps(results))
    other["method"] = "margin"
    paths = render_comparison([(path, results), ("margin.json", other)], str(tmp_path))
    table = open(paths["md"]).read()
    assert "| paper | fine-tune 1 epoch |" in table and "| margin |" in table
    noise_row = next(line for line in table.splitlines() if line.startswith("| paper | noise sigma 0.0001 |"))
    correlation = next(r["rival_correlation"] for r in results["runs"][0]["records"] if r["attack"] == "noise"
                       and r["sigma"] == 1e-4)
    assert noise_row.rstrip(" |").endswith(f"{correlation:.2f}") and "rival correlation" in table
    assert os.path.getsize(paths["png"]) > 0 and "flipped_fraction" in open(paths["csv"]).read()


def test_render_comparison_refuses_mixed_models_and_other_attacks(compare_results, tmp_path):
    path, results = compare_results
    other = dict(results, method="margin", weights_sha256="0" * 64)
    with pytest.raises(UserError, match="different models"):
        render_comparison([(path, results), ("x.json", other)], str(tmp_path))
    with pytest.raises(UserError, match="not a comparison"):
        render_comparison([(path, dict(results, attack="noise"))], str(tmp_path))
    with pytest.raises(UserError, match="no comparison results"):
        render_comparison([], str(tmp_path))
