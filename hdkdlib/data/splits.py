"""Versioned, class-balanced splits, stored as JSON files under data/splits/ and reused by every run.

A split depends only on the labels and a seed, never on the model or the global RNG state (the peers
draw theirs with randperm after building the model, so it silently changes with the architecture).
Each file records the seed, the protocol, a fingerprint of the labels it was drawn from and a checksum
of its indices; loading it against other labels, or a file edited by hand, stops with a clear error.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Dict, Optional

import numpy as np
import torch

from ..paths import atomic_write_text
from ..records import Unreadable, read_json
from .cifar import DatasetError

VERSION = 1


def labels_fingerprint(labels) -> str:
    return hashlib.sha256(np.asarray(labels, dtype="<i8").tobytes()).hexdigest()


def _checksum(split: Dict) -> str:
    payload = json.dumps({"train": split.get("train"), "val": split["val"]}, separators=(",", ":"))
    return hashlib.sha256(payload.encode()).hexdigest()


def _shuffle(indices: np.ndarray, seed: int, c: int) -> np.ndarray:
    """Order indices by a keyed hash of (seed, class, index): the same on every machine and with every
    numpy version (random generators' streams may change between versions; BLAKE2b does not)."""
    keys = [int.from_bytes(hashlib.blake2b(f"{seed}:{c}:{i}".encode(), digest_size=8).digest(), "little")
            for i in indices.tolist()]
    return indices[np.argsort(np.array(keys, dtype=np.uint64), kind="stable")]


def make_split(labels, *, val_per_class: int, train_per_class: Optional[int] = None, seed: int = 0,
               dataset: str = "") -> Dict:
    """For each class, its indices are shuffled by a keyed hash of (seed, class, index); the first
    `val_per_class` are held out for validation, the next `train_per_class` (all the rest if None)
    are for training. Index lists are sorted."""
    y = np.asarray(labels, dtype=np.int64)
    classes = np.unique(y)
    val, train = [], []
    for c in classes:
        idx = np.flatnonzero(y == c)
        need = val_per_class + (train_per_class or 0)
        if len(idx) < need:
            raise ValueError(f"class {c} has {len(idx)} images; the split needs {val_per_class} for validation"
                             + (f" + {train_per_class} for training" if train_per_class else "")
                             + ": lower --val-per-class" + (" or --n-per-class" if train_per_class else ""))
        if train_per_class is None and len(idx) <= val_per_class:
            raise ValueError(f"class {c} has {len(idx)} images, all held out for validation (val_per_class "
                             f"{val_per_class}): none is left for training; lower val_per_class")
        perm = _shuffle(idx, seed, int(c))
        val.append(perm[:val_per_class])
        train.append(perm[val_per_class:val_per_class + train_per_class] if train_per_class else perm[val_per_class:])
    split = {
        "version": VERSION, "dataset": dataset, "seed": seed,
        "protocol": "holdout" if train_per_class is None else f"limited({train_per_class})",
        "val_per_class": val_per_class, "train_per_class": train_per_class, "num_classes": len(classes),
        "n_total": len(y), "labels_sha256": labels_fingerprint(y),
        "val": sorted(int(i) for i in np.concatenate(val)),
        "train": sorted(int(i) for i in np.concatenate(train)),
    }
    split["checksum"] = _checksum(split)
    return split


def default_path(dataset: str, labels, val_per_class: int, train_per_class: Optional[int], seed: int,
                 folder: Optional[os.PathLike] = None) -> Path:
    """data/splits/<dataset>-<labels fingerprint>-val<v>-<full|n<t>>-seed<s>.json. The fingerprint keeps the
    split of a small fake copy from ever being taken for (or clashing with) the real dataset's."""
    from ..paths import project_root
    tag = "full" if train_per_class is None else f"n{train_per_class}"
    folder = Path(folder) if folder else project_root() / "data" / "splits"
    return folder / f"{dataset}-{labels_fingerprint(labels)[:8]}-val{val_per_class}-{tag}-seed{seed}.json"


# A split is drawn from the labels and its seed alone, so regenerating reproduces the committed one exactly.
_REGENERATE = ("if it is committed, restore it (git checkout -- {path}); otherwise delete it and it is drawn again "
               "from the labels and the seed, identical to before. Regenerating is safe unless runs already "
               "trained with a different file: those runs record the split's checksum in their config.json")


def load_or_create(labels, *, dataset: str, val_per_class: int, train_per_class: Optional[int] = None,
                   seed: int = 0, path: Optional[os.PathLike] = None, folder: Optional[os.PathLike] = None) -> Dict:
    """Read the split file if it exists (checking it against `labels`), else draw it and write it
    (to `path`, or under `folder` / data/splits/ with the default name)."""
    path = Path(path) if path is not None else default_path(dataset, labels, val_per_class, train_per_class, seed, folder)
    if path.is_file():
        try:
            split = read_json(path)
        except Unreadable as e:
            raise DatasetError(f"split file {path} is unreadable ({e.reason}); {_REGENERATE.format(path=path)}") from e
        if not isinstance(split, dict) or not isinstance(split.get("val"), list):
            raise DatasetError(f"split file {path} does not hold a split (a JSON object with index lists 'train' and "
                               f"'val'); {_REGENERATE.format(path=path)}")
        if split.get("checksum") != _checksum(split):
            raise DatasetError(f"split file {path}: its indices do not match its checksum (edited by hand?); "
                               f"{_REGENERATE.format(path=path)}")
        if split.get("labels_sha256") != labels_fingerprint(labels):
            raise DatasetError(f"split file {path} was drawn from other labels than this dataset's "
                               f"({split.get('n_total')} images then, {len(labels)} now): wrong data root, or a "
                               "different copy of the dataset. Use the dataset it was made for, or pass another path.")
        check_contents(split, len(labels), path)
        check_protocol(split, labels, val_per_class, train_per_class, seed, path)
        drawn = make_split(labels, val_per_class=val_per_class, train_per_class=train_per_class, seed=seed,
                           dataset=dataset)
        if (split["val"], split["train"]) != (drawn["val"], drawn["train"]):  # the draw is cheap: compare it
            raise DatasetError(f"split file {path} holds other images than seed {seed}'s draw (of another seed with "
                               f"its fields edited, or edited and checksummed again); {_REGENERATE.format(path=path)}")
        # the fields that describe it go into every run's config.json: they must be the draw's too
        differ = [k for k in DESCRIBED_BY if split.get(k) != drawn[k]]
        if differ:
            raise DatasetError(f"split file {path}: its {', '.join(f'{k} {split.get(k)!r}' for k in differ)} "
                               f"{'is' if len(differ) == 1 else 'are'} not its draw's "
                               f"({', '.join(repr(drawn[k]) for k in differ)}); {_REGENERATE.format(path=path)}")
        return split
    split = make_split(labels, val_per_class=val_per_class, train_per_class=train_per_class, seed=seed, dataset=dataset)
    atomic_write_text(path, json.dumps(split, separators=(",", ":")))  # never a half-written split file
    return split


DESCRIBED_BY = ("version", "dataset", "seed", "protocol", "val_per_class", "train_per_class", "num_classes", "n_total")


def check_contents(split: Dict, n_total: int, path) -> None:
    """The index lists themselves, whatever the checksum says (a file edited and re-checksummed, or written by
    other code): each a list of integer indices in [0, n_total), none twice, and no image in both train and
    val (leakage). One DatasetError naming the file, the list and the first offending entry."""
    fix = _REGENERATE.format(path=path)
    seen = {}
    for name in ("train", "val"):
        values = split.get(name)
        if not isinstance(values, list):
            raise DatasetError(f"split file {path}: '{name}' must be a list of image indices, not "
                               f"{type(values).__name__}; {fix}")
        bad = [v for v in values if not isinstance(v, int) or isinstance(v, bool)][:1]  # a null entry is one too
        if bad:
            raise DatasetError(f"split file {path}: '{name}' holds {bad[0]!r}, not an integer index; {fix}")
        bad = next((v for v in values if not 0 <= v < n_total), None)
        if bad is not None:
            raise DatasetError(f"split file {path}: '{name}' holds index {bad}, outside [0, {n_total - 1}] for "
                               f"this dataset's {n_total} images; {fix}")
        counts = np.bincount(np.asarray(values, dtype=np.int64), minlength=n_total)
        if counts.max(initial=0) > 1:
            raise DatasetError(f"split file {path}: '{name}' holds index {int(np.argmax(counts > 1))} more than once; "
                               f"{fix}")
        seen[name] = counts > 0
    both = np.flatnonzero(seen["train"] & seen["val"])
    if len(both):
        raise DatasetError(f"split file {path}: index {int(both[0])} is in both 'train' and 'val' (validation images "
                           f"would leak into training); {fix}")


def check_protocol(split: Dict, labels, val_per_class: int, train_per_class: Optional[int], seed: int, path) -> None:
    """The split is the one asked for: its recorded seed and sizes, and the held-out and training images it holds per
    class (what the sizes draw from each class's images). A file of another protocol under this protocol's name
    (copied, or its fields edited; the checksum covers the indices only) would train on other images silently."""
    y = np.asarray(labels, dtype=np.int64)
    available = np.bincount(y)
    val = np.minimum(available, val_per_class)
    train = available - val if train_per_class is None else np.minimum(available - val, train_per_class)
    held = (np.bincount(y[split["val"]], minlength=len(available)), np.bincount(y[split["train"]], minlength=len(available)))
    recorded = (split.get("seed"), split.get("val_per_class"), split.get("train_per_class"))
    if recorded != (seed, val_per_class, train_per_class) or not (np.array_equal(held[0], val)
                                                                  and np.array_equal(held[1], train)):
        raise DatasetError(
            f"split file {path} holds another protocol's split (seed {recorded[0]}, {recorded[1]} held-out and "
            f"{recorded[2] or 'all other'} training images per class; per class it holds {int(held[0].max())} and "
            f"{int(held[1].max())} at most) where this run asks seed {seed}, {val_per_class} held-out and "
            f"{train_per_class or 'all other'} training images per class: give the --split-dir of this protocol's "
            f"runs, or move the file away and it is drawn again")


def as_tensors(split: Dict):
    return torch.tensor(split["train"], dtype=torch.long), torch.tensor(split["val"], dtype=torch.long)
