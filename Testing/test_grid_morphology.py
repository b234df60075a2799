"""grid's morphology: on bounding boxes it must equal the same operation on the whole array (the
crop is only a speed-up), including at the array faces; distance-map variants are Euclidean in mm."""
from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage as ndi

from CovidCTDxLib.grid import (
    ball_kernel,
    ball_mm,
    closing_distance_mm,
    closing_mm,
    components,
    components_26,
    dilate,
    dilate_mm,
    disc_mm,
    fill_holes_2d,
    inplane_cross,
    inside_distance_mm,
    opening_inplane_mm,
    opening_mm,
    remove_small_components,
    robust_sd,
    within_mm,
)

SPACING = (2.0, 0.8, 0.8)


@pytest.fixture(scope="module")
def mask():
    rng = np.random.default_rng(3)
    m = ndi.gaussian_filter(rng.random((30, 60, 70)), 2.0) > 0.52
    m[:, :, :4] = False  # part of the array empty, so the bounding box is a real crop
    m[0, 20:40, 20:40] = True  # touching the array face
    return m


@pytest.mark.parametrize("radius_mm", [1.0, 2.5, 4.0])
def test_dilate_and_opening_match_whole_array(mask, radius_mm):
    ball = ball_mm(SPACING, radius_mm)
    assert np.array_equal(dilate_mm(mask, SPACING, radius_mm), ndi.binary_dilation(mask, structure=ball))
    full = ndi.binary_dilation(ndi.binary_erosion(mask, structure=ball, border_value=1), structure=ball) & mask
    assert np.array_equal(opening_mm(mask, SPACING, radius_mm), full)


def test_closing_contains_mask_and_matches_padded_whole_array(mask):
    ball = ball_mm(SPACING, 2.0)
    r = (np.array(ball.shape) - 1) // 2
    pad = [(int(v), int(v)) for v in r]
    p = np.pad(mask, pad)
    full = ndi.binary_erosion(ndi.binary_dilation(p, structure=ball), structure=ball)
    full = full[tuple(slice(a, a + n) for (a, _), n in zip(pad, mask.shape))] | mask
    out = closing_mm(mask, SPACING, 2.0)
    assert np.array_equal(out, full) and not (mask & ~out).any()


def test_fill_holes_is_per_slice_and_small_components_go(mask):
    ring = np.zeros((3, 20, 20), bool)
    ring[1, 5:15, 5:15] = True
    ring[1, 7:13, 7:13] = False
    filled = fill_holes_2d(ring)
    assert filled[1, 10, 10] and not filled[0].any() and not filled[2].any()
    assert np.array_equal(fill_holes_2d(mask), ndi.binary_fill_holes(mask, structure=inplane_cross()))
    speck = mask.copy()
    speck[15, 2, 1] = True  # isolated one-voxel component
    kept = remove_small_components(speck, 2)
    assert not kept[15, 2, 1] and np.array_equal(kept, remove_small_components(mask, 2))
    assert remove_small_components(np.zeros((4, 4, 4), bool), 2).sum() == 0



def test_dilate_equals_simpleitk_ball_dilation(mask):
    """The lung engine used SimpleITK's BinaryDilate; scipy with SimpleITK's ball is the same."""
    img = sitk.GetImageFromArray(mask.astype(np.uint8))
    for r in ([1, 1, 1], [2, 2, 1]):
        expected = sitk.GetArrayFromImage(sitk.BinaryDilate(img, r, sitk.sitkBall)).astype(bool)
        assert np.array_equal(dilate(mask, ball_kernel(r)), expected)


@pytest.mark.parametrize("min_radius_vox", [0, 1])
def test_inplane_opening_matches_whole_array_and_keeps_slices_apart(mask, min_radius_vox):
    disc = disc_mm(SPACING, 2.0, min_radius_vox)
    assert disc.shape[0] == 1  # no reach across slices
    expected = ndi.binary_opening(mask, structure=disc, border_value=0)
    assert np.array_equal(opening_inplane_mm(mask, SPACING, 2.0, min_radius_vox), expected)
    # a radius below half a voxel opens nothing unless a minimum radius is asked for
    tiny = opening_inplane_mm(mask, SPACING, 0.1, min_radius_vox)
    assert np.array_equal(tiny, mask) == (min_radius_vox == 0)


def test_distance_morphology_is_euclidean_in_mm():
    m = np.zeros((21, 41, 41), bool)
    m[10, 20, 20] = True
    spacing = (2.0, 0.5, 0.5)
    zz, yy, xx = np.nonzero(within_mm(m, spacing, 3.0))
    d = np.sqrt(((zz - 10) * 2.0) ** 2 + ((yy - 20) * 0.5) ** 2 + ((xx - 20) * 0.5) ** 2)
    assert d.max() <= 3.0 and len(d) == np.count_nonzero(
        np.sqrt(((np.arange(21)[:, None, None] - 10) * 2.0) ** 2 + ((np.arange(41)[None, :, None] - 20) * 0.5) ** 2
                + ((np.arange(41)[None, None, :] - 20) * 0.5) ** 2) <= 3.0)
    block = np.zeros((21, 41, 41), bool)
    block[5:16, 10:31, 10:31] = True
    depth = inside_distance_mm(block, spacing)
    assert depth[~block].max() == 0.0 and depth[10, 20, 20] == pytest.approx(5.0, abs=0.01)  # to the outer voxel layer, 10 x 0.5 mm


def test_distance_closing_fills_a_gap_narrower_than_the_ball_only(mask):
    spacing = (1.0, 1.0, 1.0)
    two = np.zeros((20, 40, 60), bool)
    two[5:15, 10:30, 10:28] = True
    two[5:15, 10:30, 31:50] = True  # a 3 mm gap
    closed = closing_distance_mm(two, spacing, 3.0)
    assert closed[10, 20, 28:31].all() and (closed | ~two).all()
    wide = two.copy()
    wide[:, :, 28:38] = False  # a 10 mm gap stays open under a 3 mm ball
    assert not closing_distance_mm(wide, spacing, 3.0)[10, 20, 30:36].any()
    assert np.array_equal(closing_distance_mm(np.zeros_like(mask), SPACING, 3.0), np.zeros_like(mask))


def test_components_are_face_connected_and_sorted_by_size():
    m = np.zeros((5, 10, 10), bool)
    m[1, 1:3, 1:3] = True  # 4 voxels
    m[3, 5:9, 5:9] = True  # 16 voxels
    m[2, 3, 3] = True  # touches the first only by an edge: its own component
    labels, sizes = components(m)
    assert list(sizes) == [m.size - 21, 16, 4, 1]
    assert labels[3, 6, 6] == 1 and labels[1, 1, 1] == 2 and labels[2, 3, 3] == 3


def test_robust_sd_ignores_a_bright_minority():
    """Noise of 20 HU with 10 % vessel voxels at +400 HU: the plain SD counts the vessels
    (> 100 HU), the robust SD stays within 15 % of the noise (a 10 % minority moves the
    median and the MAD by a few HU; the plain SD is 6x off)."""
    rng = np.random.default_rng(0)
    values = rng.normal(-850.0, 20.0, 20000)
    values[:2000] += 400.0
    assert np.std(values) > 100.0
    assert abs(robust_sd(values) - 20.0) < 3.0


def test_components_26_joins_corner_neighbours():
    """Two voxels meeting only at a corner are one 26-connected component (a margin on
    thick slices), but two components with a gap stay apart."""
    m = np.zeros((4, 4, 4), bool)
    m[0, 0, 0] = m[1, 1, 1] = True
    m[3, 3, 3] = True
    labels, n = components_26(m)
    assert n == 2
    assert labels[0, 0, 0] == labels[1, 1, 1] != labels[3, 3, 3]
