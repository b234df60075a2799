"""Reading CTs from disk and writing volumes and segmentations.

Reading always ends in a validated :class:`CTVolume` (HU, (z, y, x), LPS geometry) or a
specific :class:`InputError`: the CLI and the Slicer worker show that message as is.
The memory needed is estimated from headers before any pixel is read, so a huge volume
is refused before it is allocated.
"""
from __future__ import annotations

import gzip
import logging
import os
import struct
import warnings
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import SimpleITK as sitk

from ..errors import GeometryError, InputError, NotCTError, VolumeTooLargeError
from ..volume import CTVolume, check_finite, validate_geometry

log = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]

VOLUME_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")
#: Modalities that are certainly not CT; anything else without a modality is checked by HU.
NON_CT_MODALITIES = {"MR", "PT", "NM", "US", "SEG", "RTSTRUCT", "RTDOSE", "RTPLAN", "SR", "PR", "KO", "DX", "CR", "MG", "XA", "OT"}
#: Default ceiling on the bytes one CT may take in memory as float32 (a 512x512x1500 scan).
DEFAULT_MAX_BYTES = 512 * 512 * 1500 * 4
#: A gap between DICOM slices larger than this many slice spacings means missing slices.
MAX_GAP_FACTOR = 1.5
#: Spacing given by the user (x, y, z mm) in place of a header's missing or wrong one.
Spacing = Tuple[float, float, float]


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
def read_ct(
    path: PathLike, series_uid: Optional[str] = None, spacing: Optional[Spacing] = None, resample_gaps: bool = False
) -> CTVolume:
    """Read a CT from a NIfTI/NRRD/MHA file or a DICOM series folder, validated as HU.

    Args:
        path: a volume file, or a folder holding one CT series (other non-CT series such
            as SEG or PT are ignored).
        series_uid: picks one series when a folder holds several CT series.
        spacing: voxel size (x, y, z) in mm replacing the header's. Needed when the header
            has none (readers would silently assume 1 mm); recorded as a warning.
        resample_gaps: a DICOM series with missing slices is interpolated onto its true
            slice positions instead of being refused; the gaps are recorded.
    """
    p = Path(path)
    if not p.exists():
        raise InputError(f"{p}: no such file or folder.")
    if p.is_dir():
        return read_dicom_series(p, series_uid, spacing, resample_gaps)
    if p.stat().st_size == 0:
        raise InputError(f"{p}: the file is empty.")
    if _suffix(p) == ".dcm" or _looks_like_dicom(p):
        return read_dicom_series(p.parent, series_uid, spacing, resample_gaps)
    return read_volume_file(p, spacing)


def read_volume_file(path: Path, spacing: Optional[Spacing] = None) -> CTVolume:
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
            f"{path}: has {reader.GetNumberOfComponents()} components per voxel; "
            "a CT has one (is this an RGB or vector image?)."
        )
    _check_size(size, str(path))
    direction = np.asarray(reader.GetDirection(), dtype=float).reshape(3, 3)
    nifti = _nifti_header(path) if _suffix(path) in (".nii", ".nii.gz") else None
    unknown = _unknown_spacing_reason(path, nifti)
    effective = _effective_spacing(str(path), reader.GetSpacing(), unknown, spacing)
    validate_geometry(tuple(reversed(size)), effective, direction)
    modality = _header_modality(reader)
    if modality and modality in NON_CT_MODALITIES:
        raise NotCTError(f"{path}: modality is {modality}, not CT.")
    try:
        image = reader.Execute()
    except RuntimeError as exc:
        raise InputError(f"{path}: the file is corrupt or truncated ({_first_line(exc)}).") from None
    if nifti is not None:
        _check_nifti_complete(path, image, nifti)
        _check_nifti_finite(path, image, nifti)
    image.SetSpacing(effective)
    ct = _ct_from_image(image, {"source": str(path), "format": _suffix(path).lstrip("."), "modality": modality or "CT"})
    _record_spacing_override(ct, unknown, reader.GetSpacing(), spacing)
    return ct


def _effective_spacing(
    source: str, header_spacing: Sequence[float], unknown: Optional[str], override: Optional[Spacing]
) -> Tuple[float, float, float]:
    """The spacing to use: the override if given, else the header's, refused when it is unknown."""
    if override is not None:
        if len(override) != 3:
            raise GeometryError(f"--spacing needs three values x,y,z in mm, got {tuple(override)}.")
        return tuple(float(v) for v in override)  # type: ignore[return-value]
    if unknown:
        raise GeometryError(
            f"{source}: the voxel spacing is unknown ({unknown}); readers would silently assume 1 mm and every "
            "volume would be wrong. Give the true spacing with --spacing X,Y,Z (mm)."
        )
    return tuple(float(v) for v in header_spacing)  # type: ignore[return-value]


def _record_spacing_override(
    ct: CTVolume, unknown: Optional[str], header_spacing: Sequence[float], override: Optional[Spacing]
) -> None:
    if override is None:
        return
    said = unknown or "header: " + ", ".join(f"{v:g}" for v in header_spacing) + " mm"
    ct.metadata["spacing_source"] = "--spacing"
    ct.warn(f"Voxel spacing {', '.join(f'{v:g}' for v in ct.spacing)} mm was given by the user ({said}).")


def _unknown_spacing_reason(path: Path, nifti: Optional["_NiftiHeader"]) -> Optional[str]:
    """Why the file's header does not give the voxel size, or None when it does.

    ITK replaces a zero or NaN NIfTI pixdim, a NRRD without spacing fields and a MetaImage
    without ElementSpacing by 1 mm without a word; here those cases are recognised from the
    header itself.
    """
    suffix = _suffix(path)
    if nifti is not None:
        bad = [f"{axis} = {v:g}" for axis, v in zip("xyz", nifti.pixdim) if not (np.isfinite(v) and v > 0)]
        return "NIfTI pixdim " + ", ".join(bad) if bad else None
    if suffix in (".nrrd", ".nhdr"):
        import nrrd

        try:
            header = nrrd.read_header(str(path))
        except Exception:  # pynrrd raises several types; ITK already parsed the header
            return None
        values = header.get("space directions", header.get("spacings"))
        if values is None:
            return "the NRRD header has neither 'space directions' nor 'spacings'"
        steps = np.asarray(values, dtype=float)
        steps = np.linalg.norm(steps, axis=-1) if steps.ndim == 2 else steps
        if not np.all(np.isfinite(steps)) or np.any(steps[-3:] <= 0):
            return "the NRRD header's spacing is missing for some axes"
        return None
    if suffix in (".mha", ".mhd"):
        with open(path, "rb") as f:
            head = f.read(8192).split(b"ElementDataFile", 1)[0]
        keys = {line.split(b"=", 1)[0].strip().lower() for line in head.splitlines() if b"=" in line}
        return None if keys & {b"elementspacing", b"elementsize"} else "the MetaImage header has no ElementSpacing"
    return None


@dataclass
class _NiftiHeader:
    """The few NIfTI-1/2 header fields ITK hides or overrides."""

    endian: str
    vox_offset: int
    datatype: int
    pixdim: Tuple[float, float, float]


#: NIfTI datatype codes of floating-point voxels (which can hold NaN/Inf).
_NIFTI_FLOATS = {16: "f4", 64: "f8"}


def _nifti_header(path: Path) -> _NiftiHeader:
    with (gzip.open(path, "rb") if _suffix(path) == ".nii.gz" else open(path, "rb")) as f:
        head = f.read(540)
    for endian in "<>":
        sizeof_hdr = struct.unpack(endian + "i", head[:4])[0]
        if sizeof_hdr == 348:
            return _NiftiHeader(
                endian, int(struct.unpack(endian + "f", head[108:112])[0]), struct.unpack(endian + "h", head[70:72])[0],
                struct.unpack(endian + "3f", head[80:92]),
            )
        if sizeof_hdr == 540:
            return _NiftiHeader(
                endian, int(struct.unpack(endian + "q", head[168:176])[0]), struct.unpack(endian + "h", head[12:14])[0],
                struct.unpack(endian + "3d", head[112:136]),
            )
    raise InputError(f"{path}: not a NIfTI file (bad header size).")


def _check_nifti_finite(path: Path, image: sitk.Image, header: _NiftiHeader) -> None:
    """ITK's NIfTI reader turns NaN/Inf into 0, so the raw float voxels are checked here."""
    kind = _NIFTI_FLOATS.get(header.datatype)
    if kind is None:
        return
    dtype = np.dtype(header.endian + kind)
    remaining = image.GetNumberOfPixels() * dtype.itemsize
    chunk = (1 << 26) // dtype.itemsize * dtype.itemsize
    with (gzip.open(path, "rb") if _suffix(path) == ".nii.gz" else open(path, "rb")) as f:
        f.seek(header.vox_offset)
        while remaining > 0:
            data = f.read(min(chunk, remaining))
            if not data:
                break
            check_finite(np.frombuffer(data[: len(data) // dtype.itemsize * dtype.itemsize], dtype), str(path))
            remaining -= len(data)


def _check_nifti_complete(path: Path, image: sitk.Image, header: _NiftiHeader) -> None:
    """Refuse a truncated NIfTI, which ITK's reader silently zero-fills.

    Uncompressed: the file must hold vox_offset + the voxel bytes. Gzipped: the gzip
    trailer's ISIZE (uncompressed size mod 2**32) must match, which a cut file fails
    without decompressing it again.
    """
    compressed = _suffix(path) == ".nii.gz"
    vox_offset = header.vox_offset
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
    has_pixel_spacing: bool
    #: Why the pixel data cannot be used (truncated, missing), "" when it is complete.
    pixel_problem: str


@dataclass
class _DicomScan:
    files: List[_DicomFile]
    #: Files that are not readable DICOM at all, with the reason.
    unreadable: List[Tuple[Path, str]]


#: Storage SOP classes of images (CT, MR, ...): a file of one of them must carry a series.
_IMAGE_STORAGE_PREFIX = "1.2.840.10008.5.1.4.1.1."
#: Why an image file without a readable data set is refused.
TRUNCATED_HEADER = "an image file whose data set ends early (truncated?)"


def _pixel_problem(ds) -> str:
    """Whether an image's pixel data is complete, judged from its byte length (nothing decoded).

    Why: a truncated slice otherwise surfaces only when the whole series is decoded, 10-20 s
    later and without its name.
    """
    if "Rows" not in ds or "BitsAllocated" not in ds:
        return ""  # not an image (SR, RTSTRUCT...)
    if "PixelData" not in ds:
        return "pixel data missing or cut off (truncated file?)"
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if syntax is not None and syntax.is_compressed:
        return ""  # encapsulated: pydicom found the closing delimiter, so the fragments are complete
    frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    expected = int(ds.Rows) * int(ds.Columns) * int(getattr(ds, "SamplesPerPixel", 1) or 1) * int(ds.BitsAllocated) // 8 * frames
    if len(ds.PixelData) < expected:
        return f"pixel data truncated ({len(ds.PixelData)} of {expected} bytes)"
    return ""


def _scan_dicom_folder(folder: Path) -> _DicomScan:
    """Read every DICOM file's header and raw pixel bytes (nothing decoded: ~0.5 s for 150 slices)."""

    found: List[_DicomFile] = []
    unreadable: List[Tuple[Path, str]] = []
    # pydicom also logs what it warns about (e.g. a truncated file's missing delimiter): the
    # damaged file is named in our one-line error instead.
    pydicom_log = logging.getLogger("pydicom")
    level = pydicom_log.level
    pydicom_log.setLevel(logging.ERROR)
    try:
        _scan_entries(folder, found, unreadable)
    finally:
        pydicom_log.setLevel(level)
    return _DicomScan(found, unreadable)


def _scan_entries(folder: Path, found: List[_DicomFile], unreadable: List[Tuple[Path, str]]) -> None:
    import pydicom
    from pydicom.errors import InvalidDicomError

    for entry in sorted(folder.iterdir()):
        if not entry.is_file() or entry.stat().st_size == 0:
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # truncation is reported by _pixel_problem, by file name
                ds = pydicom.dcmread(entry)
        except (InvalidDicomError, OSError, EOFError, ValueError, AttributeError, TypeError, struct.error) as exc:
            unreadable.append((entry, _first_line(exc)))
            continue
        if "SeriesInstanceUID" not in ds:
            sop_class = str(getattr(getattr(ds, "file_meta", None), "MediaStorageSOPClassUID", ""))
            if sop_class.startswith(_IMAGE_STORAGE_PREFIX):
                # An image whose data set pydicom could not parse to its end: cut off (the
                # file meta survived, the rest was lost), not a note to skip silently.
                unreadable.append((entry, TRUNCATED_HEADER))
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
                has_pixel_spacing="PixelSpacing" in ds,
                pixel_problem=_pixel_problem(ds),
            )
        )


def read_dicom_series(
    folder: Path, series_uid: Optional[str] = None, spacing: Optional[Spacing] = None, resample_gaps: bool = False
) -> CTVolume:
    """Pick the CT series in a folder, sort its slices by position and read it in HU.

    SimpleITK/GDCM applies RescaleSlope/Intercept and decodes compressed transfer syntaxes
    (e.g. JPEG lossless); we sort slices ourselves by their position along the slice
    normal because file names and instance numbers are not reliable. Slices that are
    truncated or unreadable, and gaps left by missing slices, are refused by name before
    any pixel is decoded (see :func:`read_ct` for ``spacing`` and ``resample_gaps``).
    """
    scan = _scan_dicom_folder(folder)
    files = scan.files
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
    _refuse_damaged_slices(folder, chosen, scan.unreadable)
    return _read_sorted_series(folder, chosen, spacing, resample_gaps)


def _names(paths: Sequence[Path], limit: int = 5) -> str:
    shown = ", ".join(p.name for p in paths[:limit])
    return shown + (f" and {len(paths) - limit} more" if len(paths) > limit else "")


def _refuse_damaged_slices(folder: Path, series: List[_DicomFile], unreadable: List[Tuple[Path, str]]) -> None:
    """Name the slices that cannot be used instead of silently stacking the others.

    A file that is not readable DICOM counts as a damaged slice when it is named ``.dcm``
    or is about the size of the series' slices; other files (notes, thumbnails) are ignored.
    """
    broken = [f for f in series if f.pixel_problem]
    if broken:
        raise InputError(
            f"{folder}: {len(broken)} slice(s) of the CT series cannot be read: "
            + "; ".join(f"{f.path.name}: {f.pixel_problem}" for f in broken[:5])
            + (f"; and {len(broken) - 5} more" if len(broken) > 5 else "")
            + ". Copy the series again or remove the damaged files."
        )
    typical = float(np.median([f.path.stat().st_size for f in series]))
    damaged = [
        (p, why) for p, why in unreadable
        if p.suffix.lower() == ".dcm" or why == TRUNCATED_HEADER or 0.5 * typical <= p.stat().st_size <= 2.0 * typical
    ]
    if damaged:
        raise InputError(
            f"{folder}: {len(damaged)} file(s) look like slices of the CT series but are not readable DICOM "
            f"({_names([p for p, _ in damaged])}: {damaged[0][1]}). Copy the series again or remove them."
        )


def _read_sorted_series(folder: Path, files: List[_DicomFile], spacing: Optional[Spacing], resample_gaps: bool) -> CTVolume:
    orientations = {f.orientation for f in files}
    sizes = {(f.rows, f.columns) for f in files}
    if len(orientations) != 1 or len(sizes) != 1:
        raise GeometryError(
            f"{folder}: the series mixes {len(orientations)} slice orientations and {len(sizes)} image sizes "
            "(a localizer or reformat mixed in?). Keep only the axial series in the folder."
        )
    orientation = next(iter(orientations))
    if len(orientation) != 6 or any(np.isnan(f.position).any() for f in files):
        raise GeometryError(
            f"{folder}: slices lack ImagePositionPatient/ImageOrientationPatient; cannot place them in space."
        )
    if len(files) < 2:
        raise GeometryError(f"{folder}: the series has a single slice; a 3D CT is needed.")
    row, col = np.array(orientation[:3]), np.array(orientation[3:])
    normal = np.cross(row, col)
    distance = np.array([np.dot(normal, f.position) for f in files])
    order = np.argsort(distance)
    distance = distance[order]
    gaps = np.diff(distance)
    if np.any(gaps < 1e-3):
        raise GeometryError(
            f"{folder}: several slices share one position (duplicate or mixed acquisitions in one series)."
        )
    rows, cols = next(iter(sizes))
    step = float(np.median(gaps))
    large = np.flatnonzero(gaps > MAX_GAP_FACTOR * step)
    if len(large) and not resample_gaps:
        listing = "; ".join(
            f"{gaps[i]:.1f} mm between {distance[i]:.1f} and {distance[i + 1]:.1f} mm "
            f"({files[order[i]].path.name}, {files[order[i + 1]].path.name})"
            for i in large[:5]
        )
        raise GeometryError(
            f"{folder}: slices are missing: {len(large)} gap(s) larger than {MAX_GAP_FACTOR:g}x the {step:.2f} mm "
            f"slice spacing, at positions along the slice normal {listing}. Restore the missing slices, or pass "
            "--resample-gaps to interpolate onto the true positions (recorded in results.json and the report)."
        )
    n_out = int(round((distance[-1] - distance[0]) / step)) + 1 if resample_gaps else len(files)
    _check_size((cols, rows, n_out), str(folder))
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames([str(files[i].path) for i in order])
    reader.MetaDataDictionaryArrayUpdateOn()
    try:
        image = reader.Execute()
    except RuntimeError as exc:
        raise InputError(f"{folder}: could not decode the DICOM pixel data ({_first_line(exc)}).") from None
    unknown = None if all(f.has_pixel_spacing for f in files) else "slices lack PixelSpacing"
    header_spacing = (*image.GetSpacing()[:2], step)
    effective = _effective_spacing(str(folder), header_spacing, unknown, spacing)
    first = files[order[0]]
    meta: Dict[str, object] = {
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
    uneven = gaps.max() - gaps.min() > 0.1 * step + 0.01
    if resample_gaps and uneven:
        image = _resample_onto_positions(image, distance - distance[0], step)
    # GDCM derives z spacing from the first two slices; use the robust median gap instead.
    image.SetSpacing(effective)
    ct = _ct_from_image(image, meta)
    _record_spacing_override(ct, unknown, header_spacing, spacing)
    if resample_gaps and uneven:
        ct.metadata["resampled_gaps"] = [
            {"from_mm": round(float(distance[i]), 3), "to_mm": round(float(distance[i + 1]), 3),
             "gap_mm": round(float(gaps[i]), 3), "files": [files[order[i]].path.name, files[order[i + 1]].path.name]}
            for i in np.flatnonzero(np.abs(gaps - step) > 0.1 * step + 0.01)
        ]
        ct.warn(
            f"{len(ct.metadata['resampled_gaps'])} irregular slice gap(s) (largest {gaps.max():.1f} mm, spacing "
            f"{step:.2f} mm): {len(files)} slices interpolated onto {n_out} regular positions (--resample-gaps)."
        )
    elif uneven:
        ct.warn(f"Uneven slice spacing ({gaps.min():.2f}..{gaps.max():.2f} mm); slices stacked at the median {step:.2f} mm.")
    return ct


def _resample_onto_positions(image: sitk.Image, positions: np.ndarray, step: float) -> sitk.Image:
    """Slices at ``positions`` (mm from the first, increasing) → linearly interpolated regular slices."""
    array = sitk.GetArrayFromImage(image)
    n_out = int(round(positions[-1] / step)) + 1
    targets = np.minimum(np.arange(n_out) * step, positions[-1])
    upper = np.clip(np.searchsorted(positions, targets, side="right"), 1, len(positions) - 1)
    lower = upper - 1
    weight = ((targets - positions[lower]) / (positions[upper] - positions[lower])).astype(np.float32)[:, None, None]
    out = (1 - weight) * array[lower].astype(np.float32) + weight * array[upper].astype(np.float32)
    if np.issubdtype(array.dtype, np.integer):
        out = np.round(out).astype(array.dtype)
    resampled = sitk.GetImageFromArray(out)
    resampled.SetOrigin(image.GetOrigin())
    resampled.SetDirection(image.GetDirection())
    return resampled
