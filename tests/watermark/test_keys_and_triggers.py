"""Keys and triggers on disk: a secure random key, 8-bit triggers stored as PNGs and a tensor, read back equal."""
import os

import pytest
import torch

from fragile.core.io import load_classifier
from fragile.watermark.keys import load_key, make_key, save_key
from fragile.watermark.trigger_io import (load_triggers, quantize, save_triggers, straight_through_quantize,
                                          trigger_folder)
from fragile.watermark.verify import query_labels
from fragile.core.cli import UserError


def test_every_trigger_matches_the_key_and_png_round_trip_keeps_labels(watermarked):
    model, _ = load_classifier(watermarked["model"])
    from_png, meta = load_triggers(watermarked["triggers"])
    from_tensor, _ = load_triggers(os.path.join(watermarked["triggers"], "triggers.pt"))
    assert from_png.dtype == torch.uint8 and torch.equal(from_png, from_tensor)
    assert query_labels(model, from_png).tolist() == watermarked["key_labels"]
    assert query_labels(model, from_tensor).tolist() == watermarked["key_labels"]
    assert meta["key_file"] == os.path.basename(watermarked["key"]) and meta["method"] == "paper"


def test_key_is_random_by_default_and_reproducible_with_a_seed():
    assert make_key(100, 10)[0] != make_key(100, 10)[0]
    assert make_key(100, 10, 7)[0] == make_key(100, 10, 7)[0]


def test_quantize_rounds_to_the_nearest_level_and_straight_through_keeps_the_gradient():
    images = torch.tensor([0.0, 0.5 / 255, 0.51 / 255, 1.2, -0.1], requires_grad=True)
    assert quantize(images).tolist() == [0, 0, 1, 255, 0]
    rounded = straight_through_quantize(images)
    rounded.sum().backward()
    assert torch.equal(images.grad, torch.ones(5))
    assert (rounded.detach() * 255).round().tolist() == [0, 0, 1, 255, 0]


def test_a_trigger_set_is_found_from_its_folder_its_pngs_or_its_tensor(tmp_path):
    images = torch.randint(0, 256, (3, 1, 8, 8), dtype=torch.uint8)
    folder = tmp_path / "set"
    save_triggers(str(folder), images, {"key_file": "k.json"})
    for path in (folder, folder / "png", folder / "triggers.pt"):
        assert trigger_folder(str(path)).rstrip("/") == str(folder)
        loaded, meta = load_triggers(str(path))
        assert torch.equal(loaded, images) and meta["key_file"] == "k.json"
    save_triggers(str(folder), images[:2], {})   # a rerun with fewer triggers leaves no stale PNGs
    assert sorted(os.listdir(folder / "png")) == ["0000.png", "0001.png"]


def test_a_malformed_key_file_is_one_clear_error(tmp_path):
    path = tmp_path / "k.json"
    save_key(str(path), [1, 2], 10, "seed 0")
    assert load_key(str(path)) == ([1, 2], 10)
    path.write_text('{"labels": [1, "x"]}')
    with pytest.raises(UserError, match="malformed"):
        load_key(str(path))
    with pytest.raises(UserError, match="key file not found"):
        load_key(str(tmp_path / "absent.json"))
