"""CIFAR-10 / CIFAR-100 in torchvision's on-disk format, read into uint8 tensors.

File names, URLs and checksums come from torchvision's dataset classes; the download goes
through torchvision's download utilities. The files are read here (not through the torchvision
classes) so that the small fake copies the tests write, which cannot match the real checksums,
exercise the same reading code, and so that a damaged file is reported by name.
"""
from __future__ import annotations

import pickle
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
import torch
from torchvision.datasets import CIFAR10, CIFAR100
from torchvision.datasets.utils import check_integrity, download_and_extract_archive

SPECS: Dict[str, dict] = {
    "cifar10": dict(cls=CIFAR10, num_classes=10, label_key="labels", names_key="label_names",
                    mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616)),
    "cifar100": dict(cls=CIFAR100, num_classes=100, label_key="fine_labels", names_key="fine_label_names",
                     mean=(0.5071, 0.4867, 0.4408), std=(0.2675, 0.2565, 0.2761)),
}


class DatasetError(RuntimeError):
    """A dataset file is missing, damaged or does not match what was expected."""


def _spec(name: str) -> dict:
    if name not in SPECS:
        raise ValueError(f"unknown CIFAR dataset {name!r}; valid: {', '.join(SPECS)}")
    return SPECS[name]


def folder(root, name: str) -> Path:
    return Path(root) / _spec(name)["cls"].base_folder


def download(root, name: str) -> Path:
    """Download and unpack the archive with torchvision's utilities (checks the archive's MD5)."""
    cls = _spec(name)["cls"]
    download_and_extract_archive(cls.url, str(root), filename=cls.filename, md5=cls.tgz_md5)
    return folder(root, name)


def verify_checksums(root, name: str) -> List[str]:
    """Files whose MD5 differs from the official release (empty: the real, intact dataset)."""
    cls = _spec(name)["cls"]
    return [f for f, md5 in cls.train_list + cls.test_list + [[cls.meta["filename"], cls.meta["md5"]]]
            if not check_integrity(str(folder(root, name) / f), md5)]


def _unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            return pickle.load(f, encoding="latin1")
    except FileNotFoundError:
        raise
    except Exception as e:  # truncated or not a pickle at all
        raise DatasetError(f"cannot read {path}: {type(e).__name__}: {e}. The file is damaged: delete "
                           f"{path.parent} and download again (or copy the original files there).") from e


def load(root, name: str = "cifar100", train: bool = True, download_if_missing: bool = False
         ) -> Tuple[torch.Tensor, torch.Tensor, List[str]]:
    """(images uint8 [N, 3, 32, 32], labels int64 [N], class names) of the train or test split."""
    spec = _spec(name)
    cls, base = spec["cls"], folder(root, name)
    files = [f for f, _ in (cls.train_list if train else cls.test_list)]
    missing = [f for f in files + [cls.meta["filename"]] if not (base / f).is_file()]
    if missing and download_if_missing:
        try:
            download(root, name)
        except Exception as e:  # offline, proxy, disk full...
            raise DatasetError(f"{name} is not in {base} and the download failed ({type(e).__name__}: {e}). "
                               f"Download {cls.url} elsewhere and unpack it into {Path(root).resolve()} so that "
                               f"{base}/{files[0]} exists.") from e
        missing = [f for f in files + [cls.meta["filename"]] if not (base / f).is_file()]
    if missing:
        raise DatasetError(f"{name} not found: missing {', '.join(str(base / f) for f in missing)}. "
                           f"Pass download=True, or download {cls.url} and unpack it into {Path(root).resolve()}.")
    images, labels = [], []
    for f in files:
        entry = _unpickle(base / f)
        if "data" not in entry or spec["label_key"] not in entry:
            raise DatasetError(f"{base / f} has no 'data'/'{spec['label_key']}' entries: not a {name} batch file")
        data = np.asarray(entry["data"], dtype=np.uint8)
        y = np.asarray(entry[spec["label_key"]], dtype=np.int64)
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(y) != len(data):
            raise DatasetError(f"{base / f}: data shaped {data.shape} with {len(y)} labels; expected [N, 3072] "
                               f"uint8 rows (3 x 32 x 32) and N labels")
        if len(y) and (y.min() < 0 or y.max() >= spec["num_classes"]):
            raise DatasetError(f"{base / f}: labels outside [0, {spec['num_classes'] - 1}]")
        images.append(data.reshape(-1, 3, 32, 32))
        labels.append(y)
    classes = list(_unpickle(base / cls.meta["filename"])[spec["names_key"]])
    return torch.from_numpy(np.concatenate(images)), torch.from_numpy(np.concatenate(labels)), classes
