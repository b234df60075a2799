"""Shared fixtures: where the real data lives, and cached phantoms.

Real scans live in ``../shared/data`` beside the repository (never copied into it); tests
that need them carry the ``realdata`` marker (checked at collection) and skip cleanly when
the data is absent. The A0001 CT itself is also bundled in ``Resources/SampleData``: tests
that only need that CT use the bundled copy and run everywhere.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("COVIDCTDX_SHARED_DATA", REPO.parent / "shared" / "data"))
A0001_DIR = SHARED_DATA / "lung-pet-ct-dx-A0001"
#: The bundled copy of A0001's CT (identical to the shared one; its licence allows it).
A0001_NII = REPO / "Resources" / "SampleData" / "A0001_chest_ct.nii.gz"
A0001_REF = A0001_DIR / "reference_lungs.nii.gz"
COVID_DIR = SHARED_DATA / "covid-ct-md-P001"
COVID_DICOM = COVID_DIR / "dicom"
CAP_DIR = SHARED_DATA / "covid-ct-md-cap002"
NORMAL_DIR = SHARED_DATA / "covid-ct-md-normal001"
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
