"""grid's mm-radius morphology on bounding boxes must equal the same operation on the whole
array (the crop is only a speed-up), including at the array faces."""
from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage as ndi

from CovidCTDxLib.grid import (
    ball_mm,
    closing_mm,
    dilate_mm,
    fill_holes_2d,
    inplane_cross,
    opening_mm,
    remove_small_components,
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
