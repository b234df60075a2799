"""Realistic transformations of real CT scans, to emulate kinds of scan we do not have.

Why: our real development scans are thin-slice, medium-kernel, mostly normal or mildly ill
lungs. The product also meets thick slices, sharp kernels, emphysema, dense disease against
the mediastinum and pleural effusions. Transforming a real scan keeps everything real that
the transformation does not touch (anatomy, vessels, scanner texture), so a change in a
lung or lesion engine's output can only come from what was changed, and the ground truth
of the transformed scan follows from the untouched one.

Every function is deterministic given ``seed`` (an int or a ``numpy.random.Generator``),
returns a new :class:`CTVolume` (float32 HU; the input is never modified) and the ground
truth it creates. Anatomical directions (superior, posterior, patient left) always come
from ``ct.direction``, never from array indices, so flipped or permuted arrays get their
lesions on the same patient side.
"""
from __future__ import annotations

import logging
import math
from typing import NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np
from scipy import fft as sfft
from scipy import ndimage as ndi

from ..grid import bbox
from ..volume import LPS_LEFT, LPS_POSTERIOR, LPS_SUPERIOR, CTVolume

log = logging.getLogger(__name__)

Seed = Union[int, np.random.Generator]

# --------------------------------------------------------------------------- constants
#: Tissue vs air threshold (HU) for the body outline: fat is ~ -100 HU, skin/air partial
#: volume ~ -500 HU, lung parenchyma -900..-800 HU; used only to find the body midline.
BODY_HU = -500.0
#: In-plane Gaussian width (mm) of the unsharp mask that turns a medium kernel into a sharp
#: one. Transfer 1 + g (1 - exp(-2 pi^2 s^2 f^2)): with s = 0.6 mm and g = 1.5 it is 1.4 at
#: 2 lp/cm and 2.2 at 5 lp/cm, about the ratio of a sharp (B70f-like) to a medium/soft
#: (B30f/D40s-like) kernel's MTF there (MTF50 roughly 7 vs 3.5 lp/cm on vendor curves).
#: In mm, not voxels, so it means the same on 0.6 and 0.9 mm pixels.
EDGE_SIGMA_MM = 0.6
#: High-frequency gain of that unsharp mask (see EDGE_SIGMA_MM).
EDGE_GAIN = 1.5
#: Peak frequency (cycles/mm) of the noise power spectrum of a sharp FBP kernel. FBP noise
#: power is ramp x apodisation^2: ~ f exp(-f^2 / (2 f_peak^2)) peaks at f_peak. Sharp
#: (bone/lung) kernels peak at ~0.6-1.0 mm^-1 versus ~0.2-0.3 mm^-1 for soft kernels;
#: 0.8 mm^-1 is above the Nyquist frequency of 0.6-0.9 mm pixels (0.56-0.83 mm^-1), so on
#: clinical grids the power rises across the whole band, as on real sharp-kernel images.
NPS_PEAK_PER_MM = 0.8
#: Slices per FFT batch in the noise generator: bounds memory to ~100 MB on 512x512 slices.
NOISE_BATCH_SLICES = 16

#: Emphysema (low-attenuation areas): the LAA-950 definition counts voxels below -950 HU;
#: destroyed lung is air with little tissue left, i.e. -1000..-950 HU.
LAA_MAX_HU = -950.0
AIR_HU = -1000.0
#: Mean and spread (HU) of emphysematous holes: near air, with scanner noise of ~10 HU at the
#: -1000 end; clipped into [AIR_HU, LAA_MAX_HU].
LAA_MEAN_HU = -978.0
LAA_SD_HU = 10.0
#: Bullae are air spaces with no tissue at all: -990 HU with little noise.
BULLA_MEAN_HU = -990.0
BULLA_SD_HU = 4.0
#: Vessel keeping in emphysema: voxels above VESSEL_HI_HU (vessel walls and lumen, soft
#: tissue partial-volumed with air) are kept, below VESSEL_LO_HU (parenchyma, -900..-800)
#: replaced, linear blend between so vessel edges thin smoothly instead of being chopped.
VESSEL_LO_HU = -700.0
VESSEL_HI_HU = -400.0
#: Gaussian widths (mm) of the two random fields whose low tail makes centrilobular
#: clusters. A thresholded Gaussian field gives blobs ~ 2-3 field widths across, so 1 and
#: 2.5 mm give holes of ~2-4 and ~6-10 mm, the size of a secondary lobule's centre and of
#: a whole lobule (centrilobular emphysema spans 2-10 mm).
LAA_FIELD_SIGMAS_MM = (1.0, 2.5)
#: Bulla radii (mm): a bulla is by definition > 1 cm across; 1-4 cm is the common range.
BULLA_RADIUS_MM = (5.0, 20.0)

#: Dense consolidation: airless lung is soft-tissue density, 20-60 HU unenhanced.
CONSOLIDATION_HU = 40.0
CONSOLIDATION_TEXTURE_HU = 15.0
#: Texture grain (mm): consolidation density varies over a few mm (patchy exudate).
TEXTURE_SIGMA_MM = 1.5
#: Flattening of a consolidation against its wall: half as thick across the wall as along
#: it, as lobar/segmental consolidation lines the mediastinum or the posterior chest wall.
WALL_FLATTENING = 2.0
#: Lobulated margin: relative radius variation and its length scale (mm), the size of
#: secondary lobules and subsegments whose borders shape a consolidation's outline.
MARGIN_VARIATION = 0.25
MARGIN_SIGMA_MM = 6.0
#: Air bronchograms: air in segmental/subsegmental bronchi (lumen 2-3 mm), -950 HU with
#: partial volume, running 15-40 mm away from the hilum or the wall.
BRONCHUS_RADIUS_MM = (1.0, 1.5)
BRONCHUS_LENGTH_MM = (15.0, 40.0)
BRONCHUS_HU = -950.0
#: Partial-volume edge (mm) of inserted dense lesions: a clinical PSF has ~0.6 mm sigma.
PSF_SIGMA_MM = 0.6

#: Ground glass: Fleischner "hazy increased attenuation with preserved vessels"; in
#: quantitative CT it spans roughly -750..-300 HU (aerated lung -900..-800, soft tissue 0+).
GGO_RANGE_HU = (-750.0, -300.0)
#: Consolidation blobs of a lesion benchmark: -100..+50 HU (partly aerated to airless).
CONSOLIDATION_BLOB_RANGE_HU = (-100.0, 50.0)
#: Logistic width (mm) of a GGO edge: 10-90 % over 4.4 w = 4.4 mm, the ill-defined margin
#: of ground glass.
GGO_EDGE_MM = 1.0
#: Depth (mm) below the lung surface where subpleural/peripheral lesion centres lie: COVID-19
#: opacities are peripheral, within the outer ~1-2.5 cm of the lung.
SUBPLEURAL_DEPTH_MM = (10.0, 25.0)

#: Pleural fluid: simple effusions (transudate) are 0-20 HU.
EFFUSION_HU = 10.0
EFFUSION_SD_HU = 5.0
EFFUSION_RANGE_HU = (0.0, 20.0)


class Inserted(NamedTuple):
    """A transformed CT and the mask (bool, (z, y, x)) of what was inserted."""

    ct: CTVolume
    mask: np.ndarray


class Effusion(NamedTuple):
    """A CT with pleural fluid, the new lung ground truth and the fluid's mask."""

    ct: CTVolume
    lung: np.ndarray
    effusion: np.ndarray


# --------------------------------------------------------------------------- helpers
def _rng(seed: Seed) -> np.random.Generator:
    return np.random.default_rng(seed)


def _derived(ct: CTVolume, array: np.ndarray, note: str, **geometry: object) -> CTVolume:
    """A new CTVolume carrying ``note`` appended to ``metadata['transforms']`` (provenance:
    a benchmark row must say what was done to the real scan)."""
    metadata = {**ct.metadata, "transforms": [*ct.metadata.get("transforms", []), note]}
    return CTVolume(
        np.ascontiguousarray(array, dtype=np.float32),
        geometry.get("spacing", ct.spacing),
        geometry.get("origin", ct.origin),
        np.array(geometry.get("direction", ct.direction), dtype=float),
        metadata,
    )


def _check_mask(ct: CTVolume, mask: np.ndarray) -> np.ndarray:
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != ct.shape:
        raise ValueError(f"mask shape {mask.shape} != CT shape {ct.shape}")
    if not mask.any():
        raise ValueError("the lung mask is empty")
    return mask


def _slice_axis(ct: CTVolume) -> int:
    """Array axis of the axial slice stack (the one most aligned with head-feet)."""
    return ct.axis_for(LPS_SUPERIOR)[0]


def _voxel_mm(ct: CTVolume, axis: int) -> float:
    return ct.spacing_zyx[axis]


def _sigma_vox(ct: CTVolume, sigma_mm: float) -> Tuple[float, float, float]:
    return tuple(sigma_mm / s for s in ct.spacing_zyx)  # type: ignore[return-value]


def _smooth_field(rng: np.random.Generator, shape: Sequence[int], sigma_vox: Sequence[float]
                  ) -> np.ndarray:
    """Unit-variance Gaussian random field (float32) with the given smoothing width.

    Why a coarse grid for wide fields: filtering white noise with a 10-voxel Gaussian costs
    ~60 taps per axis; generating on a grid k times coarser and interpolating linearly looks
    the same (the field has no detail finer than its width) and costs ~k^3 less.
    """
    shape = tuple(int(n) for n in shape)
    k = [max(1, int(s // 2)) for s in sigma_vox]
    small = tuple(-(-n // kk) + 2 for n, kk in zip(shape, k))
    white = rng.standard_normal(small, dtype=np.float32)
    field = ndi.gaussian_filter(white, [s / kk for s, kk in zip(sigma_vox, k)], mode="wrap")
    if any(kk > 1 for kk in k):
        field = ndi.zoom(field, k, order=1, grid_mode=False)
    field = field[tuple(slice(0, n) for n in shape)]
    std = float(field.std())
    return (field - float(field.mean())) / std if std > 0 else field


def _lps_of(ct: CTVolume, zyx: np.ndarray) -> np.ndarray:
    """LPS mm of (N, 3) voxel indices given in array (z, y, x) order."""
    return ct.index_to_lps(np.asarray(zyx, dtype=float)[:, ::-1])


def _box_lps(ct: CTVolume, box: Tuple[slice, ...]) -> np.ndarray:
    """LPS coordinates (3, nz, ny, nx) of every voxel of a box, for distances in mm."""
    grids = np.meshgrid(*[np.arange(s.start, s.stop, dtype=np.float32) for s in box],
                        indexing="ij")
    m = (ct.direction @ np.diag(ct.spacing)).astype(np.float32)  # columns: i, j, k steps
    origin = np.asarray(ct.origin, dtype=np.float32)
    return np.stack([
        origin[r] + m[r, 0] * grids[2] + m[r, 1] * grids[1] + m[r, 2] * grids[0]
        for r in range(3)
    ])


def _height_band(ct: CTVolume, mask: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Mask voxels whose superior position lies between fractions ``lo`` and ``hi`` of the
    mask's own feet-to-head extent (0 = lowest point, 1 = apex)."""
    sup = ct.lps_coordinate(LPS_SUPERIOR)
    values = np.broadcast_to(sup, mask.shape)[mask]
    bottom, top = float(values.min()), float(values.max())
    low, high = bottom + lo * (top - bottom), bottom + hi * (top - bottom)
    return mask & (sup >= low - 1e-3) & (sup <= high + 1e-3)


def _midline_lr(ct: CTVolume, lung: np.ndarray) -> float:
    """Patient left-right position (LPS x, mm) of the body's midline at the lung's levels.

    Why the body and not the image centre: patients are often off-centre on the table; the
    centroid of tissue over the chest is within a few mm of the mediastinum's centre. Every
    other voxel per axis is enough for a centroid and costs 8x less.
    """
    body = np.argwhere(ct.array[::2, ::2, ::2] > BODY_HU) * 2
    lung_idx = np.argwhere(lung[::2, ::2, ::2]) * 2
    if len(body) == 0 or len(lung_idx) == 0:
        raise ValueError("no body tissue (> -500 HU) or no lung on the sampled grid")
    sup = _lps_of(ct, lung_idx) @ LPS_SUPERIOR
    body_lps = _lps_of(ct, body)
    at_lungs = (body_lps @ LPS_SUPERIOR >= sup.min()) & (body_lps @ LPS_SUPERIOR <= sup.max())
    return float((body_lps[at_lungs] @ LPS_LEFT).mean())


# --------------------------------------------------------------------------- thick slices
def _slab_weights(n_src: int, s_src: float, n_dst: int, t_dst: float, offset_mm: float
                  ) -> np.ndarray:
    """(n_dst, n_src) box-profile weights: overlap (mm) of each destination slab with each
    source slice, rows normalised to 1.

    Source slice i covers [i s - s/2, i s + s/2] mm from source slice 0's centre; slab j is
    centred at ``offset_mm + j t``. Why overlap lengths: a thick reconstruction integrates
    the object over its slab (box slice-sensitivity profile), so a source slice cut by a
    slab border contributes in proportion to the part inside it.
    """
    src_lo = np.arange(n_src) * s_src - s_src / 2
    centres = offset_mm + np.arange(n_dst) * t_dst
    lo = np.maximum(src_lo[None, :], (centres - t_dst / 2)[:, None])
    hi = np.minimum((src_lo + s_src)[None, :], (centres + t_dst / 2)[:, None])
    w = np.clip(hi - lo, 0.0, None)
    total = w.sum(axis=1, keepdims=True)
    return np.divide(w, total, out=np.zeros_like(w), where=total > 0)


def _apply_slab_weights(array: np.ndarray, weights: np.ndarray, axis: int) -> np.ndarray:
    """Weighted sums of source slices along ``axis`` (float32), one slab at a time (no full
    float64 copy of the volume)."""
    src = np.moveaxis(array, axis, 0)
    out = np.zeros((weights.shape[0],) + src.shape[1:], dtype=np.float32)
    for j, row in enumerate(weights):
        for i in np.flatnonzero(row):
            out[j] += np.float32(row[i]) * src[i]
    return np.moveaxis(out, 0, axis)


def thick_slices(ct: CTVolume, slice_mm: float = 8.0) -> CTVolume:
    """Emulate a thick axial reconstruction: contiguous slabs of ``slice_mm``.

    Each new slice is the overlap-weighted mean of the original slices it covers (box slice
    profile, hence the partial-volume averaging that blurs small nodules, vessels and the
    diaphragm dome). Slabs start at the outer edge of the first slice; a last partial slab
    is dropped, as a scanner reconstructs only whole slabs. The new origin is the centre of
    the first slab along the slice axis, so each new voxel's LPS position is its slab's
    centre.
    """
    axis = _slice_axis(ct)
    s = _voxel_mm(ct, axis)
    if slice_mm < s:
        raise ValueError(f"slice_mm {slice_mm} is thinner than the scan's {s} mm slices")
    n_src = ct.shape[axis]
    n_dst = int(math.floor(n_src * s / slice_mm + 1e-6))
    if n_dst < 1:
        raise ValueError(f"the scan ({n_src * s:.1f} mm) is shorter than one {slice_mm} mm slab")
    offset = -s / 2 + slice_mm / 2
    weights = _slab_weights(n_src, s, n_dst, slice_mm, offset)
    column = 2 - axis  # direction column / spacing index of this array axis
    spacing = list(ct.spacing)
    spacing[column] = float(slice_mm)
    origin = np.asarray(ct.origin) + ct.direction[:, column] * offset
    out = _apply_slab_weights(ct.array, weights, axis)
    log.info("thick slices: %d x %.2f mm -> %d x %.2f mm", n_src, s, n_dst, slice_mm)
    return _derived(ct, out, f"thick_slices {slice_mm:g} mm", spacing=tuple(spacing),
                    origin=tuple(origin))


def resample_mask_like(mask: np.ndarray, src_ct: CTVolume, dst_ct: CTVolume) -> np.ndarray:
    """Bring a bool mask from ``src_ct``'s grid onto ``dst_ct``'s slab grid.

    A destination voxel is in the mask when at least half of its slab (by the same box
    profile as :func:`thick_slices`) is. Why: masks of the thin and the thick scan can then
    be compared voxel by voxel. The grids must differ only along one array axis (same
    in-plane grid and direction), as :func:`thick_slices` makes them.
    """
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != src_ct.shape:
        raise ValueError(f"mask shape {mask.shape} != source CT shape {src_ct.shape}")
    if not np.allclose(src_ct.direction, dst_ct.direction, atol=1e-6):
        raise ValueError("source and destination directions differ")
    differ = [a for a in range(3) if src_ct.shape[a] != dst_ct.shape[a]
              or not math.isclose(src_ct.spacing_zyx[a], dst_ct.spacing_zyx[a], rel_tol=1e-6)]
    axis = differ[0] if differ else _slice_axis(src_ct)
    if len(differ) > 1:
        raise ValueError("the grids differ along more than one axis")
    column = 2 - axis
    shift = np.asarray(dst_ct.origin) - np.asarray(src_ct.origin)
    along = float(shift @ src_ct.direction[:, column])
    if np.linalg.norm(shift - along * src_ct.direction[:, column]) > 1e-3:
        raise ValueError("the grids are shifted across the slice axis")
    weights = _slab_weights(src_ct.shape[axis], src_ct.spacing_zyx[axis], dst_ct.shape[axis],
                            dst_ct.spacing_zyx[axis], along)
    return _apply_slab_weights(mask, weights, axis) >= 0.5 - 1e-6


# --------------------------------------------------------------------------- sharp kernel
def _nps_amplitude(ny: int, nx: int, dy: float, dx: float) -> np.ndarray:
    """rfft2-shaped amplitude filter whose power is f exp(-f^2 / (2 f_peak^2)), scaled so
    that filtered unit white noise has unit variance."""
    fy = np.fft.fftfreq(ny, d=dy)[:, None]
    fx = np.fft.fftfreq(nx, d=dx)[None, :]
    f = np.sqrt(fy ** 2 + fx ** 2)
    power = f * np.exp(-(f ** 2) / (2 * NPS_PEAK_PER_MM ** 2))
    norm = math.sqrt(float(power.mean()))
    return (np.sqrt(power) / norm)[:, : nx // 2 + 1].astype(np.float32)


def sharp_kernel_noise(ct: CTVolume, noise_hu: float = 80.0, seed: Seed = 0) -> CTVolume:
    """Emulate a sharp (B70f-like) reconstruction kernel on a medium-kernel scan.

    Two effects of a sharp kernel: (1) edge enhancement, an in-plane unsharp mask (see
    EDGE_SIGMA_MM) that boosts high spatial frequencies, overshoots at the pleura and
    amplifies the scan's own noise; (2) added noise of std ``noise_hu`` (60-120 HU is
    typical of 1-2 mm sharp-kernel chest CT inside the body) with the high-pass noise power
    spectrum of filtered back-projection: each slice gets independent white Gaussian noise
    filtered in 2D by sqrt(NPS), NPS(f) = f exp(-f^2 / (2 f_peak^2)) (ramp filter times a
    sharp kernel's apodisation), so power rises with radial frequency f up to
    NPS_PEAK_PER_MM, is zero at f = 0, and the noise is correlated in-plane only
    (reconstruction is slice by slice), independent between slices.
    """
    if noise_hu < 0:
        raise ValueError("noise_hu must be >= 0")
    rng = _rng(seed)
    axis = _slice_axis(ct)
    img = np.moveaxis(ct.array.astype(np.float32), axis, 0)
    spacing = [ct.spacing_zyx[a] for a in range(3) if a != axis]
    sigma = (0.0, EDGE_SIGMA_MM / spacing[0], EDGE_SIGMA_MM / spacing[1])
    out = img + np.float32(EDGE_GAIN) * (img - ndi.gaussian_filter(img, sigma, mode="nearest"))
    n, ny, nx = out.shape
    amplitude = _nps_amplitude(ny, nx, spacing[0], spacing[1]) * np.float32(noise_hu)
    for k0 in range(0, n, NOISE_BATCH_SLICES):
        k1 = min(n, k0 + NOISE_BATCH_SLICES)
        white = rng.standard_normal((k1 - k0, ny, nx), dtype=np.float32)
        spectrum = sfft.rfft2(white, axes=(1, 2), workers=-1) * amplitude
        out[k0:k1] += sfft.irfft2(spectrum, s=(ny, nx), axes=(1, 2), workers=-1)
    log.info("sharp kernel: edge gain %.1f, added noise %.0f HU", EDGE_GAIN, noise_hu)
    return _derived(ct, np.moveaxis(out, 0, axis), f"sharp_kernel_noise {noise_hu:g} HU")


# --------------------------------------------------------------------------- emphysema
def _ball(ct: CTVolume, centre_zyx: np.ndarray, radius_mm: float
          ) -> Tuple[Tuple[slice, ...], np.ndarray]:
    """Box around a ball and the ball's mask in it (mm distances in LPS)."""
    r = [int(math.ceil(radius_mm / s)) + 1 for s in ct.spacing_zyx]
    box = tuple(slice(max(0, int(c) - rr), min(n, int(c) + rr + 1))
                for c, rr, n in zip(centre_zyx, r, ct.shape))
    xyz = _box_lps(ct, box)
    centre = _lps_of(ct, np.asarray(centre_zyx)[None, :])[0].astype(np.float32)
    d2 = sum((xyz[i] - centre[i]) ** 2 for i in range(3))
    return box, d2 <= radius_mm ** 2


def insert_emphysema(
    ct: CTVolume,
    lung_mask: np.ndarray,
    fraction: float = 0.3,
    upper_fraction: float = 0.4,
    n_bullae: int = 3,
    seed: Seed = 0,
) -> Inserted:
    """Insert centrilobular emphysema and a few bullae into the upper part of the lung(s).

    The region is the part of ``lung_mask`` (one or both lungs) in the top
    ``upper_fraction`` of its feet-to-head extent (superior from ``ct.direction``; upper
    lobes are where centrilobular emphysema predominates). ``fraction`` (<= 0.5) of the
    region becomes low-attenuation area (LAA, -1000..-950 HU): ``n_bullae`` bullae of
    1-4 cm, which erase everything inside them, then clusters of 2-10 mm from the low tail
    of a two-scale random field, in which vessels (> -400 HU) are kept and their edges
    blended. The lung ground truth does not change: emphysema is lung.

    Returns the CT and the emphysema mask (voxels now at -1000..-950 HU).
    """
    if not 0 < fraction <= 0.5:
        raise ValueError("fraction must be in (0, 0.5]")
    if not 0 < upper_fraction <= 1:
        raise ValueError("upper_fraction must be in (0, 1]")
    lung = _check_mask(ct, lung_mask)
    rng = _rng(seed)
    region = _height_band(ct, lung, 1.0 - upper_fraction, 1.0)
    out = ct.array.astype(np.float32)
    bullae = np.zeros(ct.shape, dtype=bool)
    candidates = np.argwhere(region)
    for _ in range(n_bullae):
        centre = candidates[rng.integers(len(candidates))]
        box, ball = _ball(ct, centre, float(rng.uniform(*BULLA_RADIUS_MM)))
        bullae[box] |= ball & region[box]
    target = int(round(fraction * region.sum())) - int(bullae.sum())
    box = bbox(region)
    sub_region = region[box] & ~bullae[box]
    clusters = np.zeros(ct.shape, dtype=bool)
    if target > 0 and sub_region.any():
        field = sum(_smooth_field(rng, sub_region.shape, _sigma_vox(ct, s))
                    for s in LAA_FIELD_SIGMAS_MM)
        values = field[sub_region]
        level = np.partition(values, min(target, values.size) - 1)[min(target, values.size) - 1]
        clusters[box] = sub_region & (field <= level)
    laa = np.clip(rng.normal(LAA_MEAN_HU, LAA_SD_HU, int(clusters.sum())), AIR_HU, LAA_MAX_HU)
    keep = np.clip((out[clusters] - VESSEL_LO_HU) / (VESSEL_HI_HU - VESSEL_LO_HU), 0.0, 1.0)
    out[clusters] = keep * out[clusters] + (1.0 - keep) * laa
    out[bullae] = np.clip(rng.normal(BULLA_MEAN_HU, BULLA_SD_HU, int(bullae.sum())),
                          AIR_HU, LAA_MAX_HU)
    mask = (clusters | bullae) & (out <= LAA_MAX_HU)
    ml = ct.voxel_volume_ml
    log.info("emphysema: %.0f mL LAA (%.0f mL bullae) in a %.0f mL region",
             mask.sum() * ml, bullae.sum() * ml, region.sum() * ml)
    return Inserted(_derived(ct, out, f"insert_emphysema {fraction:g}"), mask)


# --------------------------------------------------------------------------- consolidation
def _side_of(ct: CTVolume, lung: np.ndarray, side: Optional[str]) -> Tuple[np.ndarray, str, float]:
    """The lung (restricted to ``side`` when given), its patient side and the midline."""
    mid = _midline_lr(ct, lung)
    lr = np.broadcast_to(ct.lps_coordinate(LPS_LEFT), lung.shape)
    if side is None:
        side = "left" if float(lr[lung].mean()) > mid else "right"
    elif side not in ("left", "right"):
        raise ValueError("side must be 'left', 'right' or None")
    restricted = lung & ((lr > mid) if side == "left" else (lr < mid))
    if not restricted.any():
        raise ValueError(f"the lung mask has no voxels on the patient's {side}")
    return restricted, side, mid


def _wall_voxels(ct: CTVolume, lung: np.ndarray, towards: np.ndarray) -> np.ndarray:
    """(N, 3) (z, y, x) indices of the lung voxel furthest ``towards`` an LPS direction on
    each array row along the axis most aligned with it (the lung's wall on that side)."""
    axis, sign = ct.axis_for(towards)
    m = np.moveaxis(lung, axis, -1)
    if sign < 0:
        m = m[..., ::-1]
    n = m.shape[-1]
    has = m.any(axis=-1)
    last = n - 1 - np.argmax(m[..., ::-1], axis=-1)
    rows = np.argwhere(has)
    pos = last[has]
    if sign < 0:
        pos = n - 1 - pos
    return np.insert(rows, axis, pos, axis=1)


def _grow_against(ct: CTVolume, lung: np.ndarray, seed_zyx: np.ndarray, normal: np.ndarray,
                  n_voxels: int, rng: np.random.Generator) -> np.ndarray:
    """The ``n_voxels`` lung voxels nearest the seed by a distance stretched along ``normal``
    (flattening the region against its wall) and perturbed (lobulated margin), kept
    connected to the seed."""
    r_eq = (3 * n_voxels * ct.voxel_volume_mm3 / (4 * math.pi)) ** (1 / 3)
    half = [int(math.ceil(3 * r_eq / s)) for s in ct.spacing_zyx]
    box = tuple(slice(max(0, int(c) - h), min(n, int(c) + h + 1))
                for c, h, n in zip(seed_zyx, half, ct.shape))
    sub = lung[box]
    xyz = _box_lps(ct, box)
    centre = _lps_of(ct, seed_zyx[None, :])[0].astype(np.float32)
    delta = xyz - centre[:, None, None, None]
    along = np.tensordot(normal.astype(np.float32), delta, axes=1)
    d2 = (delta ** 2).sum(axis=0) + (WALL_FLATTENING ** 2 - 1) * along ** 2
    wobble = _smooth_field(rng, sub.shape, _sigma_vox(ct, MARGIN_SIGMA_MM))
    d = np.sqrt(d2) * (1 + MARGIN_VARIATION * wobble)
    values = d[sub]
    k = min(n_voxels, values.size)
    level = np.partition(values, k - 1)[k - 1]
    region = sub & (d <= level)
    labels, _ = ndi.label(region)
    local_seed = tuple(int(c) - s.start for c, s in zip(seed_zyx, box))
    out = np.zeros(lung.shape, dtype=bool)
    out[box] = labels == labels[local_seed]
    return out


def _air_bronchograms(ct: CTVolume, region: np.ndarray, seed_zyx: np.ndarray,
                      normal: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """Tubes of bronchial air inside a consolidation, running away from its wall."""
    tubes = np.zeros(region.shape, dtype=bool)
    if count <= 0:
        return tubes
    box = bbox(region)
    xyz = _box_lps(ct, box)
    voxels = np.argwhere(region)
    start_lps = _lps_of(ct, seed_zyx[None, :])[0]
    near = voxels[np.argsort(np.linalg.norm(_lps_of(ct, voxels) - start_lps, axis=1))]
    near = near[: max(1, len(near) // 10)]
    for _ in range(count):
        a = _lps_of(ct, near[rng.integers(len(near))][None, :])[0]
        direction = -normal + 0.7 * rng.standard_normal(3)
        direction /= np.linalg.norm(direction)
        b = a + direction * rng.uniform(*BRONCHUS_LENGTH_MM)
        ab = (b - a).astype(np.float32)
        rel = xyz - a.astype(np.float32)[:, None, None, None]
        t = np.clip(np.tensordot(ab, rel, axes=1) / float(ab @ ab), 0.0, 1.0)
        d2 = ((rel - ab[:, None, None, None] * t) ** 2).sum(axis=0)
        tubes[box] |= d2 <= rng.uniform(*BRONCHUS_RADIUS_MM) ** 2
    return tubes & region


def _paint_dense(ct: CTVolume, out: np.ndarray, region: np.ndarray, lung: np.ndarray,
                 hu: float, texture_hu: float, rng: np.random.Generator) -> None:
    """Replace ``region`` by textured soft tissue with a PSF-wide partial-volume rim that
    stays inside the lung (the neighbouring mediastinum or wall is not touched)."""
    box = bbox(region, [int(math.ceil(3 * PSF_SIGMA_MM / s)) + 1 for s in ct.spacing_zyx])
    texture = hu + texture_hu * _smooth_field(rng, out[box].shape,
                                              _sigma_vox(ct, TEXTURE_SIGMA_MM))
    rim = ndi.gaussian_filter(region[box].astype(np.float32), _sigma_vox(ct, PSF_SIGMA_MM))
    weight = np.where(region[box], 1.0, np.where(lung[box], rim, 0.0)).astype(np.float32)
    out[box] += weight * (texture - out[box])


def insert_consolidation(
    ct: CTVolume,
    lung_mask: np.ndarray,
    against: str = "mediastinum",
    volume_ml: float = 150.0,
    side: Optional[str] = None,
    hu: float = CONSOLIDATION_HU,
    texture_hu: float = CONSOLIDATION_TEXTURE_HU,
    air_bronchograms: int = 2,
    seed: Seed = 0,
) -> Inserted:
    """Insert dense consolidation (airless lung, ~``hu`` ± ``texture_hu``) against a wall.

    ``against="mediastinum"``: it touches the lung's medial boundary (the face towards the
    heart and mediastinum, found per row along patient left-right from ``ct.direction`` and
    the body midline) at mid height, spreading along that face: the case where dense lung
    and mediastinum have the same HU and only the lung's shape separates them.
    ``against="dependent"``: it lines the posterior wall of the lower half (dependent
    consolidation/atelectasis of the lower lobes).

    ``lung_mask`` is one lung, or both with ``side`` ("left"/"right", patient sides) saying
    which one. ``air_bronchograms`` tubes of bronchial air run through it. The lung ground
    truth does not change: consolidation is lung.

    Returns the CT and the consolidation mask (air bronchograms included, as radiologists
    outline them).
    """
    lung = _check_mask(ct, lung_mask)
    rng = _rng(seed)
    lung, side, _mid = _side_of(ct, lung, side)
    if against == "mediastinum":
        normal = -LPS_LEFT if side == "left" else LPS_LEFT
        band = _height_band(ct, lung, 0.25, 0.75)
    elif against == "dependent":
        normal = LPS_POSTERIOR
        band = _height_band(ct, lung, 0.0, 0.5)
    else:
        raise ValueError("against must be 'mediastinum' or 'dependent'")
    wall = _wall_voxels(ct, lung, normal)
    wall = wall[band[tuple(wall.T)]]
    if len(wall) == 0:
        raise ValueError("no wall voxels in the chosen height band")
    # Of these, the half furthest along the normal: rows that end on the lung's real wall
    # rather than on the side of a fissure-like notch or the costophrenic recess.
    depth = _lps_of(ct, wall) @ normal
    wall = wall[depth >= np.median(depth)]
    seed_zyx = wall[rng.integers(len(wall))]
    n_voxels = int(round(volume_ml / ct.voxel_volume_ml))
    region = _grow_against(ct, lung, seed_zyx, normal, n_voxels, rng)
    out = ct.array.astype(np.float32)
    _paint_dense(ct, out, region, lung, hu, texture_hu, rng)
    tubes = _air_bronchograms(ct, region, seed_zyx, normal, air_bronchograms, rng)
    out[tubes] = BRONCHUS_HU
    log.info("consolidation: %.0f mL against the %s of the %s lung",
             region.sum() * ct.voxel_volume_ml, against, side)
    return Inserted(_derived(ct, out, f"insert_consolidation {against} {side} {volume_ml:g} mL"),
                    region)


# --------------------------------------------------------------------------- blobs (GGO)
def _lung_depth_mm(ct: CTVolume, lung: np.ndarray) -> Tuple[Tuple[slice, ...], np.ndarray]:
    """Distance (mm) of each lung voxel to the lung surface, on the lung's bounding box."""
    box = bbox(lung, (1, 1, 1))
    return box, ndi.distance_transform_edt(lung[box], sampling=ct.spacing_zyx)


def _insert_blobs(ct: CTVolume, lung: np.ndarray, n_blobs: int, radius_mm: Tuple[float, float],
                  hu: float, hu_sd: float, hu_range: Tuple[float, float], subpleural: bool,
                  rng: np.random.Generator) -> Tuple[np.ndarray, np.ndarray]:
    """Soft-edged blobs raising lung HU to a textured level, denser structures kept."""
    box, depth = _lung_depth_mm(ct, lung)
    lo, hi = SUBPLEURAL_DEPTH_MM if subpleural else (SUBPLEURAL_DEPTH_MM[0], np.inf)
    candidates = np.argwhere((depth >= lo) & (depth <= hi))
    if len(candidates) == 0:
        candidates = np.argwhere(depth == depth.max())
    candidates += np.array([s.start for s in box])
    out = ct.array.astype(np.float32)
    membership = np.zeros(ct.shape, dtype=np.float32)
    for _ in range(n_blobs):
        centre = candidates[rng.integers(len(candidates))]
        radius = float(rng.uniform(*radius_mm))
        blob_box, _ = _ball(ct, centre, radius + 4 * GGO_EDGE_MM)
        xyz = _box_lps(ct, blob_box)
        c = _lps_of(ct, centre[None, :])[0].astype(np.float32)
        d = np.sqrt(sum((xyz[i] - c[i]) ** 2 for i in range(3)))
        shape = d.shape
        r = radius * (1 + MARGIN_VARIATION * _smooth_field(
            rng, shape, _sigma_vox(ct, max(MARGIN_SIGMA_MM, radius / 2))))
        m = 1.0 / (1.0 + np.exp(np.clip((d - r) / GGO_EDGE_MM, -30, 30)))
        membership[blob_box] = np.maximum(membership[blob_box], m * lung[blob_box])
    hit = bbox(membership > 0)
    texture = np.clip(hu + hu_sd * _smooth_field(rng, out[hit].shape,
                                                  _sigma_vox(ct, TEXTURE_SIGMA_MM)), *hu_range)
    orig = out[hit]
    out[hit] = orig + membership[hit] * np.maximum(texture - orig, 0.0)
    mask = lung & (membership >= 0.5) & (out >= hu_range[0])
    return out, mask


def insert_ground_glass(
    ct: CTVolume,
    lung_mask: np.ndarray,
    n_blobs: int = 3,
    radius_mm: Tuple[float, float] = (8.0, 20.0),
    hu: float = -520.0,
    hu_sd: float = 40.0,
    seed: Seed = 0,
    subpleural: bool = True,
) -> Inserted:
    """Insert ground-glass blobs with soft edges whose vessels keep running through.

    new = orig + m (max(orig, texture) - orig): lung is raised to the GGO texture (``hu`` ±
    ``hu_sd``, clipped to -750..-300 HU) by the blob's soft membership m, and anything
    denser (vessels, bronchial walls) is kept, as ground glass is defined by preserved
    vessels. Centres lie 10-25 mm under the lung surface when ``subpleural`` (the
    peripheral distribution of COVID-19), anywhere >= 10 mm deep otherwise.

    Returns the CT and the lesion mask: lung voxels with membership >= 0.5 now at or above
    -750 HU (vessels inside the blob included, as a radiologist outlines them).
    """
    lung = _check_mask(ct, lung_mask)
    out, mask = _insert_blobs(ct, lung, n_blobs, radius_mm, hu, hu_sd, GGO_RANGE_HU,
                              subpleural, _rng(seed))
    log.info("ground glass: %d blobs, %.1f mL", n_blobs, mask.sum() * ct.voxel_volume_ml)
    return Inserted(_derived(ct, out, f"insert_ground_glass {n_blobs}"), mask)


def insert_consolidation_blobs(
    ct: CTVolume,
    lung_mask: np.ndarray,
    n_blobs: int = 2,
    radius_mm: Tuple[float, float] = (8.0, 20.0),
    hu: float = -20.0,
    hu_sd: float = 30.0,
    seed: Seed = 0,
    subpleural: bool = True,
) -> Inserted:
    """Like :func:`insert_ground_glass` but dense (-100..+50 HU: partly aerated to airless
    consolidation), so a lesion benchmark can insert both kinds with one placement rule.

    Returns the CT and the lesion mask (membership >= 0.5, now >= -100 HU).
    """
    lung = _check_mask(ct, lung_mask)
    out, mask = _insert_blobs(ct, lung, n_blobs, radius_mm, hu, hu_sd,
                              CONSOLIDATION_BLOB_RANGE_HU, subpleural, _rng(seed))
    log.info("consolidation blobs: %d, %.1f mL", n_blobs, mask.sum() * ct.voxel_volume_ml)
    return Inserted(_derived(ct, out, f"insert_consolidation_blobs {n_blobs}"), mask)


# --------------------------------------------------------------------------- effusion
def pleural_effusion(ct: CTVolume, lung_mask: np.ndarray, depth_mm: float = 30.0,
                     seed: Seed = 0) -> Effusion:
    """Fill the dependent pleural space with fluid (0-20 HU) to ``depth_mm``.

    Free fluid in a supine patient settles posteriorly under a level surface, i.e. a
    coronal plane ``depth_mm`` anterior to the lung's most posterior point: the lung
    behind that plane is replaced by fluid, which gives the posterior crescent, thickest
    at the bases where the lung reaches furthest back. ``lung_mask`` may be one lung
    (unilateral effusion) or both (one level for both sides).

    Returns the CT, the new lung ground truth (lung minus fluid: fluid is not lung) and the
    effusion mask.
    """
    if depth_mm <= 0:
        raise ValueError("depth_mm must be positive")
    lung = _check_mask(ct, lung_mask)
    rng = _rng(seed)
    post = np.broadcast_to(ct.lps_coordinate(LPS_POSTERIOR), lung.shape)
    level = float(post[lung].max()) - depth_mm
    fluid = lung & (post >= level)
    out = ct.array.astype(np.float32)
    out[fluid] = np.clip(rng.normal(EFFUSION_HU, EFFUSION_SD_HU, int(fluid.sum())),
                         *EFFUSION_RANGE_HU)
    log.info("pleural effusion: %.0f mL, %.0f mm deep",
             fluid.sum() * ct.voxel_volume_ml, depth_mm)
    return Effusion(_derived(ct, out, f"pleural_effusion {depth_mm:g} mm"), lung & ~fluid, fluid)
