"""Density lesion engine: ground glass and consolidation from HU, with vessels suppressed.

Why a density engine: the product must quantify lesions on a real scan without trained
weights, and must split *any* lesion mask (neural, density or edited by hand) into ground
glass and consolidation. Everything here is a physical rule with a source, not a tuned
classifier.

Definitions and thresholds
- Ground-glass opacity (Fleischner Society glossary, Hansell et al., Radiology 2008): hazy
  increased lung opacity with preserved bronchial and vascular margins. Consolidation: a
  homogeneous increase of parenchymal attenuation that obscures vessel and airway margins.
  The glossary gives no HU numbers; quantitative work puts well-aerated lung at
  -950..-700 HU (Colombi et al., Radiology 2020) and Lung CT Analyzer (Slicer/
  SlicerLungCTAnalyzer, ``LungCTAnalyzer.py`` ``defaultThresholds``) uses
  -950..-750 "inflated", -750..-400 "infiltrated", -400..0 "collapsed". Ground glass is
  commonly taken as -750..-300 HU and consolidation above -300 HU (e.g. Ohkubo et al.;
  CT severity tools such as those behind the COVID-19 quantification literature), which
  is the split used by :func:`split_lesion_types`.
- Lung density is not uniform: in a supine patient dependent (posterior) lung is denser by
  tens of HU (gravity gradient), and low-dose noise spreads parenchyma by ±50 HU. A fixed
  threshold therefore either misses faint ground glass anteriorly or marks normal dependent
  lung posteriorly. We estimate the aerated-parenchyma level per 10 mm band along the
  gravity (anterior-posterior) axis from the scan itself (a low percentile of sub -500 HU
  lung voxels, robust to lesions and vessels) and call a voxel abnormal when it is
  ``GGO_CONTRAST_HU`` above that level *and* above the infiltration floor of -750 HU.

Vessels and airway walls
- Vessels are bright tubes. Thin ones (and bronchial walls, noise specks and the
  partial-volume sheet where the diaphragm dome cuts a slice) are thinner than any lesion
  we report, so a binary opening by a ball of ``OPENING_RADIUS_MM`` removes them while
  keeping lesions at least that thick. The opening is *masked*: outside the lung counts
  as foreground for the erosion, so subpleural lesions are not eroded from the pleura.
- Larger vessels near the hila survive any opening that keeps small lesions, so they are
  found by their shape: multi-scale Hessian objectness for bright line-like structures
  (Frangi et al. 1998, SimpleITK ``ObjectnessMeasure``, object dimension 1) on a half
  in-plane resolution grid (speed; the vessels concerned are >= 3 mm wide). Their
  partial-volume halo is removed with them. Vessels running *through* ground glass are
  given back to the lesion by a final closing, as radiologists draw lesions.
- Components smaller than ``MIN_LESION_ML`` are dropped.
"""
from __future__ import annotations

import logging
from typing import Optional, Tuple

import numpy as np
import SimpleITK as sitk

from .progress import Progress
from .result import LesionMasks, LungMasks
from .volume import LPS_POSTERIOR, CTVolume

log = logging.getLogger(__name__)

# ------------------------------------------------------------------ physical parameters
#: Lower bound of "infiltrated" lung in Lung CT Analyzer (HU); nothing below is a lesion.
GGO_FLOOR_HU = -750.0
#: Ground glass vs consolidation boundary (HU), used by :func:`split_lesion_types`.
CONSOLIDATION_HU = -300.0
#: Required excess over the local aerated-parenchyma level (HU). Faint ground glass is
#: ~150-250 HU above normal lung; the dependent gradient and low-dose noise after the
#: 1 mm smoothing stay well below.
GGO_CONTRAST_HU = 150.0
#: Band width (mm) along the gravity axis for the parenchyma level.
BAND_MM = 10.0
#: Percentile of sub -500 HU lung voxels that estimates aerated parenchyma per band.
PARENCHYMA_PERCENTILE = 40.0
#: Gaussian smoothing (mm) against low-dose noise before thresholding.
SMOOTHING_MM = 1.0
#: Opening radius (mm): vessels, airway walls and partial-volume sheets thinner than
#: ~2x this disappear; lesions thicker than that stay.
OPENING_RADIUS_MM = 2.0
#: Hessian scales (mm) for the large-vessel detector and its acceptance level.
VESSEL_SCALES_MM = (1.5, 2.5, 4.0)
VESSEL_OBJECTNESS = 0.5
#: Only structures at least this dense at the detection scale can be vessels (HU).
VESSEL_MIN_HU = -500.0
#: Halo (mm) around a detected vessel that is partial volume, not lesion.
VESSEL_HALO_MM = 1.5
#: Closing radius (mm) that gives vessels inside ground glass back to the lesion.
CLOSING_RADIUS_MM = 2.0
#: Smallest lesion component the engine reports (mL): ~ a 6 mm sphere.
MIN_LESION_ML = 0.1


# ------------------------------------------------------------------ public API
def detect_lesions(ct: CTVolume, lungs: LungMasks, progress: Optional[Progress] = None) -> LesionMasks:
    """Ground-glass and consolidation lesions inside the lungs from HU alone.

    Args:
        ct: validated CT in HU.
        lungs: lung masks on the CT grid; only ``right | left`` is used.
        progress: optional (fraction, message) reporter with cancellation.

    Returns:
        LesionMasks with ``lesion``, ``ggo`` and ``consolidation`` (bool, CT grid) and
        ``source="density engine"``.
    """
    report = progress or Progress()
    lung_full = lungs.lungs
    lesion = np.zeros(ct.shape, bool)
    if not lung_full.any():
        return LesionMasks(lesion=lesion, ggo=lesion.copy(), consolidation=lesion.copy())
    box = _bbox(lung_full, pad=2)
    lung = lung_full[box]
    spacing = ct.spacing_zyx
    report(0.05, "Lesions: smoothing")
    img = _image(ct.array[box], spacing)
    smooth = sitk.GetArrayFromImage(sitk.SmoothingRecursiveGaussian(img, SMOOTHING_MM))
    report(0.2, "Lesions: parenchyma level")
    threshold = _abnormal_threshold(ct, box, smooth, lung)
    candidate = lung & (smooth > threshold)
    del threshold
    report(0.35, "Lesions: vessels")
    vessels = _large_vessels(smooth, lung, spacing, report)
    candidate &= ~vessels
    report(0.75, "Lesions: size filter")
    core = _masked_opening(candidate, lung, spacing, OPENING_RADIUS_MM)
    core = _closing_within(core, lung, spacing, CLOSING_RADIUS_MM)
    core = _drop_small(core, spacing, MIN_LESION_ML)
    lesion[box] = core
    report(0.95, "Lesions: ground glass / consolidation")
    ggo, consolidation = split_lesion_types(ct, lesion)
    ml = ct.voxel_volume_ml
    log.info("density lesions: %.1f mL (ggo %.1f, consolidation %.1f)", lesion.sum() * ml, ggo.sum() * ml, consolidation.sum() * ml)
    report(1.0, "Lesions: done")
    return LesionMasks(lesion=lesion, ggo=ggo, consolidation=consolidation, source="density engine")


def split_lesion_types(ct: CTVolume, lesion: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Split any lesion mask into ground glass (< -300 HU) and consolidation (>= -300 HU).

    The HU are smoothed by ``SMOOTHING_MM`` first so low-dose noise does not pepper ground
    glass with consolidation voxels. Works on neural, density and hand-edited masks alike;
    ``ggo | consolidation == lesion`` and the two never overlap.
    """
    lesion = np.asarray(lesion, bool)
    ggo = np.zeros(lesion.shape, bool)
    consolidation = np.zeros(lesion.shape, bool)
    if not lesion.any():
        return ggo, consolidation
    box = _bbox(lesion, pad=3)
    smooth = sitk.GetArrayFromImage(sitk.SmoothingRecursiveGaussian(_image(ct.array[box], ct.spacing_zyx), SMOOTHING_MM))
    sub = lesion[box]
    dense = smooth >= CONSOLIDATION_HU
    consolidation[box] = sub & dense
    ggo[box] = sub & ~dense
    return ggo, consolidation


# ------------------------------------------------------------------ steps
def _bbox(mask: np.ndarray, pad: int = 0) -> Tuple[slice, slice, slice]:
    out = []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        idx = np.flatnonzero(mask.any(axis=other))
        out.append(slice(max(0, idx[0] - pad), min(mask.shape[axis], idx[-1] + 1 + pad)))
    return tuple(out)  # type: ignore[return-value]


def _image(array: np.ndarray, spacing_zyx) -> sitk.Image:
    img = sitk.GetImageFromArray(np.asarray(array, dtype=np.float32))
    img.SetSpacing(tuple(float(s) for s in reversed(spacing_zyx)))
    return img


def _posterior_mm(ct: CTVolume, box) -> np.ndarray:
    """Position (mm) along the gravity axis (LPS posterior) of each voxel in ``box``,
    as a broadcastable array (three 1-D ramps, no full coordinate grid)."""
    step = (ct.direction @ np.diag(ct.spacing)).T @ LPS_POSTERIOR  # per i, j, k
    k = np.arange(box[0].start, box[0].stop, dtype=np.float32)[:, None, None] * step[2]
    j = np.arange(box[1].start, box[1].stop, dtype=np.float32)[None, :, None] * step[1]
    i = np.arange(box[2].start, box[2].stop, dtype=np.float32)[None, None, :] * step[0]
    return k + j + i


def _abnormal_threshold(ct: CTVolume, box, smooth: np.ndarray, lung: np.ndarray) -> np.ndarray:
    """Per-voxel HU threshold: max(-750, parenchyma level of the voxel's gravity band + 150).

    Returns a float32 array broadcastable to ``smooth`` (one value per band, mapped back).
    """
    post = _posterior_mm(ct, box)
    band = np.floor((np.broadcast_to(post, smooth.shape) - float(post.min())) / BAND_MM).astype(np.int32)
    n_bands = int(band.max()) + 1
    values = smooth[lung]
    bands = band[lung]
    aerated = values < -500.0
    level = np.full(n_bands, np.nan, np.float32)
    for b in range(n_bands):
        v = values[(bands == b) & aerated]
        if v.size >= 200:
            level[b] = np.percentile(v, PARENCHYMA_PERCENTILE)
    if np.all(np.isnan(level)):
        level[:] = GGO_FLOOR_HU - GGO_CONTRAST_HU
    # Bands with too few voxels (the lung's anterior and posterior tips) borrow their
    # neighbour's level; the profile is then smoothed over three bands.
    good = np.flatnonzero(~np.isnan(level))
    level = np.interp(np.arange(n_bands), good, level[good]).astype(np.float32)
    if n_bands >= 3:
        level = np.convolve(np.pad(level, 1, mode="edge"), np.ones(3) / 3.0, mode="valid").astype(np.float32)
    log.debug("parenchyma level per %.0f mm band: %s", BAND_MM, np.round(level).tolist())
    return np.maximum(GGO_FLOOR_HU, level + GGO_CONTRAST_HU)[band]


def _radius_vox(radius_mm: float, spacing_zyx) -> list:
    """SimpleITK kernel radius (x, y, z) in voxels for a ball of ``radius_mm``."""
    return [int(max(0, round(radius_mm / s))) for s in reversed(spacing_zyx)]


def _large_vessels(smooth: np.ndarray, lung: np.ndarray, spacing_zyx, report: Progress) -> np.ndarray:
    """Bright line-like structures (Hessian objectness) plus their partial-volume halo."""
    shrink = [max(1, int(round(1.5 / spacing_zyx[2]))), max(1, int(round(1.5 / spacing_zyx[1]))), 1]
    img = _image(np.where(lung, smooth, -900.0), spacing_zyx)
    small = sitk.BinShrink(img, shrink)
    best = None
    for n, s in enumerate(VESSEL_SCALES_MM):
        report(0.35 + 0.35 * n / len(VESSEL_SCALES_MM), f"Lesions: vessels at {s} mm")
        # Scaling the image by s^2 gives the scale-normalised Hessian (Lindeberg), so one
        # structureness constant (gamma, in HU) works at every scale.
        g = sitk.SmoothingRecursiveGaussian(small, s) * (s * s)
        obj = sitk.ObjectnessMeasure(g, alpha=0.5, beta=0.5, gamma=150.0, scaleObjectnessMeasure=False, objectDimension=1, brightObject=True)
        arr = sitk.GetArrayFromImage(obj)
        dense = sitk.GetArrayFromImage(sitk.SmoothingRecursiveGaussian(small, s)) > VESSEL_MIN_HU
        hit = (arr > VESSEL_OBJECTNESS) & dense
        best = hit if best is None else (best | hit)
    up = _upsample_nearest(best, shrink, smooth.shape) & lung
    # The vessel's full width and halo: dilate the centre lines by the scale reached,
    # limited to voxels denser than aerated lung.
    radius = _radius_vox(max(VESSEL_SCALES_MM) / 2.0 + VESSEL_HALO_MM, spacing_zyx)
    grown = sitk.GetArrayFromImage(sitk.BinaryDilate(sitk.GetImageFromArray(up.astype(np.uint8)), radius, sitk.sitkBall)).astype(bool)
    return grown & lung & (smooth > GGO_FLOOR_HU)


def _upsample_nearest(a: np.ndarray, shrink_xyz, shape) -> np.ndarray:
    fz, fy, fx = shrink_xyz[2], shrink_xyz[1], shrink_xyz[0]
    up = np.repeat(np.repeat(np.repeat(a, fz, 0), fy, 1), fx, 2)[: shape[0], : shape[1], : shape[2]]
    pads = [(0, max(0, n - m)) for n, m in zip(shape, up.shape)]
    return np.pad(up, pads, mode="edge") if any(p[1] for p in pads) else up


def _masked_opening(mask: np.ndarray, lung: np.ndarray, spacing_zyx, radius_mm: float) -> np.ndarray:
    """Binary opening that does not erode from the pleura: outside the lung counts as
    foreground for the erosion, so a subpleural lesion is eroded only from its lung side.
    A partial-volume sheet along the diaphragm or chest wall is still removed, from the
    aerated lung next to it."""
    radius = _radius_vox(radius_mm, spacing_zyx)
    img = sitk.GetImageFromArray((mask | ~lung).astype(np.uint8))
    eroded = sitk.GetArrayFromImage(sitk.BinaryErode(img, radius, sitk.sitkBall)).astype(bool) & mask
    opened = sitk.GetArrayFromImage(sitk.BinaryDilate(sitk.GetImageFromArray(eroded.astype(np.uint8)), radius, sitk.sitkBall))
    return opened.astype(bool) & mask


def _closing_within(mask: np.ndarray, lung: np.ndarray, spacing_zyx, radius_mm: float) -> np.ndarray:
    radius = _radius_vox(radius_mm, spacing_zyx)
    img = sitk.GetImageFromArray(mask.astype(np.uint8))
    closed = sitk.GetArrayFromImage(sitk.BinaryMorphologicalClosing(img, radius, sitk.sitkBall)).astype(bool)
    return (closed & lung) | mask


def _drop_small(mask: np.ndarray, spacing_zyx, min_ml: float) -> np.ndarray:
    if not mask.any():
        return mask
    voxel_ml = float(np.prod(spacing_zyx)) / 1000.0
    cc = sitk.ConnectedComponent(sitk.GetImageFromArray(mask.astype(np.uint8)), True)
    min_voxels = int(np.ceil(min_ml / voxel_ml))
    relabelled = sitk.RelabelComponent(cc, minimumObjectSize=min_voxels)
    return sitk.GetArrayFromImage(relabelled) > 0
