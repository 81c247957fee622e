"""Every model's per-image metrics stacked along a ``model`` dim, with what each model is: its
training method, strength and seed, its grid point (the training setting but the seed), its
test accuracy and degenerate flag, the machine it was trained on, and the external models'
attributes as per-model coordinates. The summary stage computes its statistics on this.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from saliency_robustness.errors import ConfigError
from saliency_robustness.fingerprints import fingerprint
from saliency_robustness.models import ModelSpec, degenerate_reason, load_spec, read_machine, read_test_accuracy
from saliency_robustness.stores import content_digest, open_store
from saliency_robustness.tables import ATTRIBUTE_ROLE
from saliency_robustness.vocabulary import EXTERNAL, GRADIENT, GRADNORM, METHODS, grid_point_name


def setting_key(spec: ModelSpec) -> str:
    """What a model's training was, all but the replicate seed: models with equal keys are
    replicates of one grid point."""
    spec_dict = {k: v for k, v in vars(spec).items() if k not in ("name", "seed")}
    spec_dict["training"] = {k: v for k, v in spec.training.items() if k not in ("seed", "seeds")}
    return fingerprint(spec_dict)


def setting_label(spec: ModelSpec) -> str:
    """The grid point's name: the model name without its seed (e.g. ``gradnorm-lambda0.3``);
    an external model is a grid point of its own."""
    return spec.name if spec.method == EXTERNAL else grid_point_name(spec.name)


def _attribute_values(values: list[Any]) -> np.ndarray:
    """One attribute across models: numbers (NaN where a model lacks it), else text ("" where missing)."""
    given = [v for v in values if v is not None]
    if given and all(isinstance(v, int | float) and not isinstance(v, bool) for v in given):
        return np.array([np.nan if v is None else float(v) for v in values])
    return np.array(["" if v is None else str(v) for v in values], dtype=object)


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
    order, given = list(METHODS), list(metrics)

    def position(m: str) -> tuple[int, float, int, int]:
        strength = specs[m].strength
        strength = 0.0 if strength is None else strength
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
            [specs[m].strength if specs[m].method == GRADNORM else np.nan for m in names],
            {"long_name": "regularization strength lambda (per example; NaN: not a gradnorm model)", "units": "1"},
        ),
        method=(
            "model",
            [specs[m].method for m in names],
            {"long_name": "training method: gradnorm, adversarial (L2 PGD) or external (not trained here)"},
        ),
        strength=(
            "model",
            [np.nan if specs[m].strength is None else specs[m].strength for m in names],
            {"long_name": "the method's strength: lambda (gradnorm) or the PGD radius epsilon (adversarial); NaN: external", "units": "1"},
        ),
        sensitivity=("model", [specs[m].sensitivity or "" for m in names], {"long_name": "regularized sensitivity"}),
        p=(
            "model",
            [np.nan if specs[m].p is None else specs[m].p for m in names],
            {"long_name": "power of the gradient norm in the penalty", "units": "1"},
        ),
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
            if str(attribution) != GRADIENT:
                for name in ("alignment", "alignment_cosine"):
                    source = stacked[f"attribution_{name}"]
                    stacked[f"{name}_{attribution}"] = source.sel(attribution=attribution, drop=True).assign_attrs(
                        source.attrs, long_name=f"{source.attrs['long_name']} (a: {attribution})"
                    )
    return stacked


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


def healthy_models(stacked: xr.Dataset) -> list[str]:
    """The models that are not degenerate: those the grid-point and trend statistics use."""
    return [str(m) for m, bad in zip(stacked["model"].values, stacked["degenerate"].values) if not bad]


def grid_points(stacked: xr.Dataset, healthy: Sequence[str]) -> dict[str, list[str]]:
    """Grid-point label -> its non-degenerate models, in model order."""
    points: dict[str, list[str]] = {}
    for model, label in zip(stacked["model"].values, stacked["setting"].values):
        points.setdefault(str(label), [])
        if str(model) in healthy:
            points[str(label)].append(str(model))
    return points
