"""Image folders in the ImageNet layout (``dataset.kind: imagefolder``): ``train/`` and
``val/``, one folder per class, decoded per epoch by torchvision's ``ImageFolder`` or once into
memory (``dataset.decode``), with the paper's preprocessing."""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from saliency_robustness.errors import DataError, one_line

IMAGEFOLDER_SPLITS = {"train": "train", "test": "val"}


def _load_image(path: str, mode: str) -> Any:
    """PIL loader converting to ``mode`` as torchvision does (grayscale, CMYK and palette files
    included; a module-level function so DataLoader workers can pickle it). A file that does
    not decode (truncated, empty, not an image) is a :class:`DataError` naming it."""
    from PIL import Image

    try:
        with open(path, "rb") as f:
            return Image.open(f).convert(mode)
    except (OSError, SyntaxError, ValueError) as exc:  # PIL's UnidentifiedImageError is an OSError
        raise DataError(f"image file {path} cannot be decoded ({one_line(exc)}); remove or replace it") from None


def imagefolder_transform(dataset: Mapping[str, Any], train: bool) -> Any:
    """The paper's preprocessing: shorter side resized to ``resize_size``, then a random crop of
    ``image_size`` (from the image zero-padded by ``crop_padding`` pixels, CIFAR-style) and a
    random horizontal flip for training, a center crop for evaluation; pixels in [0, 1] minus
    the per-channel mean."""
    from torchvision import transforms

    crop: list[Any] = (
        [transforms.RandomCrop(dataset["image_size"], padding=dataset["crop_padding"] or None), transforms.RandomHorizontalFlip()]
        if train
        else [transforms.CenterCrop(dataset["image_size"])]
    )
    mean = [float(m) for m in dataset["mean"]]
    subtract_mean = transforms.Normalize(mean, [1.0] * len(mean))  # std 1: centering only
    return transforms.Compose([transforms.Resize(dataset["resize_size"]), *crop, transforms.ToTensor(), subtract_mean])


def imagefolder_root(dataset: Mapping[str, Any], data_root: str | Path) -> Path:
    """``dataset.path``, taken from ``data_root`` when relative."""
    if not dataset.get("path"):
        raise DataError("dataset.path must name the folder holding train/ and val/ for dataset kind imagefolder")
    path = Path(dataset["path"]).expanduser()
    return path if path.is_absolute() else Path(data_root) / path


def _class_folders(folder: Path) -> list[str]:
    return sorted(entry.name for entry in folder.iterdir() if entry.is_dir())


class DecodedImageFolder(Dataset):
    """An image folder decoded once into memory (``dataset.decode: once``): each file is read,
    converted and resized to a ``resize_size`` square (shorter side resized, center crop) as
    ``uint8`` the first time it is used, and kept, so that later epochs decode nothing and a
    subset decodes only its own files. The random crop (with ``crop_padding``) and flip of
    training, or the center crop of evaluation, and the centering are applied per sample on
    the tensor, drawing from torch's generator like torchvision's transforms.

    Memory is ``N * C * resize_size^2`` bytes (CIFAR-10's training split: 154 MB). The time
    saved is measured by tests/benchmarks/bench_training.py (docs/benchmarks.md).
    """

    def __init__(self, folder: Any, dataset: Mapping[str, Any], train: bool) -> None:
        from torchvision import transforms

        self.root = Path(folder.root)
        self.classes: list[str] = list(folder.classes)
        self.samples: list[tuple[str, int]] = list(folder.samples)
        self.targets = torch.tensor([label for _, label in self.samples], dtype=torch.int64)
        self.loader = folder.loader
        self.train, self.image_size, self.padding = train, int(dataset["image_size"]), int(dataset["crop_padding"])
        self.mean = torch.tensor([float(m) for m in dataset["mean"]], dtype=torch.float32).view(-1, 1, 1)
        side = int(dataset["resize_size"])
        self.square = transforms.Compose([transforms.Resize(side), transforms.CenterCrop(side), transforms.PILToTensor()])
        self.pixels = torch.empty((len(self.samples), len(self.mean), side, side), dtype=torch.uint8)
        self.decoded = torch.zeros(len(self.samples), dtype=torch.bool)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if not self.decoded[index]:
            self.pixels[index] = self.square(self.loader(self.samples[index][0]))
            self.decoded[index] = True
        image = self.pixels[index].to(torch.float32).div_(255.0)
        size = self.image_size
        if self.train:
            if self.padding:
                image = torch.nn.functional.pad(image, [self.padding] * 4)
            top, left = (int(torch.randint(0, side - size + 1, (1,))) for side in image.shape[1:])
            image = image[:, top : top + size, left : left + size]
            if float(torch.rand(1)) < 0.5:
                image = image.flip(-1)
        else:
            top, left = (int(round((side - size) / 2.0)) for side in image.shape[1:])
            image = image[:, top : top + size, left : left + size]
        return image - self.mean, int(self.targets[index])


def _check_class_folders(folder: Path) -> None:
    """One line naming the first class folder without an image file (torchvision's message
    lists every class and every extension)."""
    from torchvision.datasets.folder import IMG_EXTENSIONS

    classes = _class_folders(folder)
    if not classes:
        raise DataError(f"ImageNet-layout folder {folder} holds no class folders (expected {folder}/<class>/<image>)")
    for name in classes:
        if not any(entry.is_file() and entry.name.lower().endswith(IMG_EXTENSIONS) for entry in (folder / name).iterdir()):
            raise DataError(f"class folder {folder / name} holds no image file ({', '.join(IMG_EXTENSIONS[:3])}, ...): remove it or fill it")


def load_imagefolder(dataset: Mapping[str, Any], data_root: str | Path, split: str) -> Dataset:
    """The ``train`` (``train/``) or ``test`` (``val/``) split of an ImageNet-layout folder
    ``<class>/<image>``; class indices follow the sorted folder names (torchvision's order,
    which is also the order of its pretrained ImageNet weights).

    As torchvision's ``ImageFolder``: files without an image extension are skipped, and
    grayscale, CMYK and palette images are converted to the configured channels. Unlike it, a
    file that does not decode (truncated, not an image) and a class folder without images
    are one-line errors naming them."""
    from torchvision.datasets import ImageFolder

    root = imagefolder_root(dataset, data_root)
    folder = root / IMAGEFOLDER_SPLITS[split]
    if not folder.is_dir():
        raise DataError(f"ImageNet-layout folder {folder} not found (expected {root}/train/<class>/* and {root}/val/<class>/*)")
    channels = len(dataset["mean"])
    if channels not in (1, 3):
        raise DataError(f"dataset.mean has {channels} entries; give 3 (RGB) or 1 (grayscale)")
    other = root / IMAGEFOLDER_SPLITS["test" if split == "train" else "train"]
    if other.is_dir() and _class_folders(other) != _class_folders(folder):
        # labels are folder positions: different class sets would silently shift them
        raise DataError(f"{root}/train and {root}/val hold different class folders; labels would not match")
    _check_class_folders(folder)
    train = split == "train"
    try:
        images = ImageFolder(
            str(folder),
            transform=None if dataset["decode"] == "once" else imagefolder_transform(dataset, train=train),
            loader=partial(_load_image, mode="RGB" if channels == 3 else "L"),
        )
    except (FileNotFoundError, OSError) as exc:
        raise DataError(f"cannot read ImageNet-layout folder {folder}: {one_line(exc)}") from None
    return DecodedImageFolder(images, dataset, train) if dataset["decode"] == "once" else images
