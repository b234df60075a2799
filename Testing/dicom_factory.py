"""Writes small DICOM series for tests (uncompressed, one file per slice).

Why: the bad-input cases (MR series, mixed series, rescale) and the DICOM↔NIfTI
round trip need DICOM with known content; pydicom builds it from a CTVolume.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from CovidCTDxLib.volume import CTVolume

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"


def write_series(
    ct: CTVolume,
    folder: Path,
    modality: str = "CT",
    series_uid: Optional[str] = None,
    intercept: float = -1024.0,
    slope: float = 1.0,
    prefix: str = "img",
    shuffle_names: bool = True,
) -> str:
    """Write ``ct`` as a DICOM series; stored values = (HU - intercept) / slope."""
    folder.mkdir(parents=True, exist_ok=True)
    series_uid = series_uid or generate_uid()
    study_uid = generate_uid()
    frame_uid = generate_uid()
    row_dir = ct.direction[:, 0]
    col_dir = ct.direction[:, 1]
    nz = ct.shape[0]
    order = np.random.default_rng(0).permutation(nz) if shuffle_names else np.arange(nz)
    for k in range(nz):
        stored = np.round((ct.array[k].astype(np.float64) - intercept) / slope).astype(np.int16)
        position = ct.index_to_lps(np.array([0.0, 0.0, k]))
        meta = FileMetaDataset()
        sop_class = CT_IMAGE_STORAGE if modality == "CT" else MR_IMAGE_STORAGE
        meta.MediaStorageSOPClassUID = sop_class
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = sop_class
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.Modality = modality
        ds.PatientID = "TEST"
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.FrameOfReferenceUID = frame_uid
        ds.SeriesDescription = f"{modality} test series"
        ds.InstanceNumber = int(order[k]) + 1
        ds.ImagePositionPatient = [f"{v:.4f}" for v in position]
        ds.ImageOrientationPatient = [f"{v:.6f}" for v in (*row_dir, *col_dir)]
        ds.PixelSpacing = [f"{ct.spacing[1]:.6f}", f"{ct.spacing[0]:.6f}"]
        ds.SliceThickness = f"{ct.spacing[2]:.4f}"
        ds.Rows, ds.Columns = stored.shape
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1
        ds.RescaleIntercept = f"{intercept:g}"
        ds.RescaleSlope = f"{slope:g}"
        ds.PixelData = stored.tobytes()
        pydicom.dcmwrite(folder / f"{prefix}_{order[k]:04d}.dcm", ds, enforce_file_format=True)
    return series_uid
