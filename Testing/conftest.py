"""Shared fixtures: where the real data lives, and cached phantoms.

Real scans live in ``../shared/data`` beside the repository (never copied into it); tests
that need them skip cleanly when they are absent.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("COVIDCTDX_SHARED_DATA", REPO.parent / "shared" / "data"))
A0001_DIR = SHARED_DATA / "lung-pet-ct-dx-A0001"
A0001_NII = A0001_DIR / "A0001_chest_ct.nii.gz"
A0001_REF = A0001_DIR / "reference_lungs.nii.gz"
COVID_DIR = SHARED_DATA / "covid-ct-md-P001"
COVID_DICOM = COVID_DIR / "dicom"


def _need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"real data not available: {path}")
    return path


@pytest.fixture(scope="session")
def a0001_nii() -> Path:
    return _need(A0001_NII)


@pytest.fixture(scope="session")
def a0001_reference() -> Path:
    return _need(A0001_REF)


@pytest.fixture(scope="session")
def covid_dicom_dir() -> Path:
    return _need(COVID_DICOM)


@pytest.fixture(scope="session")
def covid_infected_csv() -> Path:
    return _need(COVID_DIR / "infected_slices.csv")
