"""The saliency gallery: test images above the saliency (and attribution) maps of one model per
grid point, drawn from the evaluation store and the saliency stores."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from saliency_robustness.plotting import FigureInputs, method_order, model_frame
from saliency_robustness.vocabulary import ATTRIBUTION_LABELS, GRADIENT

#: most rows of maps in the saliency gallery before it shows each method's extremes only
GALLERY_ROWS = 12


def gallery_samples(labels: np.ndarray, n: int) -> list[int]:
    """One image per class first (so different digits show), then further images in order."""
    chosen: list[int] = []
    for cls in np.unique(labels):
        chosen.append(int(np.flatnonzero(labels == cls)[0]))
    chosen = sorted(chosen)[:n]
    chosen += [i for i in range(len(labels)) if i not in chosen][: n - len(chosen)]
    return chosen


def gallery_models(inputs: FigureInputs) -> pd.DataFrame:
    """The rows of :func:`model_frame` whose maps the gallery shows: one model per grid point
    (its first seed that is not degenerate), by method and strength; each method's smallest
    and largest strength only when every grid point would make more than ``GALLERY_ROWS`` rows."""
    frame = model_frame(inputs.summary, inputs.subset)
    frame = frame.assign(method_order=method_order(frame)).sort_values(["method_order", "strength", "degenerate", "seed"], kind="stable")
    shown = frame.drop_duplicates("grid_point")
    if len(shown) * len(inputs.attributions) > GALLERY_ROWS:
        shown = pd.concat([points.iloc[[0, -1]].drop_duplicates("grid_point") for _, points in shown.groupby("method", sort=False)])
    return shown


def _show_image(ax: plt.Axes, image: np.ndarray) -> None:
    if image.shape[0] == 1:
        ax.imshow(image[0], cmap="gray", vmin=0, vmax=1)
    else:
        ax.imshow(np.clip(np.moveaxis(image, 0, -1), 0, 1))


def saliency_gallery(inputs: FigureInputs) -> plt.Figure:
    """Test images on top; below, one row per (attribution map, grid point) of the maps of one
    of the grid point's models (:func:`gallery_models`), grid points by method and strength.
    When every grid point would make more than ``GALLERY_ROWS`` rows, each method shows its
    smallest and largest strength only, so that the page stays readable.

    Each map is scaled to its own largest magnitude (robust models have smaller gradients)
    with a diverging colormap symmetric around 0. RGB maps get a signed row (sum over
    channels) and a magnitude row (norm over channels).
    """
    eval_ds, saliency = inputs.eval_ds, inputs.saliency
    if eval_ds is None:
        raise ValueError("the saliency gallery needs the evaluation images")
    samples = gallery_samples(eval_ds["label"].values, inputs.options["gallery_samples"])
    offset = np.asarray(eval_ds.attrs["pixel_offset"], dtype=np.float32).reshape(-1, 1, 1)
    pixels = eval_ds["images"].isel(sample=samples).values + offset
    shown = gallery_models(inputs)
    attributions = inputs.attributions
    lam = {m: f"{label}\n(seed {seed})" for m, label, seed in zip(shown["model"], shown["label"], shown["seed"])}
    # the number to check the gradient rows against: the model's median edge correlation
    edges = dict(zip(shown["model"], shown["edge_correlation_median"])) if "edge_correlation_median" in shown else {}
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
        if attribution == GRADIENT:
            maps = store["saliency"].isel(sample=samples).values
        else:
            maps = store["attribution_map"].sel(attribution=attribution).isel(sample=samples).values
        for col in range(len(samples)):
            g = maps[col]
            if kind == "signed":
                drawn = g.sum(axis=0)
                scale = float(np.abs(drawn).max()) or 1.0
                im = axes[row, col].imshow(drawn, cmap="RdBu_r", vmin=-scale, vmax=scale)
            else:
                drawn = np.linalg.norm(g, axis=0)
                im = axes[row, col].imshow(drawn, cmap="magma", vmin=0, vmax=float(drawn.max()) or 1.0)
        suffix = "" if not rgb else f"\n{kind}"
        prefix = "" if len(attributions) == 1 else f"{ATTRIBUTION_LABELS.get(str(attribution), attribution)}\n"
        edge = f"\nedge r {edges[model]:.2f}" if attribution == GRADIENT and kind == "signed" and np.isfinite(edges.get(model, np.nan)) else ""
        axes[row, 0].set_ylabel(f"{prefix}{lam[model]}{suffix}{edge}", fontsize="small")
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0, 0].set_ylabel("image", fontsize="small")
    fig.colorbar(im, ax=axes[1:, -1], shrink=0.6, label="saliency / max |saliency| (per map)", ticks=[])
    if len(attributions) == 1:
        fig.suptitle(
            rf"Saliency maps $\nabla\Psi^{{F(x)}}(x)$, one row per grid point by {by}"
            + ("\n(edge r: the model's median correlation of |saliency| with the image's Sobel edges)" if edges else "")
        )
    else:
        fig.suptitle("Attribution maps of the predicted logit (signed), one row per (method, grid point)")
    return fig
