"""Image-folder datasets (`root/{train,val}/<class>/*.jpg`): ImageNet and custom data."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np
import torch
from PIL import Image
from torchvision import datasets, transforms

from .cifar import DatasetError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def imagenet_transforms(train: bool, size: int = 224, resize: int = 256):
    """docs/method.md, "Recipes": RandomResizedCrop(224) + flip for training; Resize(256) + CenterCrop(224) for test."""
    head = ([transforms.RandomResizedCrop(size), transforms.RandomHorizontalFlip()] if train
            else [transforms.Resize(resize), transforms.CenterCrop(size)])
    return transforms.Compose(head + [transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def _check_layout(root: Path, split: str, reference_split: Optional[str] = "train") -> List[str]:
    base = root / split
    if not base.is_dir():
        raise DatasetError(f"image folder {base} not found: expected {root}/{split}/<class>/<image> "
                           "(for ImageNet, the train and val folders of ILSVRC2012 sorted into class folders)")
    classes = sorted(d.name for d in base.iterdir() if d.is_dir())
    if not classes:
        raise DatasetError(f"{base} has no class folders: expected {base}/<class>/<image>")
    empty = [c for c in classes if not any(f.is_file() for f in (base / c).iterdir())]
    if empty:
        more = f" (nor do {len(empty) - 1} more)" if len(empty) > 1 else ""
        raise DatasetError(f"class folder {base / empty[0]} holds no images{more}: every class folder needs at least "
                           "one image file (.jpg, .png, ...) directly inside it; remove the empty folder or fill it")
    ref = root / reference_split if reference_split else None
    if ref is not None and ref != base and ref.is_dir():
        expected = sorted(d.name for d in ref.iterdir() if d.is_dir())
        missing = sorted(set(expected) - set(classes))
        if missing:
            raise DatasetError(f"{base} lacks class folders present in {ref}: {', '.join(missing[:10])}"
                               + (" ..." if len(missing) > 10 else "") + ": labels would not match")
    return classes


def _loader(path: str):
    try:
        with open(path, "rb") as f:
            return Image.open(f).convert("RGB")
    except Exception as e:
        raise DatasetError(f"cannot read image {path}: {type(e).__name__}: {e}") from e


def image_folder(root, split: str = "train", train: Optional[bool] = None, transform=None) -> datasets.ImageFolder:
    """torchvision's ImageFolder over root/split with the ImageNet recipe transforms by default."""
    root = Path(root)
    _check_layout(root, split)
    train = (split == "train") if train is None else train
    return datasets.ImageFolder(str(root / split), transform=transform or imagenet_transforms(train), loader=_loader)


def folder_to_tensor(root, split: str = "train", workers: int = 8) -> Tuple[torch.Tensor, torch.Tensor, List[str]]:
    """Decode a folder of small, equally sized images (e.g. CIFAR as JPEG) into uint8 [N, 3, H, W] for the
    GPU loader. Labels follow the sorted class folders, images the sorted file names."""
    root = Path(root)
    classes = _check_layout(root, split)
    ds = datasets.ImageFolder(str(root / split), loader=_loader)
    with ThreadPoolExecutor(workers) as pool:
        arrays = list(pool.map(lambda s: np.asarray(_loader(s[0])), ds.samples))
    shapes = {a.shape for a in arrays}
    if len(shapes) != 1:
        raise DatasetError(f"{root / split}: images have different sizes {sorted(shapes)[:4]}; "
                           "use image_folder() with transforms for such data")
    images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    return images, torch.tensor(ds.targets, dtype=torch.long), classes
