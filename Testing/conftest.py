"""Shared fixtures: where the real data lives, and cached phantoms.

Real scans live in ``../shared/data`` beside the repository (never copied into it); tests
that need them carry the ``realdata`` marker (checked at collection) and skip cleanly when
the data is absent. The A0001 CT itself is also bundled in ``Resources/SampleData``: tests
that only need that CT use the bundled copy and run everywhere.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from CovidCTDxLib.evaluation.shared_scans import SCANS_BY_NAME, shared_data_dir

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = shared_data_dir()
A0001_DIR = SCANS_BY_NAME["A0001"].directory()
#: The bundled copy of A0001's CT (identical to the shared one; its licence allows it).
A0001_NII = REPO / "Resources" / "SampleData" / "A0001_chest_ct.nii.gz"
A0001_REF = A0001_DIR / "reference_lungs.nii.gz"
COVID_DIR = SCANS_BY_NAME["P001"].directory()
COVID_DICOM = COVID_DIR / "dicom"
CAP_DIR = SCANS_BY_NAME["cap002"].directory()
NORMAL_DIR = SCANS_BY_NAME["normal001"].directory()
#: Fixtures that read ../shared/data: every test using one must be marked ``realdata``.
SHARED_DATA_FIXTURES = {
    "a0001_reference", "a0001_tumour_boxes", "covid_dicom_dir", "covid_infected_csv", "cap_dicom_dir", "cap_infected_csv",
    "normal_dicom_dir",
}


def pytest_collection_modifyitems(config, items) -> None:
    """Refuse a test that reads the shared real data without the ``realdata`` marker, so
    ``-m "not realdata"`` really runs without ../shared."""
    unmarked = [item.nodeid for item in items
                if SHARED_DATA_FIXTURES & set(getattr(item, "fixturenames", ())) and item.get_closest_marker("realdata") is None]
    if unmarked:
        raise pytest.UsageError("tests reading ../shared/data need @pytest.mark.realdata: " + ", ".join(unmarked))


def _need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"real data not available: {path}")
    return path


@pytest.fixture(scope="session")
def a0001_nii() -> Path:
    return A0001_NII


@pytest.fixture(scope="session")
def a0001_reference() -> Path:
    return _need(A0001_REF)


@pytest.fixture(scope="session")
def a0001_tumour_boxes() -> Path:
    return _need(A0001_DIR / "tumour_boxes.csv")


@pytest.fixture(scope="session")
def covid_dicom_dir() -> Path:
    return _need(COVID_DICOM)


@pytest.fixture(scope="session")
def covid_infected_csv() -> Path:
    return _need(COVID_DIR / "infected_slices.csv")


@pytest.fixture(scope="session")
def cap_dicom_dir() -> Path:
    return _need(CAP_DIR / "dicom")


@pytest.fixture(scope="session")
def cap_infected_csv() -> Path:
    return _need(CAP_DIR / "infected_slices.csv")


@pytest.fixture(scope="session")
def normal_dicom_dir() -> Path:
    return _need(NORMAL_DIR / "dicom")
