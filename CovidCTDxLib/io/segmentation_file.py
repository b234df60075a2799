"""Volumes and Slicer segmentations on disk: seg.nrrd written atomically and read back onto the CT grid.

The seg.nrrd layout is Slicer's (one layer per group of non-overlapping segments, terminology
and colour per segment), so Slicer, the findings recompute and the browser viewer read the same
file. Files are written to a temporary name and renamed, so a failure never leaves half a file.
"""
from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional, Tuple

import numpy as np
import SimpleITK as sitk

from ..errors import InputError, OutputError
from ..segments import SEGMENTS, SegmentSpec
from ..volume import CTVolume
from .readers import VOLUME_SUFFIXES, PathLike, _suffix

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- writing
def _write_atomically(path: Path, tmp: Path, write: Callable[[Path], None]) -> Path:
    """Run ``write(tmp)`` and rename tmp to ``path``; on failure remove tmp and raise one line.

    Why here: a full disk or a read-only folder surfaces as OSError from pynrrd but as an
    ITK RuntimeError (a multi-line "[nrrd]" dump) from SimpleITK; both become an
    :class:`OutputError` that says what to do, and no partial file is left behind.
    """
    try:
        write(tmp)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise OutputError(f"Cannot write {path}: {exc.strerror or exc}.") from None
    except RuntimeError:  # SimpleITK's I/O failures
        tmp.unlink(missing_ok=True)
        try:
            free = f"{shutil.disk_usage(path.parent).free / 2**20:.1f} MiB free there"
        except OSError:
            free = "the folder is not accessible"
        raise OutputError(f"Cannot write {path} ({free}): is the disk full or the folder read-only?") from None
    return path


def ct_to_image(ct: CTVolume, array: Optional[np.ndarray] = None) -> sitk.Image:
    """A SimpleITK image of ``array`` (default: the CT's) with the CT's geometry."""
    image = sitk.GetImageFromArray(ct.array if array is None else array)
    image.SetSpacing(ct.spacing)
    image.SetOrigin(ct.origin)
    image.SetDirection(tuple(float(v) for v in ct.direction.reshape(-1)))
    return image


def write_volume(ct: CTVolume, path: PathLike, array: Optional[np.ndarray] = None) -> Path:
    """Write the CT (or another array on its grid) as NRRD/NIfTI/MHA, atomically."""
    path = Path(path)
    if _suffix(path) not in VOLUME_SUFFIXES:
        raise InputError(f"{path}: unsupported output format; use one of {', '.join(VOLUME_SUFFIXES)}.")
    image = ct_to_image(ct, array)
    tmp = path.with_name(f".{path.name}.partial{_suffix(path)}")
    return _write_atomically(path, tmp, lambda t: sitk.WriteImage(image, str(t), useCompression=True))


def write_segmentation(
    ct: CTVolume, masks: Mapping[str, np.ndarray], path: PathLike, specs: Mapping[str, SegmentSpec] = SEGMENTS
) -> Path:
    """Write bool masks on the CT grid as a Slicer ``.seg.nrrd``.

    Each mask becomes one segment with its ID, name, colour and terminology from
    ``specs``. Overlapping segments (a lesion lies inside a lung) go to separate layers of
    a 4D NRRD, as Slicer does, so nothing is lost; non-overlapping ones share a layer.
    """
    import nrrd

    path = Path(path)
    names = [name for name, m in masks.items() if m is not None]
    for name in names:
        if masks[name].shape != ct.shape:
            raise ValueError(f"segment {name} has shape {masks[name].shape}, CT has {ct.shape}")
    layers: List[np.ndarray] = []
    placement: Dict[str, Tuple[int, int]] = {}
    for name in names:
        mask = masks[name].astype(bool)
        for index, layer in enumerate(layers):
            label = int(layer.max()) + 1
            if label < 255 and not np.any(layer[mask]):
                layer[mask] = label
                placement[name] = (index, label)
                break
        else:
            layer = np.zeros(ct.shape, dtype=np.uint8)
            layer[mask] = 1
            layers.append(layer)
            placement[name] = (len(layers) - 1, 1)
    if not layers:
        layers.append(np.zeros(ct.shape, dtype=np.uint8))
    # nrrd's axis order is (x, y, z): transpose from (z, y, x).
    data = np.stack([layer.transpose(2, 1, 0) for layer in layers], axis=0)
    directions = (ct.direction @ np.diag(ct.spacing)).T  # rows: i, j, k step vectors in LPS
    header: Dict[str, object] = {
        "type": "unsigned char",
        "dimension": 4,
        "space": "left-posterior-superior",
        "space directions": np.vstack([np.full(3, np.nan), directions]),
        "kinds": ["list", "domain", "domain", "domain"],
        "space origin": np.asarray(ct.origin, dtype=float),
        "encoding": "gzip",
        "Segmentation_MasterRepresentation": "Binary labelmap",
        "Segmentation_ContainedRepresentationNames": "Binary labelmap|",
        "Segmentation_ReferenceImageExtentOffset": "0 0 0",
    }
    nz, ny, nx = ct.shape
    for i, name in enumerate(names):
        spec = specs.get(name)
        layer, label = placement[name]
        color = spec.color_float if spec else (0.5, 0.5, 0.5)
        header[f"Segment{i}_ID"] = name
        header[f"Segment{i}_Name"] = spec.name if spec else name
        header[f"Segment{i}_Color"] = " ".join(f"{c:.6f}" for c in color)
        header[f"Segment{i}_ColorAutoGenerated"] = "0"
        header[f"Segment{i}_Layer"] = str(layer)
        header[f"Segment{i}_LabelValue"] = str(label)
        header[f"Segment{i}_Extent"] = f"0 {nx - 1} 0 {ny - 1} 0 {nz - 1}"
        header[f"Segment{i}_NameAutoGenerated"] = "0"
        tags = f"TerminologyEntry:{spec.terminology_entry()}|" if spec else ""
        header[f"Segment{i}_Tags"] = tags
    tmp = path.with_name(f".{path.name}.partial")
    return _write_atomically(path, tmp, lambda t: nrrd.write(str(t), data, header, index_order="F", compression_level=1))


@dataclass
class SegmentationFile:
    """Masks read back from a seg.nrrd, resampled onto the given CT grid."""

    masks: Dict[str, np.ndarray]
    names: Dict[str, str]


def read_segmentation(path: PathLike, ct: CTVolume) -> SegmentationFile:
    """Read a ``.seg.nrrd`` (ours or one saved by Slicer) as bool masks on ``ct``'s grid.

    Slicer crops saved segmentations to their non-empty extent and may store them in
    layers; segments are found by ID (falling back to name) and placed back on the CT grid
    through their physical geometry, so an edited segmentation saved from Slicer lines up
    with the CT it was drawn on.
    """
    import nrrd

    p = Path(path)
    if not p.exists():
        raise InputError(f"{p}: no such segmentation file.")
    try:
        data, header = nrrd.read(str(p), index_order="F")
    except Exception as exc:  # pynrrd raises several types for malformed files
        raise InputError(f"{p}: not a readable seg.nrrd ({exc}).") from None
    if data.ndim == 3:
        data = data[np.newaxis]  # one layer
    elif data.ndim != 4:
        raise InputError(f"{p}: a segmentation must be 3D or 4D (layers), got {data.ndim}D.")
    directions = np.asarray(header.get("space directions"), dtype=float)[-3:]
    origin = np.asarray(header.get("space origin", (0, 0, 0)), dtype=float)
    space = str(header.get("space", "left-posterior-superior")).lower()
    if space in ("right-anterior-superior", "ras"):
        flip = np.diag([-1.0, -1.0, 1.0])
        directions = directions @ flip
        origin = flip @ origin
    spacing = np.linalg.norm(directions, axis=1)
    direction = (directions / spacing[:, None]).T
    _check_segmentation_grid(p, ct, data.shape[1:], spacing, origin, direction)
    masks: Dict[str, np.ndarray] = {}
    names: Dict[str, str] = {}
    i = 0
    while f"Segment{i}_ID" in header:
        seg_id = header[f"Segment{i}_ID"]
        name = header.get(f"Segment{i}_Name", seg_id)
        layer = int(header.get(f"Segment{i}_Layer", 0))
        label = int(header.get(f"Segment{i}_LabelValue", 1))
        mask_xyz = data[layer] == label
        seg_image = sitk.GetImageFromArray(np.ascontiguousarray(mask_xyz.transpose(2, 1, 0)).astype(np.uint8))
        seg_image.SetSpacing(tuple(float(s) for s in spacing))
        seg_image.SetOrigin(tuple(float(o) for o in origin))
        seg_image.SetDirection(tuple(float(v) for v in direction.reshape(-1)))
        resampled = sitk.Resample(seg_image, ct_to_image(ct, np.zeros(ct.shape, np.uint8)), sitk.Transform(), sitk.sitkNearestNeighbor, 0)
        key = seg_id if seg_id in SEGMENTS else _id_from_name(name, seg_id)
        masks[key] = sitk.GetArrayFromImage(resampled).astype(bool)
        names[key] = name
        i += 1
    if not masks:
        raise InputError(f"{p}: contains no segments.")
    return SegmentationFile(masks, names)


def _check_segmentation_grid(
    path: Path, ct: CTVolume, size_xyz: Tuple[int, ...], spacing: np.ndarray, origin: np.ndarray, direction: np.ndarray
) -> None:
    """Refuse a segmentation that does not overlap the CT; record it when it must be resampled.

    Why: resampling silently puts a segmentation drawn on another scan (another patient,
    another series) onto this CT, and every finding computed from it is then wrong. A
    segmentation saved cropped by Slicer lies on a sub-grid of the CT and needs no resampling.
    """
    def corners(size: Tuple[int, ...]) -> np.ndarray:
        return np.array([[i, j, k] for i in (0, size[0] - 1) for j in (0, size[1] - 1) for k in (0, size[2] - 1)], float)

    seg = CTVolume(np.zeros((1, 1, 1), np.uint8), tuple(spacing), tuple(origin), direction)
    seg_lps, ct_lps = seg.index_to_lps(corners(size_xyz)), ct.index_to_lps(corners(ct.shape[::-1]))
    half = np.abs(ct.direction @ np.diag(ct.spacing)).sum(axis=1) / 2  # half a voxel: boxes of voxel centres touch
    lo, hi = np.maximum(seg_lps.min(0), ct_lps.min(0) - half), np.minimum(seg_lps.max(0), ct_lps.max(0) + half)
    if np.any(lo > hi):
        def extent(points: np.ndarray) -> str:
            return ", ".join(f"{a} {low:.0f}..{high:.0f}" for a, low, high in zip("xyz", points.min(0), points.max(0)))

        raise InputError(
            f"{path}: the segmentation does not overlap the CT (segmentation LPS mm {extent(seg_lps)}; "
            f"CT {extent(ct_lps)}). "
            "It was drawn on another scan; give the CT it was made on."
        )
    offset = np.linalg.solve(ct.direction @ np.diag(ct.spacing), origin - np.asarray(ct.origin))
    same_grid = (
        np.allclose(spacing, ct.spacing, rtol=1e-3)
        and np.allclose(direction, ct.direction, atol=1e-4)
        and np.allclose(offset, np.round(offset), atol=1e-2)
    )
    if not same_grid:
        ct.warn(
            f"{path.name} is on another grid (spacing {', '.join(f'{s:.3g}' for s in spacing)} mm) than the CT "
            f"({', '.join(f'{s:.3g}' for s in ct.spacing)} mm); it was resampled onto the CT grid (nearest neighbour)."
        )


def _id_from_name(name: str, fallback: str) -> str:
    """Map a user-renamed or Slicer-generated segment to our IDs by its name."""
    key = name.strip().lower().replace(" ", "_")
    aliases = {"right_lung": "right_lung", "left_lung": "left_lung", "lesion": "lesion", "lesions": "lesion",
               "ground_glass_opacity": "ggo", "ggo": "ggo", "consolidation": "consolidation", "airways": "airways"}
    return aliases.get(key, fallback)
