"""Which axial slices of a CT a slice-wise model (RACNet) should look at.

Two rules, both returning slice indices ordered **inferior → superior in patient
coordinates** (decided from the volume's direction matrix, never from array order):

1. :func:`select_by_lungs` (default when a lung mask exists): keep the slices whose lung
   cross-section is at least ``min_area_fraction`` of the largest one. Why: the lung mask is
   the most direct evidence that "the inside of the lung is visible", which is what the
   COVID-CTset rule approximates, and it keeps the lung bases where COVID-19 lesions
   concentrate. The fraction (default 0.25) drops only the apical/basal caps where a slice
   holds a few cm² of partial-volume lung.

2. :func:`select_covid_ctset` — COVID-CTset's selection (Rahimzadeh et al., seed 001,
   §2.2) re-expressed physically. The paper, on 512×512 16-bit Siemens SOMATOM Scope
   images, counts "dark pixels" (stored value < 300) in the box columns 120–370 × rows
   240–340 of every slice, sets ``threshold = (max_count − min_count) / 1.5`` over the scan
   and keeps slices with more dark pixels than the threshold. Our re-expression:

   * **HU**: Siemens stores HU + 1024 (RescaleIntercept −1024, as in the COVID-CT-MD scan
     from the same scanner model), so "value < 300" is **HU < −724**.
   * **Area, not count**: dark pixels are counted as mm² (count × pixel area). The
     threshold is a ratio of counts within one scan, so this changes nothing for the
     paper's data and makes scans of different matrix sizes comparable.
   * **ROI relative to the body, in patient axes**: the paper's pixel box assumes the
     patient sits at the same place of a fixed field of view, which the authors note is not
     true ("the lung's position differed for different patients"). We place the box from
     the body's extent: left–right, a band of ``roi_lr_fraction`` (0.55) of the body width
     centred on the body; anterior→posterior, from ``roi_ap_range`` = 45 % to 75 % of the
     body depth. On the COVID-CT-MD scan (same scanner model as COVID-CTset, 0.748 mm
     pixels) this box is ~210 × 80 mm at rows 228–334, i.e. the paper's 250 × 100 pixel
     box at rows 240–340 (selection Jaccard 0.97 against the pixel rule); on other
     scanners it follows the patient instead of the pixel grid.
   * The threshold is literally ``(max − min) / 1.5`` (not ``min + …``), as written.

The body extent is taken from ``LungMasks.body`` when available, else from a coarse
(~3 mm) threshold at −500 HU, largest connected component; per-slice extents are reduced by
their median over the slices that hold at least half of the largest body cross-section, so
neck, shoulders and abdomen do not stretch the box.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

import numpy as np
from scipy import ndimage as ndi

from ..errors import LungsNotFoundError
from ..result import LungMasks
from ..volume import LPS_LEFT, LPS_POSTERIOR, LPS_SUPERIOR, CTVolume

log = logging.getLogger(__name__)

#: COVID-CTset "dark pixel": stored value < 300 on a scanner storing HU + 1024.
DARK_HU = 300.0 - 1024.0
#: COVID-CTset keeps slices whose dark count exceeds (max - min) / DIVISOR.
CTSET_DIVISOR = 1.5
#: Body threshold (HU): soft tissue and fat are above it, air and lung below.
BODY_HU = -500.0
#: Default physical ROI (see module docstring).
ROI_LR_FRACTION = 0.55
ROI_AP_RANGE = (0.45, 0.75)
#: Default lung-area fraction for :func:`select_by_lungs`.
LUNG_AREA_FRACTION = 0.25


@dataclass
class SliceSelection:
    """Selected slices of one scan.

    Attributes:
        axis: array axis (0 = z, 1 = y, 2 = x) that runs head–feet; slices are taken across it.
        indices: selected indices along ``axis``, ordered inferior → superior.
        positions_mm: superior coordinate (LPS z, mm) of each selected slice, ascending.
        scores: per-slice score over **all** slices in array order (lung area or dark area, mm²).
        threshold: the score a slice had to exceed (≥ for the lung rule).
        method: ``"lungs"`` or ``"covid_ctset"``.
        details: method-specific facts (ROI bounds, fractions) for reports and tests.
    """

    axis: int
    indices: np.ndarray
    positions_mm: np.ndarray
    scores: np.ndarray
    threshold: float
    method: str
    details: Dict[str, object] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(len(self.indices))

    def take(self, array: np.ndarray) -> np.ndarray:
        """The selected slices of a CT-grid array, as (n, rows, cols), inferior first."""
        return np.moveaxis(np.take(array, self.indices, axis=self.axis), self.axis, 0)

    def thin(self, min_step_mm: float) -> "SliceSelection":
        """Keep slices at least ``min_step_mm`` apart (greedy from the inferior end).

        Why: a thin-slice scan (300 × 1 mm) and a thick one (60 × 5 mm) then give the model
        a similar number of slices covering the same anatomy, which bounds inference time
        and removes one source of length variation.
        """
        if min_step_mm <= 0 or len(self) < 2:
            return self
        keep = [0]
        for i in range(1, len(self.indices)):
            if self.positions_mm[i] - self.positions_mm[keep[-1]] >= min_step_mm - 1e-6:
                keep.append(i)
        k = np.asarray(keep)
        return SliceSelection(
            self.axis, self.indices[k], self.positions_mm[k], self.scores, self.threshold, self.method,
            {**self.details, "thinned_to_mm": float(min_step_mm)},
        )


# ---------------------------------------------------------------------------- geometry
def slice_axis(ct: CTVolume) -> Tuple[int, np.ndarray]:
    """Array axis that runs head–feet and each index's superior coordinate (mm).

    Why: sorting by the LPS z of each slice, not by array index, keeps the inferior →
    superior order for feet-first, flipped or reoriented volumes.
    """
    axis, _ = ct.axis_for(LPS_SUPERIOR)
    n = ct.shape[axis]
    ijk = np.zeros((n, 3))
    ijk[:, 2 - axis] = np.arange(n)  # index axes are (i, j, k) = array axes (2, 1, 0)
    pos = ct.index_to_lps(ijk) @ LPS_SUPERIOR  # 1-D: no full-volume coordinate grid
    return axis, pos


def _ordered(axis: int, pos: np.ndarray, keep: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    idx = np.nonzero(keep)[0]
    order = np.argsort(pos[idx], kind="stable")
    return idx[order], pos[idx][order]


def _pixel_area_mm2(ct: CTVolume, axis: int) -> float:
    sp = ct.spacing_zyx
    return float(np.prod([s for a, s in enumerate(sp) if a != axis]))


def _inplane_axes(ct: CTVolume, axis: int) -> Tuple[int, int]:
    """(left–right array axis, anterior–posterior array axis) for slices across ``axis``."""
    lr, _ = ct.axis_for(LPS_LEFT)
    ap, _ = ct.axis_for(LPS_POSTERIOR)
    if len({axis, lr, ap}) != 3:  # strongly oblique: fall back to the two remaining axes
        rest = [a for a in range(3) if a != axis]
        lr, ap = rest[1], rest[0]
    return lr, ap


# ---------------------------------------------------------------------------- lung rule
def lung_area_per_slice(ct: CTVolume, lungs: LungMasks, axis: int) -> np.ndarray:
    """Lung area (mm²) of every slice across ``axis``, in array order.

    Right and left are disjoint, so their counts add; this avoids building the union mask
    (a full-volume allocation) on 512² × 300 scans.
    """
    other = tuple(a for a in range(3) if a != axis)
    count = np.count_nonzero(lungs.right, axis=other) + np.count_nonzero(lungs.left, axis=other)
    return count.astype(float) * _pixel_area_mm2(ct, axis)


def select_by_lungs(ct: CTVolume, lungs: LungMasks, min_area_fraction: float = LUNG_AREA_FRACTION) -> SliceSelection:
    """Slices whose lung area is ≥ ``min_area_fraction`` × the largest lung area.

    Raises :class:`LungsNotFoundError` when the lung mask is empty.
    """
    if not 0.0 < min_area_fraction <= 1.0:
        raise ValueError(f"min_area_fraction must be in (0, 1], got {min_area_fraction}")
    axis, pos = slice_axis(ct)
    area = lung_area_per_slice(ct, lungs, axis)
    if area.max() <= 0:
        raise LungsNotFoundError("The lung mask is empty, so no slices can be selected for severity scoring.")
    thr = float(min_area_fraction * area.max())
    idx, p = _ordered(axis, pos, area >= thr)
    return SliceSelection(axis, idx, p, area, thr, "lungs", {"min_area_fraction": min_area_fraction})


# ---------------------------------------------------------------------------- COVID-CTset
def body_mask(ct: CTVolume, target_mm: float = 3.0) -> Tuple[np.ndarray, Tuple[int, int, int]]:
    """Coarse body mask (largest component > −500 HU) on a strided grid; returns (mask, strides).

    Why coarse: only the body's extent is needed, and a ~3 mm grid makes this cost a few
    tens of ms on a 512² × 300 scan instead of seconds.
    """
    sp = ct.spacing_zyx
    strides = tuple(max(1, int(target_mm // s)) for s in sp)
    small = ct.array[:: strides[0], :: strides[1], :: strides[2]] > BODY_HU
    lab, n = ndi.label(small)
    if n == 0:
        return small, strides  # type: ignore[return-value]
    sizes = np.bincount(lab.ravel())[1:]
    return lab == (1 + int(np.argmax(sizes))), strides  # type: ignore[return-value]


def _body_extent(body: np.ndarray, axis: int, lr: int, ap: int) -> Tuple[Tuple[float, float], Tuple[float, float]]:
    """Median per-slice (first, last) index of the body along the lr and ap array axes."""
    rest = [a for a in range(3) if a != axis]
    stack = np.moveaxis(body, axis, 0)  # (slices, rest[0], rest[1])
    areas = stack.reshape(stack.shape[0], -1).sum(axis=1)
    if areas.max() == 0:
        raise LungsNotFoundError("No body (tissue above −500 HU) was found in the image; is this a chest CT?")
    big = stack[areas >= 0.5 * areas.max()]
    out = []
    for ax in (lr, ap):
        prof = big.any(axis=2 if rest.index(ax) == 0 else 1)  # (slices, len along ax)
        first = prof.argmax(axis=1)
        last = prof.shape[1] - 1 - prof[:, ::-1].argmax(axis=1)
        out.append((float(np.median(first)), float(np.median(last))))
    return out[0], out[1]


def covid_ctset_roi(
    ct: CTVolume,
    body: Optional[np.ndarray] = None,
    roi_lr_fraction: float = ROI_LR_FRACTION,
    roi_ap_range: Tuple[float, float] = ROI_AP_RANGE,
) -> Dict[str, object]:
    """The physical COVID-CTset ROI as index ranges on the CT grid.

    Returns ``{"axis", "lr_axis", "ap_axis", "lr": (lo, hi), "ap": (lo, hi), "size_mm": (w, d)}``
    with half-open index ranges along the left–right and anterior–posterior array axes.
    """
    axis, _ = slice_axis(ct)
    lr, ap = _inplane_axes(ct, axis)
    if body is None:
        small, strides = body_mask(ct)
    else:
        small, strides = body, (1, 1, 1)
    (lr0, lr1), (ap0, ap1) = _body_extent(small, axis, lr, ap)
    lr0, lr1 = lr0 * strides[lr], lr1 * strides[lr]
    ap0, ap1 = ap0 * strides[ap], ap1 * strides[ap]
    # Which end of the ap index range is anterior? The sign of the array axis towards posterior.
    post_axis, post_sign = ct.axis_for(LPS_POSTERIOR)
    ant, post = (ap1, ap0) if (post_axis == ap and post_sign < 0) else (ap0, ap1)
    f0, f1 = roi_ap_range
    a, b = ant + f0 * (post - ant), ant + f1 * (post - ant)
    ap_lo, ap_hi = int(np.floor(min(a, b))), int(np.ceil(max(a, b))) + 1
    centre, half = 0.5 * (lr0 + lr1), 0.5 * roi_lr_fraction * (lr1 - lr0)
    lr_lo, lr_hi = int(np.floor(centre - half)), int(np.ceil(centre + half)) + 1
    n_lr, n_ap = ct.shape[lr], ct.shape[ap]
    lr_lo, lr_hi = max(0, lr_lo), min(n_lr, lr_hi)
    ap_lo, ap_hi = max(0, ap_lo), min(n_ap, ap_hi)
    sp = ct.spacing_zyx
    return {
        "axis": axis, "lr_axis": lr, "ap_axis": ap,
        "lr": (lr_lo, lr_hi), "ap": (ap_lo, ap_hi),
        "size_mm": ((lr_hi - lr_lo) * sp[lr], (ap_hi - ap_lo) * sp[ap]),
    }


def dark_area_per_slice(ct: CTVolume, roi: Dict[str, object], dark_hu: float = DARK_HU) -> np.ndarray:
    """Area (mm²) of voxels below ``dark_hu`` inside the ROI, for every slice in array order."""
    axis = int(roi["axis"])  # type: ignore[arg-type]
    sel = [slice(None)] * 3
    sel[int(roi["lr_axis"])] = slice(*roi["lr"])  # type: ignore[misc]
    sel[int(roi["ap_axis"])] = slice(*roi["ap"])  # type: ignore[misc]
    box = ct.array[tuple(sel)]
    other = tuple(a for a in range(3) if a != axis)
    return (box < dark_hu).sum(axis=other).astype(float) * _pixel_area_mm2(ct, axis)


def select_covid_ctset(
    ct: CTVolume,
    body: Optional[np.ndarray] = None,
    roi_lr_fraction: float = ROI_LR_FRACTION,
    roi_ap_range: Tuple[float, float] = ROI_AP_RANGE,
    dark_hu: float = DARK_HU,
    divisor: float = CTSET_DIVISOR,
) -> SliceSelection:
    """COVID-CTset slice selection in HU and physical coordinates (see module docstring).

    Args:
        body: optional full-resolution body mask (e.g. ``LungMasks.body``); else a coarse
            one is computed.
    """
    roi = covid_ctset_roi(ct, body, roi_lr_fraction, roi_ap_range)
    area = dark_area_per_slice(ct, roi, dark_hu)
    thr = float((area.max() - area.min()) / divisor)
    axis, pos = slice_axis(ct)
    keep = area > thr
    if not keep.any():
        raise LungsNotFoundError(
            "No slice shows open lung (air-density tissue in the centre of the chest); is this a chest CT?"
        )
    idx, p = _ordered(axis, pos, keep)
    return SliceSelection(axis, idx, p, area, thr, "covid_ctset", {"roi": roi, "dark_hu": dark_hu, "divisor": divisor})


def select_slices(
    ct: CTVolume,
    lungs: Optional[LungMasks] = None,
    method: str = "auto",
    min_area_fraction: float = LUNG_AREA_FRACTION,
) -> SliceSelection:
    """Select slices with the lung rule when a non-empty lung mask is given, else COVID-CTset.

    ``method`` forces ``"lungs"`` or ``"covid_ctset"``; ``"auto"`` chooses as above.
    """
    if method not in ("auto", "lungs", "covid_ctset"):
        raise ValueError(f"unknown slice selection method {method!r}")
    have_lungs = lungs is not None and bool(lungs.right.any() or lungs.left.any())
    if method == "lungs" or (method == "auto" and have_lungs):
        if lungs is None:
            raise LungsNotFoundError("Lung-based slice selection needs a lung mask.")
        return select_by_lungs(ct, lungs, min_area_fraction)
    body = lungs.body if lungs is not None and lungs.body is not None and lungs.body.any() else None
    return select_covid_ctset(ct, body)
