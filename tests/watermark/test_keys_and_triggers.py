"""Keys and triggers on disk: a secure random key, 8-bit triggers stored as PNGs and a tensor, read back equal."""
import os

import pytest
import torch

from fragile.core.io import load_classifier
from fragile.watermark.keys import load_key, make_key, save_key
from fragile.watermark.trigger_io import (load_triggers, quantize, save_triggers, straight_through_quantize,
                                          trigger_folder)
from fragile.watermark.queries import query_labels
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


# ----------------------------------------------------------------------------- trigger files that are not what they seem

def copy_set(watermarked, tmp_path):
    import shutil
    folder = tmp_path / "set"
    shutil.copytree(watermarked["triggers"], folder)
    return folder


@pytest.mark.parametrize("mode, expected", [("I;16", "16-bit"), ("1", "1-bit"), ("P", "palette"),
                                            ("RGBA", "RGBA")])
def test_pngs_that_are_not_8bit_grayscale_or_rgb_are_refused(watermarked, tmp_path, mode, expected):
    """The same triggers re-saved as 16-bit, 1-bit, palette or RGBA PNGs decode to other values (or shapes):
    refused by their header, never verified."""
    import numpy as np
    from PIL import Image
    folder = copy_set(watermarked, tmp_path)
    first = folder / "png" / "0000.png"
    image = Image.open(first)
    if mode == "I;16":   # the same values on a 16-bit scale (PIL writes 16-bit PNGs in grayscale only)
        image = Image.fromarray(np.asarray(image.convert("L"), dtype=np.uint16) * 257)
    else:
        image = image.convert(mode)
    image.save(first)
    with pytest.raises(UserError, match=expected):
        load_triggers(str(folder))


def test_a_png_declaring_a_huge_image_is_refused_before_it_is_decoded(watermarked, tmp_path):
    """A decompression bomb: a small file whose header declares 20000 x 20000 pixels."""
    import struct
    import zlib
    folder = copy_set(watermarked, tmp_path)

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    rows = zlib.compress(b"\0" * 20001 * 200)
    bomb = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 20000, 20000, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", rows) + chunk(b"IEND", b""))
    (folder / "png" / "0000.png").write_bytes(bomb)
    with pytest.raises(UserError, match="declares 20000x20000"):
        load_triggers(str(folder))


@pytest.mark.parametrize("key_file", ["../elsewhere.json", "/etc/passwd", "sub/key.json", ".."])
def test_the_metadata_never_leads_to_a_key_outside_the_trigger_folder(watermarked, tmp_path, key_file):
    import json
    from fragile.watermark.paths import load_watermark
    folder = copy_set(watermarked, tmp_path)
    meta = json.load(open(folder / "meta.json"))
    (folder / "meta.json").write_text(json.dumps(dict(meta, key_file=key_file)))
    with pytest.raises(UserError, match="only a file name beside the trigger folder"):
        load_watermark(str(folder))


def test_a_key_not_made_with_the_triggers_is_refused(watermarked, tmp_path):
    from fragile.watermark.paths import load_watermark
    folder = copy_set(watermarked, tmp_path)
    other = tmp_path / os.path.basename(watermarked["key"])
    labels = list(watermarked["key_labels"])
    labels[0] = (labels[0] + 1) % 10
    save_key(str(other), labels, 10, "test")
    with pytest.raises(UserError, match="was not made with the triggers"):
        load_watermark(str(folder))


def test_a_trigger_file_with_no_triggers_is_refused(tmp_path):
    path = tmp_path / "empty.pt"
    torch.save({"format": "fragile-wm-triggers/1", "images": torch.zeros(0, 3, 32, 32, dtype=torch.uint8),
                "meta": {}}, path)
    with pytest.raises(UserError, match="holds 0 triggers"):
        load_triggers(str(path))


@pytest.mark.parametrize("content, expected", [('{"labels": []}', "non-empty list"),
                                               ('{"labels": [1, 2], "num_classes": 1}', "at least 2"),
                                               ('[1, 2, 3]', "expected a JSON object")])
def test_a_malformed_key_is_one_clear_error(tmp_path, content, expected):
    path = tmp_path / "key.json"
    path.write_text(content)
    with pytest.raises(UserError, match=expected):
        load_key(str(path))


# ----------------------------------------------------------------------------- replacing a watermark, interrupted

def bound_pair(folder, key_file):
    """(triggers, key labels) at the two paths, if they form a bound pair (else an exception)."""
    from fragile.watermark.paths import load_watermark
    watermark = load_watermark(str(folder), str(key_file))
    return watermark.triggers, watermark.key


def write_set(folder, key_file, seed):
    """A small trigger set and its key, written by save_watermark (as generate_samples.py writes them)."""
    from fragile.watermark.keys import key_payload, key_sha256
    from fragile.watermark.paths import save_watermark
    gen = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (4, 3, 8, 8), generator=gen, dtype=torch.uint8)
    labels = torch.randint(0, 10, (4,), generator=gen).tolist()
    meta = {"key_file": os.path.basename(key_file), "key_sha256": key_sha256(labels), "input_shape": [3, 8, 8]}
    save_watermark(str(folder), str(key_file), images, meta, key_payload(labels, 10, "test"))
    return images, labels


@pytest.mark.parametrize("stop_at", range(1, 8))
def test_a_replacement_cut_short_at_any_rename_never_pairs_a_key_with_other_triggers(tmp_path, monkeypatch, stop_at):
    """save_watermark interrupted at its k-th rename (as by kill -9; 1-3 are the staged files' own atomic writes,
    4-7 the swap): the next run's finish_interrupted_swap leaves the old pair, whole and bound, unless the new one
    was wholly in place."""
    from fragile.watermark import paths
    folder, key_file = tmp_path / "set", tmp_path / "key.json"
    old = write_set(folder, key_file, seed=0)
    real_replace, calls = os.replace, []

    def interrupted_replace(src, dst):
        calls.append((src, dst))
        if len(calls) == stop_at:
            raise KeyboardInterrupt
        return real_replace(src, dst)
    monkeypatch.setattr(paths.os, "replace", interrupted_replace)
    with pytest.raises(KeyboardInterrupt):
        write_set(folder, key_file, seed=1)
    monkeypatch.setattr(paths.os, "replace", real_replace)
    assert len(calls) == stop_at
    done = paths.finish_interrupted_swap(str(folder), str(key_file))
    images, labels = bound_pair(folder, key_file)
    assert done == ("restored" if stop_at >= 5 else None)   # the k-th rename raised instead of happening
    assert torch.equal(images, old[0]) and labels == old[1]
    assert not [n for n in os.listdir(tmp_path) if n.endswith((".new", ".prev"))]


def test_the_first_set_of_a_name_cut_short_before_its_key_is_finished_next_time(tmp_path, monkeypatch):
    from fragile.watermark import paths
    folder, key_file = tmp_path / "set", tmp_path / "key.json"
    real_replace = os.replace
    monkeypatch.setattr(paths.os, "replace", lambda s, d: real_replace(s, d) if not str(d).endswith("key.json")
                        else (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        write_set(folder, key_file, seed=3)
    monkeypatch.setattr(paths.os, "replace", real_replace)
    assert paths.finish_interrupted_swap(str(folder), str(key_file)) == "finished"
    bound_pair(folder, key_file)
