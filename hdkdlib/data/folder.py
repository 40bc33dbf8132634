"""Image-folder datasets (`root/{train,val}/<class>/*.jpg`): ImageNet and custom data."""
from __future__ import annotations

import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np
import torch
from PIL import Image
from torchvision import datasets, transforms
from torchvision.datasets.folder import IMG_EXTENSIONS, has_file_allowed_extension

from .cifar import DatasetError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def imagenet_transforms(train: bool, size: int = 224, resize: int = 256):
    """docs/method.md, "Recipes": RandomResizedCrop(224) + flip for training; Resize(256) + CenterCrop(224) for test."""
    head = ([transforms.RandomResizedCrop(size), transforms.RandomHorizontalFlip()] if train
            else [transforms.Resize(resize), transforms.CenterCrop(size)])
    return transforms.Compose(head + [transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def _hidden(name: str) -> bool:
    """Entries that are no class and no image: dot files and folders (.ipynb_checkpoints, .DS_Store) and the
    __MACOSX folder a zip made on a Mac carries."""
    return name.startswith(".") or name == "__MACOSX"


def _class_folders(base: Path) -> List[str]:
    return sorted(d.name for d in base.iterdir() if d.is_dir() and not _hidden(d.name))


def _check_layout(root: Path, split: str, reference_split: Optional[str] = "train") -> List[str]:
    base = root / split
    if not base.is_dir():
        raise DatasetError(f"image folder {base} not found: expected {root}/{split}/<class>/<image> "
                           "(for ImageNet, the train and val folders of ILSVRC2012 sorted into class folders)")
    classes = _class_folders(base)
    if not classes:
        raise DatasetError(f"{base} has no class folders: expected {base}/<class>/<image>")
    ref = root / reference_split if reference_split else None
    if ref is not None and ref != base and ref.is_dir():
        # labels are indices into the sorted class list: one class more or less shifts every label after it
        expected = _class_folders(ref)
        for kind, names in ((f"lacks class folders present in {ref}", sorted(set(expected) - set(classes))),
                            (f"has class folders that {ref} lacks", sorted(set(classes) - set(expected)))):
            if names:
                raise DatasetError(f"{base} {kind}: {', '.join(names[:10])}"
                                   + (" ..." if len(names) > 10 else "") + ": every split needs exactly the training "
                                   "split's classes, or its labels would not match")
    return classes


class ImageTree(datasets.ImageFolder):
    """torchvision's ImageFolder, made safe against trees as people leave them: hidden entries are neither
    classes nor images; folder links inside a class folder are not followed (a link back to its parent made one
    class 41 times larger); a file reached twice (through a file link) counts once."""

    def find_classes(self, directory):
        classes = _class_folders(Path(directory))
        return classes, {c: i for i, c in enumerate(classes)}

    @staticmethod
    def make_dataset(directory, class_to_idx=None, extensions=None, is_valid_file=None, allow_empty=False):
        valid = is_valid_file or (lambda path: has_file_allowed_extension(path, extensions))
        samples, seen, skipped = [], {}, []  # seen: real path -> its class; skipped: images of other formats
        for name in sorted(class_to_idx):
            walk = []
            for folder, dirs, files in os.walk(os.path.join(directory, name)):  # followlinks=False
                dirs[:] = [d for d in dirs if not _hidden(d)]
                walk.append((folder, files))
            for folder, files in sorted(walk):  # torchvision's order
                for file in sorted(f for f in files if not _hidden(f)):
                    path = os.path.join(folder, file)
                    real = os.path.realpath(path)
                    if valid(path) and seen.get(real, name) != name:  # one file, two labels
                        raise DatasetError(f"{path} is the file {seen[real]}/ holds too ({real}): an image of two "
                                           "classes; keep it in one class folder")
                    if valid(path) and real not in seen:
                        seen[real] = name
                        samples.append((path, class_to_idx[name]))
                    elif is_valid_file is None and not valid(path) and _image_suffix(file) is not None:
                        skipped.append(path)
        # Checked on the samples themselves, not on the folder's files: a class whose files are all skipped (no
        # image extension, hidden, or already counted) would still be a class, an output no image ever trains.
        counts = np.bincount([i for _, i in samples], minlength=len(class_to_idx))
        empty = [name for name in sorted(class_to_idx) if counts[class_to_idx[name]] == 0]
        if empty:
            _refuse_empty_class(Path(directory), empty, extensions)
        if skipped:
            _refuse_skipped_images(Path(directory), skipped, extensions)
        return samples


def _image_suffix(name: str) -> Optional[str]:
    """The file's extension if Pillow opens files of that kind (.gif, .jfif, .tga), else None (.txt, .xml)."""
    Image.init()
    suffix = os.path.splitext(name)[1].lower()
    return suffix if Image.registered_extensions().get(suffix) in Image.OPEN else None


def _refuse_skipped_images(base: Path, skipped: List[str], extensions) -> None:
    """Images the tree holds in a format the dataset does not read would leave their classes smaller than the
    folder shows, unnoticed (torchvision skips them in silence): refused, naming them."""
    kinds = Counter(_image_suffix(p) for p in skipped).most_common()
    raise DatasetError(f"{len(skipped)} image files under {base} are not read (" + ", ".join(f"{n} {k}" for k, n in kinds)
                       + f"; e.g. {skipped[0]}): the dataset reads only {', '.join(extensions or IMG_EXTENSIONS)}; "
                       "convert them to PNG or JPEG, or move them out of the tree")


def _refuse_empty_class(base: Path, empty: List[str], extensions) -> None:
    folder, kinds = base / empty[0], tuple(extensions or IMG_EXTENSIONS)
    files = []
    for where, dirs, names in os.walk(folder):  # as make_dataset walks it: folder links are not followed
        links = [d + "/ (a folder link, not followed)" for d in dirs if os.path.islink(os.path.join(where, d))]
        files += [os.path.relpath(os.path.join(where, n), folder) for n in sorted(names) + sorted(links)]
    shown = [f for f in sorted(files) if not any(_hidden(part) for part in Path(f).parts)]
    listed = lambda names: ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    if any(has_file_allowed_extension(f, kinds) for f in shown):
        holds = f"its image files ({listed(shown)}) are the same files as images of another class"
    elif shown:
        holds = f"it holds only {listed(shown)}"
    elif files:
        holds = f"it holds only hidden files ({listed(sorted(files))})"
    else:
        holds = "it is empty"
    more = f"; nor do {listed(empty[1:])}" if len(empty) > 1 else ""
    raise DatasetError(f"class folder {folder} holds no images ({holds}{more}): every class of every split needs at "
                       f"least one image file ({', '.join(kinds)}); add images to it, or move the folder {empty[0]} "
                       f"out of every split of {base.parent}")


def check_disjoint(root, split_names) -> None:
    """No image file in two splits of root: the same file (or a link to it) in train and val would be evaluated
    on what it trained on."""
    owner = {}
    for split in split_names:
        for path, _ in ImageTree(str(Path(root) / split)).samples:
            real = os.path.realpath(path)
            if real in owner and owner[real][0] != split:
                raise DatasetError(f"image {path} is also in the {owner[real][0]} split ({owner[real][1]}): the splits "
                                   "must not share files; remove one of them")
            owner.setdefault(real, (split, path))


# Modes whose conversion to 8-bit RGB by Pillow keeps every pixel's value (palettes are looked up, alpha dropped,
# CMYK and YCbCr converted by formula). 16-bit grey ("I;16", or "I" holding 0..65535) is scaled by 255/65535 here:
# Pillow's own conversion clips it, and a 16-bit PNG came out almost white.
_EIGHT_BIT_MODES = {"1", "L", "P", "RGB", "RGBA", "RGBX", "RGBa", "CMYK", "YCbCr", "LA", "La", "PA"}
_SIXTEEN_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I"}


def to_rgb8(image: Image.Image, path) -> Image.Image:
    """The image as 8-bit RGB, with its pixel values kept; a mode we cannot convert faithfully is refused."""
    if image.mode in _EIGHT_BIT_MODES:
        return image.convert("RGB")
    if image.mode in _SIXTEEN_BIT_MODES:
        grey = np.asarray(image).astype(np.int64)
        if grey.size and (grey.min() < 0 or grey.max() > 65535):
            raise DatasetError(f"image {path}: mode {image.mode} with values outside 0..65535 cannot be read as "
                               "16-bit grey; convert it to 8-bit RGB first")
        grey = ((grey * 255 + 32767) // 65535).astype(np.uint8)  # round(v * 255 / 65535)
        return Image.fromarray(np.repeat(grey[..., None], 3, axis=-1), "RGB")
    raise DatasetError(f"image {path}: mode {image.mode} cannot be converted to 8-bit RGB faithfully; convert it "
                       "(to RGB, or 8- or 16-bit greyscale) first")


# Our bound on the pixels of one image (below Pillow's own, which only warns up to about 179 million): an image
# above it is refused by name before it is decoded.
MAX_PIXELS = 2 ** 26
# Evaluation resizes the shorter side to EVAL_RESIZE, so an image whose longer side is r times its shorter one
# becomes EVAL_RESIZE x r * EVAL_RESIZE pixels however few it has (a 196-byte 1 x 40,000 PNG: 7.7 GB).
# MAX_ASPECT keeps the resized image within MAX_PIXELS.
EVAL_RESIZE = 256
MAX_ASPECT = MAX_PIXELS // EVAL_RESIZE ** 2


def check_size(width: int, height: int, path) -> None:
    """Refuse an image too large to decode, or too elongated to resize, as one line naming it and the bound."""
    short, long = min(width, height), max(width, height)
    if short < 1:
        raise DatasetError(f"image {path} is {width}x{height} pixels: it has no pixels; move it out of the data "
                           "folder")
    if width * height > MAX_PIXELS:
        raise DatasetError(f"image {path} is {width}x{height} pixels ({width * height:,}), above our bound of "
                           f"{MAX_PIXELS:,} pixels per image: downscale it below that, or move it out of the data folder")
    if long > MAX_ASPECT * short:
        resized = (EVAL_RESIZE, long * EVAL_RESIZE // short)
        raise DatasetError(f"image {path} is {width}x{height} pixels, its longer side more than our bound of "
                           f"{MAX_ASPECT} times its shorter (resized to a shorter side of {EVAL_RESIZE}, as evaluation "
                           f"does, it would be {resized[0]}x{resized[1]:,} pixels): crop it to a side ratio of at "
                           f"most {MAX_ASPECT}, or move it out of the data folder")


def check_sizes(paths, workers: int = 8) -> None:
    """check_size for every file from its header alone (no pixel decoded): the splits read only at the end of a
    run (test, and held-out images a fixed-weight method never sees in training) refuse an image before
    training starts, not after it."""
    def header(path):
        try:
            with Image.open(path) as image:
                check_size(*image.size, path)
        except DatasetError:
            raise
        except Exception as e:
            raise DatasetError(f"cannot read image {path}: {type(e).__name__}: {e}") from e
    with ThreadPoolExecutor(workers) as pool:  # file opens dominate on network file systems
        list(pool.map(header, paths))


def read_image(path: str):
    try:
        with open(path, "rb") as f:
            image = Image.open(f)  # reads the header only: the size is known before any pixel is decoded
            check_size(*image.size, path)
            return to_rgb8(image, path)
    except DatasetError:
        raise
    except Image.DecompressionBombError as e:
        raise DatasetError(f"image {path}: {e} (our bound is {MAX_PIXELS:,} pixels per image): downscale it below "
                           "that, or move it out of the data folder") from e
    except Exception as e:
        raise DatasetError(f"cannot read image {path}: {type(e).__name__}: {e}") from e


def image_folder(root, split: str = "train", train: Optional[bool] = None, transform=None) -> ImageTree:
    """torchvision's ImageFolder over root/split with the ImageNet recipe transforms by default."""
    root = Path(root)
    _check_layout(root, split)
    train = (split == "train") if train is None else train
    return ImageTree(str(root / split), transform=transform or imagenet_transforms(train), loader=read_image)


def folder_to_tensor(root, split: str = "train", workers: int = 8) -> Tuple[torch.Tensor, torch.Tensor, List[str]]:
    """Decode a folder of small, equally sized images (e.g. CIFAR as JPEG) into uint8 [N, 3, H, W] for the
    GPU loader. Labels follow the sorted class folders, images the sorted file names."""
    root = Path(root)
    classes = _check_layout(root, split)
    ds = ImageTree(str(root / split), loader=read_image)
    with ThreadPoolExecutor(workers) as pool:
        arrays = list(pool.map(lambda s: np.asarray(read_image(s[0])), ds.samples))
    shapes = Counter(a.shape[:2] for a in arrays)
    if len(shapes) != 1:  # name an image of the rarest size: the one to find among thousands
        rare, common = min(shapes, key=shapes.get), max(shapes, key=shapes.get)
        odd = next(path for (path, _), a in zip(ds.samples, arrays) if a.shape[:2] == rare)
        raise DatasetError(f"{root / split}: images have different sizes: {odd} is {rare[1]}x{rare[0]} ({shapes[rare]} "
                           f"such), {shapes[common]} are {common[1]}x{common[0]}: resize them to one size, or use "
                           "--dataset folder (its transforms resize)")
    images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    return images, torch.tensor(ds.targets, dtype=torch.long), classes
