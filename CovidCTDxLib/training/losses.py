"""DeepSC-COVID losses: segmentation, classification and the task-aware coupling.

Weights follow the DeepSC-COVID paper and, where its equations leave them open, the authors' code:

- segmentation: soft Dice on the lesion probability *inside the lung* + 2 × cross-entropy
  weighted (background 0.1, lesion 1.0);
- classification: cross-entropy + 2 × focal (γ = 2), both with class weights inverse to
  the training-set class frequency;
- task-aware: 5 × (0.25·MSE(o1, CAM) + 0.25·MSE(o2, CAM) + 0.5·MSE(o3, CAM)) between the
  intermediate lesion probabilities o1..o3 and the classifier's evidence maps cropped to
  the patch. Upstream adds it after ``backward()`` so it never trains; here it is part of
  the graph and its gradient reaches both the lesion subnet and the classifier.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

from ..models.blocks import crop_to_box
from ..models.deepsc import NON_PNEUMONIA, DeepSCOutputs, normalise_cam


def soft_dice_loss(prob: torch.Tensor, target: torch.Tensor, mask: Optional[torch.Tensor] = None, eps: float = 1.0) -> torch.Tensor:
    """1 − soft Dice per sample, averaged; ``prob``/``target``/``mask`` are (N, ...).

    ``eps`` (smoothing, in voxels) keeps lesion-free patches from producing a 0/0 and makes
    an empty prediction on an empty patch score ~0 loss.
    """
    p = prob.flatten(1)
    t = target.flatten(1).to(p.dtype)
    if mask is not None:
        m = mask.flatten(1).to(p.dtype)
        p, t = p * m, t * m
    inter = (p * t).sum(1)
    denom = p.sum(1) + t.sum(1)
    return (1 - (2 * inter + eps) / (denom + eps)).mean()


def segmentation_loss(
    seg_logits: torch.Tensor,
    lesion: torch.Tensor,
    lung: Optional[torch.Tensor] = None,
    class_weights: Sequence[float] = (0.1, 1.0),
    ce_weight: float = 2.0,
) -> torch.Tensor:
    """Dice (inside the lung) + ``ce_weight`` × weighted CE. ``lesion``/``lung``: (N, D, H, W)."""
    prob = torch.softmax(seg_logits, dim=1)[:, 1]
    dice = soft_dice_loss(prob, lesion, lung)
    w = seg_logits.new_tensor(class_weights)
    ce = F.cross_entropy(seg_logits, lesion.long(), weight=w)
    return dice + ce_weight * ce


def inverse_frequency_weights(labels: Sequence[int], num_classes: int) -> torch.Tensor:
    """Class weights ∝ 1 / frequency, normalised to mean 1 (absent classes get weight 1)."""
    counts = torch.bincount(torch.as_tensor(list(labels), dtype=torch.long), minlength=num_classes).float()
    w = torch.where(counts > 0, counts.sum() / (num_classes * counts.clamp_min(1)), torch.ones_like(counts))
    return w / w.mean()


def focal_loss(logits: torch.Tensor, target: torch.Tensor, gamma: float = 2.0, weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Multi-class focal loss −w_y (1 − p_y)^γ log p_y, averaged like weighted CE."""
    logp = F.log_softmax(logits, dim=1).gather(1, target[:, None]).squeeze(1)
    loss = -((1 - logp.exp()) ** gamma) * logp
    if weight is None:
        return loss.mean()
    w = weight[target]
    return (w * loss).sum() / w.sum()


def classification_loss(
    cls_logits: torch.Tensor,
    target: torch.Tensor,
    class_weights: Optional[torch.Tensor] = None,
    focal_weight: float = 2.0,
    gamma: float = 2.0,
) -> torch.Tensor:
    """CE + ``focal_weight`` × focal, both weighted by ``class_weights``."""
    w = class_weights.to(cls_logits) if class_weights is not None else None
    return F.cross_entropy(cls_logits, target, weight=w) + focal_weight * focal_loss(cls_logits, target, gamma, w)


def task_aware_loss(
    deep_logits: List[torch.Tensor],
    cams: List[torch.Tensor],
    cls_logits: torch.Tensor,
    box: torch.Tensor,
    weights: Sequence[float] = (0.25, 0.25, 0.5),
    scale: float = 5.0,
) -> torch.Tensor:
    """Pull intermediate lesion maps o1..o3 towards the classifier's evidence maps.

    Pairs deepest with deepest: o1 (8w level) ↔ CAM of the 8w unit, o2 ↔ 4w, o3 ↔ 2w. The
    CAM is the predicted class's, normalised to 0..1 and cropped to the patch box. When
    the predicted class is non-pneumonia the target is zero: a normal-lung CAM is not
    lesion evidence (the paper leaves this case open; copying that CAM would teach the
    lesion subnet to paint healthy lung).
    """
    pred = cls_logits.argmax(dim=1).detach()
    is_pneumonia = (pred != NON_PNEUMONIA).to(cls_logits.dtype)
    total = cls_logits.new_zeros(())
    for o, cam, w in zip(deep_logits[:3], reversed(cams), weights):
        sel = normalise_cam(cam)[torch.arange(cam.shape[0]), pred][:, None]  # (N, 1, d, h, w)
        target = crop_to_box(sel, box, o.shape[2:])[:, 0] * is_pneumonia[:, None, None, None]
        prob = torch.softmax(o, dim=1)[:, 1]
        total = total + w * F.mse_loss(prob, target)
    return scale * total


@dataclass
class DeepSCLossWeights:
    """Relative weights of the three terms (paper eq. 11: λ_seg, λ_cls, λ_ta)."""

    seg: float = 1.0
    cls: float = 1.0
    task_aware: float = 1.0


def deepsc_loss(
    out: DeepSCOutputs,
    lesion: torch.Tensor,
    lung: Optional[torch.Tensor],
    label: torch.Tensor,
    box: torch.Tensor,
    class_weights: Optional[torch.Tensor] = None,
    weights: Optional[DeepSCLossWeights] = None,
    seg_valid: Optional[torch.Tensor] = None,
    seg_class_weights: Sequence[float] = (0.1, 1.0),
) -> Dict[str, torch.Tensor]:
    """All terms and their weighted sum under ``"total"`` (terms with weight 0 are skipped).

    ``seg_valid`` (N,) marks samples whose scan has lesion labels; the others (e.g. a
    COVID scan without a ``segment_label`` file) train classification only.
    """
    weights = weights or DeepSCLossWeights()
    terms: Dict[str, torch.Tensor] = {}
    total = out.cls_logits.new_zeros(())
    keep = None if seg_valid is None else seg_valid > 0.5
    if weights.seg and (keep is None or bool(keep.any())):
        if keep is None or bool(keep.all()):
            terms["seg"] = segmentation_loss(out.seg_logits, lesion, lung, seg_class_weights)
        else:
            terms["seg"] = segmentation_loss(out.seg_logits[keep], lesion[keep], None if lung is None else lung[keep], seg_class_weights)
        total = total + weights.seg * terms["seg"]
    if weights.cls:
        terms["cls"] = classification_loss(out.cls_logits, label, class_weights)
        total = total + weights.cls * terms["cls"]
    if weights.task_aware:
        terms["task_aware"] = task_aware_loss(out.deep_logits, out.cams, out.cls_logits, box)
        total = total + weights.task_aware * terms["task_aware"]
    terms["total"] = total
    return terms
