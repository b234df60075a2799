"""Lung zones: thirds by patient superior coordinate, per-slice peripheral shell in mm."""
from __future__ import annotations

import numpy as np
import pytest

from CovidCTDxLib.errors import LungsNotFoundError
from CovidCTDxLib.lungs.zones import PERIPHERAL_THICKNESS_MM, compute_zones
from CovidCTDxLib.result import LungZones
from CovidCTDxLib.volume import CTVolume


def _box_lungs(direction=None):
    """Two rectangular 'lungs' 60 slices high, 1 mm in-plane, 2 mm slices."""
    shape = (64, 80, 120)
    right = np.zeros(shape, bool)
    left = np.zeros(shape, bool)
    right[2:62, 10:70, 10:55] = True
    left[2:62, 10:70, 65:110] = True
    ct = CTVolume(np.full(shape, -1000, np.int16), (1.0, 1.0, 2.0), direction=np.eye(3) if direction is None else direction)
    return ct, right, left


def test_thirds_follow_patient_superior_axis():
    ct, right, left = _box_lungs()
    z = compute_zones(ct, right, left)
    # identity direction: k increases towards superior, so the top slices are "upper".
    assert np.all(z.labels[55, 20:60, 20:50] == LungZones.ZONE_NAMES.index("right_upper") + 1)
    assert np.all(z.labels[5, 20:60, 70:100] == LungZones.ZONE_NAMES.index("left_lower") + 1)
    counts = np.bincount(z.labels.ravel(), minlength=7)[1:]
    assert counts.min() > 0 and counts.max() / counts.min() < 1.1  # equal thirds
    assert np.array_equal(z.labels > 0, right | left)


def test_thirds_flip_when_z_axis_points_inferior():
    d = np.diag([1.0, 1.0, -1.0])
    ct, right, left = _box_lungs(d)
    z = compute_zones(ct, right, left)
    assert z.labels[55, 30, 30] == LungZones.ZONE_NAMES.index("right_lower") + 1
    assert z.labels[5, 30, 30] == LungZones.ZONE_NAMES.index("right_upper") + 1


def test_peripheral_shell_is_in_plane_mm():
    ct, right, left = _box_lungs()
    z = compute_zones(ct, right, left, peripheral_thickness_mm=10.0)
    row = z.peripheral[30, 40, 10:55]  # 45 voxels across the right lung at 1 mm
    assert row[:10].all() and row[-10:].all() and not row[11:-11].any()
    # per slice: the top and bottom slices are not all periphery (no erosion along z)
    assert not z.peripheral[2, 40, 30]
    assert z.peripheral_thickness_mm == 10.0 == PERIPHERAL_THICKNESS_MM
    assert not (z.peripheral & ~(right | left)).any()


def test_empty_lungs_raise():
    ct, right, left = _box_lungs()
    with pytest.raises(LungsNotFoundError):
        compute_zones(ct, np.zeros_like(right), np.zeros_like(left))
