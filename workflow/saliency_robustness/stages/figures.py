"""The paper's figures, drawn with seaborn from ``summary.zarr`` (and the saliency stores).

Every statistic drawn is read from the summary store (medians with bootstrap CIs per model,
means over seeds per grid point, Spearman trends across models), never recomputed here.
Per-model points carry their CIs at the configured level; grid points (the same training
setting, several seeds) are drawn as large diamonds with the CI of the mean over seeds. Degenerate models are
drawn as crosses and left out of lines and trends. Each figure's footer names the image
subset, the image counts and the attack failures. Every figure is saved as PNG and PDF.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
import xarray as xr

from saliency_robustness.config import EXTERNAL
from saliency_robustness.errors import PipelineError, one_line
from saliency_robustness.stores import content_digest, open_store

log = logging.getLogger(__name__)

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
STATS = ("median", "median_ci_low", "median_ci_high")
GRID_STATS = ("mean_median", "mean_median_ci_low", "mean_median_ci_high")


@dataclass(frozen=True)
class FigureInputs:
    """What a figure draws from: the summary store and the figure options, and for the
    gallery the evaluation images and the saliency stores by model name."""

    summary: xr.Dataset
    options: Mapping[str, Any]
    eval_ds: xr.Dataset | None = None
    saliency: Mapping[str, xr.Dataset] = field(default_factory=dict)

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
        return ["gradient"] + [a for a in stored if a != "gradient"]

    def distance_units(self) -> str:
        return str(self.summary["robustness"].attrs.get("units", "distance"))


#: short display names of the attribution maps
ATTRIBUTION_NAMES = {"gradient": "gradient", "smoothgrad": "SmoothGrad", "integrated_gradients": "IG"}
#: per training method: marker of a model, marker of a grid point (mean over seeds), palette by strength
METHOD_STYLE = {"gradnorm": ("o", "D", "viridis"), "adversarial": ("s", "h", "flare"), EXTERNAL: ("P", "p", "Dark2")}


def quantity_name(quantity: str) -> str:
    """Axis name of a summarised quantity (an attribution map's alignment: ``α_smoothgrad(x)``)."""
    if quantity in NAMES:
        return NAMES[quantity]
    for stem, name in (("alignment_cosine_", "alignment |cos∠(x, a)|, a = "), ("alignment_", "alignment α(x) of ")):
        if quantity.startswith(stem):
            attribution = quantity.removeprefix(stem)
            return name + ATTRIBUTION_NAMES.get(attribution, attribution)
    return quantity.replace("_", " ")


def display_label(grid_point: str) -> str:
    """``gradnorm-lambda0.3`` -> ``λ=0.3``, ``pgd-eps1.5`` -> ``PGD ε=1.5`` (the grid point: all
    its training setting but the seed)."""
    return grid_point.replace("gradnorm-lambda", "λ=").replace("pgd-eps", "PGD ε=")


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
        for stat in STATS:
            frame[f"{q}_{stat}"] = summary[f"model_{stat}"].sel(subset=subset, quantity=q).values
    frame["label"] = frame["grid_point"].map(display_label)
    return frame


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
        for stat in GRID_STATS:
            frame[f"{q}_{stat}"] = summary[f"grid_{stat}"].sel(subset=subset, quantity=q).values
    frame["label"] = frame["grid_point"].map(display_label)
    order = {method: k for k, method in enumerate(METHOD_STYLE)}
    frame = frame.assign(method_order=frame["method"].map(order))
    return frame.sort_values(["method_order", "strength"], kind="stable").drop(columns="method_order").reset_index(drop=True)


def _palette(grid: pd.DataFrame) -> dict[str, Any]:
    """Grid-point label -> colour: by strength, in each method's own palette."""
    colours: dict[str, Any] = {}
    for method, points in grid.groupby("method", sort=False):
        colours |= dict(zip(points["label"], sns.color_palette(METHOD_STYLE[str(method)][2], len(points))))
    return colours


def trend_text(summary: xr.Dataset, subset: str, trend: str) -> str:
    """``Spearman 0.82 [0.55, 0.95] (95 % rerun interval, 14 models)`` for a stored across-model
    trend: the interval a retraining with new seeds falls in, or, without replicate seeds, the
    CI over images alone (``trend_interval``)."""
    t = summary.sel(subset=subset, trend=trend)
    value, low, high = (float(t[v]) for v in ("trend_spearman", "trend_spearman_ci_low", "trend_spearman_ci_high"))
    if not np.isfinite(value):
        return f"{trend}: too few models for a rank correlation"
    interval = "rerun interval" if str(t["trend_interval"].values) == "rerun" else "CI over images only"
    return f"{trend}: Spearman {value:.2f} [{low:.2f}, {high:.2f}] ({_level(summary)} {interval}, {int(t['trend_points'])} models)"


def footer(fig: plt.Figure, summary: xr.Dataset, subset: str) -> None:
    """State what every statistic in the figure rests on: subset, images, failures, exclusions."""
    n = summary["model_n_images"].sel(subset=subset).values
    failures = int(summary["attack_failures"].sel(subset=subset).sum())
    excluded = json.loads(summary.attrs.get("excluded_degenerate_models", "[]"))
    counts = f"{n.min()}" if n.min() == n.max() else f"{n.min()}–{n.max()}"
    text = (
        f"{'all evaluation images' if subset == 'all' else 'correctly classified images'}: {counts} per model "
        f"(every quantity finite); attack failures (ρ = NaN, left out): {failures} in all. "
        f"Bars: {_level(summary)} CIs (a model: bootstrap over images; a grid point: Student-t over seeds plus images)."
    )
    if excluded:
        text += f" Degenerate (×, left out of means and trends): {', '.join(excluded)}."
    fig.text(0.01, -0.01, text, ha="left", va="top", fontsize="x-small", wrap=True)


def _level(summary: xr.Dataset) -> str:
    return f"{json.loads(summary.attrs.get('config', '{}')).get('confidence_level', 0.95):.0%}"


def _errorbar(ax: plt.Axes, x: pd.Series, y: pd.Series, xs: str, ys: str, stats: Sequence[str], **style: Any) -> None:
    """Points at (x[stats[0]], y[stats[0]]) with asymmetric CI bars from the other two stats."""
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


def _median_plot(ax: plt.Axes, inputs: FigureInputs, models: pd.DataFrame, grid: pd.DataFrame, x: str, y: str) -> None:
    """Median of ``y`` against median of ``x``: one small point per model with its CIs, one
    diamond per grid point (mean over seeds, CI over seeds and images) joined in lambda order."""
    palette = _palette(grid)
    method_of = dict(zip(grid["label"], grid["method"]))
    replicated = bool((grid["n_seeds"] > 1).any())
    for _, row in models.iterrows():
        color = palette.get(row["label"], "0.5")
        if row["degenerate"]:
            ax.plot(row[f"{x}_median"], row[f"{y}_median"], "x", color=color, ms=8, mew=2, zorder=4)
            continue
        marker = METHOD_STYLE[row["method"]][0]
        _errorbar(ax, row, row, x, y, STATS, fmt=marker, color=color, ms=4 if replicated else 7, alpha=0.6 if replicated else 1, capsize=2, zorder=3)
    # the line joins each method's grid points by strength; with one seed each, the models themselves
    healthy = models[~models["degenerate"]].rename(columns=lambda c: c.replace("_median", "_mean_median"))
    for method in dict.fromkeys(grid["method"]):
        if method == EXTERNAL:  # external models have no strength to order them by
            continue
        line = (grid if replicated else healthy).query("method == @method")
        ax.plot(line[f"{x}_mean_median"], line[f"{y}_mean_median"], color="0.6", lw=1, ls="-" if method == "gradnorm" else "--", zorder=1)
    if replicated:
        for _, row in grid.iterrows():
            marker = METHOD_STYLE[row["method"]][1]
            _errorbar(ax, row, row, x, y, GRID_STATS, fmt=marker, color=palette[row["label"]], ms=9, mec="k", capsize=3, lw=2, zorder=5)
    handles = [
        plt.Line2D([], [], marker=METHOD_STYLE[method_of[label]][1 if replicated else 0], ls="", color=color,
                   mec="k" if replicated else color, label=label)
        for label, color in palette.items()
    ]  # fmt: skip
    if replicated:
        handles.append(plt.Line2D([], [], marker="o", ls="", color="0.5", alpha=0.6, ms=4, label="one seed"))
    if models["degenerate"].any():
        handles.append(plt.Line2D([], [], marker="x", ls="", color="0.3", mew=2, label="degenerate"))
    ax.legend(handles=handles, title="grid point (mean over seeds)" if replicated else "model", fontsize="small", title_fontsize="small")
    ax.set_xlabel(f"median {inputs.label(x)}")
    ax.set_ylabel(f"median {inputs.label(y)}")


def alignment_vs_robustness(inputs: FigureInputs) -> plt.Figure:
    summary, subset, models, grid = inputs.summary, inputs.subset, inputs.models(), inputs.grid()
    fig, axes = plt.subplots(1, 2, figsize=(12, 5), layout="constrained")
    _median_plot(axes[0], inputs, models, grid, "robustness", "alignment")
    axes[0].set_title("Alignment against robustness", fontsize="medium")
    _median_plot(axes[1], inputs, models, grid, "robustness", "alignment_cosine")
    axes[1].set_title("Cosine version (alignment / ||x||)", fontsize="medium")
    axes[1].get_legend().remove()
    fig.suptitle(trend_text(summary, subset, "median alignment ~ median robustness"), fontsize="small")
    footer(fig, summary, subset)
    return fig


def linearized_vs_robustness(inputs: FigureInputs) -> plt.Figure:
    summary, subset, models, grid = inputs.summary, inputs.subset, inputs.models(), inputs.grid()
    fig, ax = plt.subplots(figsize=(6.5, 5.5), layout="constrained")
    hi = np.nanmax(models[["robustness_median_ci_high", "linearized_robustness_median_ci_high"]].to_numpy())
    lo = np.nanmin(models[["robustness_median_ci_low", "linearized_robustness_median_ci_low"]].to_numpy())
    ax.plot([lo, hi], [lo, hi], ls="--", color="0.4", lw=1, zorder=0)
    _median_plot(ax, inputs, models, grid, "robustness", "linearized_robustness")
    ax.legend(handles=[*ax.get_legend().legend_handles, plt.Line2D([], [], ls="--", color="0.4", label="identity ρ̃ = ρ")], fontsize="small")
    ax.set_title("Linearized robustness against robustness", fontsize="medium")
    footer(fig, summary, subset)
    return fig


def homogeneity_vs_robustness(inputs: FigureInputs) -> plt.Figure:
    summary, subset, models, grid = inputs.summary, inputs.subset, inputs.models(), inputs.grid()
    fig, ax = plt.subplots(figsize=(6.5, 5.5), layout="constrained")
    _median_plot(ax, inputs, models, grid, "robustness", "homogeneity")
    ax.set_title("Fraction of the binarized logit that is homogeneous", fontsize="medium")
    footer(fig, summary, subset)
    return fig


def _symlog_lambda(ax: plt.Axes, lam: pd.Series) -> None:
    positive = lam[lam > 0]
    linthresh = float(positive.min()) if len(positive) else 1.0
    ax.set_xscale("symlog", linthresh=linthresh)
    ax.set_xlim(-0.2 * linthresh, max(float(lam.max()), linthresh) * 1.5)  # no negative half: lambda >= 0
    ax.set_xlabel("regularization strength λ (per example; symlog axis)")


def _against_lambda(ax: plt.Axes, inputs: FigureInputs, models: pd.DataFrame, grid: pd.DataFrame, quantity: str) -> None:
    """Per-seed medians with CIs (small points) and the mean over seeds with its CI (band)."""
    healthy, degenerate = models[~models["degenerate"]], models[models["degenerate"]]
    for seed, rows in healthy.groupby("seed"):
        _errorbar(ax, rows["lam"], rows, "", quantity, STATS, fmt="o", ms=4, alpha=0.6, capsize=2, label=f"seed {seed}")
    ax.plot(degenerate["lam"], degenerate[f"{quantity}_median"], "x", color="0.2", ms=8, mew=2, label="degenerate" if len(degenerate) else None)
    ax.plot(grid["lam"], grid[f"{quantity}_mean_median"], color="k", lw=1.5, label="mean over seeds")
    low, high = grid[f"{quantity}_mean_median_ci_low"], grid[f"{quantity}_mean_median_ci_high"]
    ax.fill_between(grid["lam"], low, high, color="k", alpha=0.15, label="its CI")
    _symlog_lambda(ax, models["lam"])
    ax.set_ylabel(f"median {inputs.label(quantity)}")
    ax.legend(fontsize="x-small")


def _gradnorm_only(inputs: FigureInputs) -> str:
    """A note for the figures against λ when other methods' models (no λ) are left out."""
    others = [m for m in inputs.methods if m != "gradnorm"]
    return f"\n(gradnorm models only; {', '.join(others)} models have no λ and are in the other figures)" if others else ""


def accuracy_robustness_vs_lambda(inputs: FigureInputs) -> plt.Figure:
    summary, subset, models, grid = inputs.summary, inputs.subset, inputs.models(), inputs.grid()
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8), layout="constrained")
    sns.lineplot(data=models, x="lam", y="test_accuracy", hue="seed", marker="o", palette="tab10", ax=axes[0], legend="brief")
    axes[0].set_ylabel("clean test accuracy (fraction)")
    axes[0].set_title("Accuracy", fontsize="medium")
    _symlog_lambda(axes[0], models["lam"])
    _against_lambda(axes[1], inputs, models, grid, "robustness")
    axes[1].set_title("Robustness", fontsize="medium")
    _against_lambda(axes[2], inputs, models, grid, "alignment")
    axes[2].set_title("Alignment", fontsize="medium")
    fig.suptitle(
        trend_text(summary, subset, "lambda ~ median robustness") + "\n" + trend_text(summary, subset, "lambda ~ median alignment")
        + _gradnorm_only(inputs),
        fontsize="small",
    )
    footer(fig, summary, subset)
    return fig


def alignment_vs_robustness_per_image(inputs: FigureInputs) -> plt.Figure:
    summary, subset = inputs.summary, inputs.subset
    frame = summary[["alignment", "robustness", "lam", "seed", "setting"]].where(summary["in_subset"].sel(subset=subset))
    frame = frame.to_dataframe().reset_index().dropna(subset=["alignment", "robustness"])
    frame = frame.assign(grid_point=frame["setting"].astype(str).map(display_label)).sort_values(["lam", "seed", "sample"])
    order = list(dict.fromkeys(frame["grid_point"]))
    grid = sns.relplot(
        data=frame,
        x="robustness",
        y="alignment",
        col="grid_point",
        col_order=order,
        col_wrap=min(4, len(order)),
        hue="seed",
        palette="tab10",
        s=8,
        alpha=0.5,
        height=3.2,
        aspect=1,  # square facets with equal limits: the identity line at 45 degrees
        facet_kws={"sharex": True, "sharey": True},
    )
    lim = float(np.nanmax(frame[["robustness", "alignment"]].to_numpy())) * 1.05
    for ax in grid.axes.flat:
        ax.plot([0, lim], [0, lim], ls="--", lw=0.8, color="0.5")
        ax.set(xlim=(0, lim), ylim=(0, lim))
    grid.set_titles("{col_name}")
    # the long labels go once on the figure, not under every facet
    grid.set_axis_labels("ρ(x)", inputs.label("alignment").removeprefix("alignment "))
    grid.figure.supxlabel(inputs.label("robustness"))
    grid.figure.suptitle("Per-image alignment against robustness (dashed: α = ρ)")
    grid.figure.tight_layout()
    footer(grid.figure, summary, subset)
    return grid.figure


def bound_decomposition(inputs: FigureInputs) -> plt.Figure:
    summary, subset, grid = inputs.summary, inputs.subset, inputs.grid()
    terms = {"alignment": "alignment α", "bound_angle_term": "angle term ||x||·||ḡ† − ḡ||", "bound_bias_term": "bias term |β†|/||g†||"}
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(grid)), 5), layout="constrained")
    bottom = np.zeros(len(grid))
    for color, (column, name) in zip(sns.color_palette("deep"), terms.items()):
        values = grid[f"{column}_mean_median"].to_numpy()
        ax.bar(grid["label"], values, bottom=bottom, color=color, label=f"median {name}")
        bottom += values
    rho = grid["linearized_robustness_mean_median"]
    ax.errorbar(
        grid["label"],
        rho,
        yerr=np.nan_to_num([rho - grid["linearized_robustness_mean_median_ci_low"], grid["linearized_robustness_mean_median_ci_high"] - rho]),
        fmt="k_",
        markersize=28,
        mew=2.5,
        capsize=4,
        label="median linearized robustness ρ̃ (CI)",
    )
    ax.set_ylabel(f"{inputs.distance_units()} (mean over seeds of per-model medians)")
    ax.set_xlabel("grid point")
    ax.set_title("The bound ρ̃ ≤ α + angle term + bias term, per grid point", fontsize="medium")
    ax.legend(fontsize="small")
    footer(fig, summary, subset)
    return fig


def decomposition_terms(inputs: FigureInputs) -> plt.Figure:
    """ρ̃ = ⟨x, ḡ†⟩ + β†/‖g†‖ per image: how the homogeneous and the signed bias term move with λ."""
    summary, subset, grid = inputs.summary, inputs.subset, inputs.grid()
    fig, ax = plt.subplots(figsize=(7.5, 5), layout="constrained")
    shown = {
        "linearized_robustness": ("k", "linearized robustness ρ̃"),
        "homogeneous_term": ("tab:blue", "homogeneous term ⟨x, ḡ†⟩"),
        "bias_term_signed": ("tab:orange", "signed bias term β†/‖g†‖"),
    }
    for quantity, (color, name) in shown.items():
        ax.plot(grid["lam"], grid[f"{quantity}_mean_median"], "o-", color=color, label=f"median {name}")
        ax.fill_between(grid["lam"], grid[f"{quantity}_mean_median_ci_low"], grid[f"{quantity}_mean_median_ci_high"], color=color, alpha=0.2)
    ax.axhline(0, color="0.5", lw=0.8)
    _symlog_lambda(ax, grid["lam"])
    ax.set_ylabel(f"{inputs.distance_units()} (mean over seeds of per-model medians)")
    ax.set_title("ρ̃ = homogeneous term + signed bias term (per image)" + _gradnorm_only(inputs), fontsize="medium")
    ax.legend(fontsize="small")
    footer(fig, summary, subset)
    return fig


def attribution_alignment_vs_robustness(inputs: FigureInputs) -> plt.Figure:
    """One facet per attribution map: median alignment ``|<x, a>| / ||a||`` against median
    robustness, every model and grid point, with the across-model trend and its CI."""
    summary, subset, models, grid = inputs.summary, inputs.subset, inputs.models(), inputs.grid()
    attributions = inputs.attributions
    fig, axes = plt.subplots(1, len(attributions), figsize=(5.5 * len(attributions) + 0.5, 5), layout="constrained", squeeze=False)
    for k, (ax, attribution) in enumerate(zip(axes[0], attributions)):
        quantity = "alignment" if attribution == "gradient" else f"alignment_{attribution}"
        _median_plot(ax, inputs, models, grid, "robustness", quantity)
        ax.set_ylabel(f"median |⟨x, a⟩| / ‖a‖ ({inputs.summary[quantity].attrs.get('units', '')})")
        trend = f"median {quantity} ~ median robustness"
        ax.set_title(f"{ATTRIBUTION_NAMES.get(attribution, attribution)}\n" + trend_text(summary, subset, trend).split(": ", 1)[1], fontsize="small")
        if k:
            ax.get_legend().remove()
    fig.suptitle("Alignment of each attribution map (of the predicted logit, signed) against robustness")
    footer(fig, summary, subset)
    return fig


def _gallery_samples(labels: np.ndarray, n: int) -> list[int]:
    """One image per class first (so different digits show), then further images in order."""
    chosen: list[int] = []
    for cls in np.unique(labels):
        chosen.append(int(np.flatnonzero(labels == cls)[0]))
    chosen = sorted(chosen)[:n]
    chosen += [i for i in range(len(labels)) if i not in chosen][: n - len(chosen)]
    return chosen


def _show_image(ax: plt.Axes, image: np.ndarray) -> None:
    if image.shape[0] == 1:
        ax.imshow(image[0], cmap="gray", vmin=0, vmax=1)
    else:
        ax.imshow(np.clip(np.moveaxis(image, 0, -1), 0, 1))


#: most rows of maps in the saliency gallery before it shows each method's extremes only
GALLERY_ROWS = 12


def saliency_gallery(inputs: FigureInputs) -> plt.Figure:
    """Test images on top; below, one row per (attribution map, grid point) of the maps of one
    of the grid point's models (its first seed that is not degenerate), grid points by method
    and strength. When every grid point would make more than ``GALLERY_ROWS`` rows, each
    method shows its smallest and largest strength only, so that the page stays readable.

    Each map is scaled to its own largest magnitude (robust models have smaller gradients)
    with a diverging colormap symmetric around 0. RGB maps get a signed row (sum over
    channels) and a magnitude row (norm over channels).
    """
    summary, eval_ds, saliency = inputs.summary, inputs.eval_ds, inputs.saliency
    if eval_ds is None:
        raise ValueError("the saliency gallery needs the evaluation images")
    samples = _gallery_samples(eval_ds["label"].values, inputs.options["gallery_samples"])
    offset = np.asarray(eval_ds.attrs["pixel_offset"], dtype=np.float32).reshape(-1, 1, 1)
    pixels = eval_ds["images"].isel(sample=samples).values + offset
    # one model per grid point (its first non-degenerate seed), by method and strength
    order = {method: k for k, method in enumerate(METHOD_STYLE)}
    frame = model_frame(summary, "all")
    frame = frame.assign(method_order=frame["method"].map(order)).sort_values(["method_order", "strength", "degenerate", "seed"], kind="stable")
    shown = frame.drop_duplicates("grid_point")
    attributions = inputs.attributions
    if len(shown) * len(attributions) > GALLERY_ROWS:
        shown = pd.concat([points.iloc[[0, -1]].drop_duplicates("grid_point") for _, points in shown.groupby("method", sort=False)])
    lam = {m: f"{label}\n(seed {seed})" for m, label, seed in zip(shown["model"], shown["label"], shown["seed"])}
    by = "λ" if shown["method"].nunique() == 1 else "method and strength"
    rgb = pixels.shape[1] > 1
    rows: list[tuple[str, str | None, str | None]] = [("image", None, None)]
    for attribution in attributions:
        for m in shown["model"]:
            rows.append((m, attribution, "signed"))
            if rgb:
                rows.append((m, attribution, "magnitude"))
    fig, axes = plt.subplots(
        len(rows), len(samples), figsize=(1.3 * len(samples) + 1.2, 1.3 * len(rows)), squeeze=False, layout="constrained"
    )
    for col, sample in enumerate(samples):
        _show_image(axes[0, col], pixels[col])
        label = int(eval_ds["label"][sample])
        names = eval_ds.attrs.get("class_names")
        axes[0, col].set_title(names[label] if names is not None and label < len(names) else f"label {label}", fontsize="small")
    for row, (model, attribution, kind) in enumerate(rows[1:], start=1):
        store = saliency[model]
        if attribution == "gradient":
            maps = store["saliency"].isel(sample=samples).values
        else:
            maps = store["attribution_map"].sel(attribution=attribution).isel(sample=samples).values
        for col in range(len(samples)):
            g = maps[col]
            if kind == "signed":
                shown = g.sum(axis=0)
                scale = float(np.abs(shown).max()) or 1.0
                im = axes[row, col].imshow(shown, cmap="RdBu_r", vmin=-scale, vmax=scale)
            else:
                shown = np.linalg.norm(g, axis=0)
                im = axes[row, col].imshow(shown, cmap="magma", vmin=0, vmax=float(shown.max()) or 1.0)
        suffix = "" if not rgb else f"\n{kind}"
        prefix = "" if len(attributions) == 1 else f"{ATTRIBUTION_NAMES.get(str(attribution), attribution)}\n"
        axes[row, 0].set_ylabel(f"{prefix}{lam[model]}{suffix}", fontsize="small")
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0, 0].set_ylabel("image", fontsize="small")
    fig.colorbar(im, ax=axes[1:, -1], shrink=0.6, label="saliency / max |saliency| (per map)", ticks=[])
    if len(attributions) == 1:
        fig.suptitle(rf"Saliency maps $\nabla\Psi^{{F(x)}}(x)$, one row per grid point by {by}")
    else:
        fig.suptitle("Attribution maps of the predicted logit (signed), one row per (method, grid point)")
    return fig


#: every figure the workflow draws, by name (the Snakefile's list of figures is this one)
FIGURES: dict[str, Callable[[FigureInputs], plt.Figure]] = {
    "saliency_gallery": saliency_gallery,
    "alignment_vs_robustness": alignment_vs_robustness,
    "linearized_vs_robustness": linearized_vs_robustness,
    "homogeneity_vs_robustness": homogeneity_vs_robustness,
    "accuracy_robustness_vs_lambda": accuracy_robustness_vs_lambda,
    "alignment_vs_robustness_per_image": alignment_vs_robustness_per_image,
    "bound_decomposition": bound_decomposition,
    "decomposition_terms": decomposition_terms,
    "attribution_alignment_vs_robustness": attribution_alignment_vs_robustness,
}


#: the figures drawn against lambda: only gradient-norm models have one
LAMBDA_FIGURES = frozenset({"accuracy_robustness_vs_lambda", "decomposition_terms"})


def figures_for(methods: Iterable[str]) -> list[str]:
    """The figures of an experiment whose models come from ``methods`` (gradnorm, adversarial,
    external): all of them, but those against lambda only with gradient-norm models."""
    methods = set(methods)
    return [name for name in FIGURES if name not in LAMBDA_FIGURES or "gradnorm" in methods]


def save_figure(fig: plt.Figure, outputs: Sequence[str | Path], dpi: int) -> None:
    """Save to every output path (format from the suffix), each written then renamed."""
    for out in outputs:
        out = Path(out)
        tmp = out.with_name(f".{out.name}.partial{out.suffix}")
        fig.savefig(tmp, dpi=dpi, bbox_inches="tight")
        tmp.replace(out)
    plt.close(fig)


def figure_stage(
    *,
    figure: str,
    summary_store: str | Path,
    eval_store: str | Path,
    saliency_stores: Sequence[str | Path],
    outputs: Sequence[str | Path],
    options: Mapping[str, Any],
) -> None:
    """Draw ``figure`` from the summary (and, for the gallery, the images and saliency maps)."""
    matplotlib.use("Agg")  # files only, also where a display is set
    sns.set_theme(context="notebook", style="whitegrid")
    summary = open_store(summary_store).load()
    inputs = FigureInputs(summary, options)
    if figure == "saliency_gallery":
        names = [Path(p).name.removesuffix(".zarr") for p in saliency_stores]
        expect = {"eval_digest": content_digest(eval_store)}
        stores = {name: open_store(p, ["saliency"], expect={**expect, "model": name}) for name, p in zip(names, saliency_stores)}
        inputs = FigureInputs(summary, options, open_store(eval_store, ["images", "label"]), stores)
    if figure not in figures_for(inputs.methods):
        raise PipelineError(f"figure {figure} is drawn against lambda, and {summary_store} has no gradnorm model")
    check_plottable(summary, figure, inputs.subset)
    try:
        fig = FIGURES[figure](inputs)
    except (ValueError, KeyError, TypeError) as exc:  # e.g. seaborn on an empty frame
        raise PipelineError(f"figure {figure} could not be drawn from {summary_store}: {one_line(exc)}") from None
    save_figure(fig, outputs, options["dpi"])
    log.info("figure %s written to %s", figure, ", ".join(map(str, outputs)))


def check_plottable(summary: xr.Dataset, figure: str, subset: str) -> None:
    """Name each model that has no image to plot (a variable with no finite value) in the log;
    when no model has one, stop with one line naming the models and variables."""
    empty: list[str] = []
    for model in summary["model"].values:
        if int(summary["model_n_images"].sel(model=model, subset=subset)) > 0:
            continue
        values = summary.sel(model=model)
        dead = [str(q) for q in summary["quantity"].values if not np.isfinite(values[str(q)].values).any()]
        empty.append(f"{model} ({', '.join(dead) or 'no image in subset ' + subset} without a finite value)")
        log.warning("figure %s: model %s has nothing to plot: %s", figure, model, empty[-1])
    if empty and len(empty) == summary.sizes["model"]:
        raise PipelineError(f"figure {figure}: no model has a value to plot: {'; '.join(empty)}")
