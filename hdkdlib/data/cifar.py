"""CIFAR-10 / CIFAR-100 in torchvision's on-disk format, read into uint8 tensors.

File names, URLs and checksums come from torchvision's dataset classes; the download goes
through torchvision's download utilities, with a connect/read timeout and a bounded retry. The files
are read here (not through the torchvision classes) so that a damaged file is reported by name, and so
that no file can run code:
- every file's MD5 is checked against the official release before it is read; files this project wrote
  itself (the fake copies of `data.write_fake_cifar`) are listed with their MD5s in FAKE_MANIFEST beside
  them and accepted on that list instead;
- whatever passes, it is unpickled by a restricted unpickler that admits only the numpy array types the
  format needs, so even a file with a forged manifest cannot execute anything.
"""
from __future__ import annotations

import io
import pickle
import socket
import time
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
import torch
from torchvision.datasets import CIFAR10, CIFAR100
from torchvision.datasets.utils import calculate_md5, check_integrity, download_and_extract_archive

from ..records import Unreadable, read_json

SPECS: Dict[str, dict] = {
    "cifar10": dict(cls=CIFAR10, num_classes=10, label_key="labels", names_key="label_names",
                    mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616)),
    "cifar100": dict(cls=CIFAR100, num_classes=100, label_key="fine_labels", names_key="fine_label_names",
                     mean=(0.5071, 0.4867, 0.4408), std=(0.2675, 0.2565, 0.2761)),
}


FAKE_MANIFEST = "hdkdlib-fake-manifest.json"  # {file name: md5} of the fake files written by data.write_fake_cifar

# The globals a CIFAR pickle may name: numpy's array reconstruction (numpy 1 and 2 module paths) and the codec
# that Python 3 uses for bytes in protocol-2 pickles. Nothing that can run code.
_ALLOWED_GLOBALS = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
                    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
                    ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}


class DatasetError(RuntimeError):
    """A dataset file is missing, damaged or does not match what was expected."""


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load the global {module}.{name}: a CIFAR file holds only "
                                     "numpy arrays, lists, strings and numbers")


def _spec(name: str) -> dict:
    if name not in SPECS:
        raise ValueError(f"unknown CIFAR dataset {name!r}; valid: {', '.join(SPECS)}")
    return SPECS[name]


def folder(root, name: str) -> Path:
    return Path(root) / _spec(name)["cls"].base_folder


def download(root, name: str, *, url: str | None = None, timeout: float = 30.0, retries: int = 3,
             wait: float = 2.0) -> Path:
    """Download and unpack the archive with torchvision's utilities (which check the archive's MD5). Every
    connection and read gives up after `timeout` seconds of silence; `retries` attempts in all, `wait`
    seconds apart. Raises DatasetError naming the URL, the folder and how to place the files by hand."""
    cls = _spec(name)["cls"]
    url = url or cls.url
    errors = []
    for attempt in range(1, retries + 1):
        previous = socket.getdefaulttimeout()
        socket.setdefaulttimeout(timeout)  # torchvision's urlopen takes no timeout: it reads this default
        try:
            download_and_extract_archive(url, str(root), filename=cls.filename, md5=cls.tgz_md5)
            return folder(root, name)
        except Exception as e:  # offline, a stalled proxy (timeout), refused, a bad archive, a full disk...
            errors.append(f"attempt {attempt}: {type(e).__name__}: {str(e)[:160]}")
        finally:
            socket.setdefaulttimeout(previous)
        if attempt < retries:
            time.sleep(wait)
    raise DatasetError(f"could not download {name} from {url} ({'; '.join(errors)}). Download {cls.url} on a "
                       f"machine with internet access and unpack it into {Path(root).resolve()} so that "
                       f"{folder(root, name)}/{cls.train_list[0][0]} exists.")


def _expected_md5(root, name: str) -> Dict[str, str]:
    cls = _spec(name)["cls"]
    return {f: md5 for f, md5 in cls.train_list + cls.test_list + [[cls.meta["filename"], cls.meta["md5"]]]}


def verify_checksums(root, name: str) -> List[str]:
    """Files whose MD5 differs from the official release (empty: the real, intact dataset)."""
    return [f for f, md5 in _expected_md5(root, name).items() if not check_integrity(str(folder(root, name) / f), md5)]


def _md5(path: Path) -> str:
    return calculate_md5(str(path))


def _check_file(path: Path, official_md5: str, manifest: Dict[str, str]) -> None:
    digest = _md5(path)
    if digest == official_md5 or manifest.get(path.name) == digest:
        return
    raise DatasetError(f"{path} is not the official CIFAR file (MD5 {digest}, expected {official_md5}): it was "
                       f"not read. Delete {path.parent} and download again (download=True), or copy the files "
                       "of the official archive there.")


def _unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            return _RestrictedUnpickler(io.BufferedReader(f), encoding="latin1").load()
    except FileNotFoundError:
        raise
    except Exception as e:  # a refused global, truncated, or not a pickle at all
        raise DatasetError(f"cannot read {path}: {type(e).__name__}: {e}. Delete {path.parent} and download "
                           f"again (or copy the original files there).") from e


def _pixels(data, path: Path) -> np.ndarray:
    """The pixel array as uint8, checked before the cast: a cast would turn [0, 1] floats into two grey levels
    and wrap integers outside 0..255 (-1 becomes 255) without a word."""
    again = ("write the file again with uint8 pixels (hdkdlib.data.write_fake_cifar does, and lists the new file's "
             "MD5 in its manifest)")
    try:
        data = np.asarray(data)
    except Exception as e:  # ragged rows
        raise DatasetError(f"{path}: 'data' is not an array of pixels ({type(e).__name__}: {e}); {again}") from e
    if data.dtype == np.uint8:
        return data
    span = lambda: f" in {data.min():g}..{data.max():g}" if data.size else ""
    if data.dtype.kind == "f":
        looks = data.size and 0 <= data.min() and data.max() <= 1
        raise DatasetError(f"{path}: pixels are {data.dtype}{span()}"
                           + (", which look like [0, 1] floats" if looks else "")
                           + "; CIFAR pixels are integers 0..255: "
                           + ("multiply them by 255, round, and " if looks else "") + again)
    if data.dtype.kind not in "ui":  # bool, complex, strings, objects
        raise DatasetError(f"{path}: pixels are {data.dtype}, not integers; CIFAR pixels are integers 0..255: {again}")
    if data.size and (data.min() < 0 or data.max() > 255):
        raise DatasetError(f"{path}: pixels are {data.dtype}{span()}, outside the 0..255 of 8-bit pixels; map them "
                           f"into 0..255 and {again}")
    return data.astype(np.uint8)


def _labels(labels, path: Path) -> np.ndarray:
    """The labels as int64, checked before the cast: a cast would truncate 1.6 to 1 and a column of labels
    would fail only at the first training step."""
    try:
        y = np.asarray(labels)
    except Exception as e:  # ragged
        raise DatasetError(f"{path}: the labels are not a list of integers ({type(e).__name__}: {e})") from e
    if y.ndim != 1 or (y.size and y.dtype.kind not in "ui"):
        raise DatasetError(f"{path}: the labels are {y.dtype} shaped {y.shape}, not a list of integer class indices; "
                           "write the file again with integer labels")
    return y.astype(np.int64)


def load(root, name: str = "cifar100", train: bool = True, download_if_missing: bool = False
         ) -> Tuple[torch.Tensor, torch.Tensor, List[str]]:
    """(images uint8 [N, 3, 32, 32], labels int64 [N], class names) of the train or test split."""
    spec = _spec(name)
    cls, base = spec["cls"], folder(root, name)
    files = [f for f, _ in (cls.train_list if train else cls.test_list)]
    missing = [f for f in files + [cls.meta["filename"]] if not (base / f).is_file()]
    if missing and download_if_missing:
        download(root, name)  # raises DatasetError with the URL, the folder and what to do offline
        missing = [f for f in files + [cls.meta["filename"]] if not (base / f).is_file()]
    if missing:
        raise DatasetError(f"{name} not found: missing {', '.join(str(base / f) for f in missing)}. "
                           f"Pass download=True, or download {cls.url} and unpack it into {Path(root).resolve()}.")
    manifest_path = base / FAKE_MANIFEST
    try:
        manifest = read_json(manifest_path) if manifest_path.is_file() else {}
    except Unreadable as e:
        raise DatasetError(f"{e}: delete {base} and download again (download=True), or write the fake data "
                           "again") from None
    if not (isinstance(manifest, dict) and all(isinstance(v, str) for v in manifest.values())):
        raise DatasetError(f"{manifest_path} is not a {{file name: MD5}} object: delete {base} and download again "
                           "(download=True), or write the fake data again")
    expected = _expected_md5(root, name)
    for f in files + [cls.meta["filename"]]:  # every file checked before any is unpickled
        _check_file(base / f, expected[f], manifest)
    images, labels = [], []
    for f in files:
        entry = _unpickle(base / f)
        if not isinstance(entry, dict) or "data" not in entry or spec["label_key"] not in entry:
            raise DatasetError(f"{base / f} has no 'data'/'{spec['label_key']}' entries: not a {name} batch file")
        data = _pixels(entry["data"], base / f)
        y = _labels(entry[spec["label_key"]], base / f)
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(y) != len(data):
            raise DatasetError(f"{base / f}: data shaped {data.shape} with {len(y)} labels; expected [N, 3072] "
                               f"uint8 rows (3 x 32 x 32) and N labels")
        if len(y) and (y.min() < 0 or y.max() >= spec["num_classes"]):
            raise DatasetError(f"{base / f}: labels outside [0, {spec['num_classes'] - 1}]")
        images.append(data.reshape(-1, 3, 32, 32))
        labels.append(y)
    meta = _unpickle(base / cls.meta["filename"])
    if not isinstance(meta, dict) or not isinstance(meta.get(spec["names_key"]), list):
        raise DatasetError(f"{base / cls.meta['filename']} has no '{spec['names_key']}' list: not {name}'s meta "
                           "file; delete the folder and download again")
    classes = list(meta[spec["names_key"]])
    return torch.from_numpy(np.concatenate(images)), torch.from_numpy(np.concatenate(labels)), classes
