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
from typing import Dict, Optional, Sequence, Tuple

import numpy as np

from ..errors import InputError, VolumeTooLargeError
from ..progress import Progress
from ..volume import CanonicalFrame, CTVolume
from .anatomy import (
    AIR,
    AIRWAY,
    AIRWAY_TUBES,
    BLOOD,
    LABEL_HU,
    LOBE_NAMES,
    LUNG_APEX_Z,
    LUNG_L,
    LUNG_R,
    Anatomy,
    CanonicalGrid,
    any_plane,
    bronchus_segments,
    fissure_plane,
    hilar_vessel_segments,
    lobes_and_fissures,
    tube_fractions,
    vessel_segments,
)
from .lesions import (
    CONSOLIDATION,
    CRAZY_PAVING,
    GGO,
    LESION_TYPE_NAMES,
    NONE,
    LesionGrower,
    smooth_noise,
    upsample_linear,
)
from .lesions import (
    WS as _WS,
)
from .scanner import INT8_STD, apply_scanner, noise_gain, psf_sigma_vox

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
#: Worker threads for the slice loops (numpy releases the GIL in its array loops).
_WORKERS = max(1, min(4, os.cpu_count() or 1))


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

    # Canonical (identity-direction) shape (z, y, x) and spacing (x, y, z): the frame's array
    # axis for superior, posterior and left, and the spacing of each.
    frame = None if perm is None else CanonicalFrame.for_direction(perm)
    if frame is None:
        cshape, cspacing = shape, spacing
    else:
        cshape = tuple(shape[a] for a in frame.perm)
        cspacing = tuple(spacing[2 - a] for a in reversed(frame.perm))
    grid = CanonicalGrid(cshape, cspacing)
    nz, ny, nx = cshape

    # Grid-independent random anatomy first, so every grid shows the same patient.
    clock = _Clock()
    segments = vessel_segments(rng)
    # Lung parenchyma: gravity-dependent gradient (denser posteriorly, +0.25 HU/mm) and a
    # lobular texture, as a smooth 4 mm-pitch field up-sampled chunk by chunk.
    f = tuple(max(1, int(round(4.0 / s))) for s in (cspacing[2], cspacing[1], cspacing[0]))
    shape_c = tuple(-(-(n - 1) // fa) + 1 for n, fa in zip(cshape, f))
    tex_c = 12.0 * smooth_noise(rng, shape_c, (1.0, 1.0, 1.0))
    tex_c += (0.25 * (grid.y[0] + np.arange(shape_c[1]) * f[1] * cspacing[1]))[None, :, None].astype(np.float32)
    clock("vessel trees")

    hilar = hilar_vessel_segments(segments)
    labels = np.empty(cshape, dtype=np.uint8)
    # Masks start as (lazily mapped) zeros and are written only where their structure can
    # be: untouched pages cost nothing, touched ones a page fault each.
    right = np.zeros(cshape, dtype=bool)
    left = np.zeros(cshape, dtype=bool)
    airways = np.zeros(cshape, dtype=bool)
    airway_top = max(max(a[2], b[2]) + r + w for a, b, r, w in AIRWAY_TUBES)
    airway_bottom = min(min(a[2], b[2]) - r - w for a, b, r, w in AIRWAY_TUBES)

    def label_slices(k0: int, k1: int) -> None:
        anatomy = Anatomy(grid, hilar)  # one per thread: it caches per-slice state
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
        tubes = (pool.submit(tube_fractions, grid, segments, bronchus_segments(segments)) if pool is not None
                 else _Done(tube_fractions(grid, segments, bronchus_segments(segments))))
        _run(pool, label_slices, list(zip(bounds[:-1], bounds[1:])), progress, (0.0, 0.35), "phantom: anatomy")
        body = np.empty(cshape, dtype=bool)
        body[:] = Anatomy(grid).body[None]
        # In-plane box of the lungs: texture, vessels and lesions only matter there.
        in_plane = any_plane(right, left)
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
        sigma = psf_sigma_vox(cspacing)
        noise_scale = noise_hu / noise_gain(sigma) / INT8_STD
        noise_seed = int(rng.integers(2**62))
        plane = fissure_plane(grid.y[yx[0]][:, None], grid.x[yx[1]][None, :])
        soft, air = tubes.result()
        clock("vessels (rest)")

        n_lesion: Dict[int, int] = {}

        def render(k0: int, k1: int) -> None:
            """HU of slices k0..k1-1: tissues, lung texture, fissures, vessels, bronchi,
            lesions, then scanner noise and blur."""
            h = np.take(LABEL_HU, labels[k0:k1], out=_WS.get("h", (k1 - k0, ny, nx), np.float32))
            box = (slice(k0, k1),) + yx
            hb = h[(slice(None),) + yx]
            lung = np.logical_or(right[box], left[box], out=_WS.get("lung", hb.shape, bool))
            np.add(hb, upsample_linear(tex_c, f, box, scratch="tex"), out=hb, where=lung)
            lobes[box] = lobes_and_fissures(hb, grid.z[k0:k1][:, None, None], plane, right[box], left[box], lung, h_pv)
            _blend(hb, LABEL_HU[BLOOD], soft[box], lung, 1.0 / 255.0)
            a = air[box]
            if a.any():
                _blend(hb, LABEL_HU[AIR], a, lung, 1.0 / 255.0)
            if grower is not None:
                air_full = np.zeros(h.shape, dtype=bool)
                air_full[(slice(None),) + yx] = a > 128
                n_lesion[k0] = grower.apply(k0, k1, h, lesion, lesion_type, air=air_full)
            apply_scanner(h, ct_array[k0:k1], sigma, noise_scale, np.random.default_rng([noise_seed, k0]))

        step = max(1, 1_000_000 // (ny * nx))
        if progress is not None:
            progress(0.45, "phantom: rendering")
        _run(pool, render, [(k0, min(k0 + step, nz)) for k0 in range(0, nz, step)], progress, (0.45, 1.0),
             "phantom: tissues, lesions, scanner noise")
        clock("tissues, lesions, noise + PSF")
        achieved = 100.0 * sum(n_lesion.values()) / grower.n_lung if grower is not None else 0.0

        arrays = [ct_array, right, left, airways, body, lesion, lesion_type, lobes]
        if frame is None:
            ct = CTVolume(ct_array, spacing, grid.origin, np.eye(3))
        else:
            arrays = [frame.from_canonical(a) for a in arrays]
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
