"""Synthetic chest CT phantom with ground truth, and lesion insertion into real CTs.

Why a phantom: every stage (lung masking, lesion segmentation, classification, findings)
needs inputs with known answers; real annotated COVID scans cannot ship with the project.
The phantom is an analytic adult chest in patient millimetres (LPS, origin at the middle of
the chest), sampled on any grid, so the same anatomy appears at any spacing or size:

- air outside, a body outline with subcutaneous fat and muscle, a scanner table posterior;
- ribs and sternum (marrow + cortex), thoracic spine (vertebral bodies, discs, canal,
  posterior elements);
- mediastinum with heart, aorta, pulmonary trunk/arteries, SVC, oesophagus; the lungs meet
  at a narrow anterior junction;
- two lungs (~-870 HU, denser posteriorly, lobular texture) separated by the mediastinum;
  the right one bigger (three lobes; the left has two and the cardiac notch), with
  oblique and horizontal fissures and ground-truth lobe labels;
- trachea and main bronchi (air with walls), branching artery/vein trees thinning to the
  periphery, bronchi beside the arteries;
- scanner-like noise (correlated through the reconstruction blur) and blur (PSF);
- lesions (``phantom_lesions``) following the DeepSC-COVID findings, grown to an exact
  lesion volume ratio.

Geometry: ``make_phantom`` returns an identity-direction volume unless ``direction`` is a
signed permutation matrix; the anatomy is then generated on the canonical grid and the
axes permuted/flipped, so the patient's left lung is still at +x in LPS.

Speed (512x512x300 in ~4-6 s on 2 shared cores, ~1 GB peak; benchmarks/bench_phantom.py):
the random anatomy (vessel trees, lesion plans) is drawn in millimetres, independent of
the grid; tissue labels are made slice by slice on small boxes; smooth fields live on
coarse grids and are up-sampled per slice chunk; chunks are rendered on worker threads
with per-chunk noise seeds (so the result does not depend on the thread count) and
per-thread scratch buffers (fresh pages are expensive on VMs).
"""
from __future__ import annotations

import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from scipy import ndimage

from ..errors import InputError, VolumeTooLargeError
from .lesions import (
    CONSOLIDATION,
    CRAZY_PAVING,
    GGO,
    LESION_TYPE_NAMES,
    NONE,
    WS as _WS,
    LesionGrower,
    smooth_noise,
    upsample_linear,
)
from ..progress import Progress
from ..volume import CTVolume

log = logging.getLogger(__name__)

__all__ = [
    "Phantom",
    "InsertedLesions",
    "make_phantom",
    "insert_lesions",
    "severity_from_lvr",
    "SEVERITY_LVR_PERCENT",
    "KIND_LABELS",
    "LOBE_NAMES",
    "LESION_TYPE_NAMES",
    "NONE",
    "GGO",
    "CRAZY_PAVING",
    "CONSOLIDATION",
]

#: Lesion volume ratio (% of both lungs) bands per severity grade -- the project's own
#: convention, not taken from the papers (RACNet / COV19-CT-DB give the four class names,
#: not thresholds). Rationale: the common chest CT severity score rates each of the 5
#: lobes 0-5 by the fraction involved (1: <5 %, 2: 5-25 %, 3: 26-49 %, 4: 50-75 %,
#: 5: >75 %); involvement of <5 % of the lungs is a score of ~5 or less (mild), 5-15 % is
#: lobes at grade 2 (moderate), 15-30 % needs grade 2-3 in most lobes (severe), above
#: 30 % is diffuse disease (critical). The DeepSC-COVID means (COVID 14.3 %, CAP 4.4 %)
#: then read as "moderate" and "mild".
SEVERITY_LVR_PERCENT = {"mild": (1.0, 5.0), "moderate": (5.0, 15.0), "severe": (15.0, 30.0), "critical": (30.0, 50.0)}

#: Phantom kind -> classification label (result.CLASS_KEYS).
KIND_LABELS = {"covid": "covid19", "cap": "cap", "normal": "non_pneumonia"}

#: Default grid: 384 x 384 x 336 mm, the whole chest at 2 x 2 x 3.5 mm.
DEFAULT_SHAPE = (96, 192, 192)
DEFAULT_SPACING = (2.0, 2.0, 3.5)
#: Largest grid make_phantom builds (peak RSS ~13 bytes/voxel: ~2 GB for 512x512x600).
MAX_VOXELS = 512 * 512 * 600


def severity_from_lvr(lvr_percent: float) -> str:
    """Severity grade of a lesion volume ratio (percent of lung volume).

    Below the mild band (e.g. 0.3 %) is still "mild"; above 50 % is "critical".
    """
    lvr = float(lvr_percent)
    if not np.isfinite(lvr) or lvr < 0:
        raise InputError(f"Lesion volume ratio must be a non-negative percentage, got {lvr_percent}.")
    for name, (_lo, hi) in SEVERITY_LVR_PERCENT.items():
        if lvr < hi:
            return name
    return "critical"


@dataclass
class Phantom:
    """A synthetic chest CT and its ground truth (all masks bool on the CT grid, (z, y, x))."""

    ct: CTVolume
    right_lung: np.ndarray
    left_lung: np.ndarray
    airways: np.ndarray
    body: np.ndarray
    lesion: np.ndarray
    lesion_type: np.ndarray  # uint8: 0 none, 1 ggo, 2 crazy-paving, 3 consolidation
    label: str  # "covid19" | "cap" | "non_pneumonia"
    severity: Optional[str]
    lvr_percent: float
    kind: str = "normal"
    seed: int = 0
    lobes: Optional[np.ndarray] = None  # uint8: 0 outside the lungs, 1..5 = LOBE_NAMES order
    timings_s: Dict[str, float] = field(default_factory=dict)

    @property
    def lungs(self) -> np.ndarray:
        return self.right_lung | self.left_lung


@dataclass
class InsertedLesions:
    """A real CT with synthetic lesions inserted, and their ground truth."""

    ct: CTVolume
    lesion: np.ndarray
    lesion_type: np.ndarray
    lvr_percent: float


# =========================================================================== anatomy
# Patient millimetres, LPS: +x patient left, +y posterior, +z superior; origin mid-chest.
# Tissue labels of the clean phantom and their HU.
(AIR, FAT, MUSCLE, MEDIASTINUM, LUNG_R, LUNG_L, ABDOMEN, BLOOD, MARROW, CORTEX, DISC,
 TABLE_SHELL, TABLE_FOAM, AIRWAY, AIRWAY_WALL, CSF) = range(16)
_HU = np.zeros(16, dtype=np.float32)
_HU[[AIR, FAT, MUSCLE, MEDIASTINUM, LUNG_R, LUNG_L, ABDOMEN, BLOOD, MARROW, CORTEX, DISC,
     TABLE_SHELL, TABLE_FOAM, AIRWAY, AIRWAY_WALL, CSF]] = [
    -1000, -100, 45, -90, -870, -870, 55, 40, 250, 850, 80, 350, -900, -1000, 30, 15]

BODY_HALF = (157.0, 110.0)  # x, y of the skin ellipse
FAT_MM = 12.0
CAVITY_YC, CAVITY_HALF_Y, CAVITY_HALF_X = -5.0, 82.0, 128.0
RIB_THICK = 0.085  # of the cavity radius
LUNG_APEX_Z, LUNG_BASE_Z = 152.0, -160.0
MED_XC = 5.0
#: Fissures: oblique z = a + b * y (mm) per lung, right horizontal fissure height.
OBLIQUE_R, OBLIQUE_L, HORIZONTAL_FISSURE_Z = (-25.0, 1.1), (-15.0, 1.1), 5.0
OBLIQUE_LATERAL = 0.35
_FISSURE_HU = -150.0
LOBE_NAMES = ("right_upper", "right_middle", "right_lower", "left_upper", "left_lower")
APEX_C, APEX_R, APEX_H = (75.0, 0.0), (70.0, 90.0), 72.0
_MED_Y = np.array([-100.0, -62.0, -40.0, 0.0, 40.0, 100.0])
_MED_HALF = np.array([2.0, 3.0, 18.0, 28.0, 26.0, 22.0])
HEART_C, HEART_R = np.array([28.0, -25.0, -75.0]), np.array([62.0, 50.0, 55.0])
SPINE_BODY_C, SPINE_BODY_R = (0.0, 55.0), (19.0, 16.0)
CANAL_C, CANAL_R = (0.0, 83.0), 8.0
VERTEBRA_PITCH = 25.0
RIB_PITCH, RIB_HALF_H, RIB_DROP, RIB_TOP = 26.0, 5.0, 55.0, 165.0
TABLE_Y, TABLE_HALF_W = 114.0, 215.0
CARINA = np.array([0.0, 15.0, 55.0])

#: (start, end, radius, label) solid tubes painted over the mediastinum.
_TUBES: List[Tuple[Tuple[float, float, float], Tuple[float, float, float], float, int]] = [
    ((-8, 31, 400), (-8, 31, -400), 7.0, MUSCLE),  # oesophagus
    ((4, -18, -40), (4, -18, 75), 15.0, BLOOD),  # ascending aorta
    ((4, -18, 75), (26, 10, 80), 12.5, BLOOD),  # arch
    ((26, 10, 80), (24, 42, 72), 12.0, BLOOD),
    ((24, 42, 72), (22, 42, -400), 11.0, BLOOD),  # descending aorta
    ((14, -38, -35), (18, -22, 30), 14.0, BLOOD),  # pulmonary trunk
    ((18, -22, 30), (-40, 8, 22), 10.0, BLOOD),  # right pulmonary artery
    ((18, -22, 30), (45, 20, 35), 9.0, BLOOD),  # left pulmonary artery
    ((-22, -12, 400), (-22, -12, -30), 10.0, BLOOD),  # superior vena cava
    ((20, 10, -45), (-35, 5, -25), 8.0, BLOOD),  # right pulmonary veins -> left atrium
    ((20, 10, -45), (40, 8, -30), 8.0, BLOOD),  # left pulmonary veins
]
#: Trachea and main bronchi: (start, end, lumen radius, wall thickness).
_AIRWAYS = [
    ((0, 15, 400), tuple(CARINA), 9.0, 2.0),
    (tuple(CARINA), (-46, 17, 22), 7.0, 1.8),
    (tuple(CARINA), (50, 21, 5), 6.0, 1.8),
]
#: Vessel tree roots inside the lungs: (point, initial directions, radius).
_SX = {"right": -1.0, "left": 1.0}


def _cavity_half_x(z):
    return CAVITY_HALF_X - 15.0 * np.clip((z - 40.0) / 110.0, 0.0, 1.0)


def _diaphragm_z(x, y):
    right = 50.0 * np.exp(-(((x + 65.0) / 60.0) ** 2) - ((y + 5.0) / 70.0) ** 2)
    left = 40.0 * np.exp(-(((x - 65.0) / 60.0) ** 2) - ((y + 5.0) / 70.0) ** 2)
    return LUNG_BASE_Z + np.maximum(right, left)


def _apex_term(x, y):
    """Normalised radius of each lung's apical dome; the lung at height z lies where this is
    below (apex - z) / APEX_H, so the cross-section shrinks to a point at the apex."""
    xl = np.where(x < MED_XC, -APEX_C[0], APEX_C[0])
    return ((x - xl) / APEX_R[0]) ** 2 + ((y - APEX_C[1]) / APEX_R[1]) ** 2


def _lung_side(x, y, z):
    """0 outside, 1 right lung, 2 left lung, for broadcastable LPS coordinate arrays.

    Lungs = thoracic cavity minus the mediastinal band (narrow anteriorly: the anterior
    junction), above the diaphragm, below the apices, minus the heart.
    """
    x, y, z = np.broadcast_arrays(*(np.asarray(a, dtype=np.float32) for a in (x, y, z)))
    cx = _cavity_half_x(z)
    inside = (x / cx) ** 2 + ((y - CAVITY_YC) / CAVITY_HALF_Y) ** 2 < 1.0
    m = np.interp(y, _MED_Y, _MED_HALF)
    inside &= z > _diaphragm_z(x, y)
    inside &= z < LUNG_APEX_Z
    # Apices: each lung's cross-section shrinks to a dome.
    s2 = np.maximum((LUNG_APEX_Z - z) / APEX_H, 1e-6)
    inside &= _apex_term(x, y) < s2
    heart = (((x - HEART_C[0]) / HEART_R[0]) ** 2 + ((y - HEART_C[1]) / HEART_R[1]) ** 2
             + ((z - HEART_C[2]) / HEART_R[2]) ** 2) < 1.0
    inside &= ~heart
    side = np.zeros(x.shape, dtype=np.uint8)
    side[inside & (x < MED_XC - m)] = 1
    side[inside & (x > MED_XC + m)] = 2
    return side


def _segment_distance(px, py, pz, a, b):
    """Distance of broadcast points to segment a-b (float32)."""
    a = np.asarray(a, np.float32)
    ab = np.asarray(b, np.float32) - a
    L2 = float(ab @ ab) or 1e-6
    dx, dy, dz = px - a[0], py - a[1], pz - a[2]
    t = np.clip((dx * ab[0] + dy * ab[1] + dz * ab[2]) / L2, 0.0, 1.0)
    return np.sqrt((dx - t * ab[0]) ** 2 + (dy - t * ab[1]) ** 2 + (dz - t * ab[2]) ** 2)


class _Canonical:
    """Identity-direction grid centred on the chest: 1-D LPS coordinates per axis."""

    def __init__(self, shape: Tuple[int, int, int], spacing: Tuple[float, float, float]):
        self.shape = shape
        self.spacing = spacing
        nz, ny, nx = shape
        sx, sy, sz = spacing
        self.x = ((np.arange(nx) - (nx - 1) / 2.0) * sx).astype(np.float32)
        self.y = ((np.arange(ny) - (ny - 1) / 2.0) * sy).astype(np.float32)
        self.z = ((np.arange(nz) - (nz - 1) / 2.0) * sz).astype(np.float32)
        self.origin = (float(self.x[0]), float(self.y[0]), float(self.z[0]))

    def index_range(self, coord: np.ndarray, lo: float, hi: float) -> Optional[slice]:
        """Slice of the indices whose coordinate lies in [lo, hi] (uniform grid: arithmetic)."""
        c0, step, n = float(coord[0]), float(coord[1] - coord[0]) if len(coord) > 1 else 1.0, len(coord)
        i0 = max(int(np.ceil((lo - c0) / step - 1e-6)), 0)
        i1 = min(int(np.floor((hi - c0) / step + 1e-6)) + 1, n)
        return slice(i0, i1) if i1 > i0 else None

    def index_box(self, lo: np.ndarray, hi: np.ndarray) -> Optional[Tuple[slice, slice, slice]]:
        """(z, y, x) slices of voxels whose centres lie within the LPS box [lo, hi]."""
        out = []
        for coord, a, b in ((self.z, lo[2], hi[2]), (self.y, lo[1], hi[1]), (self.x, lo[0], hi[0])):
            s = self.index_range(coord, a, b)
            if s is None:
                return None
            out.append(s)
        return tuple(out)  # type: ignore[return-value]


def _paint_tube_slice(sl: np.ndarray, grid: _Canonical, z: float, a, b, radius: float, label: int, only=None) -> None:
    """Paint one axial slice of a solid tube (segment a-b, radius), on its 2-D bounding box."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    lo, hi = np.minimum(a, b) - radius, np.maximum(a, b) + radius
    if not (lo[2] <= z <= hi[2]):
        return
    # Restrict the x/y box to the part of the segment within reach of this z.
    ab = b - a
    if abs(ab[2]) > 1e-6:
        t0, t1 = sorted(((z - radius - a[2]) / ab[2], (z + radius - a[2]) / ab[2]))
        t0, t1 = max(t0, 0.0), min(t1, 1.0)
        p0, p1 = a + t0 * ab, a + t1 * ab
        lo[:2], hi[:2] = np.minimum(p0, p1)[:2] - radius, np.maximum(p0, p1)[:2] + radius
    ys = grid.index_range(grid.y, lo[1], hi[1])
    xs = grid.index_range(grid.x, lo[0], hi[0])
    if ys is None or xs is None:
        return
    d = _segment_distance(grid.x[xs][None, :], grid.y[ys][:, None], np.float32(z), a, b)
    sel = d < radius
    view = sl[ys, xs]
    if only is not None:
        sel &= np.isin(view, only)
    view[sel] = label


class _Anatomy:
    """Axial-slice generator of tissue labels; z-invariant maps are computed once."""

    def __init__(self, grid: _Canonical, hilar_vessels=()):
        self.grid = grid
        self.hilar_vessels = list(hilar_vessels)
        X = grid.x[None, :]
        Y = grid.y[:, None]
        ny, nx = grid.shape[1:]
        sec = np.zeros((ny, nx), dtype=np.uint8)
        ty = TABLE_Y - 0.0005 * X ** 2
        in_table_x = np.abs(X) < TABLE_HALF_W
        # Carbon-fibre shells (3 mm) around a foam core, curved up at the sides.
        sec[in_table_x & (Y >= ty) & (Y < ty + 18.0)] = TABLE_FOAM
        sec[in_table_x & (((Y >= ty) & (Y < ty + 3.0)) | ((Y >= ty + 15.0) & (Y < ty + 18.0)))] = TABLE_SHELL
        self.body = (X / BODY_HALF[0]) ** 2 + (Y / BODY_HALF[1]) ** 2 < 1.0
        sec[self.body] = FAT
        inner = (X / (BODY_HALF[0] - FAT_MM)) ** 2 + (Y / (BODY_HALF[1] - FAT_MM)) ** 2 < 1.0
        sec[inner] = MUSCLE
        self.sec = sec
        # Everything below is evaluated on small boxes: the thoracic cavity (its widest,
        # at the base), the spine and the sternum.
        cyy = Y - CAVITY_YC
        full = (ny, nx)
        self.cbox = _bbox2d(np.broadcast_to((X / CAVITY_HALF_X) ** 2 + (cyy / CAVITY_HALF_Y) ** 2 < 1.0, full))
        cb = self.cbox
        Xc, Yc = X[:, cb[1]], Y[cb[0], :]
        self.x2 = Xc ** 2
        self.cy2 = ((Yc - CAVITY_YC) / CAVITY_HALF_Y) ** 2
        self.zd = np.ascontiguousarray(np.broadcast_to(_diaphragm_z(Xc, Yc), self._cshape()).astype(np.float32))
        m = np.interp(Yc, _MED_Y, _MED_HALF)
        self.med_right = np.ascontiguousarray(np.broadcast_to(Xc < MED_XC - m, self._cshape()))
        self.med_left = np.ascontiguousarray(np.broadcast_to(Xc > MED_XC + m, self._cshape()))
        self.apex = np.ascontiguousarray(np.broadcast_to(_apex_term(Xc, Yc), self._cshape()).astype(np.float32))
        self.heart = (((Xc - HEART_C[0]) / HEART_R[0]) ** 2 + ((Yc - HEART_C[1]) / HEART_R[1]) ** 2).astype(np.float32)
        # Ribs live on a ring just outside the cavity (full plane, handled as flat indices).
        self.x2_full = X ** 2
        self.cy2_full = np.broadcast_to((cyy / CAVITY_HALF_Y) ** 2, full)
        phi_cos = cyy / np.maximum(np.hypot(X, cyy), 1e-3)  # 1 posterior, -1 anterior
        self.rib_drop = np.broadcast_to(RIB_DROP * (1.0 - phi_cos) / 2.0, full).astype(np.float32)
        self.no_rib = np.broadcast_to((np.abs(X) < 28.0) & (Y < 0), full)
        sternum = np.broadcast_to((np.abs(X) < 17.0) & (Y > -CAVITY_HALF_Y + CAVITY_YC - 11.0)
                                  & (Y < -CAVITY_HALF_Y + CAVITY_YC + 1.0), full)
        self.stbox = _bbox2d(sternum)
        self.sternum = sternum[self.stbox]
        self.sternum_cortex = self.sternum & ~ndimage.binary_erosion(self.sternum, iterations=1, border_value=0)
        rc = np.hypot(X - CANAL_C[0], Y - CANAL_C[1])
        vb = ((X - SPINE_BODY_C[0]) / SPINE_BODY_R[0]) ** 2 + ((Y - SPINE_BODY_C[1]) / SPINE_BODY_R[1]) ** 2
        post = ((rc >= CANAL_R) & (rc < CANAL_R + 6.0) & (Y > CANAL_C[1] - 6.0)) | (
            (np.abs(X) < 4.0) & (Y > CANAL_C[1] + CANAL_R) & (Y < 100.0)) | ((np.abs(X) < 34.0) & (np.abs(Y - 79.0) < 5.0))
        vb_all = np.broadcast_to(vb < 1.0, full)
        vb_cortex = np.broadcast_to((vb >= 0.75) & (vb < 1.0), full) | post
        canal = np.broadcast_to(rc < CANAL_R, full)
        self.sbox = _bbox2d(vb_all | vb_cortex | canal)
        self.vb, self.vb_cortex, self.canal = vb_all[self.sbox], vb_cortex[self.sbox], canal[self.sbox]
        self._ring_cache: Tuple[float, np.ndarray, np.ndarray, np.ndarray] = (np.nan, None, None, None)  # type: ignore

    def _cshape(self) -> Tuple[int, int]:
        return (self.cbox[0].stop - self.cbox[0].start, self.cbox[1].stop - self.cbox[1].start)

    def _ring(self, cx: float):
        """Cavity mask (cavity box) and the rib ring (flat indices, their rho) for a cavity
        half-width."""
        if self._ring_cache[0] != cx:
            cavity = self.x2 * (1.0 / cx ** 2) + self.cy2 < 1.0
            rho2 = self.x2_full * (1.0 / cx ** 2) + self.cy2_full
            ring = np.flatnonzero((rho2 >= 1.0) & (rho2 < (1.0 + RIB_THICK) ** 2) & ~self.no_rib)
            self._ring_cache = (cx, cavity, ring, np.sqrt(rho2.reshape(-1)[ring]))
        return self._ring_cache[1:]

    def slice_labels(self, z: float) -> np.ndarray:
        sl = self.sec.copy()
        cavity, ring, rho = self._ring(float(_cavity_half_x(z)))
        c = sl[self.cbox]
        np.copyto(c, MEDIASTINUM, where=cavity)
        below = self.zd >= z
        np.copyto(c, ABDOMEN, where=cavity & below)
        if z < LUNG_APEX_Z:
            lung = cavity & ~below & (self.apex < max((LUNG_APEX_Z - z) / APEX_H, 1e-6))
            hz = 1.0 - ((z - HEART_C[2]) / HEART_R[2]) ** 2
            if hz > 0:
                lung &= self.heart >= hz
            np.copyto(c, LUNG_R, where=lung & self.med_right)
            np.copyto(c, LUNG_L, where=lung & self.med_left)
            if hz > 0:
                np.copyto(c, BLOOD, where=self.heart < hz)
        # Ribs: bands around the cavity, sloping down anteriorly.
        u = (z + self.rib_drop.reshape(-1)[ring] - RIB_TOP) / RIB_PITCH
        kk = np.round(u)
        dz = np.abs(u - kk) * RIB_PITCH
        is_rib = (dz < RIB_HALF_H) & (kk <= 0) & (kk > -12)
        cortex = (dz > RIB_HALF_H - 1.5) | (rho < 1.012) | (rho > 1.0 + RIB_THICK - 0.012)
        flat = sl.reshape(-1)
        flat[ring[is_rib]] = np.where(cortex[is_rib], CORTEX, MARROW)
        if -115.0 < z < 110.0:
            st = sl[self.stbox]
            np.copyto(st, MARROW, where=self.sternum)
            np.copyto(st, CORTEX, where=self.sternum_cortex)
        sp = sl[self.sbox]
        if (z - 3.0) % VERTEBRA_PITCH < 5.0:
            np.copyto(sp, DISC, where=self.vb)
        else:
            np.copyto(sp, MARROW, where=self.vb)
            np.copyto(sp, CORTEX, where=self.vb_cortex)
        np.copyto(sp, CSF, where=self.canal)
        for a, b, r, lab in _TUBES:
            _paint_tube_slice(sl, self.grid, z, a, b, r, lab, only=_SOFT)
        for a, b, r, w in _AIRWAYS:
            _paint_tube_slice(sl, self.grid, z, a, b, r + w, AIRWAY_WALL, only=_SOFT + [BLOOD])
        for a, b, r, w in _AIRWAYS:
            _paint_tube_slice(sl, self.grid, z, a, b, r, AIRWAY)
        # Large vessels at the hila are not lung (as in the reference lung masks).
        for a, b, r in self.hilar_vessels:
            _paint_tube_slice(sl, self.grid, z, a, b, r, BLOOD, only=_HILAR_OVER)
        return sl


def _bbox2d(mask: np.ndarray) -> Tuple[slice, slice]:
    """Bounding box (row, column slices) of a 2-D mask; an empty 1x1 box if it is empty."""
    rows, cols = np.nonzero(mask.any(axis=1))[0], np.nonzero(mask.any(axis=0))[0]
    if rows.size == 0:
        return slice(0, 1), slice(0, 1)
    return slice(int(rows[0]), int(rows[-1]) + 1), slice(int(cols[0]), int(cols[-1]) + 1)


_SOFT = [MEDIASTINUM, LUNG_R, LUNG_L, ABDOMEN, MUSCLE]
_HILAR_OVER = [MEDIASTINUM, LUNG_R, LUNG_L]
_HILAR_LENGTH = 12.0  # mm of each hilar vessel left out of the lung
#: Where the pulmonary arteries and veins enter each lung (mm, LPS), right then left.
_HILA = {"artery": (np.array([-48.0, 10.0, 24.0]), np.array([48.0, 10.0, 24.0])),
         "vein": (np.array([-40.0, 4.0, -28.0]), np.array([40.0, 4.0, -28.0]))}


def _hilar_vessels(segments) -> List[Tuple[np.ndarray, np.ndarray, float]]:
    """The first segment of each hilar tree: large vessels joined to the mediastinal
    pulmonary arteries/veins, which reference lung masks leave out of the lungs (thinner
    intrapulmonary vessels are lung)."""
    roots = np.array([p for pair in _HILA.values() for p in pair])
    starts = np.array([s[0] for s in segments]).reshape(-1, 3)
    at_root = np.any(np.all(np.abs(starts[:, None, :] - roots[None]) < 1e-6, axis=2), axis=1)
    out = []
    for i in np.flatnonzero(at_root):
        a, b, r, _artery = segments[i]
        # Only the proximal part, which joins the mediastinal vessels in every slice;
        # further out the vessel is surrounded by lung, and lung masks fill it in.
        length = float(np.linalg.norm(b - a))
        out.append((a, a + (b - a) * min(1.0, _HILAR_LENGTH / max(length, 1e-6)), r))
    return out


# --------------------------------------------------------------------------- vessels
_OUTWARD = 0.4


def _grow_trees(rng: np.random.Generator, roots, max_segments: int):
    """Bronchovascular trees: segments (a, b, r, is_artery) branching and thinning outwards.

    Grown generation by generation for all trees at once so the inside-the-lung tests are
    vectorised. Each segment is 5-8 radii long; a branch point gives a major child
    (0.78-0.9 r, small angle) and a minor one (0.5-0.7 r, larger angle); a branch that
    cannot stay in its lung after a few bends ends. Children lean away from the hilum, so
    the trees reach the periphery instead of curling around the centre.
    """
    P = np.array([r[0] for r in roots], float)
    D = np.array([r[1] for r in roots], float)
    D /= np.linalg.norm(D, axis=1, keepdims=True)
    R = np.array([r[2] for r in roots], float)
    S = np.array([r[3] for r in roots], np.uint8)
    A = np.array([r[4] for r in roots], bool)
    H = P.copy()  # each branch's hilum (tree root): branches are pulled away from it
    segments: List[Tuple[np.ndarray, np.ndarray, float, bool]] = []
    while len(P) and len(segments) < max_segments:
        length = np.maximum(3.0, R * rng.uniform(5.0, 8.0, len(R)))
        ok = np.zeros(len(P), bool)
        Q = P.copy()
        for _try in range(4):
            todo = ~ok
            Q[todo] = P[todo] + D[todo] * length[todo, None]
            ok[todo] = _lung_side(Q[todo, 0], Q[todo, 1], Q[todo, 2]) == S[todo]
            if ok.all():
                break
            bad = ~ok
            D[bad] += rng.normal(0.0, 0.6, (int(bad.sum()), 3))
            D[bad] /= np.linalg.norm(D[bad], axis=1, keepdims=True)
            length[bad] *= 0.7
        P, Q, D, R, S, A, H = P[ok], Q[ok], D[ok], R[ok], S[ok], A[ok], H[ok]
        segments.extend(zip(P, Q, R, A))
        grow = R >= 0.45
        P, Q, D, R, S, A, H = P[grow], Q[grow], D[grow], R[grow], S[grow], A[grow], H[grow]
        n = len(P)
        perp = np.cross(D, rng.standard_normal((n, 3)))
        perp /= np.linalg.norm(perp, axis=1, keepdims=True) + 1e-9
        a1 = rng.uniform(0.15, 0.45, n)[:, None]
        a2 = -rng.uniform(0.5, 0.9, n)[:, None]
        radial = Q - H
        radial /= np.linalg.norm(radial, axis=1, keepdims=True) + 1e-9
        D1 = D * np.cos(a1) + perp * np.sin(a1) + _OUTWARD * radial
        D2 = D * np.cos(a2) + perp * np.sin(a2) + _OUTWARD * radial
        P = np.concatenate([Q, Q])
        D = np.concatenate([D1, D2])
        D /= np.linalg.norm(D, axis=1, keepdims=True)
        H = np.concatenate([H, H])
        R = np.concatenate([R * rng.uniform(0.78, 0.9, n), R * rng.uniform(0.5, 0.7, n)])
        S = np.concatenate([S, S])
        A = np.concatenate([A, A])
    return segments[:max_segments]


def _bronchi(segments) -> List[Tuple[np.ndarray, np.ndarray, float, float]]:
    """Bronchi running beside the arteries (bronchovascular bundles): (a, b, lumen r, outer r).

    The bronchus has about the artery's calibre and sits against it, on the side given by
    a fixed reference direction so consecutive segments line up. Only bronchi with a
    lumen >= 0.8 mm are drawn (smaller ones are invisible on CT).
    """
    out = []
    for a, b, r, artery in segments:
        if not artery or r < 1.1:
            continue
        d = (b - a) / (np.linalg.norm(b - a) + 1e-9)
        k = np.array([0.0, 0.0, 1.0]) if abs(d[2]) < 0.85 else np.array([0.0, 1.0, 0.0])
        e = k - k.dot(d) * d
        e /= np.linalg.norm(e) + 1e-9
        lumen = 0.75 * r
        outer = lumen + max(0.5, 0.2 * r)
        off = (r + outer + 0.2) * e
        out.append((a + off, b + off, lumen, outer))
    return out


def _vessel_segments(rng: np.random.Generator, max_segments: int = 14000, peripheral_seeds: int = 110):
    """Pulmonary artery and vein trees of both lungs (independent of the grid).

    Hilar trees give the large central vessels; small trees seeded throughout each lung
    (pointing away from the hilum) stand in for the many peripheral branches a 13-level
    tree would need, at a fraction of the segments.
    """
    roots = []
    for name, side in (("right", 1), ("left", 2)):
        sx = _SX[name]
        art, vein = _HILA["artery"][side - 1], _HILA["vein"][side - 1]
        for d in ((0.4 * sx, 0.0, 1.0), (1.0 * sx, -0.3, 0.2), (0.6 * sx, -1.0, -0.4), (0.3 * sx, 0.6, -1.0),
                  (0.8 * sx, 0.2, -0.8)):
            roots.append((art, d, 4.5, side, True))
        for d in ((0.5 * sx, -0.5, 0.9), (1.0 * sx, 0.1, -0.3), (0.5 * sx, 0.5, -1.0), (0.7 * sx, -0.6, -0.6)):
            roots.append((vein, d, 4.0, side, False))
        # Peripheral seeds: uniform in the lung (rejection sampling), radius 0.8-1.4 mm.
        hilum = (art + vein) / 2.0
        pts = np.empty((0, 3))
        while len(pts) < peripheral_seeds:
            cand = rng.uniform((-130.0, -90.0, LUNG_BASE_Z), (130.0, 80.0, LUNG_APEX_Z), (4 * peripheral_seeds, 3))
            cand[:, 0] = sx * np.abs(cand[:, 0])
            pts = np.concatenate([pts, cand[_lung_side(cand[:, 0], cand[:, 1], cand[:, 2]) == side]])
        for p in pts[:peripheral_seeds]:
            d = p - hilum + rng.normal(0.0, 20.0, 3)
            roots.append((p, d, float(rng.uniform(0.8, 1.4)), side, bool(rng.random() < 0.5)))
    return _grow_trees(rng, roots, max_segments)


def _tube_fractions(grid: _Canonical, vessels, bronchi) -> Tuple[np.ndarray, np.ndarray]:
    """Partial-volume fractions (uint8 0..255, soft edges over one voxel) of soft tissue
    (vessels, bronchi out to their outer wall) and of air (bronchial lumen)."""
    soft = np.zeros(grid.shape, dtype=np.uint8)
    air = np.zeros(grid.shape, dtype=np.uint8)
    h = float(np.prod(grid.spacing) ** (1.0 / 3.0))
    tubes = [(a, b, r, None) for a, b, r, _art in vessels] + [(a, b, outer, lumen) for a, b, lumen, outer in bronchi]
    for a, b, r_soft, r_air in tubes:
        if r_soft < 0.2 * h:
            continue  # far below the voxel size: invisible, skip the work
        reach = r_soft + 0.5 * h
        box = grid.index_box(np.minimum(a, b) - reach, np.maximum(a, b) + reach)
        if box is None:
            continue
        d = _segment_distance(grid.x[box[2]][None, None, :], grid.y[box[1]][None, :, None],
                              grid.z[box[0]][:, None, None], a, b)
        # fraction = (0.5 + (radius - distance) / h) * min(1, 2 radius / h): a soft edge one
        # voxel wide, scaled down for sub-voxel tubes so their cross-section is conserved.
        d *= np.float32(-1.0 / h)
        for radius, acc in ((r_soft, soft), (r_air, air)):
            if radius is None:
                continue
            frac = d + np.float32(0.5 + radius / h)
            if 2.0 * radius < h:
                frac *= np.float32(2.0 * radius / h)
            np.maximum(acc[box], _to_u8(frac), out=acc[box])
    return soft, air


def _to_u8(frac: np.ndarray) -> np.ndarray:
    return np.clip(frac * 255.0, 0.0, 255.0).astype(np.uint8)


# --------------------------------------------------------------------------- noise / PSF
def _psf_sigma_vox(spacing_xyz: Sequence[float]) -> Tuple[float, float]:
    """Gaussian PSF sigma (in-plane y, x) in voxels: ~1.1 mm FWHM (sharp lung kernel),
    never below 0.5 voxel so coarse grids are anti-aliased."""
    sx, sy, _sz = spacing_xyz
    return (max(0.5, 0.47 / sy), max(0.5, 0.47 / sx))


#: Std of the uniform int8 noise source (values -128..127).
_INT8_STD = float(np.sqrt((256 ** 2 - 1) / 12.0))
#: Worker threads for the slice loops (numpy releases the GIL in its array loops).
_WORKERS = max(1, min(4, os.cpu_count() or 1))


def _noise_gain(sigma: Sequence[float]) -> float:
    """Std of unit white noise after the in-plane PSF."""
    rng = np.random.default_rng(12345)
    block = _psf_inplane(rng.standard_normal((8, 96, 96), dtype=np.float32), sigma)
    return float(block[:, 2:-2, 2:-2].std())




def _psf_inplane(block: np.ndarray, sigma: Sequence[float]) -> np.ndarray:
    """Gaussian in-plane blur of a (k, y, x) float32 block, in place (returns ``block``).

    For sigma <= 0.8 voxel a 3-tap kernel is exact to ~1 % and twice as fast as
    scipy's 5-tap filter; wider PSFs (sub-0.6 mm pixels) use scipy.
    """
    if max(sigma) > 0.8:
        return ndimage.gaussian_filter(block, (0.0, *sigma), mode="nearest", truncate=3.0, output=block)
    for axis, s in ((1, sigma[0]), (2, sigma[1])):
        e = np.exp(-1.0 / (2.0 * s * s))
        w = np.float32(e / (1.0 + 2.0 * e))

        def at(sl: slice) -> tuple:
            idx = [slice(None)] * 3
            idx[axis] = sl
            return tuple(idx)

        src = _WS.get("psf_src", block.shape, np.float32)
        np.copyto(src, block)
        pair_shape = list(block.shape)
        pair_shape[axis] -= 2
        pair = _WS.get(f"psf_pair{axis}", tuple(pair_shape), np.float32)
        # out[i] = (1 - 2w) x[i] + w (x[i-1] + x[i+1]), edges replicated.
        block *= np.float32(1.0 - 2.0 * w)
        np.add(src[at(slice(0, -2))], src[at(slice(2, None))], out=pair)
        pair *= w
        block[at(slice(1, -1))] += pair
        block[at(slice(0, 1))] += w * (src[at(slice(0, 1))] + src[at(slice(1, 2))])
        block[at(slice(-1, None))] += w * (src[at(slice(-1, None))] + src[at(slice(-2, -1))])
    return block


def _scanner(block: np.ndarray, out: np.ndarray, sigma: Sequence[float], scale: float,
             rng: np.random.Generator) -> None:
    """Noise then PSF blur (which correlates the noise like a reconstruction kernel), written
    as int16 HU into ``out``; ``block`` (float32) is used as scratch.

    The noise source is uniform random bytes (cheap); after the blur sums neighbours it is
    close to Gaussian, with std ``scale * _INT8_STD * gain`` (= the requested noise).
    Slices are independent (no z blur: the slice sampling is the z resolution).
    """
    noise = np.frombuffer(rng.bytes(block.size), dtype=np.int8).reshape(block.shape)
    tmp = _WS.get("noise", block.shape, np.float32)
    np.multiply(noise, np.float32(scale), out=tmp, dtype=np.float32)
    block += tmp
    _psf_inplane(block, sigma)
    np.rint(block, out=block)
    out[...] = block  # values stay within -1100..3000, well inside int16
    np.maximum(out, -1024, out=out)  # the scanner's air floor


# =========================================================================== public API
def _check_kind(kind: str) -> str:
    if kind not in KIND_LABELS:
        raise InputError(f"Unknown phantom kind {kind!r}; use one of {sorted(KIND_LABELS)}.")
    return kind


def _resolve_lvr(kind: str, severity: Optional[str], lvr_percent: Optional[float], rng) -> Tuple[Optional[str], float]:
    if kind == "normal":
        if lvr_percent not in (None, 0, 0.0):
            raise InputError("A 'normal' phantom has no lesions; do not give lvr_percent.")
        return None, 0.0
    if lvr_percent is not None:
        lvr = float(lvr_percent)
        if not (0.05 <= lvr <= 60.0):
            raise InputError(f"lvr_percent must be between 0.05 and 60 %, got {lvr_percent}.")
        return severity_from_lvr(lvr), lvr
    if severity is None:
        severity = "moderate" if kind == "covid" else "mild"
    if severity not in SEVERITY_LVR_PERCENT:
        raise InputError(f"Unknown severity {severity!r}; use one of {list(SEVERITY_LVR_PERCENT)}.")
    lo, hi = SEVERITY_LVR_PERCENT[severity]
    return severity, float(rng.uniform(lo + 0.1 * (hi - lo), hi - 0.1 * (hi - lo)))


def _permutation(direction: Optional[np.ndarray]) -> Optional[np.ndarray]:
    if direction is None:
        return None
    d = np.asarray(direction, float).reshape(3, 3)
    if not np.allclose(np.abs(d), np.round(np.abs(d))) or not np.allclose(np.abs(d).sum(0), 1) \
            or not np.allclose(np.abs(d).sum(1), 1):
        raise InputError("make_phantom supports only axis-aligned directions (signed permutation matrices).")
    return np.round(d)


def make_phantom(
    kind: str = "covid",
    severity: Optional[str] = None,
    lvr_percent: Optional[float] = None,
    shape: Sequence[int] = DEFAULT_SHAPE,
    spacing: Sequence[float] = DEFAULT_SPACING,
    seed: int = 0,
    direction: Optional[np.ndarray] = None,
    noise_hu: float = 20.0,
    progress: Optional[Progress] = None,
) -> Phantom:
    """Build a synthetic chest CT with ground truth.

    Args:
        kind: "covid", "cap" or "normal".
        severity: "mild".."critical"; the LVR is drawn from its band with ``seed``.
        lvr_percent: exact lesion volume ratio to reach (overrides ``severity``).
        shape: array shape (z, y, x). The chest's physical size is fixed (~330 mm wide,
            ~310 mm of lungs craniocaudally); a short grid covers part of it.
        spacing: voxel size (x, y, z) mm.
        seed: everything random derives from ``numpy.random.default_rng(seed)``.
        direction: optional signed-permutation LPS direction (columns = i, j, k axes).
        noise_hu: standard deviation of the (correlated) image noise.
        progress: optional progress reporter / cancel flag (raises CancelledError).
    """
    _check_kind(kind)
    shape = tuple(int(n) for n in shape)
    spacing = tuple(float(s) for s in spacing)
    if len(shape) != 3 or len(spacing) != 3 or min(shape) < 2 or min(spacing) <= 0:
        raise InputError(f"shape must be 3 positive sizes (z, y, x) and spacing 3 positive mm, got {shape}, {spacing}.")
    n_vox = int(np.prod(shape))
    if n_vox > MAX_VOXELS:
        raise VolumeTooLargeError(
            f"A {shape} phantom has {n_vox / 1e6:.0f} M voxels and would need ~{n_vox * 13 / 2**30:.1f} GB; "
            f"the limit is {MAX_VOXELS / 1e6:.0f} M voxels (e.g. 512x512x600). Use a coarser spacing."
        )
    perm = _permutation(direction)
    rng = np.random.default_rng(seed)
    sev, lvr = _resolve_lvr(kind, severity, lvr_percent, rng)

    # Canonical (identity-direction) shape/spacing: LPS axis p gets the array axis whose
    # direction column points along p.
    if perm is None:
        cshape, cspacing = shape, spacing
    else:
        idx_axis_for_lps = [int(np.argmax(np.abs(perm[p]))) for p in range(3)]  # i/j/k axis along L, P, S
        cspacing = tuple(spacing[c] for c in idx_axis_for_lps)
        cshape = tuple(shape[2 - idx_axis_for_lps[p]] for p in (2, 1, 0))
    grid = _Canonical(cshape, cspacing)
    nz, ny, nx = cshape

    # Grid-independent random anatomy first, so every grid shows the same patient.
    clock = _Clock()
    segments = _vessel_segments(rng)
    # Lung parenchyma: gravity-dependent gradient (denser posteriorly, +0.25 HU/mm) and a
    # lobular texture, as a smooth 4 mm-pitch field up-sampled chunk by chunk.
    f = tuple(max(1, int(round(4.0 / s))) for s in (cspacing[2], cspacing[1], cspacing[0]))
    shape_c = tuple(-(-(n - 1) // fa) + 1 for n, fa in zip(cshape, f))
    tex_c = 12.0 * smooth_noise(rng, shape_c, (1.0, 1.0, 1.0))
    tex_c += (0.25 * (grid.y[0] + np.arange(shape_c[1]) * f[1] * cspacing[1]))[None, :, None].astype(np.float32)
    clock("vessel trees")

    hilar = _hilar_vessels(segments)
    labels = np.empty(cshape, dtype=np.uint8)
    # Masks start as (lazily mapped) zeros and are written only where their structure can
    # be: untouched pages cost nothing, touched ones a page fault each.
    right = np.zeros(cshape, dtype=bool)
    left = np.zeros(cshape, dtype=bool)
    airways = np.zeros(cshape, dtype=bool)
    airway_top = max(max(a[2], b[2]) + r + w for a, b, r, w in _AIRWAYS)
    airway_bottom = min(min(a[2], b[2]) - r - w for a, b, r, w in _AIRWAYS)

    def label_slices(k0: int, k1: int) -> None:
        anatomy = _Anatomy(grid, hilar)  # one per thread: it caches per-slice state
        cb = anatomy.cbox  # the lungs lie inside the thoracic cavity's box
        for k in range(k0, k1):
            z = float(grid.z[k])
            labels[k] = anatomy.slice_labels(z)
            if z < LUNG_APEX_Z:
                np.equal(labels[k][cb], LUNG_R, out=right[k][cb])
                np.equal(labels[k][cb], LUNG_L, out=left[k][cb])
            if airway_bottom <= z <= airway_top:
                np.equal(labels[k], AIRWAY, out=airways[k])

    bounds = np.linspace(0, nz, 4 * _WORKERS + 1).astype(int)
    with (ThreadPoolExecutor(_WORKERS) if _WORKERS > 1 else nullcontext()) as pool:
        # Vessel rasterisation (Python-heavy) overlaps the anatomy and lesion planning
        # (numpy-heavy, releasing the GIL); rendering waits for it.
        tubes = (pool.submit(_tube_fractions, grid, segments, _bronchi(segments)) if pool is not None
                 else _Done(_tube_fractions(grid, segments, _bronchi(segments))))
        _run(pool, label_slices, list(zip(bounds[:-1], bounds[1:])), progress, (0.0, 0.35), "phantom: anatomy")
        body = np.empty(cshape, dtype=bool)
        body[:] = _Anatomy(grid).body[None]
        # In-plane box of the lungs: texture, vessels and lesions only matter there.
        in_plane = _any_plane(right, left)
        ys, xs = np.nonzero(in_plane.any(axis=1))[0], np.nonzero(in_plane.any(axis=0))[0]
        yx = (slice(int(ys.min()), int(ys.max()) + 1), slice(int(xs.min()), int(xs.max()) + 1)) if ys.size else (
            slice(0, 1), slice(0, 1))
        clock("anatomy")

        grower = None
        if kind != "normal":
            grower = LesionGrower(kind, lvr, right, left, cspacing, grid.origin, np.eye(3), rng, pool=pool)
        clock("lesion planning")
        lesion = np.zeros(cshape, dtype=bool)
        lesion_type = np.zeros(cshape, dtype=np.uint8)
        lobes = np.zeros(cshape, dtype=np.uint8)
        ct_array = np.empty(cshape, dtype=np.int16)
        h_pv = float(np.prod(cspacing) ** (1.0 / 3.0))
        sigma = _psf_sigma_vox(cspacing)
        noise_scale = noise_hu / _noise_gain(sigma) / _INT8_STD
        noise_seed = int(rng.integers(2**62))
        plane = _fissure_plane(grid.y[yx[0]][:, None], grid.x[yx[1]][None, :])
        soft, air = tubes.result()
        clock("vessels (rest)")

        n_lesion: Dict[int, int] = {}

        def render(k0: int, k1: int) -> None:
            """HU of slices k0..k1-1: tissues, lung texture, fissures, vessels, bronchi,
            lesions, then scanner noise and blur."""
            h = np.take(_HU, labels[k0:k1], out=_WS.get("h", (k1 - k0, ny, nx), np.float32))
            box = (slice(k0, k1),) + yx
            hb = h[(slice(None),) + yx]
            lung = np.logical_or(right[box], left[box], out=_WS.get("lung", hb.shape, bool))
            np.add(hb, upsample_linear(tex_c, f, box, scratch="tex"), out=hb, where=lung)
            lobes[box] = _lobes_and_fissures(hb, grid.z[k0:k1][:, None, None], plane, right[box], left[box], lung, h_pv)
            _blend(hb, _HU[BLOOD], soft[box], lung, 1.0 / 255.0)
            a = air[box]
            if a.any():
                _blend(hb, _HU[AIR], a, lung, 1.0 / 255.0)
            if grower is not None:
                air_full = np.zeros(h.shape, dtype=bool)
                air_full[(slice(None),) + yx] = a > 128
                n_lesion[k0] = grower.apply(k0, k1, h, lesion, lesion_type, air=air_full)
            _scanner(h, ct_array[k0:k1], sigma, noise_scale, np.random.default_rng([noise_seed, k0]))

        step = max(1, 1_000_000 // (ny * nx))
        if progress is not None:
            progress(0.45, "phantom: rendering")
        _run(pool, render, [(k0, min(k0 + step, nz)) for k0 in range(0, nz, step)], progress, (0.45, 1.0),
             "phantom: tissues, lesions, scanner noise")
        clock("tissues, lesions, noise + PSF")
        achieved = 100.0 * sum(n_lesion.values()) / grower.n_lung if grower is not None else 0.0

        arrays = [ct_array, right, left, airways, body, lesion, lesion_type, lobes]
        if perm is None:
            ct = CTVolume(ct_array, spacing, grid.origin, np.eye(3))
        else:
            arrays = [_from_canonical(a, perm) for a in arrays]
            centre = np.array([(n - 1) / 2.0 for n in shape[::-1]])  # (i, j, k)
            origin = -(perm @ np.diag(spacing) @ centre)
            ct = CTVolume(arrays[0], spacing, tuple(origin), perm)
        ct.metadata.update({"source": "CovidCTDx phantom", "kind": kind, "seed": seed, "modality": "CT"})
        clock("output")
        log.debug("phantom timings: %s", clock.laps)
        return Phantom(ct, arrays[1], arrays[2], arrays[3], arrays[4], arrays[5], arrays[6], KIND_LABELS[kind],
                       sev, achieved, kind, seed, arrays[7], clock.laps)


class _Done:
    """A finished 'future' for the single-threaded path."""

    def __init__(self, value) -> None:
        self.value = value

    def result(self):
        return self.value


class _Clock:
    """Accumulates wall time per named stage (reported by the benchmark)."""

    def __init__(self) -> None:
        self.laps: Dict[str, float] = {}
        self._t = time.perf_counter()

    def __call__(self, name: str) -> None:
        now = time.perf_counter()
        self.laps[name] = self.laps.get(name, 0.0) + now - self._t
        self._t = now


#: Lobe of each (right, left, below the oblique fissure, below the horizontal fissure)
#: bit code: right=1, left=2, below oblique=4, below horizontal=8.
_LOBE_LUT = np.zeros(16, dtype=np.uint8)
for _code in range(16):
    if _code & 1:
        _LOBE_LUT[_code] = 3 if _code & 4 else (2 if _code & 8 else 1)
    elif _code & 2:
        _LOBE_LUT[_code] = 5 if _code & 4 else 4


def _fissure_plane(y: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Height z (mm) of the oblique fissure over each (y, x): z = a + b*y + lateral rise."""
    a = np.where(x < MED_XC, OBLIQUE_R[0], OBLIQUE_L[0])
    return (a + OBLIQUE_R[1] * y + OBLIQUE_LATERAL * (np.abs(x - MED_XC) - 60.0)).astype(np.float32)


def _lobes_and_fissures(hb: np.ndarray, z: np.ndarray, plane: np.ndarray, right: np.ndarray, left: np.ndarray,
                        lung: np.ndarray, h: float) -> np.ndarray:
    """Lobe labels (LOBE_NAMES order, 1-based) of a slice chunk; draws the fissures into ``hb``.

    Oblique fissures run from posterior-superior to anterior-inferior and rise laterally,
    so they cross axial slices obliquely; the right horizontal fissure splits the upper
    from the middle lobe at the level of the hilum. Fissures are ~0.7 mm pleural lines,
    drawn with partial volume only on the thin band of voxels near them.
    """
    shape = right.shape
    obl = np.subtract(z, plane, out=_WS.get("obl", shape, np.float32))  # > 0 above the oblique fissure
    code = np.left_shift(left.view(np.uint8), 1, out=_WS.get("code", shape, np.uint8))
    code |= right.view(np.uint8)
    below = np.less(obl, 0, out=_WS.get("below", shape, bool))
    code |= np.left_shift(below.view(np.uint8), 2, out=_WS.get("code2", shape, np.uint8))
    code |= ((z < HORIZONTAL_FISSURE_Z).astype(np.uint8) << 3)
    lobes = np.take(_LOBE_LUT, code, out=_WS.get("lobes", shape, np.uint8))
    norm = np.float32(1.0 / np.sqrt(1.0 + OBLIQUE_R[1] ** 2 + OBLIQUE_LATERAL ** 2))
    reach = np.float32(0.35 + 0.5 * h)
    dist_h = np.abs(z - HORIZONTAL_FISSURE_Z)  # per slice
    band = np.abs(obl, out=_WS.get("absobl", shape, np.float32))
    band *= norm
    band = np.less(band, reach, out=_WS.get("band", shape, bool))
    near_h = (dist_h < reach).reshape(-1)
    if near_h.any():
        band[near_h] |= (lobes[near_h] == 1) | (lobes[near_h] == 2)
    band &= lung
    idx = np.nonzero(band)
    if idx[0].size:
        d = np.abs(obl[idx]) * norm
        upper_right = (lobes[idx] == 1) | (lobes[idx] == 2)
        d = np.where(upper_right, np.minimum(d, dist_h.reshape(-1)[idx[0]]), d)
        frac = np.clip(0.5 + (0.35 - d) / h, 0.0, 1.0)
        v = hb[idx]
        hb[idx] = v + frac * (_FISSURE_HU - v)
    return lobes


def _blend(h: np.ndarray, target: float, frac: np.ndarray, where: np.ndarray, scale: float = 1.0) -> None:
    """h += frac * scale * (target - h) where ``where`` (partial-volume mixing, in place)."""
    t = np.subtract(np.float32(target), h, out=_WS.get("blend", h.shape, np.float32))
    t *= frac
    if scale != 1.0:
        t *= np.float32(scale)
    np.add(h, t, out=h, where=where)


def _run(pool: Optional[ThreadPoolExecutor], fn, ranges, progress: Optional[Progress] = None,
         span: Tuple[float, float] = (0.0, 1.0), message: str = "") -> None:
    """Run fn(k0, k1) over slice ranges, on the pool if any (re-raising worker errors).

    Progress is reported (and cancellation checked) from the calling thread as ranges
    complete; on cancel the pending ranges are dropped.
    """
    n = len(ranges)

    def report(i: int) -> None:
        if progress is not None:
            progress(span[0] + (span[1] - span[0]) * (i + 1) / n, message)

    if pool is None:
        for i, (k0, k1) in enumerate(ranges):
            fn(k0, k1)
            report(i)
        return
    futures = [pool.submit(fn, k0, k1) for k0, k1 in ranges]
    try:
        for i, fut in enumerate(futures):
            fut.result()
            report(i)
    finally:
        for fut in futures:
            fut.cancel()


def _any_plane(right: np.ndarray, left: np.ndarray) -> np.ndarray:
    """(y, x) map of where any slice has lung, without a full-volume temporary."""
    out = np.zeros(right.shape[1:], dtype=bool)
    for k in range(right.shape[0]):
        out |= right[k]
        out |= left[k]
    return out


def _from_canonical(a: np.ndarray, perm: np.ndarray) -> np.ndarray:
    """Canonical (S, P, L)-ordered array -> array whose index axes follow ``perm``."""
    # Output array axis ax (0=k,1=j,2=i) runs along LPS axis p with sign s.
    axes = []
    flips = []
    for ax in range(3):
        c = 2 - ax
        p = int(np.argmax(np.abs(perm[:, c])))
        axes.append(2 - p)  # canonical array axis for LPS p
        flips.append(perm[p, c] < 0)
    out = np.transpose(a, axes)
    for ax, flip in enumerate(flips):
        if flip:
            out = np.flip(out, axis=ax)
    return np.ascontiguousarray(out)


def insert_lesions(
    ct: CTVolume,
    right_lung: np.ndarray,
    left_lung: np.ndarray,
    kind: str,
    lvr_percent: float,
    seed: int = 0,
    progress: Optional[Progress] = None,
) -> InsertedLesions:
    """Insert synthetic COVID-19 or CAP lesions into a real CT's lungs.

    Placement uses the real lungs' geometry (distance to the pleura in mm, inferior and
    posterior direction from the volume's direction matrix); densities are blended with
    the scan's own texture so vessels and noise stay visible through ground glass.
    """
    if kind not in ("covid", "cap"):
        raise InputError(f"Lesions can be inserted for kind 'covid' or 'cap', not {kind!r}.")
    right = np.asarray(right_lung, dtype=bool)
    left = np.asarray(left_lung, dtype=bool)
    if right.shape != ct.shape or left.shape != ct.shape:
        raise InputError(f"Lung masks {right.shape}/{left.shape} do not match the CT grid {ct.shape}.")
    rng = np.random.default_rng(seed)
    grower = LesionGrower(kind, float(lvr_percent), right, left, ct.spacing, ct.origin, ct.direction, rng)
    src_arr = np.asarray(ct.array)
    out_dtype = src_arr.dtype if src_arr.dtype.kind in "iu" else np.float32
    arr = src_arr.astype(out_dtype, copy=True)
    lesion = np.zeros(ct.shape, dtype=bool)
    lesion_type = np.zeros(ct.shape, dtype=np.uint8)
    chunks = list(grower.chunks())
    n_lesion = 0
    for i, (k0, k1) in enumerate(chunks):
        if progress is not None:
            progress(i / len(chunks), "inserting lesions")
        h = src_arr[k0:k1].astype(np.float32)
        n_lesion += grower.apply(k0, k1, h, lesion, lesion_type)
        if out_dtype != np.float32:
            np.clip(h, np.iinfo(out_dtype).min, np.iinfo(out_dtype).max, out=h)
            np.rint(h, out=h)
        arr[k0:k1] = h
    achieved = 100.0 * n_lesion / grower.n_lung
    new_ct = ct.with_array(arr, lesions_inserted=kind, lesion_seed=seed)
    return InsertedLesions(new_ct, lesion, lesion_type, achieved)
