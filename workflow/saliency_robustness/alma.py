"""ALMA for L2: the augmented Lagrangian minimum-norm attack (Rony, Granger, Pedersoli and Ben
Ayed, "Augmented Lagrangian Adversarial Attacks", ICCV 2021), on Foolbox's attack contract.

The attack solves ``min ||delta||_2`` subject to ``g(x + delta) < 0`` and ``x + delta`` in the
box, where the constraint ``g`` is the difference of logits ratio (Croce and Hein 2020, in
the sign convention of ALMA: positive while the model still decides ``y``):

    g(z) = (z_y - max_{j != y} z_j + kappa) / (z_(1) - z_(3))      (untargeted)
    g(z) = (max_{j != t} z_j - z_t + kappa) / (z_(1) - (z_(3) + z_(4)) / 2)   (target t)

with ``z_(k)`` the k-th largest logit (with fewer than 3 (4) classes, the margin alone) and ``kappa`` (``logit_tolerance``) a small margin, so
that ``g < 0`` implies that the argmax has left ``y`` (reached ``t``). Each step minimises the
penalty-Lagrangian ``||delta|| + P2(g; rho, mu)`` (Birgin, Castillo and Martinez 2005) by one
RMSProp-with-momentum step, then:

- the multiplier follows the derivative of the penalty, ``mu <- alpha mu + (1 - alpha)
  dP2/dg`` (clamped to [1e-6, 1e12]);
- every ``check_steps`` steps, the penalty parameter of an image that is not yet adversarial
  and whose ``g`` fell by less than the factor ``tau`` grows, ``rho <- gamma rho``;
- the step size is set at the first step so that it moves ``x`` by ``init_epsilon`` (L2, after
  the box), and decays exponentially to ``lr_reduction`` times that between the step at which
  the image's first adversarial was found and the last step.

It returns, per image, the adversarial of smallest norm among its iterates (and the final
point), optionally trimmed by ``boundary_search_steps`` bisection steps on the segment from
``x`` (forward passes only: the last iterates straddle the boundary at the final step size),
or ``x`` itself where none was found (an honest failure). Every result is verified
again by :func:`saliency_robustness.ensemble.verify_adversarials`, like every attack's.

Written in this project from the paper; adv-lib's ``alma`` (BSD-3) was read to check the
constants (the defaults below are the paper's for L2), not copied.
"""

from __future__ import annotations

from typing import Any

import eagerpy as ep
import foolbox as fb
import torch
from foolbox.attacks.base import get_criterion, get_is_adversarial, raise_if_kwargs

from saliency_robustness.foolbox_fixes import boundary_search

#: the multiplier's clamp (the paper's)
MU_RANGE = (1e-6, 1e12)
#: RMSProp's denominator guard
RMS_EPSILON = 1e-8


def penalty_p2(y: torch.Tensor, rho: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
    """The penalty-Lagrangian P2 of Birgin et al. (2005), elementwise:
    ``mu y + mu rho y^2 + rho^2 y^3 / 6`` for ``y >= 0``, ``mu y / (1 - rho y)`` for ``y < 0``.
    Continuous with a continuous derivative (both branches give ``mu`` at 0)."""
    above = mu * y + mu * rho * y**2 + rho**2 * y**3 / 6
    below = mu * y / (1 - rho * y.clamp(max=0))
    return torch.where(y >= 0, above, below)


def penalty_p2_derivative(y: torch.Tensor, rho: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
    """``dP2/dy``: ``mu + 2 mu rho y + rho^2 y^2 / 2`` for ``y >= 0``, ``mu / (1 - rho y)^2`` below."""
    above = mu + 2 * mu * rho * y + rho**2 * y**2 / 2
    below = mu / (1 - rho * y.clamp(max=0)) ** 2
    return torch.where(y >= 0, above, below)


def difference_of_logits_ratio(logits: torch.Tensor, classes: torch.Tensor, *, targeted: bool, kappa: float) -> torch.Tensor:
    """ALMA's constraint ``g`` (module docstring): negative exactly where the decision has left
    ``classes`` (untargeted) or reached them (targeted) by more than ``kappa`` in the logits."""
    own = logits.gather(1, classes[:, None]).squeeze(1)
    others = logits.scatter(1, classes[:, None], -torch.inf).amax(dim=1)
    margin = own - others if not targeted else others - own
    if logits.shape[1] < (4 if targeted else 3):  # too few classes for the ratio: the margin
        return margin + kappa
    top = logits.topk(4 if targeted else 3, dim=1).values
    scale = top[:, 0] - ((top[:, 2] + top[:, 3]) / 2 if targeted else top[:, 2])
    return (margin + kappa) / (scale + 1e-8)


def _rows(t: torch.Tensor, ndim: int) -> torch.Tensor:
    return t.reshape(-1, *([1] * (ndim - 1)))


def first_step_size(
    x: torch.Tensor, direction: torch.Tensor, bounds: tuple[float, float], distance: float, iterations: int = 20
) -> torch.Tensor:
    """Per image, the step size ``eta`` for which ``||clip(x - eta d) - x|| = distance``: doubling
    until the clipped step is longer, then bisection. Rows whose step can never reach
    ``distance`` (the box stops it first) get the largest size tried."""
    n = len(x)

    def length(eta: torch.Tensor) -> torch.Tensor:
        return ((x - _rows(eta, x.ndim) * direction).clamp(*bounds) - x).reshape(n, -1).norm(dim=1)

    low = torch.zeros(n, device=x.device)
    high = torch.ones(n, device=x.device)
    for _ in range(60):  # 2^60: every finite direction reaches the box or the distance
        short = length(high) < distance
        if not short.any():
            break
        low = torch.where(short, high, low)
        high = torch.where(short, 2 * high, high)
    for _ in range(iterations):
        middle = (low + high) / 2
        longer = length(middle) > distance
        low, high = torch.where(longer, low, middle), torch.where(longer, middle, high)
    return (low + high) / 2


class ALMAL2Attack(fb.attacks.base.MinimizationAttack):
    """ALMA, L2 (module docstring). ``steps`` gradient evaluations per image, plus one forward
    pass of the last iterate (and ``boundary_search_steps`` more). ``init_epsilon``: the first step's L2 length in input units
    (the paper's 0.1 for pixels in [0, 1]). ``targets`` > 0 makes an untargeted call that
    many targeted runs, one per runner-up class (``targets`` x ``steps`` gradients).
    ``direction_seed`` seeds the random first step of an image whose gradient vanishes. The
    other keywords are the paper's constants."""

    distance = fb.distances.l2

    def __init__(
        self,
        *,
        steps: int = 1000,
        init_epsilon: float = 0.1,
        lr_reduction: float = 0.01,
        mu_init: float = 1.0,
        rho_init: float = 1.0,
        check_steps: int = 10,
        tau: float = 0.95,
        gamma: float = 1.2,
        alpha: float = 0.9,
        logit_tolerance: float = 1e-4,
        boundary_search_steps: int = 0,
        targets: int = 0,
        direction_seed: int = 0,
    ) -> None:
        if not 0 < lr_reduction <= 1:
            raise ValueError(f"lr_reduction must lie in (0, 1], got {lr_reduction!r}")
        if not 0 <= alpha < 1:
            raise ValueError(f"alpha must lie in [0, 1), got {alpha!r}")
        if not 0 < tau <= 1:
            raise ValueError(f"tau must lie in (0, 1], got {tau!r}")
        if gamma < 1:
            raise ValueError(f"gamma must be at least 1, got {gamma!r}")
        self.steps = steps
        self.init_epsilon = init_epsilon
        self.lr_reduction = lr_reduction
        self.mu_init = mu_init
        self.rho_init = rho_init
        self.check_steps = check_steps
        self.tau = tau
        self.gamma = gamma
        self.alpha = alpha
        self.logit_tolerance = logit_tolerance
        self.boundary_search_steps = boundary_search_steps
        self.targets = targets
        self.direction_seed = direction_seed

    def run(self, model: fb.Model, inputs: Any, criterion: Any, *, early_stop: float | None = None, **kwargs: Any) -> Any:
        raise_if_kwargs(kwargs)
        x_ep, restore_type = ep.astensor_(inputs)
        criterion_ = get_criterion(criterion)
        if isinstance(criterion_, fb.criteria.Misclassification):
            classes, targeted = criterion_.labels, False
        elif isinstance(criterion_, fb.criteria.TargetedMisclassification):
            classes, targeted = criterion_.target_classes, True
        else:
            raise ValueError("unsupported criterion")
        with torch.enable_grad():
            if self.targets and not targeted:
                best = self.runner_up_targets(model, x_ep.raw, classes.raw, bounds=model.bounds)
            else:
                best = self.minimise(model, x_ep.raw, classes.raw, targeted=targeted, bounds=model.bounds)
        if self.boundary_search_steps > 0:
            best = boundary_search(get_is_adversarial(criterion_, model), x_ep, ep.astensor(best), self.boundary_search_steps).raw
        return restore_type(ep.astensor(best))

    def runner_up_targets(self, model: Any, x: torch.Tensor, labels: torch.Tensor, *, bounds: tuple[float, float]) -> torch.Tensor:
        """Untargeted by ``targets`` targeted runs: one per runner-up class of ``x`` (the
        ``targets`` highest logits after the label's), the smallest adversarial of them."""
        with torch.no_grad():
            ranked = model(x).scatter(1, labels[:, None], -torch.inf).argsort(dim=1, descending=True)
        best, best_norm = x.detach().clone(), torch.full((len(x),), torch.inf, device=x.device)
        for k in range(min(self.targets, ranked.shape[1] - 1)):
            found = self.minimise(model, x, ranked[:, k], targeted=True, bounds=bounds)
            norm = (found - x).reshape(len(x), -1).norm(dim=1)
            better = (norm > 0) & (norm < best_norm)  # x itself: that run found nothing
            best = torch.where(_rows(better, x.ndim), found, best)
            best_norm = torch.where(better, norm, best_norm)
        return best

    def minimise(
        self, model: Any, x: torch.Tensor, classes: torch.Tensor, *, targeted: bool, bounds: tuple[float, float]
    ) -> torch.Tensor:
        """The attack on raw tensors: the best adversarial per row, ``x`` where none."""
        n, steps = len(x), self.steps
        lower, upper = float(bounds[0]), float(bounds[1])
        delta = torch.zeros_like(x, requires_grad=True)
        square_avg = torch.ones_like(x)  # RMSProp's running second moment starts at 1
        velocity = torch.zeros_like(x)
        mu = torch.full((n,), self.mu_init, device=x.device)
        rho = torch.full((n,), self.rho_init, device=x.device)
        eta = torch.full((n,), 0.0, device=x.device)
        best = x.detach().clone()
        best_norm = torch.full((n,), torch.inf, device=x.device)
        found_at = torch.full((n,), float(steps + 1), device=x.device)
        generator = torch.Generator(device=x.device).manual_seed(self.direction_seed)
        previous_g: torch.Tensor | None = None

        def record(point: torch.Tensor, g: torch.Tensor, step: int) -> None:
            nonlocal best, best_norm
            norm = (point - x).reshape(n, -1).norm(dim=1)
            adversarial = g < 0
            found_at.copy_(torch.where(adversarial & (found_at > steps), float(step), found_at))
            better = adversarial & (norm < best_norm)
            best = torch.where(_rows(better, x.ndim), point, best)
            best_norm = torch.where(better, norm, best_norm)

        for step in range(steps):
            point = x + delta
            g = difference_of_logits_ratio(model(point), classes, targeted=targeted, kappa=self.logit_tolerance)
            g_now = g.detach()
            record(point.detach(), g_now, step)
            if previous_g is None:
                previous_g = g_now
            elif (step + 1) % self.check_steps == 0:
                stalled = ~(found_at <= step) & ~(g_now < self.tau * previous_g)
                rho = torch.where(stalled, self.gamma * rho, rho)
                previous_g = g_now
            if step > 0:
                mu = (self.alpha * mu + (1 - self.alpha) * penalty_p2_derivative(g_now, rho, mu)).clamp(*MU_RANGE)
            # ||delta|| has no gradient at delta = 0: the first step follows the penalty alone
            objective = penalty_p2(g, rho, mu)
            if step > 0:
                objective = objective + delta.reshape(n, -1).norm(dim=1)
            (gradient,) = torch.autograd.grad(objective.sum(), delta)
            with torch.no_grad():
                square_avg.mul_(self.alpha).addcmul_(gradient, gradient, value=1 - self.alpha)
                velocity.mul_(self.alpha).add_(gradient / (square_avg.sqrt() + RMS_EPSILON))
                if step == 0:
                    eta = self._initial_step_size(x, velocity, generator, (lower, upper))
                exponent = ((step - found_at).clamp(min=0) / (steps - found_at).clamp(min=1)).clamp(max=1)
                step_size = eta * self.lr_reduction**exponent
                delta.sub_(_rows(step_size, x.ndim) * velocity)
                delta.copy_((x + delta).clamp(lower, upper) - x)
        with torch.no_grad():
            point = x + delta
            record(point, difference_of_logits_ratio(model(point), classes, targeted=targeted, kappa=self.logit_tolerance), steps)
        return best

    def _initial_step_size(
        self, x: torch.Tensor, velocity: torch.Tensor, generator: torch.Generator, bounds: tuple[float, float]
    ) -> torch.Tensor:
        """The step size that makes the first step ``init_epsilon`` long; a row with a vanishing
        gradient (a saturated model) steps in a random direction instead."""
        n = len(x)
        flat = velocity.reshape(n, -1)
        vanishing = flat.norm(dim=1) <= 1e-12
        if vanishing.any():
            random = torch.randn(velocity.shape, generator=generator, device=x.device, dtype=x.dtype)
            random = random / _rows(random.reshape(n, -1).norm(dim=1), x.ndim)
            velocity.copy_(torch.where(_rows(vanishing, x.ndim), random, velocity))
        return first_step_size(x, velocity, bounds, self.init_epsilon)
