"""The attack stage: one attack on one model, ``attacks/<model>/<attack>.zarr`` (docs/spec.md §4, §7).

Building, running and verifying attacks is :mod:`saliency_robustness.ensemble`; a refining
attack starts from the best verified adversarials of the stores of the other attacks.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import xarray as xr

from saliency_robustness.data import InputSpace, eval_tensors
from saliency_robustness.ensemble import NEEDS_STARTING_POINTS, best_adversarials, check_keyword_values, run_attack
from saliency_robustness.errors import ConfigError, PipelineError, StoreError
from saliency_robustness.models import degenerate_reason, load_model, load_spec, read_test_accuracy
from saliency_robustness.runtime import machine, resolve_device
from saliency_robustness.stores import computed_from, open_store, provenance, write_store

log = logging.getLogger(__name__)


def load_attack_stores(paths: Sequence[str | Path], source: Mapping[str, str] | None = None) -> dict[str, xr.Dataset]:
    """Attack stores by attack name (the store's file stem, as in ``attacks/<model>/<attack>.zarr``),
    each computed from ``source`` (:func:`stores.computed_from`) by the attack it is named for."""
    stores = {}
    for p in paths:
        name = Path(p).name.removesuffix(".zarr")
        stores[name] = open_store(p, variables=["perturbation_norm", "success"], expect={**(source or {}), "attack": name})
    return stores


def attack_stage(
    *,
    model_dir: str | Path,
    eval_store: str | Path,
    output: str | Path,
    settings: Mapping[str, Any],
    start_stores: Sequence[str | Path] = (),
) -> None:
    """One attack on one model: ``attacks/<model>/<attack>.zarr``.

    ``settings``: ``name``, ``attack`` (a class name of :data:`ATTACKS`), ``kwargs``,
    ``refine``, ``batch_size``, ``store_adversarials``. A refining attack starts from the best
    verified adversarial of the stores in ``start_stores``.
    """
    device = resolve_device()
    try:  # the start-up check knows the built-in datasets' class counts; a folder's is the model's
        check_keyword_values(settings["kwargs"], load_spec(model_dir).num_classes)
    except ConfigError as exc:
        raise ConfigError(f"config key 'attacks.ensemble.{settings['name']}': {exc}") from None
    model = load_model(model_dir, device)
    eval_ds = open_store(eval_store, variables=["images"])
    images, _ = eval_tensors(eval_ds)
    space = InputSpace.from_attrs(eval_ds.attrs)
    starting_points = None
    if settings["refine"]:
        source = computed_from(model_dir=model_dir, eval_store=eval_store)
        starts, start_norms = best_adversarials(load_attack_stores(start_stores, source))
        if starts.shape != tuple(images.shape):
            raise StoreError(f"starting points of shape {starts.shape} do not match the {tuple(images.shape)} evaluation images")
        starting_points = torch.from_numpy(starts)
        log.info(
            "refining from %d verified starting points (median norm %.4g)",
            int(np.isfinite(start_norms).sum()),
            float(np.nanmedian(start_norms)) if np.isfinite(start_norms).any() else math.nan,
        )
    elif settings["attack"] in NEEDS_STARTING_POINTS:
        raise ConfigError(
            f"attack {settings['name']} ({settings['attack']}) needs refine: true (it starts from other attacks' adversarials)"
        )
    log.info(
        "attack %s (%s %s) on %s, %d images, batch %d",
        settings["name"],
        settings["attack"],
        dict(settings["kwargs"]),
        device,
        len(images),
        settings["batch_size"],
    )
    result = run_attack(
        model,
        images,
        space,
        attack=settings["attack"],
        kwargs=settings["kwargs"],
        batch_size=settings["batch_size"],
        starting_points=starting_points,
        device=device,
        store_adversarials=settings["store_adversarials"],
        name=settings["name"],
    )
    if len(images) and not bool(result["success"].any()):
        # a minimum-norm attack moves nearly every image; one that verifies none would drop out
        # of rho without a trace, unless the model itself is degenerate (flagged downstream)
        reason = degenerate_reason(*read_test_accuracy(model_dir), load_spec(model_dir).num_classes)
        if reason:
            log.warning(
                "attack %s verified no adversarial on the degenerate model %s (%s): its rho stays NaN, flagged in the summary",
                settings["name"], Path(model_dir).name, reason,
            )  # fmt: skip
        else:
            raise PipelineError(
                f"attack {settings['name']} ({settings['attack']}) verified no adversarial on any of the {len(images)} evaluation images "
                f"of model {Path(model_dir).name}: with these settings it adds nothing to rho; fix config key 'attacks.ensemble.{settings['name']}'"
            )
    result = result.assign_coords(sample=eval_ds["sample"].values)
    result.attrs.update(
        provenance(
            dict(settings),
            model=Path(model_dir).name,
            machine=machine(device),
            computed_from=computed_from(model_dir=model_dir, eval_store=eval_store, attack=settings["name"]),
        )
    )
    write_store(result, output, chunks={"sample": sample_chunk(images.shape)})


def sample_chunk(shape: Sequence[int], target_bytes: int = 1 << 24) -> int:
    """Samples per chunk so that an image chunk stays near ``target_bytes`` (float32)."""
    per_sample = 4 * int(np.prod(shape[1:]))
    return max(1, min(int(shape[0]), target_bytes // per_sample))
