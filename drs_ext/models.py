"""Base classifier architectures and the name -> constructor registry that checkpoints use.

A checkpoint stores an architecture name and its keyword arguments (drs_ext/io/checkpoint.py), so
every constructor here takes only JSON-like keyword arguments plus ``num_classes`` and
``in_channels``. Register a new architecture with :func:`register_arch` to make it loadable.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

__all__ = [
    "ARCHS",
    "CifarResNet",
    "DigitsCNN",
    "Normalize",
    "SELECTOR_ARCHS",
    "SigmaSelectorCNN",
    "build_model",
    "build_selector",
    "register_arch",
    "unwrap_normalize",
]

ArchFactory = Callable[..., nn.Module]
ARCHS: dict[str, ArchFactory] = {}


def register_arch(name: str) -> Callable[[ArchFactory], ArchFactory]:
    """Decorator: make ``factory(num_classes=..., in_channels=..., **kwargs)`` loadable by name."""

    def decorate(factory: ArchFactory) -> ArchFactory:
        if name in ARCHS:
            raise ValueError(f"architecture {name!r} is already registered")
        ARCHS[name] = factory
        return factory

    return decorate


class Normalize(nn.Module):
    """Per-channel (x - mean) / std as the model's first layer.

    Cohen et al. normalise inside the model so that noise is added in [0, 1] pixel space, where
    σ has its usual meaning; the same holds here because noisy_views runs before this layer.
    """

    def __init__(self, net: nn.Module, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        if len(mean) != len(std) or any(s <= 0 for s in std):
            raise ValueError(
                f"normalization needs equal-length mean/std with std > 0, got {mean}, {std}"
            )
        self.net = net
        # Not persistent: the checkpoint's "normalization" field carries them, and the state dict
        # stays the plain network's so it loads with or without this wrapper.
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - self.mean) / self.std)


def unwrap_normalize(model: nn.Module) -> nn.Module:
    """The network inside a :class:`Normalize` wrapper (the module whose state dict is saved)."""
    return model.net if isinstance(model, Normalize) else model


def build_model(
    arch: str,
    *,
    num_classes: int,
    in_channels: int,
    arch_kwargs: dict | None = None,
    normalization: dict | None = None,
) -> nn.Module:
    """Instantiate a registered architecture, wrapped in :class:`Normalize` when asked.

    ``normalization`` is ``{"mean": [...], "std": [...]}`` (one value per channel) or None.
    """
    if arch not in ARCHS:
        raise ValueError(f"unknown architecture {arch!r}; registered: {sorted(ARCHS)}")
    net = ARCHS[arch](num_classes=num_classes, in_channels=in_channels, **(arch_kwargs or {}))
    if normalization is None:
        return net
    return Normalize(net, normalization["mean"], normalization["std"])


def _conv_bn(cin: int, cout: int, stride: int) -> list[nn.Module]:
    return [
        nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    ]


@register_arch("digits_cnn")
class DigitsCNN(nn.Sequential):
    """Small CNN for 32×32 inputs: three stride-2 conv blocks and a linear head.

    Sized for CPU certification, where each certificate costs ~10^3-10^5 forward passes: the
    stride-2 convolutions keep it at ~0.6 MMAC per image with width 16.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 16) -> None:
        super().__init__(
            *_conv_bn(in_channels, width, 2),
            *_conv_bn(width, 2 * width, 2),
            *_conv_bn(2 * width, 4 * width, 2),
            nn.AdaptiveAvgPool2d(2),
            nn.Flatten(),
            nn.Linear(16 * width, num_classes),
        )


class _BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


@register_arch("cifar_resnet")
class CifarResNet(nn.Module):
    """He et al. (2016)'s CIFAR ResNet with depth 6k+2 (20, 32, 44, 56, 110).

    resnet110 is the base classifier of Cohen et al. (2019) and of Xia et al.'s CIFAR-10 tables.
    """

    def __init__(
        self, num_classes: int = 10, in_channels: int = 3, depth: int = 20, width: int = 16
    ) -> None:
        super().__init__()
        if depth < 8 or (depth - 2) % 6 != 0:
            raise ValueError(f"cifar_resnet depth must be 6k + 2 with k >= 1, got {depth}")
        blocks_per_stage = (depth - 2) // 6
        self.stem = nn.Sequential(*_conv_bn(in_channels, width, 1))
        layers: list[nn.Module] = []
        cin = width
        for stage in range(3):
            cout = width * 2**stage
            for b in range(blocks_per_stage):
                layers.append(_BasicBlock(cin, cout, 2 if stage > 0 and b == 0 else 1))
                cin = cout
        self.layers = nn.Sequential(*layers)
        self.head = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.layers(self.stem(x)))


class SigmaSelectorCNN(nn.Module):
    """A noise-level selector h(x, λ) -> σ in (sigma_min, sigma_max) (the σ-selector of Hase et
    al., "Variational Randomized Smoothing for Sample-Wise Adversarial Robustness"; their
    architecture is not published).

    Three stride-2 conv blocks pooled to a feature vector; λ in [0, 1], the weight of the KL
    term the selector was trained with (drs_ext/train/sigma_selector.py), joins that vector as
    one more input of a two-layer head, so one network serves every λ. The head's output z
    becomes σ = sigma_min + (sigma_max − sigma_min)·sigmoid(z): clipped by construction and
    differentiable everywhere. No batch norm: the output of one image never depends on the
    others of its batch, in training as at certification.
    """

    def __init__(
        self,
        in_channels: int = 1,
        width: int = 8,
        sigma_min: float = 0.12,
        sigma_max: float = 1.0,
        hidden: int = 32,
    ) -> None:
        super().__init__()
        if not 0.0 < sigma_min < sigma_max:
            raise ValueError(
                f"need 0 < sigma_min < sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}"
            )
        self.sigma_min, self.sigma_max = float(sigma_min), float(sigma_max)
        layers: list[nn.Module] = []
        cin = in_channels
        for cout in (width, 2 * width, 4 * width):
            layers += [nn.Conv2d(cin, cout, 3, stride=2, padding=1), nn.ReLU(inplace=True)]
            cin = cout
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Sequential(
            nn.Linear(cin + 1, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, 1)
        )

    def forward(self, x: torch.Tensor, lam: torch.Tensor | float) -> torch.Tensor:
        """(B,) σ for images x (B, C, H, W) and λ: a float or a (B,) / 0-d tensor."""
        lam_t = torch.as_tensor(lam, dtype=x.dtype, device=x.device).expand(x.shape[0])
        z = self.head(torch.cat([self.features(x), lam_t[:, None]], dim=1))[:, 0]
        return self.sigma_min + (self.sigma_max - self.sigma_min) * torch.sigmoid(z)


SELECTOR_ARCHS: dict[str, Callable[..., nn.Module]] = {"sigma_selector_cnn": SigmaSelectorCNN}


def build_selector(arch: str, **kwargs: object) -> nn.Module:
    """A σ-selector by registry name (selector checkpoints store the name and its kwargs)."""
    if arch not in SELECTOR_ARCHS:
        raise ValueError(f"unknown selector architecture {arch!r}; known: {sorted(SELECTOR_ARCHS)}")
    return SELECTOR_ARCHS[arch](**kwargs)
