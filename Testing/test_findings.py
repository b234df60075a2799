"""Findings from lesion masks: counts, volumes, LVR, PLR, severity score, rows, reading."""
from __future__ import annotations

import numpy as np
import pytest

from CovidCTDxLib.findings.metrics import MIN_COUNTED_LESION_ML, compute_findings, severity_points
from CovidCTDxLib.findings.reading import read_findings
from CovidCTDxLib.lesions.density import split_lesion_types
from CovidCTDxLib.lungs.zones import compute_zones
from CovidCTDxLib.result import LesionMasks, LungMasks
from CovidCTDxLib.synthetic.phantom import make_phantom
from CovidCTDxLib.volume import CTVolume


def _box_case():
    shape = (60, 100, 140)
    hu = np.full(shape, -850, np.int16)
    right = np.zeros(shape, bool)
    left = np.zeros(shape, bool)
    right[5:55, 10:90, 10:65] = True
    left[5:55, 10:90, 75:130] = True
    ct = CTVolume(hu, (1.0, 1.0, 2.0))
    z = np.zeros(shape, bool)
    return ct, LungMasks(right, left, z, z)


def _ball(shape, centre, r):
    zz, yy, xx = np.ogrid[: shape[0], : shape[1], : shape[2]]
    return ((zz - centre[0]) * 2.0) ** 2 + (yy - centre[1]) ** 2 + (xx - centre[2]) ** 2 <= r * r


def test_count_exact_for_separated_blobs_and_tiny_specks_ignored():
    ct, lungs = _box_case()
    lesion = np.zeros(ct.shape, bool)
    centres = [(15, 30, 30), (40, 60, 40), (20, 50, 100), (45, 30, 110), (30, 70, 90)]
    for c in centres:
        lesion |= _ball(ct.shape, c, 6)
    lesion[10, 80, 20] = True  # one-voxel speck (< MIN_COUNTED_LESION_ML)
    f = compute_findings(ct, lungs, LesionMasks(lesion))
    assert f.lesion_count == len(centres)
    assert f.sides["right"].lesion_count == 2 and f.sides["left"].lesion_count == 3
    assert f.bilateral and f.lungs_involved == 2
    assert f.lesion_volume_ml == pytest.approx(lesion.sum() * ct.voxel_volume_ml)
    assert 1e-3 < MIN_COUNTED_LESION_ML


def test_half_erased_lesion_gives_half_volume():
    ct, lungs = _box_case()
    lesion = _ball(ct.shape, (30, 50, 38), 15) & lungs.right
    zones = compute_zones(ct, lungs.right, lungs.left)
    full = compute_findings(ct, lungs, LesionMasks(lesion), zones)
    edited = lesion.copy()
    edited[:, :, :38] = False  # the user erases one half
    half = compute_findings(ct, lungs, LesionMasks(edited), zones)
    assert half.lesion_volume_ml == pytest.approx(edited.sum() * ct.voxel_volume_ml)
    assert half.lesion_volume_ml / full.lesion_volume_ml == pytest.approx(0.5, abs=0.05)
    assert half.lvr_percent / full.lvr_percent == pytest.approx(0.5, abs=0.05)


def test_plr_peripheral_vs_central():
    ct, lungs = _box_case()
    central = _ball(ct.shape, (30, 50, 38), 8)
    peripheral = lungs.right & ~np.pad(np.ones((50, 70, 45), bool), ((5, 5), (15, 15), (15, 80)))
    fc = compute_findings(ct, lungs, LesionMasks(central))
    fp = compute_findings(ct, lungs, LesionMasks(peripheral & _ball(ct.shape, (30, 50, 12), 14)))
    assert fc.plr_percent == 0.0
    assert fp.plr_percent == pytest.approx(100.0)


def test_severity_points_bands():
    assert [severity_points(p) for p in (0, 1, 5, 25, 26, 50, 51, 75, 76, 100)] == [0, 1, 2, 2, 3, 3, 4, 4, 5, 5]


def test_outputs_contract():
    ct, lungs = _box_case()
    lesion = _ball(ct.shape, (30, 50, 38), 8)
    ggo, cons = split_lesion_types(ct, lesion)
    f = compute_findings(ct, lungs, LesionMasks(lesion, ggo, cons))
    d = f.to_dict()
    for key in ("lesion_count", "lesion_volume_ml", "lesion_volume_ratio_percent", "peripheral_lesion_ratio_percent", "ct_severity_score"):
        assert key in d
    assert set(d["per_zone"]) == {"right_upper", "right_middle", "right_lower", "left_upper", "left_middle", "left_lower"}
    rows = f.rows()
    names = [r[0] for r in rows]
    assert len(names) == len(set(names))
    assert all(len(r) == 4 and r[2] and r[3] for r in rows)
    # every lung voxel here is -850 HU: all "functional" in Lung CT Analyzer classes
    assert d["hu_classes_percent"]["functional"] == pytest.approx(100.0)
    assert d["lesion_types_ml"]["ggo"] == pytest.approx(f.lesion_volume_ml)


def test_no_lesions():
    ct, lungs = _box_case()
    f = compute_findings(ct, lungs, LesionMasks(np.zeros(ct.shape, bool)))
    assert f.lesion_count == 0 and f.plr_percent is None and f.ct_severity_score == 0
    assert read_findings(f).label == "no_lesions"


@pytest.fixture(scope="module")
def phantoms():
    return {(k, s): make_phantom(k, severity=s, seed=5) for k, s in
            [("covid", "mild"), ("covid", "moderate"), ("covid", "severe"), ("covid", "critical"), ("cap", "moderate")]}


def _gt_findings(p):
    z = np.zeros_like(p.right_lung)
    return compute_findings(p.ct, LungMasks(p.right_lung, p.left_lung, z, z), LesionMasks(p.lesion))


def test_severity_score_monotone_in_severity(phantoms):
    scores = [_gt_findings(phantoms[("covid", s)]).ct_severity_score for s in ("mild", "moderate", "severe", "critical")]
    assert scores == sorted(scores) and scores[0] < scores[-1], scores


def test_plr_covid_higher_than_cap_and_reading(phantoms):
    covid = _gt_findings(phantoms[("covid", "moderate")])
    cap = _gt_findings(phantoms[("cap", "moderate")])
    assert covid.plr_percent > cap.plr_percent
    assert read_findings(covid).label == "covid19_typical"
    assert read_findings(cap).label != "covid19_typical"


def test_reading_of_cap_phantoms_is_cap_typical_or_indeterminate():
    """A CAP phantom can be bilateral with 3 pieces (mixed evidence → indeterminate), but the
    reading must never call it COVID-19-typical, and most CAP phantoms read CAP-typical."""
    labels = [read_findings(_gt_findings(make_phantom("cap", severity="moderate", seed=s))).label for s in range(5, 11)]
    assert "covid19_typical" not in labels, labels
    assert labels.count("cap_typical") >= len(labels) / 2, labels
