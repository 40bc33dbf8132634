"""Devices and processes: which device a run uses, the process group under torchrun, and averages over ranks.

    rank, world_size, device = distributed.setup("auto")   # one process: (0, 1, cuda or cpu)
    start, stop = distributed.shard(n, rank, world_size)     # this rank's block of an evaluation split
    probs = distributed.gather_rows(local_probs, dim=1)      # the blocks again, in order: as one process
    ...
    distributed.teardown(wait=True)                          # every rank waits for the others, then leaves

A single process never initialises a process group; under torchrun (WORLD_SIZE > 1) the group is gloo on
CPUs and NCCL on GPUs, one GPU per local rank.
"""
from __future__ import annotations

import os
import time
from contextlib import contextmanager
from typing import List, Tuple

import torch
import torch.distributed as dist


def resolve_device(name: str) -> torch.device:
    """'auto' (CUDA when available), 'cpu', 'cuda' or 'cuda:N', checked: a clear error names the valid ones."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda") or (device.type == "cpu" and device.index is not None):
        raise ValueError(f"unknown device {name!r}: use auto, cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' asked for, but no CUDA device is available: use --device cpu (or auto)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"device {name!r}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                         f"cuda:0..cuda:{torch.cuda.device_count() - 1}")
    return device


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def setup(device_name: str = "auto") -> Tuple[int, int, torch.device]:
    """(rank, world size, device); joins the process group when started by torchrun."""
    rank, world_size = 0, 1
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        backend = "nccl" if torch.cuda.is_available() and device_name != "cpu" else "gloo"
        if not dist.is_initialized():
            dist.init_process_group(backend)
        rank, world_size = dist.get_rank(), dist.get_world_size()
    device = resolve_device(device_name)
    if device.type == "cuda" and world_size > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    return rank, world_size, device


def barrier() -> None:
    if active():
        dist.barrier()


def teardown(wait: bool) -> None:
    """Leave the process group. wait=True (a rank that finished well): first wait for the others, since a rank
    tearing down its gloo group while rank 0 still evaluates was seen to abort once in CI (std::terminate in the
    idle rank). A failing rank does not wait: torchrun ends the others."""
    if dist.is_available() and dist.is_initialized():
        if wait:
            dist.barrier()
        dist.destroy_process_group()


def mean_over_ranks(tensors: List[torch.Tensor]) -> List[torch.Tensor]:
    """Average each tensor across ranks, in place (the identity in a single process)."""
    if active():
        for t in sum_over_ranks(tensors):
            t.div_(dist.get_world_size())
    return tensors


def sum_over_ranks(tensors: List[torch.Tensor]) -> List[torch.Tensor]:
    """Sum each tensor across ranks, in place (the identity in a single process)."""
    if active():
        for t in tensors:
            moved = t.to(_collective_device())  # t itself when it already lives there (no copy on the hot path)
            dist.all_reduce(moved)
            if moved is not t:
                t.copy_(moved)
    return tensors


def shard(n: int, rank: int, world_size: int) -> Tuple[int, int]:
    """This rank's contiguous block [start, stop) of n items: sizes differ by at most one (the first n % world_size
    blocks one longer), so no rank is empty while n >= world_size (ceil-sized blocks left the last ranks empty: 5
    items on 4 ranks). Consecutive blocks in rank order are the items in order, so gathering restores it."""
    size, longer = divmod(n, world_size)
    start = rank * size + min(rank, longer)
    return start, start + size + (rank < longer)


def evaluation_block(n: int, rank: int, world_size: int) -> slice:
    """This rank's share of an n-image evaluation split (shard), as a slice; every rank must get at least one."""
    if n < world_size:
        raise ValueError(f"{n} evaluation images cannot be shared by {world_size} processes")
    return slice(*shard(n, rank, world_size))


def gather_rows(t: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """Every rank's tensor concatenated along dim in rank order; the blocks may differ in length along dim
    (padded for the collective, trimmed after). The identity in a single process."""
    if not active():
        return t
    home, t = t.device, t.to(_collective_device())
    world = dist.get_world_size()
    sizes = torch.zeros(world, dtype=torch.long, device=t.device)
    sizes[dist.get_rank()] = t.shape[dim]
    dist.all_reduce(sizes)
    longest = int(sizes.max())
    pad = list(t.shape)
    pad[dim] = longest - t.shape[dim]
    padded = torch.cat([t, t.new_zeros(pad)], dim).contiguous()
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([p.narrow(dim, 0, int(k)) for p, k in zip(parts, sizes)], dim).to(home)


def _collective_device() -> torch.device:
    """NCCL moves only CUDA tensors; gloo CPU ones."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


@contextmanager
def cpu_threads(n: int):
    """torch's CPU thread count set to n for the block, then restored (n = 0: left as it is)."""
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


SMALL_STEP_FLOPS = 1e8  # forward FLOPs per step below which torch's operations are too small to share


def idle_cores(seconds: float = 0.2) -> float:
    """Cores idle over the next `seconds` (Linux /proc/stat; elsewhere: all of them)."""
    def sample():
        with open("/proc/stat") as f:
            values = [int(v) for v in f.readline().split()[1:]]
        return values[3] + values[4], sum(values)  # idle + iowait, total
    try:
        (idle0, total0), _, (idle1, total1) = sample(), time.sleep(seconds), sample()
    except (OSError, ValueError, IndexError):
        return float(os.cpu_count() or 1)
    return (os.cpu_count() or 1) * (idle1 - idle0) / max(total1 - total0, 1)


def auto_threads(step_flops: float) -> int:
    """CPU threads for a training run (its `threads` 0). One for a small model: its operations are too small to
    share, and on a busy machine a second thread makes each step wait for a core. Otherwise the cores idle now,
    at most torch's default. benchmarks/threads.py measured both (benchmarks/RESULTS.md)."""
    return 1 if step_flops < SMALL_STEP_FLOPS else idle_threads()


def idle_threads() -> int:
    """The cores idle now as a thread count: at least 1, at most torch's default."""
    return max(1, min(torch.get_num_threads(), round(idle_cores())))
