"""Synthetic pneumonia lesions, placed and grown inside any lung mask.

Shared by the synthetic phantom (``phantom.make_phantom``) and by lesion insertion into a
real CT (``phantom.insert_lesions``), so both produce the same kinds of lesions.

What the lesions follow (DeepSC-COVID findings, Wang et al., IEEE TMI 2021):
- COVID-19: several (~4+) lesions, bilateral, peripheral/subpleural, predominantly in the
  lower lobes (inferior and posterior), mostly ground glass (-750..-300 HU) with some
  crazy-paving (ground glass + reticular septal lines) and consolidation.
- CAP: fewer (1-2) lesions, central/peribronchial, usually in one lung, mostly
  consolidation (-100..+100 HU) with a ground-glass rim.

How the lesion volume ratio (LVR) is hit exactly: each lesion is a smooth random field
``F_i = |ellipsoid coordinates| + noise`` (blobby, not spherical; for COVID plus a
penalty growing with the distance to the pleura, so lesions spread along the lung
surface), evaluated on a coarse grid (~2.5 mm) and linearly up-sampled to the CT grid. The
lesion mask is ``lung & (min_i F_i <= t)``; ``t`` is the k-th smallest field value inside
the lungs (k = requested lesion voxels), found with a streamed fine histogram, so the
achieved LVR equals the request to ~0.1 %. If the fields cannot supply k voxels (lesions
planned too small), the radii grow and we retry.

Everything is computed in patient (LPS) millimetres through the volume's own geometry, so
spacing, anisotropy and direction matrices are respected.
"""
from __future__ import annotations

import logging
import threading
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np
from scipy import ndimage

from ..errors import InputError

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
_NOISE_AMPLITUDE = 0.16
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


# --------------------------------------------------------------------------- scratch memory
class Workspace(threading.local):
    """Per-thread scratch arrays reused from chunk to chunk.

    Why: on a VM every freshly mapped page costs a fault several times dearer than the
    arithmetic on it, and numpy temporaries of a few MB are mapped and unmapped by malloc
    on every chunk; reusing buffers removed ~40 % of the phantom's CPU time. Buffers are
    flat, grow-only and named: a name must not be used for two live arrays at once.
    """

    def get(self, name: str, shape: Sequence[int], dtype) -> np.ndarray:
        store = self.__dict__.setdefault("arrays", {})
        dtype = np.dtype(dtype)
        n = int(np.prod(shape))
        buf = store.get((name, dtype.str))
        if buf is None or buf.size < n:
            buf = np.empty(max(n, int(1.25 * (buf.size if buf is not None else 0))), dtype=dtype)
            store[(name, dtype.str)] = buf
        return buf[:n].reshape(tuple(shape))


WS = Workspace()


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


def upsample_linear(coarse: np.ndarray, factors: Sequence[int], out_slices: Sequence[slice],
                    scratch: Optional[str] = None) -> np.ndarray:
    """Trilinear up-sampling of a coarse grid (point c at full index c*f) to a full-grid box.

    Why not scipy.ndimage.zoom: zoom aligns the corners of whole arrays, while we need a
    sub-box of the full grid whose points fall exactly between coarse points. Separable 1-D
    interpolation, one strided "phase" (i mod f) at a time, costs ~3 float32 operations
    per output voxel and no gathers. With ``scratch`` the result lives in the calling
    thread's workspace under that name (valid until the name is reused).
    """
    # Crop the coarse grid to the points the box needs, then interpolate axis by axis.
    crop, local = [], []
    for axis in range(3):
        f, s = int(factors[axis]), out_slices[axis]
        c0 = s.start // f
        c1 = min(-(-(s.stop - 1) // f) + 1, coarse.shape[axis])
        crop.append(slice(c0, c1))
        local.append((s.start - c0 * f, s.stop - c0 * f))
    out = np.asarray(coarse[tuple(crop)], dtype=np.float32)
    for axis in (2, 1, 0):
        out = _upsample_axis(out, axis, int(factors[axis]), *local[axis],
                             scratch=None if scratch is None else f"{scratch}{axis}")
    return out


def _upsample_axis(a: np.ndarray, axis: int, f: int, start: int, stop: int, scratch: Optional[str] = None
                   ) -> np.ndarray:
    def at(s: slice) -> tuple:
        idx = [slice(None)] * a.ndim
        idx[axis] = s
        return tuple(idx)

    if f == 1:
        return np.ascontiguousarray(a[at(slice(start, stop))])
    shape = list(a.shape)
    shape[axis] = stop - start
    res = np.empty(shape, dtype=np.float32) if scratch is None else WS.get(scratch, shape, np.float32)
    for r in range(f):
        first = start + ((r - start) % f)
        if first >= stop:
            continue
        count = (stop - 1 - first) // f + 1
        c0 = first // f
        dst = res[at(slice(first - start, None, f))]
        lo = a[at(slice(c0, c0 + count))]
        if r == 0:
            dst[...] = lo
        else:
            np.subtract(a[at(slice(c0 + 1, c0 + 1 + count))], lo, out=dst)
            dst *= np.float32(r / f)
            dst += lo
    return res


def smooth_noise(rng: np.random.Generator, shape: Sequence[int], sigma_vox: Sequence[float]) -> np.ndarray:
    """Unit-variance smooth Gaussian random field (float32) on a small grid.

    Wide fields are made on a grid coarser by k (sigma/k >= 1.5 voxels) and linearly
    up-sampled: same look, ~k^3 less filtering.
    """
    shape = tuple(int(n) for n in shape)
    sigma = np.broadcast_to(np.asarray(sigma_vox, dtype=float), (len(shape),))
    k = tuple(max(1, int(s // 1.5)) for s in sigma)
    small = tuple(-(-(n - 1) // ka) + 1 for n, ka in zip(shape, k))
    white = rng.standard_normal(small, dtype=np.float32)
    field = ndimage.gaussian_filter(white, sigma=tuple(s / ka for s, ka in zip(sigma, k)), mode="wrap", truncate=3.0)
    if any(ka > 1 for ka in k):
        field = upsample_linear(field, k, tuple(slice(0, n) for n in shape))
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
            core = 0.75 if rng.random() < 0.25 + lvr_percent / 100.0 else 0.0
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
    plans: List[LesionPlan],
    geom_c: _Geometry,
    shape_c: Tuple[int, int, int],
    rng: np.random.Generator,
    scale: float,
    depth_penalty: Optional[np.ndarray] = None,
) -> Tuple[np.ndarray, np.ndarray]:
    """Coarse min-field and owner index over all lesions (inf / -1 where none reaches).

    ``depth_penalty`` (coarse grid) is added to every field: for COVID it grows with the
    distance to the pleura, so lesions spread along the lung surface (subpleural) rather
    than towards the hilum.
    """
    fmin = np.full(shape_c, np.inf, dtype=np.float32)
    owner = np.full(shape_c, -1, dtype=np.int16)
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
        sigma = np.clip(0.45 * radii.min() / spacing_c[::-1], 0.8, 6.0)
        noise = smooth_noise(rng, d2.shape, sigma)
        np.clip(noise, -2.5, 2.5, out=noise)
        f = np.sqrt(d2) + _NOISE_AMPLITUDE * noise
        box = tuple(slice(lo[a], hi[a]) for a in range(3))
        if depth_penalty is not None:
            f += depth_penalty[box]
        better = f < fmin[box]
        fmin[box][better] = f[better]
        owner[box][better] = n
    return fmin, owner


class LesionGrower:
    """Plans lesions for a lung mask and grows them to an exact lesion volume ratio.

    Usage: ``g = LesionGrower(...)`` plans the lesions and finds the field threshold (a
    streamed pass over the lesion box); then ``g.apply(k0, k1, hu, lesion, lesion_type)``
    for slice chunks (e.g. ``g.chunks()``, in any order or in parallel) writes the lesion
    masks and the lesion densities into ``hu`` (float32 HU of slices k0..k1-1). Working in
    slice chunks avoids full-volume float temporaries, whose first allocation alone costs
    seconds at 512x512x300 on this machine.
    """

    CHUNK_VOXELS = 2_000_000
    _NBINS = 1 << 15
    _FLO = -1.0

    def __init__(
        self,
        kind: str,
        lvr_percent: float,
        right: np.ndarray,
        left: np.ndarray,
        spacing: Sequence[float],
        origin: Sequence[float],
        direction: np.ndarray,
        rng: np.random.Generator,
        pool: Optional[Executor] = None,
    ) -> None:
        if kind not in ("covid", "cap"):
            raise InputError(f"Unknown lesion kind {kind!r}; use 'covid' or 'cap'.")
        if not (0.0 < lvr_percent < 100.0):
            raise InputError(f"Lesion volume ratio must be between 0 and 100 %, got {lvr_percent}.")
        self.kind = kind
        self.pool = pool
        self.right, self.left = right, left
        self.shape = right.shape
        geom = _Geometry(self.shape, np.asarray(spacing, float), np.asarray(origin, float), np.asarray(direction, float))
        self.f = _coarse_factors(spacing)
        self.shape_c = _coarse_shape(self.shape, self.f)
        self.geom_c = _Geometry(self.shape_c, geom.spacing * np.array(self.f[::-1]), geom.origin, geom.direction)

        self.n_lung = int(sum(np.count_nonzero(right[k]) + np.count_nonzero(left[k]) for k in range(self.shape[0])))
        if self.n_lung == 0:
            raise InputError("The lung mask is empty: cannot place lesions.")
        self.target = max(1, int(round(lvr_percent / 100.0 * self.n_lung)))
        lungs_c = self._subsample(self.f)

        # Distance to the pleura on a grid twice as coarse (~5 mm), cheap to compute; it
        # chooses the centres and, up-sampled, keeps COVID lesions subpleural.
        g = tuple(2 * fa for fa in self.f)
        lungs_d = self._subsample(g)
        geom_d = _Geometry(lungs_d.shape, geom.spacing * np.array(g[::-1]), geom.origin, geom.direction)
        dist_d = ndimage.distance_transform_edt(lungs_d > 0, sampling=tuple(geom_d.spacing[::-1])).astype(np.float32)
        lung_mm3 = self.n_lung * float(np.prod(geom.spacing))
        self.plans = plan_lesions(kind, lvr_percent, lungs_d, dist_d, geom_d, lung_mm3, rng)
        self.field_seed = int(rng.integers(2**31))
        self.depth_penalty = None
        if kind == "covid":
            dist_c = upsample_linear(dist_d, (2, 2, 2), tuple(slice(0, n) for n in self.shape_c))
            d0 = 10.0 + 0.6 * lvr_percent  # extensive disease reaches deeper
            self.depth_penalty = np.maximum(dist_c - d0, 0.0) * np.float32(0.5 / d0)
        self._grow(lungs_c)

    # ----------------------------------------------------------------- planning helpers
    def _subsample(self, f: Sequence[int]) -> np.ndarray:
        """uint8 lungs (1 right, 2 left) at full indices c*f (clipped to the last voxel)."""
        idx = [np.minimum(np.arange(_coarse_shape(self.shape, f)[a]) * f[a], self.shape[a] - 1) for a in range(3)]
        ix = np.ix_(*idx)
        return self.right[ix].astype(np.uint8) + 2 * self.left[ix].astype(np.uint8)

    def _grow(self, lungs_c: np.ndarray) -> None:
        """Scale the planned radii until the fields can supply the target, then threshold."""
        scale = 1.0
        ratio = self.n_lung / max(int(np.count_nonzero(lungs_c)), 1)  # full voxels per coarse lung point
        for _attempt in range(12):
            fmin, owner = _rasterize_fields(self.plans, self.geom_c, self.shape_c,
                                            np.random.default_rng(self.field_seed), scale, self.depth_penalty)
            vals = fmin[(lungs_c > 0) & (fmin < _MAX_THRESHOLD)]
            available = vals.size * ratio
            if available < 1.05 * self.target:
                grow = (self.target / max(available, 1.0)) ** (1.0 / 3.0)
                scale *= float(np.clip(1.1 * grow, 1.1, 2.0))
                continue
            k = min(int(self.target / ratio), vals.size - 1)
            t_coarse = float(np.partition(vals, k)[k])
            if t_coarse < 0.6:
                scale *= 0.75  # planned far too big: shapes would be all noise
                continue
            self._set_fields(fmin, owner)
            t, available = self._threshold()
            if available >= self.target:
                self.t = t
                return
            scale *= 1.2
        raise InputError("Could not grow lesions to the requested volume; the lung mask may be too small or fragmented.")

    def _set_fields(self, fmin: np.ndarray, owner: np.ndarray) -> None:
        finite = np.isfinite(fmin)
        fmin[~finite] = 10.0
        self.fmin_c, self.owner_c = fmin, owner
        nz = np.nonzero(finite)
        self.box = tuple(
            (int(max((nz[a].min() - 1) * self.f[a], 0)), int(min((nz[a].max() + 1) * self.f[a] + 1, self.shape[a])))
            for a in range(3)
        )
        self.ret_c = None
        if any(p.crazy for p in self.plans) or self.kind == "covid":
            # Only the coarse box the lesions reach needs the septal-line field.
            sig = np.maximum(4.0 / self.geom_c.spacing[::-1], 0.8)
            cbox = tuple(slice(int(nz[a].min()), int(nz[a].max()) + 1) for a in range(3))
            self.ret_c = np.zeros(self.shape_c, dtype=np.float32)
            self.ret_c[cbox] = smooth_noise(np.random.default_rng(self.field_seed + 1),
                                            tuple(s.stop - s.start for s in cbox), sig)

    def chunks(self):
        """(k0, k1) slice ranges covering the lesions' bounding box."""
        (z0, z1), (y0, y1), (x0, x1) = self.box
        step = max(1, self.CHUNK_VOXELS // max((y1 - y0) * (x1 - x0), 1))
        for k0 in range(z0, z1, step):
            yield k0, min(k0 + step, z1)

    def _field(self, k0: int, k1: int) -> Tuple[Optional[np.ndarray], Tuple[slice, slice, slice]]:
        """Full-resolution field on the part of slices k0..k1-1 where it can be <= t.

        A trilinearly interpolated value is a convex mix of its 8 coarse corners, so only
        cells with a corner <= t can hold lesion voxels: the in-plane box shrinks to them
        (lesions are local), and (None, box) means no lesion in these slices.
        """
        f = self.f
        cz0, cz1 = k0 // f[0], min(-(-(k1 - 1) // f[0]), self.shape_c[0] - 1)
        active = np.any(self.fmin_c[cz0:cz1 + 1] <= self.t, axis=0)
        ys, xs = np.nonzero(active.any(axis=1))[0], np.nonzero(active.any(axis=0))[0]
        if ys.size == 0:
            return None, (slice(k0, k1), slice(0, 0), slice(0, 0))
        box = (slice(k0, k1),
               slice(max((int(ys[0]) - 1) * f[1], 0), min((int(ys[-1]) + 1) * f[1] + 1, self.shape[1])),
               slice(max((int(xs[0]) - 1) * f[2], 0), min((int(xs[-1]) + 1) * f[2] + 1, self.shape[2])))
        return upsample_linear(self.fmin_c, self.f, box, scratch="F"), box

    def _threshold(self) -> Tuple[float, int]:
        """k-th smallest field value inside the lungs, by a streamed fine histogram.

        Samples every 2nd voxel along axes whose coarse factor is even (fine grids): 1/8 of
        the work, still ~1-1.5 mm sampling, so the LVR is hit to well under 1 %. Returns
        (threshold, estimated full-grid voxels available below the field's ceiling).
        Returns a threshold of _MAX_THRESHOLD when the fields cannot supply the target.
        """
        width = (_MAX_THRESHOLD - self._FLO) / self._NBINS
        s = tuple(2 if fa % 2 == 0 else 1 for fa in self.f)
        fs = tuple(fa // sa for fa, sa in zip(self.f, s))
        sub = [(-(-lo // sa), -(-hi // sa)) for (lo, hi), sa in zip(self.box, s)]  # subgrid ranges

        def lung_view(m0: int, m1: int, lo_y: int, hi_y: int, lo_x: int, hi_x: int) -> np.ndarray:
            sl = (slice(m0 * s[0], m1 * s[0], s[0]), slice(lo_y * s[1], hi_y * s[1], s[1]),
                  slice(lo_x * s[2], hi_x * s[2], s[2]))
            return self.right[sl] | self.left[sl]

        def histogram(m0: int, m1: int) -> np.ndarray:
            F = upsample_linear(self.fmin_c, fs, (slice(m0, m1), slice(*sub[1]), slice(*sub[2])))
            v = F[lung_view(m0, m1, *sub[1], *sub[2])]
            v = v[v < _MAX_THRESHOLD]
            q = ((v - self._FLO) * (1.0 / width)).astype(np.int64)
            return np.bincount(np.clip(q, 0, self._NBINS), minlength=self._NBINS + 1)

        n_sub = [-(-n // sa) for n, sa in zip(self.shape, s)]
        lung_sub = sum(int(np.count_nonzero(lung_view(m, min(m + 16, n_sub[0]), 0, n_sub[1], 0, n_sub[2])))
                       for m in range(0, n_sub[0], 16))
        target = max(1, int(round(self.target * lung_sub / self.n_lung)))
        step = max(1, self.CHUNK_VOXELS // max((sub[1][1] - sub[1][0]) * (sub[2][1] - sub[2][0]), 1))
        chunks = [(m, min(m + step, sub[0][1])) for m in range(sub[0][0], sub[0][1], step)]
        if self.pool is None:
            parts = [histogram(m0, m1) for m0, m1 in chunks]
        else:
            parts = [fut.result() for fut in [self.pool.submit(histogram, m0, m1) for m0, m1 in chunks]]
        counts = np.sum(parts, axis=0)
        cum = np.cumsum(counts[: self._NBINS])
        available = int(cum[-1])
        if available < target:
            return _MAX_THRESHOLD, available * self.n_lung // max(lung_sub, 1)
        b = int(np.searchsorted(cum, target))
        # Pick the bin edge whose cumulative count is closest to the target.
        below = int(cum[b - 1]) if b > 0 else 0
        edge = b if abs(below - target) < abs(int(cum[b]) - target) else b + 1
        return self._FLO + edge * width, available * self.n_lung // max(lung_sub, 1)

    # ----------------------------------------------------------------- application
    def apply(self, k0: int, k1: int, hu: Optional[np.ndarray], lesion: np.ndarray, lesion_type: np.ndarray,
              air: Optional[np.ndarray] = None) -> int:
        """Grow the lesions in slices k0..k1-1; returns their voxel count.

        Writes the lesion mask and type into the full-volume ``lesion``/``lesion_type``
        (only inside the lesions' bounding box, so untouched memory stays unallocated) and,
        if ``hu`` is given (float32 HU of those slices, full (y, x) plane), the lesion
        densities into it. ``air`` (same shape as ``hu``) flags bronchial air that stays
        dark inside consolidation (air bronchogram).
        """
        (z0, z1), (y0, y1), (x0, x1) = self.box
        a, b = max(k0, z0), min(k1, z1)
        if a >= b:
            return 0
        F, box = self._field(a, b)
        if F is None:
            return 0
        shape = F.shape
        lung = np.logical_or(self.right[box], self.left[box], out=WS.get("lung_a", shape, bool))
        sel = np.less_equal(F, self.t, out=WS.get("sel", shape, bool))
        sel &= lung
        lesion[box] = sel
        n = int(np.count_nonzero(sel))
        if n == 0:
            lesion_type[box] = 0
            return 0
        fv = F[sel]
        # Owner: nearest coarse point.
        idx = [np.minimum((np.arange(s.start, s.stop) + self.f[ax] // 2) // self.f[ax], self.shape_c[ax] - 1)
               for ax, s in enumerate(box)]
        owner = self.owner_c[np.ix_(*idx)][sel].astype(np.int64)
        owner[owner < 0] = 0
        crazy = np.array([p.crazy for p in self.plans])[owner]
        core = np.array([p.core_fraction for p in self.plans], dtype=np.float32)[owner]
        tv = np.where(crazy, CRAZY_PAVING, GGO).astype(np.uint8)
        cons = fv < core * np.float32(self.t)
        R = None
        if self.ret_c is not None and (np.any(tv == CRAZY_PAVING) or (self.kind == "covid" and cons.any())):
            R = upsample_linear(self.ret_c, self.f, box, scratch="R")[sel]
        if self.kind == "covid" and R is not None:
            # COVID consolidation is patchy inside the ground glass, not a round core.
            cons &= R > 0.3
        tv[cons] = CONSOLIDATION
        types = WS.get("types", shape, np.uint8)
        types.fill(0)
        types[sel] = tv
        lesion_type[box] = types
        if hu is not None:
            reticular = np.zeros(fv.shape, dtype=bool)
            if R is not None:
                reticular = (np.abs(R) < 0.14) & (tv == CRAZY_PAVING)
            depth = np.clip(1.0 - fv / max(self.t, 1e-6), 0.0, 1.0)
            local = (slice(a - k0, b - k0), box[1], box[2])
            view = hu[local]
            base = view[sel]
            air_v = air[local][sel] if air is not None else None
            view[sel] = lesion_hu(base, self.plans, owner, depth, tv, reticular, air_v)
        return n


def lesion_hu(base: np.ndarray, plans: List[LesionPlan], owner: np.ndarray, depth: np.ndarray, types: np.ndarray,
              reticular: np.ndarray, air: Optional[np.ndarray] = None) -> np.ndarray:
    """New HU of lesion voxels given their underlying HU.

    Ground glass adds density to the parenchyma but less to voxels that are already dense,
    so vessels stay visible through it and the underlying texture/noise is kept.
    Consolidation replaces the parenchyma (keeping a little of its texture); air in
    bronchi crossing it stays dark (air bronchogram) when ``air`` flags such voxels.
    ``depth`` is 0 at the lesion border, ~1 at its core.
    """
    ggo = np.array([p.ggo_hu for p in plans], dtype=np.float32)[owner]
    cons = np.array([p.consolidation_hu for p in plans], dtype=np.float32)[owner]
    ggo_level = ggo + 120.0 * (depth - 0.3)
    weight = 0.45 + 0.55 * np.clip(depth / 0.15, 0.0, 1.0)
    room = np.clip((-300.0 - base) / (-300.0 - LUNG_HU), 0.0, 1.0)
    out = base + weight * (ggo_level - LUNG_HU) * room
    out = np.where(reticular, np.maximum(out, -250.0 + 0.3 * (base - LUNG_HU)), out)
    is_cons = types == CONSOLIDATION
    if air is not None:
        is_cons &= ~air
    cons_val = cons + np.clip(0.3 * (base - LUNG_HU), -60.0, 60.0)
    return np.where(is_cons, cons_val, out).astype(np.float32)
