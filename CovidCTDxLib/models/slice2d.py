"""2D per-slice encoders: one CT slice (1 × H × W, values 0..1) → one feature vector.

Two backbones behind one factory, :func:`build_slice_encoder`:

* ``"resnet50"`` — the paper setting. RACNet's baseline is a CNN-RNN whose CNN is an
  ImageNet-style ResNet-50 and COVID-CTset uses ResNet50V2; we write the standard
  bottleneck ResNet-50 (He et al. 2016: stages of 3, 4, 6, 3 bottlenecks, widths
  256/512/1024/2048, stride in the 3×3 conv as in "ResNet v1.5") with plain ``torch.nn``
  (torchvision is deliberately not a dependency). Input has one channel (HU-windowed CT),
  not three RGB channels; no pretrained weights are shipped or downloaded.
* ``"small"`` — a CPU-sized CNN (four stride-2 conv stages, BatchNorm) for the demo
  weights and for ≤ 3 s inference on a 300-slice scan.

Why BatchNorm and not GroupNorm: severity is "how much of the lung is abnormal", i.e. how
much of each feature map is active. GroupNorm subtracts every slice's own spatial mean per
channel group and so removes much of that quantity; in our phantom runs the GroupNorm
variant stayed at chance for ~100 steps while the BatchNorm one learned. Batch independence still holds where
it matters: RACNet feeds the CNN only *valid* slices (never padding), and in ``eval()``
mode BatchNorm uses its running statistics, so a slice's feature does not depend on which
other slices or scans share its batch.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


class SmallSliceCNN(nn.Module):
    """Four stride-2 stages (conv3×3 → BN → ReLU; stages after the first add a second conv),
    global average pool, Linear + ReLU.

    Why one conv in the first stage: at full resolution it dominates the cost; the stride-2
    conv already turns pixels into local texture features (ground glass vs parenchyma).
    """

    def __init__(self, in_channels: int = 1, widths: Sequence[int] = (16, 32, 64, 96), out_dim: int = 128) -> None:
        super().__init__()
        layers = []
        c = in_channels
        for i, w in enumerate(widths):
            layers += [nn.Conv2d(c, w, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
            if i > 0:
                layers += [nn.Conv2d(w, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
            c = w
        self.features = nn.Sequential(*layers)
        self.proj = nn.Linear(c, out_dim)
        self.out_dim = out_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.features(x).mean(dim=(2, 3))
        return torch.relu(self.proj(f))


class Bottleneck(nn.Module):
    """ResNet bottleneck: 1×1 reduce → 3×3 (stride) → 1×1 expand ×4, identity or projected shortcut."""

    expansion = 4

    def __init__(self, in_ch: int, width: int, stride: int = 1) -> None:
        super().__init__()
        out = width * self.expansion
        self.conv1 = nn.Conv2d(in_ch, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = (
            nn.Sequential(nn.Conv2d(in_ch, out, 1, stride=stride, bias=False), nn.BatchNorm2d(out))
            if stride != 1 or in_ch != out
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return self.relu(y + self.shortcut(x))


class ResNet50Encoder(nn.Module):
    """Bottleneck ResNet-50 trunk, global average pool, optional Linear projection to ``out_dim``."""

    def __init__(self, in_channels: int = 1, out_dim: int = 2048, blocks: Sequence[int] = (3, 4, 6, 3)) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False),
            nn.BatchNorm2d(64),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(3, stride=2, padding=1),
        )
        stages = []
        in_ch = 64
        for i, (n, width) in enumerate(zip(blocks, (64, 128, 256, 512))):
            layers = []
            for b in range(n):
                layers.append(Bottleneck(in_ch, width, stride=2 if (b == 0 and i > 0) else 1))
                in_ch = width * Bottleneck.expansion
            stages.append(nn.Sequential(*layers))
        self.stages = nn.Sequential(*stages)
        self.proj = nn.Identity() if out_dim == in_ch else nn.Linear(in_ch, out_dim)
        self.out_dim = out_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.stages(self.stem(x)).mean(dim=(2, 3))
        return self.proj(f)


def build_slice_encoder(backbone: str = "small", in_channels: int = 1, out_dim: int = 128,
                        widths: Sequence[int] = (16, 32, 64, 96)) -> nn.Module:
    """Make a per-slice encoder by name (``"small"`` or ``"resnet50"``); ``.out_dim`` is its feature size.

    ``widths`` sets the small CNN's four stage widths (ignored by ResNet-50).
    """
    if backbone == "small":
        return SmallSliceCNN(in_channels=in_channels, widths=tuple(widths), out_dim=out_dim)
    if backbone == "resnet50":
        return ResNet50Encoder(in_channels=in_channels, out_dim=out_dim)
    raise ValueError(f"unknown slice backbone {backbone!r} (use 'small' or 'resnet50')")
