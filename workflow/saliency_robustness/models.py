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
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from saliency_robustness import zoo
from saliency_robustness.config import EXTERNAL, resolve_path
from saliency_robustness.errors import ConfigError, DataError, StoreError, one_line
from saliency_robustness.runtime import progress
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


class PerChannelShift(nn.Module):
    """Adds ``bias[c]`` to channel ``c``: a bias-like constant (the metrics' decomposition counts it)."""

    def __init__(self, shift: Sequence[float]) -> None:
        super().__init__()
        self.register_buffer("bias", torch.tensor([float(s) for s in shift], dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.bias.view(1, -1, *([1] * (x.ndim - 2)))


class InputAdapter(nn.Module):
    """``network((x + shift) * scale)``: an external network that takes ``(pixel - offset) / std``
    on the pipeline's input space ``x = pixel - pixel_offset`` (``shift = pixel_offset - offset``,
    ``scale = 1 / std``). Without a shift it stays positively homogeneous up to its own biases."""

    def __init__(self, network: nn.Module, shift: Sequence[float], scale: Sequence[float]) -> None:
        super().__init__()
        self.input_shift = PerChannelShift(shift) if any(float(s) != 0.0 for s in shift) else nn.Identity()
        self.input_scale = PerChannelScale(scale)
        self.network = network

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.network(self.input_scale(self.input_shift(x)))


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


class PreActBlock(nn.Module):
    """A pre-activation basic block (He et al. 2016): BN-ReLU-conv3x3-BN-ReLU-conv3x3 plus the
    identity, or a bias-free 1x1 convolution of the pre-activated input where the shape changes."""

    def __init__(self, in_width: int, width: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_width)
        self.conv1 = nn.Conv2d(in_width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=1, padding=1, bias=False)
        self.shortcut = nn.Conv2d(in_width, width, 1, stride=stride, bias=False) if stride != 1 or in_width != width else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(x))
        skip = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(torch.relu(self.bn2(out)))
        return out + skip


class PreActResNet(nn.Module):
    """A pre-activation ResNet for small images: a 3x3 stride-1 stem (no 7x7 stride-2 stem and
    no max-pool, which would leave a 32x32 image 8x8 after the first layer), one stage per
    width (the first at full resolution, each later one halving it), a final BN-ReLU, global
    average pooling and a dense layer. Every layer is linear or ReLU up to its bias, and batch
    norm in eval mode is the affine map ``gamma (h - mu) / sigma + beta``: its shift
    ``beta - gamma mu / sigma`` is a bias of the homogeneous decomposition (docs/spec.md §2)."""

    def __init__(self, in_channels: int, num_classes: int, widths: Sequence[int], blocks: Sequence[int]) -> None:
        super().__init__()
        if len(widths) != len(blocks) or not widths:
            raise ConfigError(f"model.options widths {list(widths)} and blocks {list(blocks)} need one entry per stage")
        self.stem = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False)
        layers: list[nn.Module] = []
        in_width = widths[0]
        for stage, (width, count) in enumerate(zip(widths, blocks, strict=True)):
            for block in range(count):
                layers.append(PreActBlock(in_width, width, stride=2 if stage > 0 and block == 0 else 1))
                in_width = width
        self.stages = nn.Sequential(*layers)
        self.bn = nn.BatchNorm2d(in_width)
        self.fc = nn.Linear(in_width, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn(self.stages(self.stem(x))))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(out, 1), 1))


# CIFAR-10's per-channel pixel std (the JPEG copy's, within 0.002 of the binary release's)
CIFAR10_STD = (0.242, 0.241, 0.257)


@register("preact_resnet")
def preact_resnet(
    *,
    in_channels: int = 3,
    num_classes: int = 10,
    image_size: int = 32,
    widths: Sequence[int] = (16, 32, 64),
    blocks: Sequence[int] = (1, 1, 1),
    input_std: Sequence[float] = CIFAR10_STD,
) -> nn.Module:
    """A CIFAR-style pre-activation ResNet (:class:`PreActResNet`, 3x3 stem) on the centered
    image, the std division its bias-free first layer (any ``image_size``: it pools adaptively).
    The defaults (widths 16-32-64, one block per stage: 8 conv layers) were chosen from
    measured training throughput on a 2-core CPU (tests/benchmarks/bench_training.py)."""
    if len(input_std) != in_channels:
        raise ConfigError(f"model.options.input_std has {len(input_std)} entries for {in_channels} input channels")
    return CenteredInputModel(PreActResNet(in_channels, num_classes, widths, blocks), input_std)


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
    method: str = "gradnorm"  # how it was made robust: gradnorm (strength lam), adversarial (strength epsilon), external
    epsilon: float | None = None  # radius of the L2 PGD ball of adversarial training
    input_adapter: dict[str, list[float]] | None = None  # external networks: InputAdapter's shift and scale
    weights_sha256: str | None = None  # external models: content hash of the weights read

    @property
    def strength(self) -> float:
        """The method's strength: lambda for gradnorm, the PGD radius epsilon for adversarial,
        NaN for an external model (nothing the pipeline set)."""
        if self.method == EXTERNAL:
            return math.nan
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
def test_performance(model: nn.Module, ds: Dataset, *, device: torch.device, batch_size: int = 500, num_workers: int = 0) -> tuple[float, float]:
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


PERFORMANCE = "test_accuracy.json"
MACHINE = "machine.json"


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
