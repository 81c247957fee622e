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

The registry :data:`ATTACKS` maps the class names used in the config to classes in which
the Foolbox 3.3.4 traps of docs/spec.md §4 are fixed:

- ``L2CarliniWagnerAttack`` -> :class:`GuardedL2CarliniWagnerAttack`: best-so-far starts at
  ``x``, not at the zero image (which is often misclassified, a fake success of norm ~||x||).
- ``L2FMNAttack`` -> :class:`CorrectedL2FMNAttack`: a real projection onto the L2 ball
  (Foolbox divides ``norms / norms`` and never projects). Started from scratch, FMN can
  stall before its first adversarial (its linear estimate of the distance is too short and
  the box clipping eats the step: about 20% of MNIST images); started from adversarials
  (``refine: true``) it is the tightest attack per gradient that we measured.
- ``L2DeepFoolAttack`` -> :class:`BoundarySearchL2DeepFoolAttack`: Foolbox returns its last,
  overshooting iterate; an optional bisection on the segment ``[x, x_adv]`` trims the overshoot.
- ``DDNAttack``: unchanged. Its step size (1.0, annealed to 0.01) and ``init_epsilon`` are
  absolute L2 lengths in input units, which suits pixels in [0, 1] (MNIST rho ~ 1-3);
  lower ``init_epsilon`` for inputs of much smaller robustness.
- ``L2BrendelBethgeAttack``: unchanged, but only run as a refinement (``refine: true``) from
  the best verified adversarial of the other attacks, because it asserts that every starting
  point is adversarial; it needs numba (extra ``refine``) and compiles for about a minute.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import xarray as xr
from torch import nn

os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")  # foolbox imports git at import time

import eagerpy as ep  # noqa: E402
import foolbox as fb  # noqa: E402
from foolbox.attacks.base import MinimizationAttack, get_criterion, get_is_adversarial, raise_if_kwargs  # noqa: E402
from foolbox.attacks.carlini_wagner import _to_attack_space, _to_model_space, best_other_classes  # noqa: E402
from foolbox.attacks.gradient_descent_base import AdamOptimizer  # noqa: E402
from foolbox.devutils import atleast_kd, flatten  # noqa: E402

from saliency_robustness.data import DISTANCE, InputSpace, eval_tensors  # noqa: E402
from saliency_robustness.errors import ConfigError, StoreError, one_line  # noqa: E402
from saliency_robustness.models import load_model  # noqa: E402
from saliency_robustness.runtime import full_precision, progress, resolve_device  # noqa: E402
from saliency_robustness.stores import open_store, provenance, write_store  # noqa: E402

log = logging.getLogger(__name__)

#: relative slack on the input bounds when verifying (pixel <-> input space round-off)
BOUNDS_TOLERANCE = 1e-5
NO_ATTACK = "none"


# ---------------------------------------------------------------------------------------------
# Guarded Foolbox attacks


class GuardedL2CarliniWagnerAttack(fb.attacks.L2CarliniWagnerAttack):
    """Foolbox 3.3.4's L2 Carlini-Wagner with its best-so-far starting at ``x``.

    The original starts ``best_advs`` at ``ep.zeros_like(x)``: for an image on which no
    adversarial is found it returns the all-zero image, which is often misclassified and so
    looks like a success of norm about ``||x||``. Starting at ``x`` makes such an image an
    honest failure (``x`` is never adversarial). The rest is Foolbox's ``run`` unchanged.

    Borrowed code: :meth:`run` is a copy of ``L2CarliniWagnerAttack.run`` from
    ``foolbox/attacks/carlini_wagner.py`` of Foolbox 3.3.4 (https://github.com/bethgelab/foolbox,
    MIT License, Copyright (c) 2020 Jonas Rauber et al.), with one line changed: the
    initialisation of ``best_advs`` (marked below).
    """

    def run(
        self,
        model: fb.Model,
        inputs: Any,
        criterion: Any,
        *,
        early_stop: float | None = None,
        **kwargs: Any,
    ) -> Any:
        raise_if_kwargs(kwargs)
        x, restore_type = ep.astensor_(inputs)
        criterion_ = get_criterion(criterion)
        del inputs, criterion, kwargs
        fb.attacks.base.verify_input_bounds(x, model)
        N = len(x)
        if isinstance(criterion_, fb.criteria.Misclassification):
            targeted = False
            classes = criterion_.labels
            change_classes_logits = self.confidence
        elif isinstance(criterion_, fb.criteria.TargetedMisclassification):
            targeted = True
            classes = criterion_.target_classes
            change_classes_logits = -self.confidence
        else:
            raise ValueError("unsupported criterion")

        def is_adversarial(perturbed: ep.Tensor, logits: ep.Tensor) -> ep.Tensor:
            if change_classes_logits != 0:
                logits += ep.onehot_like(logits, classes, value=change_classes_logits)
            return criterion_(perturbed, logits)

        if classes.shape != (N,):
            raise ValueError(f"expected labels of shape ({N},), got {classes.shape}")

        x_attack = _to_attack_space(x, bounds=model.bounds)
        reconstructed_x = _to_model_space(x_attack, bounds=model.bounds)
        rows = range(N)

        def loss_fun(delta: ep.Tensor, consts: ep.Tensor) -> tuple[ep.Tensor, tuple[ep.Tensor, ep.Tensor]]:
            x_ = _to_model_space(x_attack + delta, bounds=model.bounds)
            logits = model(x_)
            if targeted:
                c_minimize, c_maximize = best_other_classes(logits, classes), classes
            else:
                c_minimize, c_maximize = classes, best_other_classes(logits, classes)
            is_adv_loss = logits[rows, c_minimize] - logits[rows, c_maximize]
            is_adv_loss = ep.maximum(0, is_adv_loss + self.confidence) * consts
            squared_norms = flatten(x_ - reconstructed_x).square().sum(axis=-1)
            return is_adv_loss.sum() + squared_norms.sum(), (x_, logits)

        loss_aux_and_grad = ep.value_and_grad_fn(x, loss_fun, has_aux=True)
        consts = self.initial_const * np.ones((N,))
        lower_bounds = np.zeros((N,))
        upper_bounds = np.inf * np.ones((N,))

        best_advs = x  # the fix: Foolbox 3.3.4 starts at ep.zeros_like(x)
        best_advs_norms = ep.full(x, (N,), ep.inf)

        for binary_search_step in range(self.binary_search_steps):
            if binary_search_step == self.binary_search_steps - 1 and self.binary_search_steps >= 10:
                consts = np.minimum(upper_bounds, 1e10)
            delta = ep.zeros_like(x_attack)
            optimizer = AdamOptimizer(delta, self.stepsize)
            found_advs = np.full((N,), fill_value=False)
            loss_at_previous_check = np.inf
            consts_ = ep.from_numpy(x, consts.astype(np.float32))
            for step in range(self.steps):
                loss, (perturbed, logits), gradient = loss_aux_and_grad(delta, consts_)
                delta -= optimizer(gradient)
                if self.abort_early and step % (np.ceil(self.steps / 10)) == 0:
                    if not (loss <= 0.9999 * loss_at_previous_check):
                        break
                    loss_at_previous_check = loss.item()
                found_advs_iter = is_adversarial(perturbed, logits)
                found_advs = np.logical_or(found_advs, found_advs_iter.numpy())
                norms = flatten(perturbed - x).norms.l2(axis=-1)
                new_best = ep.logical_and(norms < best_advs_norms, found_advs_iter)
                best_advs = ep.where(atleast_kd(new_best, best_advs.ndim), perturbed, best_advs)
                best_advs_norms = ep.where(new_best, norms, best_advs_norms)
            upper_bounds = np.where(found_advs, consts, upper_bounds)
            lower_bounds = np.where(found_advs, lower_bounds, consts)
            consts = np.where(np.isinf(upper_bounds), consts * 10, (lower_bounds + upper_bounds) / 2)

        return restore_type(best_advs)


class CorrectedL2FMNAttack(fb.attacks.L2FMNAttack):
    """Foolbox 3.3.4's L2 Fast Minimum Norm attack with a working projection.

    The original ``project`` computes ``factor = min(1, norms / norms)`` (always 1) from the
    norms of ``x`` rather than of ``x - x0``, so the adaptive norm constraint ``epsilon`` that
    defines FMN never acts. Here ``x - x0`` is projected onto the L2 ball of radius ``epsilon``.
    Its step sizes (``max_stepsize``, ``min_stepsize``) are absolute L2 lengths in input units.
    """

    def project(self, x: ep.Tensor, x0: ep.Tensor, epsilon: ep.Tensor) -> ep.Tensor:
        delta = x - x0
        norms = ep.maximum(flatten(delta).norms.l2(axis=-1), 1e-12)
        factor = atleast_kd(ep.minimum(1, epsilon / norms), x.ndim)
        return x0 + delta * factor


def boundary_search(is_adversarial: Any, x: ep.Tensor, x_adv: ep.Tensor, steps: int) -> ep.Tensor:
    """Bisection on the segment ``[x, x_adv]`` for the adversarial point closest to ``x``.

    Rows whose ``x_adv`` is not adversarial are returned unchanged; the returned point of the
    other rows is always one that tested adversarial (the upper end of the bracket).
    """
    found = is_adversarial(x_adv)
    lower = ep.zeros(x, len(x))
    upper = ep.ones(x, len(x))
    direction = x_adv - x
    for _ in range(steps):
        middle = (lower + upper) / 2
        adversarial = is_adversarial(x + atleast_kd(middle, x.ndim) * direction)
        lower = ep.where(adversarial, lower, middle)
        upper = ep.where(adversarial, middle, upper)
    trimmed = x + atleast_kd(upper, x.ndim) * direction
    return ep.where(atleast_kd(found, x.ndim), trimmed, x_adv)


class BoundarySearchL2DeepFoolAttack(fb.attacks.L2DeepFoolAttack):
    """Foolbox's L2 DeepFool, optionally followed by :func:`boundary_search`.

    DeepFool returns its last iterate, which overshoots the boundary by ``overshoot``
    (and more where a step crosses it early); bisection towards ``x`` removes most of that
    for ``boundary_search_steps`` forward passes (0: Foolbox's behaviour).
    """

    def __init__(self, *, boundary_search_steps: int = 0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.boundary_search_steps = boundary_search_steps

    def run(self, model: fb.Model, inputs: Any, criterion: Any, *, early_stop: float | None = None, **kwargs: Any) -> Any:
        x_adv = super().run(model, inputs, criterion, early_stop=early_stop, **kwargs)
        if self.boundary_search_steps <= 0:
            return x_adv
        x, restore_type = ep.astensor_(inputs)
        is_adversarial = get_is_adversarial(get_criterion(criterion), model)
        return restore_type(boundary_search(is_adversarial, x, ep.astensor(x_adv), self.boundary_search_steps))


#: config class name -> attack class (with the Foolbox traps of docs/spec.md §4 fixed)
ATTACKS: dict[str, Any] = {
    "L2DeepFoolAttack": BoundarySearchL2DeepFoolAttack,
    "L2CarliniWagnerAttack": GuardedL2CarliniWagnerAttack,
    "L2FMNAttack": CorrectedL2FMNAttack,
    "DDNAttack": fb.attacks.DDNAttack,
    "L2BrendelBethgeAttack": fb.attacks.L2BrendelBethgeAttack,
}
#: attacks that must start from adversarial points (``refine: true`` in the config)
NEEDS_STARTING_POINTS = {"L2BrendelBethgeAttack"}


def make_attack(name: str, kwargs: Mapping[str, Any] | None = None) -> MinimizationAttack:
    """The attack registered as ``name``, built with the config's keyword arguments."""
    try:
        entry = ATTACKS[name]
    except KeyError:
        raise ConfigError(f"unknown attack class {name!r} (known: {', '.join(ATTACKS)})") from None
    try:
        return entry(**dict(kwargs or {}))
    except TypeError as exc:
        raise ConfigError(f"bad keyword arguments for {name}: {one_line(exc)}") from None
    except ImportError as exc:  # numba for Brendel-Bethge
        raise ConfigError(f"{name} needs an optional package ({exc}); pip install 'saliency-robustness[refine]'") from None


# ---------------------------------------------------------------------------------------------
# Verification and the attack loop


class PixelModel(nn.Module):
    """``model(pixel - pixel_offset)``: the model seen from pixel space, where the bounds are boxes."""

    def __init__(self, model: nn.Module, space: InputSpace) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("offset", torch.tensor(space.pixel_offset, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model(pixels - self.offset)


def input_bounds(space: InputSpace, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel bounds of the model's input space (``pixel_bounds - pixel_offset``)."""
    offset = space.offset_tensor(device)
    low, high = space.pixel_bounds
    return low - offset, high - offset


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
    attack: str | MinimizationAttack,
    kwargs: Mapping[str, Any] | None = None,
    batch_size: int = 100,
    starting_points: torch.Tensor | None = None,
    device: torch.device | str | None = None,
    store_adversarials: bool = True,
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
    bounds = input_bounds(space, device)
    n = len(images)

    clean = np.full(n, -1, dtype=np.int64)
    adv_pred = np.full(n, -1, dtype=np.int64)
    claimed = np.zeros(n, dtype=bool)
    success = np.zeros(n, dtype=bool)
    norms = np.full(n, np.nan, dtype=np.float64)
    adversarials = np.full(images.shape, np.nan, dtype=np.float32) if store_adversarials else None

    started = time.perf_counter()
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


# ---------------------------------------------------------------------------------------------
# Stores: one attack per job, and the ensemble


def load_attack_stores(paths: Sequence[str | Path]) -> dict[str, xr.Dataset]:
    """Attack stores by attack name (the store's file stem, as in ``attacks/<model>/<attack>.zarr``)."""
    return {Path(p).name.removesuffix(".zarr"): open_store(p, variables=["perturbation_norm", "success"]) for p in paths}


def smallest_verified(norms: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """Along ``axis`` (the attacks) of verified norms (NaN where none): the index of the
    smallest one and its value (NaN where no attack succeeded; the index is then 0)."""
    masked = np.where(np.isfinite(norms), norms, np.inf)
    smallest = masked.min(axis=axis)
    return masked.argmin(axis=axis), np.where(np.isinf(smallest), np.nan, smallest)


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
    batch_size: int = 100,
    device: torch.device | str | None = None,
    starts_from: Mapping[str, xr.Dataset] | None = None,
) -> dict[str, xr.Dataset]:
    """Every attack of a config ``ensemble`` (name -> ``{attack, kwargs, refine}``) on ``images``,
    as the workflow runs them: the attacks with ``refine: false`` first, then each refining
    attack from their best verified adversarials (and those of ``starts_from``, results of
    earlier calls). Without Snakemake, for tests and benchmarks."""
    results: dict[str, xr.Dataset] = {}
    for refine in (False, True):
        stage = {name: spec for name, spec in ensemble.items() if bool(spec.get("refine", False)) == refine}
        starts = torch.from_numpy(best_adversarials({**(starts_from or {}), **results})[0]) if refine and stage else None
        for name, spec in stage.items():
            results[name] = run_attack(
                model,
                images,
                space,
                attack=spec["attack"],
                kwargs=spec.get("kwargs"),
                batch_size=batch_size,
                starting_points=starts,
                device=device,
                name=name,
            )
    return results


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
    model = load_model(model_dir, device)
    eval_ds = open_store(eval_store, variables=["images"])
    images, _ = eval_tensors(eval_ds)
    space = InputSpace.from_attrs(eval_ds.attrs)
    starting_points = None
    if settings.get("refine", False):
        starts, start_norms = best_adversarials(load_attack_stores(start_stores))
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
        dict(settings.get("kwargs", {})),
        device,
        len(images),
        settings["batch_size"],
    )
    result = run_attack(
        model,
        images,
        space,
        attack=settings["attack"],
        kwargs=settings.get("kwargs", {}),
        batch_size=settings["batch_size"],
        starting_points=starting_points,
        device=device,
        store_adversarials=settings.get("store_adversarials", True),
        name=settings["name"],
    )
    result = result.assign_coords(sample=eval_ds["sample"].values)
    result.attrs.update(provenance(dict(settings), model=Path(model_dir).name, device=str(device)))
    write_store(result, output, chunks={"sample": sample_chunk(images.shape)})


def sample_chunk(shape: Sequence[int], target_bytes: int = 1 << 24) -> int:
    """Samples per chunk so that an image chunk stays near ``target_bytes`` (float32)."""
    per_sample = 4 * int(np.prod(shape[1:]))
    return max(1, min(int(shape[0]), target_bytes // per_sample))


def _check_keywords(name: str, kwargs: Mapping[str, Any]) -> None:
    import importlib.util
    import inspect

    try:
        inspect.signature(ATTACKS[name]).bind(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"bad keyword arguments for {name}: {one_line(exc)}") from None
    if importlib.util.find_spec("numba") is None:
        raise ConfigError(f"{name} needs the optional package numba; pip install 'saliency-robustness[refine]'")


def check_ensemble(ensemble: Mapping[str, Mapping[str, Any]]) -> None:
    """Build every attack of the config's ensemble once, so that an unknown class, a bad
    keyword or a missing optional package stops the run at start-up, before any job."""
    if not ensemble:
        raise ConfigError("config key 'attacks.ensemble': empty; at least one attack is needed for robustness")
    for name, settings in ensemble.items():
        try:
            if settings["attack"] in NEEDS_STARTING_POINTS:
                # its constructor compiles numba code for up to a minute: check the keywords only
                _check_keywords(settings["attack"], settings.get("kwargs") or {})
            else:
                make_attack(settings["attack"], settings.get("kwargs"))
        except ConfigError as exc:
            raise ConfigError(f"config key 'attacks.ensemble.{name}': {exc}") from None
    if all(settings.get("refine") for settings in ensemble.values()):
        raise ConfigError("config key 'attacks.ensemble': a refining attack (refine: true) needs at least one attack with refine: false")


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
