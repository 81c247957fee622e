"""Local Lipschitz (gradient-norm, double-backprop) regularization and the training loop (docs/spec.md §3).

    loss = mean_k CE(x_k, y_k) + lambda * mean_k ||grad_{x_k} s(x_k, y_k)||_2^p

with ``s`` the cross-entropy (``sensitivity="loss"``) or the true-class logit
(``sensitivity="logit"``). The gradient is taken per example. The authors' code took it
of the batch-mean loss, which scales each example's gradient by 1/B, so their
``lambda_ref = lambda * B**2`` (for p = 2).

On a GPU the double backward runs in full float32 precision: no autocast, and TF32 off
for matmuls and convolutions while training (TF32 keeps 10 mantissa bits, too coarse for a
gradient of a gradient). Per-epoch resume files make a killed job continue after its
last completed epoch on the uninterrupted run's schedule (bit-identical on the CPU; cuDNN's
nondeterministic kernels make any two GPU runs differ in the last bits).
"""

from __future__ import annotations

import copy
import csv
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from saliency_robustness.data import MNIST_INPUT_SPACE, InputSpace, class_names, open_split, seeded_subset
from saliency_robustness.errors import ConfigError, PipelineError, TrainingDiverged
from saliency_robustness.models import (
    ModelSpec,
    build_model,
    degenerate_reason,
    load_initial_weights,
    save_machine,
    save_model,
    save_performance,
    test_performance,
)
from saliency_robustness.runtime import eval_mode, full_precision, machine, progress, resolve_device
from saliency_robustness.stores import atomic_directory

log = logging.getLogger(__name__)

SENSITIVITIES = ("loss", "logit")
# added to ||g||^2 before the power p/2 (p != 2), so that a zero input gradient has a finite
# parameter gradient; far below any squared gradient norm that matters
PENALTY_EPS = 1e-12
LOG_COLUMNS = ("step", "epoch", "loss", "cross_entropy", "penalty", "accuracy", "learning_rate")


def input_gradient_penalty(logits: torch.Tensor, x: torch.Tensor, y: torch.Tensor, *, sensitivity: str = "loss", p: float = 2.0) -> torch.Tensor:
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


def _sensitivity(logits: torch.Tensor, y: torch.Tensor, sensitivity: str) -> torch.Tensor:
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
    p: float = 2.0,
    sensitivity: str = "loss",
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
    shifted = _sensitivity(model(x.detach() + step * direction), y, sensitivity)
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


def regularized_loss(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    lam: float,
    sensitivity: str = "loss",
    p: float = 2.0,
    penalty_gradient: str = "exact",
    finite_difference_step: float = 0.01,
) -> LossTerms:
    """The training objective of docs/spec.md §3 without weight decay (the optimizer applies that).

    With ``lam == 0`` no input gradient is taken: the step is plain cross-entropy. The penalty
    is differentiated exactly (double backprop) or by :func:`finite_difference_penalty`.
    """
    if lam == 0:
        logits = model(x)
        ce = F.cross_entropy(logits, y)
        return LossTerms(ce, ce.detach(), None, (logits.argmax(1) == y).sum())
    x = x.detach().requires_grad_(True)
    if penalty_gradient == "exact":
        logits = model(x)
        penalty = input_gradient_penalty(logits, x, y, sensitivity=sensitivity, p=p).mean()
    elif penalty_gradient == "finite_difference":
        draws = RandomDraws(x.device)
        logits = model(x)
        s = _sensitivity(logits, y, sensitivity)
        penalty = finite_difference_penalty(model, x, y, s, step=finite_difference_step, p=p, sensitivity=sensitivity, draws=draws).mean()
    else:
        raise ValueError(f"penalty_gradient must be one of {PENALTY_GRADIENTS}, not {penalty_gradient!r}")
    ce = F.cross_entropy(logits, y)
    return LossTerms(ce + lam * penalty, ce.detach(), penalty.detach(), (logits.argmax(1) == y).sum())


@dataclass(frozen=True)
class AdversarialTraining:
    """L2 PGD adversarial training (docs/spec.md §3): the model steps on PGD adversarials of
    radius ``epsilon`` of its training batch, found against the training label in eval mode."""

    epsilon: float
    steps: int = 7
    step_size: float | None = None  # None: 2.5 * epsilon / steps (Madry et al.)
    random_start: bool = True
    clean_fraction: float = 0.0

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


def freeze_batchnorm(model: nn.Module) -> None:
    """Keep batch norm in eval mode (frozen statistics) while the rest trains."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()


def make_optimizer(model: nn.Module, train: Mapping[str, Any]) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if train["optimizer"] == "sgd":
        return torch.optim.SGD(params, lr=train["learning_rate"], momentum=train["momentum"], weight_decay=train["weight_decay"])
    return torch.optim.Adam(params, lr=train["learning_rate"], weight_decay=train["weight_decay"])


def epoch_seed(seed: int, epoch: int) -> int:
    """Every epoch draws from its own seed, so that a run resumed at an epoch boundary
    reproduces the uninterrupted run exactly."""
    return (seed * 1_000_003 + epoch) % (2**63 - 1)


def epoch_loader(ds: Dataset, train: Mapping[str, Any], epoch: int, device: torch.device) -> DataLoader:
    """The shuffled batches of one epoch, drawn from the epoch's own seed.

    The generator fixes both the order and the workers' seeds (hence the random crops and
    flips), so each epoch is reproducible on its own. A new loader per epoch means new
    workers per epoch (``persistent_workers`` could not carry over): on ImageNet the
    start-up is seconds against an epoch of an hour.
    """
    generator = torch.Generator().manual_seed(epoch_seed(train["seed"], epoch))
    workers = train["num_workers"]
    return DataLoader(
        ds,
        batch_size=train["batch_size"],
        shuffle=True,
        generator=generator,
        num_workers=workers,
        pin_memory=device.type == "cuda",  # page-locked batches: the copies below run asynchronously
        persistent_workers=False,
        prefetch_factor=4 if workers > 0 else None,
        drop_last=False,
    )


def in_memory_tensors(ds: Dataset) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Images and labels of an in-memory dataset (a ``TensorDataset`` such as MNIST or
    CIFAR-10, or a ``Subset`` of one), or None for one that decodes files (image folders)."""
    indices = None
    if isinstance(ds, Subset):
        indices, ds = torch.as_tensor(ds.indices), ds.dataset
    if not isinstance(ds, TensorDataset) or len(ds.tensors) != 2:
        return None
    images, labels = ds.tensors
    return (images, labels) if indices is None else (images[indices], labels[indices])


class DeviceBatches:
    """The shuffled batches of an in-memory training set that lives on the training device for
    the whole run (MNIST as float32 is 188 MB), indexed there: no loader, no host copies.

    Each epoch's order is the one :func:`epoch_loader` gives (a ``DataLoader`` draws its base
    seed, then the permutation, from the epoch's generator), so both paths train alike.
    """

    def __init__(self, tensors: tuple[torch.Tensor, torch.Tensor], train: Mapping[str, Any], device: torch.device) -> None:
        self.images, self.labels = (t.to(device) for t in tensors)
        self.train, self.device = train, device

    def epoch(self, epoch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        generator = torch.Generator().manual_seed(epoch_seed(self.train["seed"], epoch))
        torch.empty((), dtype=torch.int64).random_(generator=generator)  # the DataLoader's base seed
        order = torch.randperm(len(self.labels), generator=generator).to(self.device)
        size = self.train["batch_size"]
        return [(self.images[rows], self.labels[rows]) for rows in order.split(size)]


def training_batches(ds: Dataset, train: Mapping[str, Any], device: torch.device) -> Callable[[int], Iterable[tuple[torch.Tensor, torch.Tensor]]]:
    """Epoch -> its batches: on the device for an in-memory dataset without loader workers,
    else from a ``DataLoader`` (image folders: decoding and augmentation in workers)."""
    tensors = in_memory_tensors(ds)
    if tensors is not None and train["num_workers"] == 0:
        return DeviceBatches(tensors, train, device).epoch
    return lambda epoch: epoch_loader(ds, train, epoch, device)


# the per-step log is kept on the device and read (one sync) every this many steps
LOG_EVERY = 50


def _save_resume_state(path: Path, state: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def _flush_log(pending: list[tuple[dict[str, float], torch.Tensor]], rows: list[dict[str, float]], what: str) -> None:
    """Move the pending rows' device values into ``rows`` (one transfer); raise
    :class:`TrainingDiverged` at the first non-finite loss."""
    values = torch.stack([v for _, v in pending]).cpu().tolist()
    for (row, _), (loss, cross_entropy, penalty, accuracy) in zip(pending, values):
        if not math.isfinite(loss):
            raise TrainingDiverged(f"loss became {loss} at step {row['step']} (epoch {row['epoch']}) with {what} or the learning rate")
        rows.append({**row, "loss": loss, "cross_entropy": cross_entropy, "penalty": penalty, "accuracy": accuracy})
    pending.clear()


def fit(
    model: nn.Module,
    train_set: Dataset,
    train: Mapping[str, Any],
    lam: float,
    *,
    device: torch.device,
    resume_file: Path | None = None,
    resume_key: str = "",
    adversarial: AdversarialTraining | None = None,
    space: InputSpace = MNIST_INPUT_SPACE,
) -> list[dict[str, float]]:
    """Train ``model`` in place; return the per-step log.

    With ``adversarial``, every batch is replaced by its PGD adversarials (inside the box of
    the input ``space``) before the step. With ``resume_file``, the state after every epoch is
    saved there, and a run that finds a state with the same ``resume_key`` continues after its
    last completed epoch.
    """
    with full_precision():
        return _fit(model, train_set, train, lam, device=device, resume_file=resume_file, resume_key=resume_key, adversarial=adversarial, space=space)


def _fit(
    model: nn.Module,
    train_set: Dataset,
    train: Mapping[str, Any],
    lam: float,
    *,
    device: torch.device,
    resume_file: Path | None,
    resume_key: str,
    adversarial: AdversarialTraining | None,
    space: InputSpace,
) -> list[dict[str, float]]:
    model.to(device)
    bounds = space.input_bounds(device)
    optimizer = make_optimizer(model, train)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=train["lr_step_epochs"], gamma=train["lr_gamma"])
    rows: list[dict[str, float]] = []
    start_epoch = 0
    if resume_file is not None and resume_file.exists():
        state = torch.load(resume_file, map_location=device, weights_only=True)
        if state.get("key") == resume_key:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            rows = list(state["rows"])
            start_epoch = int(state["epoch"]) + 1
            log.info("resuming after epoch %d from %s", start_epoch, resume_file)
        else:
            log.info("ignoring %s: it belongs to another configuration", resume_file)

    accumulate = train["accumulation_steps"]
    step = len(rows)
    batches_of = training_batches(train_set, train, device)
    what = f"PGD epsilon={adversarial.epsilon:g}; lower epsilon" if adversarial else f"lambda={lam:g}; lower lambda"
    for epoch in range(start_epoch, train["epochs"]):
        torch.manual_seed(epoch_seed(train["seed"], epoch))  # dropout and augmentation draws
        model.train()
        if train["freeze_batchnorm"]:
            freeze_batchnorm(model)
        loader = batches_of(epoch)
        bar = progress(loader, desc=f"epoch {epoch + 1}/{train['epochs']}", unit="batch")
        optimizer.zero_grad(set_to_none=True)
        batches = len(loader)  # type: ignore[arg-type]
        pending: list[tuple[dict[str, float], torch.Tensor]] = []  # rows whose values are still on the device
        for i, (x, y) in enumerate(bar):
            x = x.to(device, non_blocking=True)
            y = y.to(device, non_blocking=True)
            if adversarial is not None:
                x = adversarial_batch(model, x, y, adversarial, bounds)
            terms = regularized_loss(
                model,
                x,
                y,
                lam=lam,
                sensitivity=train["sensitivity"],
                p=train["p"],
                penalty_gradient=train["penalty_gradient"],
                finite_difference_step=train["finite_difference_step"],
            )
            # the mean over the optimizer step's batches (fewer in the epoch's last group)
            group = min(accumulate, batches - (i // accumulate) * accumulate)
            (terms.loss / group).backward()
            values = torch.stack(  # float64: each value reads back as .item() and int / int gave it
                [
                    terms.loss.detach().double(),
                    terms.cross_entropy.double(),
                    terms.penalty.double() if terms.penalty is not None else torch.full_like(terms.cross_entropy, math.nan, dtype=torch.float64),
                    terms.correct.double() / len(y),
                ]
            )
            row = {"step": step, "epoch": epoch + 1, "learning_rate": optimizer.param_groups[0]["lr"]}
            pending.append((row, values))
            # read the device-side log (one sync) every LOG_EVERY steps and at the epoch's end;
            # a non-finite loss stops the run there, before any model is written
            if len(pending) == LOG_EVERY or i + 1 == batches:
                _flush_log(pending, rows, what)
                bar.set_postfix(loss=f"{rows[-1]['loss']:.3f}", acc=f"{rows[-1]['accuracy']:.2f}")  # type: ignore[attr-defined]
            if (i + 1) % accumulate == 0 or i + 1 == batches:
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            step += 1
        scheduler.step()
        recent = rows[-batches:]
        log.info(
            "epoch %d: loss %.4f, accuracy %.4f",
            epoch + 1,
            sum(r["loss"] for r in recent) / len(recent),
            sum(r["accuracy"] for r in recent) / len(recent),
        )
        if resume_file is not None:
            _save_resume_state(
                resume_file,
                {
                    "key": resume_key,
                    "epoch": epoch,
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "rows": rows,
                },
            )
    return rows


def write_log(rows: list[dict[str, float]], path: Path) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=LOG_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)


def model_spec(
    name: str,
    lam: float,
    dataset: Mapping[str, Any],
    model: Mapping[str, Any],
    train: Mapping[str, Any],
    *,
    method: str = "gradnorm",
    epsilon: float | None = None,
) -> ModelSpec:
    """The spec of grid member ``name``: its method and strength (lambda, or the PGD radius
    epsilon) plus the shared options."""
    shared = {k: v for k, v in train.items() if k != "lambdas"}
    return ModelSpec(
        name=name,
        architecture=model["architecture"],
        lam=lam,
        sensitivity=train["sensitivity"],
        p=float(train["p"]),
        seed=train["seed"],
        num_classes=model["num_classes"],
        in_channels=model["in_channels"],
        image_size=model["image_size"],
        architecture_options=dict(model["options"]),
        training={**shared, "dataset": dict(dataset)},
        weights=model["weights"],
        method=method,
        epsilon=epsilon,
    )


def check_classes(spec: ModelSpec, classes: list[str] | None) -> None:
    """A folder dataset's class count must be the model's logit count (labels index logits)."""
    if classes is not None and len(classes) != spec.num_classes:
        raise ConfigError(f"model.num_classes is {spec.num_classes} but the dataset has {len(classes)} class folders")


def train_stage(
    *,
    spec: ModelSpec,
    dataset: Mapping[str, Any],
    train: Mapping[str, Any],
    data_root: str | Path,
    output: str | Path,
    resume_file: str | Path | None = None,
    resume_key: str = "",
) -> None:
    """Train one model of the grid and write ``models/<model>/`` atomically:
    ``model.pt``, ``spec.json``, ``training_log.csv`` and ``test_accuracy.json``."""
    device = resolve_device()
    log.info("training %s (%s, strength %g) on %s", spec.name, spec.method, spec.strength, device)
    train_split, space = open_split(dataset, data_root, "train")
    check_classes(spec, class_names(train_split))
    train_set, _ = seeded_subset(train_split, train["n_train"], train["seed"])
    test_set, _ = open_split(dataset, data_root, "test")
    model = build_model(spec)
    load_initial_weights(model, spec, data_root)  # a resumed run replaces them with its saved state
    resume = Path(resume_file) if resume_file else None
    if resume is not None:
        resume.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    adversarial = AdversarialTraining.from_config(spec.strength, train["adversarial"]) if spec.method == "adversarial" else None
    rows = fit(model, train_set, train, spec.lam, device=device, resume_file=resume, resume_key=resume_key, adversarial=adversarial, space=space)
    seconds = time.perf_counter() - started
    test_accuracy, majority_share = test_performance(model, test_set, device=device, num_workers=train["num_workers"])
    log.info("test accuracy %.4f on %d images after %.1f s of training", test_accuracy, len(test_set), seconds)  # type: ignore[arg-type]
    degenerate = degenerate_reason(test_accuracy, majority_share, spec.num_classes)
    if degenerate:
        log.warning("%s is degenerate: %s; its statistics are flagged and left out of the trends", spec.name, degenerate)
    if not rows:
        raise PipelineError("training ran no step: check train.epochs and the training set")
    with atomic_directory(output) as tmp:
        save_machine(tmp, machine(device))
        save_model(model.cpu(), spec, tmp)
        write_log(rows, tmp / "training_log.csv")
        save_performance(tmp, test_accuracy, majority_share, len(test_set), train_seconds=seconds)  # type: ignore[arg-type]
    if resume is not None and resume.exists():
        resume.unlink()


# --- a grid as one vectorised ensemble (train.ensemble) ------------------------------------


def _functional_loss(base: nn.Module, sensitivity: str, p: float) -> Callable[..., tuple[torch.Tensor, tuple[torch.Tensor, ...]]]:
    """One model's objective as a function of its parameters (``torch.func``): the loss of
    :func:`regularized_loss` (exact penalty) from a single forward pass, with its terms."""
    from torch.func import functional_call, grad

    def loss(params: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor, lam: torch.Tensor) -> Any:
        def summed_sensitivity(inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            logits = functional_call(base, (params, buffers), (inputs,))
            return _sensitivity(logits, y, sensitivity).sum(), logits

        g, logits = grad(summed_sensitivity, has_aux=True)(x)  # per-example input gradients, one forward
        squared_norm = g.flatten(1).pow(2).sum(dim=1)
        penalty = norm_power(squared_norm, p).mean()
        ce = F.cross_entropy(logits, y)
        correct = (logits.argmax(1) == y).sum()
        return ce + lam * penalty, (ce.detach(), penalty.detach(), correct)

    return loss


class Ensemble:
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
                raise ConfigError("train.ensemble needs frozen batch norm (train.freeze_batchnorm: true): running statistics cannot be stacked")
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


def fit_ensemble(
    models: Sequence[nn.Module],
    train_sets: Sequence[Dataset],
    train: Mapping[str, Any],
    lams: Sequence[float],
    seeds: Sequence[int],
    *,
    device: torch.device,
) -> list[list[dict[str, float]]]:
    """Train ``models`` (one architecture; model ``m`` on ``train_sets[m]`` with ``lams[m]``,
    its data order drawn from ``seeds[m]``) as one :class:`Ensemble`, in place; return each
    model's per-step log, as :func:`fit` writes it. Exact penalty, in-memory data only."""
    if train["penalty_gradient"] != "exact" or train["accumulation_steps"] != 1:
        raise ConfigError("train.ensemble trains with penalty_gradient: exact and accumulation_steps: 1 only")
    tensors = [in_memory_tensors(ds) for ds in train_sets]
    if any(t is None for t in tensors) or len({len(t[1]) for t in tensors if t is not None}) != 1:
        raise ConfigError("train.ensemble needs in-memory training sets of one size (MNIST, CIFAR-10)")
    with full_precision():
        ensemble = Ensemble(models, train, lams, device)
        scheduler = torch.optim.lr_scheduler.StepLR(ensemble.optimizer, step_size=train["lr_step_epochs"], gamma=train["lr_gamma"])
        data = [DeviceBatches(t, {**train, "seed": seed}, device) for t, seed in zip(tensors, seeds)]  # type: ignore[arg-type]
        logs: list[list[dict[str, float]]] = [[] for _ in models]
        step = 0
        for epoch in range(train["epochs"]):
            torch.manual_seed(epoch_seed(seeds[0], epoch))  # the ensemble's dropout draws
            batches = list(zip(*(d.epoch(epoch) for d in data)))
            pending: list[tuple[int, torch.Tensor]] = []
            for i, group in enumerate(progress(batches, desc=f"epoch {epoch + 1}/{train['epochs']}", unit="batch")):
                x = torch.stack([b[0] for b in group])
                y = torch.stack([b[1] for b in group])
                grads, values = ensemble.gradients(x, y)
                for name, param in ensemble.params.items():
                    param.grad = grads[name]
                ensemble.optimizer.step()
                ensemble.optimizer.zero_grad(set_to_none=True)
                pending.append((step, values.double() / torch.tensor([1, 1, 1, len(y[0])], dtype=torch.float64, device=values.device)))
                step += 1
                if len(pending) == LOG_EVERY or i + 1 == len(batches):
                    rate = ensemble.optimizer.param_groups[0]["lr"]
                    for m, (lam, log_m) in enumerate(zip(lams, logs)):
                        rows = [({"step": s, "epoch": epoch + 1, "learning_rate": rate}, v[m]) for s, v in pending]
                        _flush_log(rows, log_m, f"lambda={lam:g} (model {m} of the ensemble); lower lambda")
                    pending.clear()
            scheduler.step()
            log.info("epoch %d: loss %s", epoch + 1, " ".join(f"{log_m[-1]['loss']:.4f}" for log_m in logs))
        for model, state in zip(models, ensemble.state_dicts()):
            model.load_state_dict(state)
    return logs


def train_ensemble_stage(
    *,
    specs: Sequence[ModelSpec],
    dataset: Mapping[str, Any],
    trains: Sequence[Mapping[str, Any]],
    data_root: str | Path,
    outputs: Sequence[str | Path],
) -> None:
    """Train the gradient-norm models of a grid as one ensemble (``train.ensemble``) and write
    each one's ``models/<model>/`` as :func:`train_stage` does. The models differ in lambda and
    seed only (``trains[m]`` is model ``m``'s train section)."""
    shared = [{k: v for k, v in t.items() if k != "seed"} for t in trains]
    if any(s != shared[0] for s in shared) or len({(s.architecture, json.dumps(s.architecture_options, sort_keys=True)) for s in specs}) != 1:
        raise ConfigError("train.ensemble: the models of one ensemble must share architecture and training settings but lambda and seed")
    device = resolve_device()
    log.info("training %d models as one ensemble (lambdas %s) on %s", len(specs), ", ".join(f"{s.lam:g}" for s in specs), device)
    train_split, _ = open_split(dataset, data_root, "train")
    check_classes(specs[0], class_names(train_split))
    subsets = [seeded_subset(train_split, t["n_train"], t["seed"])[0] for t in trains]
    test_set, _ = open_split(dataset, data_root, "test")
    models = [build_model(spec) for spec in specs]
    for model, spec in zip(models, specs):
        load_initial_weights(model, spec, data_root)
    started = time.perf_counter()
    logs = fit_ensemble(models, subsets, trains[0], [s.lam for s in specs], [t["seed"] for t in trains], device=device)
    seconds = time.perf_counter() - started
    for model, spec, rows, output in zip(models, specs, logs, outputs):
        test_accuracy, majority_share = test_performance(model, test_set, device=device, num_workers=trains[0]["num_workers"])
        log.info("%s: test accuracy %.4f on %d images", spec.name, test_accuracy, len(test_set))  # type: ignore[arg-type]
        degenerate = degenerate_reason(test_accuracy, majority_share, spec.num_classes)
        if degenerate:
            log.warning("%s is degenerate: %s; its statistics are flagged and left out of the trends", spec.name, degenerate)
        with atomic_directory(output) as tmp:
            save_machine(tmp, machine(device))
            save_model(model.cpu(), spec, tmp)
            write_log(rows, tmp / "training_log.csv")
            save_performance(tmp, test_accuracy, majority_share, len(test_set), train_seconds=seconds)  # type: ignore[arg-type]
