"""What a training run reads: the dataset named by the settings, its versioned split, and the loaders.

    build_data(cfg, device, rank, world_size) -> DataBundle(train, val_stream, val, test, ...)

CIFAR-style data (cifar10, cifar100, folder32, synthetic) are held on the device as uint8 and augmented there
(GpuLoader); ImageNet-style folders stream through a DataLoader (HostLoader), sharded across ranks with the
same per-epoch seeding. Under torchrun each rank evaluates its block of the validation and test splits, and
hdkdlib.evaluation gathers the blocks. The held-out validation split and any limited-data subset come from split files
(hdkdlib.data.splits); the test split is only ever evaluated.
"""
from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict

import torch

from ..distributed import evaluation_block
from ..paths import runs_dir
from . import splits
from .cifar import SPECS as CIFAR_SPECS, DatasetError, load as load_cifar
from .fake import synthetic_images
from .folder import IMAGENET_MEAN, IMAGENET_STD, check_disjoint, check_sizes, folder_to_tensor, image_folder
from .gpu import GpuLoader
from .order import epoch_generator, epoch_seed, num_batches, rank_slice


@dataclass
class DataBundle:
    train: object          # .batches(epoch, start) and len(): the augmented training stream
    val_stream: object     # .batch_at(epoch, b): held-out batches for the weight update (never augmented)
    val: object            # evaluation batches of the held-out split
    test: object           # evaluation batches of the test split
    num_classes: int
    input_shape: tuple
    split: Dict = field(repr=False, default_factory=dict)
    mean: tuple = ()
    std: tuple = ()
    fingerprint: Dict = field(default_factory=dict)  # what the run's config.json records of the data it saw


def pixels_fingerprint(root, *tensors) -> Dict:
    """The decoded images and labels themselves (CIFAR, folder32, synthetic): other images under the same class
    names and counts have another fingerprint, a moved copy the same."""
    h = hashlib.sha256()
    for t in tensors:
        t = t.contiguous()
        h.update(f"{t.dtype} {tuple(t.shape)}\n".encode())
        h.update(t.view(torch.uint8).numpy().data if t.dtype != torch.uint8 else t.numpy().data)
    return {"root": str(root), "of": "decoded pixels and labels", "sha256": h.hexdigest()}


def files_fingerprint(root, *image_trees, head_bytes: int = 4096) -> Dict:
    """An image tree by its files (path under root, size, first 4 KiB, label), without decoding a million
    images: other images change it (their encoded pixels begin within the first bytes, and same-sized files are
    common), a copy of the tree elsewhere does not."""
    def entry(sample):
        path, label = sample
        with open(path, "rb") as f:
            head = hashlib.sha256(f.read(head_bytes)).hexdigest()
        return os.fsencode(f"{os.path.relpath(path, root)}\0{os.path.getsize(path)}\0{head}\0{label}\n")
    h = hashlib.sha256()
    with ThreadPoolExecutor(8) as pool:  # file opens dominate on network file systems
        for tree in image_trees:
            for line in pool.map(entry, tree.samples):
                h.update(line)
    return {"root": str(root), "of": f"image files (path, size, first {head_bytes} bytes, label)",
            "sha256": h.hexdigest()}


def _tensor_data(cfg):
    root = Path(cfg.data_root)
    if cfg.dataset in ("cifar10", "cifar100"):
        x, y, _ = load_cifar(root, cfg.dataset, train=True, download_if_missing=cfg.download)
        xt, yt, _ = load_cifar(root, cfg.dataset, train=False, download_if_missing=cfg.download)
        spec = CIFAR_SPECS[cfg.dataset]
        return x, y, xt, yt, spec["num_classes"], spec["mean"], spec["std"]
    if cfg.dataset == "synthetic":
        x, y = synthetic_images(6000, num_classes=10, seed=0)        # same classes (pattern_seed 0),
        xt, yt = synthetic_images(1000, num_classes=10, seed=1)      # other samples for the test set
        return x, y, xt, yt, 10, None, None
    test_split = "test" if (root / "test").is_dir() else "val"
    x, y, classes = folder_to_tensor(root, "train")
    xt, yt, _ = folder_to_tensor(root, test_split)
    if xt.shape[1:] != x.shape[1:]:  # a network that takes any size would be tested at another resolution
        raise DatasetError(f"{root / test_split} holds {tuple(xt.shape[2:])} images, {root / 'train'} "
                           f"{tuple(x.shape[2:])}: resize one tree to the other's size")
    check_disjoint(root, ("train", test_split))
    return x, y, xt, yt, len(classes), None, None


def _refuse_constant_channel(images: torch.Tensor, cfg) -> None:
    """A channel of one value in every training image has standard deviation 0: normalised by it, every input is
    NaN or infinite, and training stops on a non-finite loss that reads like a learning-rate problem."""
    if images.numel() == 0:
        return
    flat = images.transpose(0, 1).reshape(images.shape[1], -1)
    low, high = flat.amin(1), flat.amax(1)
    for c in range(len(low)):
        if low[c] == high[c]:
            name = f" ({('red', 'green', 'blue')[c]})" if len(low) == 3 else ""
            raise DatasetError(f"{cfg.dataset} data in {Path(cfg.data_root).resolve()}: channel {c}{name} is "
                               f"{int(low[c])} in every pixel of the {len(images)} training images, so its standard "
                               "deviation is 0 and the normalised inputs would be NaN; check the data (a channel of "
                               "one value in every image carries nothing to learn)")


def build_data(cfg, device, rank: int = 0, world_size: int = 1) -> DataBundle:
    if cfg.dataset == "folder":
        return _folder_data(cfg, device, rank, world_size)
    x, y, xt, yt, k, mean, std = _tensor_data(cfg)
    val_per_class = cfg.val_per_class or max(1, 5000 // k)
    split_dir = cfg.split_dir or (str(runs_dir() / "splits") if cfg.dataset == "synthetic" else None)
    split = splits.load_or_create(y.numpy(), dataset=cfg.dataset, val_per_class=val_per_class,
                                       train_per_class=cfg.n_per_class or None, seed=cfg.split_seed,
                                       folder=split_dir)  # generated data: its splits are not versioned
    tr, va = splits.as_tensors(split)
    if mean is None:  # statistics of the training images themselves (folder32, synthetic)
        _refuse_constant_channel(x[tr], cfg)
        pixels = x[tr].float() / 255
        mean, std = tuple(pixels.mean((0, 2, 3)).tolist()), tuple(pixels.std((0, 2, 3)).tolist())
    common = dict(mean=mean, std=std, device=device, channels_last=cfg.channels_last)
    if len(tr) < cfg.batch_size * world_size:
        raise ValueError(f"{len(tr)} training images but a global batch of {cfg.batch_size * world_size}: "
                         "lower batch_size or use more data")
    train = GpuLoader(x[tr], y[tr], cfg.batch_size, train=True, seed=cfg.seed, rank=rank,
                           world_size=world_size, **common)
    stream = GpuLoader(x[va], y[va], min(cfg.batch_size, len(va) // world_size), train=True, pad=0, flip=False,
                            seed=cfg.seed + 1, rank=rank, world_size=world_size, **common)
    val = GpuLoader(x[va], y[va], cfg.eval_batch_size, train=False, rank=rank, world_size=world_size, **common)
    test = GpuLoader(xt, yt, cfg.eval_batch_size, train=False, rank=rank, world_size=world_size, **common)
    return DataBundle(train, stream, val, test, k, tuple(x.shape[1:]), split, tuple(mean), tuple(std),
                      pixels_fingerprint(cfg.data_root, x, y, xt, yt))


class _PlacedSamples(torch.utils.data.Dataset):
    """The images at `items`, each augmented under torch's RNG seeded from (seed, epoch, its position in the epoch
    order): a crop depends on where the image sits in the epoch, not on which worker decodes it or on how many
    batches this loader ran before, so a run stopped mid-epoch resumes with the same crops."""

    def __init__(self, dataset, items, positions, seed, epoch):
        self.dataset, self.items, self.positions = dataset, items, positions
        self.base = epoch_seed(seed, epoch) * 1_000_003

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        # the transforms draw from the CPU generator alone: seeding it (not torch.manual_seed, which would reseed
        # every GPU's generator too, unrestored, under workers=0) leaves the caller's RNG as it was
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed((self.base + self.positions[i]) % 2 ** 63)
            return self.dataset[self.items[i]]


class HostLoader:
    """Image-folder batches through a DataLoader, sharded across ranks like the GpuLoader."""

    def __init__(self, dataset, indices, batch_size, *, train, seed, workers, device, rank, world_size,
                 channels_last):
        indices = torch.as_tensor(indices)
        self.sharded = not train and world_size > 1  # evaluation: this rank's block, gathered by evaluation
        if self.sharded:
            indices, rank, world_size = indices[evaluation_block(len(indices), rank, world_size)], 0, 1
        self.dataset, self.indices, self.batch_size = dataset, indices, batch_size
        self.train, self.seed, self.workers, self.device = train, seed, workers, device
        self.rank, self.world_size, self.channels_last = rank, world_size, channels_last

    def __len__(self):
        return num_batches(len(self.indices), self.batch_size, self.world_size, drop_last=self.train)

    def _order(self, epoch):
        if not self.train:
            return self.indices
        return self.indices[torch.randperm(len(self.indices), generator=epoch_generator(self.seed, epoch))]

    def batches(self, epoch, start=0):
        order = self._order(epoch)
        slices = [rank_slice(b, self.batch_size, self.rank, self.world_size) for b in range(start, len(self))]
        if not slices:  # resumed after the epoch's last step (a stop before its metrics line): nothing left
            return
        items = torch.cat([order[s] for s in slices]).tolist()
        positions = [p for s in slices for p in range(s.start, min(s.stop, len(order)))]
        samples = _PlacedSamples(self.dataset, items, positions, self.seed, epoch) if self.train else \
            torch.utils.data.Subset(self.dataset, items)
        # its own generator: the loader's base seed is not drawn from the run's RNG (dropout, stochastic depth)
        loader = torch.utils.data.DataLoader(samples, batch_size=self.batch_size, num_workers=self.workers,
                                             pin_memory=self.device.type == "cuda",
                                             generator=torch.Generator().manual_seed(0))
        for x, y in loader:
            x = x.to(self.device, non_blocking=True)
            yield (x.contiguous(memory_format=torch.channels_last) if self.channels_last else x), y.to(self.device)

    def batch_at(self, epoch, b):
        """Batch b of `epoch`; consecutive calls share one DataLoader (its workers start once per epoch)."""
        if getattr(self, "_cursor", None) != (epoch, b):
            self._iterator = self.batches(epoch, start=b)
        self._cursor = (epoch, b + 1)
        return next(self._iterator)

    def __iter__(self):
        return self.batches(0)


def _folder_data(cfg, device, rank, world_size) -> DataBundle:
    root = Path(cfg.data_root)
    train_aug = image_folder(root, "train")
    train_plain = image_folder(root, "train", train=False)
    test = image_folder(root, "test" if (root / "test").is_dir() else "val", train=False)
    check_disjoint(root, ("train", "test" if (root / "test").is_dir() else "val"))
    k = len(train_aug.classes)
    split = splits.load_or_create(train_aug.targets, dataset=f"folder-{root.name}",
                                       val_per_class=cfg.val_per_class or 50, train_per_class=cfg.n_per_class or None,
                                       seed=cfg.split_seed, folder=cfg.split_dir or None)
    check_sizes([test.samples[i][0] for i in range(len(test))] + [train_plain.samples[i][0] for i in split["val"]])
    common = dict(seed=cfg.seed, workers=cfg.workers, device=device, channels_last=cfg.channels_last)
    if len(split["train"]) < cfg.batch_size * world_size:
        raise ValueError(f"{len(split['train'])} training images but a global batch of {cfg.batch_size * world_size}: "
                         "lower batch_size or use more data")
    train = HostLoader(train_aug, split["train"], cfg.batch_size, train=True, rank=rank, world_size=world_size, **common)
    # the weight update's held-out batches: as large as the training batch, or all the held-out images there are
    stream = HostLoader(train_plain, split["val"], min(cfg.batch_size, len(split["val"]) // world_size), train=True,
                        rank=rank, world_size=world_size, **{**common, "seed": cfg.seed + 1})
    val = HostLoader(train_plain, split["val"], cfg.eval_batch_size, train=False, rank=rank, world_size=world_size,
                     **common)
    test_all = HostLoader(test, range(len(test)), cfg.eval_batch_size, train=False, rank=rank,
                          world_size=world_size, **common)
    return DataBundle(train, stream, val, test_all, k, (3, 224, 224), split, IMAGENET_MEAN, IMAGENET_STD,
                      files_fingerprint(root, train_aug, test))
