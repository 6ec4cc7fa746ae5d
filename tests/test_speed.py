"""Speed paths must not change results, and bench.py must run on a CPU and report a ratio (issue 7).

Every speed path (autocast, channels_last, foreach/fused optimizer, batch size of the queries,
torch.compile) is checked against the plain path on the same watermarked resnet8: the verification
labels of its triggers must be identical.
"""
import copy
import json
import os

import pytest
import torch

from conftest import run_script
from fragile.checkpoint_io import load_classifier
from fragile.data import balanced_subset, device_generator, get_spec, load_split, synthetic_split, to_float
from fragile.reference_loop import PILDataset
from fragile.devices import tf32
from fragile.training import amp_dtype, grad_scaler, make_sgd, predict_logits, prepare_model, train_steps
from fragile.triggers import load_triggers
from fragile.verification import query_labels

CPU = torch.device("cpu")


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
    """A copy of ``model`` after ``steps`` SGD steps through fragile.training.train_steps (seeded), on the
    CPU through the same code the GPU runs: prepare_model's channels_last, the optimizer kernels, autocast."""
    model = prepare_model(copy.deepcopy(model), CPU, channels_last=channels_last)
    optimizer = make_sgd(model, lr, 0.9, 5e-4, kernels=kernels)
    for step, *_ in train_steps(model, optimizer, train, spec, device_generator(CPU, 0), 32, CPU, amp=amp):
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
    cuda = torch.device("cuda")   # a device name only: nothing runs on it
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


def test_obfuscation_batches_are_drawn_where_the_data_lives(wm):
    """--no-data-on-device keeps the data on the CPU while the model is on the GPU: the shuffle generator must
    be the data's (a CUDA generator cannot shuffle CPU data). ctx.device names CUDA; nothing runs there."""
    from types import SimpleNamespace
    from fragile.tamper_suite import cycling_batches
    _, _, _, spec, train = wm
    ctx = SimpleNamespace(device=torch.device("cuda"), train=train, spec=spec, config={"OBFUSCATE_BATCH_SIZE": 16})
    images, labels = next(cycling_batches(ctx, 0))
    assert images.shape[0] == 16 and images.device == train.images.device


@pytest.mark.skipif(not (torch.cuda.is_available() or os.environ.get("FRAGILE_TEST_COMPILE")),
                    reason="torch.compile of resnet8 took 137 s cold (inductor cache empty) on the 2-core CPU "
                           "of the test machine, over this file's budget; FRAGILE_TEST_COMPILE=1 runs it")
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
