"""The paper's figures, drawn with seaborn from ``summary.zarr`` (and the saliency stores).

Medians and quartiles are computed in pandas over images (``summary.model_table``), never
read off log axes. Every figure is saved as PNG and PDF.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402
import xarray as xr  # noqa: E402

from saliency_robustness.stores import open_store  # noqa: E402
from saliency_robustness.summary import model_table  # noqa: E402

log = logging.getLogger(__name__)

DISTANCE = "input-space L2"
LABELS = {
    "robustness": f"robustness ρ(x) ({DISTANCE})",
    "alignment": f"alignment α(x) ({DISTANCE})",
    "alignment_cosine": "alignment |cos∠(x, g)| (unitless)",
    "linearized_robustness": f"linearized robustness ρ̃(x) ({DISTANCE})",
    "homogeneity": "homogeneity ⟨x, g†⟩ / Ψ†(x) (unitless)",
}


def lambda_label(lam: float) -> str:
    return f"λ={lam:g}"


def _palette(table: pd.DataFrame) -> dict[str, Any]:
    labels = [lambda_label(v) for v in table["lambda"]]
    return dict(zip(labels, sns.color_palette("viridis", len(labels))))


def _with_labels(table: pd.DataFrame) -> pd.DataFrame:
    table = table.sort_values("lambda").reset_index(drop=True)
    return table.assign(regularization=[lambda_label(v) for v in table["lambda"]])


def _median_plot(ax: plt.Axes, table: pd.DataFrame, x: str, y: str) -> None:
    """Median of ``y`` against median of ``x``, one point per model, interquartile bars."""
    palette = _palette(table)
    for _, row in table.iterrows():
        ax.errorbar(
            row[f"{x}_median"],
            row[f"{y}_median"],
            xerr=[[row[f"{x}_median"] - row[f"{x}_q25"]], [row[f"{x}_q75"] - row[f"{x}_median"]]],
            yerr=[[row[f"{y}_median"] - row[f"{y}_q25"]], [row[f"{y}_q75"] - row[f"{y}_median"]]],
            fmt="none",
            ecolor=palette[row["regularization"]],
            alpha=0.5,
            capsize=2,
        )
    sns.lineplot(data=table, x=f"{x}_median", y=f"{y}_median", color="0.7", lw=1, ax=ax, sort=False, zorder=0)
    sns.scatterplot(
        data=table, x=f"{x}_median", y=f"{y}_median", hue="regularization", palette=palette, s=70, ax=ax, zorder=3
    )
    ax.set_xlabel(f"median {LABELS[x]}")
    ax.set_ylabel(f"median {LABELS[y]}")
    ax.legend(title="model", fontsize="small", title_fontsize="small")


def alignment_vs_robustness(summary: xr.Dataset, **_: Any) -> plt.Figure:
    table = _with_labels(model_table(summary))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), layout="constrained")
    _median_plot(axes[0], table, "robustness", "alignment")
    axes[0].set_title("Alignment against robustness")
    _median_plot(axes[1], table, "robustness", "alignment_cosine")
    axes[1].set_title("Cosine version (alignment / ||x||)")
    axes[1].get_legend().remove()
    return fig


def linearized_vs_robustness(summary: xr.Dataset, **_: Any) -> plt.Figure:
    table = _with_labels(model_table(summary))
    fig, ax = plt.subplots(figsize=(6, 5), layout="constrained")
    hi = np.nanmax(table[["robustness_q75", "linearized_robustness_q75"]].to_numpy())
    ax.plot([0, hi], [0, hi], ls="--", color="0.4", lw=1, label="identity ρ̃ = ρ")  # before the legend is made
    _median_plot(ax, table, "robustness", "linearized_robustness")
    ax.set_title("Linearized robustness against robustness")
    return fig


def homogeneity_vs_robustness(summary: xr.Dataset, **_: Any) -> plt.Figure:
    table = _with_labels(model_table(summary))
    fig, ax = plt.subplots(figsize=(6, 5), layout="constrained")
    _median_plot(ax, table, "robustness", "homogeneity")
    ax.set_title("Fraction of the binarized logit that is homogeneous")
    return fig


def accuracy_robustness_vs_lambda(summary: xr.Dataset, **_: Any) -> plt.Figure:
    table = _with_labels(model_table(summary))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), layout="constrained")
    positive = table["lambda"][table["lambda"] > 0]
    linthresh = float(positive.min()) if len(positive) else 1.0
    sns.lineplot(data=table, x="lambda", y="test_accuracy", marker="o", ax=axes[0])
    axes[0].set_ylabel("clean test accuracy (fraction)")
    axes[0].set_title("Accuracy")
    sns.lineplot(data=table, x="lambda", y="robustness_median", marker="o", ax=axes[1], label="median")
    axes[1].fill_between(table["lambda"], table["robustness_q25"], table["robustness_q75"], alpha=0.25, label="interquartile")
    axes[1].legend()
    axes[1].set_ylabel(f"median {LABELS['robustness']}")
    axes[1].set_title("Robustness")
    for ax in axes:
        ax.set_xscale("symlog", linthresh=linthresh)
        # no negative half: lambda >= 0
        ax.set_xlim(-0.2 * linthresh, max(float(table["lambda"].max()), linthresh) * 1.5)
        ax.set_xlabel("regularization strength λ (per example; symlog axis)")
    return fig


def alignment_vs_robustness_per_image(summary: xr.Dataset, **_: Any) -> plt.Figure:
    frame = summary[["alignment", "robustness", "lam"]].to_dataframe().reset_index()
    frame = frame.assign(regularization=[lambda_label(v) for v in frame["lam"]]).sort_values(["lam", "sample"])
    order = list(dict.fromkeys(frame["regularization"]))
    grid = sns.relplot(
        data=frame,
        x="robustness",
        y="alignment",
        col="regularization",
        col_order=order,
        col_wrap=min(4, len(order)),
        s=10,
        alpha=0.5,
        height=2.6,
        facet_kws={"sharex": True, "sharey": True},
    )
    lim = float(np.nanmax(frame[["robustness", "alignment"]].to_numpy())) * 1.05
    for ax in grid.axes.flat:
        ax.plot([0, lim], [0, lim], ls="--", lw=0.8, color="0.5")
        ax.set(xlim=(0, lim), ylim=(0, lim), aspect="equal")
    grid.set_titles("{col_name}")
    # the long labels go once on the figure, not under every facet
    grid.set_axis_labels("ρ(x)", "α(x)")
    grid.figure.supxlabel(LABELS["robustness"])
    grid.figure.supylabel(LABELS["alignment"])
    grid.figure.suptitle("Per-image alignment against robustness (dashed: α = ρ)")
    grid.figure.tight_layout()
    return grid.figure


def bound_decomposition(summary: xr.Dataset, **_: Any) -> plt.Figure:
    terms = {"alignment": "alignment α", "bound_angle_term": "angle term ||x||·||ḡ† − ḡ||", "bound_bias_term": "bias term |β†|/||g†||"}
    frame = summary[[*terms, "linearized_robustness", "lam"]].to_dataframe().reset_index()
    medians = frame.groupby("lam")[[*terms, "linearized_robustness"]].median().sort_index()
    labels = [lambda_label(v) for v in medians.index]
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(labels)), 4.8), layout="constrained")
    bottom = np.zeros(len(medians))
    for color, (column, name) in zip(sns.color_palette("deep"), terms.items()):
        ax.bar(labels, medians[column], bottom=bottom, color=color, label=f"median {name}")
        bottom += medians[column].to_numpy()
    ax.plot(labels, medians["linearized_robustness"], "k_", markersize=28, mew=2.5, label="median linearized robustness ρ̃")
    ax.set_ylabel(f"{DISTANCE} distance")
    ax.set_xlabel("model")
    ax.set_title("The bound ρ̃ ≤ α + angle term + bias term, per model (medians)")
    ax.legend(fontsize="small")
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


def saliency_gallery(
    summary: xr.Dataset, *, eval_ds: xr.Dataset, saliency: Mapping[str, xr.Dataset], options: Mapping[str, Any], **_: Any
) -> plt.Figure:
    """Test images on top; below, one row per model (ordered by lambda) of its saliency maps.

    Each map is scaled to its own largest magnitude (robust models have smaller gradients)
    with a diverging colormap symmetric around 0. RGB maps get a signed row (sum over
    channels) and a magnitude row (norm over channels).
    """
    samples = _gallery_samples(eval_ds["label"].values, options["gallery_samples"])
    offset = np.asarray(eval_ds.attrs["pixel_offset"], dtype=np.float32).reshape(-1, 1, 1)
    pixels = eval_ds["images"].isel(sample=samples).values + offset
    models = [str(m) for m in summary["model"].values]  # ordered by lambda
    lam = dict(zip(models, summary["lam"].values))
    rgb = pixels.shape[1] > 1
    rows = [("image", None)]
    for m in models:
        rows.append((m, "signed"))
        if rgb:
            rows.append((m, "magnitude"))
    fig, axes = plt.subplots(
        len(rows), len(samples), figsize=(1.3 * len(samples) + 1.2, 1.3 * len(rows)), squeeze=False, layout="constrained"
    )
    for col, sample in enumerate(samples):
        _show_image(axes[0, col], pixels[col])
        axes[0, col].set_title(f"label {int(eval_ds['label'][sample])}", fontsize="small")
    for row, (model, kind) in enumerate(rows[1:], start=1):
        maps = saliency[model]["saliency"].isel(sample=samples).values
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
        axes[row, 0].set_ylabel(f"{lambda_label(lam[model])}{suffix}", fontsize="small")
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0, 0].set_ylabel("image", fontsize="small")
    fig.colorbar(im, ax=axes[1:, -1], shrink=0.6, label="saliency / max |saliency| (per map)", ticks=[])
    fig.suptitle(r"Saliency maps $\nabla\Psi^{F(x)}(x)$, one row per model by λ")
    return fig


FIGURES: dict[str, Callable[..., plt.Figure]] = {
    "saliency_gallery": saliency_gallery,
    "alignment_vs_robustness": alignment_vs_robustness,
    "linearized_vs_robustness": linearized_vs_robustness,
    "homogeneity_vs_robustness": homogeneity_vs_robustness,
    "accuracy_robustness_vs_lambda": accuracy_robustness_vs_lambda,
    "alignment_vs_robustness_per_image": alignment_vs_robustness_per_image,
    "bound_decomposition": bound_decomposition,
}


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
    sns.set_theme(context="notebook", style="whitegrid")
    summary = open_store(summary_store).load()
    extra: dict[str, Any] = {"options": options}
    if figure == "saliency_gallery":
        extra["eval_ds"] = open_store(eval_store, ["images", "label"])
        stores = [open_store(p, ["saliency"]) for p in saliency_stores]
        extra["saliency"] = {Path(p).name.removesuffix(".zarr"): ds for p, ds in zip(saliency_stores, stores)}
    fig = FIGURES[figure](summary, **extra)
    save_figure(fig, outputs, options["dpi"])
    log.info("figure %s written to %s", figure, ", ".join(map(str, outputs)))
