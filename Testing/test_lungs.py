"""Lung masking: real CTs with references, phantoms with ground truth, bad inputs, model hook."""
from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

from CovidCTDxLib.errors import CancelledError, LungsNotFoundError, WeightsError
from CovidCTDxLib.evaluation.scan_metrics import dice as dice_score
from CovidCTDxLib.evaluation.shared_scans import tumour_box_mask
from CovidCTDxLib.lungs.engine import segment_lungs
from CovidCTDxLib.lungs.model_hook import TorchLungModel
from CovidCTDxLib.models.lung_unet import UNet2D
from CovidCTDxLib.progress import CancelToken, Progress
from CovidCTDxLib.volume import CTVolume

#: Two empty masks score 0 here, not dice_score's default 1: an empty lung is a failure.
dice = functools.partial(dice_score, empty=0.0)


def phantom(**kw):
    from CovidCTDxLib.synthetic.phantom import make_phantom

    return make_phantom(**kw)


def flip_left_right(ct: CTVolume) -> CTVolume:
    """Mirror the array along i (x) and update origin/direction: same patient, new storage."""
    nx = ct.shape[2]
    origin = ct.index_to_lps(np.array([nx - 1, 0, 0]))
    direction = ct.direction.copy()
    direction[:, 0] *= -1
    return CTVolume(np.ascontiguousarray(ct.array[:, :, ::-1]), ct.spacing, tuple(origin), direction)


# --------------------------------------------------------------------------- real CTs
@pytest.fixture(scope="module")
def a0001(a0001_nii, a0001_reference):
    import SimpleITK as sitk

    from CovidCTDxLib.io.readers import read_ct

    ct = read_ct(a0001_nii)
    ref = sitk.GetArrayFromImage(sitk.ReadImage(str(a0001_reference)))
    return ct, ref, segment_lungs(ct)


@pytest.mark.realdata
def test_a0001_matches_reference_right_lung(a0001):
    ct, ref, m = a0001
    assert dice(m.right, ref == 1) >= 0.97
    assert not (m.right & m.left).any()
    assert m.body[m.right | m.left].all()


@pytest.mark.realdata
def test_a0001_matches_reference_left_lung_with_tumour(a0001):
    ct, ref, m = a0001
    assert dice(m.left, ref == 2) >= 0.97


@pytest.mark.realdata
def test_a0001_airways_found_and_excluded(a0001):
    ct, ref, m = a0001
    airway = ref == 3
    assert ((m.right | m.left) & airway).sum() <= 0.05 * airway.sum()
    assert dice(m.airways, airway) >= 0.7


def _tumour(ct, ref, boxes_csv):
    return tumour_box_mask(boxes_csv, ct.shape) & (ref == 2)  # the tumour as the reference drew it (box minus mediastinum)


@pytest.mark.realdata
def test_a0001_tumour_never_labelled_right(a0001, a0001_tumour_boxes):
    ct, ref, m = a0001
    tumour = _tumour(ct, ref, a0001_tumour_boxes)
    assert (m.right & tumour).sum() == 0  # sides come from patient coordinates
    assert (m.left & tumour).sum() > 0


@pytest.mark.realdata
def test_a0001_tumour_filled_into_left_lung(a0001, a0001_tumour_boxes):
    ct, ref, m = a0001
    tumour = _tumour(ct, ref, a0001_tumour_boxes)
    assert (m.left & tumour).sum() >= 0.9 * tumour.sum()


@pytest.mark.realdata
def test_real_covid_dicom_lungs_plausible(covid_dicom_dir):
    from CovidCTDxLib.io.readers import read_ct

    ct = read_ct(covid_dicom_dir)
    m = segment_lungs(ct)
    right, left = m.right.sum() * ct.voxel_volume_ml, m.left.sum() * ct.voxel_volume_ml
    assert 2000 <= right + left <= 8000
    assert right > 0.2 * (right + left) and left > 0.2 * (right + left)
    assert right > 0.9 * left  # the right lung is the larger one
    # the patient's left lung lies at larger LPS x than the right
    x = np.broadcast_to(ct.lps_coordinate(np.array([1.0, 0, 0])), ct.shape)
    assert x[m.left].mean() > x[m.right].mean()


# --------------------------------------------------------------------------- phantoms
@pytest.mark.parametrize(
    "kw",
    [
        dict(kind="normal"),
        dict(kind="covid", severity="severe", seed=1),
        dict(kind="cap", severity="severe", seed=2),
    ],
    ids=["normal", "covid-severe", "cap-severe"],
)
def test_phantom_dice(kw):
    p = phantom(**kw)
    m = segment_lungs(p.ct)
    assert dice(m.right, p.right_lung) >= 0.97, kw
    assert dice(m.left, p.left_lung) >= 0.97, kw
    assert (m.airways & p.airways).sum() >= 0.5 * p.airways.sum()


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["covid", "cap"])
def test_phantom_critical_dense_disease_is_filled(kind):
    """Critical disease: whole consolidated lobes, the hardest case for a classical engine."""
    p = phantom(kind=kind, severity="critical", seed=3)
    m = segment_lungs(p.ct)
    assert dice(m.right, p.right_lung) >= 0.97
    assert dice(m.left, p.left_lung) >= 0.97


def test_flipped_array_keeps_patient_sides():
    p = phantom(kind="covid", severity="moderate", seed=4)
    flipped = flip_left_right(p.ct)
    m = segment_lungs(flipped)
    # Ground truth stored the same way as the flipped array.
    assert dice(m.left, p.left_lung[:, :, ::-1]) >= 0.97
    assert dice(m.right, p.right_lung[:, :, ::-1]) >= 0.97


@pytest.mark.parametrize(
    "shape,spacing",
    [((40, 176, 176), (2.0, 2.0, 8.0)), ((64, 176, 176), (2.0, 2.0, 5.0))],
    ids=["8mm", "5mm"],
)
def test_thick_slices(shape, spacing):
    p = phantom(kind="covid", severity="moderate", shape=shape, spacing=spacing, seed=5)
    m = segment_lungs(p.ct)
    assert dice(m.right, p.right_lung) >= 0.97
    assert dice(m.left, p.left_lung) >= 0.97


@pytest.mark.slow
def test_thin_slices_partial_coverage():
    """0.6 mm slices covering only a 66 mm slab of the chest (apex and base cut)."""
    p = phantom(kind="covid", severity="moderate", shape=(110, 448, 448), spacing=(0.8, 0.8, 0.6), seed=6)
    m = segment_lungs(p.ct)
    assert dice(m.right, p.right_lung) >= 0.97
    assert dice(m.left, p.left_lung) >= 0.97


def test_partial_coverage_lower_half():
    p = phantom(kind="normal", seed=7)
    zs = np.nonzero(p.lungs.any(axis=(1, 2)))[0]
    cut = slice(zs.min(), (zs.min() + zs.max()) // 2)  # base to mid-lung: no trachea
    ct = CTVolume(p.ct.array[cut], p.ct.spacing, tuple(p.ct.index_to_lps(np.array([0, 0, cut.start]))), p.ct.direction)
    m = segment_lungs(ct)
    assert dice(m.right, p.right_lung[cut]) >= 0.97
    assert dice(m.left, p.left_lung[cut]) >= 0.97


def test_stomach_gas_below_the_diaphragm_is_not_lung():
    """A stomach bubble in the upper abdomen stays out of the lungs.

    Like the real COVID scan's stomach, it is gas mottled with food (a quarter of its voxels
    at -750 HU), so its block-averaged median (about -930 HU) looks like lung; only its
    full-resolution share of gas-level voxels gives it away.
    """
    p = phantom(kind="normal", shape=(140, 160, 160), spacing=(2.2, 2.2, 3.5), seed=8)
    zs = np.nonzero(p.lungs.any(axis=(1, 2)))[0]
    body_below = p.body[: zs.min()]
    k = zs.min() - 4  # a few slices under the left lung base
    ys, xs = np.nonzero(p.body[k])
    cy, cx = int(ys.mean()) - 10, int(np.percentile(xs, 70))  # anterior, patient left (high x)
    z, y, x = np.ogrid[: p.ct.shape[0], : p.ct.shape[1], : p.ct.shape[2]]
    sx, sy, sz = p.ct.spacing
    bubble = ((x - cx) * sx / 30) ** 2 + ((y - cy) * sy / 20) ** 2 + ((z - k) * sz / 12) ** 2 < 1
    bubble &= p.body
    assert body_below.any() and bubble.sum() * p.ct.voxel_volume_ml > 20
    array = p.ct.array.copy()
    rng = np.random.default_rng(0)
    gas = rng.normal(-1000, 40, bubble.sum())
    gas[rng.random(bubble.sum()) < 0.25] = -750
    array[bubble] = gas.astype(np.int16)
    m = segment_lungs(p.ct.with_array(array))
    assert not (m.lungs & bubble).any()
    assert dice(m.left, p.left_lung) >= 0.97


# --------------------------------------------------------------------------- bad inputs
def test_abdomen_only_raises():
    # a tall grid (490 mm) so the phantom's upper abdomen below the lungs is in view
    p = phantom(kind="normal", shape=(140, 160, 160), spacing=(2.2, 2.2, 3.5), seed=8)
    zs = np.nonzero(p.lungs.any(axis=(1, 2)))[0]
    below = p.ct.array[: zs.min()]
    assert below.shape[0] * p.ct.spacing[2] >= 15, "phantom must extend below the lungs"
    ct = CTVolume(below, p.ct.spacing, p.ct.origin, p.ct.direction)
    with pytest.raises(LungsNotFoundError, match="No lungs"):
        segment_lungs(ct)


def test_water_cylinder_raises():
    z, y, x = np.mgrid[0:30, 0:160, 0:160]
    array = np.where((y - 80) ** 2 + (x - 80) ** 2 < 70**2, 0, -1000).astype(np.int16)
    ct = CTVolume(array, (2.0, 2.0, 3.0))
    with pytest.raises(LungsNotFoundError) as err:
        segment_lungs(ct)
    assert "air" in str(err.value)


# --------------------------------------------------------------------------- progress
def test_progress_reported_and_cancellable():
    p = phantom(kind="normal", shape=(48, 160, 160), spacing=(2.2, 2.2, 7.0), seed=9)
    seen = []
    segment_lungs(p.ct, progress=Progress(lambda f, msg: seen.append((f, msg))))
    fractions = [f for f, _ in seen]
    assert fractions == sorted(fractions) and fractions[0] == 0.0 and fractions[-1] == 1.0
    token = CancelToken()
    token.cancel()
    with pytest.raises(CancelledError):
        segment_lungs(p.ct, progress=Progress(None, token))


# --------------------------------------------------------------------------- model hook
class _SwappedTruth:
    """A 'model' that names the lungs the wrong way round: sides must be re-decided."""

    def __init__(self, p):
        self.labels = np.where(p.right_lung, 2, np.where(p.left_lung, 1, 0)).astype(np.uint8)

    def predict(self, ct):
        return self.labels


def test_model_hook_sides_from_patient_coordinates():
    p = phantom(kind="normal", shape=(48, 160, 160), spacing=(2.2, 2.2, 7.0), seed=10)
    m = segment_lungs(p.ct, model=_SwappedTruth(p))
    assert m.method.startswith("model:")
    assert dice(m.right, p.right_lung) >= 0.95
    assert dice(m.left, p.left_lung) >= 0.95


def test_torch_lung_model_round_trip(tmp_path):
    torch.manual_seed(0)
    model = TorchLungModel(UNet2D(depth=3, wf=2), size=64)
    path = tmp_path / "lung_unet.safetensors"
    model.save(path)
    loaded = TorchLungModel.from_file(path)
    assert loaded.size == 64 and loaded.net.depth == 3
    p = phantom(kind="normal", shape=(24, 128, 128), spacing=(2.6, 2.6, 12.0), seed=11)
    a, b = model.predict(p.ct), loaded.predict(p.ct)
    assert a.shape == p.ct.shape and a.dtype == np.uint8 and set(np.unique(a)) <= {0, 1, 2}
    np.testing.assert_array_equal(a, b)


def test_torch_lung_model_rejects_bad_files(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(WeightsError):
        TorchLungModel.from_file(bad)
    from safetensors.torch import save_file

    other = tmp_path / "other.safetensors"
    save_file({"conv.weight": torch.zeros(3, 3)}, str(other))
    with pytest.raises(WeightsError, match="UNet2D"):
        TorchLungModel.from_file(other)
    with pytest.raises(WeightsError, match="not found"):
        TorchLungModel.from_file(tmp_path / "missing.safetensors")
