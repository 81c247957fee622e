"""Robustness ``rho(x)``: minimum-norm L2 attacks (Foolbox 3.3.4), each result verified by our code.

``rho(x) = inf {||e|| : F(x + e) != F(x)}`` is the distance to the decision boundary of the
model's *own* decision (docs/spec.md §4), so the attack criterion is ``Misclassification`` with the
model's predictions as labels. Attacks only bound ``rho`` from above; every point they
return is checked here (:func:`verify_adversarials`): the model's prediction must flip, the
point must lie in the input bounds, and the norm is recomputed. A point that fails any
check is a failure for that image, whatever the attack claimed.

Foolbox runs on pixels (``x + pixel_offset``, bounds ``pixel_bounds``) with the model
wrapped as ``model(pixel - pixel_offset)``: a translation leaves L2 distances unchanged,
and the adversarials are mapped back to the model's input space (docs/spec.md §5).

The config names attack classes of :data:`ATTACKS`: the Foolbox attacks with their traps
fixed (:mod:`saliency_robustness.foolbox_fixes`), the project's own ALMA
(:mod:`saliency_robustness.alma`; Foolbox has none) and two Foolbox attacks used unchanged:

- ``DDNAttack``: its step size (1.0, annealed to 0.01) and ``init_epsilon`` are absolute L2
  lengths in input units, which suits pixels in [0, 1] (MNIST rho ~ 1-3); lower
  ``init_epsilon`` for inputs of much smaller robustness.
- ``L2BrendelBethgeAttack``: only run as a refinement (``refine: true``) from the best
  verified adversarial of the other attacks, because it asserts that every starting point is
  adversarial; it needs numba (extra ``refine``) and compiles for about a minute.

Which attacks make the ensemble, and how their results combine into ``rho``
(:func:`saliency_robustness.robustness.combine_attacks`), is the config's and the metrics
stage's business; this module builds, runs and verifies attacks.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import logging
import math
import time
from collections.abc import Mapping
from typing import Any

import foolbox as fb
import numpy as np
import torch
import xarray as xr
from torch import nn

from saliency_robustness.alma import ALMAL2Attack
from saliency_robustness.data import DISTANCE, InputSpace
from saliency_robustness.errors import ConfigError, one_line
from saliency_robustness.foolbox_fixes import BoundarySearchL2DeepFoolAttack, CorrectedL2FMNAttack, GuardedL2CarliniWagnerAttack
from saliency_robustness.robustness import smallest_verified
from saliency_robustness.runtime import full_precision, progress, resolve_device

log = logging.getLogger(__name__)

#: config class name -> attack class (with the Foolbox traps of docs/spec.md §4 fixed)
ATTACKS: dict[str, Any] = {
    "L2DeepFoolAttack": BoundarySearchL2DeepFoolAttack,
    "L2CarliniWagnerAttack": GuardedL2CarliniWagnerAttack,
    "L2FMNAttack": CorrectedL2FMNAttack,
    "DDNAttack": fb.attacks.DDNAttack,
    "L2BrendelBethgeAttack": fb.attacks.L2BrendelBethgeAttack,
    "ALMAL2Attack": ALMAL2Attack,
}


#: what the registered attacks' numeric keywords may be: (type, lower bound, whether the bound
#: itself is allowed). Foolbox checks none of them: ``steps: -5`` runs, succeeds nowhere and
#: drops the attack from rho silently; ``candidates: 1`` fails at job time.
KEYWORD_RANGES: dict[str, tuple[type, float, bool]] = {
    "steps": (int, 1, True),
    "binary_search_steps": (int, 1, True),
    "boundary_search_steps": (int, 0, True),
    "candidates": (int, 2, True),
    "lr_num_decay": (int, 1, True),
    "init_epsilon": (float, 0, False),
    "gamma": (float, 0, False),
    "max_stepsize": (float, 0, False),
    "min_stepsize": (float, 0, False),
    "stepsize": (float, 0, False),
    "lr": (float, 0, False),
    "lr_decay": (float, 0, False),
    "initial_const": (float, 0, False),
    "overshoot": (float, 0, True),
    "confidence": (float, 0, True),
    "momentum": (float, 0, True),
    # ALMA (its constructor checks the upper ends: lr_reduction, tau <= 1, alpha < 1)
    "check_steps": (int, 1, True),
    "targets": (int, 0, True),
    "direction_seed": (int, 0, True),
    "lr_reduction": (float, 0, False),
    "mu_init": (float, 0, False),
    "rho_init": (float, 0, False),
    "tau": (float, 0, False),
    "alpha": (float, 0, True),
    "logit_tolerance": (float, 0, True),
}

#: relative slack on the input bounds when verifying (pixel <-> input space round-off)
BOUNDS_TOLERANCE = 1e-5


#: attacks that must start from adversarial points (``refine: true`` in the config)
NEEDS_STARTING_POINTS = {"L2BrendelBethgeAttack"}


def make_attack(name: str, kwargs: Mapping[str, Any] | None = None) -> fb.attacks.base.MinimizationAttack:
    """The attack registered as ``name``, built with the config's keyword arguments."""
    try:
        entry = ATTACKS[name]
    except KeyError:
        raise ConfigError(f"unknown attack class {name!r} (known: {', '.join(ATTACKS)})") from None
    try:
        return entry(**dict(kwargs or {}))
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"bad keyword arguments for {name}: {one_line(exc)}") from None
    except ImportError as exc:  # numba for Brendel-Bethge
        raise ConfigError(f"{name} needs an optional package ({exc}); pip install 'saliency-robustness[refine]'") from None


def _check_keywords(name: str, kwargs: Mapping[str, Any]) -> None:
    try:
        inspect.signature(ATTACKS[name]).bind(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"bad keyword arguments for {name}: {one_line(exc)}") from None
    if importlib.util.find_spec("numba") is None:
        raise ConfigError(f"{name} needs the optional package numba; pip install 'saliency-robustness[refine]'")


def check_keyword_values(kwargs: Mapping[str, Any], num_classes: int | None = None) -> None:
    """Each numeric keyword of :data:`KEYWORD_RANGES` has its type and lies in its range;
    ``candidates`` is at most the dataset's class count (when known)."""
    for key, value in kwargs.items():
        if key not in KEYWORD_RANGES or (value is None and key in ("candidates", "min_stepsize")):
            continue
        kind, bound, inclusive = KEYWORD_RANGES[key]
        if isinstance(value, bool) or not isinstance(value, int if kind is int else int | float):
            raise ConfigError(f"keyword {key}: {value!r} is not {'an integer' if kind is int else 'a number'}")
        if not math.isfinite(value) or value < bound or (value == bound and not inclusive):
            raise ConfigError(f"keyword {key}: {value!r} must be {'at least' if inclusive else 'more than'} {bound:g}")
    candidates = kwargs.get("candidates")
    if num_classes is not None and candidates is not None and candidates > num_classes:
        raise ConfigError(f"keyword candidates: {candidates} is more than the dataset's {num_classes} classes")


def check_ensemble(ensemble: Mapping[str, Mapping[str, Any]], num_classes: int | None = None) -> None:
    """Check every attack of the config's ensemble once, so that an unknown class, a bad
    keyword or value, or a missing optional package stops the run at start-up, before any job."""
    if not ensemble:
        raise ConfigError("config key 'attacks.ensemble': empty; at least one attack is needed for robustness")
    for name, settings in ensemble.items():
        try:
            check_keyword_values(settings["kwargs"], num_classes)
            if settings["attack"] in NEEDS_STARTING_POINTS:
                # its constructor compiles numba code for up to a minute: check the keywords only
                _check_keywords(settings["attack"], settings["kwargs"])
            else:
                make_attack(settings["attack"], settings["kwargs"])
        except ConfigError as exc:
            raise ConfigError(f"config key 'attacks.ensemble.{name}': {exc}") from None
    if all(settings["refine"] for settings in ensemble.values()):
        raise ConfigError("config key 'attacks.ensemble': a refining attack (refine: true) needs at least one attack with refine: false")


class PixelModel(nn.Module):
    """``model(pixel - pixel_offset)``: the model seen from pixel space, where the bounds are boxes."""

    def __init__(self, model: nn.Module, space: InputSpace) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("offset", torch.tensor(space.pixel_offset, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model(pixels - self.offset)


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(x).argmax(dim=1)


@torch.no_grad()
def verify_adversarials(
    model: nn.Module,
    x: torch.Tensor,
    x_adv: torch.Tensor,
    clean_prediction: torch.Tensor,
    bounds: tuple[float | torch.Tensor, float | torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Check candidate adversarials ourselves, whatever the attack claimed.

    ``x_adv`` counts as adversarial when it is finite, lies inside ``bounds`` (lower, upper:
    numbers or tensors broadcasting against ``x``; slack ``BOUNDS_TOLERANCE`` of their width)
    and the model's prediction on it differs from ``clean_prediction``.

    Returns ``(success, norms, adversarial_prediction)``: a bool mask, ``||x_adv - x||``
    recomputed in float64 (NaN where not verified) and the prediction on ``x_adv``
    (-1 where ``x_adv`` is not finite).
    """
    low, high = (torch.as_tensor(b, dtype=x.dtype, device=x.device) for b in bounds)
    slack = BOUNDS_TOLERANCE * (high - low).abs().max()
    n = len(x)
    finite = torch.isfinite(x_adv.reshape(n, -1)).all(dim=1)
    # non-finite rows are evaluated as x, so the batch is the one the attack saw
    candidate = torch.where(atleast_kd_torch(finite, x.ndim), x_adv, x)
    inside = ((candidate >= low - slack) & (candidate <= high + slack)).reshape(n, -1).all(dim=1)
    prediction = predict(model, candidate)
    success = finite & inside & (prediction != clean_prediction)
    norms = (candidate.double() - x.double()).reshape(n, -1).norm(dim=1)
    norms = torch.where(success, norms, torch.full_like(norms, math.nan))
    prediction = torch.where(finite, prediction, torch.full_like(prediction, -1))
    return success, norms, prediction


def atleast_kd_torch(t: torch.Tensor, ndim: int) -> torch.Tensor:
    return t.reshape(t.shape + (1,) * (ndim - t.ndim))


# TF32 off: adversarials are found and verified under the full-float32 arithmetic of the
# saliency maps and metrics (cuDNN's default TF32 would move the decision boundary slightly)
@full_precision()
def run_attack(
    model: nn.Module,
    images: torch.Tensor,
    space: InputSpace,
    *,
    attack: str | fb.attacks.base.MinimizationAttack,
    kwargs: Mapping[str, Any] | None = None,
    batch_size: int | None = None,
    starting_points: torch.Tensor | None = None,
    device: torch.device | str | None = None,
    store_adversarials: bool,
    name: str | None = None,
) -> xr.Dataset:
    """Attack every image (input space, ``(N, C, H, W)``) and verify each result.

    ``attack`` is a class name of :data:`ATTACKS` (built with ``kwargs``) or an attack
    instance. ``starting_points`` (input space, NaN rows where there is none) are passed to
    the attack; images without one are skipped (a failure, ``claimed_success`` False).
    The criterion is the model's own prediction. Returns a dataset over ``sample`` with
    ``perturbation_norm`` (NaN where not verified), ``success``, ``claimed_success``,
    ``adversarial_prediction``, ``clean_prediction`` and (optionally) ``adversarial``.
    """
    device = resolve_device(device)
    instance = make_attack(attack, kwargs) if isinstance(attack, str) else attack
    class_name = attack if isinstance(attack, str) else type(attack).__name__
    name = name or class_name
    model = model.to(device).eval()
    pixel_model = PixelModel(model, space).to(device).eval()
    fmodel = fb.PyTorchModel(pixel_model, bounds=space.pixel_bounds, device=device)
    bounds = space.input_bounds(device)
    n = len(images)

    clean = np.full(n, -1, dtype=np.int64)
    adv_pred = np.full(n, -1, dtype=np.int64)
    claimed = np.zeros(n, dtype=bool)
    success = np.zeros(n, dtype=bool)
    norms = np.full(n, np.nan, dtype=np.float64)
    adversarials = np.full(images.shape, np.nan, dtype=np.float32) if store_adversarials else None

    started = time.perf_counter()
    batch_size = batch_size if batch_size is not None else max(n, 1)
    batches = range(0, n, batch_size)
    for start in progress(batches, desc=f"{name}", unit="batch", total=len(batches)):
        stop = min(start + batch_size, n)
        x = images[start:stop].to(device, dtype=torch.float32)
        clean_prediction = predict(model, x)
        clean[start:stop] = clean_prediction.cpu().numpy()
        rows = torch.arange(len(x), device=device)
        call_kwargs: dict[str, Any] = {}
        if starting_points is not None:
            starts = starting_points[start:stop].to(device, dtype=torch.float32)
            start_pixels = torch.clamp(space.to_pixels(starts), *space.pixel_bounds)
            has_start = torch.isfinite(starts.reshape(len(x), -1)).all(dim=1)
            # the attack asserts that every start is adversarial on exactly the batch it gets
            has_start &= predict(pixel_model, torch.where(atleast_kd_torch(has_start, x.ndim), start_pixels, 0.0)) != clean_prediction
            rows = rows[has_start]
            call_kwargs["starting_points"] = start_pixels[rows]
        if len(rows) == 0:
            continue
        x_run = x[rows]
        pixels = torch.clamp(space.to_pixels(x_run), *space.pixel_bounds)
        criterion = fb.criteria.Misclassification(clean_prediction[rows])
        _, adv_pixels, claimed_batch = instance(fmodel, pixels, criterion, epsilons=None, **call_kwargs)
        x_adv = space.from_pixels(adv_pixels.detach())
        ok, dist, pred = verify_adversarials(model, x_run, x_adv, clean_prediction[rows], bounds)
        index = start + rows.cpu().numpy()
        claimed[index] = claimed_batch.cpu().numpy()
        success[index] = ok.cpu().numpy()
        norms[index] = dist.cpu().numpy()
        adv_pred[index] = pred.cpu().numpy()
        if adversarials is not None:
            adversarials[index] = torch.where(atleast_kd_torch(ok, x_adv.ndim), x_adv, math.nan).cpu().numpy()
    seconds = time.perf_counter() - started

    log.info(
        "%s on %d images: %d successes claimed, %d verified (%d claimed but rejected), median verified norm %.4g, %.1f s",
        name,
        n,
        int(claimed.sum()),
        int(success.sum()),
        int((claimed & ~success).sum()),
        float(np.nanmedian(norms)) if success.any() else math.nan,
        seconds,
    )
    return attack_dataset(
        name=name,
        class_name=class_name,
        kwargs=dict(kwargs or {}),
        clean=clean,
        adversarial_prediction=adv_pred,
        claimed=claimed,
        success=success,
        norms=norms,
        adversarials=adversarials,
        seconds=seconds,
        space=space,
        started=starting_points is not None,
    )


def attack_dataset(
    *,
    name: str,
    class_name: str,
    kwargs: Mapping[str, Any],
    clean: np.ndarray,
    adversarial_prediction: np.ndarray,
    claimed: np.ndarray,
    success: np.ndarray,
    norms: np.ndarray,
    adversarials: np.ndarray | None,
    seconds: float,
    space: InputSpace,
    started: bool,
) -> xr.Dataset:
    """The per-sample results of one attack as a labelled dataset."""
    n = len(clean)
    data = {
        "perturbation_norm": (
            ("sample",),
            norms,
            {"long_name": f"verified L2 norm of the {name} adversarial (NaN where none verified)", "units": DISTANCE},
        ),
        "success": (("sample",), success, {"long_name": "adversarial verified by our code", "units": "1"}),
        "claimed_success": (("sample",), claimed, {"long_name": "success claimed by the attack (Foolbox)", "units": "1"}),
        "adversarial_prediction": (
            ("sample",),
            adversarial_prediction,
            {"long_name": "model's prediction on the attack's output (-1 where none)", "units": "1"},
        ),
        "clean_prediction": (("sample",), clean, {"long_name": "model's prediction F(x) (the attack's criterion)", "units": "1"}),
    }
    coords: dict[str, Any] = {"sample": np.arange(n)}
    if adversarials is not None:
        data["adversarial"] = (
            ("sample", "channel", "y", "x"),
            adversarials,
            {"long_name": "verified adversarial in the model's input space (NaN where none)", "units": "1"},
        )
        coords.update({d: np.arange(s) for d, s in zip(("channel", "y", "x"), adversarials.shape[1:])})
    return xr.Dataset(
        data,
        coords=coords,
        attrs={
            "title": f"attack {name} ({class_name})",
            "attack_name": name,
            "attack_class": class_name,
            "attack_kwargs": json.dumps(dict(kwargs), sort_keys=True, default=str),
            "criterion": "misclassification w.r.t. the model's own prediction",
            "n_samples": n,
            "claimed_successes": int(claimed.sum()),
            "verified_successes": int(success.sum()),
            "rejected_claims": int((claimed & ~success).sum()),
            "refined_from_starting_points": int(started),
            "attack_seconds": round(seconds, 3),
            "pixel_offset": list(space.pixel_offset),
            "pixel_bounds": list(space.pixel_bounds),
        },
    )


def best_adversarials(datasets: Mapping[str, xr.Dataset]) -> tuple[np.ndarray, np.ndarray]:
    """Per sample, the verified adversarial of smallest norm over ``datasets`` (NaN rows where
    none) and that norm: the starting points of a refining attack."""
    if not datasets:
        raise ConfigError("a refining attack (refine: true) needs at least one attack with refine: false")
    lacking = [name for name, ds in datasets.items() if "adversarial" not in ds]
    if lacking:
        raise ConfigError(
            f"a refining attack needs stored adversarials, but {', '.join(lacking)} has none: set attacks.store_adversarials: true"
        )
    stacked = xr.concat([ds["perturbation_norm"] for ds in datasets.values()], dim="attack").values
    best, norms = smallest_verified(stacked, axis=0)
    starts = np.full(next(iter(datasets.values()))["adversarial"].shape, np.nan, dtype=np.float32)
    for k, ds in enumerate(datasets.values()):
        rows = np.flatnonzero((best == k) & np.isfinite(norms))
        if len(rows):
            starts[rows] = ds["adversarial"].values[rows]
    return starts, norms


def run_ensemble(
    model: nn.Module,
    images: torch.Tensor,
    space: InputSpace,
    ensemble: Mapping[str, Mapping[str, Any]],
    *,
    batch_size: int | None = None,
    device: torch.device | str | None = None,
    starts_from: Mapping[str, xr.Dataset] | None = None,
) -> dict[str, xr.Dataset]:
    """Every attack of a validated config ``ensemble`` (name -> ``{attack, kwargs, refine}``) on ``images``,
    as the workflow runs them: the attacks with ``refine: false`` first, then each refining
    attack from their best verified adversarials (and those of ``starts_from``, results of
    earlier calls). Without Snakemake, for tests and benchmarks."""
    results: dict[str, xr.Dataset] = {}
    for refine in (False, True):
        stage = {name: spec for name, spec in ensemble.items() if spec["refine"] == refine}
        starts = torch.from_numpy(best_adversarials({**(starts_from or {}), **results})[0]) if refine and stage else None
        for name, spec in stage.items():
            results[name] = run_attack(
                model,
                images,
                space,
                attack=spec["attack"],
                kwargs=spec["kwargs"],
                batch_size=batch_size,
                starting_points=starts,
                device=device,
                store_adversarials=True,  # the refining attacks start from them
                name=name,
            )
    return results
