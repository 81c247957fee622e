"""Models of one architecture trained together as one vectorised stack (``train.vectorized``):
``torch.func`` stacks their parameters along a leading model dim, ``vmap`` takes every model's
step at once. Exact penalty and in-memory data only."""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from saliency_robustness.errors import ConfigError
from saliency_robustness.optimization import StepLog, freeze_batchnorm, make_optimizer, make_scheduler, per_step_schedule
from saliency_robustness.regularizers import norm_power, per_example_sensitivity
from saliency_robustness.runtime import full_precision, progress
from saliency_robustness.training_data import DeviceBatches, epoch_seed, in_memory_tensors

log = logging.getLogger(__name__)


def _functional_loss(base: nn.Module, sensitivity: str, p: float) -> Callable[..., tuple[torch.Tensor, tuple[torch.Tensor, ...]]]:
    """One model's objective as a function of its parameters (``torch.func``): the loss of
    :func:`regularized_loss` (exact penalty) from a single forward pass, with its terms."""
    from torch.func import functional_call, grad

    def loss(params: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor, lam: torch.Tensor) -> Any:
        def summed_sensitivity(inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            logits = functional_call(base, (params, buffers), (inputs,))
            return per_example_sensitivity(logits, y, sensitivity).sum(), logits

        g, logits = grad(summed_sensitivity, has_aux=True)(x)  # per-example input gradients, one forward
        squared_norm = g.flatten(1).pow(2).sum(dim=1)
        penalty = norm_power(squared_norm, p).mean()
        ce = F.cross_entropy(logits, y)
        correct = (logits.argmax(1) == y).sum()
        return ce + lam * penalty, (ce.detach(), penalty.detach(), correct)

    return loss


class StackedModels:
    """Models of one architecture trained as one: their parameters stacked along a leading
    model dim (``torch.func.stack_module_state``) and stepped by one optimizer, whose updates
    (weight decay, momentum, Adam) act elementwise, hence per model. Each model keeps its own
    lambda, initialization, data order and optimizer state; ``vmap(..., randomness="different")``
    gives each its own dropout draws (not the draws of the per-model path)."""

    def __init__(self, models: Sequence[nn.Module], train: Mapping[str, Any], lams: Sequence[float], device: torch.device) -> None:
        from torch.func import stack_module_state

        for model in models:
            model.to(device).train()
            if train["freeze_batchnorm"]:
                freeze_batchnorm(model)
            if any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training for m in model.modules()):
                raise ConfigError("train.vectorized needs frozen batch norm (train.freeze_batchnorm: true): running statistics cannot be stacked")
        params, self.buffers = stack_module_state(list(models))
        self.params = {name: nn.Parameter(value.detach()) for name, value in params.items()}
        self.base = copy.deepcopy(models[0]).to("meta")
        self.lams = torch.tensor([float(lam) for lam in lams], device=device)
        holder = nn.Module()
        holder.stacked = nn.ParameterList(self.params.values())
        self.optimizer = make_optimizer(holder, train)
        self.loss = _functional_loss(self.base, train["sensitivity"], float(train["p"]))

    def gradients(self, x: torch.Tensor, y: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Each model's parameter gradient on its own batch (``x``: models x batch x ...), and
        its (loss, cross-entropy, penalty, correct) as a models x 4 tensor."""
        from torch.func import grad, vmap

        step = vmap(grad(self.loss, has_aux=True), in_dims=(0, 0, 0, 0, 0), randomness="different")
        grads, (ce, penalty, correct) = step(self.params, self.buffers, x, y, self.lams)
        ce, penalty = ce.detach(), penalty.detach()
        loss = ce + self.lams * penalty
        logged_penalty = torch.where(self.lams == 0, torch.full_like(penalty, math.nan), penalty)  # as fit logs lambda = 0
        return grads, torch.stack([loss, ce, logged_penalty, correct.to(ce.dtype)], dim=1)

    def state_dicts(self) -> list[dict[str, torch.Tensor]]:
        """Model ``m``'s parameters and buffers, as its ``state_dict``."""
        size = len(self.lams)
        return [{name: value[m].detach() for name, value in {**self.params, **self.buffers}.items()} for m in range(size)]


def fit_vectorized(
    models: Sequence[nn.Module],
    train_sets: Sequence[Dataset],
    train: Mapping[str, Any],
    lams: Sequence[float],
    seeds: Sequence[int],
    *,
    device: torch.device,
) -> list[list[dict[str, float]]]:
    """Train ``models`` (one architecture; model ``m`` on ``train_sets[m]`` with ``lams[m]``,
    its data order drawn from ``seeds[m]``) as one :class:`StackedModels`, in place; return each
    model's per-step log, as :func:`fit` writes it. Exact penalty, in-memory data only."""
    if train["penalty_gradient"] != "exact" or train["accumulation_steps"] != 1 or train["penalty_interval"] != 1 or train["penalty_fraction"] != 1:
        raise ConfigError(
            "train.vectorized trains with penalty_gradient: exact, penalty_interval: 1, penalty_fraction: 1 and accumulation_steps: 1 only"
        )
    if per_step_schedule(train) or train["label_smoothing"] != 0:
        raise ConfigError("train.vectorized trains with schedule: step and label_smoothing: 0 only")
    tensors = [in_memory_tensors(ds) for ds in train_sets]
    if any(t is None for t in tensors) or len({len(t[1]) for t in tensors if t is not None}) != 1:
        raise ConfigError("train.vectorized needs in-memory training sets of one size (MNIST, CIFAR-10)")
    with full_precision():
        stack = StackedModels(models, train, lams, device)
        scheduler = make_scheduler(stack.optimizer, train, steps_per_epoch=0)  # step: per epoch
        data = [DeviceBatches(t, {**train, "seed": seed}, device) for t, seed in zip(tensors, seeds)]  # type: ignore[arg-type]
        steps = StepLog([f"lambda={lam:g} (model {m} of the vectorised stack); lower lambda" for m, lam in enumerate(lams)])
        step = 0
        for epoch in range(train["epochs"]):
            torch.manual_seed(epoch_seed(seeds[0], epoch))  # the stack's dropout draws
            batches = list(zip(*(d.epoch(epoch) for d in data)))
            for i, group in enumerate(progress(batches, desc=f"epoch {epoch + 1}/{train['epochs']}", unit="batch")):
                x = torch.stack([b[0] for b in group])
                y = torch.stack([b[1] for b in group])
                grads, values = stack.gradients(x, y)
                for name, param in stack.params.items():
                    param.grad = grads[name]
                stack.optimizer.step()
                stack.optimizer.zero_grad(set_to_none=True)
                per_model = values.double() / torch.tensor([1, 1, 1, len(y[0])], dtype=torch.float64, device=values.device)
                row = {"step": step, "epoch": epoch + 1, "learning_rate": stack.optimizer.param_groups[0]["lr"]}
                steps.record(row, per_model, last=i + 1 == len(batches))
                step += 1
            scheduler.step()
            log.info("epoch %d: loss %s", epoch + 1, " ".join(f"{rows[-1]['loss']:.4f}" for rows in steps.rows))
        for model, state in zip(models, stack.state_dicts()):
            model.load_state_dict(state)
    return steps.rows
