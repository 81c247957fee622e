"""Local Lipschitz (gradient-norm, double-backprop) regularization: the training objective (docs/spec.md §3).

    loss = mean_k CE(x_k, y_k) + lambda * mean_k ||grad_{x_k} s(x_k, y_k)||_2^p

with ``s`` the cross-entropy (``sensitivity="loss"``) or the true-class logit
(``sensitivity="logit"``). The gradient is taken per example. The authors' code took it
of the batch-mean loss, which scales each example's gradient by 1/B, so their
``lambda_ref = lambda * B**2`` (for p = 2).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

SENSITIVITIES = ("loss", "logit")
# added to ||g||^2 before the power p/2 (p != 2), so that a zero input gradient has a finite
# parameter gradient; far below any squared gradient norm that matters
PENALTY_EPS = 1e-12


def input_gradient_penalty(logits: torch.Tensor, x: torch.Tensor, y: torch.Tensor, *, sensitivity: str, p: float) -> torch.Tensor:
    """Per-example ``||grad_{x_k} s(x_k, y_k)||_2^p`` with a graph for double backprop.

    ``x`` must require grad and ``logits`` must be ``model(x)``. Examples must not
    interact in the forward pass (no batch norm in train mode), so that the gradient of
    the summed sensitivity is the per-example gradient.
    """
    if sensitivity == "loss":
        s = F.cross_entropy(logits, y, reduction="sum")
    elif sensitivity == "logit":
        s = logits.gather(1, y[:, None]).sum()
    else:
        raise ValueError(f"sensitivity must be one of {SENSITIVITIES}, not {sensitivity!r}")
    (grad,) = torch.autograd.grad(s, x, create_graph=True)
    return norm_power(grad.flatten(1).pow(2).sum(dim=1), p)


def norm_power(squared_norm: torch.Tensor, p: float) -> torch.Tensor:
    """``||g||^p`` from ``||g||^2``. ``(||g||^2)^(p/2)`` has an infinite derivative at
    ``g = 0`` for ``p < 2``: smoothed there by :data:`PENALTY_EPS`."""
    if p == 2:
        return squared_norm
    return (squared_norm + PENALTY_EPS).pow(p / 2)


def per_example_sensitivity(logits: torch.Tensor, y: torch.Tensor, sensitivity: str) -> torch.Tensor:
    """Per-example ``s(x_k, y_k)``: the cross-entropy (``loss``) or the true-class logit (``logit``)."""
    if sensitivity == "loss":
        return F.cross_entropy(logits, y, reduction="none")
    if sensitivity == "logit":
        return logits.gather(1, y[:, None]).squeeze(1)
    raise ValueError(f"sensitivity must be one of {SENSITIVITIES}, not {sensitivity!r}")


class RandomDraws:
    """The random state at construction; :meth:`replay` restores it, so that a second forward
    pass draws the dropout masks of the first, and leaves the stream where one pass leaves it."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None

    def replay(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state(self.cuda, self.device)


def finite_difference_penalty(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    s: torch.Tensor,
    *,
    step: float,
    p: float,
    sensitivity: str,
    draws: RandomDraws | None = None,
) -> torch.Tensor:
    """Per-example ``||grad_x s||^p`` estimated as ``((s(x + h d) - s(x)) / h)^p`` along the
    detached gradient direction ``d = g / ||g||`` (Finlay & Oberman 2019), with a graph through
    both forward passes and no double backward. Its parameter gradient is the finite difference
    ``p fd^(p-1) (grad_theta s(x + h d) - grad_theta s(x)) / h`` of the exact one.

    ``x`` must require grad and ``s`` be the per-example sensitivity of ``model(x)``; the second
    pass sees the first pass's dropout masks when ``draws`` was taken just before it.
    """
    (grad,) = torch.autograd.grad(s.sum(), x, retain_graph=True)
    norm = grad.flatten(1).norm(dim=1).clamp_min(torch.finfo(grad.dtype).tiny)
    direction = (grad / norm.view(-1, *([1] * (grad.ndim - 1)))).detach()
    after = RandomDraws(x.device) if draws is not None else None
    if draws is not None:
        draws.replay()
    shifted = per_example_sensitivity(model(x.detach() + step * direction), y, sensitivity)
    if after is not None:
        after.replay()  # the stream goes on as after one forward pass (as in exact training)
    return norm_power(((shifted - s) / step).pow(2), p)


@dataclass
class LossTerms:
    loss: torch.Tensor
    cross_entropy: torch.Tensor
    penalty: torch.Tensor | None
    correct: torch.Tensor  # correctly classified examples (a 0-d tensor: no device sync)


PENALTY_GRADIENTS = ("exact", "finite_difference")


def lazy_penalty_weight(lam: float, step: int, interval: int) -> float:
    """The penalty weight of mini-batch ``step`` under lazy regularization (Karras et al. 2020,
    StyleGAN2's lazy R1; docs/spec.md §3): ``interval * lam`` on every ``interval``-th
    mini-batch (steps 0, k, 2k, ...), 0 on the others, so that the weight per mini-batch is
    ``lam`` on average. ``interval`` 1 is the penalty on every step."""
    if interval < 1:
        raise ValueError(f"the penalty interval must be at least 1, not {interval}")
    return lam * interval if step % interval == 0 else 0.0


def regularized_loss(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    lam: float,
    sensitivity: str,
    p: float,
    penalty_gradient: str | None,
    finite_difference_step: float | None,
    label_smoothing: float | None = None,
    penalty_examples: int | None = None,
) -> LossTerms:
    """The training objective of docs/spec.md §3 without weight decay (the optimizer applies that).

    With ``lam == 0`` no input gradient is taken: the step is plain cross-entropy. The penalty
    is differentiated exactly (double backprop) or by :func:`finite_difference_penalty` (whose
    step ``finite_difference_step`` it then needs); both may be None when ``lam`` is 0.
    ``label_smoothing`` (None: none) smooths the cross-entropy term only; the penalty's
    sensitivity stays the plain loss of docs/spec.md §3. ``penalty_examples`` n (None: all)
    takes the penalty's mean over the batch's first n examples only (``train.penalty_fraction``):
    they go through the network with their input gradient, the others in a plain forward pass,
    and the cross-entropy is the mean over all of them.
    """
    smoothing = label_smoothing or 0.0
    if lam == 0:
        logits = model(x)
        ce = F.cross_entropy(logits, y, label_smoothing=smoothing)
        return LossTerms(ce, ce.detach(), None, (logits.argmax(1) == y).sum())
    n = len(x) if penalty_examples is None else min(penalty_examples, len(x))
    if n < 1:
        raise ValueError(f"the penalty needs at least one example, not {penalty_examples}")
    head, tail = x[:n].detach().requires_grad_(True), x[n:]
    if penalty_gradient == "exact":
        logits = model(head)
        penalty = input_gradient_penalty(logits, head, y[:n], sensitivity=sensitivity, p=p).mean()
    elif penalty_gradient == "finite_difference":
        if finite_difference_step is None:
            raise ValueError("penalty_gradient finite_difference needs finite_difference_step")
        draws = RandomDraws(x.device)
        logits = model(head)
        s = per_example_sensitivity(logits, y[:n], sensitivity)
        penalty = finite_difference_penalty(model, head, y[:n], s, step=finite_difference_step, p=p, sensitivity=sensitivity, draws=draws).mean()
    else:
        raise ValueError(f"penalty_gradient must be one of {PENALTY_GRADIENTS}, not {penalty_gradient!r}")
    if len(tail):
        logits = torch.cat([logits, model(tail)])
    ce = F.cross_entropy(logits, y, label_smoothing=smoothing)
    return LossTerms(ce + lam * penalty, ce.detach(), penalty.detach(), (logits.argmax(1) == y).sum())
