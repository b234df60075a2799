"""DeepSC-COVID (Wang et al., IEEE TMI 2021): joint 3D lesion segmentation and 3-class
classification (COVID-19 / CAP / non-pneumonia) with multi-layer CAM evidence maps.

Re-implemented from the paper (Wang et al., IEEE TMI 40(9), 2021); no upstream code is used. Two inputs per
forward pass:

- ``patch`` (N, 1, pz, py, px): a 3D patch of the lung-masked, HU-windowed scan;
- ``slices`` (N, 1, S, c, c): S axial slices sampled evenly over the whole (lung-cropped)
  scan, resized to c × c in-plane;
- ``box`` (N, 6): where the patch lies in the scan, as fractions (z0, z1, y0, y1, x0, x1).

Subnets: two unshared inception stems → learnable cross-task exchange (cross-stitch,
α=0.8, β=0.2 at init) → 3D lesion U-Net with deep supervision (fused 0.25/0.25/0.5/1) and a
classification subnet (lesion map + classification features → three residual units →
GAP of all three → linear). The FC weights turn each unit's features into a CAM
(evidence map) per class.

Deviation from upstream, on purpose: the patch's lesion map and features are *pasted at the
patch position* in the slice grid (and classification features cropped at the patch
position for the lesion subnet) instead of concatenating tensors that merely have matching
shapes; the box makes the exchange geometric, as the paper describes.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Dict, List, Mapping, NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import ConvBlock3D, InceptionStem3D, ResidualDown3D, crop_to_box, paste_from_box

ARCHITECTURE = "deepsc"
ARCHITECTURE_VERSION = "1"
NUM_CLASSES = 3  # result.CLASS_KEYS order: covid19, cap, non_pneumonia
NON_PNEUMONIA = 2


@dataclass
class DeepSCConfig:
    """Sizes of a DeepSC-COVID network and of its inputs.

    ``width`` is the stem width (paper 32); the U-Net uses 2w/4w/8w, the classifier's
    residual units 2w/4w/8w and its two entry convolutions w/2 each, so the GAP vector is
    14w (448 in the paper). Patch size and slice-stack size must be divisible by 8 (z) /
    16 (in-plane of the slice stack) so every stride-2 stage divides evenly.
    """

    width: int = 32
    patch_size: Tuple[int, int, int] = (24, 256, 256)  # (z, y, x) voxels at `spacing`
    cls_slices: int = 48
    cls_size: int = 256
    spacing: Tuple[float, float, float] = (0.75, 0.75, 1.5)  # model grid (x, y, z) mm
    seg_norm: str = "batch"
    hu_window: Tuple[float, float] = (-1400.0, 200.0)
    deep_supervision: Tuple[float, float, float, float] = (0.25, 0.25, 0.5, 1.0)
    exchange_init: Tuple[float, float] = (0.8, 0.2)  # (alpha, beta)
    num_classes: int = NUM_CLASSES
    seg_class_weights: Tuple[float, float] = (0.1, 1.0)  # CE weights (background, lesion)
    cls_dropout: float = 0.0  # dropout on the 14w GAP vector (not in the paper; curbs overfitting on few scans)

    def __post_init__(self) -> None:
        self.patch_size = tuple(int(v) for v in self.patch_size)  # type: ignore[assignment]
        self.spacing = tuple(float(v) for v in self.spacing)  # type: ignore[assignment]
        self.hu_window = tuple(float(v) for v in self.hu_window)  # type: ignore[assignment]
        self.deep_supervision = tuple(float(v) for v in self.deep_supervision)  # type: ignore[assignment]
        self.exchange_init = tuple(float(v) for v in self.exchange_init)  # type: ignore[assignment]
        self.seg_class_weights = tuple(float(v) for v in self.seg_class_weights)  # type: ignore[assignment]
        if self.width % 8:
            raise ValueError(f"width must be a multiple of 8, got {self.width}")
        if any(p % 8 for p in self.patch_size):
            raise ValueError(f"patch_size must be divisible by 8 on every axis, got {self.patch_size}")
        if self.cls_slices % 16 or self.cls_size % 16:
            raise ValueError("cls_slices and cls_size must be divisible by 16")

    @classmethod
    def paper(cls) -> "DeepSCConfig":
        """The published configuration (GPU sized)."""
        return cls()

    @classmethod
    def cpu(cls) -> "DeepSCConfig":
        """The CPU configuration used by the demo weights (same code, smaller numbers)."""
        return cls(width=8, patch_size=(16, 64, 64), cls_slices=32, cls_size=64, spacing=(2.5, 2.5, 4.0), cls_dropout=0.3)

    def to_dict(self) -> Dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "DeepSCConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown DeepSC config keys: {sorted(unknown)}")
        return cls(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items()})


class DeepSCOutputs(NamedTuple):
    """Everything one forward pass produces (all tensors keep their autograd graph).

    seg_logits: (N, 2, pz, py, px) fused lesion logits (background, lesion) on the patch.
    deep_logits: [o1, o2, o3, o4] logits at 1/8, 1/4, 1/2 and 1/1 patch resolution.
    cls_logits: (N, num_classes).
    cams: per residual unit (64/128/256-ch level), class activation maps (N, K, d, h, w)
        on the slice grid, computed from the FC weights.
    pooled: (N, 14w) the GAP vector the FC layer classifies; inference compares it with the
        training statistics to tell when a scan is unlike anything the classifier saw
        (``deepsc/ood.py``).
    """

    seg_logits: torch.Tensor
    deep_logits: List[torch.Tensor]
    cls_logits: torch.Tensor
    cams: List[torch.Tensor]
    pooled: Optional[torch.Tensor] = None


class CrossTaskExchange(nn.Module):
    """Cross-stitch unit: each task's features plus a learnable share of the other's.

    seg_in = α2·F_seg + β2·crop(F_cls at the patch); cls_in = α1·F_cls + β1·paste(F_seg).
    Initialised α = 0.8, β = 0.2 (upstream leaves them uninitialised).
    """

    def __init__(self, alpha: float = 0.8, beta: float = 0.2) -> None:
        super().__init__()
        self.alpha_cls = nn.Parameter(torch.tensor(float(alpha)))
        self.beta_cls = nn.Parameter(torch.tensor(float(beta)))
        self.alpha_seg = nn.Parameter(torch.tensor(float(alpha)))
        self.beta_seg = nn.Parameter(torch.tensor(float(beta)))

    def forward(self, f_seg: torch.Tensor, f_cls: torch.Tensor, box: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        seg_in = self.alpha_seg * f_seg + self.beta_seg * crop_to_box(f_cls, box, f_seg.shape[2:])
        cls_in = self.alpha_cls * f_cls + self.beta_cls * paste_from_box(f_seg, box, f_cls.shape[2:])
        return seg_in, cls_in


class LesionSubnet(nn.Module):
    """3D U-Net on stem features (at 1/2 patch resolution) with deep supervision.

    Encoder w→2w, pool, →4w, pool, →8w; decoder 8w→4w (skip), →2w (skip), →w (up-sampled
    back to full patch resolution, no skip). 1×1×1 heads on the 8w/4w/2w/w outputs.
    """

    def __init__(self, width: int, norm: str, weights: Tuple[float, ...]) -> None:
        super().__init__()
        w = width
        self.enc1 = ConvBlock3D(w, 2 * w, norm)
        self.enc2 = ConvBlock3D(2 * w, 4 * w, norm)
        self.enc3 = ConvBlock3D(4 * w, 8 * w, norm)
        self.up3 = nn.ConvTranspose3d(8 * w, 4 * w, 2, stride=2)
        self.dec2 = ConvBlock3D(8 * w, 4 * w, norm)
        self.up2 = nn.ConvTranspose3d(4 * w, 2 * w, 2, stride=2)
        self.dec1 = ConvBlock3D(4 * w, 2 * w, norm)
        self.up1 = nn.ConvTranspose3d(2 * w, w, 2, stride=2)
        self.dec0 = ConvBlock3D(w, w, norm)
        self.heads = nn.ModuleList([nn.Conv3d(c, 2, 1) for c in (8 * w, 4 * w, 2 * w, w)])
        self.register_buffer("fusion", torch.tensor(weights, dtype=torch.float32), persistent=False)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        e1 = self.enc1(x)
        e2 = self.enc2(F.max_pool3d(e1, 2))
        e3 = self.enc3(F.max_pool3d(e2, 2))
        d2 = self.dec2(torch.cat([self.up3(e3), e2], dim=1))
        d1 = self.dec1(torch.cat([self.up2(d2), e1], dim=1))
        d0 = self.dec0(self.up1(d1))
        deep = [head(f) for head, f in zip(self.heads, (e3, d2, d1, d0))]
        size = d0.shape[2:]
        fused = deep[3] * self.fusion[3]
        for i in range(3):
            fused = fused + self.fusion[i] * F.interpolate(deep[i], size=size, mode="trilinear", align_corners=False)
        return fused, deep


class ClassificationSubnet(nn.Module):
    """Lesion map + classification features → three residual units → GAP ×3 → linear.

    The lesion map enters through a 1×1×1 conv to w/2 channels scaled by a learnable
    scalar (so the classifier can learn how much to trust the segmentation); the features
    through a 1×1×1 conv to w/2 channels.
    """

    def __init__(self, width: int, num_classes: int, dropout: float = 0.0) -> None:
        super().__init__()
        w = width
        self.dropout = nn.Dropout(dropout)
        self.lesion_in = nn.Conv3d(1, w // 2, 1)
        self.lesion_scale = nn.Parameter(torch.tensor(1.0))
        self.feat_in = nn.Conv3d(w, w // 2, 1)
        self.units = nn.ModuleList([ResidualDown3D(w, 2 * w), ResidualDown3D(2 * w, 4 * w), ResidualDown3D(4 * w, 8 * w)])
        self.splits = (2 * w, 4 * w, 8 * w)
        self.fc = nn.Linear(sum(self.splits), num_classes)

    def forward(self, features: torch.Tensor, lesion_map: torch.Tensor) -> Tuple[torch.Tensor, List[torch.Tensor], torch.Tensor]:
        """(logits, CAMs, pooled GAP vector)."""
        x = torch.cat([self.lesion_scale * self.lesion_in(lesion_map), self.feat_in(features)], dim=1)
        maps = []
        for unit in self.units:
            x = unit(x)
            maps.append(x)
        pooled = torch.cat([m.mean(dim=(2, 3, 4)) for m in maps], dim=1)
        logits = self.fc(self.dropout(pooled))
        cams = []
        offset = 0
        for m, c in zip(maps, self.splits):
            w = self.fc.weight[:, offset : offset + c]  # (K, c)
            cams.append(torch.einsum("ncdhw,kc->nkdhw", m, w))
            offset += c
        return logits, cams, pooled


class DeepSCCovid(nn.Module):
    """The joint network. See the module docstring for inputs and ``DeepSCOutputs``."""

    def __init__(self, config: Optional[DeepSCConfig] = None) -> None:
        super().__init__()
        self.config = config or DeepSCConfig()
        c = self.config
        self.seg_stem = InceptionStem3D(1, c.width)
        self.cls_stem = InceptionStem3D(1, c.width)
        self.exchange = CrossTaskExchange(*c.exchange_init)
        self.lesion = LesionSubnet(c.width, c.seg_norm, c.deep_supervision)
        self.classifier = ClassificationSubnet(c.width, c.num_classes, c.cls_dropout)

    def encode_slices(self, slices: torch.Tensor) -> torch.Tensor:
        """Classification stem features; cache them when many patches share one scan."""
        return self.cls_stem(slices)

    def forward(
        self,
        patch: torch.Tensor,
        slices: Optional[torch.Tensor] = None,
        box: Optional[torch.Tensor] = None,
        slice_features: Optional[torch.Tensor] = None,
    ) -> DeepSCOutputs:
        if slice_features is None:
            if slices is None:
                raise ValueError("pass slices or precomputed slice_features")
            slice_features = self.encode_slices(slices)
        if slice_features.shape[0] != patch.shape[0]:
            slice_features = slice_features.expand(patch.shape[0], *slice_features.shape[1:])
        if box is None:
            box = patch.new_tensor([0.0, 1.0, 0.0, 1.0, 0.0, 1.0]).expand(patch.shape[0], 6)
        f_seg = self.seg_stem(patch)
        seg_in, cls_in = self.exchange(f_seg, slice_features, box)
        seg_logits, deep = self.lesion(seg_in)
        lesion_prob = torch.softmax(seg_logits, dim=1)[:, 1:2]
        lesion_map = paste_from_box(lesion_prob, box, cls_in.shape[2:])
        cls_logits, cams, pooled = self.classifier(cls_in, lesion_map)
        return DeepSCOutputs(seg_logits, deep, cls_logits, cams, pooled)


def lesion_probability(seg_logits: torch.Tensor, config: DeepSCConfig) -> torch.Tensor:
    """Calibrated lesion probability (N, ...) from (N, 2, ...) logits.

    Why the offset: training weights lesion voxels w1/w0 = 10× more than background in the
    cross-entropy, which shifts the learned log-odds by log(w1/w0); at 0.5 the raw softmax
    over-calls lesion (measured: ~3× the true volume on phantoms, and false lesions in
    normal lungs). Subtracting the shift (logit adjustment) restores posterior-like
    probabilities, so the paper's 0.5 threshold means what it says.
    """
    w0, w1 = config.seg_class_weights
    return torch.sigmoid(seg_logits[:, 1] - seg_logits[:, 0] - math.log(w1 / w0))


def normalise_cam(cam: torch.Tensor) -> torch.Tensor:
    """ReLU then divide by the per-sample, per-class maximum: evidence in 0..1."""
    cam = F.relu(cam)
    peak = cam.flatten(2).amax(dim=2).clamp_min(1e-6)
    return cam / peak[:, :, None, None, None]


def evidence_map(cams: List[torch.Tensor], size: Tuple[int, int, int]) -> torch.Tensor:
    """Multi-layer evidence (N, K, *size): mean of the three normalised CAMs up-sampled."""
    acc = None
    for cam in cams:
        up = F.interpolate(normalise_cam(cam), size=size, mode="trilinear", align_corners=False)
        acc = up if acc is None else acc + up
    return acc / len(cams)
