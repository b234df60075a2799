"""Scan-level metrics shared by the real-scan scoreboard and its tests.

The functions are small and pure numpy so that the benchmark and the unit tests score
exactly the same way; a number in the scoreboard can be reproduced by hand on a toy array.
The one reader here (:func:`read_segmentation_masks`) uses SimpleITK/pynrrd directly, not
the package's own io module, so the scoreboard keeps reading outputs while that module moves
and so it checks the written file rather than trusting the writer's own reader.
"""
from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import NamedTuple, Optional, Sequence, Union

import numpy as np
import SimpleITK as sitk
from scipy.stats import rankdata

log = logging.getLogger(__name__)

#: Slices whose neighbours cover less lung than this are not judged for a drop: at the apex
#: and the base a few pixels more or less is a large ratio but no lost lung.
MIN_NEIGHBOUR_AREA_MM2 = 100.0

#: Geometry tolerance (mm) for treating a segmentation grid as the CT grid itself.
_GRID_TOL_MM = 1e-3


def dice(a: np.ndarray, b: np.ndarray, mask: Optional[np.ndarray] = None, empty: float = 1.0) -> float:
    """Dice overlap of two boolean masks, optionally restricted to ``mask``.

    Two empty masks score ``empty`` (1.0 by default: a scan without a structure and a method
    that finds none should not score as a failure). One empty and one not gives 0.0.
    """
    a = np.asarray(a, dtype=bool)
    b = np.asarray(b, dtype=bool)
    if a.shape != b.shape:
        raise ValueError(f"dice: shapes differ {a.shape} vs {b.shape}")
    if mask is not None:
        m = np.asarray(mask, dtype=bool)
        a, b = a & m, b & m
    total = int(np.count_nonzero(a)) + int(np.count_nonzero(b))
    if total == 0:
        return float(empty)
    return 2.0 * float(np.count_nonzero(a & b)) / total


def share_inside(mask_a: np.ndarray, mask_b: np.ndarray) -> float:
    """Fraction of the voxels of ``mask_a`` that lie inside ``mask_b``.

    Used for "how much of the airway lumen leaked into the lung" and "how much of the tumour
    the lung kept". NaN when ``mask_a`` is empty: there is nothing to be inside, and 0 or 1
    would both be misleading in a table.
    """
    a = np.asarray(mask_a, dtype=bool)
    b = np.asarray(mask_b, dtype=bool)
    if a.shape != b.shape:
        raise ValueError(f"share_inside: shapes differ {a.shape} vs {b.shape}")
    n = int(np.count_nonzero(a))
    if n == 0:
        return float("nan")
    return float(np.count_nonzero(a & b)) / n


class SliceLoss(NamedTuple):
    """Worst slice-to-slice area loss: ``loss`` as a fraction (0.4 = 40 % less lung than
    both neighbours), ``index`` the slice along the axis; (nan, None) if no slice could be
    judged."""

    loss: float
    index: Optional[int]


def slice_areas(mask: np.ndarray, axis: int = 0, pixel_area_mm2: float = 1.0) -> np.ndarray:
    """Mask area per slice along ``axis`` in mm²."""
    m = np.asarray(mask, dtype=bool)
    other = tuple(i for i in range(m.ndim) if i != axis % m.ndim)
    return np.count_nonzero(m, axis=other).astype(np.float64) * float(pixel_area_mm2)


def worst_slice_loss(
    mask: np.ndarray,
    axis: int = 0,
    pixel_area_mm2: float = 1.0,
    min_area_mm2: float = MIN_NEIGHBOUR_AREA_MM2,
) -> SliceLoss:
    """Worst drop of a slice's mask area against BOTH of its neighbours.

    For each slice k with both neighbours covering at least ``min_area_mm2``, the loss is
    ``1 - area[k] / min(area[k-1], area[k+1])``. Comparing with the smaller neighbour means
    the natural taper of the lung at the apex and base (one neighbour smaller) never counts,
    while a slice where the mask vanished or shrank in the middle of the lung does: a lung
    lost on one slice is invisible in Dice and volume but obvious in 3D rendering and fatal
    for per-slice scores. A loss of 0.4 or more is a dropped slice.
    """
    areas = slice_areas(mask, axis=axis, pixel_area_mm2=pixel_area_mm2)
    if areas.size < 3:
        return SliceLoss(float("nan"), None)
    prev, cur, nxt = areas[:-2], areas[1:-1], areas[2:]
    ok = (prev >= min_area_mm2) & (nxt >= min_area_mm2)
    if not np.any(ok):
        return SliceLoss(float("nan"), None)
    ref = np.minimum(prev, nxt)
    loss = np.full(cur.shape, -np.inf)
    loss[ok] = 1.0 - cur[ok] / ref[ok]
    i = int(np.argmax(loss))
    return SliceLoss(float(loss[i]), i + 1)


def slice_auc(
    scores: np.ndarray, labels: np.ndarray, include: Optional[np.ndarray] = None
) -> float:
    """ROC AUC of per-slice scores against 0/1 per-slice labels (Mann–Whitney U).

    Ties get average ranks, so a constant score gives 0.5 rather than an order-dependent
    number. ``include`` (boolean per slice) restricts the AUC to slices that contain lung:
    slices through the neck or abdomen are trivially "not infected" and would inflate it.
    NaN when one class is absent.
    """
    s = np.asarray(scores, dtype=np.float64).ravel()
    y = np.asarray(labels).ravel().astype(bool)
    if s.shape != y.shape:
        raise ValueError(f"slice_auc: {s.size} scores vs {y.size} labels")
    if include is not None:
        keep = np.asarray(include, dtype=bool).ravel()
        if keep.shape != s.shape:
            raise ValueError(f"slice_auc: include has {keep.size} entries, need {s.size}")
        s, y = s[keep], y[keep]
    return binary_auc(y, s)


def binary_auc(labels: Sequence[int], scores: Sequence[float]) -> float:
    """ROC AUC via the Mann–Whitney U statistic, ties at average ranks; NaN if one class only."""
    y = np.asarray(labels).ravel().astype(bool)
    s = np.asarray(scores, dtype=np.float64).ravel()
    n_pos = int(np.count_nonzero(y))
    n_neg = int(y.size - n_pos)
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(s)  # average ranks for ties
    u = float(ranks[y].sum()) - n_pos * (n_pos + 1) / 2.0
    return u / (n_pos * n_neg)


# --- reading a Slicer segmentation onto the CT grid -------------------------------------

_SEGMENT_KEY = re.compile(r"^Segment(\d+)_ID$")


def _segments_from_header(header: dict) -> list[tuple[str, int, int]]:
    """(id, layer, label value) of every segment in a seg.nrrd header, in file order."""
    found = []
    for key in header:
        m = _SEGMENT_KEY.match(key)
        if not m:
            continue
        n = m.group(1)
        layer = int(header.get(f"Segment{n}_Layer", 0))
        value = int(header.get(f"Segment{n}_LabelValue", 1))
        found.append((int(n), str(header[key]), layer, value))
    return [(sid, layer, value) for _, sid, layer, value in sorted(found)]


def _space_sign(header: dict) -> np.ndarray:
    """Sign flips that take the file's world space to LPS (SimpleITK's space)."""
    space = str(header.get("space", "left-posterior-superior")).lower()
    if space in ("right-anterior-superior", "ras"):
        return np.array([-1.0, -1.0, 1.0])
    if space not in ("left-posterior-superior", "lps"):
        raise ValueError(f"unsupported nrrd space {space!r}")
    return np.array([1.0, 1.0, 1.0])


def _geometry(header: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Origin, spacing and direction (columns = axis unit vectors) in LPS of the spatial
    axes of a (possibly 4D, layers-first) nrrd."""
    dirs = np.asarray(header["space directions"], dtype=np.float64)
    rows = [r for r in dirs if np.all(np.isfinite(r))]  # drop the 'none' row of the list axis
    if len(rows) != 3:
        raise ValueError(f"expected 3 spatial axes, got space directions {dirs.tolist()}")
    sign = _space_sign(header)
    axes = np.stack(rows) * sign  # row a = world vector of one step along axis a
    spacing = np.linalg.norm(axes, axis=1)
    direction = (axes / spacing[:, None]).T
    origin = np.asarray(header["space origin"], dtype=np.float64) * sign
    return origin, spacing, direction


def _same_grid(
    image: sitk.Image, origin: np.ndarray, spacing: np.ndarray, direction: np.ndarray,
    size_xyz: tuple[int, ...],
) -> bool:
    return (
        tuple(int(s) for s in image.GetSize()) == tuple(int(s) for s in size_xyz)
        and np.allclose(image.GetOrigin(), origin, atol=_GRID_TOL_MM)
        and np.allclose(image.GetSpacing(), spacing, atol=_GRID_TOL_MM)
        and np.allclose(np.reshape(image.GetDirection(), (3, 3)), direction, atol=1e-6)
    )


def read_segmentation_masks(
    seg_path: Union[str, Path], ct_image: sitk.Image
) -> dict[str, np.ndarray]:
    """Read a Slicer ``.seg.nrrd`` into ``{segment_id: bool array (z, y, x)}`` on the CT grid.

    Handles the layered 4D layout (layers first, ``SegmentN_Layer``/``SegmentN_LabelValue``)
    and the plain 3D labelmap. The segmentation may be stored on the CT grid or on a cropped
    (or otherwise different) grid: it is then resampled onto the CT grid through physical
    LPS coordinates with nearest-neighbour interpolation, so voxels are compared where they
    actually lie and not by index.
    """
    import nrrd  # pynrrd; imported here so the metric functions work without it

    data, header = nrrd.read(str(seg_path))
    segments = _segments_from_header(header)
    if not segments:
        raise ValueError(f"{seg_path}: no SegmentN_ID keys; not a Slicer segmentation")
    if data.ndim == 3:
        layers = data[None]
    elif data.ndim == 4:
        layers = data
    else:
        raise ValueError(f"{seg_path}: unexpected dimension {data.ndim}")
    origin, spacing, direction = _geometry(header)
    size_xyz = layers.shape[1:]
    same = _same_grid(ct_image, origin, spacing, direction, size_xyz)
    if not same:
        log.info("%s: segmentation grid %s differs from the CT grid %s; resampling",
                 Path(seg_path).name, size_xyz, ct_image.GetSize())

    masks: dict[str, np.ndarray] = {}
    cache: dict[int, np.ndarray] = {}
    for sid, layer, value in segments:
        if layer not in cache:
            arr_zyx = np.ascontiguousarray(np.transpose(layers[layer], (2, 1, 0)))
            if not same:
                img = sitk.GetImageFromArray(arr_zyx)
                img.SetOrigin(tuple(origin))
                img.SetSpacing(tuple(spacing))
                img.SetDirection(tuple(direction.ravel()))
                img = sitk.Resample(img, ct_image, sitk.Transform(), sitk.sitkNearestNeighbor,
                                    0, img.GetPixelID())
                arr_zyx = sitk.GetArrayFromImage(img)
            cache[layer] = arr_zyx
        masks[sid] = cache[layer] == value
    return masks
