"""bench.py on a CPU: it runs, reports a ratio, and refuses impossible sizes in one line."""
import json

import pytest

from conftest import run_script

pytestmark = pytest.mark.integration


BENCH_TINY = ["--device", "cpu", "--arch", "resnet8", "--num-images", 64, "--batch-size", 16, "--warmup-steps", 1,
              "--measure-steps", 2, "--num-triggers", 10, "--gen-steps", 2, "--verify-repeats", 2, "--threads", 1]


def test_bench_runs_on_cpu_and_reports_a_ratio(tmp_path):
    out = tmp_path / "bench.json"
    proc = run_script("bench.py", *BENCH_TINY, "--out", out)
    result = json.loads(out.read_text())
    assert result["device_type"] == "cpu" and result["device"].startswith("cpu")
    for loop in ("ours", "reference"):
        assert result[loop]["images_per_s"] > 0 and result[loop]["images"] == 2 * 16
    assert result["ratio"] > 0
    assert result["ratio"] == pytest.approx(result["ours"]["images_per_s"] / result["reference"]["images_per_s"])
    generation = result["trigger_generation"]
    assert generation["num_triggers"] == 10 and 1 <= generation["steps"] <= 2
    assert generation["seconds"] > 0 and generation["ms_per_step"] > 0
    verification = result["verification"]
    assert verification["all_at_once_ms"] > 0 and verification["one_per_query_ms"] > 0
    assert "ratio ours / reference" in proc.stdout and result["device"] in proc.stdout


def test_bench_rejects_a_batch_larger_than_the_data(tmp_path):
    proc = run_script("bench.py", "--device", "cpu", "--num-images", 8, "--batch-size", 16,
                      "--out", tmp_path / "b.json", check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["error: --batch-size 16 is larger than --num-images 8"]
    assert not (tmp_path / "b.json").exists()
