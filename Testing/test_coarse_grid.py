"""Coarse-grid helpers: the band-only linear paste-back must match a full linear resampling."""
from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from CovidCTDxLib.grid import block_mean, paste_linear, paste_nearest


def _resampled_reference(mask: np.ndarray, shape, factors) -> np.ndarray:
    """Full linear resampling with SimpleITK (coarse centres at i*f + (f-1)/2), > 0.5."""
    f = np.array(factors, float)
    img = sitk.GetImageFromArray(mask.astype(np.float32))
    img.SetSpacing(list(f[::-1]))
    img.SetOrigin(list(((f - 1) / 2.0)[::-1]))
    out = sitk.Resample(img, [int(v) for v in shape[::-1]], sitk.Transform(), sitk.sitkLinear,
                        [0.0, 0.0, 0.0], [1.0, 1.0, 1.0], [1, 0, 0, 0, 1, 0, 0, 0, 1], 0.0, sitk.sitkFloat32)
    return sitk.GetArrayFromImage(out) > 0.5


def _ellipsoid(shape, centre, radii) -> np.ndarray:
    zz, yy, xx = np.indices(shape, dtype=float)
    return ((zz - centre[0]) / radii[0]) ** 2 + ((yy - centre[1]) / radii[1]) ** 2 + ((xx - centre[2]) / radii[2]) ** 2 <= 1.0


@pytest.mark.parametrize("factors, shape", [((2, 4, 4), (61, 122, 118)), ((3, 3, 3), (60, 60, 60)), ((1, 2, 2), (31, 64, 63))])
def test_paste_linear_matches_full_resampling(factors, shape):
    full = _ellipsoid(shape, [s * 0.45 for s in shape], [s * 0.3 for s in shape])
    full |= _ellipsoid(shape, [s * 0.6 for s in shape], [s * 0.1 for s in shape])  # a bump
    coarse = block_mean(full.astype(np.float32), factors) >= 0.5
    got = paste_linear(coarse, shape, factors)
    want = _resampled_reference(coarse, shape, factors)
    assert got.shape == tuple(shape)
    # Only exact 0.5 ties may differ (float rounding of the weights).
    assert (got ^ want).sum() <= 1e-3 * want.sum()
    # And it is a better outline than block replication (at a 2x shrink the two coincide).
    nearest = paste_nearest(coarse, shape, factors)
    if max(factors) > 2:
        assert (got ^ full).sum() < 0.9 * (nearest ^ full).sum()
    else:
        assert (got ^ full).sum() <= (nearest ^ full).sum()


def test_paste_linear_reaches_array_edges_and_handles_empty():
    shape, factors = (20, 40, 40), (2, 4, 4)
    coarse = np.zeros((10, 10, 10), bool)
    assert not paste_linear(coarse, shape, factors).any()
    coarse[:, :, :] = True  # a mask filling the grid stays whole up to the edges
    full = paste_linear(coarse, shape, factors)
    assert full[1:-1, 2:-2, 2:-2].all()
    want = _resampled_reference(coarse, shape, factors)
    assert (full ^ want).sum() == 0
