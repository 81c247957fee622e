"""Saliency maps: the input gradient of the predicted-class logit (docs/spec.md §2), in ``saliency/<model>.zarr``.

The saliency of the paper is ``g = grad_x Psi^{i*}(x)`` with ``i* = F(x)`` the model's own
prediction, not the gradient of the loss at the true label. It lives in the model's input
space (docs/spec.md §5), the space of the evaluation store's ``images``.

Evaluation mode, batching and store attributes come from :mod:`saliency_robustness.evaluation`.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
import xarray as xr
from torch import nn

from saliency_robustness.evaluation import (
    IMAGE_DIMS,
    Images,
    batch_slices,
    evaluation_mode,
    image_coords,
    image_tensor,
    input_batch,
    model_dtype,
    numpy_dtype,
    stage_attrs,
    variable,
    with_eval_labels,
)
from saliency_robustness.models import load_model
from saliency_robustness.runtime import resolve_device
from saliency_robustness.stores import open_store, write_store

log = logging.getLogger(__name__)


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
