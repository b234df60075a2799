"""Lung masking on the acquisition conditions a real scan brings: arms in the field of view,
low-dose noise, a sharp reconstruction kernel, a rotated patient frame, lungs touching at
the anterior junction, and a head CT (which has no lungs at all).

Each case starts from a phantom with ground truth and changes only what the case is about.
"""
from __future__ import annotations

import functools

import numpy as np
import pytest
from lung_junction import join_lungs
from scipy import ndimage as ndi

from CovidCTDxLib.errors import LungsNotFoundError
from CovidCTDxLib.evaluation.scan_metrics import dice as dice_score
from CovidCTDxLib.lungs.engine import segment_lungs
from CovidCTDxLib.synthetic.phantom import make_phantom
from CovidCTDxLib.volume import CTVolume

#: Two empty masks score 0 here, not dice_score's default 1: an empty lung is a failure.
dice = functools.partial(dice_score, empty=0.0)


def test_arms_beside_the_chest_are_not_lung():
    """Arms down beside the chest (soft tissue with a humerus), pressed against the chest
    wall so that they join the body: the lungs stay the same and nothing in the arms or the
    air around them becomes lung."""
    p = make_phantom(kind="covid", severity="moderate", shape=(96, 192, 240), seed=11)
    array = p.ct.array.copy()
    sx, sy, _ = p.ct.spacing
    outline = p.body.any(axis=0)
    ys, xs = np.nonzero(outline)
    yy, xx = np.mgrid[: outline.shape[0], : outline.shape[1]]
    arms = np.zeros_like(outline)
    for edge, side in ((xs.min(), -1), (xs.max(), 1)):
        cx, cy = edge + side * 24.0 / sx, ys.mean()  # 28 mm half-width: overlaps the chest wall
        arm = ((xx - cx) * sx / 28.0) ** 2 + ((yy - cy) * sy / 45.0) ** 2 <= 1.0
        humerus = ((xx - cx) * sx / 9.0) ** 2 + ((yy - cy) * sy / 9.0) ** 2 <= 1.0
        array[:, arm & ~outline] = 40
        array[:, humerus] = 700
        arms |= arm & ~outline
    assert arms.sum() * sx * sy > 2 * 3000, "each arm is at least 30 cm^2 in the slice"
    assert (ndi.binary_dilation(arms) & outline).any(), "the arms touch the chest"
    m = segment_lungs(p.ct.with_array(array))
    assert dice(m.right, p.right_lung) >= 0.97
    assert dice(m.left, p.left_lung) >= 0.97
    assert not m.lungs[:, arms].any()


def test_low_dose_noise():
    """Noise of 80 HU standard deviation (a low-dose scan; the phantoms default to 20)."""
    p = make_phantom(kind="covid", severity="moderate", seed=12, noise_hu=80.0)
    lung_sd = float(np.std(p.ct.array[p.lungs & (p.lesion == 0)]))
    assert lung_sd > 60.0, "the noise is really there"
    m = segment_lungs(p.ct)
    assert dice(m.right, p.right_lung) >= 0.97
    assert dice(m.left, p.left_lung) >= 0.97


def test_sharp_reconstruction_kernel():
    """An edge-enhancing (bone/lung) kernel: unsharp masking with overshoot at every edge,
    so the pleura gets a dark halo in the lung and a bright one in the chest wall."""
    p = make_phantom(kind="covid", severity="moderate", seed=13)
    image = p.ct.array.astype(np.float32)
    sharp = image + 1.5 * (image - ndi.gaussian_filter(image, (0.0, 1.0, 1.0)))
    array = np.clip(sharp, -1024, 3071).astype(np.int16)
    assert np.abs(array.astype(np.float32) - image).max() > 300, "the overshoot is really there"
    m = segment_lungs(p.ct.with_array(array))
    assert dice(m.right, p.right_lung) >= 0.97
    assert dice(m.left, p.left_lung) >= 0.97


@pytest.mark.parametrize("degrees", [20.0, 170.0])
def test_rotated_patient_frame_keeps_patient_sides(degrees):
    """The same array with its direction matrix rotated about the patient's long axis: at
    170° the array's right-hand lung is the patient's right lung, whatever its index."""
    p = make_phantom(kind="covid", severity="moderate", seed=14)
    t = np.deg2rad(degrees)
    rotation = np.array([[np.cos(t), -np.sin(t), 0.0], [np.sin(t), np.cos(t), 0.0], [0.0, 0.0, 1.0]])
    ct = CTVolume(p.ct.array, p.ct.spacing, p.ct.origin, rotation @ p.ct.direction)
    m = segment_lungs(ct)
    swapped = degrees > 90.0
    want_right, want_left = (p.left_lung, p.right_lung) if swapped else (p.right_lung, p.left_lung)
    assert dice(m.right, want_right) >= 0.97
    assert dice(m.left, want_left) >= 0.97


def test_lungs_touching_at_the_anterior_junction_are_split():
    """Aerated lung bridging the two lungs in front of the mediastinum (a thin anterior
    junction line that the scan does not resolve) makes them one air region."""
    p = make_phantom(kind="normal", seed=15)
    array, right, left, mid = join_lungs(p, (8, 9), lambda rows: rows[:5])  # most anterior rows
    x = np.arange(array.shape[2])[None, None, :]
    assert ndi.label(right | left)[1] == ndi.label(p.lungs)[1] - 1, "the bridge joins the lungs"
    m = segment_lungs(p.ct.with_array(array))
    assert dice(m.right, right) >= 0.97
    assert dice(m.left, left) >= 0.97
    assert not (m.right & (x > mid + 3)).any()
    assert not (m.left & (x < mid - 3)).any()


def test_head_ct_raises():
    """Skull, brain and a paranasal sinus: air in the body, but far too little for lungs."""
    z, y, x = np.mgrid[0:60, 0:128, 0:128]
    spacing = (2.0, 2.0, 3.0)  # x, y, z
    r = np.sqrt(((x - 64) * 2.0 / 75) ** 2 + ((y - 64) * 2.0 / 90) ** 2 + ((z - 30) * 3.0 / 80) ** 2)
    array = np.full(z.shape, -1000, np.int16)
    array[r <= 1.0] = 700  # skull
    array[r <= 0.93] = 35  # brain
    sinus = ((x - 64) * 2.0 / 20) ** 2 + ((y - 20) * 2.0 / 12) ** 2 + ((z - 22) * 3.0 / 15) ** 2 <= 1.0
    array[sinus] = -990
    with pytest.raises(LungsNotFoundError, match="head"):
        segment_lungs(CTVolume(array, spacing))
