"""Architectures (a small registry), the model spec, and saving/loading trained models.

A trained model lives in ``models/<model>/`` as a plain ``state_dict`` (``model.pt``,
loadable with ``torch.load(..., weights_only=True)``) beside ``spec.json``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from saliency_robustness.errors import StoreError

CHECKPOINT = "model.pt"
SPEC = "spec.json"


class MnistCNN(nn.Module):
    """The authors' MNIST network (SPEC §3): three conv 3x3 + ReLU + max-pool blocks
    (32, 64, 128 channels), dense 128 + ReLU, dropout 0.5, dense to the logits."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, image_size: int = 28) -> None:
        super().__init__()
        blocks: list[nn.Module] = []
        channels = in_channels
        for width in (32, 64, 128):
            blocks += [nn.Conv2d(channels, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
            channels = width
        self.features = nn.Sequential(*blocks)
        side = image_size // 2 // 2 // 2
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(128 * side * side, 128),
            nn.ReLU(),
            nn.Dropout(0.5),
            nn.Linear(128, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {"mnist_cnn": MnistCNN}


def register(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator adding a model builder to the registry under ``name``."""

    def add(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        ARCHITECTURES[name] = builder
        return builder

    return add


@dataclass
class ModelSpec:
    """Everything needed to rebuild a trained model and to say how it was trained."""

    name: str
    architecture: str
    lam: float
    sensitivity: str = "loss"
    p: float = 2.0
    seed: int = 0
    num_classes: int = 10
    in_channels: int = 1
    image_size: int = 28
    architecture_options: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ModelSpec:
        return cls(**json.loads(text))


def build_model(spec: ModelSpec) -> nn.Module:
    """A freshly initialised model of the spec's architecture (seeded by ``spec.seed``)."""
    try:
        builder = ARCHITECTURES[spec.architecture]
    except KeyError:
        raise StoreError(f"unknown architecture {spec.architecture!r} (known: {', '.join(ARCHITECTURES)})") from None
    torch.manual_seed(spec.seed)
    return builder(
        in_channels=spec.in_channels,
        num_classes=spec.num_classes,
        image_size=spec.image_size,
        **spec.architecture_options,
    )


def save_model(model: nn.Module, spec: ModelSpec, directory: Path | str) -> None:
    directory = Path(directory)
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    torch.save(state, directory / CHECKPOINT)
    (directory / SPEC).write_text(spec.to_json())


def load_spec(model_dir: Path | str) -> ModelSpec:
    path = Path(model_dir) / SPEC
    try:
        return ModelSpec.from_json(path.read_text())
    except (OSError, ValueError, TypeError) as exc:
        raise StoreError(f"cannot read model spec {path}: {exc}".splitlines()[0]) from None


def load_model(model_dir: Path | str, device: torch.device | str = "cpu") -> nn.Module:
    """The trained model in ``model_dir`` (``models/<model>/``), in eval mode, on ``device``."""
    spec = load_spec(model_dir)
    model = build_model(spec)
    path = Path(model_dir) / CHECKPOINT
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(state)
    except (OSError, RuntimeError, EOFError) as exc:
        raise StoreError(f"cannot load checkpoint {path}: {exc}".splitlines()[0]) from None
    return model.to(device).eval()
