"""Reading CTs from disk and writing volumes and segmentations.

Reading always ends in a validated :class:`CTVolume` (HU, (z, y, x), LPS geometry) or a
specific :class:`InputError`: the CLI and the Slicer worker show that message as is.
The memory needed is estimated from headers before any pixel is read, so a huge volume
is refused before it is allocated.
"""
from __future__ import annotations

import logging
import os
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import SimpleITK as sitk

from ..errors import GeometryError, InputError, NotCTError, VolumeTooLargeError
from ..volume import CTVolume, validate_geometry

log = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]

VOLUME_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")
#: Modalities that are certainly not CT; anything else without a modality is checked by HU.
NON_CT_MODALITIES = {"MR", "PT", "NM", "US", "SEG", "RTSTRUCT", "RTDOSE", "RTPLAN", "SR", "PR", "KO", "DX", "CR", "MG", "XA", "OT"}
#: Default ceiling on the bytes one CT may take in memory as float32 (a 512x512x1500 scan).
DEFAULT_MAX_BYTES = 512 * 512 * 1500 * 4


def _max_bytes() -> int:
    """Allowed size, overridable with COVIDCTDX_MAX_VOLUME_BYTES (e.g. on big workstations)."""
    value = os.environ.get("COVIDCTDX_MAX_VOLUME_BYTES")
    return int(value) if value else DEFAULT_MAX_BYTES


def _check_size(shape_xyz: Sequence[int], source: str) -> None:
    voxels = int(np.prod([int(s) for s in shape_xyz], dtype=np.int64))
    needed = voxels * 4
    limit = _max_bytes()
    if needed > limit:
        raise VolumeTooLargeError(
            f"{source}: {'x'.join(str(int(s)) for s in shape_xyz)} voxels would need about "
            f"{needed / 2**30:.1f} GiB as float32, above the {limit / 2**30:.1f} GiB limit. "
            "Crop or downsample the scan, or raise COVIDCTDX_MAX_VOLUME_BYTES."
        )


def _suffix(path: Path) -> str:
    name = path.name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else path.suffix.lower()


# --------------------------------------------------------------------------- reading
def read_ct(path: PathLike, series_uid: Optional[str] = None) -> CTVolume:
    """Read a CT from a NIfTI/NRRD/MHA file or a DICOM series folder, validated as HU.

    Args:
        path: a volume file, or a folder holding one CT series (other non-CT series such
            as SEG or PT are ignored).
        series_uid: picks one series when a folder holds several CT series.
    """
    p = Path(path)
    if not p.exists():
        raise InputError(f"{p}: no such file or folder.")
    if p.is_dir():
        return read_dicom_series(p, series_uid)
    if p.stat().st_size == 0:
        raise InputError(f"{p}: the file is empty.")
    if _suffix(p) == ".dcm" or _looks_like_dicom(p):
        return read_dicom_series(p.parent, series_uid)
    return read_volume_file(p)


def read_volume_file(path: Path) -> CTVolume:
    """Read a NIfTI/NRRD/MHA file; the header is checked before the pixels are read."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        raise InputError(f"{path}: not a readable image file ({_first_line(exc)}).") from None
    size = reader.GetSize()
    if reader.GetDimension() != 3:
        validate_geometry(tuple(reversed(size)), reader.GetSpacing(), np.eye(3))
    if reader.GetNumberOfComponents() != 1:
        raise InputError(
            f"{path}: has {reader.GetNumberOfComponents()} components per voxel; a CT has one (is this an RGB or vector image?)."
        )
    _check_size(size, str(path))
    direction = np.asarray(reader.GetDirection(), dtype=float).reshape(3, 3)
    validate_geometry(tuple(reversed(size)), reader.GetSpacing(), direction)
    modality = _header_modality(reader)
    if modality and modality in NON_CT_MODALITIES:
        raise NotCTError(f"{path}: modality is {modality}, not CT.")
    try:
        image = reader.Execute()
    except RuntimeError as exc:
        raise InputError(f"{path}: the file is corrupt or truncated ({_first_line(exc)}).") from None
    if _suffix(path) in (".nii", ".nii.gz"):
        _check_nifti_complete(path, image)
    return _ct_from_image(image, {"source": str(path), "format": _suffix(path).lstrip("."), "modality": modality or "CT"})


def _check_nifti_complete(path: Path, image: sitk.Image) -> None:
    """Refuse a truncated NIfTI, which ITK's reader silently zero-fills.

    Uncompressed: the file must hold vox_offset + the voxel bytes. Gzipped: the gzip
    trailer's ISIZE (uncompressed size mod 2**32) must match, which a cut file fails
    without decompressing it again.
    """
    import gzip
    import struct

    compressed = _suffix(path) == ".nii.gz"
    with (gzip.open(path, "rb") if compressed else open(path, "rb")) as f:
        head = f.read(540)
    for endian in "<>":
        sizeof_hdr = struct.unpack(endian + "i", head[:4])[0]
        if sizeof_hdr == 348:
            vox_offset = struct.unpack(endian + "f", head[108:112])[0]
            break
        if sizeof_hdr == 540:
            vox_offset = struct.unpack(endian + "q", head[168:176])[0]
            break
    else:
        raise InputError(f"{path}: not a NIfTI file (bad header size).")
    bytes_per_voxel = sitk.GetArrayViewFromImage(image).itemsize * image.GetNumberOfComponentsPerPixel()
    expected = int(vox_offset) + image.GetNumberOfPixels() * bytes_per_voxel
    if compressed:
        with open(path, "rb") as f:
            f.seek(-4, os.SEEK_END)
            isize = struct.unpack("<I", f.read(4))[0]
        if isize != expected % 2**32:
            raise InputError(f"{path}: the file is corrupt or truncated (gzip stream is incomplete).")
        return
    actual = path.stat().st_size
    if actual < expected:
        raise InputError(
            f"{path}: the file is corrupt or truncated ({actual} bytes, the header needs {expected})."
        )


def _header_modality(reader: sitk.ImageFileReader) -> str:
    for key in ("Modality", "modality", "0008|0060"):
        if reader.HasMetaDataKey(key):
            return reader.GetMetaData(key).strip().upper()
    return ""


def _looks_like_dicom(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def _ct_from_image(image: sitk.Image, metadata: Dict[str, object]) -> CTVolume:
    array = sitk.GetArrayFromImage(image)
    if array.dtype not in (np.int16, np.float32):
        if np.issubdtype(array.dtype, np.integer) and array.min() >= -32768 and array.max() <= 32767:
            array = array.astype(np.int16)
        else:
            array = array.astype(np.float32)
    direction = np.asarray(image.GetDirection(), dtype=float).reshape(3, 3)
    ct = CTVolume(array, image.GetSpacing(), image.GetOrigin(), direction, dict(metadata))
    return ct.validate()


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    # ITK messages put the useful part after "Description:" or on the last line.
    for line in lines:
        if "Description:" in line:
            return line.split("Description:", 1)[1].strip()
    return lines[-1] if lines else type(exc).__name__


# --------------------------------------------------------------------------- DICOM
@dataclass
class _DicomFile:
    path: Path
    series_uid: str
    modality: str
    position: Tuple[float, float, float]
    orientation: Tuple[float, ...]
    rows: int
    columns: int
    description: str


def _scan_dicom_folder(folder: Path) -> List[_DicomFile]:
    """Read only the headers of every DICOM file in a folder (pixel data skipped)."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    found: List[_DicomFile] = []
    for entry in sorted(folder.iterdir()):
        if not entry.is_file() or entry.stat().st_size == 0:
            continue
        try:
            ds = pydicom.dcmread(entry, stop_before_pixels=True)
        except (InvalidDicomError, OSError, EOFError, ValueError, AttributeError, TypeError):
            continue
        if "SeriesInstanceUID" not in ds:
            continue
        modality = str(getattr(ds, "Modality", "")).upper()
        position = tuple(float(v) for v in getattr(ds, "ImagePositionPatient", []) or [])
        orientation = tuple(round(float(v), 4) for v in getattr(ds, "ImageOrientationPatient", []) or [])
        found.append(
            _DicomFile(
                path=entry,
                series_uid=str(ds.SeriesInstanceUID),
                modality=modality,
                position=position if len(position) == 3 else (np.nan,) * 3,  # type: ignore[arg-type]
                orientation=orientation,
                rows=int(getattr(ds, "Rows", 0) or 0),
                columns=int(getattr(ds, "Columns", 0) or 0),
                description=str(getattr(ds, "SeriesDescription", "")),
            )
        )
    return found


def read_dicom_series(folder: Path, series_uid: Optional[str] = None) -> CTVolume:
    """Pick the CT series in a folder, sort its slices by position and read it in HU.

    SimpleITK/GDCM applies RescaleSlope/Intercept and decodes compressed transfer syntaxes
    (e.g. JPEG lossless); we sort slices ourselves by their position along the slice
    normal because file names and instance numbers are not reliable.
    """
    files = _scan_dicom_folder(folder)
    if not files:
        raise InputError(f"{folder}: no DICOM files found (nor a NIfTI/NRRD/MHA file was given).")
    by_series: Dict[str, List[_DicomFile]] = defaultdict(list)
    for f in files:
        by_series[f.series_uid].append(f)
    ct_series = {uid: fs for uid, fs in by_series.items() if fs[0].modality == "CT"}
    if series_uid is not None:
        if series_uid not in by_series:
            raise InputError(f"{folder}: series {series_uid} not found; series here: {', '.join(by_series)}.")
        chosen = by_series[series_uid]
        if chosen[0].modality in NON_CT_MODALITIES:
            raise NotCTError(f"{folder}: series {series_uid} has modality {chosen[0].modality}, not CT.")
    elif not ct_series:
        modalities = sorted({fs[0].modality or "unknown" for fs in by_series.values()})
        raise NotCTError(f"{folder}: no CT series found (modalities present: {', '.join(modalities)}).")
    elif len(ct_series) > 1:
        listing = "; ".join(f"{uid} ({len(fs)} files, '{fs[0].description}')" for uid, fs in ct_series.items())
        raise InputError(
            f"{folder}: holds {len(ct_series)} CT series ({listing}). Put one series per folder, "
            "or choose one with --series-uid."
        )
    else:
        chosen = next(iter(ct_series.values()))
    return _read_sorted_series(folder, chosen)


def _read_sorted_series(folder: Path, files: List[_DicomFile]) -> CTVolume:
    orientations = {f.orientation for f in files}
    sizes = {(f.rows, f.columns) for f in files}
    if len(orientations) != 1 or len(sizes) != 1:
        raise GeometryError(
            f"{folder}: the series mixes {len(orientations)} slice orientations and {len(sizes)} image sizes "
            "(a localizer or reformat mixed in?). Keep only the axial series in the folder."
        )
    orientation = next(iter(orientations))
    if len(orientation) != 6 or any(np.isnan(f.position).any() for f in files):
        raise GeometryError(f"{folder}: slices lack ImagePositionPatient/ImageOrientationPatient; cannot place them in space.")
    if len(files) < 2:
        raise GeometryError(f"{folder}: the series has a single slice; a 3D CT is needed.")
    row, col = np.array(orientation[:3]), np.array(orientation[3:])
    normal = np.cross(row, col)
    distance = np.array([np.dot(normal, f.position) for f in files])
    order = np.argsort(distance)
    distance = distance[order]
    gaps = np.diff(distance)
    if np.any(gaps < 1e-3):
        raise GeometryError(f"{folder}: several slices share one position (duplicate or mixed acquisitions in one series).")
    rows, cols = next(iter(sizes))
    _check_size((cols, rows, len(files)), str(folder))
    if gaps.max() - gaps.min() > 0.1 * float(np.median(gaps)) + 0.01:
        log.warning("%s: uneven slice spacing (%.2f..%.2f mm); using the median.", folder, gaps.min(), gaps.max())
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames([str(files[i].path) for i in order])
    reader.MetaDataDictionaryArrayUpdateOn()
    try:
        image = reader.Execute()
    except RuntimeError as exc:
        raise InputError(f"{folder}: could not decode the DICOM pixel data ({_first_line(exc)}).") from None
    # GDCM derives z spacing from the first two slices; use the robust median gap instead.
    spacing = list(image.GetSpacing())
    spacing[2] = float(np.median(gaps))
    image.SetSpacing(spacing)
    first = files[order[0]]
    meta = {
        "source": str(folder),
        "format": "dicom",
        "modality": "CT",
        "series_uid": first.series_uid,
        "series_description": first.description,
        "n_slices": len(files),
    }
    for key, tag in (("kernel", "0018|1210"), ("manufacturer", "0008|0070"), ("slice_thickness", "0018|0050")):
        if reader.HasMetaDataKey(0, tag):
            meta[key] = reader.GetMetaData(0, tag).strip()
    return _ct_from_image(image, meta)
