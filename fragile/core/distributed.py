"""Data parallelism under torchrun: DistributedDataParallel, with a plain ``python script.py`` left untouched.

torchrun starts one process per device and tells each its place through the environment (RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR/PORT). ``setup`` joins the process group and returns the device this rank trains
on; without those variables it does nothing, so a single-process run never touches torch.distributed.

Who does what: every rank trains on its shard of each global batch (``fragile.core.data.train_batches``);
rank 0 alone measures, verifies, prints and writes files, while the others wait at a barrier
(``on_main``). Batch norm stays per rank (torch's DDP default): each rank normalises with the statistics
of its own B / world samples, and DDP copies rank 0's running statistics to the others before each forward.

Failures: a rank that fails prints one ``error: rank R of N: ...`` line (fragile.core.cli) and exits non-zero;
torchrun then stops the others with SIGTERM, which they obey silently (``_stopped``), so the user reads
the failing rank's line and torchrun's summary, not one line per rank.
"""
import datetime
import os
import signal
import sys

import torch

from .cli import UserError

BACKENDS = ("auto", "nccl", "gloo")
TIMEOUT = datetime.timedelta(minutes=60)   # the longest a rank waits at a collective (rank 0 measuring, writing)
TEST_FAIL_RANK, TEST_FAIL_AT_STEP = "FRAGILE_TEST_FAIL_RANK", "FRAGILE_TEST_FAIL_AT_STEP"   # tests only

_state = {"rank": 0, "world_size": 1, "local_rank": 0, "device": None, "backend": None}


def launched():
    """True in a process started by torchrun (it sets these; a plain ``python`` run does not)."""
    return all(name in os.environ for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))


def rank():
    return _state["rank"]


def world_size():
    return _state["world_size"]


def is_main():
    return _state["rank"] == 0


def active():
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def choose_backend(backend, device):
    """auto = NCCL on GPUs, gloo on the CPU; NCCL cannot run on the CPU."""
    if backend not in BACKENDS:
        raise UserError(f"unknown backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    if backend == "auto":
        return "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl" and device.type != "cuda":
        raise UserError(f"--backend nccl needs GPUs, but the device is {device.type}: use --backend gloo "
                        f"(or auto) with --device cpu")
    return backend


def rank_device(device, local_rank):
    """On GPUs each rank takes cuda:LOCAL_RANK (torchrun's --nproc_per_node must not exceed the GPUs; every
    rank of the node checks the node's count, so that rank 0 reports it)."""
    if device.type != "cuda":
        return device
    available, on_node = torch.cuda.device_count(), int(os.environ.get("LOCAL_WORLD_SIZE", local_rank + 1))
    if max(on_node, local_rank + 1) > available:
        raise UserError(f"torchrun started {on_node} processes on this node but it has {available} GPU(s): "
                        f"pass --nproc_per_node {available} or fewer")
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def setup(backend, device, batch_sizes=()):
    """Join torchrun's process group and return this rank's device; without torchrun, ``device`` unchanged.

    Every rank checks the same flags, so a bad one is reported once, by rank 0 (the others are stopped)."""
    if not launched():
        choose_backend(backend, device)   # the flag is checked the same way with or without torchrun
        return device
    state = dict(rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]),
                 local_rank=int(os.environ["LOCAL_RANK"]))
    _state.update(state)
    signal.signal(signal.SIGTERM, _stopped)
    if not is_main():
        sys.stdout = open(os.devnull, "w")   # prints (and so logs, summaries) come from rank 0 only
    chosen = choose_backend(backend, device)
    for name, size in batch_sizes:
        if size % state["world_size"]:
            raise UserError(f"--{name} {size} does not split across {state['world_size']} processes: the global "
                            f"batch must be a multiple of the world size (torchrun --nproc_per_node x --nnodes)")
    device = rank_device(device, state["local_rank"])
    torch.distributed.init_process_group(chosen, timeout=TIMEOUT, device_id=device if device.type == "cuda" else None)
    _state.update(device=device, backend=chosen)
    print(f"torchrun: world size {state['world_size']}, backend {chosen}, rank 0 on {device}")
    return device


def cleanup():
    """Leave the process group (at the end of a successful run)."""
    if active():
        torch.distributed.destroy_process_group()


def barrier():
    if active():   # NCCL is told its device (it would guess otherwise); gloo needs none
        nccl = _state["backend"] == "nccl"
        torch.distributed.barrier(device_ids=[_state["device"].index] if nccl else None)


def on_main(fn, *args, **kwargs):
    """Run ``fn`` on rank 0 only, the other ranks waiting at a barrier until it is done.
    Returns its result on rank 0, None on the others."""
    result = fn(*args, **kwargs) if is_main() else None
    barrier()
    return result


def local_main_first(fn, *args, **kwargs):
    """``fn`` on each node's local rank 0 first, then on that node's other ranks, which wait at a barrier
    meanwhile: data staging and downloads happen once per node. Without torchrun, just ``fn``."""
    if _state["local_rank"] != 0:
        barrier()
    result = fn(*args, **kwargs)
    if _state["local_rank"] == 0:
        barrier()
    return result


def wrap(model, device):
    """The model in DistributedDataParallel for the training steps (measurements keep the plain module,
    which shares its weights); the model itself when not under torchrun."""
    if not active():
        return model
    from torch.nn.parallel import DistributedDataParallel
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def sum_across(*tensors):
    """Sum tensors over the ranks, in place (epoch totals: losses, correct counts, images seen)."""
    if active():
        for t in tensors:
            torch.distributed.all_reduce(t)
    return tensors


def any_across(flag, device):
    """True on every rank when ``flag`` is true on any: all ranks take the same branch, never one alone."""
    if not active():
        return bool(flag)
    t = torch.tensor(int(bool(flag)), device=device)
    torch.distributed.all_reduce(t)
    return bool(t.item())


def broadcast_from_main(obj):
    """Rank 0's (picklable) object on every rank: what rank 0 read from disk (a resume file) reaches nodes
    that do not have the file."""
    if not active():
        return obj
    box = [obj if is_main() else None]
    torch.distributed.broadcast_object_list(box, src=0, device=_state["device"])
    return box[0]


def fail_if_asked(step):
    """Tests only: FRAGILE_TEST_FAIL_RANK=R FRAGILE_TEST_FAIL_AT_STEP=S makes rank R fail at its training
    step S, so that tests can check how a dying rank ends the job."""
    if (os.environ.get(TEST_FAIL_RANK) == str(rank()) and launched()
            and os.environ.get(TEST_FAIL_AT_STEP) == str(step)):
        raise RuntimeError(f"injected failure at step {step} ({TEST_FAIL_RANK})")


def _stopped(signum, frame):
    """torchrun stops the surviving ranks with SIGTERM when one fails: leave quietly (atomic writes in
    progress remove their temporary file on the way out), the failing rank has said why."""
    raise SystemExit(128 + signum)
