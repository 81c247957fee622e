"""What every per-model stage shares: the model in evaluation mode, batches of images, dtypes,
labelled variables and the attributes of a per-model store (docs/spec.md §5, §7).

The stages (:mod:`saliency_robustness.stages`) import this module, never each other.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import xarray as xr
from torch import nn

from saliency_robustness.runtime import eval_mode, full_precision, machine, progress
from saliency_robustness.stores import computed_from, provenance

IMAGE_DIMS = ("sample", "channel", "y", "x")
Images = torch.Tensor | np.ndarray | xr.DataArray


def model_dtype(model: nn.Module) -> torch.dtype:
    """The dtype the model computes in (float32 for every trained model; float64 in tests)."""
    first = next(model.parameters(), None)
    return first.dtype if first is not None and first.is_floating_point() else torch.float32


def numpy_dtype(dtype: torch.dtype) -> np.dtype:
    return torch.empty((), dtype=dtype).numpy().dtype


def image_tensor(images: Images) -> torch.Tensor:
    """Images ``(sample, channel, y, x)`` as a tensor, without copying when possible."""
    if isinstance(images, xr.DataArray):
        images = images.values
    tensor = images if isinstance(images, torch.Tensor) else torch.as_tensor(np.asarray(images))
    if tensor.ndim != 4:
        raise ValueError(f"images must have dims (sample, channel, y, x), got shape {tuple(tensor.shape)}")
    if len(tensor) == 0:
        raise ValueError("no images given")
    return tensor.detach()


@contextlib.contextmanager
def evaluation_mode(model: nn.Module, device: torch.device) -> Iterator[nn.Module]:
    """The model in eval mode on ``device`` with gradients enabled and TF32 off (its 10-bit
    mantissa would spoil the float64 reductions); every submodule's train/eval flag is
    restored afterwards.

    Eval mode is what makes the samples of a batch independent (no batch statistics, no
    dropout), so the gradient of a logit summed over the batch is each sample's gradient.
    """
    with eval_mode(model), torch.enable_grad(), full_precision():
        yield model.to(device)


def batch_slices(n: int, batch_size: int | None, desc: str) -> Iterator[slice]:
    """Consecutive slices of ``batch_size`` samples (None: all in one), under a progress bar."""
    batch_size = batch_size if batch_size is not None else max(n, 1)
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    starts = range(0, n, batch_size)
    for start in progress(starts, desc=desc, unit="batch", total=len(starts)):
        yield slice(start, min(start + batch_size, n))


def input_batch(images: torch.Tensor, rows: slice, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A fresh copy of one batch that requires grad (the caller's tensor is never modified)."""
    return images[rows].to(device=device, dtype=dtype, copy=True).requires_grad_(True)


def variable(dims: tuple[str, ...], values: Any, long_name: str, units: str) -> tuple[tuple[str, ...], Any, dict[str, str]]:
    """One labelled data variable for ``xr.Dataset``."""
    return dims, values, {"long_name": long_name, "units": units}


def image_coords(shape: tuple[int, ...]) -> dict[str, np.ndarray]:
    return {dim: np.arange(size) for dim, size in zip(IMAGE_DIMS, shape)}


def with_eval_labels(ds: xr.Dataset, eval_ds: xr.Dataset) -> xr.Dataset:
    """``ds`` with the evaluation store's coordinates, its ``label``, and class names when it has them."""
    coords = {name: eval_ds[name] for name in eval_ds.coords if set(eval_ds[name].dims) <= set(ds.dims)}
    ds = ds.assign_coords(coords).assign(label=eval_ds["label"].load())
    names = eval_ds.attrs.get("class_names")
    if "class" in ds.dims and names is not None and len(names) == ds.sizes["class"]:
        ds = ds.assign_coords(class_name=("class", np.asarray(names, dtype=object), {"long_name": "class name"}))
    return ds


def stage_attrs(
    model_dir: str | Path, eval_store: str | Path, eval_ds: xr.Dataset, title: str, config: Mapping[str, Any], device: torch.device
) -> dict[str, Any]:
    """Provenance of a per-model store (what it was computed from, the machine it was computed
    on), and the input space it was computed in."""
    return {
        **provenance(
            config,
            model=Path(model_dir).name,
            machine=machine(device),
            computed_from=computed_from(model_dir=model_dir, eval_store=eval_store),
        ),
        "title": f"{title} of model {Path(model_dir).name}",
        "pixel_offset": eval_ds.attrs.get("pixel_offset", [0.0]),
        "pixel_bounds": eval_ds.attrs.get("pixel_bounds", [0.0, 1.0]),
    }
