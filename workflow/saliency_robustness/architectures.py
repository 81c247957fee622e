"""The architectures the pipeline builds by name (``model.architecture``): a small registry,
and the input layers that keep every model in the input space of docs/spec.md §5.

Natural-image models take the centered image ``x = pixel - mean``; torchvision's division by
the per-channel std is their first layer (:class:`PerChannelScale`), so that alignment and
attacks see the same input space.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from saliency_robustness.errors import ConfigError


class MnistCNN(nn.Module):
    """The authors' MNIST network (docs/spec.md §3): three conv 3x3 + ReLU + max-pool blocks
    (32, 64, 128 channels), dense 128 + ReLU, dropout 0.5, dense to the logits."""

    def __init__(self, *, in_channels: int, num_classes: int, image_size: int) -> None:
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
    *, in_channels: int, num_classes: int, image_size: int, input_std: Sequence[float] = IMAGENET_STD, **options: Any
) -> nn.Module:
    """torchvision's ResNet50 on the centered image (any ``image_size``: it pools adaptively).
    Its torchvision weights (``model.weights: IMAGENET1K_V1`` / ``IMAGENET1K_V2``) expect
    the ImageNet mean subtracted by the data and the default ``input_std``."""
    from torchvision.models.resnet import Bottleneck

    return _torchvision_resnet(Bottleneck, (3, 4, 6, 3), in_channels=in_channels, num_classes=num_classes, input_std=input_std, **options)


@register("resnet_small")
def resnet_small(
    *,
    in_channels: int,
    num_classes: int,
    image_size: int,
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
    in_channels: int,
    num_classes: int,
    image_size: int,
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
