"""Slice selection: COVID-CTset rule in HU/physical coordinates and the lung-area rule."""
from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from CovidCTDxLib.errors import LungsNotFoundError
from CovidCTDxLib.evaluation.shared_scans import read_infected_slices
from CovidCTDxLib.racnet.slice_selection import (
    DARK_HU,
    select_by_lungs,
    select_covid_ctset,
    select_slices,
    slice_axis,
)
from CovidCTDxLib.result import LungMasks
from CovidCTDxLib.volume import CTVolume


# ---------------------------------------------------------------------------- helpers
def _paper_pixel_rule(ct: CTVolume) -> set:
    """COVID-CTset exactly as published for 512x512 Siemens images (value<300 == HU<-724)."""
    roi = ct.array[:, 240:340, 120:370]
    cnt = (roi < DARK_HU).sum(axis=(1, 2))
    thr = (cnt.max() - cnt.min()) / 1.5
    return set(np.nonzero(cnt > thr)[0].tolist())


def _jaccard(a: set, b: set) -> float:
    return len(a & b) / max(1, len(a | b))


def _flip_z(ct: CTVolume) -> CTVolume:
    """Same patient, array stored superior→inferior (negative z direction)."""
    d = ct.direction.copy()
    d[:, 2] *= -1
    top = ct.index_to_lps(np.array([0, 0, ct.shape[0] - 1]))
    return CTVolume(ct.array[::-1].copy(), ct.spacing, tuple(top), d)


def _transpose_xz(ct: CTVolume, mask: np.ndarray = None):
    """Same patient, array axes (x, y, z) instead of (z, y, x)."""
    d = ct.direction[:, [2, 1, 0]]
    sp = (ct.spacing[2], ct.spacing[1], ct.spacing[0])
    out = CTVolume(np.ascontiguousarray(ct.array.transpose(2, 1, 0)), sp, ct.origin, d)
    return out if mask is None else (out, np.ascontiguousarray(mask.transpose(2, 1, 0)))


@pytest.fixture(scope="module")
def covid_ct(covid_dicom_dir):
    from CovidCTDxLib.io.readers import read_ct

    return read_ct(covid_dicom_dir)


@pytest.fixture(scope="module")
def a0001(a0001_nii, a0001_reference):
    from CovidCTDxLib.io.readers import read_ct

    ct = read_ct(a0001_nii)
    lab = sitk.GetArrayFromImage(sitk.ReadImage(str(a0001_reference)))
    return ct, lab


@pytest.fixture(scope="module")
def phantom():
    from CovidCTDxLib.synthetic.phantom import make_phantom

    return make_phantom(kind="covid", severity="moderate", shape=(48, 112, 112), spacing=(3.2, 3.2, 6.0), seed=3)


def _lungs(right, left, shape):
    z = np.zeros(shape, bool)
    return LungMasks(right=right, left=left, airways=z, body=z)


# ---------------------------------------------------------------------------- real COVID scan
@pytest.mark.realdata
def test_physical_rule_reproduces_paper_on_same_scanner(covid_ct):
    """COVID-CT-MD P001 comes from the scanner model of COVID-CTset (Siemens SOMATOM Scope,
    512², 0.75 mm): there the body-relative ROI must select what the pixel box selects."""
    sel = select_covid_ctset(covid_ct)
    assert _jaccard(set(sel.indices.tolist()), _paper_pixel_rule(covid_ct)) >= 0.9
    w, d = sel.details["roi"]["size_mm"]
    assert 150 < w < 260 and 55 < d < 110  # paper box: 250 x 100 px at ~0.75 mm


@pytest.mark.realdata
def test_rule_is_matrix_independent(covid_ct):
    """Half the in-plane matrix (1.5 mm pixels): same physical slices selected."""
    half = CTVolume(covid_ct.array[:, ::2, ::2].copy(), (covid_ct.spacing[0] * 2, covid_ct.spacing[1] * 2, covid_ct.spacing[2]),
                    covid_ct.origin, covid_ct.direction)
    a = set(select_covid_ctset(covid_ct).indices.tolist())
    b = set(select_covid_ctset(half).indices.tolist())
    assert _jaccard(a, b) >= 0.9


@pytest.mark.realdata
def test_covid_selection_covers_infected_slices(covid_ct, covid_infected_csv):
    """Most radiologist-labelled infected slices lie in the selected (open-lung) range."""
    infected = np.flatnonzero(read_infected_slices(covid_infected_csv, covid_ct.shape[0])["infected"]).tolist()
    sel = select_slices(covid_ct)  # no lungs -> COVID-CTset
    assert sel.method == "covid_ctset"
    chosen = set(sel.indices.tolist())
    assert np.mean([k in chosen for k in infected]) >= 0.6


# ---------------------------------------------------------------------------- real A0001 scan
@pytest.mark.realdata
def test_ctset_on_a0001_selects_open_lung_block(a0001):
    ct, lab = a0001
    area = ((lab == 1) | (lab == 2)).sum(axis=(1, 2)).astype(float)
    frac = area / area.max()
    sel = select_covid_ctset(ct)
    idx = np.sort(sel.indices)
    assert len(idx) >= 10
    assert np.all(np.diff(idx) == 1), "open-lung slices form one block"
    assert frac[idx].min() >= 0.5, "every selected slice shows at least half the largest lung section"
    assert int(np.argmax(area)) in idx


@pytest.mark.realdata
def test_lung_rule_on_a0001_reference(a0001):
    ct, lab = a0001
    lungs = _lungs(lab == 1, lab == 2, lab.shape)
    sel = select_by_lungs(ct, lungs, 0.25)
    area = ((lab == 1) | (lab == 2)).sum(axis=(1, 2))
    expected = np.nonzero(area >= 0.25 * area.max())[0]
    np.testing.assert_array_equal(np.sort(sel.indices), expected)
    assert np.all(np.diff(sel.positions_mm) > 0), "ordered inferior -> superior"
    # the lung rule keeps the bases and apices the COVID-CTset rule drops
    assert len(sel) > len(select_covid_ctset(ct))
    assert select_slices(ct, lungs).method == "lungs"


# ---------------------------------------------------------------------------- geometry
def test_order_follows_patient_axis_not_array(phantom):
    ct = phantom.ct
    lungs = _lungs(phantom.right_lung, phantom.left_lung, ct.shape)
    flipped = _flip_z(ct)
    flungs = _lungs(phantom.right_lung[::-1], phantom.left_lung[::-1], ct.shape)
    for a, b in ((select_by_lungs(ct, lungs), select_by_lungs(flipped, flungs)),
                 (select_covid_ctset(ct), select_covid_ctset(flipped))):
        np.testing.assert_allclose(a.positions_mm, b.positions_mm, atol=1e-3)
        assert np.all(np.diff(b.positions_mm) > 0)
        assert np.all(np.diff(b.indices) < 0), "flipped array: inferior first means descending index"
        np.testing.assert_array_equal(b.indices, ct.shape[0] - 1 - a.indices)


def test_transposed_volume_selects_same_positions(phantom):
    ct = phantom.ct
    t_ct, t_lung = _transpose_xz(ct, phantom.right_lung | phantom.left_lung)
    axis, _ = slice_axis(t_ct)
    assert axis == 2
    a = select_by_lungs(ct, _lungs(phantom.right_lung, phantom.left_lung, ct.shape))
    b = select_by_lungs(t_ct, _lungs(t_lung, np.zeros_like(t_lung), t_ct.shape))
    np.testing.assert_allclose(a.positions_mm, b.positions_mm, atol=1e-3)
    a2, b2 = select_covid_ctset(ct), select_covid_ctset(t_ct)
    np.testing.assert_allclose(a2.positions_mm, b2.positions_mm, atol=1e-3)
    # take() returns (n, rows, cols) slices whatever the array axis: the same pixels, transposed
    np.testing.assert_array_equal(b2.take(t_ct.array), a2.take(ct.array).transpose(0, 2, 1))


def test_phantom_ctset_slices_show_lungs(phantom):
    lung = phantom.right_lung | phantom.left_lung
    area = lung.sum(axis=(1, 2))
    sel = select_covid_ctset(phantom.ct)
    assert len(sel) >= 5
    assert (area[sel.indices] / area.max()).min() >= 0.3


def test_thin_keeps_minimum_spacing(phantom):
    sel = select_by_lungs(phantom.ct, _lungs(phantom.right_lung, phantom.left_lung, phantom.ct.shape))
    thin = sel.thin(15.0)
    assert 0 < len(thin) < len(sel)
    assert np.all(np.diff(thin.positions_mm) >= 15.0 - 1e-6)
    assert thin.indices[0] == sel.indices[0]


def test_errors(phantom):
    ct = phantom.ct
    empty = _lungs(np.zeros(ct.shape, bool), np.zeros(ct.shape, bool), ct.shape)
    with pytest.raises(LungsNotFoundError):
        select_by_lungs(ct, empty)
    with pytest.raises(LungsNotFoundError):
        select_slices(ct, None, method="lungs")
    assert select_slices(ct, empty).method == "covid_ctset"  # empty mask falls back
    with pytest.raises(ValueError):
        select_slices(ct, None, method="bogus")
