"""Scoreboard metrics on toy arrays whose right answer is known by hand, and the seg.nrrd
reader on segmentations written here (layered, cropped, RAS) so that a scoreboard number
can be trusted: a Dice or slice AUC that is off by a mapping error looks just as plausible.
"""
from __future__ import annotations

import math
from pathlib import Path

import nrrd
import numpy as np
import pytest
import SimpleITK as sitk

from CovidCTDxLib.evaluation.scan_metrics import (
    dice,
    read_segmentation_masks,
    share_inside,
    slice_auc,
    worst_slice_loss,
)

# --- dice -------------------------------------------------------------------------------


def test_dice_identical_disjoint_and_half():
    a = np.zeros((4, 4), bool)
    a[:2] = True
    assert dice(a, a) == 1.0
    assert dice(a, ~a) == 0.0
    b = np.zeros((4, 4), bool)
    b[:1] = True  # 4 of a's 8 voxels
    assert dice(a, b) == pytest.approx(2 * 4 / 12)


def test_dice_empty_masks():
    empty = np.zeros((3, 3), bool)
    full = np.ones((3, 3), bool)
    assert dice(empty, empty) == 1.0  # nothing to find, nothing found
    assert dice(empty, full) == 0.0
    assert dice(full, empty) == 0.0


def test_dice_rejects_shape_mismatch():
    with pytest.raises(ValueError):
        dice(np.zeros((2, 2), bool), np.zeros((2, 3), bool))


# --- worst_slice_loss -------------------------------------------------------------------


def _lung_stack(areas_px: list[int], side: int = 40) -> np.ndarray:
    """A (z, y, x) mask whose slice k covers ``areas_px[k]`` pixels."""
    m = np.zeros((len(areas_px), side, side), bool)
    for k, n in enumerate(areas_px):
        m[k].flat[:n] = True
    return m


def test_dropped_slice_detected():
    m = _lung_stack([400, 500, 500, 300, 500, 500, 400])  # slice 3 loses 40 %
    res = worst_slice_loss(m, axis=0, pixel_area_mm2=1.0)
    assert res.index == 3
    assert res.loss == pytest.approx(0.4)


def test_taper_is_not_a_loss():
    # apex to base: a slice smaller than only ONE neighbour is the lung's shape, not a drop
    m = _lung_stack([150, 300, 600, 900, 600, 300, 150])
    res = worst_slice_loss(m, axis=0, pixel_area_mm2=1.0)
    assert res.loss <= 0.0


def test_loss_uses_smaller_neighbour_and_pixel_area():
    # neighbours 1000 and 500 px; the middle 400 px: loss vs the smaller one is 20 %
    m = _lung_stack([1000, 400, 500], side=40)
    assert worst_slice_loss(m, pixel_area_mm2=0.5).loss == pytest.approx(0.2)
    # with 0.1 mm² pixels the 500-px neighbour is 50 mm² < 1 cm²: not judged
    res = worst_slice_loss(m, pixel_area_mm2=0.1)
    assert res.index is None and math.isnan(res.loss)


def test_vanished_slice_and_other_axis():
    m = _lung_stack([500, 500, 0, 500, 500])
    res = worst_slice_loss(m, axis=0)
    assert (res.loss, res.index) == (1.0, 2)
    # same stack seen along the last axis
    res_x = worst_slice_loss(np.moveaxis(m, 0, -1), axis=2)
    assert (res_x.loss, res_x.index) == (1.0, 2)


def test_too_few_slices():
    assert worst_slice_loss(_lung_stack([500, 500])).index is None


# --- slice_auc --------------------------------------------------------------------------


def test_auc_perfect_inverse_and_ties():
    y = np.array([0, 0, 1, 1])
    assert slice_auc([1, 2, 3, 4], y) == 1.0
    assert slice_auc([4, 3, 2, 1], y) == 0.0
    assert slice_auc([5, 5, 5, 5], y) == 0.5  # all tied: chance, whatever the order
    # one positive tied with one negative: that pair counts half -> (1 + 1 + 0.5 + 1) / 4
    assert slice_auc([0, 1, 1, 2], y) == pytest.approx(0.875)


def test_auc_matches_pairwise_definition():
    rng = np.random.default_rng(0)
    s = rng.integers(0, 5, 60).astype(float)  # many ties
    y = rng.random(60) < 0.3
    pos, neg = s[y], s[~y]
    pairs = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    assert slice_auc(s, y) == pytest.approx(pairs / (len(pos) * len(neg)))


def test_auc_include_and_single_class():
    s = np.array([9, 0, 1, 2, 3])
    y = np.array([0, 0, 0, 1, 1])
    include = np.array([False, True, True, True, True])  # slice 0: no lung, high score
    assert slice_auc(s, y) < 1.0
    assert slice_auc(s, y, include=include) == 1.0
    assert math.isnan(slice_auc([1, 2, 3], [0, 0, 0]))


# --- share_inside -----------------------------------------------------------------------


def test_share_inside():
    a = np.zeros((2, 5), bool)
    a[0] = True  # 5 voxels
    b = np.zeros((2, 5), bool)
    b[:, :2] = True  # 2 of a's voxels
    assert share_inside(a, b) == pytest.approx(0.4)
    assert share_inside(b, a) == pytest.approx(0.5)
    assert share_inside(a, np.ones_like(a)) == 1.0
    assert math.isnan(share_inside(np.zeros_like(a), b))


# --- read_segmentation_masks ------------------------------------------------------------


def _ct(shape_zyx, spacing=(0.8, 0.8, 2.0), origin=(-100.0, -50.0, -300.0)) -> sitk.Image:
    img = sitk.Image(*reversed(shape_zyx), sitk.sitkInt16)
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    return img


def write_layered_seg(
    path: Path,
    ct: sitk.Image,
    layers_zyx: list[np.ndarray],
    segments: list[tuple[str, int, int]],
    offset_ijk: tuple[int, int, int] = (0, 0, 0),
    space: str = "left-posterior-superior",
    flat: bool = False,
) -> None:
    """Write a Slicer-style seg.nrrd: layers first, each segment a (layer, label value).

    ``offset_ijk`` places the (smaller) stored grid at that CT voxel, as Slicer does when it
    crops a segmentation to its extent; ``flat`` writes a 3D labelmap (one layer).
    """
    origin = np.asarray(ct.TransformIndexToPhysicalPoint(offset_ijk), float)
    axes = np.diag(ct.GetSpacing()).astype(float)  # row a: world step along axis a
    if space == "right-anterior-superior":
        origin = origin * [-1, -1, 1]
        axes = axes * [-1, -1, 1]
    data = np.stack([np.transpose(lay, (2, 1, 0)) for lay in layers_zyx]).astype(np.uint8)
    header = {"space": space, "space origin": origin, "encoding": "gzip"}
    if flat:
        data = data[0]
        header.update({"kinds": ["domain"] * 3, "space directions": axes})
    else:
        nan_row = np.full((1, 3), np.nan)
        header.update({"kinds": ["list", "domain", "domain", "domain"],
                       "space directions": np.vstack([nan_row, axes])})
    for n, (sid, layer, value) in enumerate(segments):
        header[f"Segment{n}_ID"] = sid
        header[f"Segment{n}_Name"] = sid
        header[f"Segment{n}_Layer"] = str(layer)
        header[f"Segment{n}_LabelValue"] = str(value)
    nrrd.write(str(path), data, header)


def _toy_layers(shape_zyx):
    lab = np.zeros(shape_zyx, np.uint8)
    lab[1:4, 2:5, 1:3] = 1  # right lung
    lab[1:4, 2:5, 4:6] = 2  # left lung
    les = np.zeros(shape_zyx, np.uint8)
    les[2, 3, 1:6] = 1  # a lesion overlapping both lungs: a second layer
    return lab, les


SEGMENTS = [("right_lung", 0, 1), ("left_lung", 0, 2), ("lesion", 1, 1)]


def test_read_seg_same_grid(tmp_path):
    ct = _ct((5, 6, 7))
    lab, les = _toy_layers((5, 6, 7))
    write_layered_seg(tmp_path / "s.seg.nrrd", ct, [lab, les], SEGMENTS)
    masks = read_segmentation_masks(tmp_path / "s.seg.nrrd", ct)
    assert set(masks) == {"right_lung", "left_lung", "lesion"}
    np.testing.assert_array_equal(masks["right_lung"], lab == 1)
    np.testing.assert_array_equal(masks["left_lung"], lab == 2)
    np.testing.assert_array_equal(masks["lesion"], les == 1)
    assert masks["lesion"].dtype == bool and masks["lesion"].shape == (5, 6, 7)


@pytest.mark.parametrize("space", ["left-posterior-superior", "right-anterior-superior"])
@pytest.mark.parametrize("flat", [False, True])
def test_read_seg_cropped_grid_lands_on_ct_voxels(tmp_path, space, flat):
    ct = _ct((12, 10, 14))
    lab, les = _toy_layers((5, 6, 7))
    off = (3, 2, 4)  # i, j, k of the stored grid's first voxel in the CT
    layers = [lab] if flat else [lab, les]
    segs = SEGMENTS[:2] if flat else SEGMENTS
    write_layered_seg(tmp_path / "c.seg.nrrd", ct, layers, segs, off, space=space, flat=flat)
    masks = read_segmentation_masks(tmp_path / "c.seg.nrrd", ct)
    want = np.zeros((12, 10, 14), np.uint8)
    want[off[2]:off[2] + 5, off[1]:off[1] + 6, off[0]:off[0] + 7] = lab
    np.testing.assert_array_equal(masks["right_lung"], want == 1)
    np.testing.assert_array_equal(masks["left_lung"], want == 2)
    if not flat:
        assert np.count_nonzero(masks["lesion"]) == np.count_nonzero(les)


@pytest.mark.realdata
def test_read_seg_on_a0001_grid(tmp_path, a0001_nii, a0001_reference):
    """The reference lungs, written as a cropped layered segmentation on the real A0001
    grid (non-trivial origin and 0.84 x 0.84 x 5 mm voxels), come back on the voxels they
    came from, with Dice 1 -- the mapping the scoreboard relies on."""
    ct = sitk.ReadImage(str(a0001_nii))
    ref = sitk.GetArrayFromImage(sitk.ReadImage(str(a0001_reference)))
    k0, k1, j0, j1, i0, i1 = 20, 44, 150, 400, 60, 460
    crop = ref[k0:k1, j0:j1, i0:i1].astype(np.uint8)
    lesion = np.zeros_like(crop)
    lesion[5:10, 100:140, 250:300] = 1
    write_layered_seg(tmp_path / "a.seg.nrrd", ct, [crop, lesion],
                      [("right_lung", 0, 1), ("left_lung", 0, 2), ("airways", 0, 3),
                       ("lesion", 1, 1)], offset_ijk=(i0, j0, k0))
    masks = read_segmentation_masks(tmp_path / "a.seg.nrrd", ct)
    inside = np.zeros(ref.shape, bool)
    inside[k0:k1, j0:j1, i0:i1] = True
    for sid, value in (("right_lung", 1), ("left_lung", 2), ("airways", 3)):
        assert masks[sid].shape == ref.shape
        assert dice(masks[sid], (ref == value) & inside) == 1.0
    assert np.count_nonzero(masks["lesion"]) == np.count_nonzero(lesion)
