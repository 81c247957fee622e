"""The ensemble's robustness: per image, the smallest verified adversarial norm over the
attacks (docs/spec.md §4). Plain array work on attack stores: no attack library is imported,
so the stages that only read attack results do not depend on how attacks run.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping

import numpy as np
import xarray as xr

from saliency_robustness.data import DISTANCE
from saliency_robustness.errors import ConfigError

log = logging.getLogger(__name__)

#: ``robustness_attack`` where no attack succeeded
NO_ATTACK = "none"


def smallest_verified(norms: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """Along ``axis`` (the attacks) of verified norms (NaN where none): the index of the
    smallest one and its value (NaN where no attack succeeded; the index is then 0)."""
    masked = np.where(np.isfinite(norms), norms, np.inf)
    smallest = masked.min(axis=axis)
    return masked.argmin(axis=axis), np.where(np.isinf(smallest), np.nan, smallest)


def combine_attacks(datasets: Mapping[str, xr.Dataset]) -> xr.Dataset:
    """The ensemble: ``robustness`` = the smallest verified norm over the attacks (NaN where
    none succeeded), ``robustness_attack`` = which attack found it (``"none"``), and
    ``attack_perturbation_norm(sample, attack)`` = every attack's own verified norm."""
    if not datasets:
        raise ConfigError("attacks.ensemble is empty: at least one attack is needed for robustness")
    names = list(datasets)
    norms = xr.concat(
        [datasets[name]["perturbation_norm"].reset_coords(drop=True) for name in names],
        dim=xr.DataArray(names, dims="attack", name="attack"),
        join="exact",
    )
    values = norms.transpose("sample", "attack").values
    best, robustness = smallest_verified(values, axis=1)
    found = np.isfinite(robustness)
    best_name = np.where(found, np.asarray(names, dtype=object)[best], NO_ATTACK).astype(object)
    predictions = [datasets[name]["clean_prediction"].values for name in names if "clean_prediction" in datasets[name]]
    if any((p != predictions[0]).any() for p in predictions[1:]):
        log.warning("the attack stores disagree on some clean predictions (near-ties between logits)")
    failures = int((~found).sum())
    ds = xr.Dataset(
        {
            "robustness": (
                ("sample",),
                robustness,
                {
                    "long_name": "robustness rho(x): smallest verified adversarial L2 norm over the attacks (NaN where none)",
                    "units": DISTANCE,
                    "attack_failures": failures,
                },
            ),
            "robustness_attack": (
                ("sample",),
                best_name,
                {"long_name": f"attack that found the robustness ({NO_ATTACK!r} where none succeeded)", "units": "1"},
            ),
            "attack_perturbation_norm": (
                norms.transpose("sample", "attack").dims,
                values,
                {"long_name": "each attack's verified adversarial L2 norm (NaN where none)", "units": DISTANCE},
            ),
        },
        coords={"sample": norms["sample"].values, "attack": names},
        attrs={
            "attacks": json.dumps(names),
            "attack_failures": failures,
            "attack_successes": json.dumps({name: int(np.isfinite(values[:, k]).sum()) for k, name in enumerate(names)}),
        },
    )
    log.info("ensemble of %d attacks: robustness found for %d of %d images (%d failures)", len(names), int(found.sum()), len(found), failures)
    return ds
