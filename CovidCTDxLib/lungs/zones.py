"""Lung zones for regional scoring: upper / middle / lower thirds per lung and a peripheral shell.

Why zones and not lobes: lobar fissures are not visible reliably on low-dose or thick-slice
CT and we ship no lobe model. Thirds of each lung's craniocaudal extent are the standard
stand-in of zone-based CT scores (e.g. the six-zone scores used for COVID-19 and ARDS, where
each lung is split into upper, middle and lower zones), and they map roughly onto lobes:
right upper/middle/lower zones ~ RUL/RML/RLL; left upper and middle zones together ~ LUL
(with the lingula), left lower ~ LLL.

Peripheral shell: DeepSC-COVID (Wang et al., IEEE TMI 2021, Finding 4) defines the
peripheral lung as the lung mask minus its erosion, slice by slice, by a disc of radius
``peripheral thickness``, and reports the peripheral lesion ratio (PLR) over thicknesses
from 0 to 35 mm (Fig. 1(i)). The exact thickness behind their quoted 62.4 % (COVID-19)
versus 24.5 % (CAP) did not survive in our copy of the paper (the formula and its value are
images), so we use 10 mm: it is inside the paper's 0-35 mm range, it is the radiological
meaning of "subpleural" (within ~1 cm of the pleura), and at this depth the shell holds
roughly a third of a typical lung, so a uniform lesion spread gives a PLR near 35 % while the
subpleural COVID-19 pattern lands well above and central CAP below. It is a parameter.

How the shell is measured: per axial slice, like the paper, with in-plane distances in mm
(Euclidean distance transform with ``sampling`` = pixel spacing). Per-slice is exact for any
slice thickness (a 3D erosion with 5 mm slices can only erode in 5 mm steps along z) and
keeps the paper's definition; each lung is eroded on its own so the shell follows each
lung's own pleura, including the mediastinal pleura. On sub-mm scans the distance runs on
~1.5 mm blocks (the shell boundary moves by at most one block) to keep the zones well
under a second on a 512x512x300 scan.
"""
from __future__ import annotations

import logging
from typing import Tuple

import numpy as np
from scipy import ndimage as ndi

from ..errors import LungsNotFoundError
from ..grid import bbox, paste_nearest
from ..result import LungZones
from ..volume import LPS_SUPERIOR, CTVolume

log = logging.getLogger(__name__)

#: Peripheral thickness (mm), see the module docstring for the choice.
PERIPHERAL_THICKNESS_MM = 10.0
#: In-plane block size (mm) on which the shell's distance transform runs for sub-mm scans.
SHELL_GRID_MM = 1.5


def compute_zones(
    ct: CTVolume,
    right: np.ndarray,
    left: np.ndarray,
    peripheral_thickness_mm: float = PERIPHERAL_THICKNESS_MM,
) -> LungZones:
    """Upper/middle/lower zone labels per lung and the peripheral shell.

    Args:
        ct: the CT (only its geometry is used).
        right, left: bool lung masks on the CT grid (z, y, x).
        peripheral_thickness_mm: depth of the peripheral shell, measured in-plane.

    Returns:
        LungZones whose ``labels`` follow ``LungZones.ZONE_NAMES`` (1..6, 0 outside) and
        whose ``peripheral`` mask is the per-slice shell of each lung.

    Raises:
        LungsNotFoundError: both lung masks are empty.
    """
    if right.shape != ct.shape or left.shape != ct.shape:
        raise ValueError(f"lung masks {right.shape}/{left.shape} do not match the CT {ct.shape}")
    if peripheral_thickness_mm < 0:
        raise ValueError("peripheral_thickness_mm must be >= 0")
    boxes = [bbox(right, 1), bbox(left, 1)]
    if boxes[0] is None and boxes[1] is None:
        raise LungsNotFoundError("The lung masks are empty, so no lung zones can be defined.")
    labels = np.zeros(ct.shape, np.uint8)
    peripheral = np.zeros(ct.shape, bool)
    for first_label, mask, box in ((1, right, boxes[0]), (4, left, boxes[1])):
        if box is None:
            continue
        sub = mask[box]
        labels[box] |= _thirds(ct, sub, box, first_label)
        peripheral[box] |= _shell(sub, ct.spacing, peripheral_thickness_mm)
    return LungZones(labels=labels, peripheral=peripheral, peripheral_thickness_mm=float(peripheral_thickness_mm))


def _superior_mm(ct: CTVolume, box: Tuple[slice, slice, slice]):
    """Per-slice generator of each voxel's superior coordinate (mm) inside ``box``.

    Why per slice: ``ct.lps_coordinate`` broadcasts to a full float32 volume; a slice at a
    time keeps memory at one 2D plane even for oblique scans.
    """
    step = (ct.direction @ np.diag(ct.spacing)).T @ LPS_SUPERIOR  # mm per i, j, k step
    offset = float(np.dot(ct.origin, LPS_SUPERIOR))
    j = np.arange(box[1].start, box[1].stop, dtype=np.float32)[:, None] * step[1]
    i = np.arange(box[2].start, box[2].stop, dtype=np.float32)[None, :] * step[0]
    plane = offset + j + i
    for k in range(box[0].start, box[0].stop):
        yield plane + k * step[2]


def _thirds(ct: CTVolume, sub: np.ndarray, box, first_label: int) -> np.ndarray:
    """Label the upper, middle and lower thirds of one lung's craniocaudal extent."""
    step = (ct.direction @ np.diag(ct.spacing)).T @ LPS_SUPERIOR
    if abs(step[0]) < 1e-6 and abs(step[1]) < 1e-6:
        return _thirds_axial(ct, sub, box, first_label, float(step[2]))
    lo, hi = np.inf, -np.inf
    for k, s in enumerate(_superior_mm(ct, box)):
        if sub[k].any():
            v = s[sub[k]]
            lo, hi = min(lo, float(v.min())), max(hi, float(v.max()))
    third = (hi - lo) / 3.0
    out = np.zeros(sub.shape, np.uint8)
    for k, s in enumerate(_superior_mm(ct, box)):
        if not sub[k].any():
            continue
        # 0 = upper, 1 = middle, 2 = lower (by distance below the apex).
        zone = np.clip(((hi - s) / max(third, 1e-6)).astype(np.int16), 0, 2)
        out[k] = np.where(sub[k], first_label + zone, 0)
    return out


def _thirds_axial(ct: CTVolume, sub: np.ndarray, box, first_label: int, step_k: float) -> np.ndarray:
    """Fast path when slices are axial: the superior coordinate is one value per slice."""
    offset = float(np.dot(ct.origin, LPS_SUPERIOR))
    ks = np.arange(box[0].start, box[0].stop)
    superior = offset + ks * step_k
    present = sub.any(axis=(1, 2))
    lo, hi = float(superior[present].min()), float(superior[present].max())
    third = max((hi - lo) / 3.0, 1e-6)
    zone = (first_label + np.clip(((hi - superior) / third).astype(np.int16), 0, 2)).astype(np.uint8)
    return sub * zone[:, None, None]


def _shell(sub: np.ndarray, spacing_xyz, thickness_mm: float) -> np.ndarray:
    """Lung minus its per-slice erosion by a disc of ``thickness_mm`` (in-plane mm).

    The in-plane Euclidean distance to the nearest non-lung pixel, one 2D distance
    transform per slice (the padded bounding box gives every slice a background border).
    Sub-mm scans are measured on blocks of ``SHELL_GRID_MM`` (a block is
    background when any of its pixels is): the shell is then exact to within one block,
    at a quarter of the cost.
    """
    out = np.zeros(sub.shape, bool)
    if thickness_mm <= 0:
        return out
    sy, sx = float(spacing_xyz[1]), float(spacing_xyz[0])
    fy, fx = max(1, int(SHELL_GRID_MM // sy)), max(1, int(SHELL_GRID_MM // sx))
    _, ny, nx = sub.shape
    py, px = (-ny) % fy, (-nx) % fx
    padded = np.pad(~sub, ((0, 0), (0, py), (0, px)), constant_values=True) if py or px else ~sub
    background = padded[:, ::fy, ::fx].copy()
    for dy in range(fy):  # strided ORs: ~6x faster than any() over the block axes
        for dx in range(fx):
            if dy or dx:
                background |= padded[:, dy::fy, dx::fx]
    inner = ~background
    near = np.zeros(inner.shape, bool)
    for k in np.flatnonzero(inner.any(axis=(1, 2))):
        near[k] = ndi.distance_transform_edt(inner[k], sampling=(sy * fy, sx * fx)) <= thickness_mm
    if fy > 1 or fx > 1:
        near = paste_nearest(near, sub.shape, (1, fy, fx))
    return sub & near
