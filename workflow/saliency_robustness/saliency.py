"""Saliency maps: the input gradient of the predicted-class logit (docs/spec.md §2), in ``saliency/<model>.zarr``.

The saliency of the paper is ``g = grad_x Psi^{i*}(x)`` with ``i* = F(x)`` the model's own
prediction, not the gradient of the loss at the true label. It lives in the model's input
space (docs/spec.md §5), the space of the evaluation store's ``images``.

The helpers here (evaluation mode, batching, labelled variables, store bookkeeping) are
shared with :mod:`saliency_robustness.metrics`.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import xarray as xr
from torch import nn

from saliency_robustness.models import load_model
from saliency_robustness.runtime import full_precision, progress, resolve_device
from saliency_robustness.stores import open_store, provenance, write_store

log = logging.getLogger(__name__)

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
    modes = {module: module.training for module in model.modules()}
    model.eval()
    try:
        with torch.enable_grad(), full_precision():
            yield model.to(device)
    finally:
        for module, training in modes.items():
            module.training = training


def batch_slices(n: int, batch_size: int, desc: str) -> Iterator[slice]:
    """Consecutive slices of ``batch_size`` samples, under a progress bar."""
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


def predicted_logit_gradient(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(logits, prediction, grad_x Psi^{i*}(x))`` of one batch from one forward and one backward pass."""
    logits = model(x)
    prediction = logits.argmax(dim=1)
    (gradient,) = torch.autograd.grad(logits.gather(1, prediction[:, None]).sum(), x)
    return logits.detach(), prediction, gradient


def compute_saliency(
    model: nn.Module, images: Images, *, batch_size: int = 250, device: torch.device | str | None = None
) -> xr.Dataset:
    """Saliency maps of ``images`` (in the model's input space, dims ``sample, channel, y, x``).

    Returns ``saliency`` (the gradient of the predicted-class logit), ``logits`` and
    ``prediction``. The model runs in eval mode on ``device`` (default: the GPU when there
    is one) and in its own dtype; memory is bounded by ``batch_size`` images.
    """
    device = resolve_device(device)
    images = image_tensor(images)
    dtype = model_dtype(model)
    saliency = np.empty(tuple(images.shape), dtype=numpy_dtype(dtype))
    logits_out: list[np.ndarray] = []
    with evaluation_mode(model, device):
        for rows in batch_slices(len(images), batch_size, desc="saliency"):
            logits, _, gradient = predicted_logit_gradient(model, input_batch(images, rows, device, dtype))
            saliency[rows] = gradient.cpu().numpy()
            logits_out.append(logits.cpu().numpy())
    logits_all = np.concatenate(logits_out)
    log.info("saliency maps of %d images, %d classes", len(images), logits_all.shape[1])
    return xr.Dataset(
        {
            "saliency": variable(
                IMAGE_DIMS, saliency, "saliency map: gradient of the predicted-class logit w.r.t. the input", "logit / input unit"
            ),
            "logits": variable(("sample", "class"), logits_all, "logits Psi(x)", "logit"),
            "prediction": variable(("sample",), logits_all.argmax(axis=1), "predicted class F(x) = argmax Psi(x)", "1"),
        },
        coords={**image_coords(tuple(images.shape)), "class": np.arange(logits_all.shape[1])},
    )


def with_eval_labels(ds: xr.Dataset, eval_ds: xr.Dataset) -> xr.Dataset:
    """``ds`` with the evaluation store's coordinates, its ``label``, and class names when it has them."""
    coords = {name: eval_ds[name] for name in eval_ds.coords if set(eval_ds[name].dims) <= set(ds.dims)}
    ds = ds.assign_coords(coords).assign(label=eval_ds["label"].load())
    names = eval_ds.attrs.get("class_names")
    if "class" in ds.dims and names is not None and len(names) == ds.sizes["class"]:
        ds = ds.assign_coords(class_name=("class", np.asarray(names, dtype=object), {"long_name": "class name"}))
    return ds


def stage_attrs(model_dir: str | Path, eval_ds: xr.Dataset, title: str, config: Mapping[str, Any]) -> dict[str, Any]:
    """Provenance of a per-model store, with the input space it was computed in."""
    return {
        **provenance(config, model=Path(model_dir).name),
        "title": f"{title} of model {Path(model_dir).name}",
        "pixel_offset": eval_ds.attrs.get("pixel_offset", [0.0]),
        "pixel_bounds": eval_ds.attrs.get("pixel_bounds", [0.0, 1.0]),
    }


def saliency_stage(*, model_dir: str | Path, eval_store: str | Path, output: str | Path, batch_size: int) -> None:
    """Write ``saliency/<model>.zarr``: saliency maps, logits, predictions and labels of the evaluation images."""
    eval_ds = open_store(eval_store, ["images", "label"])
    device = resolve_device()
    model = load_model(model_dir, device)
    log.info("saliency of %s on %d images (%s, batch size %d)", Path(model_dir).name, eval_ds.sizes["sample"], device, batch_size)
    ds = compute_saliency(model, eval_ds["images"].values, batch_size=batch_size, device=device)
    ds = with_eval_labels(ds, eval_ds)
    ds.attrs = stage_attrs(model_dir, eval_ds, "saliency maps", {"batch_size": batch_size})
    write_store(ds, output)
