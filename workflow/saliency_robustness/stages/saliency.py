"""Saliency maps: the input gradient of the predicted-class logit (docs/spec.md §2), in ``saliency/<model>.zarr``.

The saliency of the paper is ``g = grad_x Psi^{i*}(x)`` with ``i* = F(x)`` the model's own
prediction, not the gradient of the loss at the true label. It lives in the model's input
space (docs/spec.md §5), the space of the evaluation store's ``images``.

Beyond the paper, the attribution methods people use (:mod:`saliency_robustness.attributions`:
SmoothGrad and Integrated Gradients through Captum, of the predicted-class logit and signed) are
stored as ``attribution_map(attribution, sample, channel, y, x)``, the gradient among them, with
Integrated Gradients' completeness error ``sum IG - (Psi^{i*}(x) - Psi^{i*}(baseline))`` per image
(docs/spec.md §2).

Evaluation mode, batching and store attributes come from :mod:`saliency_robustness.evaluation`.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
import xarray as xr
from torch import nn

from saliency_robustness.attributions import AttributionOptions, captum_attributions, predicted_logit_gradient
from saliency_robustness.data import InputSpace
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


def compute_saliency(
    model: nn.Module,
    images: Images,
    *,
    batch_size: int | None = None,
    device: torch.device | str | None = None,
    attributions: AttributionOptions | None = None,
    space: InputSpace | None = None,
) -> xr.Dataset:
    """Saliency maps of ``images`` (in the model's input space, dims ``sample, channel, y, x``).

    Returns ``saliency`` (the gradient of the predicted-class logit), ``logits``,
    ``prediction`` and ``attribution_map`` (one map per method of ``attributions``, the gradient
    first), with ``ig_completeness_error`` when Integrated Gradients is among them. The model
    runs in eval mode on ``device`` (default: the GPU when there is one) and in its own dtype;
    memory is bounded by ``batch_size`` images (None: all at once; times the methods' samples or steps).
    """
    device = resolve_device(device)
    options = attributions or AttributionOptions.gradient_only()
    methods = options.names
    images = image_tensor(images)
    space = space or InputSpace(pixel_offset=(0.0,) * images.shape[1])
    dtype = model_dtype(model)
    maps = np.empty((len(methods), *images.shape), dtype=numpy_dtype(dtype))
    completeness = np.full(len(images), np.nan)
    logits_out: list[np.ndarray] = []
    with evaluation_mode(model, device):
        for rows in batch_slices(len(images), batch_size, desc="saliency"):
            x = input_batch(images, rows, device, dtype)
            logits, prediction, gradient = predicted_logit_gradient(model, x)
            maps[0, rows] = gradient.cpu().numpy()
            logits_out.append(logits.cpu().numpy())
            if len(methods) > 1:
                extra, delta = captum_attributions(model, x, prediction, options, space, seed=rows.start)
                for k, method in enumerate(methods[1:], start=1):
                    maps[k, rows] = extra[method].cpu().numpy()
                if delta is not None:
                    completeness[rows] = delta.double().cpu().numpy()
    logits_all = np.concatenate(logits_out)
    log.info("saliency maps of %d images, %d classes; attributions: %s", len(images), logits_all.shape[1], ", ".join(methods))
    ds = xr.Dataset(
        {
            "saliency": variable(
                IMAGE_DIMS, maps[0], "saliency map: gradient of the predicted-class logit w.r.t. the input", "logit / input unit"
            ),
            "attribution_map": variable(
                ("attribution", *IMAGE_DIMS), maps, "attribution map of the predicted-class logit (signed), per method", "method's own"
            ),
            "logits": variable(("sample", "class"), logits_all, "logits Psi(x)", "logit"),
            "prediction": variable(("sample",), logits_all.argmax(axis=1), "predicted class F(x) = argmax Psi(x)", "1"),
        },
        coords={**image_coords(tuple(images.shape)), "class": np.arange(logits_all.shape[1]), "attribution": methods},
    )
    if "integrated_gradients" in methods:
        ds["ig_completeness_error"] = variable(
            ("sample",), completeness, "Integrated Gradients completeness error sum IG - (Psi(x) - Psi(baseline)), predicted logit", "logit"
        )
        log.info("Integrated Gradients: largest completeness error %.3g", float(np.nanmax(np.abs(completeness))))
    return ds


def saliency_stage(
    *,
    model_dir: str | Path,
    eval_store: str | Path,
    output: str | Path,
    batch_size: int,
    attributions: AttributionOptions | None = None,
) -> None:
    """Write ``saliency/<model>.zarr``: saliency maps (and the other attribution maps), logits,
    predictions and labels of the evaluation images."""
    attributions = attributions or AttributionOptions.gradient_only()
    eval_ds = open_store(eval_store, ["images", "label"])
    device = resolve_device()
    model = load_model(model_dir, device)
    log.info("saliency of %s on %d images (%s, batch size %d)", Path(model_dir).name, eval_ds.sizes["sample"], device, batch_size)
    space = InputSpace.from_attrs(eval_ds.attrs)
    ds = compute_saliency(model, eval_ds["images"].values, batch_size=batch_size, device=device, attributions=attributions, space=space)
    ds = with_eval_labels(ds, eval_ds)
    config = {"batch_size": batch_size, "attributions": attributions.as_config()}
    ds.attrs = stage_attrs(model_dir, eval_store, eval_ds, "saliency maps", config, device)
    write_store(ds, output)
