"""The lung U-Net of the lungmask R231 layout (2D, depth 5, wf 6, batch norm, bilinear up-sampling).

Why this exact layout: users who own R231-style weights convert them with
``safetensors.torch.save_file(state_dict)`` and plug them in through
:mod:`CovidCTDxLib.lungs.model_hook`; the key names are the contract (see that module).
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class _ConvBlock(nn.Module):
    """Two 3×3 convolutions, each followed by ReLU and batch norm (R231 order)."""

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        self.block = nn.Sequential(
            nn.Conv2d(in_ch, out_ch, 3, padding=1), nn.ReLU(inplace=True), nn.BatchNorm2d(out_ch),
            nn.Conv2d(out_ch, out_ch, 3, padding=1), nn.ReLU(inplace=True), nn.BatchNorm2d(out_ch),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


class _UpBlock(nn.Module):
    """Bilinear ×2 up-sampling + 1×1 conv, concatenation with the skip, conv block."""

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        self.up = nn.Sequential(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False), nn.Conv2d(in_ch, out_ch, 1))
        self.conv_block = _ConvBlock(in_ch, out_ch)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.conv_block(torch.cat([self.up(x), skip], dim=1))


class UNet2D(nn.Module):
    """2D U-Net of the lungmask R231 size by default: depth 5, channels 2**(wf+i) with
    wf 6 = 64..1024, ~29 M parameters for 1 input channel and 3 classes (R231 uses the
    pytorch-unet defaults for width). Smaller ``wf`` gives lighter models (wf 4: ~1.8 M)."""

    def __init__(self, in_channels: int = 1, n_classes: int = 3, depth: int = 5, wf: int = 6) -> None:
        super().__init__()
        self.depth = depth
        ch = [2 ** (wf + i) for i in range(depth)]
        self.down_path = nn.ModuleList(_ConvBlock(in_channels if i == 0 else ch[i - 1], ch[i]) for i in range(depth))
        self.up_path = nn.ModuleList(_UpBlock(ch[i + 1], ch[i]) for i in reversed(range(depth - 1)))
        self.last = nn.Conv2d(ch[0], n_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for i, down in enumerate(self.down_path):
            x = down(x)
            if i != self.depth - 1:
                skips.append(x)
                x = F.max_pool2d(x, 2)
        for up, skip in zip(self.up_path, reversed(skips)):
            x = up(x, skip)
        return self.last(x)
