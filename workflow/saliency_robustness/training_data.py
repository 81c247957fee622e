"""The training set's batches, epoch by epoch: each epoch drawn from its own seed, from a
``DataLoader`` (files decoded in workers) or, for an in-memory dataset, indexed on the device."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset


def epoch_seed(seed: int, epoch: int) -> int:
    """Every epoch draws from its own seed, so that a run resumed at an epoch boundary
    reproduces the uninterrupted run exactly."""
    return (seed * 1_000_003 + epoch) % (2**63 - 1)


def epoch_loader(ds: Dataset, train: Mapping[str, Any], epoch: int, device: torch.device) -> DataLoader:
    """The shuffled batches of one epoch, drawn from the epoch's own seed.

    The generator fixes both the order and the workers' seeds (hence the random crops and
    flips), so each epoch is reproducible on its own. A new loader per epoch means new
    workers per epoch (``persistent_workers`` could not carry over): on ImageNet the
    start-up is seconds against an epoch of an hour.
    """
    generator = torch.Generator().manual_seed(epoch_seed(train["seed"], epoch))
    workers = train["num_workers"]
    return DataLoader(
        ds,
        batch_size=train["batch_size"],
        shuffle=True,
        generator=generator,
        num_workers=workers,
        pin_memory=device.type == "cuda",  # page-locked batches: the copies below run asynchronously
        persistent_workers=False,
        prefetch_factor=4 if workers > 0 else None,
        drop_last=False,
    )


def in_memory_tensors(ds: Dataset) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Images and labels of an in-memory dataset (a ``TensorDataset`` such as MNIST or
    CIFAR-10, or a ``Subset`` of one), or None for one that decodes files (image folders)."""
    indices = None
    if isinstance(ds, Subset):
        indices, ds = torch.as_tensor(ds.indices), ds.dataset
    if not isinstance(ds, TensorDataset) or len(ds.tensors) != 2:
        return None
    images, labels = ds.tensors
    return (images, labels) if indices is None else (images[indices], labels[indices])


class DeviceBatches:
    """The shuffled batches of an in-memory training set that lives on the training device for
    the whole run (MNIST as float32 is 188 MB), indexed there: no loader, no host copies.

    Each epoch's order is the one :func:`epoch_loader` gives (a ``DataLoader`` draws its base
    seed, then the permutation, from the epoch's generator), so both paths train alike.
    """

    def __init__(self, tensors: tuple[torch.Tensor, torch.Tensor], train: Mapping[str, Any], device: torch.device) -> None:
        self.images, self.labels = (t.to(device) for t in tensors)
        self.train, self.device = train, device

    def epoch(self, epoch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        generator = torch.Generator().manual_seed(epoch_seed(self.train["seed"], epoch))
        torch.empty((), dtype=torch.int64).random_(generator=generator)  # the DataLoader's base seed
        order = torch.randperm(len(self.labels), generator=generator).to(self.device)
        size = self.train["batch_size"]
        return [(self.images[rows], self.labels[rows]) for rows in order.split(size)]


def training_batches(ds: Dataset, train: Mapping[str, Any], device: torch.device) -> Callable[[int], Iterable[tuple[torch.Tensor, torch.Tensor]]]:
    """Epoch -> its batches: on the device for an in-memory dataset without loader workers,
    else from a ``DataLoader`` (image folders: decoding and augmentation in workers)."""
    tensors = in_memory_tensors(ds)
    if tensors is not None and train["num_workers"] == 0:
        return DeviceBatches(tensors, train, device).epoch
    return lambda epoch: epoch_loader(ds, train, epoch, device)
