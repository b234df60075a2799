"""Moving masks and images between a full-resolution grid and a coarser one by whole-voxel
factors, bounding boxes, and SimpleITK's ball kernel for scipy morphology.

Also mm-radius binary morphology (SimpleITK ball kernels on scipy, or exact Euclidean balls
from distance maps), per-slice hole filling, connected components and small-component
removal, computed on bounding boxes, and the robust noise SD both engines measure with.

Shared by the lung engine (its ~2.5 mm working grid), its enclosure fill (a ~5 mm ray
grid), the lesion engine, zones and findings, so all of them shrink, paste back and crop
the same way.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import SimpleITK as sitk
from scipy import ndimage as ndi


def block_mean(image: np.ndarray, factors: Sequence[int]) -> np.ndarray:
    """Block-average by ``factors`` (z, y, x) as float32 (also averages away noise; on a
    float 0/1 mask it is each block's covered share).

    The last partial block along each axis is padded by edge replication so the coarse grid
    covers the whole volume.
    """
    pads = [(0, (-n) % f) for n, f in zip(image.shape, factors)]
    arr = np.pad(image, pads, mode="edge") if any(p[1] for p in pads) else np.ascontiguousarray(image)
    img = sitk.GetImageFromArray(arr)  # stays in the input type: no full-size float copy
    out = sitk.BinShrink(img, [int(factors[2]), int(factors[1]), int(factors[0])])
    return sitk.GetArrayFromImage(out).astype(np.float32)


def paste_nearest(mask: np.ndarray, shape, factors: Sequence[int]) -> np.ndarray:
    """Nearest-neighbour upsampling by block replication, cropped to ``shape``.

    One broadcast write into the block view of a (padded) output, only over the mask's
    bounding box: no intermediate full-size copies.
    """
    f = tuple(int(v) for v in factors)
    n = mask.shape
    padded = np.zeros(tuple(a * b for a, b in zip(n, f)), bool)
    box = bbox(mask, (0, 0, 0))
    if box is not None:
        blocks = padded.reshape(n[0], f[0], n[1], f[1], n[2], f[2])  # a view
        blocks[box[0], :, box[1], :, box[2], :] = mask[box][:, None, :, None, :, None]
    return padded[: shape[0], : shape[1], : shape[2]]


def bbox(mask: np.ndarray, margin: Union[int, Sequence[int]] = 0) -> Optional[Tuple[slice, slice, slice]]:
    """Bounding box of a 3D bool mask as slices, grown by ``margin`` voxels (one for all
    axes or one per axis, clipped to the array); None when the mask is empty.

    Two passes over the mask as bytes (per-slice max, then an OR over the occupied slices)
    instead of three ``any`` projections: ~5x faster on a 512x512x300 mask.
    """
    margins = [int(margin)] * 3 if np.isscalar(margin) else [int(m) for m in margin]
    m = np.ascontiguousarray(mask).view(np.uint8)
    ks = np.flatnonzero(m.reshape(m.shape[0], -1).max(axis=1))
    if ks.size == 0:
        return None
    yx = np.bitwise_or.reduce(m[ks[0] : ks[-1] + 1], axis=0)
    ys, xs = np.flatnonzero(yx.max(axis=1)), np.flatnonzero(yx.max(axis=0))
    return tuple(
        slice(max(0, int(i[0]) - g), min(n, int(i[-1]) + 1 + g)) for i, n, g in zip((ks, ys, xs), m.shape, margins)
    )


def ball_radius_vox(radius_mm: float, spacing_zyx: Sequence[float]) -> List[int]:
    """Voxel radii (x, y, z order, as SimpleITK and :func:`ball_kernel` take them) of a ball
    of ``radius_mm`` on an anisotropic grid."""
    return [int(max(0, round(radius_mm / s))) for s in reversed(spacing_zyx)]


def ball_kernel(radius_xyz: Sequence[int]) -> np.ndarray:
    """SimpleITK's ball structuring element of radius ``radius_xyz`` (voxels, x y z) as a
    (z, y, x) bool array, for scipy morphology (scipy's flat-kernel opening is several times
    faster than SimpleITK's at small radii, with the same result)."""
    size = [2 * int(v) + 1 for v in radius_xyz]
    point = sitk.Image(size, sitk.sitkUInt8)
    point[[int(v) for v in radius_xyz]] = 1
    return sitk.GetArrayFromImage(sitk.BinaryDilate(point, [int(v) for v in radius_xyz], sitk.sitkBall)).astype(bool)


def paste_linear(mask: np.ndarray, shape, factors: Sequence[int]) -> np.ndarray:
    """Upsample a coarse mask by linear interpolation of its indicator, thresholded at 0.5.

    Why not a full resampling: the interpolated value only differs from the nearest block
    value between coarse voxel centres whose eight corners disagree, i.e. in a one-voxel
    band along the mask's border (a few percent of the volume). So the mask is pasted by
    block replication and only the cells of that band are interpolated, as one
    (cells x 8) @ (8 x voxels per cell) product, which is several times faster than
    resampling the whole bounding box and gives the same smooth border.

    Coarse voxel centres sit at ``i * f + (f - 1) / 2`` on the full grid (block averaging);
    beyond the outermost centres it is clamped (edge value).
    """
    f = np.array([int(v) for v in factors])
    out = paste_nearest(mask, shape, f)
    box = bbox(mask, (1, 1, 1))
    if box is None:
        return out
    # Cell corners; the crop has a zero margin except at the array border, where the edge is
    # replicated (the indicator is clamped there, as in a resampling).
    padded = np.pad(mask[box], 1, mode="edge").astype(np.uint8)
    n = [a - 1 for a in padded.shape]
    offsets = [(dz, dy, dx) for dz in (0, 1) for dy in (0, 1) for dx in (0, 1)]
    corners = [padded[dz : dz + n[0], dy : dy + n[1], dx : dx + n[2]] for dz, dy, dx in offsets]
    count = sum(corners[1:], corners[0].copy())
    cells = np.nonzero((count > 0) & (count < 8))  # corners disagree
    if cells[0].size == 0:
        return out
    values = np.stack([c[cells] for c in corners], axis=1).astype(np.float32)  # (cells, 8)
    # Per axis: the cell with lower corner i covers full voxels i*f + s + t, t < f, with
    # weight (t + s - (f-1)/2) / f on the upper corner.
    start = np.ceil((f - 1) / 2.0).astype(int)
    weights = [(np.arange(k) + s - (k - 1) / 2.0) / k for k, s in zip(f, start)]
    wz, wy, wx = weights
    table = np.empty((8, f[0], f[1], f[2]), np.float32)
    for c, (dz, dy, dx) in enumerate(offsets):
        table[c] = np.einsum(
            "i,j,k->ijk", wz if dz else 1 - wz, wy if dy else 1 - wy, wx if dx else 1 - wx
        )
    inside = (values @ table.reshape(8, -1)) > 0.5  # (n, voxels per cell)
    # Full coordinates of every voxel of every mixed cell (lower corner index i - 1 in the
    # padded grid is box.start + i - 1 on the coarse grid).
    coords = []
    for axis, (c, b) in enumerate(zip(cells, box)):
        lower = b.start + c - 1
        local = np.arange(f[axis])
        coords.append(lower[:, None] * f[axis] + start[axis] + local[None, :])
    zz = coords[0][:, :, None, None]
    yy = coords[1][:, None, :, None]
    xx = coords[2][:, None, None, :]
    zz, yy, xx = (np.broadcast_to(a, (len(values), f[0], f[1], f[2])).reshape(len(values), -1) for a in (zz, yy, xx))
    valid = (zz >= 0) & (yy >= 0) & (xx >= 0) & (zz < shape[0]) & (yy < shape[1]) & (xx < shape[2])
    out[zz[valid], yy[valid], xx[valid]] = inside[valid]
    return out


# ----------------------------------------------------------------- mm-radius binary morphology
def ball_mm(spacing_zyx: Sequence[float], radius_mm: float) -> np.ndarray:
    """SimpleITK's ball of ``radius_mm`` (anisotropy-aware voxel radii) as a scipy structure."""
    return ball_kernel(ball_radius_vox(radius_mm, spacing_zyx))


def _grown_box(mask: np.ndarray, pad: Sequence[int]) -> Optional[Tuple[slice, slice, slice]]:
    return bbox(mask, [int(p) for p in pad])


def dilate(mask: np.ndarray, structure: np.ndarray) -> np.ndarray:
    """Binary dilation by ``structure`` (odd-sized, centred), computed on the mask's bounding
    box grown by the structure's radius only (most masks here are small next to the array,
    so this is the cost)."""
    r = (np.array(structure.shape) - 1) // 2
    box = _grown_box(mask, r)
    out = np.zeros(mask.shape, bool)
    if box is not None:
        out[box] = ndi.binary_dilation(mask[box], structure=structure)
    return out


def dilate_mm(mask: np.ndarray, spacing_zyx: Sequence[float], radius_mm: float) -> np.ndarray:
    """Binary dilation by a ball of ``radius_mm`` (see :func:`dilate`)."""
    return dilate(mask, ball_mm(spacing_zyx, radius_mm))


def opening_mm(mask: np.ndarray, spacing_zyx: Sequence[float], radius_mm: float) -> np.ndarray:
    """Binary opening by a ball of ``radius_mm``, restricted to ``mask``.

    Beyond the *array* faces counts as foreground for the erosion (a structure cut off by the
    scan's field of view is not eroded from the cut), anywhere else background; computed on
    the bounding box grown by the radius, with the same result as on the whole array.
    """
    ball = ball_mm(spacing_zyx, radius_mm)
    r = (np.array(ball.shape) - 1) // 2
    box = _grown_box(mask, r)
    out = np.zeros(mask.shape, bool)
    if box is None:
        return out
    crop = mask[box]
    # pad by the radius: ones at array faces (border_value=1 of a full-array erosion), zeros inside
    pads = [(int(ri), int(ri)) for ri in r]
    values = [(int(sl.start == 0), int(sl.stop == n)) for sl, n in zip(box, mask.shape)]
    padded = np.pad(crop, pads, constant_values=values)
    inner = tuple(slice(p[0], p[0] + n) for p, n in zip(pads, crop.shape))
    eroded = np.zeros(padded.shape, bool)  # the dilation sees background beyond the faces
    eroded[inner] = ndi.binary_erosion(padded, structure=ball, border_value=1)[inner]
    out[box] = ndi.binary_dilation(eroded, structure=ball)[inner] & crop
    return out


def closing_mm(mask: np.ndarray, spacing_zyx: Sequence[float], radius_mm: float) -> np.ndarray:
    """Binary closing by a ball of ``radius_mm`` on a copy padded by the radius, so the array
    edge neither adds nor removes anything; the result contains ``mask``."""
    ball = ball_mm(spacing_zyx, radius_mm)
    r = (np.array(ball.shape) - 1) // 2
    box = _grown_box(mask, 2 * r)
    out = mask.copy()
    if box is None:
        return out
    pad = [(int(v), int(v)) for v in r]
    padded = np.pad(mask[box], pad)
    closed = ndi.binary_erosion(ndi.binary_dilation(padded, structure=ball), structure=ball)
    out[box] |= closed[tuple(slice(p[0], p[0] + n) for p, n in zip(pad, mask[box].shape))]
    return out


def disc_mm(spacing_zyx: Sequence[float], radius_mm: float, min_radius_vox: int = 0) -> np.ndarray:
    """SimpleITK's ball of ``radius_mm`` in the axial plane only (z radius 0; each in-plane
    voxel radius at least ``min_radius_vox``) as a (1, ny, nx) scipy structure."""
    rx, ry, _ = (max(int(min_radius_vox), v) for v in ball_radius_vox(radius_mm, spacing_zyx))
    return ball_kernel([rx, ry, 0])


def opening_inplane_mm(mask: np.ndarray, spacing_zyx: Sequence[float], radius_mm: float,
                       min_radius_vox: int = 0) -> np.ndarray:
    """Opening in the axial plane only, by an elliptic disc of ``radius_mm`` (at least
    ``min_radius_vox`` voxels per in-plane axis), on the mask's bounding box.

    Why in-plane: on thick slices a 3D ball would erase the apex or base slice. Beyond the
    array is background (an opening never grows a mask, so the box gives the full-array
    result).
    """
    box = bbox(mask)
    out = np.zeros(mask.shape, bool)
    if box is not None:
        disc = disc_mm(spacing_zyx, radius_mm, min_radius_vox)
        out[box] = ndi.binary_opening(mask[box], structure=disc, border_value=0)
    return out


# ------------------------------------------------------------- distance maps (Euclidean balls)
def _maurer(image: sitk.Image, inside_positive: bool) -> sitk.Image:
    """SimpleITK's Maurer distance map in mm (multithreaded, unlike scipy's EDT)."""
    return sitk.SignedMaurerDistanceMap(image, insideIsPositive=inside_positive, squaredDistance=False,
                                        useImageSpacing=True)


def _mm_image(mask: np.ndarray, spacing_zyx: Sequence[float]) -> sitk.Image:
    img = sitk.GetImageFromArray(mask.astype(np.uint8))
    img.SetSpacing([float(s) for s in reversed(spacing_zyx)])
    return img


def inside_distance_mm(mask: np.ndarray, spacing_zyx: Sequence[float]) -> np.ndarray:
    """Distance (mm) of every voxel inside ``mask`` to its border, 0 outside."""
    return np.maximum(sitk.GetArrayFromImage(_maurer(_mm_image(mask, spacing_zyx), True)), 0.0)


def within_mm(mask: np.ndarray, spacing_zyx: Sequence[float], radius_mm: float) -> np.ndarray:
    """Voxels within ``radius_mm`` (Euclidean, mm) of ``mask``: a dilation by an exact ball
    whose cost does not grow with the radius; on the whole array."""
    dist = _maurer(_mm_image(mask, spacing_zyx), False)
    return sitk.GetArrayViewFromImage(dist) <= radius_mm


def closing_distance_mm(mask: np.ndarray, spacing_zyx: Sequence[float], radius_mm: float) -> np.ndarray:
    """Binary closing by an exact Euclidean ball of ``radius_mm`` via two distance maps.

    Why next to :func:`closing_mm`: its cost is independent of the radius (a structuring
    element's is not), which matters for the lung engine's 8 mm rolling ball; the ball is
    the true one, not SimpleITK's rounded voxel ball. Computed on the mask's bounding box
    grown by the radius (a closing never reaches further); the result contains ``mask``.
    """
    box = bbox(mask, [int(np.ceil(radius_mm / s)) + 1 for s in spacing_zyx])
    out = mask.copy()
    if box is None:
        return out
    dilated = _maurer(_mm_image(mask[box], spacing_zyx), False) <= radius_mm
    closed = _maurer(dilated, True) >= radius_mm  # must outlive its array view
    out[box] |= sitk.GetArrayViewFromImage(closed).view(bool)
    return out


# ----------------------------------------------------------------------- slices and components
def inplane_cross() -> np.ndarray:
    """4-connected cross in the axial plane as a (3, 3, 3) structure (no link across slices)."""
    s = np.zeros((3, 3, 3), bool)
    s[1] = ndi.generate_binary_structure(2, 1)
    return s


def fill_holes_2d(mask: np.ndarray) -> np.ndarray:
    """Fill the holes of every axial slice (4-connected background), on the bounding box."""
    box = bbox(mask)
    out = np.zeros(mask.shape, bool)
    if box is not None:
        out[box] = ndi.binary_fill_holes(mask[box], structure=inplane_cross())
    return out


def components(mask: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Face-connected 3D components labelled 1, 2, ... by decreasing size, and the voxel
    count of each label (index 0 = background)."""
    cc = sitk.RelabelComponent(sitk.ConnectedComponent(sitk.GetImageFromArray(mask.astype(np.uint8))))
    labels = sitk.GetArrayFromImage(cc)
    return labels, np.bincount(labels.ravel())


def components_26(mask: np.ndarray) -> Tuple[np.ndarray, int]:
    """26-connected components labelled 1..n in scan order, and n: the labels for
    per-component sums (``np.bincount`` over them). Why 26-connected: on thick slices a
    lesion's margin or a grown region meets its neighbour slice only at an edge or a corner."""
    labels, n = ndi.label(mask, structure=np.ones((3, 3, 3), bool))
    return labels, int(n)


def remove_small_components(mask: np.ndarray, min_voxels: int) -> np.ndarray:
    """Drop the 26-connected components smaller than ``min_voxels``, on the bounding box."""
    box = bbox(mask)
    out = np.zeros(mask.shape, bool)
    if box is None:
        return out
    cc = sitk.ConnectedComponent(sitk.GetImageFromArray(mask[box].astype(np.uint8)), True)
    out[box] = sitk.GetArrayFromImage(sitk.RelabelComponent(cc, minimumObjectSize=int(min_voxels))) > 0
    return out


# ------------------------------------------------------------------------- voxel statistics
def robust_sd(values: np.ndarray) -> float:
    """1.4826 x the median absolute deviation: the standard deviation of the values' Gaussian
    part (scanner noise), unmoved by the minority a plain SD would count (vessels, edges)."""
    v = np.asarray(values, dtype=np.float64)
    return float(1.4826 * np.median(np.abs(v - np.median(v))))
