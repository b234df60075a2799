"""Moving masks and images between a full-resolution grid and a coarser one by whole-voxel
factors, bounding boxes, and SimpleITK's ball kernel for scipy morphology.

Shared by the lung engine (its ~2.5 mm working grid) and its enclosure fill (a ~5 mm ray
grid), so both shrink, paste back and crop the same way.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk


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


def bbox(mask: np.ndarray, margin: Sequence[int]) -> Optional[Tuple[slice, slice, slice]]:
    """Bounding box of ``mask`` grown by ``margin`` voxels per axis (clipped), or None."""
    if not mask.any():
        return None
    out = []
    for axis, (n, m) in enumerate(zip(mask.shape, margin)):
        hit = np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis)))
        out.append(slice(max(0, hit[0] - m), min(n, hit[-1] + m + 1)))
    return tuple(out)


def ball_kernel(radius_xyz: Sequence[int]) -> np.ndarray:
    """SimpleITK's ball structuring element of radius ``radius_xyz`` (voxels, x y z) as a
    (z, y, x) bool array, for scipy morphology (scipy's flat-kernel opening is several times
    faster than SimpleITK's at small radii, with the same result)."""
    size = [2 * int(v) + 1 for v in radius_xyz]
    point = sitk.Image(size, sitk.sitkUInt8)
    point[[int(v) for v in radius_xyz]] = 1
    return sitk.GetArrayFromImage(sitk.BinaryDilate(point, [int(v) for v in radius_xyz], sitk.sitkBall)).astype(bool)
