"""The phantom's anatomy: body, rib cage, mediastinum, heart, lungs with lobes and fissures, airway and vessel trees.

All geometry is analytic in patient mm (LPS, origin at the chest centre), so the same anatomy is
rasterised at any spacing and orientation; only ``make_phantom`` knows the voxel grid.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import numpy as np
from scipy import ndimage

from .lesions import (
    WS as _WS,
)

# =========================================================================== anatomy
# Patient millimetres, LPS: +x patient left, +y posterior, +z superior; origin mid-chest.
# Tissue labels of the clean phantom and their HU.
(AIR, FAT, MUSCLE, MEDIASTINUM, LUNG_R, LUNG_L, ABDOMEN, BLOOD, MARROW, CORTEX, DISC,
 TABLE_SHELL, TABLE_FOAM, AIRWAY, AIRWAY_WALL, CSF) = range(16)
LABEL_HU = np.zeros(16, dtype=np.float32)
LABEL_HU[[AIR, FAT, MUSCLE, MEDIASTINUM, LUNG_R, LUNG_L, ABDOMEN, BLOOD, MARROW, CORTEX, DISC,
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
AIRWAY_TUBES = [
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


class CanonicalGrid:
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


def _paint_tube_slice(sl: np.ndarray, grid: CanonicalGrid, z: float, a, b, radius: float, label: int, only=None) -> None:
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


class Anatomy:
    """Axial-slice generator of tissue labels; z-invariant maps are computed once."""

    def __init__(self, grid: CanonicalGrid, hilar_vessels=()):
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
        for a, b, r, w in AIRWAY_TUBES:
            _paint_tube_slice(sl, self.grid, z, a, b, r + w, AIRWAY_WALL, only=_SOFT + [BLOOD])
        for a, b, r, _wall in AIRWAY_TUBES:
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


def hilar_vessel_segments(segments) -> List[Tuple[np.ndarray, np.ndarray, float]]:
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


def bronchus_segments(segments) -> List[Tuple[np.ndarray, np.ndarray, float, float]]:
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


def vessel_segments(rng: np.random.Generator, max_segments: int = 14000, peripheral_seeds: int = 110):
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


def tube_fractions(grid: CanonicalGrid, vessels, bronchi) -> Tuple[np.ndarray, np.ndarray]:
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


#: Lobe of each (right, left, below the oblique fissure, below the horizontal fissure)
#: bit code: right=1, left=2, below oblique=4, below horizontal=8.
_LOBE_LUT = np.zeros(16, dtype=np.uint8)
for _code in range(16):
    if _code & 1:
        _LOBE_LUT[_code] = 3 if _code & 4 else (2 if _code & 8 else 1)
    elif _code & 2:
        _LOBE_LUT[_code] = 5 if _code & 4 else 4


def fissure_plane(y: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Height z (mm) of the oblique fissure over each (y, x): z = a + b*y + lateral rise."""
    a = np.where(x < MED_XC, OBLIQUE_R[0], OBLIQUE_L[0])
    return (a + OBLIQUE_R[1] * y + OBLIQUE_LATERAL * (np.abs(x - MED_XC) - 60.0)).astype(np.float32)


def lobes_and_fissures(hb: np.ndarray, z: np.ndarray, plane: np.ndarray, right: np.ndarray, left: np.ndarray,
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


def any_plane(right: np.ndarray, left: np.ndarray) -> np.ndarray:
    """(y, x) map of where any slice has lung, without a full-volume temporary."""
    out = np.zeros(right.shape[1:], dtype=bool)
    for k in range(right.shape[0]):
        out |= right[k]
        out |= left[k]
    return out
