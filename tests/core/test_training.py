"""The training loop and its speed paths: every path gives the labels of the plain one, recipes, schedules,
weight decay, frozen batch norm, mixed precision through the GPU's code on the CPU, resume state."""
import copy
import os

import pytest
import torch

from fragile.core.data import (balanced_subset, device_generator, get_spec, load_split, synthetic_split, to_float,
                               train_batches)
from fragile.core.devices import tf32
from fragile.core.io import load_classifier
from fragile.core.reference_loop import PILDataset
from fragile.core.training import (amp_dtype, grad_scaler, lr_at, make_sgd, predict_logits, prepare_model,
                                   recipe_settings, train_steps)
from fragile.watermark.trigger_io import load_triggers
from fragile.watermark.queries import query_labels
from models import build_classifier

CPU, CUDA = torch.device("cpu"), torch.device("cuda")   # CUDA is only a device *name* here: nothing runs on it


@pytest.fixture(scope="module")
def wm(watermarked):
    """(watermarked resnet8, its uint8 triggers, the key, the synthetic training split)."""
    model, meta = load_classifier(watermarked["model"], CPU)
    triggers, _ = load_triggers(watermarked["triggers"])
    spec = get_spec(meta["dataset"])
    train = balanced_subset(load_split(spec, "data", True), 256, spec.num_classes)
    return model, triggers, torch.tensor(watermarked["key_labels"]), spec, train


def test_plain_path_reads_the_key(wm):
    model, triggers, key, _, _ = wm
    assert torch.equal(query_labels(model, triggers), key)


def channels_last_labels(model, triggers):
    fast = copy.deepcopy(model).to(memory_format=torch.channels_last)
    images = to_float(triggers).contiguous(memory_format=torch.channels_last)
    return predict_logits(fast, images).argmax(1).cpu()


INFERENCE_PATHS = {
    "autocast": lambda m, t: predict_logits(m, t, amp=True).argmax(1).cpu(),  # amp=True on the CPU: fp32
    "channels_last": channels_last_labels,
    "batch_1": lambda m, t: query_labels(m, t, batch_size=1),
    "batch_7": lambda m, t: query_labels(m, t, batch_size=7),
    "large_no_grad_batch": lambda m, t: predict_logits(m, t, batch_size=4096).argmax(1).cpu(),
}


@pytest.mark.parametrize("path", list(INFERENCE_PATHS))
def test_inference_speed_path_gives_the_same_labels(wm, path):
    model, triggers, _, _, _ = wm
    assert torch.equal(INFERENCE_PATHS[path](model, triggers), query_labels(model, triggers))


def fine_tuned(model, spec, train, amp=False, kernels="for-loop", channels_last=False, steps=3, lr=0.01):
    """A copy of ``model`` after ``steps`` SGD steps through fragile.core.training.train_steps (seeded), on the
    CPU through the same code the GPU runs: prepare_model's channels_last, the optimizer kernels, autocast."""
    model = prepare_model(copy.deepcopy(model), CPU, channels_last=channels_last)
    optimizer = make_sgd(model, lr, 0.9, 5e-4, kernels=kernels)
    for step, *_ in train_steps(model, optimizer, train_batches(train, 32, spec, device_generator(CPU, 0)), amp):
        if step == steps:
            break
    return model.eval()


@pytest.fixture(scope="module")
def plain_fine_tuned(wm):
    model, _, _, spec, train = wm
    return fine_tuned(model, spec, train)


@pytest.mark.parametrize("path", [dict(amp=True), dict(kernels="foreach"), dict(kernels="fused"),
                                  dict(channels_last=True), dict(amp=True, kernels="fused", channels_last=True)],
                         ids=["autocast_auto_is_fp32_on_cpu", "foreach_optimizer", "fused_optimizer", "channels_last",
                              "all_together"])
def test_training_speed_path_gives_the_same_labels(wm, plain_fine_tuned, path):
    model, triggers, _, spec, train = wm
    plain, fast = plain_fine_tuned, fine_tuned(model, spec, train, **path)
    for (name, a), b in zip(plain.state_dict().items(), fast.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), rtol=1e-4, atol=1e-5), name
    assert torch.equal(query_labels(fast, triggers), query_labels(plain, triggers))


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_mixed_precision_training_runs_the_gpu_code_path_on_cpu(wm, plain_fine_tuned, dtype):
    """bf16 autocast, and fp16 autocast with its GradScaler, run the same train_steps the GPU runs: the steps
    are finite and land near the fp32 ones (reduced precision: close, not equal)."""
    model, _, _, spec, train = wm
    fast = fine_tuned(model, spec, train, amp=dtype)
    moved = 0.0
    for (name, a), b, start in zip(plain_fine_tuned.state_dict().items(), fast.state_dict().values(),
                                   model.state_dict().values()):
        assert torch.isfinite(b.float()).all(), name
        if a.is_floating_point():
            assert (b.float() - a.float()).abs().max() <= 0.05 * (a.float() - start.float()).abs().max() + 1e-2, name
            moved += (b.float() - start.float()).abs().sum().item()
    assert moved > 0


def test_amp_dtype_prefers_native_bf16_then_fp16_with_loss_scaling(monkeypatch):
    cuda = CUDA
    asked = []
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: asked.append(
        including_emulation) or False)
    assert amp_dtype(cuda, True) is torch.float16 and asked == [False]   # emulated bf16 does not count
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert amp_dtype(cuda, True) is torch.bfloat16
    assert amp_dtype(cuda, False) is None and amp_dtype(CPU, True) is None   # the CPU trains in fp32
    assert amp_dtype(CPU, "bf16") is torch.bfloat16 and amp_dtype(CPU, "fp16") is torch.float16
    assert grad_scaler(CPU, "fp16").is_enabled() and not grad_scaler(CPU, "bf16").is_enabled()
    assert not grad_scaler(CPU, True).is_enabled()


def test_verification_pins_only_tf32_and_restores_the_flags(wm):
    model, triggers, key, _, _ = wm
    flags = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark)
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True    # as eval.py sets it for fine-tuning on a GPU
        with tf32(False):
            assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
            assert torch.backends.cudnn.benchmark
        assert torch.equal(query_labels(model, triggers), key)
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        assert torch.backends.cudnn.benchmark      # autotuning survives verification between fine-tuning steps
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark = flags


@pytest.mark.skipif(not (torch.cuda.is_available() or os.environ.get("FRAGILE_TEST_COMPILE")),
                    reason="torch.compile is slow on a cold 2-core CPU (docs/speed.md); FRAGILE_TEST_COMPILE=1 "
                           "runs it")
def test_compiled_model_gives_the_same_labels(wm):
    model, triggers, _, _, _ = wm
    compiled = torch.compile(copy.deepcopy(model))
    assert torch.equal(predict_logits(compiled, triggers).argmax(1).cpu(), query_labels(model, triggers))


@pytest.mark.parametrize("channels", [3, 1])
def test_reference_dataset_yields_the_same_images(channels):
    """The reference loop sees exactly our images: without augmentation, ToTensor(PIL) == our uint8 / 255."""
    from torchvision import transforms
    split = synthetic_split(get_spec("synthetic"), True, n=4)
    split.images = split.images[:, :channels].contiguous()
    data = PILDataset(split, transforms.ToTensor())
    for i in range(len(split)):
        image, label = data[i]
        assert torch.equal(image, to_float(split.images[i])) and label == split.labels[i].item()


# ----------------------------------------------------------------------------- recipes

def test_fast_recipe_batch_and_lr_follow_the_device():
    assert (recipe_settings("fast", CUDA).batch_size, recipe_settings("fast", CUDA).lr) == (512, 0.4)
    assert (recipe_settings("fast", CPU).batch_size, recipe_settings("fast", CPU).lr) == (64, 0.1)
    assert recipe_settings("paper", CUDA) is recipe_settings("paper", CPU) is None   # the header is the paper's recipe


def test_cosine_schedule_anneals_once_per_epoch_without_warm_up():
    steps_per_epoch, epochs = 10, 4
    lrs = [lr_at(s, epochs * steps_per_epoch, 0.1, 0, "cosine", steps_per_epoch) for s in range(epochs * steps_per_epoch)]
    assert lrs[0] == 0.1 and len(set(lrs[:steps_per_epoch])) == 1           # constant within an epoch
    assert lrs[2 * steps_per_epoch] == pytest.approx(0.05)                  # half-way: half the peak
    assert all(a > b for a, b in zip(lrs[::steps_per_epoch], lrs[steps_per_epoch::steps_per_epoch]))


def test_decay_all_is_what_plain_sgd_does_and_the_option_spares_norms():
    spec = get_spec("synthetic")
    torch.manual_seed(0)
    model = build_classifier("resnet8", spec)
    plain, ours, spared = (build_classifier("resnet8", spec) for _ in range(3))
    for net in (plain, ours, spared):
        net.load_state_dict(model.state_dict())
    optimizers = [torch.optim.SGD(plain.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01),
                  make_sgd(ours, 0.1, 0.9, 0.01, kernels="for-loop", decay_all=True),
                  make_sgd(spared, 0.1, 0.9, 0.01, kernels="for-loop", decay_all=False)]
    for net, optimizer in zip((plain, ours, spared), optimizers):
        for _ in range(2):   # zero gradients: only weight decay moves the parameters
            for p in net.parameters():
                p.grad = torch.zeros_like(p)
            optimizer.step()
    for (name, a), b in zip(plain.named_parameters(), ours.parameters()):
        assert torch.equal(a, b), name
    bn = next(name for name, _ in model.named_parameters() if name.endswith("bn1.weight"))
    start = dict(model.named_parameters())[bn]
    assert not torch.equal(dict(plain.named_parameters())[bn], start)   # decayed
    assert torch.equal(dict(spared.named_parameters())[bn], start)      # spared


def test_freeze_bn_keeps_the_running_statistics_and_still_moves_the_weights():
    spec = get_spec("synthetic")
    data = balanced_subset(load_split(spec, "data", True), 128, spec.num_classes)

    def tuned(freeze_bn):
        torch.manual_seed(0)
        model = build_classifier("resnet8", spec)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        optimizer = make_sgd(model, 1e-2, 0.9, 0.0, kernels="for-loop")
        for _ in train_steps(model, optimizer, train_batches(data, 32, spec, torch.Generator().manual_seed(0)),
                             freeze_bn=freeze_bn):
            pass
        after = model.state_dict()
        return ({k: torch.equal(before[k], after[k]) for k in after if "running_" in k},
                torch.equal(before["1.fc.weight"], after["1.fc.weight"]))

    frozen_stats, frozen_fc_same = tuned(True)
    moving_stats, _ = tuned(False)
    assert frozen_stats and all(frozen_stats.values()) and not frozen_fc_same
    assert not any(moving_stats.values())


def test_resume_state_restores_the_data_order_where_it_was_saved():
    from fragile.core.training import capture_rng, restore_rng
    gen = torch.Generator().manual_seed(3)
    state = capture_rng(gen)
    expected = torch.randperm(10, generator=gen)
    again = torch.Generator().manual_seed(99)
    restore_rng(state, again, reseed=0)
    assert torch.equal(torch.randperm(10, generator=again), expected)
