"""The benign-change matrix: the untouched model must verify under every harmless change of its envelope."""
import pytest
import torch

from conftest import eval_context, margin_params
from fragile.core.data import get_spec, load_split
from fragile.core.io import load_classifier
from fragile.tamper import benign
from fragile.tamper.benign import BenignParams
from fragile.watermark import methods
from fragile.watermark.jitter import DEFAULT_BATCH_SIZES
from fragile.watermark.paths import load_watermark, tensor_file


@pytest.fixture(scope="module")
def model_and_meta(watermarked):
    return load_classifier(watermarked["model"])


def test_margin_triggers_raise_no_false_alarm(model_and_meta, margin_set):
    model, meta = model_and_meta
    triggers, key, trigger_meta = margin_set
    assert trigger_meta["delta"] > 0 and "benign_jitter" in trigger_meta
    records = benign.benign_records(model, triggers, key, model_meta=meta,
                                    alternatives={"a copy of the tensor": triggers.clone()})
    assert records and not any(r["detected"] for r in records), [r for r in records if r["detected"]]
    summary = benign.summarize_benign(records)
    assert summary["false_alarms"] == 0 and summary["max_logit_jitter"] < trigger_meta["delta"]
    assert min(r["min_margin"] for r in records if r["min_margin"] is not None) >= trigger_meta["delta"] / 2


def test_margin_triggers_calibrated_on_half_precision_raise_no_false_alarm_there(model_and_meta, margin_set):
    model, meta = model_and_meta
    spec = get_spec("synthetic")
    key = margin_set[1]
    envelope = ["exact", "fp16", "bf16"]
    job = methods.TriggerJob(model, spec, list(key), torch.device("cpu"), load_split(spec, "data", False))
    triggers, info = methods.generate("margin", job, margin_params(pool=1, select_draws=4, envelope=envelope))
    delta = info["meta"]["delta"]
    assert delta >= 10 * info["meta"]["benign_jitter"]["per_entry"]["bf16"] > 100 * margin_set[2]["delta"]
    records = benign.benign_records(model, triggers, key, model_meta=meta, envelope=envelope)
    summary = benign.summarize_benign(records)
    assert {"fp16", "bf16", "batch", "threads", "channels_last", "exact"} <= set(summary["per_entry"])
    bf16_rows = 1 + sum(bs < len(key) for bs in DEFAULT_BATCH_SIZES)  # all at once, and each smaller batch
    assert summary["per_entry"]["bf16"]["settings"] == bf16_rows and summary["false_alarms"] == 0, \
        [r for r in records if r["detected"]]
    # the exact-calibrated set, checked on the same wide matrix: its rows exist and are reported per entry
    narrow = benign.summarize_benign(benign.benign_records(model, margin_set[0], key, envelope=envelope))
    assert narrow["per_entry"]["bf16"]["max_logit_jitter"] > margin_set[2]["delta"]


def test_the_matrix_on_a_deployed_set_covers_the_tensor_twin_and_the_recorded_envelope(model_and_meta, watermarked):
    model, meta = model_and_meta
    watermark = load_watermark(watermarked["triggers"])
    ctx = eval_context(model, watermark.triggers, watermark.key,
                       deployment={"trigger_meta": dict(watermark.meta, envelope=["batch"]),
                                   "tensor_file": tensor_file(watermark.triggers_path), "model_meta": meta})
    run, tampered = benign.run_benign(ctx, BenignParams(batch_sizes=[1, 16], envelope=[]), seed=0)
    settings = {r["setting"]: r["envelope_entry"] for r in run["records"]}
    assert tampered is None and run["false_alarms"] == 0 and not any(r["detected"] for r in run["records"])
    assert settings == {"reference (all at once, fp32)": "exact", "batch size 1": "batch", "batch size 16": "batch",
                        "checkpoint round trip": "exact", "tensor triggers (triggers.pt) vs PNG": "exact"}
    wide, _ = benign.run_benign(ctx, BenignParams(batch_sizes=[1], envelope=["threads", "bf16"]), seed=0)
    assert {r["envelope_entry"] for r in wide["records"]} == {"exact", "threads", "bf16"}
    assert sum(s["false_alarms"] for s in wide["per_entry"].values()) == wide["false_alarms"]
