"""Architectures (a small registry), the model spec, and saving/loading trained models.

A trained model lives in ``models/<model>/`` as a plain ``state_dict`` (``model.pt``,
loadable with ``torch.load(..., weights_only=True)``) beside ``spec.json``.

Natural-image models take the centered image ``x = pixel - mean`` (docs/spec.md §5); torchvision's
division by the per-channel std is their first layer (:class:`PerChannelScale`), so that
alignment and attacks see the same input space. Initial (pretrained) weights are applied
only when training starts (:func:`load_initial_weights`); trained models load from
their own checkpoint.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from saliency_robustness.errors import ConfigError, DataError, StoreError, one_line
from saliency_robustness.stores import check_manifest, write_manifest

CHECKPOINT = "model.pt"
SPEC = "spec.json"


class MnistCNN(nn.Module):
    """The authors' MNIST network (docs/spec.md §3): three conv 3x3 + ReLU + max-pool blocks
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
IMAGENET_STD = (0.229, 0.224, 0.225)


def register(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator adding a model builder to the registry under ``name``."""

    def add(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        ARCHITECTURES[name] = builder
        return builder

    return add


class PerChannelScale(nn.Module):
    """Multiplies channel ``c`` by ``scale[c]``: a linear layer without bias, so the model
    stays positively homogeneous up to its own biases (the decomposition of docs/spec.md §2)."""

    def __init__(self, scale: Sequence[float]) -> None:
        super().__init__()
        self.register_buffer("scale", torch.tensor([float(s) for s in scale], dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale


class CenteredInputModel(nn.Module):
    """``backbone(x / std)`` for a centered image ``x``: torchvision's normalization with the
    mean already subtracted by the data (the input space) and the std division as a layer."""

    def __init__(self, backbone: nn.Module, std: Sequence[float]) -> None:
        super().__init__()
        self.input_scale = PerChannelScale([1.0 / s for s in std])
        self.backbone = backbone

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(self.input_scale(x))


def _torchvision_resnet(
    block: type[nn.Module], layers: Sequence[int], *, in_channels: int, num_classes: int, input_std: Sequence[float], **options: Any
) -> nn.Module:
    from torchvision.models.resnet import ResNet

    net = ResNet(block, list(layers), num_classes=num_classes, **options)  # type: ignore[arg-type]
    if in_channels != 3:
        net.conv1 = nn.Conv2d(in_channels, net.conv1.out_channels, kernel_size=7, stride=2, padding=3, bias=False)
        nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")
    if len(input_std) != in_channels:
        raise ConfigError(f"model.options.input_std has {len(input_std)} entries for {in_channels} input channels")
    return CenteredInputModel(net, input_std)


@register("resnet50")
def resnet50(
    *, in_channels: int = 3, num_classes: int = 1000, image_size: int = 224, input_std: Sequence[float] = IMAGENET_STD, **options: Any
) -> nn.Module:
    """torchvision's ResNet50 on the centered image (any ``image_size``: it pools adaptively).
    Its torchvision weights (``model.weights: IMAGENET1K_V1`` / ``IMAGENET1K_V2``) expect
    the ImageNet mean subtracted by the data and the default ``input_std``."""
    from torchvision.models.resnet import Bottleneck

    return _torchvision_resnet(Bottleneck, (3, 4, 6, 3), in_channels=in_channels, num_classes=num_classes, input_std=input_std, **options)


@register("resnet_small")
def resnet_small(
    *,
    in_channels: int = 3,
    num_classes: int = 10,
    image_size: int = 32,
    blocks: Sequence[int] = (1, 1, 1, 1),
    input_std: Sequence[float] = IMAGENET_STD,
    **options: Any,
) -> nn.Module:
    """A torchvision ResNet of basic blocks (one per stage by default: a ResNet-10) for tests
    and quick runs; the same layer types as ResNet50, so every stage runs unchanged."""
    from torchvision.models.resnet import BasicBlock

    return _torchvision_resnet(BasicBlock, blocks, in_channels=in_channels, num_classes=num_classes, input_std=input_std, **options)


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
    weights: str | None = None  # initial weights of training (torchvision name or state_dict file)
    method: str = "gradnorm"  # how it was made robust: gradnorm (strength lam) or adversarial (strength epsilon)
    epsilon: float | None = None  # radius of the L2 PGD ball of adversarial training

    @property
    def strength(self) -> float:
        """The method's strength: lambda for gradnorm, the PGD radius epsilon for adversarial."""
        return self.lam if self.method == "gradnorm" else float(self.epsilon or 0.0)

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
        raise StoreError(f"cannot read model spec {path}: {one_line(exc)}") from None


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
    path = Path(weights).expanduser()
    path = path if path.is_absolute() else Path(data_root) / path
    if not path.is_file():
        raise DataError(f"model.weights {weights!r} is neither a torchvision weight name of {architecture} nor a file ({path} not found)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling errors of many types
        raise DataError(f"cannot read weights file {path} as a plain state_dict (weights_only=True): {one_line(exc)}") from None
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise DataError(f"weights file {path} does not hold a state_dict (a mapping of names to tensors)")
    return state


def load_initial_weights(model: nn.Module, spec: ModelSpec, data_root: Path | str = ".") -> None:
    """Initialize ``model`` from ``spec.weights`` (nothing when it is None).

    A file may hold this model's full ``state_dict`` (e.g. a ``model.pt`` of an earlier run)
    or, for :class:`CenteredInputModel`, the bare backbone's (torchvision's layout).
    """
    if spec.weights is None:
        return
    state = initial_state(spec.architecture, spec.weights, data_root)
    backbone = getattr(model, "backbone", None)
    target = backbone if isinstance(backbone, nn.Module) and set(state) == set(backbone.state_dict()) else model
    try:
        target.load_state_dict(state)
    except RuntimeError as exc:
        raise ConfigError(
            f"weights {spec.weights!r} do not fit {spec.architecture} with num_classes={spec.num_classes}, "
            f"in_channels={spec.in_channels}: {one_line(exc)}"
        ) from None
