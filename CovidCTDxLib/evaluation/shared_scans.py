"""The real scans in ``../shared/data``: where each one lives, which labels come with it, and
readers for those labels.

One catalogue for the scoreboard, the benchmarks and the tests, so that a scan moved or a
label file added is changed in one place, and every consumer reads the labels the same way
(a header skipped here and a row dropped there would make the same scan score differently).
The data are never copied into the repository; the folder is ``../shared/data`` beside it or
``$COVIDCTDX_SHARED_DATA``.
"""
from __future__ import annotations

import csv
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Tuple

import numpy as np

log = logging.getLogger(__name__)

#: Environment variable that points at the shared data folder (a scan folder per case).
SHARED_DATA_ENV = "COVIDCTDX_SHARED_DATA"


def shared_data_dir() -> Path:
    """``$COVIDCTDX_SHARED_DATA`` or ``../shared/data`` beside the repository."""
    default = Path(__file__).resolve().parents[3] / "shared" / "data"
    return Path(os.environ.get(SHARED_DATA_ENV, default))


@dataclass(frozen=True)
class SharedScan:
    """One real scan: its folder under the shared data, its CT and the labels that come with it
    (paths relative to the folder; ``None`` where the scan has no such label)."""

    name: str
    folder: str
    ct: str  # a NIfTI file or a DICOM series folder
    reference: Optional[str] = None  # labelmap 1=right, 2=left, 3=airways on the CT's grid
    tumour_boxes: Optional[str] = None  # per-slice 2D boxes around the tumour
    infected_slices: Optional[str] = None  # per-slice 0/1: infected, and per lobe

    def directory(self, root: Optional[Path] = None) -> Path:
        return (root if root is not None else shared_data_dir()) / self.folder

    def ct_path(self, root: Optional[Path] = None) -> Path:
        return self.directory(root) / self.ct


SHARED_SCANS: Tuple[SharedScan, ...] = (
    SharedScan("A0001", "lung-pet-ct-dx-A0001", "A0001_chest_ct.nii.gz",
               reference="reference_lungs.nii.gz", tumour_boxes="tumour_boxes.csv"),
    SharedScan("P001", "covid-ct-md-P001", "dicom", infected_slices="infected_slices.csv"),
    SharedScan("cap002", "covid-ct-md-cap002", "dicom", infected_slices="infected_slices.csv"),
    SharedScan("normal001", "covid-ct-md-normal001", "dicom"),
)
SCANS_BY_NAME: Dict[str, SharedScan] = {s.name: s for s in SHARED_SCANS}


def read_infected_slices(path: Path, n_slices: int) -> Dict[str, np.ndarray]:
    """Per-slice 0/1 columns of ``infected_slices.csv`` (all but ``k``) as boolean arrays
    indexed by the slice index k; a row outside the CT's slices is an error, not ignored."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    cols = [c for c in rows[0] if c != "k"]
    out = {c: np.zeros(n_slices, dtype=bool) for c in cols}
    for r in rows:
        k = int(r["k"])
        if not 0 <= k < n_slices:
            raise ValueError(f"{path}: slice k={k} outside the CT's {n_slices} slices")
        for c in cols:
            out[c][k] = r[c].strip() == "1"
    if len(rows) != n_slices:
        log.warning("%s has %d rows for %d slices", path.name, len(rows), n_slices)
    return out


def tumour_box_mask(path: Path, shape_zyx: Tuple[int, ...]) -> np.ndarray:
    """Union of the 2D tumour boxes of ``tumour_boxes.csv`` (inclusive pixel bounds: slice k,
    columns xmin..xmax, rows ymin..ymax) as a (z, y, x) mask."""
    box = np.zeros(shape_zyx, dtype=bool)
    with open(path, newline="") as f:
        rows = list(csv.reader(f))[1:]
    for r in rows:
        k, x0, y0, x1, y1 = int(r[1]), int(r[3]), int(r[4]), int(r[5]), int(r[6])
        box[k, y0:y1 + 1, x0:x1 + 1] = True
    return box
