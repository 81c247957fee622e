"""All models' per-image metrics stacked along ``model``, and statistics with their uncertainty.

Three levels of statistics, each with an interval at the configured level (seeded, so a
rerun of the summary gives the same numbers; docs/statistics.md says what each covers and
how that was measured):

- per model: the median of each quantity over the evaluation images, with its percentile
  bootstrap CI over images;
- per grid point (every training setting but the seed): the mean over replicate seeds of the
  per-model medians, and the gain over the method's smallest strength, each with a Student-t
  CI over seeds that adds the image-resampling variance (:func:`seed_interval`);
- across models: Spearman correlations of median alignment with median robustness and of
  the strength with median robustness (and alignment), with the interval a rerun with new
  seeds falls in (:func:`rerun_draws`).

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
from scipy.stats import bootstrap, rankdata, spearmanr
from scipy.stats import t as student_t

from saliency_robustness.config import EXTERNAL, fingerprint
from saliency_robustness.errors import ConfigError, StoreError, one_line
from saliency_robustness.models import ModelSpec, degenerate_reason, load_spec, read_machine
from saliency_robustness.stores import content_digest, open_store, provenance, write_store

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
    and seeds: the summary's interval before rerun coverage was measured, kept for
    ``tests/benchmarks/seed_coverage.py``, which compares it with :func:`seed_interval` and
    :func:`rerun_draws`. With 3 seeds a grid point it treats the seeds as the population and
    undercovers reruns (docs/statistics.md).

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


def _nanmedian(values: np.ndarray) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a model with no image of the subset: NaN
        return np.nanmedian(values, axis=-1)


def image_resampled_medians(values: np.ndarray, options: BootstrapOptions) -> tuple[np.ndarray, np.ndarray]:
    """Per-model medians of ``values`` (``model x quantity x image``, NaN off the subset) over
    all images, ``model x quantity``, and over ``options.n_resamples`` draws of the images with
    replacement, ``resample x model x quantity``. Each draw is the same for every model: all
    models are evaluated on the same images (a paired design)."""
    rng = options.rng()
    n = values.shape[-1]
    draws = [_nanmedian(values[:, :, rng.integers(0, n, n)]) for _ in range(options.n_resamples if n > 1 else 0)]
    return _nanmedian(values), np.asarray(draws).reshape(len(draws), *values.shape[:2])


def seed_interval(
    estimate: np.ndarray, seed_medians: Sequence[np.ndarray], image_draws: np.ndarray, level: float
) -> tuple[np.ndarray, np.ndarray]:
    """Student-t interval of a mean over seeds of per-model medians, or of a difference of two
    such means (the estimate; ``seed_medians`` holds each mean's ``seed x quantity`` medians).

    Its squared standard error adds each mean's seed term ``s^2 / n`` (how much retrained models
    move: other seeds, another machine) and the variance of the estimate over the image
    resamples ``image_draws`` (``resample x quantity``: which images were drawn); its degrees of
    freedom come from the seed terms (Welch-Satterthwaite; the image term counts as known).
    With 3 seeds the t quantile is 4.3, not the 1.96 a bootstrap over the 3 seeds implies: a
    percentile bootstrap over so few seeds took them for the population and undercovered
    reruns (docs/statistics.md). With a single seed in any term no seed spread can be
    measured, and the interval is the percentile interval of the image resamples alone.
    """
    tail = (1 - level) / 2
    if any(len(m) < 2 for m in seed_medians) or len(image_draws) == 0:
        if len(image_draws) == 0:
            return np.full_like(estimate, np.nan), np.full_like(estimate, np.nan)
        low, high = np.nanquantile(image_draws, [tail, 1 - tail], axis=0)
        return low, high
    terms = [np.var(m, axis=0, ddof=1) / len(m) for m in seed_medians]
    se2 = sum(terms) + np.var(image_draws, axis=0, ddof=1)
    welch = sum(term**2 / (len(m) - 1) for term, m in zip(terms, seed_medians))
    with np.errstate(divide="ignore", invalid="ignore"):
        df = np.where(welch > 0, se2**2 / welch, np.inf)
    half = student_t.ppf(1 - tail, df) * np.sqrt(se2)
    return estimate - half, estimate + half


def rerun_draws(columns: np.ndarray, groups: Sequence[Sequence[int]], rng: np.random.Generator) -> np.ndarray | None:
    """What a rerun with new seeds gives for per-model values, one draw per row of ``columns``
    (``draw x model x d``; models grouped by grid point, ``groups``: model indices): a posterior
    predictive draw of a normal model with one mean per grid point and a seed-to-seed
    covariance pooled over grid points. Each draw takes the covariance from its
    inverse-Wishart posterior (``N - G`` degrees of freedom), each grid point's mean from a
    normal around its seeds' mean, then new seeds around that mean. None when the replicates
    are too few to estimate the covariance (fewer than ``max(d, 2)`` degrees of freedom)."""
    n_draws, _, d = columns.shape
    dof = sum(len(g) - 1 for g in groups)
    if dof < max(d, 2):
        return None
    means = {k: columns[:, list(g)].mean(axis=1, keepdims=True) for k, g in enumerate(groups)}
    residuals = np.concatenate([columns[:, list(g)] - means[k] for k, g in enumerate(groups)], axis=1)
    scatter = np.einsum("bni,bnj->bij", residuals, residuals)
    # inverse-Wishart(dof, scatter) as the inverse of a Wishart(dof, scatter^-1) draw; a
    # direction without spread (a constant column) gets a ridge far below any spread that matters
    scale = np.trace(scatter, axis1=1, axis2=2)[:, None, None] / d
    spread = scale[:, 0, 0] > 0
    ridge = np.where(spread[:, None, None], scale, 1.0) * 1e-12 * np.eye(d)
    factor = np.linalg.cholesky(np.linalg.inv(scatter + ridge))
    z = rng.standard_normal((n_draws, dof, d)) @ np.swapaxes(factor, 1, 2)
    covariance = np.linalg.inv(np.swapaxes(z, 1, 2) @ z)
    root = np.linalg.cholesky(covariance) * spread[:, None, None]  # no spread at all: the means
    drawn = np.empty_like(columns)
    for k, g in enumerate(groups):
        mean = means[k] + (rng.standard_normal((n_draws, 1, d)) / np.sqrt(len(g))) @ np.swapaxes(root, 1, 2)
        drawn[:, list(g)] = mean + rng.standard_normal((n_draws, len(g), d)) @ np.swapaxes(root, 1, 2)
    return drawn


def rank_correlation(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Spearman's correlation of ``x`` and ``y`` along the last axis (ties get average ranks,
    as in ``scipy.stats.spearmanr``); NaN where either is constant."""
    rx, ry = (rankdata(v, axis=-1) for v in (x, y))
    rx, ry = rx - rx.mean(axis=-1, keepdims=True), ry - ry.mean(axis=-1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        return (rx * ry).sum(axis=-1) / np.sqrt((rx**2).sum(axis=-1) * (ry**2).sum(axis=-1))


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


def grid_statistics(stacked: xr.Dataset, options: BootstrapOptions) -> xr.Dataset:
    """Per grid point and subset: mean over seeds of the per-model medians with its CI
    (:func:`seed_interval`), the spread (standard deviation) of the medians over seeds, and the
    gain over the method's first grid point (its smallest strength) with its CI, the images
    paired."""
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
                low, high = seed_interval(gain, [medians[rows], medians[baseline]], gain_draws, options.confidence_level)
                stats["gain"][i, j], stats["gain_ci_low"][i, j], stats["gain_ci_high"][i, j] = gain, low, high
    level = f"{options.confidence_level:.0%}"
    how = "Student-t over seeds plus the image-resampling variance; images only for a single seed"
    long_names = {
        "mean_median": "mean over replicate seeds of the per-model median",
        "mean_median_ci_low": f"lower end of the {level} CI ({how})",
        "mean_median_ci_high": f"upper end of the {level} CI ({how})",
        "seed_sd": "standard deviation over seeds of the per-model median",
        "gain": "mean median minus that of the method's first grid point (its smallest strength)",
        "gain_ci_low": f"lower end of the gain's {level} CI (Welch over both grid points' seeds, paired images)",
        "gain_ci_high": f"upper end of the gain's {level} CI (Welch over both grid points' seeds, paired images)",
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
    model, each with the interval a rerun would fall in (:func:`rerun_draws`, over image
    resamples paired across models), or, where the grid has too few replicate seeds to
    measure their spread, the interval over image resamples alone (``trend_interval``)."""
    healthy = healthy_models(stacked)
    points = [models for models in _grid_points(stacked, healthy).values() if models]
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
            chosen = np.array([m for m in range(len(models)) if trend.method is None or method[m] == trend.method])
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
                estimate[j, k] = _spearman(column[trend.x], column[trend.y])
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
    frame = summary[["trend_spearman", "trend_spearman_ci_low", "trend_spearman_ci_high", "trend_interval"]].to_dataframe().reset_index()
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
        machines=stacked.attrs.get("machines", "{}"),
    )
    return summary


def _write_csv(frame: pd.DataFrame, path: str | Path) -> None:
    tmp = Path(path).with_suffix(".csv.partial")
    frame.to_csv(tmp, index=False, float_format="%.6g")
    tmp.replace(path)


def load_stacked(
    models: Sequence[str],
    metrics_stores: Sequence[str | Path],
    model_dirs: Sequence[str | Path],
    attributes: Mapping[str, Mapping[str, Any]] | None = None,
) -> xr.Dataset:
    """Read the models' metrics stores and model directories and stack them (:func:`stack_models`)."""
    metrics = {m: open_store(p, expect={"model": m, "model_digest": content_digest(d)}).load() for m, p, d in zip(models, metrics_stores, model_dirs)}
    specs = {m: load_spec(d) for m, d in zip(models, model_dirs)}
    performance = {m: read_test_accuracy(d) for m, d in zip(models, model_dirs)}
    machines = {m: read_machine(d) for m, d in zip(models, model_dirs)}
    return stack_models(metrics, specs, performance, attributes, machines)


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
    _write_csv(model_table(summary), output_csv)
    _write_csv(grid_table(summary), output_grid_csv)
    _write_csv(trend_table(summary), output_trends_csv)
    log.info("summary of %d models written", len(models))
