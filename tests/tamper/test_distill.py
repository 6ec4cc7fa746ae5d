"""Knowledge distillation (BIVBench's), in process on the session's resnet8: the student is a fresh network of the
protected model's architecture, learns the protected model's labels, and is a change even untrained."""
import dataclasses

import pytest
import torch

from conftest import eval_context
from fragile.core.io import load_classifier
from fragile.core.weights import state_changed
from fragile.tamper.distill import DistillParams, fresh_student, labels_of, multistep, run_distill
from fragile.tamper.registry import lookup
from fragile.watermark.trigger_io import load_triggers

SHORT = DistillParams(epochs=1, lr=0.05, milestones=[])


@pytest.fixture(scope="module")
def ctx(watermarked):
    """The session model with its checkpoint's metadata (the student's architecture comes from it): 256 training
    images, 200 test images."""
    model, meta = load_classifier(watermarked["model"], "cpu")
    triggers, _ = load_triggers(watermarked["triggers"])
    return eval_context(model, triggers, watermarked["key_labels"], train_size=256, test_size=200,
                        probe={"model_meta": meta})


def test_the_student_learns_the_protected_models_labels_from_scratch(ctx):
    """One epoch moves the untrained student toward the teacher's labels; every record carries the agreement, the
    run is a change, and the student is its own network, not a copy of the teacher's weights."""
    run, student = run_distill(ctx, dataclasses.replace(SHORT, epochs=3), seed=0)
    first, last = run["records"][0], run["records"][-1]
    assert type(student) is type(ctx.model) and student.state_dict().keys() == ctx.model.state_dict().keys()
    assert run["model_changed"] is True and last["epoch"] == 3.0
    assert last["teacher_agreement"] > first["teacher_agreement"] + 0.1
    agree = (labels_of(student, ctx.probe.test.images, 256) == labels_of(ctx.model, ctx.probe.test.images, 256))
    assert last["teacher_agreement"] == pytest.approx(agree.float().mean().item())
    assert all(0 <= r["clean_accuracy"] <= 1 and "flipped" in r for r in run["records"])


def test_zero_epochs_is_the_untrained_student_and_still_a_change(ctx):
    """0 epochs: the seed's fresh initialisation (the same for the same seed, another for another), recorded as a
    change, since a student is always another model."""
    logged = []
    run, student = run_distill(dataclasses.replace(ctx, log=logged.append), DistillParams(epochs=0), seed=3)
    assert run["model_changed"] is True and len(run["records"]) == 1 and state_changed(student, ctx.model)
    assert not state_changed(student, fresh_student(ctx, 3)) and state_changed(student, fresh_student(ctx, 4))
    assert any("untrained student" in line for line in logged)


def test_the_learning_rate_falls_by_gamma_at_each_milestone_epoch():
    lr = multistep(DistillParams(), steps_per_epoch=10)
    assert [lr(s) for s in (0, 199, 200, 349, 350, 500, 599)] == pytest.approx([0.1, 0.1, 0.02, 0.02, 0.004,
                                                                                   0.0008, 0.0008])


def test_the_defaults_are_bivbenchs_cifar10_config_and_the_name_is_registered():
    p = DistillParams()
    assert (p.epochs, p.batch_size, p.lr, p.momentum, p.weight_decay, p.milestones, p.gamma) == \
        (60, 64, 0.1, 0.9, 5e-4, [20, 35, 50], 0.2)
    assert lookup("distill").params is DistillParams
