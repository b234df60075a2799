"""Synthetic pneumonia lesions, placed and grown inside any lung mask.

Shared by the synthetic phantom (``phantom.make_phantom``) and by lesion insertion into a
real CT (``phantom.insert_lesions``), so both produce the same kinds of lesions.

What the lesions follow (DeepSC-COVID findings, MODELS.md):
- COVID-19: several (~4+) lesions, bilateral, peripheral/subpleural, predominantly in the
  lower lobes (inferior and posterior), mostly ground glass (-750..-300 HU) with some
  crazy-paving (ground glass + reticular septal lines) and consolidation.
- CAP: fewer (1-2) lesions, central/peribronchial, usually in one lung, mostly
  consolidation (-100..+100 HU) with a ground-glass rim.

How the lesion volume ratio (LVR) is hit exactly: each lesion is a smooth random field
``F_i = |ellipsoid coordinates| + noise`` (blobby, not spherical), evaluated on a coarse
grid (~2.5 mm) and linearly up-sampled to the CT grid. The lesion mask is
``lung & (min_i F_i <= t)``; ``t`` is the k-th smallest field value inside the lungs, with
k = requested lesion voxels, so the achieved LVR equals the request up to ties. If the
fields cannot supply k voxels (lesions planned too small), the radii grow and we retry.

Everything is computed in patient (LPS) millimetres through the volume's own geometry, so
spacing, anisotropy and direction matrices are respected.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np
from scipy import ndimage

from .errors import InputError

log = logging.getLogger(__name__)

#: Lesion type codes stored in ``lesion_type`` arrays.
NONE, GGO, CRAZY_PAVING, CONSOLIDATION = 0, 1, 2, 3
LESION_TYPE_NAMES = {NONE: "none", GGO: "ground-glass opacity", CRAZY_PAVING: "crazy-paving", CONSOLIDATION: "consolidation"}

#: Nominal parenchyma HU the density deltas are defined against.
LUNG_HU = -850.0
#: Coarse grid pitch (mm) for lesion fields: fine enough for smooth 5 mm-scale blobs.
COARSE_MM = 2.5
#: Field value at the edge of a lesion's bounding box; the threshold must stay below it
#: (minus the noise amplitude) or lesions would show their boxes.
_BOX_EDGE = 2.3
_NOISE_AMPLITUDE = 0.22
_MAX_THRESHOLD = 1.55


@dataclass
class LesionPlan:
    """One lesion: where it is, its shape and what it looks like."""

    centre: np.ndarray  # LPS mm
    axes: np.ndarray  # 3x3, columns = ellipsoid axes in LPS
    radii: np.ndarray  # mm along the axes (before the global threshold)
    lung: int  # 1 right, 2 left
    crazy: bool  # crazy-paving pattern (reticular lines over the ground glass)
    core_fraction: float  # F < core_fraction * t is consolidation (0: none)
    ggo_hu: float
    consolidation_hu: float


@dataclass
class LesionField:
    """Result of growing the planned lesions inside the lungs on the full grid."""

    lesion: np.ndarray  # bool (z, y, x)
    lesion_type: np.ndarray  # uint8 (z, y, x)
    lvr_percent: float
    plans: List[LesionPlan]
    # Per lesion voxel (in np.flatnonzero(lesion) order): field value / threshold and owner.
    flat_index: np.ndarray
    relative_depth: np.ndarray  # 1 - F/t: 0 at the lesion border, up to ~1 at its core
    owner: np.ndarray
    reticular: np.ndarray  # bool: on a crazy-paving septal line


# --------------------------------------------------------------------------- geometry
@dataclass
class _Geometry:
    """Index<->LPS mapping of a (z, y, x) array (spacing/origin/direction as in CTVolume)."""

    shape: Tuple[int, int, int]
    spacing: np.ndarray  # (x, y, z)
    origin: np.ndarray
    direction: np.ndarray

    @property
    def matrix(self) -> np.ndarray:
        """3x3 mapping (i, j, k) index steps to LPS mm."""
        return self.direction @ np.diag(self.spacing)

    def lps(self, zyx: np.ndarray) -> np.ndarray:
        """(N, 3) array indices in (z, y, x) order -> (N, 3) LPS mm."""
        ijk = np.asarray(zyx, dtype=float)[:, ::-1]
        return ijk @ self.matrix.T + self.origin

    def index(self, lps: np.ndarray) -> np.ndarray:
        """(N, 3) LPS mm -> (N, 3) continuous (z, y, x) indices."""
        ijk = (np.asarray(lps, dtype=float) - self.origin) @ np.linalg.inv(self.matrix).T
        return ijk[:, ::-1]


def _coarse_factors(spacing_xyz: Sequence[float]) -> Tuple[int, int, int]:
    """Sub-sampling factor per array axis (z, y, x) giving ~COARSE_MM pitch."""
    sx, sy, sz = spacing_xyz
    return tuple(max(1, int(round(COARSE_MM / s))) for s in (sz, sy, sx))  # type: ignore[return-value]


def _coarse_shape(shape: Sequence[int], f: Sequence[int]) -> Tuple[int, int, int]:
    """Coarse grid point c sits on full index c*f; one extra point covers the last voxel."""
    return tuple(-(-(n - 1) // fa) + 1 for n, fa in zip(shape, f))  # type: ignore[return-value]


def upsample_linear(coarse: np.ndarray, factors: Sequence[int], out_slices: Sequence[slice]) -> np.ndarray:
    """Trilinear up-sampling of a coarse grid (point c at full index c*f) to a full-grid box.

    Why not scipy.ndimage.zoom: zoom aligns corners of the whole array, while we need a
    sub-box of the full grid; separable 1-D interpolation, smallest axis first, also keeps
    the cost at ~6 float32 operations per output voxel.
    """
    out = coarse.astype(np.float32, copy=False)
    for axis in (2, 1, 0):
        f, sl = factors[axis], out_slices[axis]
        if f == 1:
            out = np.take(out, np.arange(sl.start, sl.stop), axis=axis)
            continue
        u = np.arange(sl.start, sl.stop, dtype=np.float64) / f
        i0 = np.minimum(np.floor(u).astype(np.intp), out.shape[axis] - 2)
        w = (u - i0).astype(np.float32)
        shape = [1, 1, 1]
        shape[axis] = -1
        w = w.reshape(shape)
        a = np.take(out, i0, axis=axis)
        b = np.take(out, i0 + 1, axis=axis)
        b -= a
        b *= w
        a += b
        out = a
    return out


def smooth_noise(rng: np.random.Generator, shape: Sequence[int], sigma_vox: Sequence[float]) -> np.ndarray:
    """Unit-variance smooth Gaussian random field (float32) on a small grid."""
    white = rng.standard_normal(tuple(shape), dtype=np.float32)
    field = ndimage.gaussian_filter(white, sigma=sigma_vox, mode="wrap")
    std = float(field.std())
    return field / std if std > 0 else field


# --------------------------------------------------------------------------- planning
def _orthonormal_from(normal: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """3x3 rotation whose third column is ``normal`` (first two random in its plane)."""
    n = normal / (np.linalg.norm(normal) + 1e-9)
    a = rng.standard_normal(3)
    a -= a.dot(n) * n
    a /= np.linalg.norm(a) + 1e-9
    b = np.cross(n, a)
    return np.stack([a, b, n], axis=1)


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    return q * np.sign(np.diag(r))


def _lesion_count(kind: str, lvr_percent: float, rng: np.random.Generator) -> int:
    """COVID: mean ~4.4 lesions, more when extensive; CAP: mostly 1, sometimes 2 (paper)."""
    if kind == "covid":
        base = 4 + int(rng.integers(0, 3))
        return base + int(min(lvr_percent, 40) // 10)
    return 1 if rng.random() < 0.55 else 2


def plan_lesions(
    kind: str,
    lvr_percent: float,
    lungs_coarse: np.ndarray,
    dist_coarse: np.ndarray,
    geom_coarse: _Geometry,
    lung_volume_mm3: float,
    rng: np.random.Generator,
) -> List[LesionPlan]:
    """Choose lesion count, lungs, centres, shapes and densities.

    ``lungs_coarse`` is uint8 (1 right, 2 left) on the coarse grid, ``dist_coarse`` the
    distance (mm) to the lung border. Peripheral (COVID) lesions sit 2-18 mm under the
    pleura and are flattened along it; central (CAP) lesions sit deep in the lung.
    """
    n = _lesion_count(kind, lvr_percent, rng)
    present = [s for s in (1, 2) if np.any(lungs_coarse == s)]
    if not present:
        raise InputError("No lung voxels to place lesions in: the lung mask is empty.")
    # Which lung each lesion goes to.
    if kind == "covid" and len(present) == 2:
        first = int(rng.integers(1, 3))
        sides = [first if i % 2 == 0 else 3 - first for i in range(n)]
        # Right lung is bigger: a few extra lesions there.
        sides = [1 if (s == 2 and i >= 4 and rng.random() < 0.3) else s for i, s in enumerate(sides)]
    else:
        home = present[0] if len(present) == 1 else (1 if rng.random() < 0.6 else 2)
        other = 3 - home if len(present) == 2 else home
        sides = [home if (i == 0 or rng.random() < 0.8) else other for i in range(n)]

    # Relative lesion volumes; COVID peripheral lesions lose ~half to the pleura.
    rel = rng.lognormal(0.0, 0.45, size=n)
    rel /= rel.sum()
    total = lvr_percent / 100.0 * lung_volume_mm3 * (1.6 if kind == "covid" else 1.1)

    superior = geom_coarse.direction[2]  # LPS S component of each index axis (i, j, k)
    posterior = geom_coarse.direction[1]
    zyx_all = None
    plans: List[LesionPlan] = []
    centres: List[np.ndarray] = []
    for i, side in enumerate(sides):
        mask = lungs_coarse == side
        idx = np.flatnonzero(mask)
        d = dist_coarse.reshape(-1)[idx]
        if kind == "covid":
            ok = (d >= 2.0) & (d <= 18.0)
        else:
            ok = d >= 0.45 * float(d.max())
        if not np.any(ok):
            ok = np.ones_like(d, dtype=bool)
        idx, d = idx[ok], d[ok]
        zyx = np.stack(np.unravel_index(idx, lungs_coarse.shape), axis=1)
        lps = geom_coarse.lps(zyx)
        s_coord = lps @ np.array([0.0, 0.0, 1.0])
        p_coord = lps @ np.array([0.0, 1.0, 0.0])
        h = (s_coord - s_coord.min()) / max(np.ptp(s_coord), 1e-6)  # 0 base .. 1 apex
        pp = (p_coord - p_coord.min()) / max(np.ptp(p_coord), 1e-6)  # 0 anterior .. 1 posterior
        if kind == "covid":
            weight = np.exp(-2.5 * h) * (0.5 + pp)  # lower lobes, dependent (posterior) parts
        else:
            weight = np.exp(-1.0 * h)
        # Keep lesions apart so they stay distinct (multifocal).
        for c in centres:
            dd = np.linalg.norm(lps - c, axis=1)
            weight = weight * (1.0 - np.exp(-((dd / 35.0) ** 2)))
        wsum = weight.sum()
        pick = int(rng.choice(len(idx), p=weight / wsum)) if wsum > 0 else int(rng.integers(len(idx)))
        centre = lps[pick]
        centres.append(centre)
        r = (3.0 * rel[i] * total / (4.0 * np.pi)) ** (1.0 / 3.0)
        if kind == "covid":
            normal = _border_normal(dist_coarse, zyx[pick], geom_coarse)
            axes = _orthonormal_from(normal, rng)
            aspect = np.array([1.3, 1.15, 0.67]) * rng.uniform(0.9, 1.1, 3)
            crazy = bool(rng.random() < 0.4)
            core = 0.5 if rng.random() < 0.25 + lvr_percent / 100.0 else 0.0
            ggo = float(rng.uniform(-700, -450))
            cons = float(rng.uniform(-40, 60))
        else:
            axes = _random_rotation(rng)
            aspect = np.array([1.25, 1.0, 0.8]) * rng.uniform(0.9, 1.1, 3)
            crazy = False
            core = float(rng.uniform(0.7, 0.85))
            ggo = float(rng.uniform(-650, -400))
            cons = float(rng.uniform(-30, 70))
        aspect /= np.prod(aspect) ** (1.0 / 3.0)
        plans.append(LesionPlan(centre, axes, r * aspect, side, crazy, core, ggo, cons))
    del zyx_all, superior, posterior
    return plans


def _border_normal(dist: np.ndarray, zyx: np.ndarray, geom: _Geometry) -> np.ndarray:
    """LPS direction of increasing distance to the pleura at a coarse voxel (inward normal)."""
    g = np.zeros(3)
    for a in range(3):
        lo = zyx.copy()
        hi = zyx.copy()
        lo[a] = max(lo[a] - 1, 0)
        hi[a] = min(hi[a] + 1, dist.shape[a] - 1)
        if hi[a] != lo[a]:
            g[a] = (dist[tuple(hi)] - dist[tuple(lo)]) / (hi[a] - lo[a])
    # g is per (z, y, x) index step; LPS gradient solves M^T grad = g_ijk.
    g_ijk = g[::-1]
    grad = np.linalg.solve(geom.matrix.T, g_ijk) if np.any(g_ijk) else np.array([0.0, 0.0, 1.0])
    return grad


# --------------------------------------------------------------------------- fields
def _rasterize_fields(
    plans: List[LesionPlan], geom_c: _Geometry, shape_c: Tuple[int, int, int], rng: np.random.Generator, scale: float
) -> Tuple[np.ndarray, np.ndarray]:
    """Coarse min-field and owner index over all lesions (inf / -1 where none reaches)."""
    fmin = np.full(shape_c, np.inf, dtype=np.float32)
    owner = np.full(shape_c, -1, dtype=np.int16)
    minv = np.linalg.inv(geom_c.matrix)
    for n, p in enumerate(plans):
        radii = p.radii * scale
        half = _BOX_EDGE * radii.max()
        corners = p.centre + half * np.array([[sx, sy, sz] for sx in (-1, 1) for sy in (-1, 1) for sz in (-1, 1)])
        zyx = geom_c.index(corners)
        lo = np.maximum(np.floor(zyx.min(axis=0)).astype(int), 0)
        hi = np.minimum(np.ceil(zyx.max(axis=0)).astype(int) + 1, shape_c)
        if np.any(hi <= lo):
            continue
        zz, yy, xx = (np.arange(lo[a], hi[a], dtype=np.float32) for a in range(3))
        # LPS offset from the centre, then ellipsoid coordinates, all broadcast.
        m = geom_c.matrix.astype(np.float32)
        off = (geom_c.origin - p.centre).astype(np.float32)
        rel = [
            off[c] + m[c, 0] * xx[None, None, :] + m[c, 1] * yy[None, :, None] + m[c, 2] * zz[:, None, None]
            for c in range(3)
        ]
        d2 = np.zeros(tuple(hi - lo), dtype=np.float32)
        for ax in range(3):
            u = (p.axes[0, ax] * rel[0] + p.axes[1, ax] * rel[1] + p.axes[2, ax] * rel[2]) / radii[ax]
            d2 += u * u
        spacing_c = np.abs(geom_c.spacing)
        sigma = np.clip(0.35 * radii.min() / spacing_c[::-1], 0.8, 6.0)
        noise = smooth_noise(rng, d2.shape, sigma)
        np.clip(noise, -2.5, 2.5, out=noise)
        f = np.sqrt(d2) + _NOISE_AMPLITUDE * noise
        box = tuple(slice(lo[a], hi[a]) for a in range(3))
        better = f < fmin[box]
        fmin[box][better] = f[better]
        owner[box][better] = n
    del minv
    return fmin, owner


def grow_lesions(
    kind: str,
    lvr_percent: float,
    right: np.ndarray,
    left: np.ndarray,
    spacing: Sequence[float],
    origin: Sequence[float],
    direction: np.ndarray,
    rng: np.random.Generator,
) -> LesionField:
    """Plan lesions and grow them inside ``right | left`` to exactly ``lvr_percent``."""
    if kind not in ("covid", "cap"):
        raise InputError(f"Unknown lesion kind {kind!r}; use 'covid' or 'cap'.")
    if not (0.0 < lvr_percent < 100.0):
        raise InputError(f"Lesion volume ratio must be between 0 and 100 %, got {lvr_percent}.")
    shape = right.shape
    geom = _Geometry(shape, np.asarray(spacing, float), np.asarray(origin, float), np.asarray(direction, float))
    f = _coarse_factors(spacing)
    shape_c = _coarse_shape(shape, f)
    geom_c = _Geometry(shape_c, geom.spacing * np.array(f[::-1]), geom.origin, geom.direction)

    # Coarse lungs by sub-sampling (point c = full index c*f, clipped at the end).
    idx_c = [np.minimum(np.arange(shape_c[a]) * f[a], shape[a] - 1) for a in range(3)]
    ix = np.ix_(*idx_c)
    lungs_c = right[ix].astype(np.uint8) + 2 * left[ix].astype(np.uint8)
    sampling = tuple(geom_c.spacing[::-1])
    dist_c = np.zeros(shape_c, dtype=np.float32)
    for s in (1, 2):
        m = lungs_c == s
        if m.any():
            dist_c[m] = ndimage.distance_transform_edt(m, sampling=sampling)[m]

    lungs = right | left
    n_lung = int(np.count_nonzero(lungs))
    if n_lung == 0:
        raise InputError("The lung mask is empty: cannot insert lesions.")
    lung_mm3 = n_lung * geom.spacing.prod()
    target = int(round(lvr_percent / 100.0 * n_lung))
    plans = plan_lesions(kind, lvr_percent, lungs_c, dist_c, geom_c, lung_mm3, rng)
    field_seed = int(rng.integers(2**31))

    scale = 1.0
    for attempt in range(12):
        frng = np.random.default_rng(field_seed)
        fmin_c, owner_c = _rasterize_fields(plans, geom_c, shape_c, frng, scale)
        finite = np.isfinite(fmin_c)
        if not finite.any():
            scale *= 1.5
            continue
        fmin_c[~finite] = 10.0
        # Full-grid box covering every coarse point any lesion reaches.
        nz = np.nonzero(finite)
        box = tuple(
            slice(int(max((nz[a].min() - 1) * f[a], 0)), int(min((nz[a].max() + 1) * f[a] + 1, shape[a])))
            for a in range(3)
        )
        F = upsample_linear(fmin_c, f, box)
        lung_box = lungs[box]
        vals = F[lung_box]
        available = int(np.count_nonzero(vals < _MAX_THRESHOLD))
        if available < target:
            grow = (target / max(available, 1)) ** (1.0 / 3.0)
            scale *= float(np.clip(grow * 1.1, 1.1, 2.0))
            log.debug("lesions too small (%d < %d voxels); growing x%.2f", available, target, scale)
            continue
        t = float(np.partition(vals, target - 1)[target - 1]) if target > 0 else -np.inf
        if t < 0.6 and attempt < 11:
            # Planned far too big: lesions would be noise-shaped blobs; shrink them.
            scale *= 0.75
            continue
        break
    else:
        raise InputError(
            f"Could not grow lesions to {lvr_percent:.1f}% of the lungs; the lung mask may be too small or fragmented."
        )

    sel = lung_box & (F <= t)
    lesion = np.zeros(shape, dtype=bool)
    lesion[box] = sel
    flat_index = np.flatnonzero(lesion)
    # Owner (nearest coarse point) and relative depth for each lesion voxel.
    zyx = np.unravel_index(flat_index, shape)
    cz, cy, cx = (np.minimum((zyx[a] + f[a] // 2) // f[a], shape_c[a] - 1) for a in range(3))
    owner = owner_c[cz, cy, cx].astype(np.int64)
    owner[owner < 0] = 0
    fv = F[tuple(zyx[a] - box[a].start for a in range(3))]
    rel_depth = np.clip(1.0 - fv / max(t, 1e-6), 0.0, 1.0).astype(np.float32)

    lesion_type = np.zeros(shape, dtype=np.uint8)
    crazy = np.array([p.crazy for p in plans])[owner]
    core = np.array([p.core_fraction for p in plans])[owner]
    types = np.where(crazy, CRAZY_PAVING, GGO).astype(np.uint8)
    types[fv < core * t] = CONSOLIDATION
    lesion_type.reshape(-1)[flat_index] = types

    # Crazy-paving septal lines: near-zero level set of a ~10 mm band-limited field.
    reticular = np.zeros(flat_index.shape, dtype=bool)
    if np.any(types == CRAZY_PAVING):
        sig = np.maximum(4.0 / geom_c.spacing[::-1], 0.8)
        ret_c = smooth_noise(np.random.default_rng(field_seed + 1), shape_c, sig)
        R = upsample_linear(ret_c, f, box)
        rv = R[tuple(zyx[a] - box[a].start for a in range(3))]
        reticular = (np.abs(rv) < 0.14) & (types == CRAZY_PAVING)
    achieved = 100.0 * flat_index.size / n_lung
    log.info("grew %d %s lesions: LVR %.2f%% (requested %.2f%%)", len(plans), kind, achieved, lvr_percent)
    return LesionField(lesion, lesion_type, achieved, plans, flat_index, rel_depth, owner, reticular)


def lesion_hu(base: np.ndarray, field: LesionField, air: Optional[np.ndarray] = None) -> np.ndarray:
    """New HU for the lesion voxels (``field.flat_index`` order) given the underlying HU.

    Ground glass adds density to the parenchyma but less to voxels that are already dense,
    so vessels stay visible through it and the underlying texture/noise is kept.
    Consolidation replaces the parenchyma (keeping a little of its texture); air in
    bronchi crossing it stays dark (air bronchogram) when ``air`` flags such voxels.
    """
    plans = field.plans
    o = field.owner
    ggo = np.array([p.ggo_hu for p in plans], dtype=np.float32)[o]
    cons = np.array([p.consolidation_hu for p in plans], dtype=np.float32)[o]
    depth = field.relative_depth
    # Denser towards the lesion core; faint at its edge.
    ggo_level = ggo + 120.0 * (depth - 0.3)
    weight = 0.45 + 0.55 * np.clip(depth / 0.15, 0.0, 1.0)
    room = np.clip((-300.0 - base) / (-300.0 - LUNG_HU), 0.0, 1.0)
    out = base + weight * (ggo_level - LUNG_HU) * room
    types = field.lesion_type.reshape(-1)[field.flat_index]
    out = np.where(field.reticular, np.maximum(out, -250.0 + 0.3 * (base - LUNG_HU)), out)
    is_cons = types == CONSOLIDATION
    cons_val = cons + np.clip(0.3 * (base - LUNG_HU), -60.0, 60.0)
    if air is not None:
        is_cons &= ~air
    out = np.where(is_cons, cons_val, out)
    return out.astype(np.float32)
