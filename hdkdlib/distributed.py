"""Devices and processes: which device a run uses, the process group under torchrun, and averages over ranks.

    rank, world_size, device = distributed.setup("auto")   # one process: (0, 1, cuda or cpu)
    ...
    distributed.teardown(wait=True)                          # every rank waits for the others, then leaves

A single process never initialises a process group; under torchrun (WORLD_SIZE > 1) the group is gloo on
CPUs and NCCL on GPUs, one GPU per local rank.
"""
from __future__ import annotations

import os
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
        raise ValueError(f"unknown device {name!r}: use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' asked for, but no CUDA device is available: use --device cpu (or auto)")
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
        for t in tensors:
            dist.all_reduce(t)
            t.div_(dist.get_world_size())
    return tensors
