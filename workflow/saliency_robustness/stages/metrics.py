"""Every per-image quantity of docs/spec.md §2 (alignment, linearized robustness, the binarized logit,
its homogeneous decomposition and the bound), in ``metrics/<model>.zarr``.

Per batch, one forward pass builds the graph and ``n`` reverse passes on it give every logit's
input gradient (``class_chunk`` of them are held at once). A loop of reverse passes measured
faster on the CPU than one batched reverse pass over one-hot cotangents
(``torch.autograd.grad(..., is_grads_batched=True)``): 0.36 s against 0.56-0.62 s for 100
MNIST images on one thread. One more reverse pass, of the binarized logit
``Psi† = Psi^{i*} - Psi^{j*}``, gives ``g†`` and the bias sum. The network computes in its
own dtype (float32); every norm and inner product is reduced in float64.

The bias sum checks the homogeneous decomposition (docs/spec.md §2)
``Psi†(x) = <x, g†> + sum_b <b, dPsi†/db>``, which holds for networks of ReLU, max-pooling,
linear, convolution and eval-mode batch-norm layers: each such network is positively
homogeneous of degree one in (input, biases) jointly. The bias-like parameter of an eval-mode
batch norm is its effective shift ``beta - mean * gamma / sqrt(var + eps)``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
import xarray as xr
from torch import nn

from saliency_robustness.data import DISTANCE
from saliency_robustness.errors import StoreError, one_line
from saliency_robustness.evaluation import (
    Images,
    batch_slices,
    evaluation_mode,
    image_tensor,
    input_batch,
    model_dtype,
    stage_attrs,
    variable,
    with_eval_labels,
)
from saliency_robustness.homogeneity import BiasProbes
from saliency_robustness.models import load_model
from saliency_robustness.robustness import combine_attacks
from saliency_robustness.runtime import resolve_device
from saliency_robustness.stores import computed_from, open_store, write_store

log = logging.getLogger(__name__)

LOGIT = "logit"

# name -> (long name, units) of every per-sample variable compute_metrics returns
METRICS: dict[str, tuple[str, str]] = {
    "prediction": ("predicted class i* = F(x) = argmax_i Psi^i(x)", "1"),
    "runner_up": ("runner-up class j*: the minimiser j != i* of the linearized robustness", "1"),
    "logit_margin": ("binarized logit Psi†(x) = Psi^{i*}(x) - Psi^{j*}(x)", LOGIT),
    "alignment": ("alignment alpha(x) = |<x, g>| / ||g||, g = saliency", DISTANCE),
    "alignment_cosine": ("alignment cosine |<x, g>| / (||x|| ||g||)", "1"),
    "linearized_robustness": (
        "linearized robustness min_{j != i*} (Psi^{i*} - Psi^j) / ||grad Psi^{i*} - grad Psi^j||",
        DISTANCE,
    ),
    "homogeneous_part": ("homogeneous part <x, g†> of the binarized logit, g† = grad Psi†(x)", LOGIT),
    "bias_part": ("bias part beta† = Psi†(x) - <x, g†> of the binarized logit (remainder)", LOGIT),
    "bias_sum": ("bias part of the binarized logit as sum over bias-like parameters b of <b, dPsi†/db>", LOGIT),
    "homogeneity": ("homogeneity <x, g†> / Psi†(x): share of the binarized logit in its homogeneous part", "1"),
    "bound_angle_term": ("angle term of the bound ||x|| ||g†/||g†|| - g/||g||||", DISTANCE),
    "bound_bias_term": ("bias term of the bound |beta†| / ||g†||", DISTANCE),
    "bound_rhs": ("bound on the linearized robustness: alignment + angle term + bias term", DISTANCE),
    "homogeneous_term": ("homogeneous term <x, g†> / ||g†|| of the linearized robustness", DISTANCE),
    "bias_term_signed": ("signed bias term beta† / ||g†|| (linearized robustness = homogeneous term + this)", DISTANCE),
    "edge_correlation": ("Pearson correlation over pixels of |g| (summed over channels) with the Sobel edge magnitude of the image", "1"),
}

#: the Sobel kernel of the x derivative (its transpose: y)
_SOBEL = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])


def sobel_magnitude(x: torch.Tensor) -> torch.Tensor:
    """The Sobel gradient magnitude (``batch x y x x``, float64) of the channel mean of
    ``x`` (``batch x channel x y x x``), the border replicated: the image's edges."""
    gray = x.double().mean(dim=1, keepdim=True)
    padded = torch.nn.functional.pad(gray, (1, 1, 1, 1), mode="replicate")
    kernel = torch.stack([_SOBEL, _SOBEL.T])[:, None].to(padded)
    gx, gy = torch.nn.functional.conv2d(padded, kernel).unbind(dim=1)
    return torch.hypot(gx, gy)


def edge_correlation(x: torch.Tensor, saliency: torch.Tensor) -> torch.Tensor:
    """Per image, the Pearson correlation over pixels of ``|saliency|`` summed over channels
    with :func:`sobel_magnitude` of ``x`` (both ``batch x channel x y x x``): how much of the
    saliency map's mass lies on the object's edges (1: proportional to the edge map; 0:
    unrelated; NaN for a constant image or map)."""
    mass = saliency.double().abs().sum(dim=1).flatten(1)
    edges = sobel_magnitude(x).flatten(1)
    mass, edges = mass - mass.mean(dim=1, keepdim=True), edges - edges.mean(dim=1, keepdim=True)
    return (mass * edges).sum(dim=1) / (_norm(mass) * _norm(edges))


def _norm(v: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(v, dim=1, dtype=torch.float64)


def _batch_metrics(model: nn.Module, x: torch.Tensor, probes: BiasProbes, class_chunk: int | None) -> dict[str, torch.Tensor]:
    """Every quantity of docs/spec.md §2 for one batch (one forward pass, n + 1 or n + 2 reverse passes)."""
    with probes.attached():
        logits = model(x)
    batch, n = logits.shape
    if n < 2:
        raise ValueError(f"the model has {n} logit(s); linearized robustness needs at least 2 classes")
    rows = torch.arange(batch, device=logits.device)
    prediction = logits.argmax(dim=1)
    values = logits.detach()
    predicted = values[rows, prediction]
    class_chunk = class_chunk if class_chunk is not None else n

    saliency: torch.Tensor | None = None
    if n > class_chunk:  # the predicted-class gradient is needed before the chunks are seen
        (saliency,) = torch.autograd.grad(logits[rows, prediction].sum(), x, retain_graph=True)
        saliency = saliency.flatten(1)
    distance = torch.empty(batch, n, dtype=torch.float64, device=logits.device)
    for start in range(0, n, class_chunk):
        classes = range(start, min(start + class_chunk, n))
        grads = [torch.autograd.grad(logits[:, k].sum(), x, retain_graph=True)[0].flatten(1) for k in classes]
        if saliency is None:  # one chunk holds every class
            saliency = torch.empty_like(grads[0])
            for k, grad in zip(classes, grads):
                saliency[prediction == k] = grad[prediction == k]
        for k, grad in zip(classes, grads):
            distance[:, k] = _norm(saliency - grad)
    assert saliency is not None
    ratio = (predicted[:, None] - values).double() / distance
    ratio[rows, prediction] = torch.inf
    linearized_robustness, runner_up = torch.where(ratio.isnan(), torch.inf, ratio).min(dim=1)
    # gradients equal to the predicted class's for every class: fall back to the second-largest logit
    others = values.masked_fill(torch.nn.functional.one_hot(prediction, n).bool(), -torch.inf)
    runner_up = torch.where(torch.isinf(linearized_robustness), others.argmax(dim=1), runner_up)

    binarized = logits[rows, prediction] - logits[rows, runner_up]
    g_dagger, *probe_grads = torch.autograd.grad(binarized.sum(), [x, *probes.tensors], materialize_grads=True)

    x64, g, g_dag = x.detach().flatten(1).double(), saliency.double(), g_dagger.flatten(1).double()
    psi_dag = binarized.detach().double()
    x_norm, g_norm, g_dag_norm = _norm(x64), _norm(g), _norm(g_dag)
    alignment = (x64 * g).sum(dim=1).abs() / g_norm
    homogeneous_part = (x64 * g_dag).sum(dim=1)
    bias_part = psi_dag - homogeneous_part
    bound_angle_term = x_norm * _norm(g_dag / g_dag_norm[:, None] - g / g_norm[:, None])
    bound_bias_term = bias_part.abs() / g_dag_norm
    homogeneous_term = homogeneous_part / g_dag_norm
    return {
        "prediction": prediction,
        "runner_up": runner_up,
        "logit_margin": psi_dag,
        "alignment": alignment,
        "alignment_cosine": alignment / x_norm,
        "linearized_robustness": linearized_robustness,
        "homogeneous_part": homogeneous_part,
        "bias_part": bias_part,
        "bias_sum": probes.bias_sum(probe_grads, batch),
        "homogeneity": homogeneous_part / psi_dag,
        "bound_angle_term": bound_angle_term,
        "bound_bias_term": bound_bias_term,
        "bound_rhs": alignment + bound_angle_term + bound_bias_term,
        "homogeneous_term": homogeneous_term,
        "bias_term_signed": bias_part / g_dag_norm,
        "edge_correlation": edge_correlation(x.detach(), saliency.view_as(x)),
    }


def decomposition_error(ds: xr.Dataset) -> dict[str, float]:
    """Largest disagreement between the two computations of the bias part, absolute and
    relative to the size of the decomposition's terms ``|<x, g†>| + |beta†|``."""
    error = np.abs(ds["bias_part"].values - ds["bias_sum"].values)
    scale = np.abs(ds["homogeneous_part"].values) + np.abs(ds["bias_part"].values)
    with np.errstate(divide="ignore", invalid="ignore"):
        relative = np.where(scale > 0, error / scale, np.where(error > 0, np.inf, 0.0))
    finite = np.isfinite(error)
    return {
        "max_decomposition_error": float(error[finite].max()) if finite.any() else float("nan"),
        "max_relative_decomposition_error": float(relative[finite].max()) if finite.any() else float("nan"),
    }


def compute_metrics(
    model: nn.Module,
    images: Images,
    *,
    batch_size: int | None = None,
    class_chunk: int | None = None,
    device: torch.device | str | None = None,
) -> xr.Dataset:
    """Every per-image quantity of docs/spec.md §2 (except ``robustness``, which needs attacks) for
    ``images`` in the model's input space (dims ``sample, channel, y, x``).

    The model runs in eval mode on ``device`` (default: the GPU when there is one). Memory is
    bounded by ``batch_size x class_chunk`` input gradients (None: all images, all classes at once). ``bias_sum`` is the bias part
    computed from the biases; the attrs record its largest disagreement with ``bias_part``.
    """
    if class_chunk is not None and class_chunk < 1:
        raise ValueError(f"class_chunk must be positive, got {class_chunk}")
    device = resolve_device(device)
    images = image_tensor(images)
    dtype = model_dtype(model)
    parts: list[dict[str, np.ndarray]] = []
    with evaluation_mode(model, device):
        probes = BiasProbes(model)
        if probes.unknown:
            log.warning(
                "the homogeneous decomposition assumes that %s are positively homogeneous without bias; "
                "max_decomposition_error says whether they are",
                ", ".join(probes.unknown),
            )
        for rows in batch_slices(len(images), batch_size, desc="metrics"):
            batch = _batch_metrics(model, input_batch(images, rows, device, dtype), probes, class_chunk)
            parts.append({name: value.cpu().numpy() for name, value in batch.items()})
    ds = xr.Dataset(
        {
            name: variable(("sample",), np.concatenate([part[name] for part in parts]), long_name, units)
            for name, (long_name, units) in METRICS.items()
        },
        coords={"sample": np.arange(len(images))},
    )
    ds.attrs.update(decomposition_error(ds))
    if probes.unknown:
        ds.attrs["decomposition_unverified_modules"] = probes.unknown
    log.info(
        "metrics of %d images; homogeneous decomposition: max error %.3g (relative %.3g)",
        len(images),
        ds.attrs["max_decomposition_error"],
        ds.attrs["max_relative_decomposition_error"],
    )
    return ds


def check_predictions(ds: xr.Dataset, saliency: xr.Dataset, saliency_store: str | Path) -> None:
    """Raise if the saliency store holds another model's (or another evaluation set's) predictions.

    Near-ties may flip between runs with other batch sizes; only a disagreement where the
    saliency store's own logits separate the two classes clearly is an error.
    """
    if saliency.sizes.get("sample") != ds.sizes["sample"]:
        raise StoreError(
            f"saliency store {saliency_store} has {saliency.sizes.get('sample')} samples, the evaluation store "
            f"{ds.sizes['sample']}; delete it and rerun"
        )
    ours, theirs = ds["prediction"].values, saliency["prediction"].values
    differ = np.flatnonzero(ours != theirs)
    if differ.size == 0:
        return
    logits = saliency["logits"].values[differ].astype(np.float64)
    gap = logits[np.arange(differ.size), theirs[differ]] - logits[np.arange(differ.size), ours[differ]]
    clear = gap > 1e-4 * (1.0 + np.abs(logits).max(axis=1))
    if clear.any():
        raise StoreError(
            f"saliency store {saliency_store} disagrees with the model on the prediction of "
            f"{int(clear.sum())} of {ds.sizes['sample']} images (another model or evaluation set?); delete it and rerun"
        )
    log.warning("%d near-tie predictions differ from the saliency store's (logit gap below 1e-4)", differ.size)


def with_attribution_alignment(ds: xr.Dataset, images: np.ndarray, saliency: xr.Dataset) -> xr.Dataset:
    """``attribution_alignment`` ``|<x, a>| / ||a||`` and its cosine for every attribution map
    ``a`` of the saliency store (dims ``sample, attribution``), reduced in float64, and the
    Integrated Gradients completeness error when the store has it."""
    x = images.reshape(len(images), -1).astype(np.float64)
    maps = saliency["attribution_map"].transpose("attribution", "sample", ...).values
    maps = maps.reshape(maps.shape[0], maps.shape[1], -1).astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        alignment = np.abs(np.einsum("sd,asd->sa", x, maps)) / np.linalg.norm(maps, axis=-1).T
        cosine = alignment / np.linalg.norm(x, axis=1)[:, None]
    dims = ("sample", "attribution")
    ds = ds.assign_coords(attribution=saliency["attribution"].values)
    ds["attribution_alignment"] = variable(dims, alignment, "alignment |<x, a>| / ||a|| of each attribution map a", DISTANCE)
    ds["attribution_alignment_cosine"] = variable(dims, cosine, "alignment cosine |<x, a>| / (||x|| ||a||) of each attribution map a", "1")
    if "ig_completeness_error" in saliency:
        error = saliency["ig_completeness_error"]
        ds["ig_completeness_error"] = (("sample",), error.values, dict(error.attrs))
    return ds


def with_robustness(ds: xr.Dataset, attack_stores: Mapping[str, str | Path], source: Mapping[str, str] | None = None) -> xr.Dataset:
    """Merge in the attack ensemble's ``robustness`` (docs/spec.md §4); each attack store must
    have been computed from ``source`` (:func:`stores.computed_from`) by the attack it is named for."""
    attacks = {name: open_store(path, ["perturbation_norm"], expect={**(source or {}), "attack": name}) for name, path in attack_stores.items()}
    robustness = combine_attacks(attacks)
    try:
        return xr.merge([ds, robustness], join="exact", combine_attrs="override", compat="override")
    except ValueError as exc:
        raise StoreError(f"attack stores do not cover the evaluation samples: {one_line(exc)}") from None


def metrics_stage(
    *,
    model_dir: str | Path,
    eval_store: str | Path,
    saliency_store: str | Path,
    attack_stores: Mapping[str, str | Path],
    output: str | Path,
    batch_size: int,
    class_chunk: int,
) -> None:
    """Write ``metrics/<model>.zarr``: every quantity of docs/spec.md §2 per evaluation image, ``label`` and
    ``correct``, with ``robustness`` when attack stores are given."""
    eval_ds = open_store(eval_store, ["images", "label"])
    source = computed_from(model_dir=model_dir, eval_store=eval_store)
    saliency = open_store(saliency_store, ["prediction", "logits", "attribution_map"], expect=source)
    device = resolve_device()
    model = load_model(model_dir, device)
    log.info(
        "metrics of %s on %d images (%s, batch size %d, class chunk %d)",
        Path(model_dir).name,
        eval_ds.sizes["sample"],
        device,
        batch_size,
        class_chunk,
    )
    ds = compute_metrics(model, eval_ds["images"].values, batch_size=batch_size, class_chunk=class_chunk, device=device)
    check_predictions(ds, saliency, saliency_store)
    ds = with_attribution_alignment(ds, eval_ds["images"].values, saliency)
    ds = with_eval_labels(ds, eval_ds)
    ds["correct"] = xr.DataArray(
        ds["prediction"].values == ds["label"].values,
        dims="sample",
        attrs={"long_name": "prediction equals the true label", "units": "1"},
    )
    if attack_stores:
        ds = with_robustness(ds, attack_stores, source)
    decomposition = {k: v for k, v in ds.attrs.items() if "decomposition" in k}
    ds.attrs = {
        **stage_attrs(model_dir, eval_store, eval_ds, "per-image metrics", {"batch_size": batch_size, "class_chunk": class_chunk}, device),
        **decomposition,
    }
    write_store(ds, output)
