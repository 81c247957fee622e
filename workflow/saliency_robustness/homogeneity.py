"""The bias side of the homogeneous decomposition (docs/spec.md §2): which layers are
positively homogeneous, which add a bias, and per-sample derivatives of a logit with respect to
every bias-like parameter (:class:`BiasProbes`), from which ``sum_b <b, dPsi/db>`` follows.

An eval-mode batch norm counts as a bias layer: its effective shift
``beta - mean * gamma / sqrt(var + eps)`` is the bias.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from saliency_robustness.architectures import PerChannelScale, PerChannelShift
from saliency_robustness.errors import PipelineError

# layers that add a per-channel bias to a linear map of their input
BIAS_LAYERS = (
    nn.Linear,
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
    PerChannelShift,  # an external network's input adapter: the shift between two input spaces
)
# leaf modules that are positively homogeneous of degree one and have no bias
HOMOGENEOUS_LAYERS = (
    nn.ReLU,
    nn.LeakyReLU,
    nn.PReLU,
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.MaxPool3d,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AvgPool3d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d,
    nn.AdaptiveMaxPool3d,
    nn.Flatten,
    nn.Unflatten,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.Identity,
    PerChannelScale,
)

def effective_bias(name: str, module: nn.Module) -> torch.Tensor | None:
    """The per-channel constant a module adds to a linear map of its input (None when it has none).

    An eval-mode batch norm computes ``x * gamma / sqrt(var + eps) + (beta - mean * gamma / sqrt(var + eps))``:
    its running mean enters the decomposition through that shift.
    """
    if isinstance(module, BIAS_LAYERS):
        return None if module.bias is None else module.bias.detach().double()
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        if module.training or module.running_mean is None or module.running_var is None:
            raise PipelineError(
                f"batch norm {name or type(module).__name__} normalizes with batch statistics "
                "(train mode or track_running_stats=False): images would not be independent"
            )
        inv_std = (module.running_var.detach().double() + module.eps).rsqrt()
        shift = -module.running_mean.detach().double() * inv_std
        if module.affine:
            shift = module.bias.detach().double() + shift * module.weight.detach().double()
        return shift
    return None


class BiasProbes:
    """Per-sample derivatives of a logit with respect to every bias-like parameter.

    A forward hook adds a zero tensor of shape (sample, channel) (broadcast over the other
    dims) to the output of every module with a bias. The gradient with respect to that zero is,
    per sample, ``dPsi/db`` summed over the positions where the bias is added: the bias's
    derivative as seen by that one sample, which a parameter's ``.grad`` (summed over the batch)
    cannot give. Adding zero leaves the forward pass unchanged, and a later in-place ReLU
    modifies the sum, not the probe.
    """

    def __init__(self, model: nn.Module) -> None:
        self.biases: dict[nn.Module, torch.Tensor] = {}
        unknown: set[str] = set()
        for name, module in model.named_modules():
            bias = effective_bias(name, module)
            if bias is not None:
                self.biases[module] = bias
            elif not any(module.children()) and not isinstance(
                module, (*BIAS_LAYERS, *HOMOGENEOUS_LAYERS, nn.modules.batchnorm._BatchNorm)
            ):
                unknown.add(type(module).__name__)
        self.unknown = sorted(unknown)
        self.records: list[tuple[torch.Tensor, torch.Tensor]] = []

    def _hook(self, module: nn.Module, inputs: object, output: torch.Tensor) -> torch.Tensor:
        channel_dim = output.ndim - 1 if isinstance(module, nn.Linear) else 1
        shape = [1] * output.ndim
        shape[0], shape[channel_dim] = output.shape[0], output.shape[channel_dim]
        probe = torch.zeros(shape, dtype=output.dtype, device=output.device, requires_grad=True)
        self.records.append((self.biases[module], probe))
        return output + probe

    @contextlib.contextmanager
    def attached(self) -> Iterator[BiasProbes]:
        """Record the probes of the forward passes run inside the block (replacing earlier ones)."""
        self.records = []
        handles = [module.register_forward_hook(self._hook) for module in self.biases]
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()

    @property
    def tensors(self) -> list[torch.Tensor]:
        return [probe for _, probe in self.records]

    def bias_sum(self, probe_grads: list[torch.Tensor], n: int) -> torch.Tensor:
        """``sum_b <b, dPsi/db>`` per sample, from the gradients with respect to :attr:`tensors`."""
        total = torch.zeros(n, dtype=torch.float64, device=probe_grads[0].device if probe_grads else None)
        for (bias, _), grad in zip(self.records, probe_grads):
            total += grad.reshape(n, -1).double() @ bias
        return total
