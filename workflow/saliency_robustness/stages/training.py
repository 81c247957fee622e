"""The train stage: one model of the grid (``train_stage``), or the grid's gradient-norm models
trained together as one vectorised stack (``train_vectorized_stage``), each written to
``models/<model>/``. The objective is in ``regularizers``, PGD in ``pgd``, the batches in
``training_data``, the optimizer and the step log in ``optimization``.

On a GPU the double backward runs in full float32 precision: no autocast, and TF32 off
for matmuls and convolutions while training (TF32 keeps 10 mantissa bits, too coarse for a
gradient of a gradient). Per-epoch resume files make a killed job continue after its
last completed epoch on the uninterrupted run's schedule (bit-identical on the CPU; cuDNN's
nondeterministic kernels make any two GPU runs differ in the last bits).
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

import torch
from torch import nn
from torch.utils.data import Dataset

from saliency_robustness.architectures import fit_whitening
from saliency_robustness.data import MNIST_INPUT_SPACE, InputSpace, class_names, open_split, seeded_subset
from saliency_robustness.errors import ConfigError, PipelineError, StoreError
from saliency_robustness.fingerprints import fingerprint
from saliency_robustness.grid import PENALTY_KEYS
from saliency_robustness.models import (
    ModelSpec,
    build_model,
    degenerate_reason,
    load_initial_weights,
    load_model,
    load_spec,
    save_machine,
    save_model,
    save_performance,
    test_performance,
)
from saliency_robustness.optimization import StepLog, freeze_batchnorm, make_optimizer, make_scheduler, per_step_schedule, write_log
from saliency_robustness.pgd import AdversarialTraining, adversarial_batch
from saliency_robustness.regularizers import LossTerms, lazy_penalty_weight, regularized_loss
from saliency_robustness.runtime import full_precision, machine, progress, resolve_device
from saliency_robustness.stores import atomic_directory
from saliency_robustness.training_data import epoch_seed, training_batches
from saliency_robustness.vectorized import fit_vectorized
from saliency_robustness.vocabulary import ADVERSARIAL, METHODS, TRAINING_LOG

log = logging.getLogger(__name__)


def model_spec(
    *,
    name: str,
    method: str,
    strength: float,
    dataset: Mapping[str, Any],
    model: Mapping[str, Any],
    train: Mapping[str, Any],
    base: Mapping[str, Any] | None = None,
) -> ModelSpec:
    """The spec of grid member ``name``: its method and strength (lambda, or the PGD radius
    epsilon) plus the shared options (``train`` is the model's own view of the section,
    ``grid.model_train_settings``). ``base``: the settings of the base model it fine-tunes
    (train.init base), recorded as their fingerprint."""
    shared = {k: v for k, v in train.items() if k != "lambdas"}
    if base is not None:
        shared["base"] = fingerprint(base)
    return ModelSpec(
        name=name,
        architecture=model["architecture"],
        method=method,
        strength=strength,
        sensitivity=train["sensitivity"],
        p=float(train["p"]),
        seed=train["seed"],
        num_classes=model["num_classes"],
        in_channels=model["in_channels"],
        image_size=model["image_size"],
        architecture_options=dict(model["options"]),
        training={**shared, "dataset": dict(dataset)},
        weights=model["weights"],
    )


def _step_values(terms: LossTerms, examples: int) -> torch.Tensor:
    """(loss, cross-entropy, penalty, accuracy) of a step as float64 on the device (NaN penalty
    when none was taken): each value reads back as .item() and int / int gave it."""
    penalty = terms.penalty.double() if terms.penalty is not None else torch.full_like(terms.cross_entropy, math.nan, dtype=torch.float64)
    return torch.stack([terms.loss.detach().double(), terms.cross_entropy.double(), penalty, terms.correct.double() / examples])


def _save_resume_state(path: Path, state: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def _restore(
    path: Path | None, key: str, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, device: torch.device
) -> tuple[int, list]:
    """The first epoch to train and the log so far: after the last completed epoch of a resume
    file with the same ``key`` (its state loaded into model, optimizer and scheduler), else 0."""
    if path is None or not path.exists():
        return 0, []
    state = torch.load(path, map_location=device, weights_only=True)
    if state.get("key") != key:
        log.info("ignoring %s: it belongs to another configuration", path)
        return 0, []
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    log.info("resuming after epoch %d from %s", int(state["epoch"]) + 1, path)
    return int(state["epoch"]) + 1, list(state["rows"])


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
    """Train ``model`` in place with penalty weight ``lam`` (taken on every
    ``train.penalty_interval``-th mini-batch with that many times the weight,
    :func:`~saliency_robustness.regularizers.lazy_penalty_weight`, and on the first
    ``train.penalty_fraction`` of each mini-batch's examples); return the per-step log.
    With ``lam`` 0 the penalty's keys of ``train`` are not read (the base model has none).

    With ``adversarial``, every batch is replaced by its PGD adversarials (inside the box of
    the input ``space``) before the step. With ``resume_file``, the state after every epoch is
    saved there, and a run that finds a state with the same ``resume_key`` continues after its
    last completed epoch.
    """
    with full_precision():
        memory_format = torch.channels_last if train["channels_last"] else torch.contiguous_format
        model.to(device, memory_format=memory_format)
        bounds = space.input_bounds(device)
        optimizer = make_optimizer(model, train)
        accumulate = train["accumulation_steps"]
        steps_per_epoch = math.ceil(math.ceil(len(train_set) / train["batch_size"]) / accumulate)  # type: ignore[arg-type]
        scheduler = make_scheduler(optimizer, train, steps_per_epoch)
        per_step = per_step_schedule(train)
        start_epoch, rows = _restore(resume_file, resume_key, model, optimizer, scheduler, device)
        # the penalty's own keys: a model trained without one (the base) has none
        interval = train["penalty_interval"] if lam else 1
        fraction = train["penalty_fraction"] if lam else 1.0
        penalty = {key: train[key] if lam else None for key in PENALTY_KEYS if key not in ("penalty_interval", "penalty_fraction")}
        steps = StepLog([f"PGD epsilon={adversarial.epsilon:g}; lower epsilon" if adversarial else f"lambda={lam:g}; lower lambda"], [rows])
        step = len(rows)
        batches_of = training_batches(train_set, train, device)
        for epoch in range(start_epoch, train["epochs"]):
            torch.manual_seed(epoch_seed(train["seed"], epoch))  # dropout and augmentation draws
            model.train()
            if train["freeze_batchnorm"]:
                freeze_batchnorm(model)
            loader = batches_of(epoch)
            bar = progress(loader, desc=f"epoch {epoch + 1}/{train['epochs']}", unit="batch")
            optimizer.zero_grad(set_to_none=True)
            batches = len(loader)  # type: ignore[arg-type]
            for i, (x, y) in enumerate(bar):
                x = x.to(device, non_blocking=True)
                if x.ndim == 4:
                    x = x.contiguous(memory_format=memory_format)
                y = y.to(device, non_blocking=True)
                if adversarial is not None:
                    x = adversarial_batch(model, x, y, adversarial, bounds)
                terms = regularized_loss(
                    model,
                    x,
                    y,
                    lam=lazy_penalty_weight(lam, step, interval),
                    sensitivity=train["sensitivity"],
                    p=train["p"],
                    label_smoothing=train["label_smoothing"],
                    penalty_examples=math.ceil(fraction * len(y)) if fraction < 1 else None,
                    **penalty,
                )
                # the mean over the optimizer step's batches (fewer in the epoch's last group)
                group = min(accumulate, batches - (i // accumulate) * accumulate)
                (terms.loss / group).backward()
                row = {"step": step, "epoch": epoch + 1, "learning_rate": optimizer.param_groups[0]["lr"]}
                # a non-finite loss stops the run when the log is read, before any model is written
                if steps.record(row, _step_values(terms, len(y)), last=i + 1 == batches):
                    last = steps.rows[0][-1]
                    bar.set_postfix(loss=f"{last['loss']:.3f}", acc=f"{last['accuracy']:.2f}")  # type: ignore[attr-defined]
                if (i + 1) % accumulate == 0 or i + 1 == batches:
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    if per_step:
                        scheduler.step()
                step += 1
            if not per_step:
                scheduler.step()
            rows = steps.rows[0]
            recent = rows[-batches:]
            log.info(
                "epoch %d: loss %.4f, accuracy %.4f",
                epoch + 1,
                sum(r["loss"] for r in recent) / len(recent),
                sum(r["accuracy"] for r in recent) / len(recent),
            )
            if resume_file is not None:
                state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}
                _save_resume_state(resume_file, {"key": resume_key, "epoch": epoch, **state, "rows": rows})
        return steps.rows[0]


def check_classes(spec: ModelSpec, classes: list[str] | None) -> None:
    """A folder dataset's class count must be the model's logit count (labels index logits)."""
    if classes is not None and len(classes) != spec.num_classes:
        raise ConfigError(f"model.num_classes is {spec.num_classes} but the dataset has {len(classes)} class folders")


def write_model_dir(
    model: nn.Module,
    spec: ModelSpec,
    rows: list[dict[str, float]],
    output: str | Path,
    *,
    test_set: Dataset,
    train: Mapping[str, Any],
    seconds: float,
    untrained: bool = False,
) -> None:
    """Measure the trained model on the whole test set (warning when it is degenerate) and
    write ``models/<model>/`` atomically: ``model.pt``, ``spec.json``, ``training_log.csv``,
    ``test_accuracy.json`` and ``machine.json``. A model without a training step is refused
    unless ``untrained`` says that it is meant (a base model of ``pretrain.epochs: 0``)."""
    if not rows and not untrained:
        raise PipelineError("training ran no step: check train.epochs and the training set")
    device = next(model.parameters()).device
    test_accuracy, majority_share = test_performance(model, test_set, device=device, num_workers=train["num_workers"])
    log.info("%s: test accuracy %.4f on %d images after %.1f s of training", spec.name, test_accuracy, len(test_set), seconds)  # type: ignore[arg-type]
    degenerate = degenerate_reason(test_accuracy, majority_share, spec.num_classes)
    if degenerate:
        log.warning("%s is degenerate: %s; its statistics are flagged and left out of the trends", spec.name, degenerate)
    with atomic_directory(output) as tmp:
        save_machine(tmp, machine(device))
        save_model(model.cpu(), spec, tmp)
        write_log(rows, tmp / TRAINING_LOG)
        save_performance(tmp, test_accuracy, majority_share, len(test_set), train_seconds=seconds)  # type: ignore[arg-type]


def _training_problem(
    spec: ModelSpec, dataset: Mapping[str, Any], train: Mapping[str, Any], data_root: str | Path
) -> tuple[Dataset, Dataset, InputSpace, nn.Module]:
    """The training subset, the test split, the input space and a fresh model of ``spec``."""
    train_split, space = open_split(dataset, data_root, "train")
    check_classes(spec, class_names(train_split))
    train_set, _ = seeded_subset(train_split, train["n_train"], train["seed"])
    test_set, _ = open_split(dataset, data_root, "test")
    return train_set, test_set, space, build_model(spec)


def _resume_path(resume_file: str | Path | None) -> Path | None:
    """The per-epoch state file (its folder made), or None without one."""
    resume = Path(resume_file) if resume_file else None
    if resume is not None:
        resume.parent.mkdir(parents=True, exist_ok=True)
    return resume


def train_stage(
    *,
    spec: ModelSpec,
    dataset: Mapping[str, Any],
    train: Mapping[str, Any],
    data_root: str | Path,
    output: str | Path,
    resume_file: str | Path | None = None,
    resume_key: str = "",
    base_dir: str | Path | None = None,
    base_spec: ModelSpec | None = None,
) -> None:
    """Train one model of the grid and write its ``models/<model>/`` (:func:`write_model_dir`),
    starting from ``model.weights`` or, with ``base_dir``, from the exact weights of the base
    model there (refused unless its spec is ``base_spec``, the base this model's settings name)."""
    device = resolve_device()
    log.info("training %s (%s, %s %g) on %s", spec.name, spec.method, METHODS[spec.method].strength, spec.strength, device)
    train_set, test_set, space, model = _training_problem(spec, dataset, train, data_root)
    if base_dir is None:
        load_initial_weights(model, spec, data_root)  # a resumed run replaces them with its saved state
    else:
        model.load_state_dict(base_state(base_dir, base_spec))
    resume = _resume_path(resume_file)
    started = time.perf_counter()
    adversarial = AdversarialTraining.from_config(spec.strength, train["adversarial"]) if spec.method == ADVERSARIAL else None
    rows = fit(
        model, train_set, train, spec.penalty_weight, device=device, resume_file=resume, resume_key=resume_key, adversarial=adversarial, space=space
    )
    write_model_dir(model, spec, rows, output, test_set=test_set, train=train, seconds=time.perf_counter() - started)
    if resume is not None and resume.exists():
        resume.unlink()


def base_state(base_dir: str | Path, expected: ModelSpec | None) -> dict[str, torch.Tensor]:
    """The weights of the base model in ``base_dir`` (``models/base/``, manifest checked),
    refused when its spec is not ``expected``: a base of other settings is another model."""
    spec = load_spec(base_dir)
    if expected is not None and spec.to_json() != expected.to_json():
        raise StoreError(f"{base_dir} holds a base model of other settings than this run's pretrain section; delete it and rerun snakemake")
    return load_model(base_dir).state_dict()


def pretrain_stage(
    *,
    spec: ModelSpec,
    dataset: Mapping[str, Any],
    train: Mapping[str, Any],
    data_root: str | Path,
    output: str | Path,
    resume_file: str | Path | None = None,
    resume_key: str = "",
    whitening_images: int = 5000,
) -> None:
    """Train the base model (``train``: the pretrain recipe, no penalty) from ``model.weights``
    or a random initialization, and write its ``models/base/`` (:func:`write_model_dir`).

    A :class:`~saliency_robustness.architectures.WhitenedCNN` stem is first whitened on the
    first ``whitening_images`` training images (when it starts at random). With 0 epochs the
    initial weights are the base as they are (ImageNet: torchvision's ResNet50), measured on
    the test set like any model."""
    device = resolve_device()
    log.info("pretraining %s (%d epochs, no penalty) on %s with %d threads", spec.name, train["epochs"], device, torch.get_num_threads())
    train_set, test_set, space, model = _training_problem(spec, dataset, train, data_root)
    load_initial_weights(model, spec, data_root)
    if train["epochs"] > 0 and spec.weights is None:
        first = [train_set[i][0] for i in range(min(whitening_images, len(train_set)))]  # type: ignore[arg-type]
        if fit_whitening(model, torch.stack(first)):
            log.info("whitened the stem on %d training images", len(first))
    resume = _resume_path(resume_file)
    started = time.perf_counter()
    rows = fit(model, train_set, train, 0.0, device=device, resume_file=resume, resume_key=resume_key, space=space) if train["epochs"] else []
    model.to(device)
    write_model_dir(model, spec, rows, output, test_set=test_set, train=train, seconds=time.perf_counter() - started, untrained=not train["epochs"])
    if resume is not None and resume.exists():
        resume.unlink()


def train_vectorized_stage(
    *,
    specs: Sequence[ModelSpec],
    dataset: Mapping[str, Any],
    trains: Sequence[Mapping[str, Any]],
    data_root: str | Path,
    outputs: Sequence[str | Path],
) -> None:
    """Train the gradient-norm models of a grid as one vectorised stack (``train.vectorized``)
    and write each one's ``models/<model>/`` as :func:`train_stage` does. The models differ in
    lambda and seed only (``trains[m]`` is model ``m``'s train section)."""
    shared = [{k: v for k, v in t.items() if k != "seed"} for t in trains]
    if any(s != shared[0] for s in shared) or len({(s.architecture, json.dumps(s.architecture_options, sort_keys=True)) for s in specs}) != 1:
        raise ConfigError("train.vectorized: the models trained together must share architecture and training settings but lambda and seed")
    device = resolve_device()
    lams = [spec.penalty_weight for spec in specs]
    log.info("training %d models as one vectorised stack (lambdas %s) on %s", len(specs), ", ".join(f"{lam:g}" for lam in lams), device)
    train_split, _ = open_split(dataset, data_root, "train")
    check_classes(specs[0], class_names(train_split))
    subsets = [seeded_subset(train_split, t["n_train"], t["seed"])[0] for t in trains]
    test_set, _ = open_split(dataset, data_root, "test")
    models = [build_model(spec) for spec in specs]
    for model, spec in zip(models, specs):
        load_initial_weights(model, spec, data_root)
    started = time.perf_counter()
    logs = fit_vectorized(models, subsets, trains[0], lams, [t["seed"] for t in trains], device=device)
    seconds = time.perf_counter() - started
    for model, spec, rows, output in zip(models, specs, logs, outputs):
        write_model_dir(model.to(device), spec, rows, output, test_set=test_set, train=trains[0], seconds=seconds)
