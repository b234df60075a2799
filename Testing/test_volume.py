"""The one canonical orientation frame every stage uses (CovidCTDxLib.volume.CanonicalFrame)."""
from __future__ import annotations

import numpy as np

from CovidCTDxLib.volume import LPS_LEFT, CTVolume


def test_orientation_round_trip():
    ct = CTVolume(np.zeros((4, 5, 6), np.int16), (1, 1, 1), direction=np.array([[0, 0, -1], [1, 0, 0], [0, -1, 0]], float))
    o = ct.canonical_frame()
    a = np.arange(120).reshape(4, 5, 6)
    assert np.array_equal(o.from_canonical(o.to_canonical(a)), a)


def test_canonical_axis_2_points_to_patient_left_on_a_flipped_array():
    """A mark at the patient's left lands at the high end of canonical axis 2 whatever the storage."""
    a = np.zeros((3, 4, 5), np.int16)
    a[:, :, 0] = 1  # first column of the stored array
    for direction, left_at_high_end in ((np.eye(3), False), (np.diag([-1.0, 1.0, 1.0]), True)):
        ct = CTVolume(a, (1, 1, 1), direction=direction)
        canonical = ct.canonical_frame().to_canonical(ct.array)
        assert ct.axis_for(LPS_LEFT)[0] == 2
        assert bool(canonical[:, :, -1].all()) == left_at_high_end
        assert bool(canonical[:, :, 0].all()) != left_at_high_end


def test_spacing_follows_the_canonical_axes():
    direction = np.array([[0, 0, 1], [0, 1, 0], [1, 0, 0]], float)  # stored i runs superior
    ct = CTVolume(np.zeros((6, 5, 4), np.int16), (0.5, 0.7, 2.0), direction=direction)
    assert ct.canonical_frame().spacing_zyx(ct) == (0.5, 0.7, 2.0)
