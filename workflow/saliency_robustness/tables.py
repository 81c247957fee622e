"""The summary's three CSV tables, read from ``summary.zarr`` (the summary stage's dataset):
per model (``summary.csv``), per grid point (``summary_grid.csv``) and across models
(``summary_trends.csv``), each with one row per image subset; and the names of the
per-quantity statistics that ``summary.zarr`` stores and the tables list.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
import xarray as xr

from saliency_robustness.vocabulary import GRID_STATISTICS, MODEL_STATISTICS, SUBSETS

#: per model, subset and quantity: ``model_<statistic>`` in summary.zarr, ``<quantity>_<statistic>`` in summary.csv
PER_MODEL = (*MODEL_STATISTICS, "q25", "q75")
#: per grid point, subset and quantity: ``grid_<statistic>`` in summary.zarr, ``<quantity>_<statistic>`` in summary_grid.csv
PER_GRID_POINT = (*GRID_STATISTICS, "seed_sd", "gain", "gain_ci_low", "gain_ci_high")
#: marks the per-model coordinates that come from models.external attributes (a column each in summary.csv)
ATTRIBUTE_ROLE = "models.external attribute"


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
            row |= _quantity_columns(s, "model", PER_MODEL)
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
            row |= _quantity_columns(s, "grid", PER_GRID_POINT)
            rows.append(row)
    return pd.DataFrame(rows)


def trend_table(summary: xr.Dataset) -> pd.DataFrame:
    """One row per subset and trend (``summary_trends.csv``)."""
    frame = summary[["trend_spearman", "trend_spearman_ci_low", "trend_spearman_ci_high", "trend_interval"]].to_dataframe().reset_index()
    frame["n_models"] = [int(summary["trend_points"].sel(subset=s, trend=t)) for s, t in zip(frame["subset"], frame["trend"])]
    frame["excluded_degenerate_models"] = " ".join(json.loads(summary.attrs.get("excluded_degenerate_models", "[]")))
    return frame.rename(columns=lambda c: c.removeprefix("trend_"))


def write_csv(frame: pd.DataFrame, path: str | Path) -> None:
    """Write ``frame`` to ``path`` (6 significant digits), replacing it only once complete."""
    tmp = Path(path).with_suffix(".csv.partial")
    frame.to_csv(tmp, index=False, float_format="%.6g")
    tmp.replace(path)
