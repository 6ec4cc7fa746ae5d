"""One rule, for every script, from a checkpoint to its triggers and from the triggers to their key."""
import os
import shutil

import pytest

from fragile.core.cli import UserError
from fragile.watermark.paths import default_paths, key_path, load_watermark, tensor_file, triggers_path


def test_the_defaults_sit_beside_the_checkpoint():
    assert default_paths("ckpt/resnet18_cifar10.pt", "margin") == ("ckpt/resnet18_cifar10_triggers_margin",
                                                                   "ckpt/resnet18_cifar10_key_margin.json")
    assert triggers_path("ckpt/m.pt", "paper") == "ckpt/m_triggers_paper"
    assert triggers_path("ckpt/m.pt", "paper", "elsewhere/set") == "elsewhere/set"


@pytest.mark.parametrize("named", ["folder", "png", "tensor"])
def test_the_key_is_found_beside_the_trigger_folder_however_it_is_named(watermarked, named):
    folder = watermarked["triggers"]
    path = {"folder": folder, "png": os.path.join(folder, "png"), "tensor": os.path.join(folder, "triggers.pt")}[named]
    watermark = load_watermark(path)
    assert os.path.abspath(watermark.key_path) == os.path.abspath(watermarked["key"])
    assert watermark.key == watermarked["key_labels"] and watermark.num_classes == 10
    assert len(watermark.triggers) == 30 and watermark.meta["method"] == "paper"
    assert tensor_file(path) == os.path.join(folder, "triggers.pt")


def test_a_given_key_wins_and_missing_files_are_one_clear_error(watermarked, tmp_path):
    other = tmp_path / "other.json"
    shutil.copy(watermarked["key"], other)
    assert load_watermark(watermarked["triggers"], str(other)).key_path == str(other)
    with pytest.raises(UserError, match="triggers not found: .*absent"):
        load_watermark(str(tmp_path / "absent"))
    with pytest.raises(UserError, match="names no key file"):
        key_path(watermarked["triggers"], {})
    copied = tmp_path / "set"
    shutil.copytree(watermarked["triggers"], copied)   # without its key beside it
    with pytest.raises(UserError, match="key file not found"):
        load_watermark(str(copied))
    os.remove(copied / "triggers.pt")
    assert tensor_file(str(copied)) is None
