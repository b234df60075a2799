"""Reusable 3D building blocks: inception stem, U-Net levels, residual encoder units, and the
box geometry that moves features between a patch and the whole-scan slice stack.

Why separate from the networks: the blocks are small ``nn.Module``s with explicit channel
arguments (MONAI style), so a paper-size and a CPU-size network are the same code with
different numbers, and each block can be tested alone.

Tensors are (N, C, D, H, W) = (batch, channels, z, y, x).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def group_norm(channels: int, groups: int = 8) -> nn.GroupNorm:
    """GroupNorm with the largest group count ≤ ``groups`` that divides ``channels``.

    Why adaptive: the CPU configuration has 8–16 channels where 8 groups of 1 channel
    would degenerate into InstanceNorm.
    """
    g = max(1, min(groups, channels // 2))
    while channels % g:
        g -= 1
    return nn.GroupNorm(g, channels)


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm3d(channels)
    if kind == "group":
        return group_norm(channels)
    if kind == "instance":
        return nn.InstanceNorm3d(channels, affine=True)
    raise ValueError(f"unknown norm {kind!r}")


class InceptionStem3D(nn.Module):
    """DeepSC-COVID's 3D inception block: four parallel branches, each ending at stride 2.

    Branches (paper widths for ``out_channels=32``: 8 + 8 + 12 + 4):
    1×1×1 conv s2 | 1×1×1 → 3×3×3 s2 | 1×1×1 → 3×3×3 s2 → 3×3×3 | avg-pool 3 → 3×3×3 s2,
    concatenated → GroupNorm(2) → ReLU. The different receptive fields see small ground
    glass and large consolidation at once.
    """

    def __init__(self, in_channels: int = 1, out_channels: int = 32) -> None:
        super().__init__()
        if out_channels % 8:
            raise ValueError("inception stem width must be a multiple of 8 (split 8:8:12:4 of 32)")
        u = out_channels // 8
        c1, c2, c3, c4 = 2 * u, 2 * u, 3 * u, u
        self.b1 = nn.Conv3d(in_channels, c1, 1, stride=2, bias=False)
        self.b2 = nn.Sequential(
            nn.Conv3d(in_channels, c2, 1, bias=False), nn.ReLU(inplace=True), nn.Conv3d(c2, c2, 3, stride=2, padding=1, bias=False)
        )
        self.b3 = nn.Sequential(
            nn.Conv3d(in_channels, c3, 1, bias=False),
            nn.ReLU(inplace=True),
            nn.Conv3d(c3, c3, 3, stride=2, padding=1, bias=False),
            nn.ReLU(inplace=True),
            nn.Conv3d(c3, c3, 3, padding=1, bias=False),
        )
        self.b4 = nn.Sequential(nn.AvgPool3d(3, stride=1, padding=1), nn.Conv3d(in_channels, c4, 3, stride=2, padding=1, bias=False))
        self.norm = nn.GroupNorm(2, out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.cat([self.b1(x), self.b2(x), self.b3(x), self.b4(x)], dim=1)
        return F.relu(self.norm(y), inplace=True)


class ConvBlock3D(nn.Module):
    """Two 3×3×3 conv + norm + ReLU: one U-Net level."""

    def __init__(self, in_channels: int, out_channels: int, norm: str = "batch") -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv3d(in_channels, out_channels, 3, padding=1, bias=False),
            _norm(norm, out_channels),
            nn.ReLU(inplace=True),
            nn.Conv3d(out_channels, out_channels, 3, padding=1, bias=False),
            _norm(norm, out_channels),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class ResidualDown3D(nn.Module):
    """Residual encoder unit with stride 2 and GroupNorm (classification subnet)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 2) -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.norm1 = group_norm(out_channels)
        self.conv2 = nn.Conv3d(out_channels, out_channels, 3, padding=1, bias=False)
        self.norm2 = group_norm(out_channels)
        self.skip = nn.Sequential(nn.Conv3d(in_channels, out_channels, 1, stride=stride, bias=False), group_norm(out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.norm1(self.conv1(x)), inplace=True)
        y = self.norm2(self.conv2(y))
        return F.relu(y + self.skip(x), inplace=True)


# ------------------------------------------------------------------ patch <-> slice geometry
def _box_theta(box: torch.Tensor, inverse: bool) -> torch.Tensor:
    """Affine ``theta`` (N, 3, 4) for ``F.affine_grid`` from boxes (N, 6).

    ``box`` rows are (z0, z1, y0, y1, x0, x1) as fractions 0..1 of the whole scan extent.
    Forward: output grid spans the box (crop). Inverse: output grid spans the scan and the
    box content lands at the box position (paste). ``affine_grid`` wants (x, y, z) order.
    """
    lo = box[:, 0::2] * 2 - 1  # (N, 3) z, y, x in [-1, 1]
    hi = box[:, 1::2] * 2 - 1
    centre = ((lo + hi) / 2).flip(-1)  # x, y, z
    half = ((hi - lo) / 2).flip(-1).clamp_min(1e-6)
    n = box.shape[0]
    theta = box.new_zeros(n, 3, 4)
    if inverse:
        scale, shift = 1.0 / half, -centre / half
    else:
        scale, shift = half, centre
    theta[:, 0, 0], theta[:, 1, 1], theta[:, 2, 2] = scale[:, 0], scale[:, 1], scale[:, 2]
    theta[:, :, 3] = shift
    return theta


def crop_to_box(volume: torch.Tensor, box: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Resample the ``box`` region of whole-scan features (N, C, D, H, W) to ``size`` (D, H, W).

    Used to hand classification features / CAMs to the patch grid of the lesion subnet.
    """
    theta = _box_theta(box.to(volume.dtype), inverse=False)
    grid = F.affine_grid(theta, [volume.shape[0], volume.shape[1], *size], align_corners=False)
    return F.grid_sample(volume, grid, mode="bilinear", padding_mode="border", align_corners=False)


def paste_from_box(patch: torch.Tensor, box: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Place patch features (N, C, d, h, w) at ``box`` in a zero whole-scan grid of ``size``.

    Used to hand lesion features / lesion probability to the classification grid; zeros
    outside the box mean "not seen by this patch".
    """
    theta = _box_theta(box.to(patch.dtype), inverse=True)
    grid = F.affine_grid(theta, [patch.shape[0], patch.shape[1], *size], align_corners=False)
    return F.grid_sample(patch, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
