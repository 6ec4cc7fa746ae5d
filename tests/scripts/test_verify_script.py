"""verify.py as a user runs it: intact at any batch size from PNGs or the tensor, tampered after noise or
fine-tuning (with the hash difference and the first mismatch in the recorded order), exit 2 on bad input."""
import json
import os

import pytest
import torch

from conftest import run_script, write_pickle_bomb
from fragile.core.io import load_classifier, save_classifier
from fragile.watermark.queries import chance_p_value

pytestmark = pytest.mark.integration


def verify(wm, *args, check=False):
    return run_script("verify.py", "--model", wm["model"], "--triggers", wm["triggers"], *args, check=check)


def test_verify_intact_at_any_batch_size_from_png_and_tensor(watermarked):
    for args in ([], ["--batch-size", 1]):
        proc = verify(watermarked, *args, "--json")
        report = json.loads(proc.stdout)
        assert proc.returncode == 0 and report["verdict"] == "intact" and report["matches"] == report["n"] == 30
        assert report["mismatches"] == [] and report["p_value"] == pytest.approx(chance_p_value(30, 30, 10))
    proc = run_script("verify.py", "--model", watermarked["model"], "--triggers",
                      os.path.join(watermarked["triggers"], "triggers.pt"), "--key", watermarked["key"])
    assert proc.stdout.startswith("INTACT") and "as watermarked" in proc.stdout


def test_verify_after_save_load_round_trip(watermarked, tmp_path):
    model, meta = load_classifier(watermarked["model"])
    save_classifier(str(tmp_path / "copy.pt"), model, {k: v for k, v in meta.items() if k != "weights_sha256"})
    proc = run_script("verify.py", "--model", tmp_path / "copy.pt", "--triggers", watermarked["triggers"],
                      "--key", watermarked["key"], check=False)
    assert proc.returncode == 0


def test_verify_detects_weight_noise_and_reports_the_hash_difference(watermarked, tmp_path):
    model, meta = load_classifier(watermarked["model"])
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05 * p.abs().mean())
    save_classifier(str(tmp_path / "noisy.pt"), model, {k: v for k, v in meta.items() if k != "weights_sha256"})
    proc = run_script("verify.py", "--model", tmp_path / "noisy.pt", "--triggers", watermarked["triggers"],
                      "--key", watermarked["key"], "--json", check=False)
    report = json.loads(proc.stdout)
    assert proc.returncode == 1 and report["verdict"] == "tampered" and report["hash_matches_triggers"] is False
    assert len(report["mismatches"]) == report["n"] - report["matches"] > 0
    first = report["mismatches"][0]
    assert first["expected"] == watermarked["key_labels"][first["index"]] != first["returned"]
    order = json.load(open(os.path.join(watermarked["triggers"], "meta.json")))["query_order"]
    mismatched = {m["index"] for m in report["mismatches"]}
    position = report["queries_to_first_mismatch"]  # the first mismatched trigger in the recorded order
    assert order[position - 1] in mismatched and not mismatched & set(order[:position - 1])
    # Tolerating every flipped label does not make it intact: the weights' own hash differs from the bound one.
    tolerant = run_script("verify.py", "--model", tmp_path / "noisy.pt", "--triggers", watermarked["triggers"],
                          "--key", watermarked["key"], "--max-mismatches", 29, "--json", check=False)
    report = json.loads(tolerant.stdout)
    assert tolerant.returncode == 1 and report["decided_by"] == ["weights_hash"]


def test_verify_detects_one_epoch_of_fine_tuning(watermarked, tmp_path):
    tampered = tmp_path / "tuned.pt"
    run_script("eval.py", "--model", watermarked["model"], "--attack", "finetune", "--epochs", 1, "--batch-size", 32,
               "--test-subset", 200, "--early-steps", "--device", "cpu", "--results-dir", tmp_path,
               "--save-tampered", tampered, "--no-progress")
    proc = run_script("verify.py", "--model", tampered, "--triggers", watermarked["triggers"],
                      "--key", watermarked["key"], check=False)
    assert proc.returncode == 1 and proc.stdout.startswith("TAMPERED") and "DIFFERS" in proc.stdout


def _bad_triggers(tmp_path):
    path = tmp_path / "wrong_shape.pt"
    torch.save({"format": "fragile-wm-triggers/1", "images": torch.zeros(30, 1, 28, 28, dtype=torch.uint8),
                "meta": {}}, path)
    return path


@pytest.mark.parametrize("case", ["missing", "corrupt", "pickle", "shape", "key_length", "key_range", "text",
                                  "max_mismatches", "negative_mismatches", "batch_size"])
def test_bad_input_exits_2_with_one_clear_line(watermarked, tmp_path, case):
    model, triggers, key = watermarked["model"], watermarked["triggers"], watermarked["key"]
    labels = watermarked["key_labels"]
    extra = []
    if case == "missing":
        model, expected = tmp_path / "absent.pt", "checkpoint not found"
    elif case == "text":
        model, expected = tmp_path / "notes.pt", "corrupt or not a torch file"
        model.write_text("not a checkpoint\n" * 50)
    elif case in ("max_mismatches", "negative_mismatches"):
        extra, expected = ["--max-mismatches", 1000 if case == "max_mismatches" else -1], "--max-mismatches"
    elif case == "batch_size":
        extra, expected = ["--batch-size", -1], "--batch-size"
    elif case == "corrupt":
        model, expected = tmp_path / "corrupt.pt", "corrupt"
        model.write_bytes(os.urandom(2048))
    elif case == "pickle":
        model, expected = tmp_path / "bomb.pt", "refusing"
        write_pickle_bomb(str(model), str(tmp_path / "pwned"))
    elif case == "shape":
        triggers, expected = _bad_triggers(tmp_path), "shape"
    else:
        key, expected = tmp_path / "key.json", ("30 triggers" if case == "key_length" else "not made with the triggers")
        bad = labels[:-1] if case == "key_length" else [99] + labels[1:]
        key.write_text(json.dumps({"labels": bad, "num_classes": 10}))
    proc = run_script("verify.py", "--model", model, "--triggers", triggers, "--key", key, *extra, check=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error:") and expected in lines[0], \
        proc.stderr
    assert not (tmp_path / "pwned").exists()


def _resaved(watermarked, tmp_path, change):
    """The watermarked checkpoint's payload with ``change(state_dict)`` applied and its metadata kept as it was."""
    payload = torch.load(watermarked["model"], weights_only=True)
    payload["state_dict"] = change(payload["state_dict"])
    path = tmp_path / "resaved.pt"
    torch.save(payload, path)
    return path


def test_a_checkpoint_whose_metadata_kept_the_old_hash_is_tampered(watermarked, tmp_path):
    """Every weight through fp16 and back, metadata untouched: the labels may all still match, but the hash is
    computed from the weights loaded, so the verdict is tampered (exit 1), and --json names the evidence."""
    path = _resaved(watermarked, tmp_path, lambda state: {k: v.half().to(v.dtype) if v.is_floating_point() else v
                                                          for k, v in state.items()})
    proc = run_script("verify.py", "--model", path, "--triggers", watermarked["triggers"], "--json", check=False)
    report = json.loads(proc.stdout)
    assert proc.returncode == 1 and report["verdict"] == "tampered" and report["hash_matches_triggers"] is False
    assert {"weights_hash", "checkpoint_metadata_hash"} <= set(report["decided_by"])
    assert report["checkpoint_metadata_hash"] == "differs from weights"
    line = run_script("verify.py", "--model", path, "--triggers", watermarked["triggers"], check=False).stdout
    assert line.startswith("TAMPERED") and "DIFFERS" in line and "as watermarked" not in line


def test_a_model_whose_outputs_are_not_finite_is_tampered_whatever_the_tolerance(watermarked, tmp_path):
    path = _resaved(watermarked, tmp_path, lambda state: {k: torch.full_like(v, float("nan"))
                                                          if v.is_floating_point() else v for k, v in state.items()})
    proc = run_script("verify.py", "--model", path, "--triggers", watermarked["triggers"], "--json",
                      "--max-mismatches", 29, check=False)
    report = json.loads(proc.stdout)
    assert proc.returncode == 1 and "finite_outputs" in report["decided_by"] and report["finite_outputs"] is False


def test_an_intact_verdict_names_both_kinds_of_evidence(watermarked):
    report = json.loads(verify(watermarked, "--json").stdout)
    assert report["verdict"] == "intact" and report["decided_by"] == ["labels", "weights_hash"]
    assert report["weights_hash"] == "as watermarked" and report["checkpoint_metadata_hash"] == "matches weights"
