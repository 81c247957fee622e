"""The model spec, building a model from it (architectures in ``architectures``), and the
model directory ``models/<model>/``: saving and loading trained models, their test accuracy
and the machine that made them.

A trained model lives there as a plain ``state_dict`` (``model.pt``, loadable with
``torch.load(..., weights_only=True)``) beside ``spec.json``. Initial (pretrained) weights are
applied only when training starts (:func:`load_initial_weights`); trained models load from
their own checkpoint.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from saliency_robustness import zoo
from saliency_robustness.architectures import ARCHITECTURES, InputAdapter
from saliency_robustness.config import resolve_path
from saliency_robustness.errors import ConfigError, DataError, StoreError, one_line
from saliency_robustness.runtime import progress
from saliency_robustness.stores import check_manifest, write_manifest
from saliency_robustness.vocabulary import CHECKPOINT, GRADNORM, MACHINE, PERFORMANCE, SPEC


@dataclass
class ModelSpec:
    """Everything needed to rebuild a trained model and to say how it was trained."""

    name: str
    architecture: str
    method: str  # how it was made robust: gradnorm, adversarial or external (vocabulary.METHODS)
    strength: float | None  # lambda (gradnorm), the PGD radius epsilon (adversarial); None: external
    sensitivity: str | None  # the penalised sensitivity (train.sensitivity); None: not trained here
    p: float | None  # the penalty's power of the gradient norm (train.p); None: not trained here
    seed: int
    num_classes: int
    in_channels: int
    image_size: int
    architecture_options: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    weights: str | None = None  # initial weights of training (torchvision name or state_dict file)
    input_adapter: dict[str, list[float]] | None = None  # external networks: InputAdapter's shift and scale
    weights_sha256: str | None = None  # external models: content hash of the weights read

    @property
    def penalty_weight(self) -> float:
        """The gradient-norm penalty's weight lambda in the training loss (0 unless gradnorm)."""
        return float(self.strength) if self.method == GRADNORM and self.strength is not None else 0.0

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ModelSpec:
        return cls(**json.loads(text))


# a model that puts at least this share of images into one class has collapsed
DEGENERATE_CLASS_SHARE = 0.9
# a model whose accuracy is at most this multiple of chance (1 / classes) has not learned
DEGENERATE_CHANCE_FACTOR = 2.0


def degenerate_reason(accuracy: float, majority_class_share: float, num_classes: int) -> str | None:
    """Why a trained model is degenerate (predicts one class for nearly all images, or is
    near chance), or None when it is not. Its robustness and alignment say nothing about the
    regularizer, so the statistics across models leave it out."""
    chance = 1.0 / num_classes
    if majority_class_share >= DEGENERATE_CLASS_SHARE:
        return f"{majority_class_share:.0%} of images predicted as one class"
    if accuracy <= DEGENERATE_CHANCE_FACTOR * chance:
        return f"accuracy {accuracy:.3f} is near chance ({chance:.3f})"
    return None


def build_network(spec: ModelSpec) -> nn.Module:
    """A freshly initialised network of the spec's architecture (seeded by ``spec.seed``): a
    registered one, built for the spec's channels, image size and classes; ``module:callable``,
    called with the architecture options only; or RobustBench's (``robustbench``)."""
    torch.manual_seed(spec.seed)
    if spec.architecture == "robustbench":
        return zoo.robustbench_network(**spec.architecture_options)
    if ":" in spec.architecture:
        builder = zoo.import_callable(spec.architecture)
        try:
            network = builder(**spec.architecture_options)
        except Exception as exc:  # whatever the user's builder raises
            raise ConfigError(f"architecture {spec.architecture!r} failed with options {spec.architecture_options}: {one_line(exc)}") from None
        if not isinstance(network, nn.Module):
            raise ConfigError(f"architecture {spec.architecture!r} returned a {type(network).__name__}, not a torch.nn.Module")
        return network
    try:
        builder = ARCHITECTURES[spec.architecture]
    except KeyError:
        raise ConfigError(f"unknown architecture {spec.architecture!r} (known: {', '.join(ARCHITECTURES)}, or module:callable)") from None
    return builder(in_channels=spec.in_channels, num_classes=spec.num_classes, image_size=spec.image_size, **spec.architecture_options)


def build_model(spec: ModelSpec) -> nn.Module:
    """A freshly initialised model of the spec: its network, behind the input adapter of an
    external network that takes another input space."""
    network = build_network(spec)
    if spec.input_adapter is None:
        return network
    return InputAdapter(network, spec.input_adapter["shift"], spec.input_adapter["scale"])


def save_model(model: nn.Module, spec: ModelSpec, directory: Path | str) -> None:
    """Write ``model.pt`` and ``spec.json`` into ``directory``, with a manifest of their sizes
    and hashes (a damaged checkpoint is then refused by :func:`load_model`)."""
    directory = Path(directory)
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    torch.save(state, directory / CHECKPOINT)
    (directory / SPEC).write_text(spec.to_json())
    write_manifest(directory)


def load_spec(model_dir: Path | str) -> ModelSpec:
    path = Path(model_dir) / SPEC
    try:
        return ModelSpec.from_json(path.read_text())
    except (OSError, ValueError, TypeError) as exc:
        raise StoreError(f"cannot read model spec {path}: {one_line(exc)}; delete {model_dir} and rerun snakemake (it retrains the model)") from None


def load_model(model_dir: Path | str, device: torch.device | str = "cpu") -> nn.Module:
    """The trained model in ``model_dir`` (``models/<model>/``), in eval mode, on ``device``."""
    fix = f"delete {model_dir} and rerun snakemake (it retrains the model)"
    check_manifest(Path(model_dir), "model directory", fix)
    spec = load_spec(model_dir)
    model = build_model(spec)
    path = Path(model_dir) / CHECKPOINT
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(state)
    except Exception as exc:  # unpickling and shape errors of many types
        raise StoreError(f"cannot load checkpoint {path}: {one_line(exc)}; {fix}") from None
    return model.to(device).eval()


def torchvision_weights(architecture: str, name: str) -> Any | None:
    """torchvision's weight entry ``name`` (e.g. ``IMAGENET1K_V2``) of ``architecture``, or None."""
    from torchvision.models import get_model_weights

    try:
        return get_model_weights(architecture).__members__.get(name)
    except (ValueError, KeyError):  # not a torchvision architecture
        return None


def initial_state(architecture: str, weights: str, data_root: Path | str = ".") -> Mapping[str, torch.Tensor]:
    """The ``state_dict`` that ``model.weights`` names: a torchvision weight of the
    architecture (downloaded once into torch's hub cache), else a local file (relative
    paths are taken from ``data_root``), read with ``weights_only=True``."""
    entry = torchvision_weights(architecture, weights)
    if entry is not None:
        try:
            return entry.get_state_dict(progress=False, check_hash=True, map_location="cpu", weights_only=True)
        except Exception as exc:  # offline: URLError, OSError, ...
            raise DataError(
                f"cannot get torchvision weights {architecture} {weights} ({one_line(exc)}); offline, save them "
                "with torch.save(state_dict, file) elsewhere and set model.weights to that file"
            ) from None
    path = resolve_path(weights, data_root)
    if not path.is_file():
        raise DataError(f"model.weights {weights!r} is neither a torchvision weight name of {architecture} nor a file ({path} not found)")
    return read_state_dict(path)


# keys under which checkpoints often nest the state_dict beside other entries (epoch, optimizer)
NESTED_STATE_KEYS = ("state_dict", "model_state_dict", "model")


def read_state_dict(path: Path) -> Mapping[str, torch.Tensor]:
    """The ``state_dict`` in ``path``, read with ``weights_only=True``: the file's mapping of
    names to tensors, or such a mapping under one of :data:`NESTED_STATE_KEYS`."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling errors of many types
        raise DataError(f"cannot read weights file {path} as a plain state_dict (weights_only=True): {one_line(exc)}") from None

    def is_state(value: Any) -> bool:
        return isinstance(value, Mapping) and bool(value) and all(isinstance(v, torch.Tensor) for v in value.values())

    if isinstance(state, Mapping) and not is_state(state):
        state = next((state[k] for k in NESTED_STATE_KEYS if is_state(state.get(k))), state)
    if not is_state(state):
        raise DataError(f"weights file {path} does not hold a state_dict (a mapping of names to tensors)")
    return state


def _listed(keys: Sequence[str], limit: int = 3) -> str:
    shown = ", ".join(keys[:limit])
    return f"{shown} (+{len(keys) - limit} more)" if len(keys) > limit else shown


def state_mismatch(model: nn.Module, state: Mapping[str, torch.Tensor]) -> str | None:
    """Why ``state`` does not fit ``model`` (missing or unexpected keys, a shape mismatch), in
    a few words; None when it fits."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        parts = ([f"missing keys {_listed(missing)}"] if missing else []) + ([f"unexpected keys {_listed(unexpected)}"] if unexpected else [])
        return "; ".join(parts)
    for key, value in expected.items():
        if value.shape != state[key].shape:
            return f"shape mismatch at {key}: the file has {tuple(state[key].shape)}, the model {tuple(value.shape)}"
    return None


def load_initial_weights(model: nn.Module, spec: ModelSpec, data_root: Path | str = ".") -> None:
    """Initialize ``model`` from ``spec.weights`` (nothing when it is None).

    A file may hold this model's full ``state_dict`` (e.g. a ``model.pt`` of an earlier run)
    or, for :class:`CenteredInputModel`, the bare backbone's (torchvision's layout).
    """
    if spec.weights is None:
        return
    state = initial_state(spec.architecture, spec.weights, data_root)
    reason = load_weights(model, state)
    if reason:
        raise ConfigError(
            f"weights {spec.weights!r} do not fit {spec.architecture} with num_classes={spec.num_classes}, in_channels={spec.in_channels}: {reason}"
        )


def load_weights(model: nn.Module, state: Mapping[str, torch.Tensor]) -> str | None:
    """Load ``state`` into ``model``, or for :class:`CenteredInputModel` into its bare backbone
    when the keys are the backbone's (torchvision's layout). Returns why it does not fit
    (nothing is loaded then), or None."""
    backbone = getattr(model, "backbone", None)
    target = backbone if isinstance(backbone, nn.Module) and set(state) == set(backbone.state_dict()) else model
    reason = state_mismatch(target, state)
    if reason is None:
        target.load_state_dict(state)
    return reason


@torch.no_grad()
def test_performance(model: nn.Module, ds: Dataset, *, device: torch.device, num_workers: int, batch_size: int = 500) -> tuple[float, float]:
    """Clean accuracy of ``model`` (put in eval mode) on every sample of ``ds``, and the share
    of samples predicted as its most frequent class."""
    model.eval()
    correct = total = 0
    counts: torch.Tensor | None = None
    loader = DataLoader(ds, batch_size=batch_size, num_workers=num_workers, pin_memory=device.type == "cuda")
    for x, y in progress(loader, desc="test accuracy", unit="batch"):
        logits = model(x.to(device, non_blocking=True)).cpu()
        pred = logits.argmax(1)
        correct += int((pred == y).sum())
        total += len(y)
        batch_counts = torch.bincount(pred, minlength=logits.shape[1])
        counts = batch_counts if counts is None else counts + batch_counts
    return correct / total, (float(counts.max()) / total if counts is not None else float("nan"))




def save_machine(directory: Path | str, record: Mapping[str, Any]) -> None:
    """Write a model directory's ``machine.json``: what produced the model (``runtime.machine``)."""
    (Path(directory) / MACHINE).write_text(json.dumps(dict(record), indent=2, sort_keys=True))


def read_machine(model_dir: Path | str) -> dict[str, Any]:
    """The machine a model was trained (or imported) on."""
    path = Path(model_dir) / MACHINE
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise StoreError(f"cannot read {path} ({one_line(exc)}); delete {model_dir} and rerun") from None
    if not isinstance(record, dict):
        raise StoreError(f"{path} is not a machine record; delete {model_dir} and rerun")
    return record


def save_performance(directory: Path, accuracy: float, majority_class_share: float, images: int, **extra: float) -> None:
    """Write a model directory's ``test_accuracy.json`` (the summary's test accuracy and the
    degenerate check read it)."""
    record = {"test_accuracy": accuracy, "majority_class_share": majority_class_share, "test_images": images, **extra}
    (Path(directory) / PERFORMANCE).write_text(json.dumps(record, indent=2))


def read_test_accuracy(model_dir: str | Path) -> tuple[float, float]:
    """The clean test accuracy and the majority-class share of the test predictions that
    :func:`save_performance` wrote (what the train stage's degenerate warning used)."""
    path = Path(model_dir) / PERFORMANCE
    try:
        performance = json.loads(path.read_text())
        return float(performance["test_accuracy"]), float(performance["majority_class_share"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise StoreError(f"cannot read the test accuracy {path} ({one_line(exc)}); delete {model_dir} and rerun") from None
