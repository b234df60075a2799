"""The validated CT volume every stage works on.

Conventions (see docs/ARCHITECTURE.md): ``array`` is numpy in (z, y, x) order, like
``slicer.util.arrayFromVolume``; ``spacing`` and ``origin`` are (x, y, z) in mm; ``direction``
is a 3x3 matrix whose columns are the patient-space (LPS, as in SimpleITK and DICOM)
directions of the i, j, k voxel axes. Left/right, anterior/posterior and head/feet are
always decided from this geometry, never from array indices, so a flipped or rotated scan
still gets the patient's left lung labelled left.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Dict, List, Tuple

import numpy as np

from .errors import GeometryError, NotCTError

log = logging.getLogger(__name__)

#: HU below which nothing physical exists in a CT (air is -1000; padding is often -2048
#: or -3024 and is clipped by readers, so we allow down to -3024 before refusing).
MIN_PLAUSIBLE_HU = -3100.0
#: Above this, values cannot be HU (metal streaks reach ~ +3071 in 12-bit CT, up to
#: ~ +30000 in extended-range reconstructions).
MAX_PLAUSIBLE_HU = 32767.0
#: A chest CT must contain air (lungs, outside air) and soft tissue.
AIR_HU = -500.0
SOFT_TISSUE_HU = -200.0
#: Spacing outside this range (mm) is not a clinical CT.
MIN_SPACING_MM = 0.05
MAX_SPACING_MM = 30.0
#: Smallest physical extent (mm) in-plane that can hold a chest; z may be partial.
MIN_CHEST_WIDTH_MM = 120.0
MIN_CHEST_HEIGHT_MM = 15.0
#: Coarser than this in-plane (mm per voxel, or fewer voxels across) a lung is a handful of
#: voxels: every downstream number would be noise, so such volumes are refused.
MAX_INPLANE_SPACING_MM = 6.0
MIN_INPLANE_VOXELS = 32
#: Slices farther apart than this (mm) still run, with a recorded warning: volumes are
#: approximate and lesions between slices are missed.
THICK_SLICE_WARNING_MM = 10.0

# Patient-space axes in LPS.
LPS_LEFT = np.array([1.0, 0.0, 0.0])
LPS_POSTERIOR = np.array([0.0, 1.0, 0.0])
LPS_SUPERIOR = np.array([0.0, 0.0, 1.0])



def axis_for_direction(direction: np.ndarray, patient_axis: np.ndarray) -> Tuple[int, int]:
    """(array axis 0=z/1=y/2=x, sign) of the index axis of ``direction`` closest to an LPS axis."""
    cos = np.asarray(direction, dtype=float).reshape(3, 3).T @ patient_axis  # per index axis i, j, k
    index_axis = int(np.argmax(np.abs(cos)))
    sign = 1 if cos[index_axis] > 0 else -1
    return 2 - index_axis, sign


@dataclass(frozen=True)
class CanonicalFrame:
    """How a stored (z, y, x) array maps to the canonical axial array, and back.

    Canonical: axis 0 towards superior, 1 towards posterior, 2 towards patient left, i.e. the
    array of an identity-direction LPS scan. Why one frame for every stage: slice-wise work
    (lungs, DeepSC-COVID's training geometry, the phantom's anatomy) then never depends on how
    the file stored its axes, and a flipped or rotated scan still gets the patient's left lung
    labelled left. Views only (transpose + reversed slices) on the way in.
    """

    perm: Tuple[int, int, int]
    flips: Tuple[bool, bool, bool]

    @classmethod
    def for_direction(cls, direction: np.ndarray) -> "CanonicalFrame":
        """The array axes (and senses) closest to superior, posterior and left."""
        axes = [axis_for_direction(direction, d) for d in (LPS_SUPERIOR, LPS_POSTERIOR, LPS_LEFT)]
        perm = tuple(a for a, _ in axes)
        if sorted(perm) != [0, 1, 2]:  # degenerate (45° oblique): keep the stored order
            return cls((0, 1, 2), (False, False, False))
        return cls(perm, tuple(sign < 0 for _, sign in axes))  # type: ignore[arg-type]

    def to_canonical(self, a: np.ndarray) -> np.ndarray:
        """A view of ``a`` in the canonical frame (no copy)."""
        v = a.transpose(self.perm)
        return v[tuple(slice(None, None, -1) if f else slice(None) for f in self.flips)]

    def from_canonical(self, a: np.ndarray) -> np.ndarray:
        """A canonical-frame array back in the stored axis order, as a contiguous array."""
        v = a[tuple(slice(None, None, -1) if f else slice(None) for f in self.flips)]
        return np.ascontiguousarray(v.transpose([self.perm.index(i) for i in range(3)]))

    def spacing_zyx(self, ct: "CTVolume") -> Tuple[float, float, float]:
        """Voxel size (mm) along the canonical axes (superior, posterior, left)."""
        s = ct.spacing_zyx
        return tuple(float(s[p]) for p in self.perm)  # type: ignore[return-value]

@dataclass
class CTVolume:
    """A CT image in HU with its patient-space geometry.

    Attributes:
        array: HU values, shape (z, y, x), int16 or float32.
        spacing: voxel size (x, y, z) in mm.
        origin: LPS position (x, y, z) in mm of voxel (0, 0, 0)'s centre.
        direction: 3x3 LPS direction cosines; column c is the direction of index axis c
            (i = x, j = y, k = z), as ``SimpleITK.Image.GetDirection`` reshaped row-major.
        metadata: source facts worth keeping (path, modality, series UID, kernel...).
    """

    array: np.ndarray
    spacing: Tuple[float, float, float]
    origin: Tuple[float, float, float] = (0.0, 0.0, 0.0)
    direction: np.ndarray = field(default_factory=lambda: np.eye(3))
    metadata: Dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.spacing = tuple(float(s) for s in self.spacing)  # type: ignore[assignment]
        self.origin = tuple(float(o) for o in self.origin)  # type: ignore[assignment]
        self.direction = np.asarray(self.direction, dtype=float).reshape(3, 3)

    # ----------------------------------------------------------------- geometry
    @property
    def shape(self) -> Tuple[int, int, int]:
        return tuple(self.array.shape)  # type: ignore[return-value]

    @property
    def voxel_volume_mm3(self) -> float:
        return float(np.prod(self.spacing))

    @property
    def voxel_volume_ml(self) -> float:
        return self.voxel_volume_mm3 / 1000.0

    @property
    def spacing_zyx(self) -> Tuple[float, float, float]:
        """Spacing in array-axis order (z, y, x), for scipy/skimage ``sampling`` arguments."""
        return (self.spacing[2], self.spacing[1], self.spacing[0])

    def index_to_lps_matrix(self) -> np.ndarray:
        """4x4 matrix mapping homogeneous (i, j, k, 1) voxel indices to LPS mm."""
        m = np.eye(4)
        m[:3, :3] = self.direction @ np.diag(self.spacing)
        m[:3, 3] = self.origin
        return m

    def index_to_lps(self, ijk: np.ndarray) -> np.ndarray:
        """Map (..., 3) voxel indices in (i, j, k) = (x, y, z) order to LPS mm."""
        ijk = np.asarray(ijk, dtype=float)
        return ijk @ (self.direction @ np.diag(self.spacing)).T + np.asarray(self.origin)

    def axis_for(self, patient_axis: np.ndarray) -> Tuple[int, int]:
        """The array axis (0=z, 1=y, 2=x) most aligned with an LPS direction, and its sign.

        Returns (array_axis, sign) where sign = +1 means increasing array index moves
        towards ``patient_axis``. Why: lets stages that work slice-wise (axial slices,
        left/right split) find the right array axis on any orientation.
        """
        return axis_for_direction(self.direction, patient_axis)

    def canonical_frame(self) -> "CanonicalFrame":
        """The view of this array in the canonical (superior, posterior, left) frame."""
        return CanonicalFrame.for_direction(self.direction)

    def lps_coordinate(self, patient_axis: np.ndarray) -> np.ndarray:
        """Broadcastable array of each voxel's position (mm) along an LPS direction.

        The result has shape broadcastable to ``array.shape`` (z, y, x) and costs only the
        three 1-D ramps, not a full coordinate grid.
        """
        a = (self.direction @ np.diag(self.spacing)).T @ patient_axis  # mm per index step
        nz, ny, nx = self.shape
        offset = float(np.dot(self.origin, patient_axis))
        return (
            offset
            + a[2] * np.arange(nz, dtype=np.float32)[:, None, None]
            + a[1] * np.arange(ny, dtype=np.float32)[None, :, None]
            + a[0] * np.arange(nx, dtype=np.float32)[None, None, :]
        )

    def with_array(self, array: np.ndarray, **metadata: Any) -> "CTVolume":
        """Same geometry, new voxel data (e.g. a resampled or lesion-inserted copy)."""
        if array.shape != self.array.shape:
            raise ValueError(f"array shape {array.shape} != volume shape {self.array.shape}")
        copy = CTVolume(array, self.spacing, self.origin, self.direction.copy(), {**self.metadata, **metadata})
        copy.metadata["warnings"] = list(self.warnings)  # a warning on the copy must not change the original
        return copy

    # ----------------------------------------------------------------- validation
    @property
    def warnings(self) -> List[str]:
        """Facts about the input a reader of the results must know (kept in results.json ``input``)."""
        return self.metadata.setdefault("warnings", [])

    def warn(self, message: str) -> None:
        """Log a warning and record it once with the volume, so it reaches results.json and the report."""
        if message not in self.warnings:
            log.warning("%s", message)
            self.warnings.append(message)

    def validate(self, check_hu: bool = True) -> "CTVolume":
        """Check that this can be a chest CT in HU; raise a specific error otherwise.

        Returns self so that readers can ``return CTVolume(...).validate()``.
        """
        validate_geometry(self.array.shape, self.spacing, self.direction)
        if self.spacing[2] > THICK_SLICE_WARNING_MM:
            self.warn(
                f"Slices are {self.spacing[2]:.1f} mm apart ({self.spacing[0]:.2f} x {self.spacing[1]:.2f} mm in-plane): "
                "lung and lesion volumes are approximate and lesions between slices are missed."
            )
        if check_hu:
            validate_hu(self.array)
        return self


def validate_geometry(shape: Tuple[int, ...], spacing: Tuple[float, ...], direction: np.ndarray) -> None:
    """Refuse 2D/4D images, absurd spacing, singular directions and too-small extents."""
    if len(shape) != 3:
        raise GeometryError(
            f"Expected a 3D CT volume, got a {len(shape)}D image of shape {tuple(shape)}. "
            "Load the full axial series, not a single slice or a time series."
        )
    if min(shape) < 2:
        raise GeometryError(
            f"The image has shape (z, y, x) = {tuple(shape)}: a single slice is not a 3D CT. "
            "Load the whole series."
        )
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != 3 or not all(np.isfinite(spacing)):
        raise GeometryError(f"Voxel spacing {spacing} is missing or not finite.")
    for name, s in zip("xyz", spacing):
        if s <= 0:
            raise GeometryError(f"Voxel spacing along {name} is {s} mm; spacing must be positive.")
        if not (MIN_SPACING_MM <= s <= MAX_SPACING_MM):
            raise GeometryError(
                f"Voxel spacing along {name} is {s} mm, outside the {MIN_SPACING_MM}-{MAX_SPACING_MM} mm "
                "of clinical CT. The header's spacing is probably wrong or missing."
            )
    d = np.asarray(direction, dtype=float).reshape(3, 3)
    if not np.all(np.isfinite(d)) or abs(abs(np.linalg.det(d)) - 1.0) > 1e-3:
        raise GeometryError("The image direction matrix is not a rotation (determinant is not ±1).")
    nz, ny, nx = shape
    width, height, length = nx * spacing[0], ny * spacing[1], nz * spacing[2]
    if min(width, height) < MIN_CHEST_WIDTH_MM or length < MIN_CHEST_HEIGHT_MM:
        raise GeometryError(
            f"The volume covers only {width:.0f} x {height:.0f} x {length:.0f} mm, too small to contain "
            f"a chest (need ≥ {MIN_CHEST_WIDTH_MM:.0f} mm in-plane and ≥ {MIN_CHEST_HEIGHT_MM:.0f} mm along z)."
        )
    if max(spacing[:2]) > MAX_INPLANE_SPACING_MM or min(nx, ny) < MIN_INPLANE_VOXELS:
        raise GeometryError(
            f"The volume is too coarse to hold lungs: {nx} x {ny} voxels in-plane at {spacing[0]:g} x {spacing[1]:g} mm "
            f"(need ≤ {MAX_INPLANE_SPACING_MM:g} mm and ≥ {MIN_INPLANE_VOXELS} voxels across). "
            "Use the original reconstruction, not a thumbnail or a downsampled copy."
        )


def validate_hu(array: np.ndarray) -> None:
    """Refuse data whose value range cannot be Hounsfield units of a chest CT.

    Why these tests: a CT in HU has air near -1000 (outside the body and in the lungs) and
    soft tissue near 0..+100. Images without rescale (raw 0..4095 stored values), MR
    intensities, PET SUVs or label maps fail at least one of them.
    """
    if array.size == 0:
        raise NotCTError("The image contains no voxels.")
    if not np.issubdtype(array.dtype, np.number) or np.issubdtype(array.dtype, np.complexfloating):
        raise NotCTError(f"Voxel type {array.dtype} is not a CT intensity type.")
    check_finite(array)
    # A strided sample keeps this O(1 MB) even for a 512x512x1000 volume.
    step = max(1, array.size // 2_000_000)
    sample = np.asarray(array.reshape(-1)[::step], dtype=np.float32)
    lo, hi = float(sample.min()), float(sample.max())
    if lo < MIN_PLAUSIBLE_HU or hi > MAX_PLAUSIBLE_HU:
        raise NotCTError(
            f"Values range from {lo:.0f} to {hi:.0f}, which cannot be Hounsfield units. "
            "Is the rescale slope/intercept missing, or is this not a CT?"
        )
    if hi - lo < 300:
        raise NotCTError(
            f"Values span only {lo:.1f}..{hi:.1f}; a chest CT in HU spans air (-1000) to tissue (0+). "
            "This looks like a label map, a probability map or a non-CT image."
        )
    air = np.mean(sample < AIR_HU)
    tissue = np.mean(sample > SOFT_TISSUE_HU)
    if air < 0.005:
        raise NotCTError(
            f"No air-density voxels (< {AIR_HU:.0f} HU) found: values range {lo:.0f}..{hi:.0f}. "
            "This is not a chest CT in HU (raw stored values without the rescale intercept, or another modality)."
        )
    if tissue < 0.01:
        raise NotCTError(
            f"Almost no soft-tissue voxels (> {SOFT_TISSUE_HU:.0f} HU): values range {lo:.0f}..{hi:.0f}. "
            "This is not a chest CT in HU."
        )


def check_finite(values: np.ndarray, source: str = "The image") -> None:
    """Refuse NaN/Inf anywhere (not on a sample: one NaN voxel would poison every sum).

    The one check for every format: :func:`validate_hu` runs it on the array, and readers
    whose library silently turns NaN into 0 (ITK's NIfTI reader) run it on the raw voxels.
    Integer data cannot hold NaN and costs nothing.
    """
    if not np.issubdtype(values.dtype, np.floating):
        return
    finite = np.isfinite(values)
    if not finite.all():
        bad = int(finite.size - np.count_nonzero(finite))
        raise NotCTError(
            f"{source} contains {bad} NaN or infinite value(s) out of {finite.size}; it is not a CT in HU. "
            "Fix the conversion that produced it."
        )
