"""Dense disease that the lung does not surround in-plane, found by ray enclosure.

Why: a mass or consolidation against the mediastinum or the chest wall is soft tissue
that touches the aerated lung on one side only, so neither a rolling-ball closing (it fills
gaps narrower than the ball, not blobs) nor axial hole filling (the blob is open towards
the mediastinum or ribs) puts it back into the lung. What sets such a blob apart from the
heart, the aorta or the liver is where it sits: inside the pleural cavity, walled in on
nearly every side by *its own* lung and the bony cage (ribs, spine), while mediastinal
structures see the other lung, the airways or a long run of soft tissue, and the liver or
spleen under the diaphragm (and the neck above the apex) have no lung or bone straight
below (above) them.

The pleural cavity has a third wall: fat. The mediastinal pleura lies on mediastinal fat,
the costal pleura on extrapleural fat; consolidation is water density (0-50 HU), never fat
(-190..-30 HU). A ray that runs sideways from a voxel into thick fat has left through that
wall: it tells nothing of what the voxel is (the heart borders fat too), so it counts
neither as walled in nor as escaped. Without this, an airless upper lobe whose whole
medial face lies on the mediastinum sees a third of its rays escape there, as the heart
does, and stays out (CAP phantoms, left Dice 0.947 severe / 0.961 critical; with it 0.978
/ 0.975). Only rays within ``FAT_WALL_MAX_DZ`` of the axial plane stop at fat (half of
them); steeper ones run through it as through any soft tissue, because fat below the lungs
(abdomen) or above them (neck) is not a wall of the pleural cavity: letting every ray stop
there walled in the liver dome (normal phantom right Dice 0.989 -> 0.984).

So every soft-tissue voxel near a lung casts rays in ``ENCLOSURE_DIRECTIONS`` directions
spread evenly over the sphere (in mm, so anisotropic voxels do not bias it) and is kept
when:

- at least ``MIN_ENCLOSED_SHARE`` of the rays that do not stop at fat first hit this lung
  or bone within ``RAY_RADIUS_MM``, and at least ``MIN_OWN_LUNG_SHARE`` hit this lung (bone alone walls in
  the paraspinal muscles too);
- at most ``MAX_OTHER_SHARE`` hit the other lung or the airways (mediastinum);
- at least ``VERTICAL_MIN`` of the two rays straight up and straight down ends on this
  lung or bone within ``VERTICAL_RADIUS_MM`` (not a vessel running craniocaudally such as
  the descending aorta, open at both ends; the liver dome and the neck, open on one side
  only, already fail the share above as a whole hemisphere of their rays escapes);
- it lies inside the lung's 3D convex hull (not the chest wall or shoulder girdle beside
  the apex, which bone and lung wall in as well).

Cells at the lung's edge or at the cage are never candidates themselves and follow their
kept neighbours. The kept voxels are opened by ``OPENING_MM`` in-plane (the thin layer of
chest wall between pleura and ribs is walled in too, but is never a blob) and only pieces
touching the lung are added. The opening also nibbles the rim of a mass where the rim's
walled-in cells form a thin band (against the aorta or the spine, where fewer rays end on
lung or bone): around every added piece of mass size (``MASS_MIN_ML``), the walled-in cells
the opening removed are given back within ``MASS_RIM_MM``. Thin chest-wall layers and
hilar bits have no mass beside them and stay out. The rays run on a grid of about ``RAY_GRID_MM`` voxels, which keeps
the cost near one second; the decision is pasted back onto the caller's grid and
intersected with its own soft-tissue mask.
"""
from __future__ import annotations

import logging
from typing import Optional, Tuple

import numpy as np
from scipy import ndimage as ndi
from scipy.spatial import ConvexHull, QhullError

from ..grid import bbox, block_mean, opening_inplane_mm, paste_nearest, within_mm

log = logging.getLogger(__name__)

#: Ray grid voxel size (mm, rounded to whole working-grid voxels: 4-5.6 mm): the rays'
#: resolution, not the output's.
RAY_GRID_MM = 5.0
#: Rays spread on the sphere (Fibonacci lattice) and how far they look (mm). 60 mm reaches
#: the lung from the middle of a 10-12 cm mass.
ENCLOSURE_DIRECTIONS = 32
RAY_RADIUS_MM = 60.0
#: The straight up / down rays look further: a mass may span most of a lung's height.
VERTICAL_RADIUS_MM = 100.0
#: One of the two vertical rays suffices: consolidation lying on the heart (the lingula,
#: the anterior upper lobe) looks down through the heart into the abdomen. Asking for both
#: left that part of an airless upper lobe out (CAP-severe phantom left Dice 0.936 ->
#: 0.947 with one) and part of the A0001 tumour (90.3 -> 93.1 %, left Dice 0.9797 ->
#: 0.9789); the normal and COVID phantoms do not change and P001 gains 1.5 mL (measured
#: before the fat wall; with it, two vertical walls give 0.961 instead of 0.978).
VERTICAL_MIN = 1
#: Shares of the rays (of 32: 26 walled in, 7 on this lung, 3 on the other lung or the
#: airways at most). Set on the phantoms (mass, lobar consolidation, normal mediastinum,
#: hilum and diaphragm) and checked on the A0001 reference, where 2 instead of 3 leaves
#: 5 % more of the tumour out and 4 changes nothing.
MIN_ENCLOSED_SHARE = 0.8
MIN_OWN_LUNG_SHARE = 0.2
MAX_OTHER_SHARE = 0.1
#: Ribs are thin and oblique: bone is spread this far (mm) craniocaudally (:func:`bony_cage`).
CAGE_Z_MM = 10.0
OPENING_MM = 4.0
#: An added piece of at least this volume is a mass: a 3 cm sphere, the radiological line
#: between nodule and mass (Fleischner glossary). The result does not depend on it between
#: 5 and 14 mL on A0001 and the phantoms, whose other added pieces stay below 9 mL.
MASS_MIN_ML = 14.0
#: How far (geodesic, mm) a mass takes back the walled-in cells the opening removed. On
#: A0001 the tumour inside the left lung goes 77 % -> 88.6 / 90.3 / 90.7 % at 15 / 20 /
#: 25 mm, left-lung Dice 0.9777 -> 0.9795 / 0.9797 / 0.9794: 20 mm is the Dice optimum;
#: the P001 additions and the COVID phantoms do not change.
MASS_RIM_MM = 20.0

#: Rays at most this steep (|dz| of the unit direction: 30 degrees from the axial plane)
#: stop at fat; 0.3 / 0.7 give CAP-severe left Dice 0.971 / 0.983 but the normal right lung
#: 0.9884 / 0.9873 (0.9882 at 0.5).
FAT_WALL_MAX_DZ = 0.5

# Ray-stop codes on the ray grid.
_PASS, _OWN, _BONE, _OPEN, _OTHER, _FAT = 0, 1, 2, 3, 4, 5


def enclosed_disease(
    lung: np.ndarray,
    other_lung: np.ndarray,
    soft_tissue: np.ndarray,
    cage: np.ndarray,
    airways: np.ndarray,
    spacing_zyx: Tuple[float, float, float],
    fat: Optional[np.ndarray] = None,
) -> np.ndarray:
    """Voxels of ``soft_tissue`` walled in by ``lung`` and bone, touching ``lung``.

    All masks are bool arrays on one grid (axial order z, y, x; z towards superior does
    not matter, rays go both ways). ``soft_tissue`` is the caller's candidate mask (not
    aerated, not bone, inside the body, not in either lung, off the airways); ``cage`` is
    :func:`bony_cage` of the bone mask, computed once for both lungs and every pass;
    ``fat`` the thick fat inside the body (None: no fat wall).
    """
    if not lung.any() or not soft_tissue.any():
        return np.zeros_like(lung)
    factors = tuple(max(1, int(round(RAY_GRID_MM / s))) for s in spacing_zyx)
    ray_spacing = tuple(s * f for s, f in zip(spacing_zyx, factors))
    codes = _ray_codes(lung, other_lung, cage, airways, soft_tissue, factors, fat)
    own = codes == _OWN
    candidates = within_mm(own, ray_spacing, RAY_RADIUS_MM) & (codes == _PASS)
    keep = np.zeros(codes.shape, bool)
    idx = np.nonzero(candidates)
    if idx[0].size:
        keep[idx] = _walled_in(codes, idx, ray_spacing)
        keep &= _inside_hull(own, keep, ray_spacing)
    # Cells at the lung's edge (lung majority) or at the cage were never candidates, but
    # part of them can be disease next to a kept cell: they follow their kept neighbours.
    edge = ndi.binary_dilation(keep, np.ones((3, 3, 3), bool)) & (own | (codes == _BONE))
    decided = paste_nearest(keep | edge, lung.shape, factors) & soft_tissue
    added = _touching(opening_inplane_mm(decided, spacing_zyx, OPENING_MM, min_radius_vox=1), lung)
    added = _with_mass_rims(added, decided, spacing_zyx)
    log.debug("enclosure fill: %d voxels added to a lung of %d", int(added.sum()), int(lung.sum()))
    return added


def _inside_hull(lung: np.ndarray, cells: np.ndarray, spacing) -> np.ndarray:
    """Which of ``cells`` have their centre inside the 3D convex hull of ``lung``.

    Why: the chest wall, shoulder girdle and neck next to the apex are walled in by bone
    and lung too, but they lie outside the lung's convex outer surface, while disease
    fills a lung's own space, inside it. The mediastinal concavity that the hull spans is
    left to the enclosure test.
    """
    out = np.zeros_like(cells)
    if not cells.any():
        return out
    border = np.argwhere(lung & ~ndi.binary_erosion(lung)) * np.asarray(spacing)
    try:
        hull = ConvexHull(border)
    except QhullError:  # a flat lung (one slice): no volume to fill into
        log.debug("enclosure fill: lung too flat for a convex hull")
        return out
    points = np.argwhere(cells)
    inside = np.all(points * np.asarray(spacing) @ hull.equations[:, :3].T + hull.equations[:, 3] <= 0.0, axis=1)
    out[tuple(points[inside].T)] = True
    return out


def bony_cage(bone: np.ndarray, z_spacing: float) -> np.ndarray:
    """``bone`` spread ``CAGE_Z_MM`` up and down (running maximum along z), so rays do
    not slip between two ribs of an axial slice."""
    n = int(round(CAGE_Z_MM / z_spacing))
    return ndi.maximum_filter1d(bone, 2 * n + 1, axis=0) if n else bone


def _block_share(mask: np.ndarray, factors) -> np.ndarray:
    """Share of each ray-grid cell covered by ``mask``."""
    return block_mean(mask.astype(np.float32), factors)


def _ray_codes(lung, other_lung, cage, airways, soft_tissue, factors, fat=None) -> np.ndarray:
    """What stops a ray in each ray-grid cell.

    Bone wins with any share (a rib is thinner than a cell and must not leak); the rest
    go by majority. Cells that are none of these (outside the body, aerated spaces that
    are not this lung such as bowel) stop a ray as open; the other lung and airways as
    mediastinum. Soft-tissue cells that are mostly fat are fat: never candidates, a wall
    for sideways rays only.
    """
    codes = np.full([-(-n // f) for n, f in zip(lung.shape, factors)], _OPEN, np.uint8)
    codes[_block_share(soft_tissue, factors) >= 0.5] = _PASS
    if fat is not None:
        codes[(codes == _PASS) & (_block_share(fat, factors) >= 0.5)] = _FAT
    codes[_block_share(lung, factors) >= 0.5] = _OWN
    codes[_block_share(other_lung | airways, factors) >= 0.5] = _OTHER
    codes[_block_share(cage, factors) > 0] = _BONE
    return codes


def _directions(n: int) -> np.ndarray:
    """``n`` unit vectors (z, y, x) spread evenly on the sphere (Fibonacci lattice)."""
    i = np.arange(n) + 0.5
    polar = np.arccos(1.0 - 2.0 * i / n)
    azimuth = np.pi * (1.0 + 5.0 ** 0.5) * i
    return np.stack([np.cos(polar), np.sin(polar) * np.sin(azimuth), np.sin(polar) * np.cos(azimuth)], axis=1)


def _first_stop(flat_codes: np.ndarray, strides, points: np.ndarray, direction, radius_mm: float, spacing) -> np.ndarray:
    """Code of the first non-pass cell along a ray from each point (flat indices into the
    padded code array; ``_OPEN`` when the ray runs ``radius_mm`` through soft tissue). Fat
    stops the ray only when it runs within ``FAT_WALL_MAX_DZ`` of the axial plane."""
    fat_stops = abs(float(direction[0])) <= FAT_WALL_MAX_DZ
    step = min(spacing)
    travel = np.arange(1, int(np.ceil(radius_mm / step)) + 1) * step
    offsets = np.round(np.outer(travel, direction) / np.asarray(spacing)).astype(np.int64)
    moved = np.ones(len(offsets), bool)  # drop repeats of the same cell along the ray
    moved[1:] = np.any(np.diff(offsets, axis=0) != 0, axis=1)
    flat_offsets = offsets[moved & np.any(offsets != 0, axis=1)] @ np.asarray(strides)
    stop = np.full(len(points), _OPEN, np.uint8)
    pending = np.arange(len(points))
    for off in flat_offsets:
        if pending.size == 0:
            break
        code = flat_codes[points[pending] + off]
        hit = code != _PASS
        if not fat_stops:
            hit &= code != _FAT
        stop[pending[hit]] = code[hit]
        pending = pending[~hit]
    return stop


def _walled_in(codes: np.ndarray, idx, spacing) -> np.ndarray:
    """The enclosure test of the module docstring for the candidate cells ``idx``.

    Candidates are dropped as soon as too many rays escape (most mediastinal and chest-wall
    cells fail within a few directions), which keeps the cost proportional to the disease.
    """
    margin = int(np.ceil(max(RAY_RADIUS_MM, VERTICAL_RADIUS_MM) / min(spacing))) + 1
    padded = np.pad(codes, margin, constant_values=_OPEN)  # rays leaving the grid are open
    strides = np.array([padded.shape[1] * padded.shape[2], padded.shape[2], 1], np.int64)
    points = (np.stack(idx, axis=1).astype(np.int64) + margin) @ strides
    flat = padded.ravel()
    n = ENCLOSURE_DIRECTIONS
    max_escaped = int(np.floor((1.0 - MIN_ENCLOSED_SHARE) * n))  # with no ray on fat: the most
    max_other = int(np.floor(MAX_OTHER_SHARE * n))
    alive = np.arange(len(points))
    own = np.zeros(len(points), np.int32)
    escaped = np.zeros(len(points), np.int32)
    other = np.zeros(len(points), np.int32)
    fat = np.zeros(len(points), np.int32)
    for direction in _directions(n)[_spread_order(n)]:
        stop = _first_stop(flat, strides, points[alive], direction, RAY_RADIUS_MM, spacing)
        own[alive] += stop == _OWN
        escaped[alive] += (stop != _OWN) & (stop != _BONE) & (stop != _FAT)
        other[alive] += stop == _OTHER
        fat[alive] += stop == _FAT
        alive = alive[(escaped[alive] <= max_escaped) & (other[alive] <= max_other)]
    ok = np.zeros(len(points), bool)
    ok[alive] = (own[alive] >= MIN_OWN_LUNG_SHARE * n) & (
        escaped[alive] <= (1.0 - MIN_ENCLOSED_SHARE) * (n - fat[alive])
    )
    sub = np.flatnonzero(ok)
    walled = np.zeros(sub.size, np.int32)
    for vertical in ((1.0, 0.0, 0.0), (-1.0, 0.0, 0.0)):
        stop = _first_stop(flat, strides, points[sub], np.array(vertical), VERTICAL_RADIUS_MM, spacing)
        walled += (stop == _OWN) | (stop == _BONE)
    ok[sub] = walled >= VERTICAL_MIN
    return ok


def _spread_order(n: int) -> np.ndarray:
    """An order of the Fibonacci directions that visits far-apart ones first (stride by a
    number coprime with ``n``), so escaping candidates are dropped early."""
    stride = next(k for k in range(int(n * 0.38), n) if np.gcd(k, n) == 1)
    return (np.arange(n) * stride) % n


def _with_mass_rims(added: np.ndarray, decided: np.ndarray, spacing_zyx) -> np.ndarray:
    """``added`` plus the ``decided`` cells within ``MASS_RIM_MM`` (geodesic, through
    ``decided``) of its mass-size pieces; labelled on ``decided``'s bounding box only."""
    box = bbox(decided, (0, 0, 0))
    if box is None or not added[box].any():
        return added
    labels, _ = ndi.label(added[box])
    volumes_ml = np.bincount(labels.ravel()) * float(np.prod(spacing_zyx)) / 1000.0
    masses = np.flatnonzero(volumes_ml[1:] >= MASS_MIN_ML) + 1
    if masses.size == 0:
        return added
    steps = max(1, int(round(MASS_RIM_MM / float(np.mean(spacing_zyx[1:])))))
    rims = ndi.binary_dilation(np.isin(labels, masses), iterations=steps, mask=decided[box])
    out = added.copy()
    out[box] |= rims
    return out


def _touching(added: np.ndarray, lung: np.ndarray) -> np.ndarray:
    """Pieces of ``added`` (face connectivity) with a voxel next to ``lung``; labelled on
    their bounding box only."""
    box = bbox(added, (1, 1, 1))
    if box is None:
        return added
    labels, _ = ndi.label(added[box])
    beside_lung = ndi.binary_dilation(lung[box]) & (labels > 0)
    touching = np.unique(labels[beside_lung])
    out = np.zeros_like(added)
    out[box] = np.isin(labels, touching[touching > 0])
    return out
