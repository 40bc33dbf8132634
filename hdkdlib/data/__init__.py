"""Datasets, fake-data writers, versioned splits and the GPU-resident loader.

  load_cifar(root, name, train, download)   CIFAR-10/100 from torchvision's on-disk format -> uint8 tensors
  image_folder(root, split) / folder_to_tensor(root, split)   ImageNet-style folders
  write_fake_cifar / write_fake_image_folder   the same formats, small, for tests and quick runs
  synthetic_images(n, num_classes, difficulty)   a procedural, learnable dataset for demos
  splits.load_or_create(labels, ...)   held-out validation and limited-data splits under data/splits/
  GpuLoader   crop/flip/normalise on the device, seeded per epoch
"""
from . import splits
from .cifar import SPECS as CIFAR_SPECS, DatasetError, load as load_cifar, download as download_cifar
from .fake import synthetic_images, write_fake_cifar, write_fake_image_folder
from .folder import IMAGENET_MEAN, IMAGENET_STD, folder_to_tensor, image_folder, imagenet_transforms
from .gpu import GpuLoader

__all__ = ["splits", "CIFAR_SPECS", "DatasetError", "load_cifar", "download_cifar", "synthetic_images",
           "write_fake_cifar", "write_fake_image_folder", "IMAGENET_MEAN", "IMAGENET_STD", "folder_to_tensor",
           "image_folder", "imagenet_transforms", "GpuLoader"]
