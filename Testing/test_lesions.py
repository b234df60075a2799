"""Density lesion engine on phantoms with ground truth and on the two real CTs."""
from __future__ import annotations

import numpy as np
import pytest

from CovidCTDxLib.evaluation.scan_metrics import binary_auc
from CovidCTDxLib.evaluation.shared_scans import read_infected_slices, tumour_box_mask
from CovidCTDxLib.lesions.density import CONSOLIDATION_HU, detect_lesions, split_lesion_types
from CovidCTDxLib.result import LungMasks
from CovidCTDxLib.synthetic.phantom import insert_lesions, make_phantom


def _lungs(right, left):
    z = np.zeros_like(right)
    return LungMasks(right, left, z, z)


def _lvr(mask, lung):
    return 100.0 * np.count_nonzero(mask & lung) / np.count_nonzero(lung)


@pytest.mark.parametrize("kind,severity,seed", [("covid", "mild", 1), ("covid", "moderate", 2), ("cap", "moderate", 2)])
def test_phantom_lesions_recovered(kind, severity, seed):
    """The phantom paints its lesion border at 45 % of the lesion contrast
    (``synthetic.lesions.lesion_hu``), the engine draws the edge at half the contrast of the
    plateau next to it (full width at half maximum), so the engine's volume runs up to ~20 %
    under the phantom's; the overlap (Dice) is the figure that says the lesions are found."""
    p = make_phantom(kind, severity=severity, seed=seed)
    assert p.lvr_percent >= 2.0
    les = detect_lesions(p.ct, _lungs(p.right_lung, p.left_lung))
    lvr = _lvr(les.lesion, p.right_lung | p.left_lung)
    assert abs(lvr / p.lvr_percent - 1.0) <= 0.25, (lvr, p.lvr_percent)
    both = np.count_nonzero(les.lesion & p.lesion)
    assert 2.0 * both / (np.count_nonzero(les.lesion) + np.count_nonzero(p.lesion)) >= 0.8
    # the engine's lesions are where the phantom's are
    overlap = np.count_nonzero(les.lesion & p.lesion) / np.count_nonzero(les.lesion)
    assert overlap > 0.8


def test_normal_phantom_scores_near_zero():
    p = make_phantom("normal", seed=0)
    les = detect_lesions(p.ct, _lungs(p.right_lung, p.left_lung))
    assert _lvr(les.lesion, p.right_lung | p.left_lung) < 0.2


def test_split_types_partition_any_mask():
    p = make_phantom("cap", severity="moderate", seed=3)
    ggo, cons = split_lesion_types(p.ct, p.lesion)
    assert not (ggo & cons).any()
    assert np.array_equal(ggo | cons, p.lesion)
    # phantom consolidation (type 3) is mostly typed consolidation, ground glass (1) mostly ggo
    assert np.mean(cons[p.lesion_type == 3]) > 0.8
    assert np.mean(ggo[p.lesion_type == 1]) > 0.8
    assert np.median(p.ct.array[cons]) >= CONSOLIDATION_HU


# ----------------------------------------------------------------- real CT A0001
@pytest.fixture(scope="module")
def a0001(a0001_nii, a0001_reference):
    from CovidCTDxLib.io.readers import read_ct

    ct = read_ct(a0001_nii)
    ref = read_ct.__globals__["sitk"].GetArrayFromImage(read_ct.__globals__["sitk"].ReadImage(str(a0001_reference)))
    return ct, ref == 1, ref == 2


@pytest.mark.realdata
@pytest.mark.slow
def test_a0001_small_lvr_apart_from_tumour(a0001, a0001_tumour_boxes):
    """Non-COVID lung: dependent density, dome / apical partial volume and hilar vessels
    must not become lesions; the tumour must."""
    ct, right, left = a0001
    les = detect_lesions(ct, _lungs(right, left))
    tumour = tumour_box_mask(a0001_tumour_boxes, ct.shape)
    lung = right | left
    outside = _lvr(les.lesion & ~tumour, lung)
    assert outside < 1.5, outside
    assert _lvr(les.lesion, right) < 1.0  # the tumour-free lung
    # the tumour itself is found
    assert np.count_nonzero(les.lesion & tumour) > 0.3 * np.count_nonzero(tumour & lung & (ct.array > -300))


@pytest.mark.realdata
@pytest.mark.slow
@pytest.mark.parametrize("kind", ["covid", "cap"])
def test_a0001_inserted_lesions_recovered(a0001, kind):
    ct, right, left = a0001
    base = detect_lesions(ct, _lungs(right, left)).lesion
    ins = insert_lesions(ct, right, left, kind, 8.0, seed=4)
    les = detect_lesions(ins.ct, _lungs(right, left)).lesion
    lung = right | left
    # what the engine adds over the untouched scan is the inserted lesion volume, up to the
    # border convention (phantom border at 45 % of the contrast, engine edge at half the
    # plateau's: see test_phantom_lesions_recovered)
    added = _lvr(les & ~base, lung)
    assert abs(added / ins.lvr_percent - 1.0) <= 0.25, (added, ins.lvr_percent)


# ----------------------------------------------------------------- real COVID-19 scan
@pytest.mark.realdata
@pytest.mark.slow
def test_covid_scan_slice_auc(covid_dicom_dir, covid_infected_csv):
    from CovidCTDxLib.io.readers import read_ct
    from CovidCTDxLib.lungs.engine import segment_lungs

    ct = read_ct(covid_dicom_dir)
    lungs = segment_lungs(ct)
    les = detect_lesions(ct, lungs).lesion
    labels = read_infected_slices(covid_infected_csv, ct.shape[0])["infected"]
    lung = lungs.lungs
    per_lung = lung.sum((1, 2))
    has = per_lung > 0
    share = les.sum((1, 2)) / np.maximum(per_lung, 1)
    plain = (lung & (ct.array > -750) & (ct.array < -300)).sum((1, 2)) / np.maximum(per_lung, 1)
    auc, auc_plain = binary_auc(labels[has], share[has]), binary_auc(labels[has], plain[has])
    print(f"slice AUC engine {auc:.3f}, plain -750..-300 HU threshold {auc_plain:.3f}")
    assert auc >= 0.9
    assert auc > auc_plain
