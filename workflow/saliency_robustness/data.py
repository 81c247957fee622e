"""Datasets, the model's input space, and the evaluation store ``data/eval.zarr``.

All metrics and attacks live in one space: the tensor the model takes (docs/spec.md §5).
Images are stored in that space; ``pixel = x + pixel_offset`` maps them back to the
pixel range, which is where the attack bounds come from. For MNIST and CIFAR-10 the offset
is 0 (CIFAR-10 follows RobustBench: pixels in [0, 1], any normalisation inside the model);
for natural images (an ImageNet-layout folder) it is the per-channel mean, as the authors fed
mean-subtracted pixels (any division by a per-channel std is the model's first layer).
"""

from __future__ import annotations

import hashlib
import logging
import pickle
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import xarray as xr
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from saliency_robustness.config import MNIST_SPLIT_SIZES
from saliency_robustness.errors import DataError, one_line
from saliency_robustness.imagefolder import load_imagefolder

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class InputSpace:
    """The model's input space: ``x = pixel - pixel_offset`` with pixels in ``pixel_bounds``."""

    pixel_offset: tuple[float, ...]
    pixel_bounds: tuple[float, float] = (0.0, 1.0)

    def offset_tensor(self, device: torch.device | str = "cpu") -> torch.Tensor:
        return torch.tensor(self.pixel_offset, dtype=torch.float32, device=device).view(1, -1, 1, 1)

    def to_pixels(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.offset_tensor(x.device)

    def from_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        return pixels - self.offset_tensor(pixels.device)

    def input_bounds(self, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel bounds of the input space (``pixel_bounds - pixel_offset``), shape ``(1, C, 1, 1)``."""
        offset = self.offset_tensor(device)
        low, high = self.pixel_bounds
        return low - offset, high - offset

    @classmethod
    def from_attrs(cls, attrs: Mapping[str, Any]) -> InputSpace:
        return cls(
            pixel_offset=tuple(float(v) for v in np.atleast_1d(attrs["pixel_offset"])),
            pixel_bounds=(float(attrs["pixel_bounds"][0]), float(attrs["pixel_bounds"][1])),
        )


MNIST_INPUT_SPACE = InputSpace(pixel_offset=(0.0,))
# the unit of every distance, norm and alignment: L2 in the model's input space (docs/spec.md §5)
DISTANCE = "input-space L2 distance"


# the schema's default data root: the project's own download folder, created when needed;
# any other data root must exist (a mistyped one creates nothing)
DEFAULT_DATA_ROOT = "data"
# torchvision's layout <data_root>/MNIST/raw/: file -> size in bytes (the IDX header plus
# 28 x 28 bytes per image or 1 byte per label)
MNIST_FILES = {
    "train-images-idx3-ubyte": 16 + MNIST_SPLIT_SIZES["train"] * 28 * 28,
    "train-labels-idx1-ubyte": 8 + MNIST_SPLIT_SIZES["train"],
    "t10k-images-idx3-ubyte": 16 + MNIST_SPLIT_SIZES["test"] * 28 * 28,
    "t10k-labels-idx1-ubyte": 8 + MNIST_SPLIT_SIZES["test"],
}


def check_data_root(root: str | Path, holding: str = "MNIST/raw/") -> Path:
    """``root`` as a path; a missing data root other than the default is an error (nothing is created).
    ``holding`` names what the data root should hold, for the hint."""
    path = Path(root).expanduser()
    if not path.is_dir() and str(root) != DEFAULT_DATA_ROOT:
        raise DataError(f"data root {str(root)!r} does not exist (mistyped?); pass --config data_root=<folder holding {holding}>")
    return path


def mnist_files_present(root: Path) -> bool:
    """Whether all four raw MNIST files are there; a file of the wrong size is an error."""
    raw = root / "MNIST" / "raw"
    present = True
    for name, expected in MNIST_FILES.items():
        path = raw / name
        if not path.is_file():
            present = False
            continue
        size = path.stat().st_size
        if size != expected:
            raise DataError(
                f"MNIST file {path} is {size} bytes, expected {expected} (truncated or corrupt): "
                "replace it with a complete copy, or delete it to download MNIST again"
            )
    return present


def _mnist(root: Path, train: bool) -> Any:
    from torchvision.datasets import MNIST

    root = check_data_root(root)
    if mnist_files_present(root):  # use files that are already there; never write into a complete data root
        try:
            return MNIST(str(root), train=train, download=False)
        except Exception as exc:  # unreadable although complete in size
            raise DataError(f"cannot read MNIST under {root}/MNIST/raw/: {one_line(exc)}") from None
    log.info("MNIST not found under %s: downloading", root)
    try:
        return MNIST(str(root), train=train, download=True)
    except Exception as exc:  # offline: URLError, RuntimeError, PermissionError, ...
        raise DataError(
            f"MNIST not found under data_root={str(root)!r} (expected {root}/MNIST/raw/) and the download failed: {one_line(exc)}"
        ) from None


def data_fingerprint(dataset: Mapping[str, Any], data_root: str | Path) -> str:
    """A content hash of the dataset's files where that is cheap (MNIST: the four raw files,
    55 MB; CIFAR-10: the six data batches, 180 MB), recorded with the stores as provenance;
    ``"not computed"`` for image folders."""
    if dataset["kind"] == "mnist":
        paths = [Path(data_root) / "MNIST" / "raw" / name for name in MNIST_FILES]
    elif dataset["kind"] == "cifar10":
        paths = [Path(data_root) / CIFAR10_FOLDER / name for name in CIFAR10_DATA_FILES]
    else:
        return "not computed"
    digest = hashlib.md5(usedforsecurity=False)
    for path in paths:
        digest.update(path.read_bytes())
    return f"md5:{digest.hexdigest()}"


def load_mnist(root: str | Path, train: bool) -> TensorDataset:
    """MNIST as float32 tensors ``(N, 1, 28, 28)`` in [0, 1] and int64 labels."""
    ds = _mnist(Path(root), train)
    images = ds.data.unsqueeze(1).to(torch.float32).div_(255.0)
    return TensorDataset(images, ds.targets.to(torch.int64))


class LabelledTensorDataset(TensorDataset):
    """A :class:`TensorDataset` of (image, label) that also names its classes, in label order."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, classes: Sequence[str]) -> None:
        super().__init__(images, labels)
        self.classes = list(classes)


# torchvision's (and Krizhevsky's) CIFAR-10 python layout <data_root>/cifar-10-batches-py/:
# pickled dicts, "data" uint8 (N, 3072) row-major CHW and "labels", and the class names
CIFAR10_FOLDER = "cifar-10-batches-py"
CIFAR10_TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_TEST_FILES = ("test_batch",)
CIFAR10_DATA_FILES = CIFAR10_TRAIN_FILES + CIFAR10_TEST_FILES
CIFAR10_META_FILE = "batches.meta"
CIFAR10_IMAGE_SHAPE = (3, 32, 32)
CIFAR10_NUM_CLASSES = 10
# RobustBench's convention: pixels in [0, 1]; any normalisation is inside the model
CIFAR10_INPUT_SPACE = InputSpace(pixel_offset=(0.0, 0.0, 0.0))
# the only globals a CIFAR-10 pickle may name: what rebuilding a numpy array needs
CIFAR10_PICKLE_GLOBALS = frozenset(
    {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        # a protocol-2 pickle written by Python 3 builds bytes as _codecs.encode(text, "latin1")
        ("_codecs", "encode"),
    }
)


class _ForbiddenGlobal(pickle.UnpicklingError):
    pass


class _RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that rebuilds numpy arrays and plain containers and nothing else: a pickle
    naming any other global (``os.system``, ...) is refused before anything is called."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in CIFAR10_PICKLE_GLOBALS:
            raise _ForbiddenGlobal(f"{module}.{name}")
        return super().find_class(module, name)


def _read_cifar10_pickle(path: Path) -> dict[str, Any]:
    """The dict pickled in ``path``, its keys as ``str`` (Python 2 pickles, read as latin1 like torchvision)."""
    if not path.is_file():
        raise DataError(f"CIFAR-10 file {path} is missing: restore it, or delete {path.parent} to download CIFAR-10 again (default data root)")
    try:
        with path.open("rb") as f:
            entry = _RestrictedUnpickler(f, encoding="latin1").load()
    except _ForbiddenGlobal as exc:
        raise DataError(f"CIFAR-10 file {path} names the global {exc}, which a CIFAR-10 pickle never needs: not loaded (replace the file)") from None
    except Exception as exc:  # truncated, not a pickle, or an array that does not rebuild
        raise DataError(f"CIFAR-10 file {path} is not a readable pickle (truncated or corrupt?): {one_line(exc)}") from None
    if not isinstance(entry, dict):
        raise DataError(f"CIFAR-10 file {path} holds a {type(entry).__name__}, expected a dict")
    return {(key.decode("latin1") if isinstance(key, bytes) else key): value for key, value in entry.items()}


def _require_keys(path: Path, entry: Mapping[str, Any], keys: Sequence[str]) -> None:
    missing = [key for key in keys if key not in entry]
    if missing:
        raise DataError(f"CIFAR-10 file {path} lacks the key(s) {missing}; it holds {sorted(str(k) for k in entry)[:8]}")


def read_cifar10_batch(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR-10 batch file: images ``uint8 (N, 3, 32, 32)`` and labels ``int64 (N,)``;
    anything else in the file is a one-line :class:`DataError` naming it."""
    path = Path(path)
    entry = _read_cifar10_pickle(path)
    _require_keys(path, entry, ("data", "labels"))
    data, size = entry["data"], int(np.prod(CIFAR10_IMAGE_SHAPE))
    if not isinstance(data, np.ndarray) or data.ndim != 2 or data.shape[1] != size or len(data) == 0:
        found = f"an array of shape {data.shape}" if isinstance(data, np.ndarray) else f"a {type(data).__name__}"
        raise DataError(f"CIFAR-10 file {path}: 'data' is {found}, expected uint8 of shape (N, {size}) with N >= 1")
    if not np.issubdtype(data.dtype, np.integer) or int(data.min()) < 0 or int(data.max()) > 255:
        raise DataError(f"CIFAR-10 file {path}: 'data' is not uint8-valued (dtype {data.dtype}); expected pixels 0..255")
    try:
        labels = np.asarray(entry["labels"])
    except Exception as exc:  # ragged or odd objects
        raise DataError(f"CIFAR-10 file {path}: 'labels' is not a list of integers: {one_line(exc)}") from None
    if labels.shape != (len(data),) or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"CIFAR-10 file {path}: 'labels' has shape {labels.shape} and dtype {labels.dtype}, expected {len(data)} integers")
    if int(labels.min()) < 0 or int(labels.max()) >= CIFAR10_NUM_CLASSES:
        raise DataError(f"CIFAR-10 file {path}: labels range {labels.min()}..{labels.max()}, expected 0..{CIFAR10_NUM_CLASSES - 1}")
    return data.astype(np.uint8).reshape(-1, *CIFAR10_IMAGE_SHAPE), labels.astype(np.int64)


def read_cifar10_class_names(path: str | Path) -> list[str]:
    """The ten class names of ``batches.meta``, in label order."""
    path = Path(path)
    entry = _read_cifar10_pickle(path)
    _require_keys(path, entry, ("label_names",))
    names = entry["label_names"]
    if not isinstance(names, list | tuple) or len(names) != CIFAR10_NUM_CLASSES or not all(isinstance(n, str | bytes) for n in names):
        raise DataError(f"CIFAR-10 file {path}: 'label_names' is not a list of {CIFAR10_NUM_CLASSES} names")
    return [n.decode("latin1") if isinstance(n, bytes) else n for n in names]


def cifar10_folder(data_root: str | Path, train: bool = False) -> Path:
    """``<data_root>/cifar-10-batches-py``. When absent under the default data root, CIFAR-10 is
    downloaded through torchvision; under any other data root an absent folder is an error. An
    existing folder is never written into."""
    root = check_data_root(data_root, holding=f"{CIFAR10_FOLDER}/")
    folder = root / CIFAR10_FOLDER
    if folder.is_dir():
        return folder
    if str(data_root) != DEFAULT_DATA_ROOT:
        raise DataError(
            f"CIFAR-10 not found under data_root={str(data_root)!r}: expected the folder {folder} "
            f"(torchvision's layout: {', '.join(CIFAR10_DATA_FILES)}, {CIFAR10_META_FILE})"
        )
    log.info("CIFAR-10 not found under %s: downloading", root)
    try:
        from torchvision.datasets import CIFAR10

        CIFAR10(str(root), train=train, download=True)
    except Exception as exc:  # offline: URLError, RuntimeError, PermissionError, ...
        raise DataError(
            f"CIFAR-10 not found under data_root={str(data_root)!r} (expected {folder}) and the download failed: {one_line(exc)}"
        ) from None
    if not folder.is_dir():
        raise DataError(f"CIFAR-10 was downloaded under data_root={str(data_root)!r}, but {folder} is not there")
    return folder


def load_cifar10(root: str | Path, train: bool) -> LabelledTensorDataset:
    """CIFAR-10 as float32 tensors ``(N, 3, 32, 32)`` in [0, 1], int64 labels and the class
    names, read from torchvision's layout with a restricted unpickler (torchvision's own reader
    insists on the md5 of every file and unpickles without restriction)."""
    folder = cifar10_folder(root, train)
    batches = [read_cifar10_batch(folder / name) for name in (CIFAR10_TRAIN_FILES if train else CIFAR10_TEST_FILES)]
    classes = read_cifar10_class_names(folder / CIFAR10_META_FILE)
    images = torch.from_numpy(np.concatenate([images for images, _ in batches])).to(torch.float32).div_(255.0)
    labels = torch.from_numpy(np.concatenate([labels for _, labels in batches]))
    return LabelledTensorDataset(images, labels, classes)


def open_split(dataset: Mapping[str, Any], data_root: str | Path, split: str) -> tuple[Dataset, InputSpace]:
    """The ``train`` or ``test`` split of the configured dataset, in the model's input space."""
    kind = dataset["kind"]
    if kind == "mnist":
        return load_mnist(data_root, train=(split == "train")), MNIST_INPUT_SPACE
    if kind == "cifar10":
        return load_cifar10(data_root, train=(split == "train")), CIFAR10_INPUT_SPACE
    if kind == "imagefolder":
        space = InputSpace(pixel_offset=tuple(float(m) for m in dataset["mean"]))
        return load_imagefolder(dataset, data_root, split), space
    raise DataError(f"unknown dataset kind {kind!r}")


def class_names(ds: Dataset) -> list[str] | None:
    """The dataset's class names in label order, when it has them (folder datasets, CIFAR-10)."""
    classes = getattr(ds, "classes", None)
    return list(classes) if classes is not None else None


def seeded_subset(ds: Dataset, n: int | None, seed: int) -> tuple[Dataset, np.ndarray]:
    """A seeded choice of ``n`` samples (all when ``n`` is None), in increasing index order."""
    size = len(ds)  # type: ignore[arg-type]
    if n is not None and n > size:
        log.warning("asked for %d samples, but the split holds %d: using all %d", n, size, size)
    if n is None or n >= size:
        return ds, np.arange(size)
    indices = np.sort(np.random.default_rng(seed).choice(size, size=n, replace=False))
    return Subset(ds, indices.tolist()), indices


def stack(ds: Dataset, batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """All samples of ``ds`` as two tensors (images, labels)."""
    xs, ys = [], []
    for x, y in DataLoader(ds, batch_size=batch_size, shuffle=False):
        xs.append(x)
        ys.append(y)
    return torch.cat(xs), torch.cat(ys)


def eval_dataset(
    images: torch.Tensor | np.ndarray,
    labels: torch.Tensor | np.ndarray,
    dataset_index: Sequence[int] | np.ndarray,
    space: InputSpace,
    class_names: Sequence[str] | None = None,
    attrs: Mapping[str, str] | None = None,
) -> xr.Dataset:
    """The evaluation set as a labelled dataset (dims ``sample, channel, y, x``)."""
    images = np.asarray(images, dtype=np.float32)
    n, c, h, w = images.shape
    ds = xr.Dataset(
        {
            "images": (
                ("sample", "channel", "y", "x"),
                images,
                {"long_name": "evaluation image in the model's input space (pixel - pixel_offset)", "units": "1"},
            ),
            "label": (("sample",), np.asarray(labels, dtype=np.int64), {"long_name": "true class", "units": "1"}),
            "dataset_index": (
                ("sample",),
                np.asarray(dataset_index, dtype=np.int64),
                {"long_name": "index of the image in the test split", "units": "1"},
            ),
        },
        coords={"sample": np.arange(n), "channel": np.arange(c), "y": np.arange(h), "x": np.arange(w)},
        attrs={
            **(attrs or {}),
            "title": "evaluation images",
            "pixel_offset": list(space.pixel_offset),
            "pixel_bounds": list(space.pixel_bounds),
        },
    )
    if class_names is not None:
        ds.attrs["class_names"] = list(class_names)
    return ds


def build_eval_dataset(dataset: Mapping[str, Any], data_root: str | Path) -> xr.Dataset:
    """The configured number of test images, chosen with the configured seed."""
    test, space = open_split(dataset, data_root, "test")
    subset, indices = seeded_subset(test, dataset["n_eval"], dataset["eval_seed"])
    images, labels = stack(subset)
    log.info("evaluation set: %d of %d test images (seed %d)", len(indices), len(test), dataset["eval_seed"])  # type: ignore[arg-type]
    attrs = {"data_fingerprint": data_fingerprint(dataset, data_root)}
    return eval_dataset(images, labels, indices, space, class_names=class_names(test), attrs=attrs)


def eval_tensors(ds: xr.Dataset) -> tuple[torch.Tensor, torch.Tensor]:
    """Images and labels of an ``eval.zarr`` dataset as tensors."""
    return torch.from_numpy(ds["images"].values), torch.from_numpy(ds["label"].values)
