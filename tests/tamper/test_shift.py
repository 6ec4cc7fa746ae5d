"""Fine-tuning on another distribution: the shifted images are the transform of the originals with the labels
kept, the attack fine-tunes on them (not on the originals), and 0 epochs is no change."""
import dataclasses

import pytest
import torch

from conftest import session_context
from fragile.core.data import Split
from fragile.tamper.shift import TRANSFORMS, ShiftParams, run_shift, shifted


def test_each_transform_keeps_shape_dtype_and_labels_and_changes_the_images():
    gen = torch.Generator().manual_seed(0)
    split = Split(torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8, generator=gen), torch.arange(4))
    for name in TRANSFORMS:
        out = shifted(split, name)
        assert out.images.dtype == torch.uint8 and out.images.shape == split.images.shape, name
        assert torch.equal(out.labels, split.labels) and not torch.equal(out.images, split.images), name
    assert torch.equal(shifted(shifted(split, "invert"), "invert").images, split.images)
    four_turns = split
    for _ in range(4):
        four_turns = shifted(four_turns, "rotate")
    assert torch.equal(four_turns.images, split.images)
    flat = Split(torch.full((1, 1, 5, 5), 77, dtype=torch.uint8), torch.zeros(1, dtype=torch.long))
    assert torch.equal(shifted(flat, "blur").images, flat.images)   # a box blur leaves a flat image as it is


@pytest.fixture(scope="module")
def ctx(watermarked):
    return session_context(watermarked, train_size=96, test_size=100)


def test_shift_fine_tunes_on_the_shifted_images_not_the_originals(ctx):
    """The same seed and epochs on the originals (plain fine-tuning) and on the inverted images give other weights."""
    from fragile.tamper.finetune import run_finetune
    run, shifted_model = run_shift(ctx.with_finetune(batch_size=32), ShiftParams(epochs=1), seed=0)
    _, plain_model = run_finetune(ctx.with_finetune(batch_size=32, epochs=1), None, seed=0)
    assert run["model_changed"] is True and run["records"][-1]["epoch"] == 1.0
    assert any(not torch.equal(a, b) for a, b in zip(shifted_model.parameters(), plain_model.parameters()))
    assert run["records"][0]["phase"] == "shift-invert"


def test_zero_epochs_is_recorded_as_no_change(ctx):
    logged = []
    quiet = dataclasses.replace(ctx, log=logged.append)
    run, _ = run_shift(quiet, ShiftParams(epochs=0), seed=0)
    assert run["model_changed"] is False and any("recorded as no change" in line for line in logged)
