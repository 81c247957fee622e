"""The explanation-quality stage (docs/spec.md §2, "Explanation quality"): per evaluation image and per attribution
map of the saliency store, the Gini index, the ROAD curves and the area between them, max-sensitivity and
infidelity (:mod:`saliency_robustness.explanation_quality`), in ``quality/<model>.zarr``.

Every measure explains the class the saliency store's maps explain, the model's own prediction at ``x``. Gini,
ROAD and infidelity read the stored maps; max-sensitivity recomputes each map at perturbed inputs with the
saliency stage's own options (:func:`saliency_robustness.attributions.explanation`). The perturbations of an
image are the same for every attribution map (one seed per batch: ``seed`` plus the batch's first image), so the
maps are compared on the same draws.
"""

from __future__ import annotations

import json
import logging
import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import xarray as xr
from torch import nn

from saliency_robustness.attributions import AttributionOptions, explanation
from saliency_robustness.data import InputSpace
from saliency_robustness.errors import StoreError
from saliency_robustness.evaluation import Images, batch_slices, evaluation_mode, image_tensor, model_dtype, stage_attrs, variable, with_eval_labels
from saliency_robustness.explanation_quality import QUALITY_MEASURES, gini, infidelity, max_sensitivity, road
from saliency_robustness.models import load_model
from saliency_robustness.runtime import resolve_device
from saliency_robustness.stores import computed_from, open_store, write_store

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class QualityOptions:
    """The ``quality`` section of a validated config (the schema holds the defaults)."""

    batch_size: int
    seed: int
    fractions: tuple[float, ...]
    road_noise_std: float
    sensitivity_radius: float
    sensitivity_samples: int
    infidelity_std: float
    infidelity_perturbations: int
    infidelity_normalize: bool

    @classmethod
    def from_config(cls, quality: Mapping[str, Any]) -> QualityOptions:
        road_, sensitivity, fidelity = quality["road"], quality["max_sensitivity"], quality["infidelity"]
        return cls(
            batch_size=int(quality["batch_size"]),
            seed=int(quality["seed"]),
            fractions=tuple(float(f) for f in road_["fractions"]),
            road_noise_std=float(road_["noise_std"]),
            sensitivity_radius=float(sensitivity["radius"]),
            sensitivity_samples=int(sensitivity["n_samples"]),
            infidelity_std=float(fidelity["std"]),
            infidelity_perturbations=int(fidelity["n_perturbations"]),
            infidelity_normalize=bool(fidelity["normalize"]),
        )


def compute_quality(
    model: nn.Module,
    images: Images,
    maps: np.ndarray,
    prediction: np.ndarray,
    *,
    methods: Sequence[str],
    options: QualityOptions,
    attributions: AttributionOptions,
    space: InputSpace,
    device: torch.device | str | None = None,
) -> tuple[xr.Dataset, dict[str, dict[str, float]]]:
    """The measures of :data:`QUALITY_MEASURES` for ``maps`` ``(attribution, sample, C, H, W)`` (one per method of
    ``methods``) of ``images`` ``(sample, C, H, W)``, explaining class ``prediction`` ``(sample,)``, and the seconds
    each measure took per method."""
    device = resolve_device(device)
    x_all = image_tensor(images)
    if maps.shape != (len(methods), *x_all.shape) or prediction.shape != (len(x_all),):
        raise ValueError(f"need maps {(len(methods), *x_all.shape)} and predictions ({len(x_all)},), got {maps.shape} and {prediction.shape}")
    n, f = len(x_all), len(options.fractions)
    out = {name: np.full((len(methods), n), np.nan) for name in ("gini", "road_area", "max_sensitivity", "infidelity")}
    curves = {name: np.full((len(methods), n, f), np.nan) for name in ("road_morf", "road_lerf")}
    seconds: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    dtype = model_dtype(model)
    with evaluation_mode(model, device):
        for rows in batch_slices(n, options.batch_size, desc="explanation quality"):
            x = x_all[rows].to(device=device, dtype=dtype)
            target = torch.as_tensor(prediction[rows], device=device)
            seed = options.seed + rows.start
            for k, method in enumerate(methods):
                a = torch.as_tensor(maps[k, rows], device=device, dtype=dtype)
                clock = time.perf_counter()
                out["gini"][k, rows] = gini(a).cpu().numpy()
                seconds["gini"][method] += time.perf_counter() - clock
                clock = time.perf_counter()
                result = road(model, x, target, a, fractions=options.fractions, noise_std=options.road_noise_std, seed=seed)
                curves["road_morf"][k, rows] = result.morf.double().cpu().numpy()
                curves["road_lerf"][k, rows] = result.lerf.double().cpu().numpy()
                out["road_area"][k, rows] = result.area_between.cpu().numpy()
                seconds["road"][method] += time.perf_counter() - clock
                clock = time.perf_counter()
                out["max_sensitivity"][k, rows] = (
                    max_sensitivity(
                        model,
                        x,
                        target,
                        explanation=explanation(method, attributions, space, seed),
                        radius=options.sensitivity_radius,
                        n_samples=options.sensitivity_samples,
                        seed=seed,
                    )
                    .double()
                    .cpu()
                    .numpy()
                )
                seconds["max_sensitivity"][method] += time.perf_counter() - clock
                clock = time.perf_counter()
                out["infidelity"][k, rows] = (
                    infidelity(
                        model,
                        x,
                        target,
                        a,
                        n_perturbations=options.infidelity_perturbations,
                        std=options.infidelity_std,
                        seed=seed,
                        normalize=options.infidelity_normalize,
                    )
                    .double()
                    .cpu()
                    .numpy()
                )
                seconds["infidelity"][method] += time.perf_counter() - clock
    per_image = ("attribution", "sample")
    data = {name: variable(per_image, values, *QUALITY_MEASURES[name]) for name, values in out.items()}
    data |= {name: variable((*per_image, "fraction"), values, *QUALITY_MEASURES[name]) for name, values in curves.items()}
    ds = xr.Dataset(
        data,
        coords={
            "attribution": list(methods),
            "sample": np.arange(n),
            "fraction": ("fraction", np.asarray(options.fractions), {"long_name": "fraction of the pixels removed", "units": "1"}),
        },
    )
    ds = ds[["gini", "road_morf", "road_lerf", "road_area", "max_sensitivity", "infidelity"]]
    return ds, {measure: dict(per_method) for measure, per_method in seconds.items()}


def quality_stage(
    *,
    model_dir: str | Path,
    eval_store: str | Path,
    saliency_store: str | Path,
    output: str | Path,
    options: QualityOptions,
    attributions: AttributionOptions,
) -> None:
    """Write ``quality/<model>.zarr``: the measures of every attribution map of the model's saliency store."""
    eval_ds = open_store(eval_store, ["images", "label"])
    saliency = open_store(saliency_store, ["prediction", "attribution_map"], expect=computed_from(model_dir=model_dir, eval_store=eval_store))
    methods = [str(m) for m in saliency["attribution"].values]
    unknown = sorted(set(methods) - set(attributions.names))
    if unknown:
        raise StoreError(f"store {saliency_store} holds attribution(s) {', '.join(unknown)} that the config's saliency.methods lack; rerun snakemake")
    device = resolve_device()
    model = load_model(model_dir, device)
    log.info(
        "explanation quality of %s: %d images x %s (%s, batch size %d)",
        Path(model_dir).name,
        eval_ds.sizes["sample"],
        ", ".join(methods),
        device,
        options.batch_size,
    )
    clock = time.perf_counter()
    ds, seconds = compute_quality(
        model,
        eval_ds["images"].values,
        saliency["attribution_map"].values,
        saliency["prediction"].values,
        methods=methods,
        options=options,
        attributions=attributions,
        space=InputSpace.from_attrs(eval_ds.attrs),
        device=device,
    )
    total = time.perf_counter() - clock
    for measure, per_method in seconds.items():
        log.info("%s: %s", measure, ", ".join(f"{m} {s:.1f} s" for m, s in per_method.items()))
    log.info("explanation quality of %d images took %.1f s", eval_ds.sizes["sample"], total)
    ds = with_eval_labels(ds.assign(prediction=saliency["prediction"].load()), eval_ds)
    config = {"quality": asdict(options), "attributions": attributions.as_config()}
    ds.attrs = {
        **stage_attrs(model_dir, eval_store, eval_ds, "explanation quality", config, device),
        "quality_seconds": total,
        "quality_seconds_per_measure": json.dumps(seconds, sort_keys=True),
    }
    write_store(ds, output)
