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


class ConvPoolBlock(nn.Module):
    """conv3x3 - max-pool 2 - BN - ReLU - conv3x3 - BN - ReLU (bias-free convolutions): one
    resolution stage of :class:`WhitenedCNN`."""

    def __init__(self, in_width: int, width: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_width, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(nn.functional.max_pool2d(self.conv1(x), 2)))
        return torch.relu(self.bn2(self.conv2(x)))


class WhitenedCNN(nn.Module):
    """A fast-training CIFAR network in the manner of Jordan's airbench (arXiv 2404.00498),
    with ReLU instead of GELU: a frozen, bias-free 2x2 patch-whitening convolution, one
    :class:`ConvPoolBlock` per width, a global max-pool and a bias-free dense layer.

    Every layer is linear without bias, ReLU, max-pool (positively homogeneous) or batch norm
    (in eval mode an affine map whose shift is a bias of the decomposition of docs/spec.md §2),
    so Psi(x) = <x, grad Psi(x)> + sum_b <b, dPsi/db> holds exactly. The whitening weights
    come from the training images (:meth:`whiten`, called once before the base model trains);
    until then the stem is a random projection.
    """

    def __init__(self, in_channels: int, num_classes: int, widths: Sequence[int], whitening_eps: float) -> None:
        super().__init__()
        if not widths:
            raise ConfigError("model.options.widths needs at least one entry")
        patch = in_channels * 2 * 2
        self.stem = nn.Conv2d(in_channels, 2 * patch, 2, bias=False)
        self.stem.weight.requires_grad_(False)
        self.whitening_eps = whitening_eps
        blocks: list[nn.Module] = []
        in_width = 2 * patch
        for width in widths:
            blocks.append(ConvPoolBlock(in_width, width))
            in_width = width
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(in_width, num_classes, bias=False)

    @torch.no_grad()
    def whiten(self, images: torch.Tensor) -> None:
        """Set the stem to the whitening of the 2x2 patches of ``images`` (N x C x H x W, the
        network's input): the patch covariance's eigenvectors scaled by 1 / sqrt(eigenvalue +
        eps), each filter and its negative (so a ReLU later keeps both signs)."""
        c = images.shape[1]
        patches = images.double().unfold(2, 2, 1).unfold(3, 2, 1).permute(0, 2, 3, 1, 4, 5).reshape(-1, c * 4)
        covariance = patches.T @ patches / len(patches)
        eigenvalues, eigenvectors = torch.linalg.eigh(covariance)
        filters = (eigenvectors / torch.sqrt(eigenvalues.clamp_min(0) + self.whitening_eps)).T.reshape(c * 4, c, 2, 2)
        self.stem.weight.copy_(torch.cat([filters, -filters]).to(self.stem.weight))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.blocks(self.stem(x))
        return self.fc(torch.amax(out, dim=(2, 3)))


@register("whitened_cnn")
def whitened_cnn(
    *,
    in_channels: int,
    num_classes: int,
    image_size: int,
    widths: Sequence[int] = (32, 64, 128),
    whitening_eps: float = 5e-4,
    input_std: Sequence[float] = CIFAR10_STD,
) -> nn.Module:
    """:class:`WhitenedCNN` on the centered image, the std division its bias-free first layer.
    The widths 32-64-128 were chosen from measured accuracy per CPU-second (docs/cifar10.md)."""
    if len(input_std) != in_channels:
        raise ConfigError(f"model.options.input_std has {len(input_std)} entries for {in_channels} input channels")
    return CenteredInputModel(WhitenedCNN(in_channels, num_classes, widths, whitening_eps), input_std)


def whitening_layer(model: nn.Module) -> WhitenedCNN | None:
    """The :class:`WhitenedCNN` inside ``model`` (whose stem needs the training images), if any."""
    return next((m for m in model.modules() if isinstance(m, WhitenedCNN)), None)


@torch.no_grad()
def fit_whitening(model: nn.Module, images: torch.Tensor) -> bool:
    """Whiten the stem of the :class:`WhitenedCNN` inside ``model`` on ``images`` (the model's
    input), as the network sees them after whatever comes before it (``CenteredInputModel``'s
    std division). False when ``model`` has no such stem."""
    net = whitening_layer(model)
    if net is None:
        return False
    seen: list[torch.Tensor] = []
    handle = net.register_forward_pre_hook(lambda _module, args: seen.append(args[0]))
    was_training = model.training
    try:
        model.eval()(images)
    finally:
        handle.remove()
        model.train(was_training)
    net.whiten(seen[0])
    return True
