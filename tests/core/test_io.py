"""Checkpoint I/O: weights hashes, round trips, atomic writes, and loads that never run pickled code."""
import pytest
import torch

from conftest import write_pickle_bomb
from fragile.core.cli import UserError
from fragile.core.data import get_spec, load_split
from fragile.core.io import (atomic_write_text, load_classifier, read_checkpoint, read_json, save_classifier,
                             weights_sha256)
from fragile.core.training import accuracy


def test_checkpoint_round_trip_keeps_weights_hash_and_metadata(watermarked, tmp_path):
    model, meta = load_classifier(watermarked["model"])
    for key in ("arch", "dataset", "num_classes", "input_shape", "test_accuracy", "epochs", "seed",
                "torch_version", "torchvision_version", "weights_sha256"):
        assert key in meta
    assert weights_sha256(model.state_dict()) == meta["weights_sha256"]
    copy_path = tmp_path / "copy.pt"
    save_classifier(str(copy_path), model, {k: v for k, v in meta.items() if k != "weights_sha256"})
    again, meta2 = load_classifier(str(copy_path))
    test = load_split(get_spec("synthetic"), "unused", train=False)
    assert meta2["weights_sha256"] == meta["weights_sha256"]
    assert accuracy(again, test) == accuracy(model, test)


def test_pickle_payload_is_refused_without_running(tmp_path):
    bomb, marker = tmp_path / "bomb.pt", tmp_path / "pwned"
    write_pickle_bomb(str(bomb), str(marker))
    with pytest.raises(UserError, match="refusing"):
        read_checkpoint(str(bomb))
    assert not marker.exists()


def test_checkpoint_for_another_arch_is_refused(watermarked):
    with pytest.raises(UserError, match="arch"):
        load_classifier(watermarked["model"], expect_arch="resnet18")


def test_a_checkpoint_for_an_arch_this_suite_does_not_build_is_one_clear_error(watermarked, tmp_path):
    payload = read_checkpoint(watermarked["model"])
    payload["meta"]["arch"] = "vgg"
    path = tmp_path / "vgg.pt"
    torch.save(payload, path)
    with pytest.raises(UserError, match="unknown arch 'vgg'"):
        load_classifier(str(path))


def test_atomic_writes_leave_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "out.txt"
    atomic_write_text("first", str(path))

    class Boom(Exception):
        pass

    def failing(f):
        f.write("half")
        raise Boom
    from fragile.core.io import atomic_write
    with pytest.raises(Boom):
        atomic_write(str(path), failing, binary=False)
    assert path.read_text() == "first" and [p.name for p in tmp_path.iterdir()] == ["out.txt"]


def test_read_json_names_what_the_file_was_meant_to_be(tmp_path):
    bad = tmp_path / "meta.json"
    bad.write_text("{not json")
    with pytest.raises(UserError, match="trigger metadata .*meta.json is unreadable or not JSON"):
        read_json(str(bad), "trigger metadata")


# ----------------------------------------------------------------------------- files that lie or are not what they seem

def test_a_text_file_as_checkpoint_is_one_clear_error(tmp_path):
    path = tmp_path / "notes.pt"
    path.write_text("these are my notes, not a checkpoint\n" * 20)
    with pytest.raises(UserError, match="corrupt or not a torch file"):
        read_checkpoint(str(path))


@pytest.mark.parametrize("payload, expected", [
    ({"format": "fragile-wm/1", "state_dict": {}}, "metadata does not name"),
    ({"format": "fragile-wm/1", "state_dict": {"w": "not a tensor"}, "meta": {}}, "dict of named tensors"),
    ({"format": "fragile-wm/1", "state_dict": {}, "meta": "a string"}, "metadata does not name"),
])
def test_a_checkpoint_without_its_parts_names_what_is_missing(tmp_path, payload, expected):
    path = tmp_path / "partial.pt"
    torch.save(payload, path)
    with pytest.raises(UserError, match=expected):
        read_checkpoint(str(path))


def test_the_weights_hash_is_computed_from_the_weights_loaded_not_read_from_the_file(watermarked, tmp_path):
    """A checkpoint whose weights went through fp16 and whose metadata kept the old hash: the hash load_classifier
    reports is that of the weights it loaded; the file's claim is kept apart."""
    payload = torch.load(watermarked["model"], weights_only=True)
    payload["state_dict"] = {k: v.half().to(v.dtype) if v.is_floating_point() else v
                             for k, v in payload["state_dict"].items()}
    path = tmp_path / "rounded.pt"
    torch.save(payload, path)
    model, meta = load_classifier(str(path))
    assert meta["stored_weights_sha256"] == payload["meta"]["weights_sha256"]
    assert meta["weights_sha256"] == weights_sha256(model.state_dict()) != meta["stored_weights_sha256"]


def test_metadata_that_disagrees_with_its_dataset_is_refused(watermarked, tmp_path):
    payload = torch.load(watermarked["model"], weights_only=True)
    payload["meta"]["num_classes"] = 1000
    path = tmp_path / "lying.pt"
    torch.save(payload, path)
    with pytest.raises(UserError, match="num_classes 1000"):
        load_classifier(str(path))


def test_json_nested_too_deeply_or_of_the_wrong_type_is_one_clear_error(tmp_path):
    deep, flat = tmp_path / "deep.json", tmp_path / "flat.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    flat.write_text('"just a string"')
    with pytest.raises(UserError, match="nested too deeply"):
        read_json(str(deep), "trigger metadata")
    with pytest.raises(UserError, match="expected a JSON object"):
        read_json(str(flat), "trigger metadata", expect=dict)


def test_an_output_path_that_is_a_folder_is_refused_before_any_work(tmp_path):
    from fragile.core.io import check_writable, refuse_existing
    with pytest.raises(UserError, match="is a folder"):
        check_writable(str(tmp_path))
    (tmp_path / "taken.pt").write_bytes(b"x")
    with pytest.raises(UserError, match="--overwrite"):
        refuse_existing(str(tmp_path / "taken.pt"), False, "checkpoint")
    refuse_existing(str(tmp_path / "taken.pt"), True, "checkpoint")
