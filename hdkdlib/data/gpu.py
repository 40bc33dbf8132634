"""A data loader that lives on the GPU (airbench style): the whole uint8 training set on the device,
random crop with zero padding, horizontal flip and normalisation done there in batch.

All randomness of an epoch (order, crop offsets, flips) is drawn up front from a generator seeded with
(seed, epoch), so batches are reproducible and a resumed run can start mid-epoch at any batch. It is drawn on
the host and then moved (three small tensors an epoch): a CUDA generator gives other numbers for the same seed,
and a seed must mean the same batches on a CPU and a GPU for their runs to pair in one study.
"""
from __future__ import annotations

import math
from typing import Iterator, Sequence, Tuple

import torch
import torch.nn.functional as F

from ..distributed import evaluation_block
from .order import epoch_generator, num_batches, rank_slice


class GpuLoader:
    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int, *, mean: Sequence[float],
                 std: Sequence[float], train: bool = True, pad: int = 4, flip: bool = True, seed: int = 0,
                 drop_last: bool = None, device=None, channels_last: bool = False, rank: int = 0, world_size: int = 1):
        # Evaluation under torchrun: each rank takes its block of the split, and evaluation gathers the blocks
        self.sharded = not train and world_size > 1
        if self.sharded:
            block = evaluation_block(len(labels), rank, world_size)
            images, labels, rank, world_size = images[block], labels[block], 0, 1
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be uint8 [N, 3, H, W], got {images.dtype} {list(images.shape)}")
        if len(images) != len(labels) or len(images) == 0:
            raise ValueError(f"{len(images)} images and {len(labels)} labels: need the same, non-zero number")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if len(mean) != 3 or len(std) != 3 or not all(math.isfinite(v) for v in (*mean, *std)) or min(std) <= 0:
            # a std of 0 (a channel of one value) makes every normalised input NaN or infinite
            raise ValueError(f"mean and std must be 3 finite values per channel, std > 0; got mean {tuple(mean)}, "
                             f"std {tuple(std)}")
        device = torch.device(device) if device is not None else images.device
        self.device, self.batch_size, self.train, self.seed = device, batch_size, train, seed
        self.pad, self.flip = (pad if train else 0), (flip and train)
        self.drop_last = train if drop_last is None else drop_last
        self.labels = labels.to(device, torch.long)
        self.images = F.pad(images.to(device), (self.pad,) * 4) if self.pad else images.to(device)
        self.size = images.shape[-2:]
        self.mean = torch.tensor(mean, device=device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(std, device=device).view(1, 3, 1, 1) * 255
        self.channels_last = channels_last
        # Distributed training: every rank takes its slice of each global batch of the same plan (data/order.py).
        self.rank, self.world_size = rank, world_size
        self.epoch = 0

    def __len__(self) -> int:
        return num_batches(len(self.labels), self.batch_size, self.world_size, self.drop_last)

    def epoch_plan(self, epoch: int):
        """(order, crop offsets [N, 2], flips [N]) of `epoch`; identical for the same seed and epoch."""
        n = len(self.labels)
        if not self.train:
            return torch.arange(n, device=self.device), None, None
        g = epoch_generator(self.seed, epoch)  # on the host whatever the device (module docstring)
        order = torch.randperm(n, generator=g)
        offsets = torch.randint(0, 2 * self.pad + 1, (n, 2), generator=g)
        flips = torch.rand(n, generator=g) < 0.5
        return order.to(self.device), offsets.to(self.device), flips.to(self.device)

    def augment(self, idx: torch.Tensor, offsets, flips) -> torch.Tensor:
        x = self.images[idx]
        if self.pad:
            h, w = self.size
            rows = offsets[:, 0, None] + torch.arange(h, device=self.device)  # [n, h]
            cols = offsets[:, 1, None] + torch.arange(w, device=self.device)  # [n, w]
            n = len(idx)
            x = x[torch.arange(n, device=self.device)[:, None, None, None], torch.arange(3, device=self.device)[None, :, None, None],
                  rows[:, None, :, None], cols[:, None, None, :]]
        if self.flip:
            x = torch.where(flips[:, None, None, None], x.flip(3), x)
        x = (x.float() - self.mean) / self.std
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def batches(self, epoch: int, start: int = 0) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        for b in range(start, len(self)):
            yield self.batch_at(epoch, b)

    def batch_at(self, epoch: int, b: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """Batch b of `epoch` (the epoch plan is cached, so stepping through it costs one plan per epoch)."""
        if getattr(self, "_plan_epoch", None) != epoch:
            self._plan, self._plan_epoch = self.epoch_plan(epoch), epoch
        order, offsets, flips = self._plan
        sl = rank_slice(b, self.batch_size, self.rank, self.world_size)
        return self.augment(order[sl], offsets[sl] if offsets is not None else None,
                            flips[sl] if flips is not None else None), self.labels[order[sl]]

    def __iter__(self):
        yield from self.batches(self.epoch)
        self.epoch += 1
