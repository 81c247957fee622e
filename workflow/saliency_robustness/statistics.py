"""The summary's statistics on plain arrays: bootstrap intervals of medians, intervals of
means over replicate seeds, the draws of a rerun with new seeds, and rank correlations.

Pure numpy and scipy, at the level ``options.confidence_level`` and seeded by
``options.seed`` (:class:`BootstrapOptions`), so that a rerun gives the same numbers; the
summary stage (``saliency_robustness.stages.summary``) applies them to the stacked metrics,
and docs/statistics.md says what each interval covers and how that was measured.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.stats import bootstrap, rankdata, spearmanr
from scipy.stats import t as student_t


@dataclass(frozen=True)
class BootstrapOptions:
    """How the confidence intervals are resampled: the config's ``summary`` section, whose
    schema (workflow/schemas/config.schema.yaml) holds the defaults."""

    n_resamples: int  # resamples per interval
    confidence_level: float  # coverage of every interval
    seed: int  # seed of every interval's resampling

    @classmethod
    def from_config(cls, summary: Mapping[str, Any]) -> BootstrapOptions:
        """The options of a validated config's ``summary`` section (defaults filled in)."""
        return cls(n_resamples=summary["n_resamples"], confidence_level=summary["confidence_level"], seed=summary["seed"])

    def rng(self) -> np.random.Generator:
        # a fresh generator per interval: each CI is reproducible on its own, whatever the order
        return np.random.default_rng(self.seed)


def median_ci(values: np.ndarray, options: BootstrapOptions) -> tuple[float, float]:
    """Percentile-bootstrap CI of the median of ``values`` at the configured level (NaN for
    fewer than 2 values)."""
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


def finite_spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman's correlation of ``x`` and ``y`` over the pairs where both are finite; NaN for
    fewer than 3 such pairs or where either is constant on them."""
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


def kendall_tau(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Kendall's tau-b of ``x`` and ``y`` along the last axis (``scipy.stats.kendalltau``'s default, which
    corrects for ties): ``(concordant - discordant) / sqrt((n0 - ties_x) (n0 - ties_y))`` over the ``n0``
    pairs; NaN where either is constant or any value is not finite."""
    x, y = np.broadcast_arrays(np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64))
    sx = np.sign(x[..., :, None] - x[..., None, :])
    sy = np.sign(y[..., :, None] - y[..., None, :])
    upper = np.triu(np.ones(x.shape[-1:] * 2, dtype=bool), k=1)
    sx, sy = sx[..., upper], sy[..., upper]
    with np.errstate(divide="ignore", invalid="ignore"):
        tau = (sx * sy).sum(axis=-1) / np.sqrt((sx != 0).sum(axis=-1) * (sy != 0).sum(axis=-1))
    finite = np.isfinite(x).all(axis=-1) & np.isfinite(y).all(axis=-1)
    return np.where(finite, tau, np.nan)
