"""Synthetic chest phantom: anatomy in patient coordinates, exact lesion burden, lesion
patterns that follow the DeepSC-COVID findings, determinism, geometry variants, and lesion
insertion into a real CT."""
from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from CovidCTDxLib.errors import CancelledError, InputError, VolumeTooLargeError
from CovidCTDxLib.progress import CancelToken, Progress
from CovidCTDxLib.result import CLASS_KEYS, SEVERITY_KEYS
from CovidCTDxLib.synthetic.phantom import (
    CONSOLIDATION,
    GGO,
    SEVERITY_LVR_PERCENT,
    insert_lesions,
    make_phantom,
    severity_from_lvr,
)
from CovidCTDxLib.volume import LPS_LEFT, LPS_POSTERIOR, LPS_SUPERIOR, CTVolume

SMALL = dict(shape=(64, 128, 128), spacing=(2.5, 2.5, 5.0))


@pytest.fixture(scope="module")
def covid():
    return make_phantom("covid", lvr_percent=12.0, seed=3, **SMALL)


@pytest.fixture(scope="module")
def cap():
    return make_phantom("cap", lvr_percent=6.0, seed=3, **SMALL)


@pytest.fixture(scope="module")
def covid_mild():
    return make_phantom("covid", lvr_percent=6.0, seed=3, **SMALL)


def _mean_lps(ct: CTVolume, mask: np.ndarray, axis: np.ndarray) -> float:
    return float(np.broadcast_to(ct.lps_coordinate(axis), ct.shape)[mask].mean())


def _lvr(p) -> float:
    return 100.0 * p.lesion.sum() / p.lungs.sum()


def test_lungs_are_where_they_should_be(covid):
    ct = covid.ct
    assert ct.array.dtype == np.int16 and ct.shape == SMALL["shape"]
    ct.validate()  # passes the reader's own checks for a chest CT in HU
    assert np.allclose(ct.direction, np.eye(3))
    x_right = _mean_lps(ct, covid.right_lung, LPS_LEFT)
    x_left = _mean_lps(ct, covid.left_lung, LPS_LEFT)
    # Patient right is -x in LPS; the chest is centred on the origin.
    assert x_right < -30 < 30 < x_left
    # Right lung (3 lobes) is bigger than the left (cardiac notch).
    assert covid.right_lung.sum() > 1.05 * covid.left_lung.sum()
    # Both lungs inside the body, not touching each other, airways outside the lungs.
    assert not np.any(covid.lungs & ~covid.body)
    assert not np.any(covid.right_lung & covid.left_lung)
    assert not np.any(covid.airways & covid.lungs)
    # No lung on the mediastinal mid-line (x within 3 mm of the mediastinum's centre).
    x = np.broadcast_to(ct.lps_coordinate(LPS_LEFT), ct.shape)
    assert not np.any(covid.lungs & (np.abs(x - 5.0) < 3.0))
    # Lungs extend ~300 mm craniocaudally (the 320 mm grid holds them whole).
    k = np.nonzero(np.any(covid.lungs, axis=(1, 2)))[0]
    zs = ct.index_to_lps(np.stack([np.zeros_like(k), np.zeros_like(k), k], axis=1))[:, 2]
    assert 250 < zs.max() - zs.min() < 330
    assert covid.lungs.sum() * ct.voxel_volume_ml > 3500  # adult lungs: several litres


def _voxel_at(ct: CTVolume, lps) -> tuple:
    ijk = np.linalg.solve(ct.direction @ np.diag(ct.spacing), np.asarray(lps, float) - np.asarray(ct.origin))
    i, j, k = np.rint(ijk).astype(int)
    return k, j, i


def test_hilar_vessels_are_not_lung_but_the_lung_is_around_them(covid):
    for x in (-47.5, 47.5):  # the pulmonary arteries entering each lung
        assert not covid.lungs[_voxel_at(covid.ct, (x, 10.0, 24.0))]
        assert covid.lungs[_voxel_at(covid.ct, (1.8 * x, 10.0, 24.0))]


def test_lobes_three_right_two_left(covid):
    lobes = covid.lobes
    assert lobes is not None and lobes.shape == covid.ct.shape
    assert np.array_equal(lobes > 0, covid.lungs)
    assert set(np.unique(lobes[covid.right_lung])) == {1, 2, 3}
    assert set(np.unique(lobes[covid.left_lung])) == {4, 5}
    z = np.broadcast_to(covid.ct.lps_coordinate(LPS_SUPERIOR), lobes.shape)
    y = np.broadcast_to(covid.ct.lps_coordinate(LPS_POSTERIOR), lobes.shape)
    # Lower lobes are inferior and posterior to the upper lobes; the middle lobe anterior.
    for upper, lower in ((1, 3), (4, 5)):
        assert z[lobes == lower].mean() < z[lobes == upper].mean()
        assert y[lobes == lower].mean() > y[lobes == upper].mean()
    assert y[lobes == 2].mean() < y[lobes == 3].mean()


def test_tissue_densities(covid):
    a = covid.ct.array.astype(np.float32)
    healthy = covid.lungs & ~ndimage.binary_dilation(covid.lesion, iterations=2)
    assert -900 < np.median(a[healthy]) < -800
    assert np.all(a[covid.airways].mean() < -900)
    y = np.broadcast_to(covid.ct.lps_coordinate(LPS_POSTERIOR), a.shape)
    body_back = y[covid.body].max()
    outside = ~ndimage.binary_dilation(covid.body, iterations=2)
    # Air around the patient (anterior half), and the scanner table just posterior.
    assert np.median(a[outside & (y < 0)]) < -950
    table = outside & (y > body_back) & (a > 100)
    assert table.any() and y[table].min() < body_back + 15
    # Bone (ribs, spine) and soft tissue exist.
    assert np.count_nonzero(a > 500) > 500
    soft = covid.body & ~covid.lungs & (a > 0) & (a < 100)
    assert soft.sum() > 0.1 * covid.body.sum()


def test_noise_is_realistic():
    p = make_phantom("normal", seed=1, **SMALL)
    a = p.ct.array.astype(np.float32)
    # Homogeneous liver under the right dome of the diaphragm (z ~ -150 mm, x ~ -60 mm).
    z = np.broadcast_to(p.ct.lps_coordinate(LPS_SUPERIOR), a.shape)
    x = np.broadcast_to(p.ct.lps_coordinate(LPS_LEFT), a.shape)
    y = np.broadcast_to(p.ct.lps_coordinate(LPS_POSTERIOR), a.shape)
    liver = (np.abs(z + 150) < 8) & (np.abs(x + 60) < 25) & (np.abs(y + 10) < 25)
    vals = a[liver]
    assert vals.size > 50
    assert 30 < vals.mean() < 80
    assert 12 < vals.std() < 32


@pytest.mark.parametrize(
    "kind,lvr",
    [("covid", 2.0), ("covid", 25.0), ("cap", 3.0), ("cap", 12.0), ("covid", 45.0)],
)
def test_lesion_volume_matches_requested_ratio(kind, lvr):
    p = make_phantom(kind, lvr_percent=lvr, seed=7, **SMALL)
    actual = _lvr(p)
    assert abs(actual - lvr) <= 0.1 * lvr
    assert abs(p.lvr_percent - actual) < 1e-6
    assert not np.any(p.lesion & ~p.lungs)
    assert np.array_equal(p.lesion, p.lesion_type > 0)
    assert p.severity == severity_from_lvr(lvr)
    assert p.label in CLASS_KEYS


@pytest.mark.parametrize("severity", SEVERITY_KEYS)
def test_severity_draws_lvr_from_its_band(severity):
    p = make_phantom("covid", severity=severity, seed=11, **SMALL)
    lo, hi = SEVERITY_LVR_PERCENT[severity]
    assert p.severity == severity
    assert lo * 0.9 <= p.lvr_percent <= hi * 1.1


def test_severity_mapping():
    assert severity_from_lvr(0.5) == "mild"
    assert severity_from_lvr(4.9) == "mild"
    assert severity_from_lvr(5.0) == "moderate"
    assert severity_from_lvr(14.3) == "moderate"  # DeepSC-COVID mean COVID LVR
    assert severity_from_lvr(20) == "severe"
    assert severity_from_lvr(35) == "critical"
    assert severity_from_lvr(80) == "critical"
    bands = list(SEVERITY_LVR_PERCENT.values())
    assert all(a[1] == b[0] for a, b in zip(bands, bands[1:]))
    with pytest.raises(InputError):
        severity_from_lvr(-1)


def test_normal_has_no_lesions():
    p = make_phantom("normal", seed=0, **SMALL)
    assert p.label == "non_pneumonia" and p.severity is None
    assert not p.lesion.any() and not p.lesion_type.any() and p.lvr_percent == 0.0


def _peripheral_ratio(p, thickness_mm: float = 10.0) -> float:
    dist = ndimage.distance_transform_edt(p.lungs, sampling=p.ct.spacing_zyx)
    return float(np.mean(dist[p.lesion] <= thickness_mm))


def test_covid_lesions_are_more_peripheral_than_cap(covid_mild, cap):
    plr_covid, plr_cap = _peripheral_ratio(covid_mild), _peripheral_ratio(cap)
    assert plr_covid > plr_cap + 0.2
    assert plr_covid > 0.5


def test_covid_is_bilateral_multifocal_lower_and_ground_glass(covid, cap):
    assert (covid.lesion & covid.right_lung).sum() > 0 and (covid.lesion & covid.left_lung).sum() > 0
    n_covid = ndimage.label(covid.lesion)[1]
    n_cap = ndimage.label(cap.lesion)[1]
    assert n_covid >= 3 and n_covid > n_cap
    # Lower-lobe predominance: lesion centroid below the lung centroid.
    z = covid.ct.lps_coordinate(LPS_SUPERIOR)
    zb = np.broadcast_to(z, covid.ct.shape)
    assert zb[covid.lesion].mean() < zb[covid.lungs].mean()
    types = np.bincount(covid.lesion_type[covid.lesion], minlength=4)
    assert types[GGO] + types[2] > types[CONSOLIDATION]
    a = covid.ct.array.astype(np.float32)
    ggo = covid.lesion_type == GGO
    assert -750 < np.median(a[ggo]) < -300


def test_cap_is_consolidation_with_ground_glass_rim(cap):
    a = cap.ct.array.astype(np.float32)
    cons = cap.lesion_type == CONSOLIDATION
    assert cons.sum() > 0.3 * cap.lesion.sum()
    assert -100 < np.median(a[cons]) < 100
    assert (cap.lesion_type == GGO).any()


def test_vessels_stay_visible_through_ground_glass():
    # Same seed without lesions: same anatomy and vessels (only the noise differs).
    grid = dict(shape=(40, 240, 240), spacing=(1.4, 1.4, 6.0))
    covid = make_phantom("covid", lvr_percent=20.0, seed=3, **grid)
    normal = make_phantom("normal", seed=3, **grid)
    assert np.array_equal(normal.right_lung, covid.right_lung)
    ggo = ndimage.binary_erosion(covid.lesion_type == GGO, iterations=1)
    vessel = ggo & (normal.ct.array > -450)
    parenchyma = ggo & (normal.ct.array < -800)
    assert vessel.sum() > 20 and parenchyma.sum() > 1000
    a = covid.ct.array.astype(np.float32)
    # Vessels inside the ground glass stay clearly denser than the ground glass.
    assert np.median(a[vessel]) > np.median(a[parenchyma]) + 150


def test_same_seed_same_volume_different_seed_different():
    a = make_phantom("covid", lvr_percent=8, seed=5, **SMALL)
    b = make_phantom("covid", lvr_percent=8, seed=5, **SMALL)
    c = make_phantom("covid", lvr_percent=8, seed=6, **SMALL)
    assert np.array_equal(a.ct.array, b.ct.array)
    for name in ("right_lung", "left_lung", "airways", "body", "lesion", "lesion_type"):
        assert np.array_equal(getattr(a, name), getattr(b, name))
    assert not np.array_equal(a.ct.array, c.ct.array)
    assert not np.array_equal(a.lesion, c.lesion)


def test_anisotropic_spacing_same_anatomy():
    p = make_phantom("covid", lvr_percent=10, shape=(40, 480, 480), spacing=(0.7, 0.7, 5.0), seed=2)
    assert p.ct.spacing == (0.7, 0.7, 5.0) and p.ct.shape == (40, 480, 480)
    assert abs(_lvr(p) - 10) <= 1.0
    assert not np.any(p.lesion & ~p.lungs)
    assert _mean_lps(p.ct, p.right_lung, LPS_LEFT) < 0 < _mean_lps(p.ct, p.left_lung, LPS_LEFT)
    # Same physical chest as on the coarse grid: lung volume per slab within 15 %.
    q = make_phantom("normal", shape=(40, 144, 144), spacing=(2.5, 2.5, 5.0), seed=2)
    vp = p.lungs.sum() * p.ct.voxel_volume_ml
    vq = q.lungs.sum() * q.ct.voxel_volume_ml
    assert abs(vp - vq) < 0.15 * vq


def test_partial_coverage_when_grid_is_shorter_than_the_chest():
    # 100 mm of z around mid-chest: both lungs cut top and bottom, lesions still exact.
    p = make_phantom("covid", lvr_percent=10, shape=(20, 128, 128), spacing=(2.5, 2.5, 5.0), seed=9)
    assert np.all(np.any(p.lungs, axis=(1, 2)))  # every slice has lung
    assert abs(_lvr(p) - 10) <= 1.0
    assert p.right_lung.any() and p.left_lung.any()


def test_flipped_direction_keeps_left_left():
    direction = np.diag([-1.0, -1.0, 1.0])  # i runs to patient right, j anterior
    p = make_phantom("cap", lvr_percent=5, seed=4, direction=direction, **SMALL)
    ref = make_phantom("cap", lvr_percent=5, seed=4, **SMALL)
    assert np.allclose(p.ct.direction, direction)
    assert _mean_lps(p.ct, p.right_lung, LPS_LEFT) < 0 < _mean_lps(p.ct, p.left_lung, LPS_LEFT)
    # Right lung now sits at HIGH x index; the arrays are the identity ones flipped.
    assert np.array_equal(p.right_lung, ref.right_lung[:, ::-1, ::-1])
    assert np.array_equal(p.ct.array, ref.ct.array[:, ::-1, ::-1])
    # Same physical positions: voxel (0, 0, 0) of p is the last in-plane voxel of ref.
    nz, ny, nx = ref.ct.shape
    assert np.allclose(p.ct.index_to_lps(np.array([0, 0, 0])), ref.ct.index_to_lps(np.array([nx - 1, ny - 1, 0])))


def test_progress_and_cancel():
    seen = []
    make_phantom("cap", lvr_percent=4, progress=Progress(lambda f, m: seen.append(f)), **SMALL)
    assert seen and seen[-1] == pytest.approx(1.0)
    assert all(a <= b + 1e-9 for a, b in zip(seen, seen[1:]))
    token = CancelToken()
    token.cancel()
    with pytest.raises(CancelledError):
        make_phantom("covid", lvr_percent=4, progress=Progress(None, token), **SMALL)


def test_bad_arguments_raise_input_error():
    with pytest.raises(InputError):
        make_phantom("flu", **SMALL)
    with pytest.raises(InputError):
        make_phantom("covid", severity="terminal", **SMALL)
    with pytest.raises(InputError):
        make_phantom("covid", lvr_percent=90, **SMALL)
    with pytest.raises(InputError):
        make_phantom("covid", direction=np.array([[0.6, 0.8, 0], [-0.8, 0.6, 0], [0, 0, 1]]), **SMALL)
    with pytest.raises(VolumeTooLargeError):
        make_phantom("normal", shape=(2000, 1024, 1024), spacing=(0.3, 0.3, 0.2))


def test_insert_lesions_respects_flipped_geometry():
    """Insertion works in patient coordinates: on a volume stored with i towards the
    patient's right and k towards the feet, COVID lesions still go to both lungs, near
    the pleura and low (inferior) in LPS."""
    direction = np.diag([-1.0, 1.0, -1.0])
    normal = make_phantom("normal", seed=8, direction=direction, **SMALL)
    out = insert_lesions(normal.ct, normal.right_lung, normal.left_lung, "covid", 10.0, seed=2)
    lungs = normal.lungs
    assert abs(100.0 * out.lesion.sum() / lungs.sum() - 10.0) <= 1.0
    assert not np.any(out.lesion & ~lungs)
    assert (out.lesion & normal.right_lung).any() and (out.lesion & normal.left_lung).any()
    z = np.broadcast_to(out.ct.lps_coordinate(LPS_SUPERIOR), lungs.shape)
    assert z[out.lesion].mean() < z[lungs].mean()
    dist = ndimage.distance_transform_edt(lungs, sampling=out.ct.spacing_zyx)
    assert np.mean(dist[out.lesion] <= 10.0) > 0.5
    assert np.array_equal(out.lesion, out.lesion_type > 0)
    assert out.ct.array.dtype == np.int16 and np.allclose(out.ct.direction, direction)


def test_insert_lesions_rejects_bad_masks():
    normal = make_phantom("normal", seed=8, **SMALL)
    with pytest.raises(InputError):
        insert_lesions(normal.ct, normal.right_lung[:-1], normal.left_lung, "covid", 5.0)
    with pytest.raises(InputError):
        insert_lesions(normal.ct, np.zeros_like(normal.right_lung), np.zeros_like(normal.left_lung), "cap", 5.0)
    with pytest.raises(InputError):
        insert_lesions(normal.ct, normal.right_lung, normal.left_lung, "normal", 5.0)


# --------------------------------------------------------------------------- real CT
@pytest.fixture(scope="module")
def a0001(request):
    a0001_nii = request.getfixturevalue("a0001_nii")
    ref = request.getfixturevalue("a0001_reference")
    import SimpleITK as sitk

    img = sitk.ReadImage(str(a0001_nii))
    ct = CTVolume(
        sitk.GetArrayFromImage(img), img.GetSpacing(), img.GetOrigin(), np.array(img.GetDirection()).reshape(3, 3)
    )
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(ref)))
    return ct, labels == 1, labels == 2


@pytest.mark.realdata
@pytest.mark.parametrize("kind,lvr", [("covid", 8.0), ("cap", 3.0)])
def test_insert_lesions_into_real_ct(a0001, kind, lvr):
    ct, right, left = a0001
    out = insert_lesions(ct, right, left, kind, lvr, seed=1)
    lungs = right | left
    actual = 100.0 * out.lesion.sum() / lungs.sum()
    assert abs(actual - lvr) <= 0.1 * lvr
    assert not np.any(out.lesion & ~lungs)
    assert out.ct.shape == ct.shape and out.ct.array.dtype == ct.array.dtype
    assert out.ct.spacing == ct.spacing and np.allclose(out.ct.origin, ct.origin)
    # Only lesion voxels changed, and they got denser.
    changed = out.ct.array != ct.array
    assert not np.any(changed & ~out.lesion)
    before = ct.array[out.lesion].astype(np.float32)
    after = out.ct.array[out.lesion].astype(np.float32)
    assert after.mean() > before.mean() + 150
    # Peripheral lesion ratio on a 2x in-plane sub-sample (full-res EDT is slow).
    sub = (slice(None), slice(None, None, 2), slice(None, None, 2))
    sampling = (ct.spacing_zyx[0], 2 * ct.spacing_zyx[1], 2 * ct.spacing_zyx[2])
    dist = ndimage.distance_transform_edt(lungs[sub], sampling=sampling)
    plr = float(np.mean(dist[out.lesion[sub]] <= 10.0))
    if kind == "covid":
        assert (out.lesion & right).any() and (out.lesion & left).any()
        assert plr > 0.5
    else:
        assert plr < 0.5
