"""The attribution maps of docs/spec.md §2, of the predicted-class logit and signed (never absolute
values): the paper's saliency map, the input gradient ``g = grad_x Psi^{i*}(x)``, and beyond the paper,
through Captum, SmoothGrad (``NoiseTunnel`` over ``Saliency`` with ``abs=False``) and Integrated Gradients.

The saliency stage stores them; the explanation-quality stage recomputes them at perturbed inputs
(:func:`explanation`, for max-sensitivity).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from saliency_robustness.data import InputSpace
from saliency_robustness.vocabulary import ATTRIBUTIONS, GRADIENT


def predicted_logit_gradient(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(logits, prediction, grad_x Psi^{i*}(x))`` of one batch from one forward and one backward pass."""
    logits = model(x)
    prediction = logits.argmax(dim=1)
    (gradient,) = torch.autograd.grad(logits.gather(1, prediction[:, None]).sum(), x)
    return logits.detach(), prediction, gradient


@dataclass(frozen=True)
class AttributionOptions:
    """The ``saliency`` section's attribution methods and the options of each (the validated
    config's: the schema holds the defaults)."""

    methods: Sequence[str]
    smoothgrad: Mapping[str, Any]
    integrated_gradients: Mapping[str, Any]

    @classmethod
    def gradient_only(cls) -> AttributionOptions:
        """The paper's saliency map alone."""
        return cls((GRADIENT,), {}, {})

    @property
    def names(self) -> list[str]:
        """The methods in a fixed order, the gradient always first."""
        unknown = set(self.methods) - set(ATTRIBUTIONS)
        if unknown:
            raise ValueError(f"unknown attribution method(s) {sorted(unknown)} (known: {', '.join(ATTRIBUTIONS)})")
        return [m for m in ATTRIBUTIONS if m == GRADIENT or m in self.methods]

    def as_config(self) -> dict[str, Any]:
        """The methods computed and the options of each (for the store's provenance)."""
        return {"methods": self.names, **{m: dict(getattr(self, m)) for m in self.names[1:]}}

    @classmethod
    def from_config(cls, saliency: Mapping[str, Any]) -> AttributionOptions:
        return cls(saliency["methods"], saliency["smoothgrad"], saliency["integrated_gradients"])


def ig_baseline(x: torch.Tensor, kind: str, space: InputSpace) -> torch.Tensor:
    """Integrated Gradients' starting point: zero in the input space, or the black image."""
    if kind == "zero":
        return torch.zeros_like(x)
    if kind == "black":
        return torch.zeros_like(x) - space.offset_tensor(x.device).to(x.dtype)
    raise ValueError(f"unknown baseline {kind!r} (known: zero, black)")


def captum_attributions(
    model: nn.Module, x: torch.Tensor, prediction: torch.Tensor, options: AttributionOptions, space: InputSpace, seed: int
) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
    """The Captum maps of one batch (signed, of the predicted logit) and, with Integrated
    Gradients, its completeness error per image. SmoothGrad's noise is drawn from ``seed``
    without touching the global random state."""
    from captum.attr import IntegratedGradients, NoiseTunnel, Saliency

    maps: dict[str, torch.Tensor] = {}
    completeness = None
    x = x.detach()
    if "smoothgrad" in options.methods:
        tunnel = NoiseTunnel(Saliency(model))
        with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
            torch.manual_seed(seed)
            maps["smoothgrad"] = tunnel.attribute(
                x,
                nt_type="smoothgrad",
                nt_samples=int(options.smoothgrad["n"]),
                nt_samples_batch_size=len(x),
                stdevs=float(options.smoothgrad["sigma"]),
                target=prediction,
                abs=False,  # signed maps: abs=True (Saliency's default) would destroy <x, a>
            ).detach()
    if "integrated_gradients" in options.methods:
        ig = IntegratedGradients(model, multiply_by_inputs=True)
        attribution, delta = ig.attribute(
            x,
            baselines=ig_baseline(x, str(options.integrated_gradients["baseline"]), space),
            target=prediction,
            n_steps=int(options.integrated_gradients["steps"]),
            method="gausslegendre",
            internal_batch_size=len(x),
            return_convergence_delta=True,
        )
        maps["integrated_gradients"] = attribution.detach()
        completeness = delta.detach()
    return maps, completeness


def logit_gradient(model: nn.Module, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``grad_x Psi^{target}(x)`` per image (the saliency map when ``target`` is the predicted class), from one
    forward and one reverse pass with gradients enabled, whatever the caller's grad mode. A single target applies
    to every image (Captum does not expand a one-element target)."""
    target = target.reshape(-1).to(x.device)
    if len(target) == 1:
        target = target.expand(len(x))
    with torch.enable_grad():
        inputs = x.detach().requires_grad_(True)
        (gradient,) = torch.autograd.grad(model(inputs).gather(1, target[:, None]).sum(), inputs)
    return gradient


#: an explanation function: ``(model, inputs (M, C, H, W), target class (M,)) -> map (M, C, H, W)``
Explanation = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


def explanation(method: str, options: AttributionOptions, space: InputSpace, seed: int) -> Explanation:
    """The explanation function of attribution ``method`` with the saliency stage's ``options``: the map it
    stores, recomputed at any input for any target class (SmoothGrad's noise seeded with ``seed``)."""
    if method == GRADIENT:
        return logit_gradient
    if method not in ATTRIBUTIONS:
        raise ValueError(f"unknown attribution method {method!r} (known: {', '.join(ATTRIBUTIONS)})")
    single = replace(options, methods=(method,))

    def explain(model: nn.Module, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        target = target.reshape(-1).to(x.device)
        maps, _ = captum_attributions(model, x, target.expand(len(x)) if len(target) == 1 else target, single, space, seed)
        return maps[method]

    return explain
