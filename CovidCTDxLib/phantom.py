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
- two lungs (~-850 HU, gravity gradient and texture); the right one bigger (the heart sits
  left, the right dome of the diaphragm is higher but the left lung has the cardiac notch);
- trachea and main bronchi (air with walls), branching vessel trees thinning to the
  periphery;
- scanner-like noise (correlated through the reconstruction blur) and blur (PSF);
- lesions (``phantom_lesions``) following the DeepSC-COVID findings, grown to an exact
  lesion volume ratio.

Geometry: ``make_phantom`` returns an identity-direction volume unless ``direction`` is a
signed permutation matrix; the anatomy is then generated on the canonical grid and the
axes permuted/flipped, so the patient's left lung is still at +x in LPS.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np
from scipy import ndimage

from .errors import InputError
from .phantom_lesions import (
    CONSOLIDATION,
    CRAZY_PAVING,
    GGO,
    LESION_TYPE_NAMES,
    NONE,
    grow_lesions,
    lesion_hu,
    smooth_noise,
    upsample_linear,
)
from .volume import CTVolume

log = logging.getLogger(__name__)

__all__ = [
    "Phantom",
    "InsertedLesions",
    "make_phantom",
    "insert_lesions",
    "severity_from_lvr",
    "SEVERITY_LVR_PERCENT",
    "KIND_LABELS",
    "LESION_TYPE_NAMES",
    "NONE",
    "GGO",
    "CRAZY_PAVING",
    "CONSOLIDATION",
]

#: Lesion volume ratio (% of both lungs) bands per severity grade.
#: Rationale: the usual chest CT severity score rates each of the 5 lobes 0-5 by the
#: fraction involved (1: <5 %, 2: 5-25 %, 3: 25-50 %, 4: 50-75 %, 5: >75 %); whole-lung
#: involvement below ~5 % is read as mild, 5-15 % moderate, 15-30 % severe and above
#: ~30 % critical (diffuse disease, respiratory failure likely). The DeepSC-COVID means
#: (COVID 14.3 %, CAP 4.4 %) then fall in "moderate" and "mild", as clinically expected.
#: The bands also match the four RACNet / COV19-CT-DB severity classes.
SEVERITY_LVR_PERCENT = {"mild": (1.0, 5.0), "moderate": (5.0, 15.0), "severe": (15.0, 30.0), "critical": (30.0, 50.0)}

#: Phantom kind -> classification label (result.CLASS_KEYS).
KIND_LABELS = {"covid": "covid19", "cap": "cap", "normal": "non_pneumonia"}

DEFAULT_SHAPE = (96, 192, 192)
DEFAULT_SPACING = (2.0, 2.0, 3.5)


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
    -1000, -100, 45, -60, -850, -850, 55, 40, 250, 850, 80, 300, -900, -1000, 30, 15]

BODY_HALF = (165.0, 115.0)  # x, y of the skin ellipse
FAT_MM = 14.0
CAVITY_YC, CAVITY_HALF_Y, CAVITY_HALF_X = 2.0, 88.0, 135.0
RIB_THICK = 0.085  # of the cavity radius
LUNG_APEX_Z, LUNG_BASE_Z = 152.0, -160.0
MED_XC = 5.0
_MED_Y = np.array([-100.0, -62.0, -40.0, 0.0, 40.0, 100.0])
_MED_HALF = np.array([2.0, 3.0, 18.0, 28.0, 26.0, 22.0])
HEART_C, HEART_R = np.array([28.0, -25.0, -75.0]), np.array([62.0, 50.0, 55.0])
SPINE_BODY_C, SPINE_BODY_R = (0.0, 62.0), (19.0, 16.0)
CANAL_C, CANAL_R = (0.0, 90.0), 9.0
VERTEBRA_PITCH = 25.0
RIB_PITCH, RIB_HALF_H, RIB_DROP, RIB_TOP = 26.0, 5.0, 55.0, 165.0
TABLE_Y, TABLE_HALF_W = 119.0, 215.0
CARINA = np.array([0.0, 22.0, 55.0])

#: (start, end, radius, label) solid tubes painted over the mediastinum.
_TUBES: List[Tuple[Tuple[float, float, float], Tuple[float, float, float], float, int]] = [
    ((-6, 38, 400), (-6, 38, -400), 7.0, MUSCLE),  # oesophagus
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
    ((0, 22, 400), tuple(CARINA), 9.0, 2.0),
    (tuple(CARINA), (-48, 24, 22), 7.0, 1.8),
    (tuple(CARINA), (52, 28, 5), 6.0, 1.8),
]
#: Vessel tree roots inside the lungs: (point, initial directions, radius).
_SX = {"right": -1.0, "left": 1.0}


def _cavity_half_x(z):
    return CAVITY_HALF_X - 15.0 * np.clip((z - 40.0) / 110.0, 0.0, 1.0)


def _diaphragm_z(x, y):
    right = 50.0 * np.exp(-(((x + 65.0) / 60.0) ** 2) - ((y + 5.0) / 70.0) ** 2)
    left = 40.0 * np.exp(-(((x - 65.0) / 60.0) ** 2) - ((y + 5.0) / 70.0) ** 2)
    return LUNG_BASE_Z + np.maximum(right, left)


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
    s2 = np.clip((LUNG_APEX_Z - z) / 72.0, 1e-6, 1.0)
    xl = np.where(x < MED_XC, -78.0, 78.0)
    inside &= ((x - xl) / 72.0) ** 2 + ((y - 10.0) / 95.0) ** 2 < s2
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

    def index_box(self, lo: np.ndarray, hi: np.ndarray) -> Optional[Tuple[slice, slice, slice]]:
        """(z, y, x) slices of voxels whose centres lie within the LPS box [lo, hi]."""
        out = []
        for coord, a, b in ((self.z, lo[2], hi[2]), (self.y, lo[1], hi[1]), (self.x, lo[0], hi[0])):
            i0 = int(np.searchsorted(coord, a, side="left"))
            i1 = int(np.searchsorted(coord, b, side="right"))
            if i1 <= i0:
                return None
            out.append(slice(i0, i1))
        return tuple(out)  # type: ignore[return-value]


def _paint_tube(labels, grid, a, b, radius, label, only=None):
    """Set ``label`` where the distance to segment a-b is < radius (bounding box only)."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    box = grid.index_box(np.minimum(a, b) - radius, np.maximum(a, b) + radius)
    if box is None:
        return
    d = _segment_distance(grid.x[box[2]][None, None, :], grid.y[box[1]][None, :, None],
                          grid.z[box[0]][:, None, None], a, b)
    sel = d < radius
    if only is not None:
        sel &= np.isin(labels[box], only)
    labels[box][sel] = label


def _anatomy_labels(grid: _Canonical) -> np.ndarray:
    """uint8 tissue labels of the clean phantom on the canonical grid."""
    nz, ny, nx = grid.shape
    X = grid.x[None, :]
    Y = grid.y[:, None]
    labels = np.zeros(grid.shape, dtype=np.uint8)

    # z-invariant cross-section: table, body, fat, muscle ring.
    sec = np.zeros((ny, nx), dtype=np.uint8)
    ty = TABLE_Y - 0.0005 * X ** 2
    in_table_x = np.abs(X) < TABLE_HALF_W
    sec[in_table_x & (Y >= ty) & (Y < ty + 16.0)] = TABLE_FOAM
    sec[in_table_x & (((Y >= ty) & (Y < ty + 2.0)) | ((Y >= ty + 14.0) & (Y < ty + 16.0)))] = TABLE_SHELL
    body = (X / BODY_HALF[0]) ** 2 + (Y / BODY_HALF[1]) ** 2 < 1.0
    sec[body] = FAT
    inner = (X / (BODY_HALF[0] - FAT_MM)) ** 2 + (Y / (BODY_HALF[1] - FAT_MM)) ** 2 < 1.0
    sec[inner] = MUSCLE
    # Spine cross-section (vertebral body handled per level for discs).
    rc = np.hypot(X - CANAL_C[0], Y - CANAL_C[1])
    vb = ((X - SPINE_BODY_C[0]) / SPINE_BODY_R[0]) ** 2 + ((Y - SPINE_BODY_C[1]) / SPINE_BODY_R[1]) ** 2
    posterior_elements = ((rc >= CANAL_R) & (rc < CANAL_R + 6.0) & (Y > CANAL_C[1] - 6.0)) | (
        (np.abs(X) < 4.0) & (Y > CANAL_C[1] + CANAL_R) & (Y < 108.0)) | ((np.abs(X) < 36.0) & (np.abs(Y - 86.0) < 5.0))
    canal = rc < CANAL_R
    cyy = (Y - CAVITY_YC)
    phi_cos = cyy / np.maximum(np.hypot(X, cyy), 1e-3)  # 1 posterior, -1 anterior
    rib_drop = RIB_DROP * (1.0 - phi_cos) / 2.0
    sternum_xy = (np.abs(X) < 17.0) & (Y > -CAVITY_HALF_Y + CAVITY_YC - 11.0) & (Y < -CAVITY_HALF_Y + CAVITY_YC + 1.0)

    for k in range(nz):
        z = float(grid.z[k])
        sl = sec.copy()
        cx = float(_cavity_half_x(z))
        rho2 = (X / cx) ** 2 + (cyy / CAVITY_HALF_Y) ** 2
        cavity = rho2 < 1.0
        sl[cavity] = MEDIASTINUM
        below = z <= _diaphragm_z(X, Y)
        sl[cavity & below] = ABDOMEN
        side = _lung_side(X, Y, z)
        sl[side == 1] = LUNG_R
        sl[side == 2] = LUNG_L
        # Heart.
        hz = 1.0 - ((z - HEART_C[2]) / HEART_R[2]) ** 2
        if hz > 0:
            heart = ((X - HEART_C[0]) / HEART_R[0]) ** 2 + ((Y - HEART_C[1]) / HEART_R[1]) ** 2 < hz
            sl[heart] = BLOOD
        # Ribs: bands around the cavity, sloping down anteriorly.
        ring = (rho2 >= 1.0) & (rho2 < (1.0 + RIB_THICK) ** 2)
        u = (z + rib_drop - RIB_TOP) / RIB_PITCH
        kk = np.round(u)
        dz = np.abs(u - kk) * RIB_PITCH
        rib = ring & (dz < RIB_HALF_H) & (kk <= 0) & (kk > -12) & ~((np.abs(X) < 28.0) & (Y < 0))
        sl[rib] = MARROW
        rho = np.sqrt(rho2)
        rib_cortex = rib & ((dz > RIB_HALF_H - 1.5) | (rho < 1.012) | (rho > 1.0 + RIB_THICK - 0.012))
        sl[rib_cortex] = CORTEX
        if -115.0 < z < 110.0:
            sl[sternum_xy] = MARROW
            sl[sternum_xy & ~ndimage.binary_erosion(sternum_xy, iterations=1)] = CORTEX
        # Spine: vertebral body with discs, canal, posterior elements.
        level = (z - 3.0) % VERTEBRA_PITCH
        if level < 5.0:
            sl[vb < 1.0] = DISC
        else:
            sl[vb < 1.0] = MARROW
            sl[(vb >= 0.75) & (vb < 1.0)] = CORTEX
            sl[posterior_elements] = CORTEX
        sl[canal] = CSF
        labels[k] = sl

    for a, b, r, lab in _TUBES:
        _paint_tube(labels, grid, a, b, r, lab, only=[MEDIASTINUM, LUNG_R, LUNG_L, ABDOMEN, MUSCLE])
    for a, b, r, w in _AIRWAYS:
        _paint_tube(labels, grid, a, b, r + w, AIRWAY_WALL, only=[MEDIASTINUM, LUNG_R, LUNG_L, BLOOD, MUSCLE])
    for a, b, r, w in _AIRWAYS:
        _paint_tube(labels, grid, a, b, r, AIRWAY)
    return labels


# --------------------------------------------------------------------------- vessels
def _grow_tree(rng, root, direction, radius, side, segments, max_segments):
    """Bronchovascular tree: segments (a, b, r) that branch and thin towards the pleura."""
    stack = [(np.asarray(root, float), np.asarray(direction, float) / np.linalg.norm(direction), radius)]
    while stack and len(segments) < max_segments:
        p, d, r = stack.pop()
        length = max(3.0, r * rng.uniform(5.0, 8.0))
        for _try in range(4):
            q = p + d * length
            if _lung_side(q[0], q[1], q[2]) == side:
                break
            # Bend towards the lung's interior (lateral, away from the mediastinum).
            d = d + rng.normal(0, 0.6, 3)
            d /= np.linalg.norm(d)
            length *= 0.7
        else:
            continue
        segments.append((p, q, r))
        if r < 0.55:
            continue
        perp = np.cross(d, rng.standard_normal(3))
        perp /= np.linalg.norm(perp) + 1e-9
        for child_r, angle in ((r * rng.uniform(0.78, 0.9), rng.uniform(0.15, 0.45)),
                               (r * rng.uniform(0.5, 0.7), -rng.uniform(0.5, 0.9))):
            nd = d * np.cos(angle) + perp * np.sin(angle)
            stack.append((q, nd / np.linalg.norm(nd), child_r))
    return segments


def _vessel_segments(rng: np.random.Generator, max_per_tree: int = 220):
    """Pulmonary artery and vein trees of both lungs (independent of the grid)."""
    segments = []
    roots = []
    for name, side in (("right", 1), ("left", 2)):
        sx = _SX[name]
        art = np.array([48.0 * sx, 10.0, 24.0])
        vein = np.array([40.0 * sx, 4.0, -28.0])
        for d in ((0.4 * sx, 0.0, 1.0), (1.0 * sx, -0.3, 0.2), (0.6 * sx, -1.0, -0.4), (0.3 * sx, 0.6, -1.0),
                  (0.8 * sx, 0.2, -0.8)):
            roots.append((art, d, 4.5, side))
        for d in ((0.5 * sx, -0.5, 0.9), (1.0 * sx, 0.1, -0.3), (0.5 * sx, 0.5, -1.0), (0.7 * sx, -0.6, -0.6)):
            roots.append((vein, d, 4.0, side))
    for root, d, r, side in roots:
        _grow_tree(rng, root, np.array(d), r, side, segments, len(segments) + max_per_tree)
    return segments


def _vessel_fraction(grid: _Canonical, segments) -> np.ndarray:
    """uint8 0..255 partial-volume vessel fraction (soft edges over one voxel)."""
    frac = np.zeros(grid.shape, dtype=np.uint8)
    h = float(np.prod(grid.spacing) ** (1.0 / 3.0))
    for a, b, r in segments:
        reach = r + h
        box = grid.index_box(np.minimum(a, b) - reach, np.maximum(a, b) + reach)
        if box is None:
            continue
        d = _segment_distance(grid.x[box[2]][None, None, :], grid.y[box[1]][None, :, None],
                              grid.z[box[0]][:, None, None], a, b)
        v = np.clip((0.5 + (r - d) / h) * 255.0, 0.0, 255.0).astype(np.uint8)
        np.maximum(frac[box], v, out=frac[box])
    return frac


# --------------------------------------------------------------------------- noise / PSF
def _psf_sigma_vox(spacing_xyz: Sequence[float]) -> Tuple[float, float, float]:
    """Gaussian PSF sigma per array axis (z, y, x) in voxels.

    In-plane ~1.1 mm FWHM (sharp lung kernel), along z the slice profile (~0.45 slice);
    never below 0.5 voxel so coarse grids are anti-aliased.
    """
    sx, sy, sz = spacing_xyz
    return (0.45, max(0.5, 0.47 / sy), max(0.5, 0.47 / sx))


def _noise_gain(sigma: Sequence[float]) -> float:
    """Std of unit white noise after the PSF blur (measured on a small block)."""
    rng = np.random.default_rng(12345)
    block = rng.standard_normal((24, 48, 48), dtype=np.float32)
    return float(ndimage.gaussian_filter(block, sigma, mode="wrap").std())


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
    """
    _check_kind(kind)
    shape = tuple(int(n) for n in shape)
    spacing = tuple(float(s) for s in spacing)
    if len(shape) != 3 or len(spacing) != 3 or min(shape) < 2 or min(spacing) <= 0:
        raise InputError(f"shape must be 3 positive sizes (z, y, x) and spacing 3 positive mm, got {shape}, {spacing}.")
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

    labels = _anatomy_labels(grid)
    right = labels == LUNG_R
    left = labels == LUNG_L
    airways = labels == AIRWAY
    body = np.zeros(cshape, dtype=bool)
    body_sec = (grid.x[None, :] / BODY_HALF[0]) ** 2 + (grid.y[:, None] / BODY_HALF[1]) ** 2 < 1.0
    body[:] = body_sec[None]
    lungs = right | left

    hu = _HU[labels]
    # Lung parenchyma: gravity-dependent gradient (denser posteriorly) + lobular texture.
    f = tuple(max(1, int(round(4.0 / s))) for s in (cspacing[2], cspacing[1], cspacing[0]))
    cshape_c = tuple(-(-(n - 1) // fa) + 1 for n, fa in zip(cshape, f))
    tex = smooth_noise(rng, cshape_c, (1.0, 1.0, 1.0))
    full = tuple(slice(0, n) for n in cshape)
    lung_offset = 12.0 * upsample_linear(tex, f, full)
    lung_offset += 0.25 * grid.y[None, :, None]
    hu[lungs] += lung_offset[lungs]
    del lung_offset

    # Vessels (soft tissue density) inside the lungs.
    segments = _vessel_segments(rng)
    vfrac = _vessel_fraction(grid, segments)
    in_lung_v = lungs & (vfrac > 0)
    w = vfrac[in_lung_v].astype(np.float32) / 255.0
    hu[in_lung_v] = hu[in_lung_v] * (1.0 - w) + 40.0 * w
    del vfrac, in_lung_v, w

    lesion = np.zeros(cshape, dtype=bool)
    lesion_type = np.zeros(cshape, dtype=np.uint8)
    achieved = 0.0
    if kind != "normal":
        field = grow_lesions(kind, lvr, right, left, cspacing, grid.origin, np.eye(3), rng)
        flat = hu.reshape(-1)
        flat[field.flat_index] = lesion_hu(flat[field.flat_index], field)
        lesion, lesion_type, achieved = field.lesion, field.lesion_type, field.lvr_percent

    # Scanner: white noise, then the PSF blur that also correlates it.
    sigma = _psf_sigma_vox(cspacing)
    gain = _noise_gain(sigma)
    noise = rng.standard_normal(cshape, dtype=np.float32)
    noise *= noise_hu / gain
    hu += noise
    del noise
    hu = ndimage.gaussian_filter(hu, sigma, mode="nearest", truncate=3.0)
    np.clip(hu, -1024, 3071, out=hu)
    ct_array = np.rint(hu).astype(np.int16)
    del hu

    arrays = [ct_array, right, left, airways, body, lesion, lesion_type]
    if perm is None:
        ct = CTVolume(ct_array, spacing, grid.origin, np.eye(3))
    else:
        arrays = [_from_canonical(a, perm) for a in arrays]
        centre = np.array([(n - 1) / 2.0 for n in shape[::-1]])  # (i, j, k)
        origin = -(perm @ np.diag(spacing) @ centre)
        ct = CTVolume(arrays[0], spacing, tuple(origin), perm)
    ct.metadata.update({"source": "CovidCTDx phantom", "kind": kind, "seed": seed, "modality": "CT"})
    return Phantom(ct, arrays[1], arrays[2], arrays[3], arrays[4], arrays[5], arrays[6], KIND_LABELS[kind],
                   sev, achieved, kind, seed)


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
    field = grow_lesions(kind, float(lvr_percent), right, left, ct.spacing, ct.origin, ct.direction, rng)
    out = np.asarray(ct.array, dtype=np.float32).copy()
    flat = out.reshape(-1)
    flat[field.flat_index] = lesion_hu(flat[field.flat_index], field)
    arr = np.rint(np.clip(out, -1024, 3071)).astype(ct.array.dtype if ct.array.dtype.kind in "iu" else np.float32)
    new_ct = ct.with_array(arr, lesions_inserted=kind, lesion_seed=seed)
    return InsertedLesions(new_ct, field.lesion, field.lesion_type, field.lvr_percent)
