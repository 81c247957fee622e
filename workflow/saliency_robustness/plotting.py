"""What every figure shares: the summary store read as tables, the names and styles it is drawn
with, points with their CIs, and the footer that states what the statistics rest on.

Every statistic drawn is read from the summary store (medians with bootstrap CIs per model,
means over seeds per grid point, Spearman trends across models), never recomputed here. The
intervals are at the confidence level the summary stage was configured with, read from the
store.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
import xarray as xr

from saliency_robustness.errors import StoreError, one_line
from saliency_robustness.vocabulary import (
    ADVERSARIAL,
    ATTRIBUTION_LABELS,
    BASE,
    BASE_MODEL,
    EXTERNAL,
    GRADIENT,
    GRADNORM,
    GRID_STATISTICS,
    METHODS,
    MODEL_STATISTICS,
)

#: axis names of the quantities drawn; their units are read from the summary store
NAMES = {
    "robustness": "robustness ρ(x)",
    "alignment": "alignment α(x)",
    "alignment_cosine": "alignment |cos∠(x, g)|",
    "linearized_robustness": "linearized robustness ρ̃(x)",
    "homogeneity": "homogeneity ⟨x, g†⟩ / Ψ†(x)",
    "homogeneous_term": "homogeneous term ⟨x, ḡ†⟩",
    "bias_term_signed": "signed bias term β†/‖g†‖",
}
#: per training method: marker of a model, marker of a grid point (mean over seeds), palette by strength
METHOD_STYLE = {
    BASE: ("*", "*", "dark:black"),
    GRADNORM: ("o", "D", "viridis"),
    ADVERSARIAL: ("s", "h", "flare"),
    EXTERNAL: ("P", "p", "Dark2"),
}
#: how a grid point's label names each trained method's strength (``gradnorm-lambda0.3`` -> ``λ=0.3``)
STRENGTH_LABELS = {GRADNORM: "λ=", ADVERSARIAL: "PGD ε="}
#: how figures name the base model that every grid model fine-tunes (train.init base)
BASE_LABEL = "base (λ=ε=0)"
#: what each image subset is, in the footer
SUBSET_DESCRIPTIONS = {"all": "all evaluation images", "correct": "correctly classified images"}


@dataclass(frozen=True)
class FigureInputs:
    """What a figure draws from: the summary store and the figure options, for the gallery the
    evaluation images and the saliency stores by model name, and for the explanation-quality
    figures the concordance store."""

    summary: xr.Dataset
    options: Mapping[str, Any]
    eval_ds: xr.Dataset | None = None
    saliency: Mapping[str, xr.Dataset] = field(default_factory=dict)
    concordance: xr.Dataset | None = None  # concordance.zarr, for the explanation-quality figures

    @property
    def subset(self) -> str:
        return str(self.options["subset"])

    def models(self) -> pd.DataFrame:
        return model_frame(self.summary, self.subset)

    def grid(self) -> pd.DataFrame:
        return grid_frame(self.summary, self.subset)

    def label(self, quantity: str) -> str:
        """``quantity``'s axis name with the units the summary store gives it."""
        units = self.summary[quantity].attrs.get("units", "1")
        return f"{quantity_name(quantity)} ({'unitless' if units == '1' else units})"

    @property
    def methods(self) -> list[str]:
        """The training methods of the summary, in stacking order."""
        return list(dict.fromkeys(str(m) for m in self.summary["method"].values))

    @property
    def attributions(self) -> list[str]:
        """``gradient`` and every other attribution map the summary holds (its ``attribution``
        coordinate; a summary without one holds the gradient only)."""
        stored = [str(a) for a in self.summary["attribution"].values] if "attribution" in self.summary.coords else []
        return [GRADIENT] + [a for a in stored if a != GRADIENT]

    def distance_units(self) -> str:
        return str(self.summary["robustness"].attrs.get("units", "distance"))


def quantity_name(quantity: str) -> str:
    """Axis name of a summarised quantity (an attribution map's alignment: ``α_smoothgrad(x)``)."""
    if quantity in NAMES:
        return NAMES[quantity]
    for stem, name in (("alignment_cosine_", "alignment |cos∠(x, a)|, a = "), ("alignment_", "alignment α(x) of ")):
        if quantity.startswith(stem):
            attribution = quantity.removeprefix(stem)
            return name + ATTRIBUTION_LABELS.get(attribution, attribution)
    return quantity.replace("_", " ")


def display_label(grid_point: str) -> str:
    """``gradnorm-lambda0.3`` -> ``λ=0.3``, ``pgd-eps1.5`` -> ``PGD ε=1.5`` (the grid point: all
    its training setting but the seed)."""
    if grid_point == BASE_MODEL:
        return BASE_LABEL
    for method, shown in STRENGTH_LABELS.items():
        prefix = METHODS[method].prefix
        if prefix:
            grid_point = grid_point.replace(prefix, shown)
    return grid_point


def model_frame(summary: xr.Dataset, subset: str) -> pd.DataFrame:
    """One row per model: its grid point, lambda, seed, flags, accuracy and the stored
    median with CI of every summarised quantity on ``subset``."""
    frame = pd.DataFrame(
        {
            "model": [str(v) for v in summary["model"].values],
            "grid_point": [str(v) for v in summary["setting"].values],
            "lam": summary["lam"].values,
            "method": [str(v) for v in summary["method"].values],
            "strength": summary["strength"].values,
            "seed": summary["seed"].values,
            "degenerate": summary["degenerate"].values.astype(bool),
            "test_accuracy": summary["test_accuracy"].values,
        }
    )
    for q in summary["quantity"].values:
        for stat in MODEL_STATISTICS:
            frame[f"{q}_{stat}"] = summary[f"model_{stat}"].sel(subset=subset, quantity=q).values
    frame["label"] = frame["grid_point"].map(display_label)
    return frame


def method_order(frame: pd.DataFrame) -> pd.Series:
    """Each row's method as its position in the stacking order of the methods."""
    return frame["method"].map({method: k for k, method in enumerate(METHODS)})


def grid_frame(summary: xr.Dataset, subset: str) -> pd.DataFrame:
    """One row per grid point, by lambda: the stored mean over seeds of each median, with CI."""
    frame = pd.DataFrame(
        {
            "grid_point": [str(v) for v in summary["grid_point"].values],
            "lam": summary["grid_lam"].values,
            "method": [str(v) for v in summary["grid_method"].values],
            "strength": summary["grid_strength"].values,
            "n_seeds": summary["grid_n_seeds"].values,
        }
    )
    for q in summary["quantity"].values:
        for stat in GRID_STATISTICS:
            frame[f"{q}_{stat}"] = summary[f"grid_{stat}"].sel(subset=subset, quantity=q).values
    frame["label"] = frame["grid_point"].map(display_label)
    frame = frame.assign(method_order=method_order(frame))
    return frame.sort_values(["method_order", "strength"], kind="stable").drop(columns="method_order").reset_index(drop=True)


def palette(grid: pd.DataFrame) -> dict[str, Any]:
    """Grid-point label -> colour: by strength, in each method's own palette."""
    colours: dict[str, Any] = {}
    for method, points in grid.groupby("method", sort=False):
        colours |= dict(zip(points["label"], sns.color_palette(METHOD_STYLE[str(method)][2], len(points))))
    return colours


def confidence_level(summary: xr.Dataset) -> float:
    """The confidence level of the summary's intervals: the summary stage's option, which its
    store keeps in the ``config`` attribute. A store without it is refused."""
    try:
        return float(json.loads(summary.attrs["config"])["confidence_level"])
    except (KeyError, ValueError, TypeError) as exc:
        raise StoreError(
            f"the summary store does not say the confidence level of its intervals (attribute config.confidence_level: "
            f"{one_line(exc)}); rerun the summary stage"
        ) from None


def level_text(summary: xr.Dataset) -> str:
    """The confidence level of the summary's intervals as a percentage: ``95%``."""
    return f"{confidence_level(summary):.0%}"


def trend_text(summary: xr.Dataset, subset: str, trend: str) -> str:
    """``Spearman 0.82 [0.55, 0.95] (95% rerun interval, 14 models)`` for a stored across-model
    trend, the interval at the summary's confidence level: the interval a retraining with new
    seeds falls in, or, without replicate seeds, the CI over images alone (``trend_interval``)."""
    t = summary.sel(subset=subset, trend=trend)
    value, low, high = (float(t[v]) for v in ("trend_spearman", "trend_spearman_ci_low", "trend_spearman_ci_high"))
    if not np.isfinite(value):
        return f"{trend}: too few models for a rank correlation"
    interval = "rerun interval" if str(t["trend_interval"].values) == "rerun" else "CI over images only"
    return f"{trend}: Spearman {value:.2f} [{low:.2f}, {high:.2f}] ({level_text(summary)} {interval}, {int(t['trend_points'])} models)"


def footer(fig: plt.Figure, summary: xr.Dataset, subset: str) -> None:
    """State what every statistic in the figure rests on: subset, images, failures, exclusions,
    and the level of the CIs."""
    n = summary["model_n_images"].sel(subset=subset).values
    failures = int(summary["attack_failures"].sel(subset=subset).sum())
    excluded = json.loads(summary.attrs.get("excluded_degenerate_models", "[]"))
    counts = f"{n.min()}" if n.min() == n.max() else f"{n.min()}–{n.max()}"
    text = (
        f"{SUBSET_DESCRIPTIONS[subset]}: {counts} per model "
        f"(every quantity finite); attack failures (ρ = NaN, left out): {failures} in all. "
        f"Bars: {level_text(summary)} CIs (a model: bootstrap over images; a grid point: Student-t over seeds plus images)."
    )
    if excluded:
        text += f" Degenerate (×, left out of means and trends): {', '.join(excluded)}."
    fig.text(0.01, -0.01, text, ha="left", va="top", fontsize="x-small", wrap=True)


def errorbar(ax: plt.Axes, x: pd.Series, y: pd.Series, xs: str, ys: str, stats: Sequence[str], **style: Any) -> None:
    """Points at (x[stats[0]], y[stats[0]]) with asymmetric CI bars from the other two stats
    (``xs`` empty: ``x`` holds the abscissae themselves, and only the y bars are drawn)."""
    centre, low, high = stats
    xerr = np.array([x[f"{xs}_{centre}"] - x[f"{xs}_{low}"], x[f"{xs}_{high}"] - x[f"{xs}_{centre}"]]) if xs else None
    yerr = np.array([y[f"{ys}_{centre}"] - y[f"{ys}_{low}"], y[f"{ys}_{high}"] - y[f"{ys}_{centre}"]])
    ax.errorbar(
        x[f"{xs}_{centre}"] if xs else x,
        y[f"{ys}_{centre}"],
        xerr=None if xerr is None else np.nan_to_num(xerr.reshape(2, -1)),
        yerr=np.nan_to_num(yerr.reshape(2, -1)),
        **style,
    )
