"""All models' per-image metrics stacked along ``model``, and one row of statistics per model.

Statistics are taken over the evaluation images (correctly classified or not: the distance
to the decision boundary is defined for every image). Each statistic uses the images where
its variable is finite, so an image no attack could move counts as an attack failure and is
left out of the robustness statistics, not treated as distance 0 or infinity.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr
from scipy.stats import spearmanr

from saliency_robustness.errors import StoreError, one_line
from saliency_robustness.models import ModelSpec, load_spec
from saliency_robustness.stores import open_store, provenance, write_store

log = logging.getLogger(__name__)

# the per-image variables whose median and quartiles go into summary.csv
SUMMARISED = ("alignment", "alignment_cosine", "robustness", "linearized_robustness", "homogeneity")
# (x, y) pairs whose Spearman rank correlation over images goes into summary.csv
CORRELATED = (("alignment", "robustness"), ("linearized_robustness", "robustness"))


def stack_models(metrics: Mapping[str, xr.Dataset], specs: Mapping[str, ModelSpec], test_accuracy: Mapping[str, float]) -> xr.Dataset:
    """Concatenate per-model metrics along a new ``model`` dim with the training options as coordinates."""
    names = sorted(metrics, key=lambda m: (specs[m].lam, m))
    stacked = xr.concat([metrics[m].drop_attrs(deep=False) for m in names], dim="model", coords="minimal", compat="override", join="outer")
    stacked = stacked.assign_coords(
        model=("model", names),
        lam=("model", [specs[m].lam for m in names], {"long_name": "regularization strength lambda (per example)", "units": "1"}),
        sensitivity=("model", [specs[m].sensitivity for m in names], {"long_name": "regularized sensitivity"}),
        p=("model", [specs[m].p for m in names], {"long_name": "power of the gradient norm in the penalty", "units": "1"}),
        seed=("model", [specs[m].seed for m in names], {"long_name": "training seed"}),
    )
    stacked["test_accuracy"] = xr.DataArray(
        [test_accuracy[m] for m in names],
        dims="model",
        attrs={"long_name": "clean accuracy on the whole test set", "units": "1"},
    )
    for name, first in metrics[names[0]].data_vars.items():
        stacked[name].attrs = dict(first.attrs)
    return stacked


def _finite(values: np.ndarray) -> np.ndarray:
    values = np.asarray(values, dtype=np.float64)
    return values[np.isfinite(values)]


def model_table(stacked: xr.Dataset) -> pd.DataFrame:
    """One row per model: lambda, accuracy, medians and quartiles, rank correlations, counts."""
    rows = []
    for model in stacked["model"].values:
        ds = stacked.sel(model=model)
        row: dict[str, object] = {
            "model": str(model),
            "lambda": float(ds["lam"]),
            "sensitivity": str(ds["sensitivity"].values),
            "p": float(ds["p"]),
            "test_accuracy": float(ds["test_accuracy"]),
            "eval_accuracy": float(ds["correct"].mean()) if "correct" in ds else np.nan,
            "n_images": int(ds.sizes["sample"]),
        }
        for var in SUMMARISED:
            values = _finite(ds[var].values) if var in ds else np.array([])
            q25, median, q75 = np.quantile(values, [0.25, 0.5, 0.75]) if values.size else (np.nan,) * 3
            row |= {f"{var}_median": median, f"{var}_q25": q25, f"{var}_q75": q75}
        for x, y in CORRELATED:
            key = f"spearman_{x}_{y}"
            if x in ds and y in ds:
                a, b = np.asarray(ds[x].values, float), np.asarray(ds[y].values, float)
                ok = np.isfinite(a) & np.isfinite(b)
                row[key] = float(spearmanr(a[ok], b[ok]).statistic) if ok.sum() > 2 else np.nan
            else:
                row[key] = np.nan
        row["attack_failures"] = int(np.isnan(ds["robustness"].values).sum()) if "robustness" in ds else ds.sizes["sample"]
        rows.append(row)
    return pd.DataFrame(rows)


def table_dataset(table: pd.DataFrame) -> xr.Dataset:
    """The per-model statistics as variables along ``model`` (for summary.zarr)."""
    stats = table.drop(columns=["lambda", "sensitivity", "p", "test_accuracy"]).set_index("model")
    ds = xr.Dataset.from_dataframe(stats)
    for name in ds.data_vars:
        base = name.rsplit("_", 1)[0] if name.endswith(("_median", "_q25", "_q75")) else name
        ds[name].attrs = {"long_name": f"{name.replace('_', ' ')} over evaluation images", "units": "1"}
        if base in ("alignment", "robustness", "linearized_robustness"):
            ds[name].attrs["units"] = "input-space L2 distance"
    return ds.rename({n: f"stat_{n}" for n in ds.data_vars})


def read_test_accuracy(model_dir: str | Path) -> float:
    """The clean test accuracy the train stage wrote to ``models/<model>/test_accuracy.json``."""
    path = Path(model_dir) / "test_accuracy.json"
    try:
        return float(json.loads(path.read_text())["test_accuracy"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise StoreError(f"cannot read the test accuracy {path} ({one_line(exc)}); delete {model_dir} and rerun") from None


def summary_stage(
    *,
    models: Sequence[str],
    metrics_stores: Sequence[str | Path],
    model_dirs: Sequence[str | Path],
    output_zarr: str | Path,
    output_csv: str | Path,
) -> None:
    """Write ``summary.zarr`` (per-image variables stacked along ``model`` plus per-model
    statistics prefixed ``stat_``) and ``summary.csv`` (one row per model)."""
    metrics = {m: open_store(p).load() for m, p in zip(models, metrics_stores)}
    specs = {m: load_spec(d) for m, d in zip(models, model_dirs)}
    accuracy = {m: read_test_accuracy(d) for m, d in zip(models, model_dirs)}
    stacked = stack_models(metrics, specs, accuracy)
    table = model_table(stacked)
    summary = xr.merge([stacked, table_dataset(table)], combine_attrs="override")
    summary.attrs = provenance(None, models=list(stacked["model"].values), title="all models stacked along model")
    write_store(summary, output_zarr)
    tmp = Path(output_csv).with_suffix(".csv.partial")
    table.to_csv(tmp, index=False, float_format="%.6g")
    tmp.replace(output_csv)
    log.info("summary of %d models written", len(models))
