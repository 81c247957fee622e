"""Bring your own models: an external checkpoint into ``models/<model>/``, without training.

The directory is the one the training stage writes (``model.pt``, ``spec.json`` with method
``external``, ``test_accuracy.json``, a manifest), so saliency, attacks, metrics, summary and
figures treat the model like a trained one (docs/spec.md §3). The weights come from a
``state_dict`` file read with ``weights_only=True`` into a registered or ``module:callable``
architecture, or from RobustBench's model zoo. A network that takes another input space
(``(pixel - offset) / scale``) is wrapped in an :class:`~saliency_robustness.architectures.InputAdapter`,
so that every quantity is measured in the evaluation store's input space, for every model alike.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from saliency_robustness.architectures import InputAdapter
from saliency_robustness.config import DATASET_CLASSES, resolve_path
from saliency_robustness.data import InputSpace, open_split
from saliency_robustness.errors import PipelineError, one_line
from saliency_robustness.fingerprints import external_weights_hash
from saliency_robustness.models import (
    ModelSpec,
    build_network,
    degenerate_reason,
    load_model,
    load_weights,
    read_state_dict,
    save_machine,
    save_model,
    save_performance,
    test_performance,
)
from saliency_robustness.runtime import eval_mode, machine, resolve_device
from saliency_robustness.stores import atomic_directory, open_store
from saliency_robustness.vocabulary import EXTERNAL
from saliency_robustness.zoo import load_robustbench

log = logging.getLogger(__name__)

# the logits of every evaluation image are checked before the model is written, this many at a time
CHECK_BATCH = 100


class ExternalModelError(PipelineError):
    """An external model that cannot be used, named by its config entry."""

    def __init__(self, name: str, reason: str) -> None:
        super().__init__(f"external model {name!r}: {reason}")


def per_channel(values: Sequence[float], channels: int, what: str, name: str) -> list[float]:
    """``values`` for each of ``channels`` channels (one value stands for all)."""
    values = [float(v) for v in values]
    if len(values) == 1:
        return values * channels
    if len(values) != channels:
        raise ExternalModelError(name, f"input_space.{what} has {len(values)} entries for {channels} image channels")
    return values


def input_adapter(entry: Mapping[str, Any], space: InputSpace, channels: int) -> dict[str, list[float]] | None:
    """The adapter from the evaluation store's space ``x = pixel - pixel_offset`` to what the
    network takes, ``(pixel - offset) / scale``: shift ``pixel_offset - offset``, scale
    ``1 / scale``. None when the network takes the store's space (a registered architecture
    without ``input_space``). RobustBench networks take the [0, 1] image."""
    if "robustbench" in entry:
        offset, scale = [0.0], [1.0]
    elif "input_space" in entry:
        offset, scale = entry["input_space"]["offset"], entry["input_space"]["scale"]
    else:
        return None
    name = entry["name"]
    data_offset = per_channel(space.pixel_offset, channels, "offset", name)
    offset, scale = per_channel(offset, channels, "offset", name), per_channel(scale, channels, "scale", name)
    return {"shift": [d - o for d, o in zip(data_offset, offset)], "scale": [1.0 / s for s in scale]}


def external_spec(entry: Mapping[str, Any], images_shape: Sequence[int], adapter: dict[str, list[float]] | None, num_classes: int) -> ModelSpec:
    """The spec that rebuilds the external model (before its logits are counted)."""
    _, channels, height, _ = images_shape
    robustbench = entry.get("robustbench")
    return ModelSpec(
        name=entry["name"],
        architecture="robustbench" if robustbench else entry["architecture"],
        method=EXTERNAL,
        strength=None,
        sensitivity=None,
        p=None,
        seed=0,  # nothing the pipeline drew: every external model is its own grid point
        num_classes=num_classes,
        in_channels=channels,
        image_size=height,
        architecture_options=(
            {k: robustbench[k] for k in ("name", "dataset", "threat_model")} if robustbench else dict(entry["options"])
        ),
        weights=None if robustbench else entry["weights"],
        input_adapter=adapter,
    )


def load_network(entry: Mapping[str, Any], spec: ModelSpec, data_root: str | Path) -> nn.Module:
    """The entry's network with its weights: through RobustBench's loader, or the spec's
    architecture with the ``state_dict`` file loaded strictly."""
    try:
        if "robustbench" in entry:
            return load_robustbench(entry["robustbench"], data_root)
        network = build_network(spec)
        path = resolve_path(entry["weights"], data_root)
        reason = load_weights(network, read_state_dict(path))
    except PipelineError as exc:  # a corrupt file, an unknown architecture, a missing extra: name the entry
        raise ExternalModelError(entry["name"], str(exc)) from None
    if reason:
        raise ExternalModelError(entry["name"], f"weights {path} do not fit architecture {spec.architecture}: {reason}")
    return network


@torch.no_grad()
def check_logits(model: nn.Module, images: torch.Tensor, name: str, num_classes: int | None, batch_size: int = CHECK_BATCH) -> torch.Tensor:
    """The model's logits on every one of ``images`` (in batches): one row per image, at least
    2 classes, finite, and ``num_classes`` wide when the entry says so."""
    with eval_mode(model):
        try:
            logits = torch.cat([model(batch) for batch in images.split(batch_size)])
        except Exception as exc:  # shape errors of many types
            raise ExternalModelError(name, f"fails on the evaluation images of shape {tuple(images.shape[1:])}: {one_line(exc)}") from None
    if logits.ndim != 2 or logits.shape[0] != len(images) or logits.shape[1] < 2:
        raise ExternalModelError(name, f"returns shape {tuple(logits.shape)} for {len(images)} images; expected (images, classes >= 2)")
    if num_classes is not None and logits.shape[1] != num_classes:
        raise ExternalModelError(name, f"returns {logits.shape[1]} logits, but num_classes is {num_classes}")
    bad = (~torch.isfinite(logits)).any(dim=1).nonzero().flatten()
    if len(bad):
        raise ExternalModelError(name, f"returns non-finite logits on {len(bad)} of {len(images)} evaluation images (first: sample {int(bad[0])})")
    return logits


def external_stage(
    *,
    entry: Mapping[str, Any],
    dataset: Mapping[str, Any],
    data_root: str | Path,
    eval_store: str | Path,
    output: str | Path,
    weights_sha256: str,
) -> None:
    """Write ``models/<model>/`` for the external model of ``entry`` (a ``models.external``
    item): its checked weights, spec and whole-test-split accuracy, atomically."""
    name = entry["name"]
    eval_ds = open_store(eval_store, ["images"])
    images = torch.from_numpy(eval_ds["images"].values).float()
    space = InputSpace.from_attrs(eval_ds.attrs)
    names = eval_ds.attrs.get("class_names")
    classes = len(names) if names else DATASET_CLASSES[dataset["kind"]]
    declared = entry.get("num_classes")
    spec = external_spec(entry, images.shape, input_adapter(entry, space, images.shape[1]), declared or classes)
    read_hash = external_weights_hash(entry, data_root)
    if read_hash != weights_sha256:
        raise ExternalModelError(name, "its weights file changed while the workflow ran; run snakemake again")
    network = load_network(entry, spec, data_root).float()
    adapter = spec.input_adapter
    model = InputAdapter(network, adapter["shift"], adapter["scale"]) if adapter else network
    logits = check_logits(model, images, name, declared)
    spec.num_classes = int(logits.shape[1])
    spec.weights_sha256 = read_hash
    if spec.num_classes != classes:
        raise ExternalModelError(name, f"returns {spec.num_classes} logits, but the dataset has {classes} classes")
    device = resolve_device()
    test_set, _ = open_split(dataset, data_root, "test")
    if len(test_set) == 0:  # type: ignore[arg-type]
        raise ExternalModelError(name, "the test split is empty: no test accuracy")
    accuracy, majority_share = test_performance(model.to(device), test_set, device=device, num_workers=0)
    log.info("%s: test accuracy %.4f on %d images", name, accuracy, len(test_set))  # type: ignore[arg-type]
    reason = degenerate_reason(accuracy, majority_share, spec.num_classes)
    if reason:
        log.warning("%s is degenerate: %s; its statistics are flagged and left out of the trends", name, reason)
    with atomic_directory(output) as tmp:
        save_machine(tmp, machine(device))
        save_model(model.cpu(), spec, tmp)
        save_performance(tmp, accuracy, majority_share, len(test_set))  # type: ignore[arg-type]
        reloaded = check_logits(load_model(tmp), images, name, spec.num_classes)
        if not torch.allclose(reloaded, logits, rtol=1e-5, atol=1e-5 * float(logits.abs().max()) + 1e-6):
            raise ExternalModelError(name, "rebuilt from its spec and saved weights, it computes other logits (a builder with hidden state?)")
    log.info("%s: %s with %d classes, weights sha256 %s", name, spec.architecture, spec.num_classes, read_hash[:16])
