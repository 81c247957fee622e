"""What the per-model and the vectorised training loops share: the optimizer and its
learning-rate schedule, frozen batch norm, and the per-step training log
(``models/<model>/training_log.csv``), which is kept on the device and read in bulk."""

from __future__ import annotations

import csv
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from saliency_robustness.errors import TrainingDiverged

#: the columns of ``training_log.csv``
LOG_COLUMNS = ("step", "epoch", "loss", "cross_entropy", "penalty", "accuracy", "learning_rate")
# the per-step log is kept on the device and read (one sync) every this many steps
LOG_EVERY = 50


def freeze_batchnorm(model: nn.Module) -> None:
    """Keep batch norm in eval mode (frozen statistics) while the rest trains."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()


def make_optimizer(model: nn.Module, train: Mapping[str, Any]) -> torch.optim.Optimizer:
    """SGD (Nesterov with ``train.nesterov``) or Adam over the trainable parameters."""
    params = [p for p in model.parameters() if p.requires_grad]
    if train["optimizer"] == "sgd":
        return torch.optim.SGD(
            params, lr=train["learning_rate"], momentum=train["momentum"], weight_decay=train["weight_decay"], nesterov=train["nesterov"]
        )
    return torch.optim.Adam(params, lr=train["learning_rate"], weight_decay=train["weight_decay"])


def per_step_schedule(train: Mapping[str, Any]) -> bool:
    """Whether the schedule steps after every optimizer step (triangular) or every epoch (step)."""
    return train["schedule"] == "triangular"


def make_scheduler(optimizer: torch.optim.Optimizer, train: Mapping[str, Any], steps_per_epoch: int) -> torch.optim.lr_scheduler.LRScheduler:
    """``train.schedule``: step (the learning rate times ``lr_gamma`` every ``lr_step_epochs``
    epochs) or triangular (a linear warm-up over ``warmup_fraction`` of the
    ``epochs * steps_per_epoch`` optimizer steps, then a linear decay to 0)."""
    if not per_step_schedule(train):
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=train["lr_step_epochs"], gamma=train["lr_gamma"])
    total = max(1, train["epochs"] * steps_per_epoch)
    warmup = int(train["warmup_fraction"] * total)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class StepLog:
    """The per-step logs of the models trained together (one, or a vectorised stack), each a list
    of rows. A step's values stay on the device until :data:`LOG_EVERY` steps are pending or the
    epoch ends; then one transfer reads them, and the first non-finite loss stops the run with
    :class:`TrainingDiverged`, naming the model's setting (``lowers[m]``: what to lower)."""

    def __init__(self, lowers: Sequence[str], rows: Sequence[list[dict[str, float]]] | None = None) -> None:
        self.lowers = list(lowers)
        self.rows: list[list[dict[str, float]]] = [list(r) for r in rows] if rows is not None else [[] for _ in lowers]
        self.pending: list[tuple[dict[str, float], torch.Tensor]] = []

    def record(self, row: dict[str, float], values: torch.Tensor, *, last: bool) -> bool:
        """Add one step: ``row`` (step, epoch, learning rate) and its (loss, cross-entropy,
        penalty, accuracy) per model, a models x 4 (or, for one model, 4) float64 tensor on the
        device. Returns whether the pending steps were read (every LOG_EVERY steps and ``last``)."""
        self.pending.append((row, values))
        if len(self.pending) == LOG_EVERY or last:
            self.flush()
            return True
        return False

    def flush(self) -> None:
        if not self.pending:
            return
        values = torch.stack([v.reshape(-1, 4) for _, v in self.pending]).cpu()  # steps x models x 4
        for m, rows in enumerate(self.rows):
            for (row, _), (loss, cross_entropy, penalty, accuracy) in zip(self.pending, values[:, m].tolist()):
                if not math.isfinite(loss):
                    raise TrainingDiverged(
                        f"loss became {loss} at step {row['step']} (epoch {row['epoch']}) with {self.lowers[m]} or the learning rate"
                    )
                rows.append({**row, "loss": loss, "cross_entropy": cross_entropy, "penalty": penalty, "accuracy": accuracy})
        self.pending.clear()


def write_log(rows: list[dict[str, float]], path: Path) -> None:
    """Write one model's rows as ``training_log.csv``."""
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=LOG_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
