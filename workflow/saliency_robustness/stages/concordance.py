"""The concordance stage (docs/spec.md §7, "Concordance"): do the explanation-quality measures rank the models
as alignment and robustness do?

For every attribution map ``a`` and image subset, the models are ranked by six per-model medians: the map's
alignment ``|<x, a>| / ||a||`` (the paper's α for the gradient), the robustness ρ, and the four per-image scores
of the quality store (:data:`~saliency_robustness.explanation_quality.QUALITY_SCORES`). Kendall's tau-b of every pair
of rankings is given with the interval a rerun with new seeds falls in, built as the summary's across-model trends
are (``statistics.rerun_draws`` over image resamples paired across models; with too few replicate seeds, the
image resamples alone). Each score's per-model median gets a percentile-bootstrap CI over images.

An image counts for a model where the summary counts it in the subset (``in_subset``) and all six quantities of
the map are finite. Degenerate models are left out of the rankings, as from the summary's trends.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr

from saliency_robustness.errors import StoreError
from saliency_robustness.explanation_quality import QUALITY_MEASURES, QUALITY_SCORES
from saliency_robustness.stacking import grid_points, healthy_models
from saliency_robustness.statistics import BootstrapOptions, image_resampled_medians, kendall_tau, median_ci, rerun_draws
from saliency_robustness.stores import open_store, provenance, write_store
from saliency_robustness.tables import write_csv
from saliency_robustness.vocabulary import ATTRIBUTION_LABELS, GRADIENT, SUBSETS

log = logging.getLogger(__name__)

#: the quantities the models are ranked by, with the direction a better explanation (or model) moves them
RANKINGS: dict[str, str] = {
    "alignment": "higher",
    "robustness": "higher",
    "gini": "higher",
    "road_area": "higher",
    "max_sensitivity": "lower",
    "infidelity": "lower",
}
INTERVAL_KINDS = {
    "rerun": "the tau a retraining with new seeds gives (seed spread pooled over grid points, images resampled)",
    "images only": "too few replicate seeds to measure their spread: images resampled only",
}


def stack_quality(summary: xr.Dataset, models: Sequence[str], quality_stores: Sequence[str | Path]) -> xr.Dataset:
    """The quality scores of every model stacked along ``model`` ``(model, attribution, sample)``, checked against the
    summary: the same model, the same images in the same order, and the same predictions."""
    stacked = []
    for model, path in zip(models, quality_stores):
        ds = open_store(path, [*QUALITY_SCORES, "prediction", "label"], expect={"model": model})
        fix = f"delete {path} and rerun snakemake (it rewrites the store)"
        if ds.sizes["sample"] != summary.sizes["sample"] or not np.array_equal(ds["label"].values, summary["label"].sel(model=model).values):
            raise StoreError(f"store {path} holds other evaluation images than the summary; {fix}")
        if not np.array_equal(ds["prediction"].values, summary["prediction"].sel(model=model).values):
            raise StoreError(f"store {path} holds other predictions than the summary's for model {model}; {fix}")
        scores = ds[list(QUALITY_SCORES)]
        stacked.append(scores.drop_vars([c for c in scores.coords if c not in ("attribution", "sample")]).load())
    return xr.concat(stacked, dim=pd.Index(list(models), name="model"), join="exact")


def _quantity(summary: xr.Dataset, quality: xr.Dataset, name: str, attribution: str) -> np.ndarray:
    """``model x image`` values of one ranked quantity of ``attribution``'s map."""
    if name == "robustness":
        return summary["robustness"].values
    if name == "alignment":
        return summary["alignment" if attribution == GRADIENT else f"alignment_{attribution}"].values
    return quality[name].sel(attribution=attribution).values


def concordance(summary: xr.Dataset, quality: xr.Dataset, options: BootstrapOptions) -> xr.Dataset:
    """Per-model medians of the quality scores with CIs, and Kendall's tau between the model rankings."""
    models = [str(m) for m in summary["model"].values]
    attributions = [str(a) for a in quality["attribution"].values]
    rankings = list(RANKINGS)
    healthy = healthy_models(summary)
    points = [group for group in grid_points(summary, healthy).values() if group]
    chosen = [models.index(m) for group in points for m in group]
    groups, start = [], 0
    for group in points:
        groups.append(list(range(start, start + len(group))))
        start += len(group)
    r = len(rankings)
    tau = np.full((len(SUBSETS), len(attributions), r, r), np.nan)
    low, high = tau.copy(), tau.copy()
    kind = np.full(tau.shape, "", dtype=object)
    medians_out = np.full((len(models), len(SUBSETS), len(attributions), len(QUALITY_SCORES)), np.nan)
    ci_low, ci_high = medians_out.copy(), medians_out.copy()
    n_images = np.zeros((len(models), len(SUBSETS), len(attributions)), dtype=np.int64)
    tail = (1 - options.confidence_level) / 2
    for j, subset in enumerate(SUBSETS):
        in_subset = summary["in_subset"].sel(subset=subset).transpose("model", "sample").values.astype(bool)
        for k, attribution in enumerate(attributions):
            values = np.stack([_quantity(summary, quality, name, attribution) for name in rankings], axis=1).astype(np.float64)
            mask = in_subset & np.isfinite(values).all(axis=1)
            values = np.where(mask[:, None, :], values, np.nan)
            n_images[:, j, k] = mask.sum(axis=1)
            for i in range(len(models)):
                for q, score in enumerate(QUALITY_SCORES):
                    kept = values[i, rankings.index(score), mask[i]]
                    if kept.size:
                        medians_out[i, j, k, q] = np.median(kept)
                        ci_low[i, j, k, q], ci_high[i, j, k, q] = median_ci(kept, options)
            if len(chosen) < 3:
                continue
            medians, draws = image_resampled_medians(values[chosen], options)
            for a in range(r):
                tau[j, k, a, a] = low[j, k, a, a] = high[j, k, a, a] = 1.0
                kind[j, k, a, a] = "identity"
                for b in range(a + 1, r):
                    estimate = float(kendall_tau(medians[:, a], medians[:, b]))
                    pair = draws[:, :, [a, b]]
                    reruns = rerun_draws(pair, groups, options.rng()) if len(pair) else None
                    drawn = kendall_tau(*np.moveaxis(pair if reruns is None else reruns, -1, 0))
                    tau[j, k, a, b] = tau[j, k, b, a] = estimate
                    kind[j, k, a, b] = kind[j, k, b, a] = "images only" if reruns is None else "rerun"
                    if np.isfinite(estimate) and np.isfinite(drawn).any():
                        low[j, k, a, b], high[j, k, a, b] = np.nanquantile(drawn, [tail, 1 - tail])
                        low[j, k, b, a], high[j, k, b, a] = low[j, k, a, b], high[j, k, a, b]
    level = f"{options.confidence_level:.0%}"
    pair_dims = ("subset", "attribution", "ranking", "ranking_other")
    per_model = ("model", "subset", "attribution", "score")
    score_units = {"units": "unit of the score"}
    interval = "what the interval covers: " + "; ".join(f"'{k}', {v}" for k, v in INTERVAL_KINDS.items())
    ds = xr.Dataset(
        {
            "quality": quality.to_array("score").transpose("model", "attribution", "sample", "score"),
            "quality_median": (per_model, medians_out, {"long_name": "median over the subset's images", **score_units}),
            "quality_median_ci_low": (per_model, ci_low, {"long_name": f"lower end of the {level} bootstrap CI of the median", **score_units}),
            "quality_median_ci_high": (per_model, ci_high, {"long_name": f"upper end of the {level} bootstrap CI of the median", **score_units}),
            "quality_n_images": (per_model[:-1], n_images, {"long_name": "images the subset's statistics rest on", "units": "1"}),
            "concordance_tau": (
                pair_dims,
                tau,
                {"long_name": "Kendall tau-b between the model rankings by the two quantities (per-model medians)", "units": "1"},
            ),
            "concordance_tau_ci_low": (pair_dims, low, {"long_name": f"lower end of tau's {level} interval (concordance_interval)", "units": "1"}),
            "concordance_tau_ci_high": (pair_dims, high, {"long_name": f"upper end of tau's {level} interval (concordance_interval)", "units": "1"}),
            "concordance_interval": (pair_dims, kind, {"long_name": interval}),
            "concordance_n_models": ((), len(chosen), {"long_name": "non-degenerate models ranked", "units": "1"}),
        },
        coords={
            "model": models,
            "subset": list(SUBSETS),
            "attribution": attributions,
            "score": list(QUALITY_SCORES),
            "ranking": rankings,
            "ranking_other": rankings,
            "better": ("ranking", [RANKINGS[n] for n in rankings], {"long_name": "the direction of a better explanation or a more robust model"}),
            "attribution_label": ("attribution", [ATTRIBUTION_LABELS.get(a, a) for a in attributions]),
        },
    )
    ds["quality"].attrs = {"long_name": "per-image quality scores (quality/<model>.zarr)", "units": "unit of the score"}
    ds["score"].attrs = {"long_name": "; ".join(f"{s}: {QUALITY_MEASURES[s][0]} [{QUALITY_MEASURES[s][1]}]" for s in QUALITY_SCORES)}
    return ds


def concordance_table(ds: xr.Dataset) -> pd.DataFrame:
    """``summary_concordance.csv``: one row per subset, attribution map and pair of rankings."""
    rankings = [str(r) for r in ds["ranking"].values]
    rows = []
    for subset in ds["subset"].values:
        for attribution in ds["attribution"].values:
            for a, first in enumerate(rankings):
                for second in rankings[a + 1 :]:
                    cell = ds.sel(subset=subset, attribution=attribution, ranking=first, ranking_other=second)
                    rows.append({
                        "subset": str(subset),
                        "attribution": str(attribution),
                        "ranking": first,
                        "ranking_better": RANKINGS[first],
                        "ranking_other": second,
                        "ranking_other_better": RANKINGS[second],
                        "kendall_tau": float(cell["concordance_tau"]),
                        "ci_low": float(cell["concordance_tau_ci_low"]),
                        "ci_high": float(cell["concordance_tau_ci_high"]),
                        "interval": str(cell["concordance_interval"].values),
                        "n_models": int(ds["concordance_n_models"]),
                    })
    return pd.DataFrame(rows)


def quality_table(ds: xr.Dataset) -> pd.DataFrame:
    """``summary_quality.csv``: each model's median of every quality score with its CI, per subset and map."""
    frame = ds[["quality_median", "quality_median_ci_low", "quality_median_ci_high"]].to_dataframe().reset_index()
    frame = frame[["model", "subset", "attribution", "score", "quality_median", "quality_median_ci_low", "quality_median_ci_high"]]
    counts = ds["quality_n_images"].to_dataframe().reset_index()[["model", "subset", "attribution", "quality_n_images"]]
    frame = frame.merge(counts, on=["model", "subset", "attribution"])
    return frame.rename(columns={c: c.removeprefix("quality_") for c in frame.columns})


def concordance_stage(
    *,
    models: Sequence[str],
    summary_store: str | Path,
    quality_stores: Sequence[str | Path],
    output_zarr: str | Path,
    output_csv: str | Path,
    output_quality_csv: str | Path,
    options: BootstrapOptions,
) -> None:
    """Write ``concordance.zarr``, ``summary_concordance.csv`` and ``summary_quality.csv``."""
    summary = open_store(summary_store, ["alignment", "robustness", "prediction", "label", "in_subset", "degenerate", "setting"]).load()
    if [str(m) for m in summary["model"].values] != list(models):
        raise StoreError(f"store {summary_store} summarises models {list(summary['model'].values)}, not {list(models)}; rerun snakemake")
    quality = stack_quality(summary, models, quality_stores)
    ds = concordance(summary, quality, options)
    ds.attrs = provenance(
        {"n_resamples": options.n_resamples, "confidence_level": options.confidence_level, "seed": options.seed},
        models=list(models),
        title="explanation-quality scores per model and the concordance of the model rankings they give with alignment and robustness",
        excluded_degenerate_models=[m for m in models if m not in healthy_models(summary)],
    )
    write_store(ds, output_zarr)
    write_csv(concordance_table(ds), output_csv)
    write_csv(quality_table(ds), output_quality_csv)
    log.info("concordance of %d models (%d ranked) written", len(models), int(ds["concordance_n_models"]))
