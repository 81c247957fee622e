"""The figure stage: the paper's figures, drawn with seaborn from ``summary.zarr`` (and, for
the gallery, the evaluation images and the saliency stores).

Every statistic drawn is read from the summary store (medians with bootstrap CIs per model,
means over seeds per grid point, Spearman trends across models), never recomputed here.
Per-model points carry their CIs at the configured level; grid points (the same training
setting, several seeds) are drawn as large diamonds with the CI of the mean over seeds.
Degenerate models are drawn as crosses and left out of lines and trends. Each figure's footer
names the image subset, the image counts, the attack failures and the level of the CIs.
Every figure is saved as PNG and PDF.

Which figures there are is ``figure_list``'s; the tables, names and styles every figure shares
are ``plotting``'s; the saliency gallery is ``gallery``'s.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
import xarray as xr

from saliency_robustness.errors import PipelineError, one_line
from saliency_robustness.figure_list import FIGURE_NAMES, QUALITY_FIGURES, figures_for
from saliency_robustness.gallery import saliency_gallery
from saliency_robustness.plotting import (
    METHOD_STYLE,
    SUBSET_DESCRIPTIONS,
    FigureInputs,
    display_label,
    errorbar,
    footer,
    level_text,
    palette,
    trend_text,
)
from saliency_robustness.stores import content_digest, open_store
from saliency_robustness.vocabulary import ATTRIBUTION_LABELS, BASE, EXTERNAL, GRADIENT, GRADNORM, GRID_STATISTICS, MODEL_STATISTICS

log = logging.getLogger(__name__)


def _median_plot(ax: plt.Axes, inputs: FigureInputs, models: pd.DataFrame, grid: pd.DataFrame, x: str, y: str) -> None:
    """Median of ``y`` against median of ``x``: one small point per model with its CIs, one
    diamond per grid point (mean over seeds, CI over seeds and images) joined in lambda order."""
    colours = palette(grid)
    method_of = dict(zip(grid["label"], grid["method"]))
    replicated = bool((grid["n_seeds"] > 1).any())
    for _, row in models.iterrows():
        color = colours.get(row["label"], "0.5")
        if row["degenerate"]:
            ax.plot(row[f"{x}_median"], row[f"{y}_median"], "x", color=color, ms=8, mew=2, zorder=4)
            continue
        marker = METHOD_STYLE[row["method"]][0]
        size, alpha = (4, 0.6) if replicated else (7, 1)
        errorbar(ax, row, row, x, y, MODEL_STATISTICS, fmt=marker, color=color, ms=size, alpha=alpha, capsize=2, zorder=3)
    # the line joins each method's grid points by strength; with one seed each, the models themselves
    healthy = models[~models["degenerate"]].rename(columns=lambda c: c.replace("_median", "_mean_median"))
    for method in dict.fromkeys(grid["method"]):
        if method in (EXTERNAL, BASE):  # one point each: no strength to order them by
            continue
        line = (grid if replicated else healthy).query("method == @method")
        ax.plot(line[f"{x}_mean_median"], line[f"{y}_mean_median"], color="0.6", lw=1, ls="-" if method == GRADNORM else "--", zorder=1)
    if replicated:
        for _, row in grid.iterrows():
            marker = METHOD_STYLE[row["method"]][1]
            errorbar(ax, row, row, x, y, GRID_STATISTICS, fmt=marker, color=colours[row["label"]], ms=9, mec="k", capsize=3, lw=2, zorder=5)
    handles = [
        plt.Line2D([], [], marker=METHOD_STYLE[method_of[label]][1 if replicated else 0], ls="", color=color,
                   mec="k" if replicated else color, label=label)
        for label, color in colours.items()
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
        errorbar(ax, rows["lam"], rows, "", quantity, MODEL_STATISTICS, fmt="o", ms=4, alpha=0.6, capsize=2, label=f"seed {seed}")
    ax.plot(degenerate["lam"], degenerate[f"{quantity}_median"], "x", color="0.2", ms=8, mew=2, label="degenerate" if len(degenerate) else None)
    ax.plot(grid["lam"], grid[f"{quantity}_mean_median"], color="k", lw=1.5, label="mean over seeds")
    low, high = grid[f"{quantity}_mean_median_ci_low"], grid[f"{quantity}_mean_median_ci_high"]
    ax.fill_between(grid["lam"], low, high, color="k", alpha=0.15, label="its CI")
    _symlog_lambda(ax, models["lam"])
    ax.set_ylabel(f"median {inputs.label(quantity)}")
    ax.legend(fontsize="x-small")


def _gradnorm_only(inputs: FigureInputs) -> str:
    """A note for the figures against λ when other methods' models (no λ) are left out."""
    others = [m for m in inputs.methods if m not in (GRADNORM, BASE)]
    note = f"{', '.join(others)} models have no λ and are in the other figures" if others else ""
    if BASE in inputs.methods:  # the trends in the title count it as λ = 0; it is drawn in the other figures
        note = "; ".join(filter(None, ["the base model (λ = 0 in the trends above) is drawn in the other figures", note]))
    return f"\n(gradnorm models only; {note})" if note else ""


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
        quantity = "alignment" if attribution == GRADIENT else f"alignment_{attribution}"
        _median_plot(ax, inputs, models, grid, "robustness", quantity)
        ax.set_ylabel(f"median |⟨x, a⟩| / ‖a‖ ({inputs.summary[quantity].attrs.get('units', '')})")
        trend = f"median {quantity} ~ median robustness"
        ax.set_title(f"{ATTRIBUTION_LABELS.get(attribution, attribution)}\n" + trend_text(summary, subset, trend).split(": ", 1)[1], fontsize="small")
        if k:
            ax.get_legend().remove()
    fig.suptitle("Alignment of each attribution map (of the predicted logit, signed) against robustness")
    footer(fig, summary, subset)
    return fig

#: how the concordance figure names the quantities the models are ranked by (arrow: a better explanation)
RANKING_NAMES = {
    "alignment": "alignment α ↑",
    "robustness": "robustness ρ ↑",
    "gini": "Gini ↑",
    "road_area": "ROAD area ↑",
    "max_sensitivity": "max-sensitivity ↓",
    "infidelity": "infidelity ↓",
}


def quality_concordance(inputs: FigureInputs) -> plt.Figure:
    """One τ matrix per attribution map: Kendall's tau between the model rankings by the map's alignment, by
    robustness and by each explanation-quality score, each cell with its interval (concordance.zarr)."""
    if inputs.concordance is None:
        raise PipelineError("figure quality_concordance needs the concordance store (config quality.enabled)")
    ds, subset = inputs.concordance.sel(subset=inputs.subset), inputs.subset
    attributions = [str(a) for a in ds["attribution"].values]
    rankings = [str(r) for r in ds["ranking"].values]
    rows, columns = rankings[1:], rankings[:-1]  # the lower triangle without the diagonal
    fig, axes = plt.subplots(1, len(attributions), figsize=(7.4 * len(attributions), 6.4), layout="constrained", squeeze=False)
    below = np.tril(np.ones((len(rows), len(columns)), dtype=bool))
    for k, (ax, attribution) in enumerate(zip(axes[0], attributions)):
        cell = ds.sel(attribution=attribution, ranking=rows, ranking_other=columns)
        tau, low, high = (cell[v].values for v in ("concordance_tau", "concordance_tau_ci_low", "concordance_tau_ci_high"))
        text = np.vectorize(lambda t, lo, hi: f"{t:+.2f}\n[{lo:+.2f}, {hi:+.2f}]" if np.isfinite(t) else "n/a")(tau, low, high)
        sns.heatmap(
            pd.DataFrame(tau, index=[RANKING_NAMES.get(r, r) for r in rows], columns=[RANKING_NAMES.get(r, r) for r in columns]),
            mask=~below,
            annot=text,
            fmt="",
            vmin=-1,
            vmax=1,
            cmap="vlag",
            cbar=k == len(attributions) - 1,
            cbar_kws={"label": "Kendall τ", "shrink": 0.7},
            annot_kws={"fontsize": 8},
            square=True,
            ax=ax,
        )
        ax.grid(False)
        ax.tick_params(axis="x", labelrotation=35)
        ax.tick_params(axis="y", labelrotation=0)
        ax.set_title(f"{ATTRIBUTION_LABELS.get(attribution, attribution)} (α of this map)", fontsize="medium")
    kinds = sorted({str(v) for v in ds["concordance_interval"].values.ravel()} - {"identity", ""})
    level = level_text(inputs.concordance)  # the concordance stage's own level
    n_models = int(ds["concordance_n_models"])
    fig.suptitle(f"Do the measures rank the models alike? Kendall τ of per-model medians, {n_models} models", fontsize="medium")
    n = inputs.concordance["quality_n_images"].sel(subset=subset).values
    excluded = json.loads(inputs.concordance.attrs.get("excluded_degenerate_models", "[]"))
    fig.text(
        0.01,
        -0.01,
        f"{SUBSET_DESCRIPTIONS[subset]}: {n.min() if n.min() == n.max() else f'{n.min()}–{n.max()}'} per model and map (all six quantities "
        f"finite). Each cell: τ and its {level} "
        f"interval ({'; '.join(kinds) or 'none'}: {'the τ a retraining with new seeds gives' if 'rerun' in kinds else 'images resampled only'})."
        " ↑/↓: the direction of a better explanation (or a more robust model). τ > 0: the two order the models alike; where one"
        " arrow is ↑ and the other ↓, agreement on which models are better is τ < 0."
        + (f" Degenerate, left out: {', '.join(excluded)}." if excluded else ""),
        ha="left",
        va="top",
        fontsize="x-small",
        wrap=True,
    )
    return fig


#: every figure the workflow draws, by name, in ``figure_list.FIGURE_NAMES``'s order
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
    "quality_concordance": quality_concordance,
}
if tuple(FIGURES) != FIGURE_NAMES:  # the Snakefile's list of figures is figure_list's
    raise ImportError(f"stages.figures draws {list(FIGURES)}, but figure_list names {list(FIGURE_NAMES)}")


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
    concordance_store: str | Path | None = None,
) -> None:
    """Draw ``figure`` from the summary (and, for the gallery, the images and saliency maps; for the
    explanation-quality figures, the concordance store)."""
    matplotlib.use("Agg")  # files only, also where a display is set
    sns.set_theme(context="notebook", style="whitegrid")
    summary = open_store(summary_store).load()
    concordance = open_store(concordance_store, ["concordance_tau"]).load() if concordance_store is not None else None
    inputs = FigureInputs(summary, options, concordance=concordance)
    if figure == "saliency_gallery":
        names = [Path(p).name.removesuffix(".zarr") for p in saliency_stores]
        expect = {"eval_digest": content_digest(eval_store)}
        stores = {name: open_store(p, ["saliency"], expect={**expect, "model": name}) for name, p in zip(names, saliency_stores)}
        inputs = FigureInputs(summary, options, open_store(eval_store, ["images", "label"]), stores, concordance)
    if figure in QUALITY_FIGURES and concordance is None:
        raise PipelineError(f"figure {figure} needs the concordance store (config quality.enabled)")
    if figure not in figures_for(inputs.methods, quality=concordance is not None):
        raise PipelineError(f"figure {figure} is drawn against lambda, and {summary_store} has no {GRADNORM} model")
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
