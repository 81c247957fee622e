"""The summary stage: all models' per-image metrics stacked along ``model``
(:mod:`saliency_robustness.stacking`), and statistics with their uncertainty.

Three levels of statistics, each with an interval at the configured level (seeded, so a
rerun of the summary gives the same numbers; the arithmetic is in
:mod:`saliency_robustness.statistics`, and docs/statistics.md says what each interval covers
and how that was measured):

- per model: the median of each quantity over the evaluation images, with its percentile
  bootstrap CI over images;
- per grid point (every training setting but the seed): the mean over replicate seeds of the
  per-model medians, and the gain over the method's smallest strength, each with a Student-t
  CI over seeds that adds the image-resampling variance (``statistics.seed_interval``);
- across models: Spearman correlations of median alignment with median robustness and of
  the strength with median robustness (and alignment), with the interval a rerun with new
  seeds falls in (``statistics.rerun_draws``).

Every statistic is given for two image subsets: ``all`` evaluation images and the
``correct``-ly classified ones. Within a subset, an image counts only where every summarised
quantity is finite, so that both axes of any plot rest on the same images; an image that no
attack could move (``robustness`` NaN) is an attack failure, counted, not a distance of 0 or
infinity. Degenerate models (one class for nearly all images, or accuracy near chance) are
flagged, kept per model, and left out of the grid-point and across-model statistics.

The stage writes the stacked dataset with its statistics (``summary.zarr``) and the three CSV
tables that :mod:`saliency_robustness.tables` reads from it.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from saliency_robustness.stacking import grid_points, healthy_models, load_stacked
from saliency_robustness.statistics import (
    BootstrapOptions,
    finite_spearman,
    image_resampled_medians,
    median_ci,
    rank_correlation,
    rerun_draws,
    seed_interval,
)
from saliency_robustness.stores import provenance, write_store
from saliency_robustness.tables import PER_GRID_POINT, PER_MODEL, grid_table, model_table, trend_table, write_csv
from saliency_robustness.vocabulary import BASE, GRADIENT, METHODS, SUBSETS

log = logging.getLogger(__name__)

# per-image quantities whose median (with CI) and quartiles are summarised
SUMMARISED = (
    "alignment",
    "alignment_cosine",
    "robustness",
    "linearized_robustness",
    "homogeneity",
    "homogeneous_term",
    "bias_term_signed",
    "bound_angle_term",
    "bound_bias_term",
    "edge_correlation",
)
# (x, y) pairs whose Spearman rank correlation over images is given per model
CORRELATED = (("alignment", "robustness"), ("linearized_robustness", "robustness"))


@dataclass(frozen=True)
class Trend:
    """An across-model Spearman correlation of ``x`` with ``y`` (per-model medians, or the
    training ``strength``), over the models of ``method`` (None: every model)."""

    name: str
    x: str
    y: str
    method: str | None = None


def quantities(stacked: xr.Dataset) -> tuple[str, ...]:
    """The summarised quantities: :data:`SUMMARISED`, then the alignment (and its cosine) of
    every attribution map beyond the gradient that the metrics hold."""
    extra = [str(a) for a in stacked["attribution"].values if str(a) != GRADIENT] if "attribution" in stacked.coords else []
    return SUMMARISED + tuple(f"{name}_{a}" for a in extra for name in ("alignment", "alignment_cosine"))


def trends(stacked: xr.Dataset) -> list[Trend]:
    """The across-model trends: alignment against robustness over all models; per training
    method, its strength against robustness and alignment (and, with several methods,
    alignment against robustness within each), with the base model (``train.init: base``) as
    every method's strength-0 point; per extra attribution map, its alignment against
    robustness."""
    methods = list(dict.fromkeys(str(m) for m in stacked["method"].values if str(m) != BASE))
    found = [Trend("median alignment ~ median robustness", "alignment", "robustness")]
    for method in methods:
        strength = METHODS[method].strength
        if strength is not None:
            found += [Trend(f"{strength} ~ median {y}", "strength", y, method) for y in ("robustness", "alignment")]
    if len(methods) > 1:
        found += [Trend(f"{m}: median alignment ~ median robustness", "alignment", "robustness", m) for m in methods]
    extra = [q for q in quantities(stacked) if q not in SUMMARISED and not q.startswith("alignment_cosine_")]
    found += [Trend(f"median {q} ~ median robustness", q, "robustness") for q in extra]
    return found


def subset_mask(stacked: xr.Dataset, subset: str) -> xr.DataArray:
    """``(model, sample)`` mask of the images a subset's statistics rest on: every summarised
    quantity finite, and for ``correct`` the prediction right."""
    mask = xr.ones_like(stacked["alignment"], dtype=bool)
    for var in quantities(stacked):
        mask &= np.isfinite(stacked[var])
    if subset == "correct":
        mask &= stacked["correct"].astype(bool)
    elif subset != "all":
        raise ValueError(f"unknown subset {subset!r} (known: {', '.join(SUBSETS)})")
    return mask


def _values(stacked: xr.Dataset, mask: xr.DataArray, model: str) -> np.ndarray:
    """``quantity x image`` array of a model's summarised quantities on the subset's images."""
    keep = mask.sel(model=model).values
    return np.stack([np.asarray(stacked[v].sel(model=model).values, dtype=np.float64)[keep] for v in quantities(stacked)])


def _masked(stacked: xr.Dataset, mask: xr.DataArray, models: Sequence[str]) -> np.ndarray:
    """``model x quantity x image`` array of the summarised quantities, NaN off the subset."""
    values = np.stack([stacked[v].sel(model=list(models)).values.astype(np.float64) for v in quantities(stacked)], axis=1)
    return np.where(mask.sel(model=list(models)).values[:, None, :], values, np.nan)


def model_statistics(stacked: xr.Dataset, options: BootstrapOptions) -> xr.Dataset:
    """Per model and subset: medians with CIs, quartiles, image counts and rank correlations."""
    models = [str(m) for m in stacked["model"].values]
    summarised = quantities(stacked)
    shape = (len(models), len(SUBSETS), len(summarised))
    stats = {name: np.full(shape, np.nan) for name in PER_MODEL}
    n_images = np.zeros(shape[:2], dtype=np.int64)
    spearman = np.full((len(models), len(SUBSETS), len(CORRELATED)), np.nan)
    for j, subset in enumerate(SUBSETS):
        mask = subset_mask(stacked, subset)
        for i, model in enumerate(models):
            values = _values(stacked, mask, model)
            n_images[i, j] = values.shape[1]
            if values.shape[1] == 0:
                continue
            stats["q25"][i, j], stats["median"][i, j], stats["q75"][i, j] = np.quantile(values, [0.25, 0.5, 0.75], axis=1)
            for k in range(len(summarised)):
                stats["median_ci_low"][i, j, k], stats["median_ci_high"][i, j, k] = median_ci(values[k], options)
            for k, (x, y) in enumerate(CORRELATED):
                spearman[i, j, k] = finite_spearman(values[summarised.index(x)], values[summarised.index(y)])
    level = f"{options.confidence_level:.0%}"
    dims = ("model", "subset", "quantity")
    long_names = {
        "median": "median over the subset's images",
        "median_ci_low": f"lower end of the {level} bootstrap CI of the median",
        "median_ci_high": f"upper end of the {level} bootstrap CI of the median",
        "q25": "first quartile over the subset's images",
        "q75": "third quartile over the subset's images",
    }
    ds = xr.Dataset(
        {f"model_{name}": (dims, values, {"long_name": long_names[name], "units": "unit of the quantity"}) for name, values in stats.items()},
        coords={"model": models, "subset": list(SUBSETS), "quantity": list(summarised), "pair": [f"{x}~{y}" for x, y in CORRELATED]},
    )
    ds["model_n_images"] = (("model", "subset"), n_images, {"long_name": "images the subset's statistics rest on", "units": "1"})
    ds["model_spearman"] = (
        ("model", "subset", "pair"),
        spearman,
        {"long_name": "Spearman rank correlation over the subset's images", "units": "1"},
    )
    ds["in_subset"] = xr.concat([subset_mask(stacked, s) for s in SUBSETS], dim="subset").transpose("model", "sample", "subset")
    ds["in_subset"].attrs = {"long_name": "the image counts in the subset's statistics", "units": "1"}
    robustness = stacked["robustness"]
    ds["attack_failures"] = (
        ("model", "subset"),
        np.stack([(~np.isfinite(robustness)).sum("sample").values, (~np.isfinite(robustness) & stacked["correct"]).sum("sample").values], axis=1),
        {"long_name": "images of the subset no attack could move (robustness NaN; left out)", "units": "1"},
    )
    return ds


def grid_statistics(stacked: xr.Dataset, options: BootstrapOptions) -> xr.Dataset:
    """Per grid point and subset: mean over seeds of the per-model medians with its CI
    (``statistics.seed_interval``), the spread (standard deviation) of the medians over seeds, and the
    gain over the method's first grid point (its smallest strength) with its CI, the images
    paired."""
    healthy = healthy_models(stacked)
    points = grid_points(stacked, healthy)
    per_point = {str(label): i for i, label in enumerate(stacked["setting"].values)}
    lam, strength = ({p: float(stacked[v].values[per_point[p]]) for p in points} for v in ("lam", "strength"))
    method = {p: str(stacked["method"].values[per_point[p]]) for p in points}
    summarised = quantities(stacked)
    shape = (len(points), len(SUBSETS), len(summarised))
    stats = {name: np.full(shape, np.nan) for name in PER_GRID_POINT}
    # each method's gains are over the base model every grid model fine-tuned (train.init
    # base), else over the method's own smallest strength (the first of its grid points)
    base = next((models for point, models in points.items() if method[point] == BASE and models), None)
    baselines = {}
    for point, models in points.items():
        if models and METHODS[method[point]].strength is not None:  # external models have no baseline
            baselines.setdefault(method[point], base or models)
    index = {m: k for k, m in enumerate(healthy)}
    for j, subset in enumerate(SUBSETS):
        # one set of image draws for all models of the subset: gains are paired by image
        medians, draws = image_resampled_medians(_masked(stacked, subset_mask(stacked, subset), healthy), options)
        for i, (point, models) in enumerate(points.items()):
            if not models:
                continue
            rows = [index[m] for m in models]
            estimate = medians[rows].mean(axis=0)
            stats["mean_median"][i, j] = estimate
            low, high = seed_interval(estimate, [medians[rows]], draws[:, rows].mean(axis=1), options.confidence_level)
            stats["mean_median_ci_low"][i, j], stats["mean_median_ci_high"][i, j] = low, high
            if len(models) > 1:
                stats["seed_sd"][i, j] = np.std(medians[rows], axis=0, ddof=1)
            baseline = [index[m] for m in baselines.get(method[point], [])]
            if models is not baselines.get(method[point]) and baseline:
                gain = estimate - medians[baseline].mean(axis=0)
                gain_draws = draws[:, rows].mean(axis=1) - draws[:, baseline].mean(axis=1)
                # the shared base is one fixed model: the interval is conditional on it (the
                # fine-tunes' seeds and the images), so it has no seed term of its own
                seed_terms = [medians[rows]] if base is not None else [medians[rows], medians[baseline]]
                low, high = seed_interval(gain, seed_terms, gain_draws, options.confidence_level)
                stats["gain"][i, j], stats["gain_ci_low"][i, j], stats["gain_ci_high"][i, j] = gain, low, high
    level = f"{options.confidence_level:.0%}"
    how = "Student-t over seeds plus the image-resampling variance; images only for a single seed"
    gain_how = (
        "Student-t over the fine-tunes' seeds, paired images; conditional on the one base model"
        if base is not None
        else "Welch over both grid points' seeds, paired images"
    )
    long_names = {
        "mean_median": "mean over replicate seeds of the per-model median",
        "mean_median_ci_low": f"lower end of the {level} CI ({how})",
        "mean_median_ci_high": f"upper end of the {level} CI ({how})",
        "seed_sd": "standard deviation over seeds of the per-model median",
        "gain": "mean median minus that of the base model (train.init base), else of the method's first grid point (its smallest strength)",
        "gain_ci_low": f"lower end of the gain's {level} CI ({gain_how})",
        "gain_ci_high": f"upper end of the gain's {level} CI ({gain_how})",
    }
    ds = xr.Dataset(
        {
            f"grid_{name}": (("grid_point", "subset", "quantity"), v, {"long_name": long_names[name], "units": "unit of the quantity"})
            for name, v in stats.items()
        },
        coords={"grid_point": list(points), "subset": list(SUBSETS), "quantity": list(summarised)},
    )
    ds = ds.assign_coords(
        grid_lam=("grid_point", [float(lam[p]) for p in points], {"long_name": "lambda of the grid point (NaN: not gradnorm)", "units": "1"}),
        grid_method=("grid_point", [str(method[p]) for p in points], {"long_name": "training method of the grid point"}),
        grid_strength=("grid_point", [float(strength[p]) for p in points], {"long_name": "the method's strength (lambda or epsilon)", "units": "1"}),
    )
    ds["grid_n_seeds"] = ("grid_point", [len(m) for m in points.values()], {"long_name": "non-degenerate replicate models", "units": "1"})
    return ds


def trend_statistics(stacked: xr.Dataset, options: BootstrapOptions) -> xr.Dataset:
    """Across non-degenerate models, per subset: Spearman of median alignment with median
    robustness and of the strength with median robustness (and alignment), one point per
    model, each with the interval a rerun would fall in (``statistics.rerun_draws``, over image
    resamples paired across models), or, where the grid has too few replicate seeds to
    measure their spread, the interval over image resamples alone (``trend_interval``)."""
    healthy = healthy_models(stacked)
    points = [models for models in grid_points(stacked, healthy).values() if models]
    models = [m for group in points for m in group]
    groups, start = [], 0
    for group in points:
        groups.append(list(range(start, start + len(group))))
        start += len(group)
    found = trends(stacked)
    summarised = quantities(stacked)
    strength = stacked["strength"].sel(model=models).values.astype(np.float64) if models else np.array([])
    method = np.array([str(m) for m in stacked["method"].sel(model=models).values] if models else [], dtype=object)
    shape = (len(SUBSETS), len(found))
    estimate, low, high = np.full(shape, np.nan), np.full(shape, np.nan), np.full(shape, np.nan)
    kind = np.full(shape, "", dtype=object)
    n_models = np.full(len(SUBSETS), len(models), dtype=np.int64)
    tail = (1 - options.confidence_level) / 2
    for j, subset in enumerate(SUBSETS):
        if len(models) < 3:
            continue
        medians, draws = image_resampled_medians(_masked(stacked, subset_mask(stacked, subset), models), options)
        for k, trend in enumerate(found):
            chosen = np.array([m for m in range(len(models)) if trend.method is None or method[m] in (trend.method, BASE)])
            position = {m: i for i, m in enumerate(chosen)}
            trend_groups = [[position[m] for m in g if m in position] for g in groups]
            trend_groups = [g for g in trend_groups if g]
            names = [n for n in (trend.x, trend.y) if n != "strength"]
            columns = [summarised.index(n) for n in names]

            def spearman(values: np.ndarray, trend: Trend = trend, names: list[str] = names, chosen: np.ndarray = chosen) -> np.ndarray:
                """The trend's correlation over the last-but-one axis of ``... x model x d`` values."""
                column = {n: values[..., i] for i, n in enumerate(names)}
                column["strength"] = np.broadcast_to(strength[chosen], values.shape[:-1])
                return rank_correlation(column[trend.x], column[trend.y])

            observed = medians[np.ix_(chosen, columns)]
            if np.isfinite(observed).all():
                # the draws' arithmetic: an estimate at the largest value that ties allow is not an ulp outside its interval
                estimate[j, k] = float(spearman(observed))
            else:  # a model without images in the subset: left out
                column = {n: medians[chosen, summarised.index(n)] for n in names} | {"strength": strength[chosen]}
                estimate[j, k] = finite_spearman(column[trend.x], column[trend.y])
            resampled = draws[:, chosen][:, :, columns]
            reruns = rerun_draws(resampled, trend_groups, options.rng()) if len(resampled) else None
            kind[j, k] = "images only" if reruns is None else "rerun"
            values = spearman(resampled if reruns is None else reruns)
            if values.size and np.isfinite(estimate[j, k]):
                low[j, k], high[j, k] = np.nanquantile(values, [tail, 1 - tail])
    level = f"{options.confidence_level:.0%}"
    ds = xr.Dataset(
        {
            "trend_spearman": (("subset", "trend"), estimate, {"long_name": "Spearman rank correlation across models", "units": "1"}),
            "trend_spearman_ci_low": (("subset", "trend"), low, {"long_name": f"lower end of its {level} interval (trend_interval)", "units": "1"}),
            "trend_spearman_ci_high": (("subset", "trend"), high, {"long_name": f"upper end of its {level} interval (trend_interval)", "units": "1"}),
            "trend_interval": (
                ("subset", "trend"),
                kind,
                {
                    "long_name": "what the interval covers: 'rerun', the correlation a retraining with new seeds gives (seed spread "
                    "pooled over grid points, images resampled); 'images only', too few replicate seeds to measure their spread"
                },
            ),
            "trend_n_models": ("subset", n_models, {"long_name": "non-degenerate models in the across-model statistics", "units": "1"}),
            "trend_points": (
                ("subset", "trend"),
                np.tile([int(sum((method == t.method) | (method == BASE)) if t.method else len(models)) for t in found], (len(SUBSETS), 1)),
                {"long_name": "models (points) in this correlation: all non-degenerate ones, or those of its method and the base", "units": "1"},
            ),
        },
        coords={"subset": list(SUBSETS), "trend": [t.name for t in found]},
    )
    return ds


def summarise(stacked: xr.Dataset, options: BootstrapOptions) -> xr.Dataset:
    """The stacked per-image variables with every level of statistics (``summary.zarr``)."""
    summary = xr.merge(
        [stacked, model_statistics(stacked, options), grid_statistics(stacked, options), trend_statistics(stacked, options)],
        compat="override",
        join="outer",
        combine_attrs="drop_conflicts",
    )
    summary.attrs = provenance(
        {"n_resamples": options.n_resamples, "confidence_level": options.confidence_level, "seed": options.seed},
        models=[str(m) for m in stacked["model"].values],
        title="all models stacked along model, with per-model, per-grid-point and across-model statistics",
        excluded_degenerate_models=[str(m) for m in stacked["model"].values if str(m) not in healthy_models(stacked)],
        machines=stacked.attrs.get("machines", "{}"),
    )
    return summary


def summary_stage(
    *,
    models: Sequence[str],
    metrics_stores: Sequence[str | Path],
    model_dirs: Sequence[str | Path],
    output_zarr: str | Path,
    output_csv: str | Path,
    output_grid_csv: str | Path,
    output_trends_csv: str | Path,
    options: BootstrapOptions,
    attributes: Mapping[str, Mapping[str, Any]] | None = None,
) -> None:
    """Write ``summary.zarr`` and its three tables: per model (``summary.csv``), per grid point
    (``summary_grid.csv``) and across models (``summary_trends.csv``). ``attributes`` are the
    external models' free-form labels, which become per-model coordinates."""
    stacked = load_stacked(models, metrics_stores, model_dirs, attributes)
    for model, reason in zip(stacked["model"].values, stacked["degenerate_reason"].values):
        if reason:
            log.warning("model %s is degenerate (%s): shown, flagged, left out of the across-model statistics", model, reason)
    summary = summarise(stacked, options)
    write_store(summary, output_zarr)
    write_csv(model_table(summary), output_csv)
    write_csv(grid_table(summary), output_grid_csv)
    write_csv(trend_table(summary), output_trends_csv)
    log.info("summary of %d models written", len(models))
