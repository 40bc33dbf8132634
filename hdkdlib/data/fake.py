"""Small fake datasets written in the exact on-disk formats, so the real loaders run offline."""
from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Sequence, Tuple

import numpy as np
import torch
from PIL import Image

from ..paths import atomic_write_text
from .cifar import FAKE_MANIFEST, SPECS, _expected_md5, _md5, folder


def _class_colours(num_classes: int, pattern_seed: int) -> np.ndarray:
    """Each class's mean colour, [num_classes, 3, 1, 1]: one draw that a training and a test set share."""
    return np.random.default_rng(pattern_seed).integers(40, 216, size=(num_classes, 3, 1, 1))


def _random_images(n: int, num_classes: int, seed: int, pattern_seed: int) -> Tuple[np.ndarray, np.ndarray]:
    """Images that carry their class (its colour, fixed by `pattern_seed`, plus noise drawn from `seed`), so quick
    runs can learn, and what they learn holds on a test set drawn with the same pattern_seed."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % num_classes
    rng.shuffle(labels)
    images = _class_colours(num_classes, pattern_seed)[labels] + rng.normal(0, 40, size=(n, 3, 32, 32))
    return np.clip(images, 0, 255).astype(np.uint8), labels.astype(np.int64)


def write_fake_cifar(root, name: str = "cifar100", n_train: int = 500, n_test: int = 100, seed: int = 0,
                     train=None, test=None) -> Path:
    """Write `name` in torchvision's layout (pickled batches of [N, 3072] uint8 rows) under root.

    train/test: optional (uint8 [N, 3, 32, 32], int labels [N]) arrays to write instead of random ones."""
    spec = SPECS[name]
    cls, base = spec["cls"], folder(root, name)
    ours = [f for f, _ in cls.train_list] + [cls.test_list[0][0], cls.meta["filename"]]
    if any((base / f).exists() for f in ours) and not (base / FAKE_MANIFEST).is_file():
        # the manifest written below would make the loader take fake files for the real ones in their place
        raise FileExistsError(f"{base} holds {name} files that no fake writer wrote (no {FAKE_MANIFEST}): write the "
                              "fake data into another folder")
    official = _expected_md5(root, name)  # real files copied in beside a manifest (after a stopped write, say)
    real = [f for f in ours if (base / f).is_file() and _md5(base / f) == official[f]]
    if real:
        raise FileExistsError(f"{base / real[0]} is the official {name} file: fake data is never written over it; "
                              "write the fake data into another folder")
    base.mkdir(parents=True, exist_ok=True)
    # An empty manifest first: a write stopped half-way leaves the folder marked as ours (written again by the
    # next call) and accepted by no loader (its files are listed nowhere).
    atomic_write_text(base / FAKE_MANIFEST, "{}")
    k = spec["num_classes"]
    x_train, y_train = (np.asarray(a) for a in train) if train is not None else _random_images(n_train, k, seed, seed)
    x_test, y_test = (np.asarray(a) for a in test) if test is not None else _random_images(n_test, k, seed + 1, seed)
    n_train = len(x_train)
    train_files = [f for f, _ in cls.train_list]
    parts = np.array_split(np.arange(n_train), len(train_files))
    batches = [(f, x_train[idx], y_train[idx]) for f, idx in zip(train_files, parts)]
    batches.append((cls.test_list[0][0], x_test, y_test))
    for f, x, y in batches:
        entry = {"batch_label": f"fake {f}", "data": x.reshape(len(x), -1), spec["label_key"]: y.tolist(),
                 "filenames": [f"img_{i}.png" for i in range(len(x))]}
        if name == "cifar100":
            entry["coarse_labels"] = (y // 5).tolist()
        with open(base / f, "wb") as fh:
            pickle.dump(entry, fh, protocol=2)
    meta = {spec["names_key"]: [f"class_{i:03d}" for i in range(k)]}
    if name == "cifar100":
        meta["coarse_label_names"] = [f"super_{i:02d}" for i in range(20)]
    with open(base / cls.meta["filename"], "wb") as fh:
        pickle.dump(meta, fh, protocol=2)
    # The loader accepts files that are not the official release only when listed here with their MD5
    # (and reads them with its restricted unpickler all the same).
    names = [f for f, _, _ in batches] + [cls.meta["filename"]]
    atomic_write_text(base / FAKE_MANIFEST, json.dumps({f: _md5(base / f) for f in names}, indent=1))
    return base


def write_fake_image_folder(root, classes: Sequence[str] = ("cat", "dog", "ship"), n_per_class: Tuple[int, int] = (8, 2),
                            size: int = 32, ext: str = ".png", seed: int = 0) -> Path:
    """root/{train,val}/<class>/<i><ext>: n_per_class = (train, val) images per class. PNG is lossless
    (exact round trips); '.jpg' matches the ImageNet layout."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    colours = rng.integers(0, 256, size=(len(classes), 3))  # a class's colour is the same in both splits
    for split, n in zip(("train", "val"), n_per_class):
        for cls_name, base in zip(classes, colours):
            d = root / split / cls_name
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                img = np.clip(base + rng.normal(0, 30, size=(size, size, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(img).save(d / f"{i:05d}{ext}")
    return root


def synthetic_images(n: int, num_classes: int = 10, difficulty: float = 0.5, size: int = 32, seed: int = 0,
                     pattern_seed: int = 0):
    """A procedural, learnable image dataset for demos: (uint8 [n, 3, size, size], int64 labels).

    `pattern_seed` fixes the classes (the same for a training and a test set); `seed` draws the samples.

    Each class is a smooth random pattern (a few low-frequency sinusoids per channel); a sample is its
    class pattern, randomly shifted, mixed with another class's pattern by `difficulty` / 2 and covered
    in noise of strength `difficulty`. difficulty 0: trivially separable; 1: hard."""
    if not 0 <= difficulty <= 1:
        raise ValueError(f"difficulty must lie in [0, 1], got {difficulty}")
    g = torch.Generator().manual_seed(pattern_seed)
    coords = torch.linspace(0, 2 * np.pi, size)
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    freq = torch.randint(1, 4, (num_classes, 3, 2, 2), generator=g).float()
    phase = torch.rand(num_classes, 3, 2, generator=g) * 2 * np.pi
    patterns = (torch.sin(freq[..., 0, 0, None, None] * xx + freq[..., 0, 1, None, None] * yy + phase[..., 0, None, None])
                + torch.sin(freq[..., 1, 0, None, None] * xx - freq[..., 1, 1, None, None] * yy + phase[..., 1, None, None])) / 2
    g = torch.Generator().manual_seed(1_000_003 + seed)
    labels = torch.arange(n) % num_classes
    labels = labels[torch.randperm(n, generator=g)]
    other = (labels + torch.randint(1, num_classes, (n,), generator=g)) % num_classes
    x = (1 - difficulty / 2) * patterns[labels] + (difficulty / 2) * patterns[other]
    shifts = torch.randint(-size // 8, size // 8 + 1, (n, 2), generator=g)
    x = torch.stack([torch.roll(img, (int(s[0]), int(s[1])), dims=(1, 2)) for img, s in zip(x, shifts)])
    x = x + difficulty * torch.randn(x.shape, generator=g)
    return ((x.clamp(-1.5, 1.5) + 1.5) / 3 * 255).round().to(torch.uint8), labels
