"""The epoch order and its sharding, shared by the GPU and host loaders: every rank draws the same plan from a
generator seeded with (seed, epoch), and takes its slice of each global batch, so W ranks with batch B see
exactly what one process with batch W*B sees, and a resumed run can start at any batch."""
from __future__ import annotations

import torch


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of one epoch's draws (its order; an image folder's crops derive theirs from it)."""
    return seed * 1_000_003 + epoch


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """A host generator: its numbers are the same on every machine, whatever device the run trains on."""
    return torch.Generator().manual_seed(epoch_seed(seed, epoch))


def num_batches(n: int, batch_size: int, world_size: int, drop_last: bool) -> int:
    """Global batches in an epoch of n items (a last, partial one unless drop_last)."""
    g = batch_size * world_size
    return n // g if drop_last else -(-n // g)


def rank_slice(b: int, batch_size: int, rank: int, world_size: int) -> slice:
    """This rank's positions of global batch b in the epoch order."""
    first = b * batch_size * world_size + rank * batch_size
    return slice(first, first + batch_size)
