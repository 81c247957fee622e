"""L2 PGD adversarial training (docs/spec.md §3, Madry et al. 2018): the batch a model steps
on is replaced by projected-gradient adversarials inside the L2 ball of radius epsilon and the
input box."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from saliency_robustness.runtime import eval_mode


@dataclass(frozen=True)
class AdversarialTraining:
    """L2 PGD adversarial training (docs/spec.md §3): the model steps on PGD adversarials of
    radius ``epsilon`` of its training batch, found against the training label in eval mode."""

    epsilon: float
    steps: int
    step_size: float | None  # None: 2.5 * epsilon / steps (Madry et al.)
    random_start: bool
    clean_fraction: float

    @property
    def step(self) -> float:
        return self.step_size if self.step_size is not None else 2.5 * self.epsilon / self.steps

    @classmethod
    def from_config(cls, epsilon: float, options: Mapping[str, Any]) -> AdversarialTraining:
        return cls(epsilon=float(epsilon), **{k: v for k, v in options.items() if k != "epsilons"})


def _per_example_norm(v: torch.Tensor) -> torch.Tensor:
    return v.flatten(1).norm(dim=1).view(-1, *([1] * (v.ndim - 1)))


def project(x: torch.Tensor, delta: torch.Tensor, epsilon: float, bounds: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """``delta`` projected onto the L2 ball of radius ``epsilon``, then ``x + delta`` clipped to
    the box. Clipping moves every coordinate towards ``x`` (which lies in the box), so the
    result stays in the ball."""
    delta = delta * torch.clamp(epsilon / _per_example_norm(delta).clamp_min(1e-12), max=1.0)
    low, high = bounds
    return torch.maximum(torch.minimum(x + delta, high), low) - x


def pgd_l2(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    options: AdversarialTraining,
    bounds: tuple[torch.Tensor, torch.Tensor],
) -> torch.Tensor:
    """Projected gradient ascent on the cross-entropy at label ``y`` in the L2 ball of radius
    ``epsilon`` around ``x``, inside the box ``bounds``: normalised gradient steps of length
    ``options.step``, from ``x`` or a uniform random point of the ball. Runs the model as it is
    (the caller sets eval mode) and returns a detached batch."""
    x = x.detach()
    if options.random_start:
        direction = torch.randn_like(x)
        direction = direction / _per_example_norm(direction).clamp_min(1e-12)
        radius = options.epsilon * torch.rand(len(x), device=x.device, dtype=x.dtype) ** (1.0 / x[0].numel())
        delta = project(x, direction * radius.view(-1, *([1] * (x.ndim - 1))), options.epsilon, bounds)
    else:
        delta = torch.zeros_like(x)
    for _ in range(options.steps):
        delta.requires_grad_(True)
        loss = F.cross_entropy(model(x + delta), y, reduction="sum")
        (grad,) = torch.autograd.grad(loss, delta)
        delta = project(x, delta.detach() + options.step * grad / _per_example_norm(grad).clamp_min(1e-12), options.epsilon, bounds)
    return (x + delta).detach()


def adversarial_batch(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, options: AdversarialTraining, bounds: tuple[torch.Tensor, torch.Tensor]
) -> torch.Tensor:
    """The batch the model trains on: PGD adversarials found in eval mode (batch norm and dropout
    as at test time), except the first ``clean_fraction`` of the (shuffled) batch, kept clean."""
    n_clean = round(options.clean_fraction * len(x))
    with eval_mode(model):
        adversarial = pgd_l2(model, x[n_clean:], y[n_clean:], options, bounds)
    return torch.cat([x[:n_clean], adversarial])
