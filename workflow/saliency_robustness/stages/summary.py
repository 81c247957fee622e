"""All models' per-image metrics stacked along ``model``, and statistics with their uncertainty.

Three levels of statistics, each with a percentile-bootstrap confidence interval
(``scipy.stats.bootstrap``, seeded, so a rerun gives the same numbers):

- per model: the median of each quantity over the evaluation images, with its CI;
- per grid point (every training setting but the seed): the mean over replicate seeds of the
  per-model medians, with a CI that resamples seeds and images (one image draw for every
  model: all models are evaluated on the same images);
- across models: Spearman correlations of median alignment with median robustness and of
  lambda with median robustness (and alignment), resampled the same way.

Every statistic is given for two image subsets: ``all`` evaluation images and the
``correct``-ly classified ones. Within a subset, an image counts only where every summarised
quantity is finite, so that both axes of any plot rest on the same images; an image that no
attack could move (``robustness`` NaN) is an attack failure, counted, not a distance of 0 or
infinity. Degenerate models (one class for nearly all images, or accuracy near chance) are
flagged, kept per model, and left out of the grid-point and across-model statistics.
"""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import xarray as xr
from scipy.stats import bootstrap, spearmanr

from saliency_robustness.config import EXTERNAL, fingerprint
from saliency_robustness.errors import ConfigError, StoreError, one_line
from saliency_robustness.models import ModelSpec, degenerate_reason, load_spec, read_machine
from saliency_robustness.stores import open_store, provenance, write_store

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
)
# (x, y) pairs whose Spearman rank correlation over images is given per model
CORRELATED = (("alignment", "robustness"), ("linearized_robustness", "robustness"))
SUBSETS = ("all", "correct")
#: methods in the order models are stacked, and the name of each one's strength (external
#: models have none: nothing the pipeline set)
METHOD_STRENGTH: dict[str, str | None] = {"gradnorm": "lambda", "adversarial": "epsilon", EXTERNAL: None}


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
    extra = [str(a) for a in stacked["attribution"].values if str(a) != "gradient"] if "attribution" in stacked.coords else []
    return SUMMARISED + tuple(f"{name}_{a}" for a in extra for name in ("alignment", "alignment_cosine"))


def trends(stacked: xr.Dataset) -> list[Trend]:
    """The across-model trends: alignment against robustness over all models; per training
    method, its strength against robustness and alignment (and, with several methods,
    alignment against robustness within each); per extra attribution map, its alignment
    against robustness."""
    methods = list(dict.fromkeys(str(m) for m in stacked["method"].values))
    found = [Trend("median alignment ~ median robustness", "alignment", "robustness")]
    for method in methods:
        strength = METHOD_STRENGTH[method]
        if strength is not None:
            found += [Trend(f"{strength} ~ median {y}", "strength", y, method) for y in ("robustness", "alignment")]
    if len(methods) > 1:
        found += [Trend(f"{m}: median alignment ~ median robustness", "alignment", "robustness", m) for m in methods]
    extra = [q for q in quantities(stacked) if q not in SUMMARISED and not q.startswith("alignment_cosine_")]
    found += [Trend(f"median {q} ~ median robustness", q, "robustness") for q in extra]
    return found


@dataclass(frozen=True)
class BootstrapOptions:
    """``summary`` section of the config: how the confidence intervals are resampled."""

    n_resamples: int = 2000
    confidence_level: float = 0.95
    seed: int = 0

    def rng(self) -> np.random.Generator:
        # a fresh generator per interval: each CI is reproducible on its own, whatever the order
        return np.random.default_rng(self.seed)


def median_ci(values: np.ndarray, options: BootstrapOptions) -> tuple[float, float]:
    """Percentile-bootstrap CI of the median of ``values`` (NaN for fewer than 2 values)."""
    values = np.asarray(values, dtype=np.float64)
    if values.size < 2:
        return np.nan, np.nan
    if np.all(values == values[0]):
        return float(values[0]), float(values[0])
    result = bootstrap(
        (values,),
        np.median,
        n_resamples=options.n_resamples,
        confidence_level=options.confidence_level,
        method="percentile",
        vectorized=True,
        rng=options.rng(),
    )
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


def hierarchical_bootstrap(
    values: np.ndarray,
    groups: Sequence[Sequence[int]],
    statistic: Callable[[np.ndarray, list[list[int]]], np.ndarray],
    options: BootstrapOptions,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Point estimate and percentile CI of a statistic of per-model medians, resampling images
    and seeds.

    ``values`` is ``model x quantity x image`` (NaN where an image is not in the subset) and
    ``groups`` lists the models (replicate seeds) of each grid point. Each resample draws the
    evaluation images with replacement, the same draw for every model (all models are
    evaluated on the same images: a paired design), and, within each grid point, its seeds
    with replacement. ``statistic(medians, picked)`` gets the ``model x quantity`` medians over
    the drawn images and the drawn models of each grid point, and returns a vector.
    """
    groups = [list(g) for g in groups]

    def medians(images: np.ndarray) -> np.ndarray:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # a model with no image of the subset: NaN
            return np.nanmedian(values[:, :, images], axis=-1)

    all_images = np.arange(values.shape[-1])
    estimate = np.asarray(statistic(medians(all_images), groups), dtype=np.float64)
    replicated = [k for k, g in enumerate(groups) if len(g) > 1]
    if all_images.size < 2:
        return estimate, np.full_like(estimate, np.nan), np.full_like(estimate, np.nan)

    def resampled(images: np.ndarray, *seeds: np.ndarray) -> np.ndarray:
        picked = list(groups)
        for k, draw in zip(replicated, seeds):
            picked[k] = [groups[k][i] for i in draw]
        return np.asarray(statistic(medians(images), picked), dtype=np.float64)

    result = bootstrap(
        (all_images, *(np.arange(len(groups[k])) for k in replicated)),
        resampled,
        n_resamples=options.n_resamples,
        confidence_level=options.confidence_level,
        method="percentile",
        vectorized=False,
        rng=options.rng(),
    )
    return estimate, np.asarray(result.confidence_interval.low), np.asarray(result.confidence_interval.high)


def _spearman(x: np.ndarray, y: np.ndarray) -> float:
    ok = np.isfinite(x) & np.isfinite(y)
    if ok.sum() < 3 or np.all(x[ok] == x[ok][0]) or np.all(y[ok] == y[ok][0]):
        return np.nan
    return float(spearmanr(x[ok], y[ok]).statistic)


def setting_key(spec: ModelSpec) -> str:
    """What a model's training was, all but the replicate seed: models with equal keys are
    replicates of one grid point."""
    spec_dict = {k: v for k, v in vars(spec).items() if k not in ("name", "seed")}
    spec_dict["training"] = {k: v for k, v in spec.training.items() if k not in ("seed", "seeds")}
    return fingerprint(spec_dict)


def setting_label(spec: ModelSpec) -> str:
    """The grid point's name: the model name without its seed (e.g. ``gradnorm-lambda0.3``);
    an external model is a grid point of its own."""
    if spec.method == EXTERNAL:
        return spec.name
    stem, _, seed = spec.name.rpartition("-seed")
    return stem if stem and seed.isdigit() else spec.name


def _attribute_values(values: list[Any]) -> np.ndarray:
    """One attribute across models: numbers (NaN where a model lacks it), else text ("" where missing)."""
    given = [v for v in values if v is not None]
    if given and all(isinstance(v, int | float) and not isinstance(v, bool) for v in given):
        return np.array([np.nan if v is None else float(v) for v in values])
    return np.array(["" if v is None else str(v) for v in values], dtype=object)


# marks the per-model coordinates that come from models.external attributes
ATTRIBUTE_ROLE = "models.external attribute"


def attribute_coords(names: Sequence[str], attributes: Mapping[str, Mapping[str, Any]], taken: Iterable[str]) -> dict[str, Any]:
    """The external models' free-form ``attributes`` as per-model coordinates (missing for a
    model: NaN or ""); a name that a summary variable already has is an error."""
    keys = sorted({key for attrs in attributes.values() for key in attrs})
    clash = sorted(set(keys) & set(taken))
    if clash:
        raise ConfigError(f"models.external attribute {clash[0]!r} is also the name of a summary variable; rename it")
    return {
        key: (
            "model",
            _attribute_values([attributes.get(m, {}).get(key) for m in names]),
            {"long_name": f"attribute {key} (models.external)", "role": ATTRIBUTE_ROLE},
        )
        for key in keys
    }


def stack_models(
    metrics: Mapping[str, xr.Dataset],
    specs: Mapping[str, ModelSpec],
    performance: Mapping[str, tuple[float, float]],
    attributes: Mapping[str, Mapping[str, Any]] | None = None,
    machines: Mapping[str, Mapping[str, Any]] | None = None,
) -> xr.Dataset:
    """Concatenate per-model metrics along a new ``model`` dim, ordered by method, strength and
    seed (external models last, in the given order), with the training options, the grid point,
    the degenerate flag, the machine each model was trained on (``machines``: its
    ``runtime.machine`` record) and the external models' attributes as per-model variables."""
    order, given = list(METHOD_STRENGTH), list(metrics)

    def position(m: str) -> tuple[int, float, int, int]:
        strength = 0.0 if specs[m].method == EXTERNAL else specs[m].strength
        return order.index(specs[m].method), strength, specs[m].seed, given.index(m)

    names = sorted(metrics, key=position)
    keys = {m: setting_key(specs[m]) for m in names}
    labels = {m: setting_label(specs[m]) for m in names}
    clashing = {labels[a] for a in names for b in names if labels[a] == labels[b] and keys[a] != keys[b]}
    labels = {m: f"{labels[m]} ({keys[m][:6]})" if labels[m] in clashing else labels[m] for m in names}
    stacked = xr.concat(
        [metrics[m].drop_attrs(deep=False) for m in names], dim="model", coords="minimal", compat="override", join="outer"
    )
    stacked = stacked.assign_coords(
        model=("model", names),
        lam=(
            "model",
            [specs[m].lam if specs[m].method == "gradnorm" else np.nan for m in names],
            {"long_name": "regularization strength lambda (per example; NaN: not a gradnorm model)", "units": "1"},
        ),
        method=(
            "model",
            [specs[m].method for m in names],
            {"long_name": "training method: gradnorm, adversarial (L2 PGD) or external (not trained here)"},
        ),
        strength=(
            "model",
            [specs[m].strength for m in names],
            {"long_name": "the method's strength: lambda (gradnorm) or the PGD radius epsilon (adversarial); NaN: external", "units": "1"},
        ),
        sensitivity=("model", [specs[m].sensitivity for m in names], {"long_name": "regularized sensitivity"}),
        p=("model", [specs[m].p for m in names], {"long_name": "power of the gradient norm in the penalty", "units": "1"}),
        seed=("model", [specs[m].seed for m in names], {"long_name": "training seed (replicate)"}),
        setting=("model", [labels[m] for m in names], {"long_name": "grid point: the training setting but the seed"}),
        machine=(
            "model",
            [str((machines or {}).get(m, {}).get("id", "unknown")) for m in names],
            {"long_name": "id of the machine the model was trained on (the summary's machines attribute describes each)"},
        ),
    )
    for name, first in metrics[names[0]].data_vars.items():
        stacked[name].attrs = dict(first.attrs)
    # the set of machines the models were trained on, each described once
    records = {str(r.get("id", "unknown")): {k: v for k, v in r.items() if k != "id"} for r in (machines or {}).values()}
    stacked.attrs["machines"] = json.dumps(records, sort_keys=True)
    accuracy, majority = ([performance[m][k] for m in names] for k in (0, 1))
    # the train stage's verdict, from the same whole-test-set numbers its warning used
    reasons = [degenerate_reason(a, share, specs[m].num_classes) or "" for m, a, share in zip(names, accuracy, majority)]
    per_model = {
        "test_accuracy": (accuracy, "clean accuracy on the whole test set", "1"),
        "eval_accuracy": (
            [float(metrics[m]["correct"].mean()) for m in names],
            "clean accuracy on the evaluation images",
            "1",
        ),
        "majority_class_share": (majority, "share of test images predicted as the most frequent class", "1"),
        "degenerate": ([bool(r) for r in reasons], "degenerate model (left out of the across-model statistics)", "1"),
        "degenerate_reason": (reasons, "why the model counts as degenerate (empty: it does not)", ""),
    }
    for name, (values, long_name, units) in per_model.items():
        stacked[name] = xr.DataArray(values, dims="model", attrs={"long_name": long_name, "units": units} if units else {"long_name": long_name})
    if attributes:
        stacked = stacked.assign_coords(attribute_coords(names, attributes, [str(v) for v in stacked.variables]))
    if "attribution" in stacked.coords:  # each attribution map's alignment as a quantity of its own
        for attribution in stacked["attribution"].values:
            if str(attribution) != "gradient":
                for name in ("alignment", "alignment_cosine"):
                    source = stacked[f"attribution_{name}"]
                    stacked[f"{name}_{attribution}"] = source.sel(attribution=attribution, drop=True).assign_attrs(
                        source.attrs, long_name=f"{source.attrs['long_name']} (a: {attribution})"
                    )
    return stacked


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
    stats = {name: np.full(shape, np.nan) for name in ("median", "median_ci_low", "median_ci_high", "q25", "q75")}
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
                spearman[i, j, k] = _spearman(values[summarised.index(x)], values[summarised.index(y)])
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


def healthy_models(stacked: xr.Dataset) -> list[str]:
    """The models that are not degenerate: those the grid-point and trend statistics use."""
    return [str(m) for m, bad in zip(stacked["model"].values, stacked["degenerate"].values) if not bad]


def _grid_points(stacked: xr.Dataset, healthy: Sequence[str]) -> dict[str, list[str]]:
    """Grid-point label -> its non-degenerate models, in model order."""
    points: dict[str, list[str]] = {}
    for model, label in zip(stacked["model"].values, stacked["setting"].values):
        points.setdefault(str(label), [])
        if str(model) in healthy:
            points[str(label)].append(str(model))
    return points


def _mean_of_medians(medians: np.ndarray, picked: list[list[int]]) -> np.ndarray:
    (seeds,) = picked
    return medians[seeds].mean(axis=0)


def _gain(medians: np.ndarray, picked: list[list[int]]) -> np.ndarray:
    baseline, point = picked
    return medians[point].mean(axis=0) - medians[baseline].mean(axis=0)


def grid_statistics(stacked: xr.Dataset, options: BootstrapOptions) -> xr.Dataset:
    """Per grid point and subset: mean over seeds of the per-model medians, with a CI that
    resamples seeds and images, the spread (standard deviation) of the medians over seeds,
    and the gain over the first grid point (smallest lambda) with its paired CI."""
    healthy = healthy_models(stacked)
    points = _grid_points(stacked, healthy)
    per_point = {str(label): i for i, label in enumerate(stacked["setting"].values)}
    lam, strength = ({p: float(stacked[v].values[per_point[p]]) for p in points} for v in ("lam", "strength"))
    method = {p: str(stacked["method"].values[per_point[p]]) for p in points}
    summarised = quantities(stacked)
    shape = (len(points), len(SUBSETS), len(summarised))
    names = ("mean_median", "mean_median_ci_low", "mean_median_ci_high", "seed_sd", "gain", "gain_ci_low", "gain_ci_high")
    stats = {name: np.full(shape, np.nan) for name in names}
    # each method's gains are over its own smallest strength (the first of its grid points)
    baselines = {}
    for point, models in points.items():
        if models and METHOD_STRENGTH[method[point]] is not None:  # external models have no baseline
            baselines.setdefault(method[point], models)
    for j, subset in enumerate(SUBSETS):
        mask = subset_mask(stacked, subset)
        for i, (point, models) in enumerate(points.items()):
            if not models:
                continue
            baseline = baselines.get(method[point], [])
            if models is not baseline and baseline:
                pair = _masked(stacked, mask, [*baseline, *models])
                groups = [range(len(baseline)), range(len(baseline), len(baseline) + len(models))]
                stats["gain"][i, j], stats["gain_ci_low"][i, j], stats["gain_ci_high"][i, j] = hierarchical_bootstrap(pair, groups, _gain, options)
            values = _masked(stacked, mask, models)
            estimate, low, high = hierarchical_bootstrap(values, [range(len(models))], _mean_of_medians, options)
            stats["mean_median"][i, j], stats["mean_median_ci_low"][i, j], stats["mean_median_ci_high"][i, j] = estimate, low, high
            if len(models) > 1:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", RuntimeWarning)
                    stats["seed_sd"][i, j] = np.std(np.nanmedian(values, axis=-1), axis=0, ddof=1)
    level = f"{options.confidence_level:.0%}"
    long_names = {
        "mean_median": "mean over replicate seeds of the per-model median",
        "mean_median_ci_low": f"lower end of the {level} CI (seeds and images resampled)",
        "mean_median_ci_high": f"upper end of the {level} CI (seeds and images resampled)",
        "seed_sd": "standard deviation over seeds of the per-model median",
        "gain": "mean median minus that of the method's first grid point (its smallest strength)",
        "gain_ci_low": f"lower end of the gain's {level} CI (paired images, seeds resampled)",
        "gain_ci_high": f"upper end of the gain's {level} CI (paired images, seeds resampled)",
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


def _trend_statistic(
    found: Sequence[Trend], summarised: Sequence[str], strength: np.ndarray, method: np.ndarray
) -> Callable[[np.ndarray, list[list[int]]], np.ndarray]:
    def statistic(medians: np.ndarray, picked: list[list[int]]) -> np.ndarray:
        models = np.array([m for seeds in picked for m in seeds])

        def column(name: str, chosen: np.ndarray) -> np.ndarray:
            return strength[chosen] if name == "strength" else medians[chosen, summarised.index(name)]

        values = []
        for trend in found:
            chosen = models if trend.method is None else models[method[models] == trend.method]
            values.append(_spearman(column(trend.x, chosen), column(trend.y, chosen)))
        return np.array(values)

    return statistic


def trend_statistics(stacked: xr.Dataset, options: BootstrapOptions) -> xr.Dataset:
    """Across non-degenerate models, per subset: Spearman of median alignment with median
    robustness and of lambda with median robustness (and alignment), one point per model,
    with CIs that resample images (paired across models) and seeds within grid points."""
    healthy = healthy_models(stacked)
    points = [models for models in _grid_points(stacked, healthy).values() if models]
    models = [m for group in points for m in group]
    groups, start = [], 0
    for group in points:
        groups.append(range(start, start + len(group)))
        start += len(group)
    found = trends(stacked)
    strength = stacked["strength"].sel(model=models).values.astype(np.float64) if models else np.array([])
    method = np.array([str(m) for m in stacked["method"].sel(model=models).values] if models else [], dtype=object)
    shape = (len(SUBSETS), len(found))
    estimate, low, high = np.full(shape, np.nan), np.full(shape, np.nan), np.full(shape, np.nan)
    n_models = np.full(len(SUBSETS), len(models), dtype=np.int64)
    for j, subset in enumerate(SUBSETS):
        if len(models) < 3:
            continue
        values = _masked(stacked, subset_mask(stacked, subset), models)
        statistic = _trend_statistic(found, quantities(stacked), strength, method)
        estimate[j], low[j], high[j] = hierarchical_bootstrap(values, groups, statistic, options)
    level = f"{options.confidence_level:.0%}"
    ds = xr.Dataset(
        {
            "trend_spearman": (("subset", "trend"), estimate, {"long_name": "Spearman rank correlation across models", "units": "1"}),
            "trend_spearman_ci_low": (("subset", "trend"), low, {"long_name": f"lower end of its {level} CI", "units": "1"}),
            "trend_spearman_ci_high": (("subset", "trend"), high, {"long_name": f"upper end of its {level} CI", "units": "1"}),
            "trend_n_models": ("subset", n_models, {"long_name": "non-degenerate models in the across-model statistics", "units": "1"}),
            "trend_points": (
                ("subset", "trend"),
                np.tile([int(sum(method == t.method) if t.method else len(models)) for t in found], (len(SUBSETS), 1)),
                {"long_name": "models (points) in this correlation: all non-degenerate ones, or those of its method", "units": "1"},
            ),
        },
        coords={"subset": list(SUBSETS), "trend": [t.name for t in found]},
    )
    return ds


def _quantity_columns(stats: xr.Dataset, level: str, names: Sequence[str]) -> dict[str, float]:
    """``<quantity>_<statistic>`` columns from the ``<level>_<statistic>`` variables."""
    return {f"{q}_{name}": float(stats[f"{level}_{name}"].sel(quantity=q)) for q in stats["quantity"].values for name in names}


def attribute_names(summary: xr.Dataset) -> list[str]:
    """The per-model coordinates made from the external models' attributes."""
    return [str(name) for name, coord in summary.coords.items() if coord.attrs.get("role") == ATTRIBUTE_ROLE]


def model_table(summary: xr.Dataset) -> pd.DataFrame:
    """One row per model and subset (``summary.csv``)."""
    rows = []
    for model in summary["model"].values:
        m = summary.sel(model=model)
        for subset in SUBSETS:
            s = m.sel(subset=subset)
            row: dict[str, object] = {
                "model": str(model),
                "setting": str(m["setting"].values),
                "method": str(m["method"].values),
                "strength": float(m["strength"]),
                "lambda": float(m["lam"]),
                "seed": int(m["seed"]),
                "machine": str(m["machine"].values),
                "sensitivity": str(m["sensitivity"].values),
                "p": float(m["p"]),
                "test_accuracy": float(m["test_accuracy"]),
                "eval_accuracy": float(m["eval_accuracy"]),
                "majority_class_share": float(m["majority_class_share"]),
                "degenerate": bool(m["degenerate"]),
                "subset": subset,
                "n_images": int(s["model_n_images"]),
                "attack_failures": int(s["attack_failures"]),
            }
            row |= {name: m[name].item() for name in attribute_names(summary)}
            row |= _quantity_columns(s, "model", ("median", "median_ci_low", "median_ci_high", "q25", "q75"))
            for pair in summary["pair"].values:
                x, y = str(pair).split("~")
                row[f"spearman_{x}_{y}"] = float(s["model_spearman"].sel(pair=pair))
            rows.append(row)
    return pd.DataFrame(rows)


def grid_table(summary: xr.Dataset) -> pd.DataFrame:
    """One row per grid point and subset (``summary_grid.csv``)."""
    rows = []
    for point in summary["grid_point"].values:
        g = summary.sel(grid_point=point)
        for subset in SUBSETS:
            s = g.sel(subset=subset)
            row: dict[str, object] = {
                "grid_point": str(point),
                "method": str(g["grid_method"].values),
                "strength": float(g["grid_strength"]),
                "lambda": float(g["grid_lam"]),
                "n_seeds": int(g["grid_n_seeds"]),
                "subset": subset,
            }
            row |= _quantity_columns(
                s, "grid", ("mean_median", "mean_median_ci_low", "mean_median_ci_high", "seed_sd", "gain", "gain_ci_low", "gain_ci_high")
            )
            rows.append(row)
    return pd.DataFrame(rows)


def trend_table(summary: xr.Dataset) -> pd.DataFrame:
    """One row per subset and trend (``summary_trends.csv``)."""
    frame = summary[["trend_spearman", "trend_spearman_ci_low", "trend_spearman_ci_high"]].to_dataframe().reset_index()
    frame["n_models"] = [int(summary["trend_points"].sel(subset=s, trend=t)) for s, t in zip(frame["subset"], frame["trend"])]
    frame["excluded_degenerate_models"] = " ".join(json.loads(summary.attrs.get("excluded_degenerate_models", "[]")))
    return frame.rename(columns=lambda c: c.removeprefix("trend_"))


def read_test_accuracy(model_dir: str | Path) -> tuple[float, float]:
    """The clean test accuracy and the majority-class share of the test predictions that the
    train stage wrote to ``models/<model>/test_accuracy.json`` (what its degenerate warning used)."""
    path = Path(model_dir) / "test_accuracy.json"
    try:
        performance = json.loads(path.read_text())
        return float(performance["test_accuracy"]), float(performance["majority_class_share"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise StoreError(f"cannot read the test accuracy {path} ({one_line(exc)}); delete {model_dir} and rerun") from None


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
        machines=stacked.attrs["machines"],
    )
    return summary


def _write_csv(frame: pd.DataFrame, path: str | Path) -> None:
    tmp = Path(path).with_suffix(".csv.partial")
    frame.to_csv(tmp, index=False, float_format="%.6g")
    tmp.replace(path)


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
    metrics = {m: open_store(p).load() for m, p in zip(models, metrics_stores)}
    specs = {m: load_spec(d) for m, d in zip(models, model_dirs)}
    performance = {m: read_test_accuracy(d) for m, d in zip(models, model_dirs)}
    machines = {m: read_machine(d) for m, d in zip(models, model_dirs)}
    stacked = stack_models(metrics, specs, performance, attributes, machines)
    for model, reason in zip(stacked["model"].values, stacked["degenerate_reason"].values):
        if reason:
            log.warning("model %s is degenerate (%s): shown, flagged, left out of the across-model statistics", model, reason)
    summary = summarise(stacked, options)
    write_store(summary, output_zarr)
    _write_csv(model_table(summary), output_csv)
    _write_csv(grid_table(summary), output_grid_csv)
    _write_csv(trend_table(summary), output_trends_csv)
    log.info("summary of %d models written", len(models))
