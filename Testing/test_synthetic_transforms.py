"""Transformations of real scans (CovidCTDxLib.synthetic.transforms) on small synthetic CTs.

Why synthetic arrays: each property (slab geometry, noise spectrum, patient side of a
lesion) is checked exactly on a volume small enough for the whole file to run in seconds;
the real-scan behaviour is measured by benchmarks/bench_lung_transforms.py.
"""
from __future__ import annotations

import copy

import numpy as np
import pytest

from CovidCTDxLib.synthetic.transforms import (
    insert_consolidation,
    insert_consolidation_blobs,
    insert_emphysema,
    insert_ground_glass,
    pleural_effusion,
    resample_mask_like,
    sharp_kernel_noise,
    thick_slices,
)
from CovidCTDxLib.volume import LPS_LEFT, LPS_POSTERIOR, LPS_SUPERIOR, CTVolume

SPACING = (3.0, 3.0, 5.0)  # x, y, z mm: a 240 x 192 x 100 mm box around a small chest
SHAPE = (20, 64, 80)


def _chest(seed: int = 0):
    """Soft-tissue body with two ellipsoidal lungs (-850 HU) and vertical 'vessels' (40 HU)
    every 5 voxels through them; identity direction, so array x increases to patient left."""
    rng = np.random.default_rng(seed)
    z, y, x = np.ogrid[: SHAPE[0], : SHAPE[1], : SHAPE[2]]
    body = ((y - 32) / 30.0) ** 2 + ((x - 40) / 38.0) ** 2 <= 1
    arr = np.where(body, 40.0, -1000.0) + rng.normal(0, 10, SHAPE)
    right = ((z - 10) / 8.5) ** 2 + ((y - 32) / 18.0) ** 2 + ((x - 22) / 13.0) ** 2 <= 1
    left = ((z - 10) / 8.5) ** 2 + ((y - 32) / 18.0) ** 2 + ((x - 58) / 13.0) ** 2 <= 1
    lungs = right | left
    arr[lungs] = -850.0 + rng.normal(0, 10, int(lungs.sum()))
    vessels = lungs & (y % 5 == 0) & (x % 5 == 0) & np.ones(SHAPE, bool)
    arr[vessels] = 40.0
    ct = CTVolume(arr.astype(np.float32), SPACING, (-120.0, -96.0, -50.0), np.eye(3))
    return ct, right, left, vessels


def _flip_lr(ct: CTVolume) -> CTVolume:
    """The same patient stored with array x reversed (x now runs to patient right)."""
    direction = ct.direction.copy()
    direction[:, 0] *= -1
    origin = ct.index_to_lps(np.array([ct.shape[2] - 1, 0, 0]))
    return CTVolume(ct.array[:, :, ::-1].copy(), ct.spacing, tuple(origin), direction)


def _flip_z(ct: CTVolume) -> CTVolume:
    """The same patient stored feet-first (array z runs towards the feet)."""
    direction = ct.direction.copy()
    direction[:, 2] *= -1
    origin = ct.index_to_lps(np.array([0, 0, ct.shape[0] - 1]))
    return CTVolume(ct.array[::-1].copy(), ct.spacing, tuple(origin), direction)


def _coord(ct: CTVolume, axis: np.ndarray) -> np.ndarray:
    return np.broadcast_to(ct.lps_coordinate(axis), ct.shape)


# --------------------------------------------------------------------------- thick slices
def test_thick_slices_geometry_and_slab_means():
    rng = np.random.default_rng(1)
    ct = CTVolume(rng.normal(0, 100, (20, 8, 8)).astype(np.float32), (1.0, 1.0, 2.0),
                  (5.0, 6.0, 7.0))
    thick = thick_slices(ct, 8.0)
    assert thick.shape == (5, 8, 8)
    assert thick.spacing == (1.0, 1.0, 8.0)
    # Slab 0 covers source slices 0-3 (z 6..14 mm): its centre is 3 mm above slice 0's.
    assert thick.origin == pytest.approx((5.0, 6.0, 10.0))
    for j in range(5):
        assert np.allclose(thick.array[j], ct.array[4 * j: 4 * j + 4].mean(axis=0), atol=1e-4)
    assert thick.metadata["transforms"] == ["thick_slices 8 mm"]


def test_thick_slices_non_integer_ratio_and_reversed_slice_axis():
    rng = np.random.default_rng(2)
    direction = np.diag([1.0, 1.0, -1.0])  # feet-first stack: k runs to the feet
    ct = CTVolume(rng.normal(0, 100, (16, 4, 4)).astype(np.float32), (1.0, 1.0, 5.0),
                  (0.0, 0.0, 0.0), direction)
    thick = thick_slices(ct, 8.0)
    assert thick.shape[0] == 10  # 80 mm of slices -> 10 whole slabs
    # Slab 0 covers [-2.5, 5.5] mm along k: all of slice 0 (5 mm) and 3 mm of slice 1.
    assert np.allclose(thick.array[0], (5 * ct.array[0] + 3 * ct.array[1]) / 8, atol=1e-4)
    # Its centre lies 1.5 mm along k, i.e. 1.5 mm towards the feet.
    assert thick.origin == pytest.approx((0.0, 0.0, -1.5))
    centre_3 = thick.index_to_lps(np.array([0, 0, 3]))
    assert centre_3[2] == pytest.approx(-(-2.5 + 3.5 * 8.0))


def test_resample_mask_like_uses_half_slab_rule():
    ct = CTVolume(np.zeros((20, 4, 4), np.float32), (1.0, 1.0, 2.0))
    thick = thick_slices(ct, 8.0)
    mask = np.zeros(ct.shape, bool)
    mask[:6] = True  # slab 0 full, slab 1 half covered
    out = resample_mask_like(mask, ct, thick)
    assert out.shape == thick.shape
    assert out[:2].all() and not out[2:].any()
    mask[5] = False  # slab 1 now a quarter covered
    assert resample_mask_like(mask, ct, thick)[1].sum() == 0
    same = resample_mask_like(mask, ct, ct)
    assert np.array_equal(same, mask)
    other = CTVolume(np.zeros((5, 4, 4), np.float32), (2.0, 1.0, 8.0))
    with pytest.raises(ValueError):
        resample_mask_like(mask, ct, other)


# --------------------------------------------------------------------------- sharp kernel
def test_sharp_kernel_noise_std_and_high_pass_spectrum():
    flat = CTVolume(np.zeros((8, 128, 128), np.float32), (0.7, 0.7, 2.0))
    out = sharp_kernel_noise(flat, noise_hu=80.0, seed=3)
    noise = out.array  # edge enhancement of a flat image is zero: this is the added noise
    assert 60.0 <= noise.std() <= 120.0
    assert noise.std() == pytest.approx(80.0, rel=0.05)
    power = (np.abs(np.fft.fft2(noise, axes=(1, 2))) ** 2).mean(axis=0)
    f = np.hypot(*np.meshgrid(np.fft.fftfreq(128, 0.7), np.fft.fftfreq(128, 0.7)))
    nyquist = 0.5 / 0.7
    lower = power[(f > 0) & (f <= nyquist / 2)].mean()
    upper = power[(f > nyquist / 2) & (f <= nyquist)].mean()
    assert upper > 1.5 * lower  # ramp x roll-off: ~1.9 between the two bands' means
    rings = [power[(f > lo) & (f <= lo + nyquist / 4)].mean() for lo in np.arange(4) * nyquist / 4]
    assert all(a < b for a, b in zip(rings, rings[1:]))  # rising up to Nyquist
    # Slices are reconstructed independently: no correlation between neighbours.
    r = np.corrcoef(noise[:-1].ravel(), noise[1:].ravel())[0, 1]
    assert abs(r) < 0.05
    again = sharp_kernel_noise(flat, noise_hu=80.0, seed=3)
    assert np.array_equal(again.array, out.array)


def test_sharp_kernel_enhances_edges_in_plane_only():
    arr = np.full((6, 64, 64), -850.0, np.float32)
    arr[:, :, 32:] = 40.0  # a lung / chest-wall edge
    ct = CTVolume(arr, (0.7, 0.7, 2.0))
    out = sharp_kernel_noise(ct, noise_hu=0.0, seed=0).array
    assert out.max() > 40.0 + 100.0  # overshoot on the tissue side of the edge
    assert out.min() < -850.0 - 100.0
    assert np.allclose(out[0], out[5])  # nothing is mixed between slices


# --------------------------------------------------------------------------- emphysema
@pytest.mark.parametrize("feet_first", [False, True])
def test_emphysema_is_low_attenuation_in_the_upper_lung(feet_first):
    ct, right, left, vessels = _chest()
    lungs = right | left
    if feet_first:
        ct, lungs, vessels = _flip_z(ct), lungs[::-1], vessels[::-1]
    out, mask = insert_emphysema(ct, lungs, fraction=0.4, upper_fraction=0.4, seed=4)
    assert mask.any() and not (mask & ~lungs).any()
    values = out.array[mask]
    assert values.min() >= -1000.0 and values.max() <= -950.0
    sup = _coord(ct, LPS_SUPERIOR)
    top, bottom = sup[lungs].max(), sup[lungs].min()
    assert sup[mask].min() >= top - 0.4 * (top - bottom) - 1e-3
    region = lungs & (sup >= top - 0.4 * (top - bottom) - 1e-3)
    assert 0.25 <= mask.sum() / region.sum() <= 0.45
    # Vessels outside the bullae survive: most vessel voxels in the region are unchanged.
    kept = np.isclose(out.array[vessels & region], ct.array[vessels & region])
    assert kept.mean() > 0.6


# --------------------------------------------------------------------------- consolidation
@pytest.mark.parametrize("flipped", [False, True])
def test_consolidation_touches_the_medial_edge_of_the_left_lung(flipped):
    ct, right, left, _ = _chest()
    lungs = right | left
    if flipped:
        ct, lungs, left = _flip_lr(ct), lungs[:, :, ::-1], left[:, :, ::-1]
    out, mask = insert_consolidation(ct, lungs, side="left", volume_ml=20.0, seed=5)
    assert mask.sum() * ct.voxel_volume_ml == pytest.approx(20.0, rel=0.3)
    assert not (mask & ~left).any()  # the patient's left lung, whatever the storage
    lr = _coord(ct, LPS_LEFT)
    assert lr[mask].mean() < lr[left].mean() - 10.0  # medial = towards patient right
    # Touches the medial boundary: a voxel whose neighbour towards patient right is not lung.
    step = -1 if not flipped else 1  # array x step towards patient right
    neighbour = np.roll(left, -step, axis=2)
    assert (mask & ~neighbour).any()
    assert 20.0 <= out.array[mask].mean() <= 60.0


def test_dependent_consolidation_lines_the_posterior_lower_lung():
    ct, right, left, _ = _chest()
    out, mask = insert_consolidation(ct, right, against="dependent", volume_ml=20.0, seed=6)
    assert not (mask & ~right).any()
    post, sup = _coord(ct, LPS_POSTERIOR), _coord(ct, LPS_SUPERIOR)
    assert post[mask].mean() > post[right].mean() + 10.0
    assert sup[mask].mean() < sup[right].mean()


def test_consolidation_rejects_unknown_wall():
    ct, right, _, _ = _chest()
    with pytest.raises(ValueError):
        insert_consolidation(ct, right, against="diaphragm")


# --------------------------------------------------------------------------- ground glass
def test_ground_glass_keeps_vessels_running_through():
    ct, right, left, vessels = _chest()
    lungs = right | left
    out, mask = insert_ground_glass(ct, lungs, n_blobs=3, radius_mm=(12.0, 18.0), seed=7)
    assert mask.sum() > 50 and not (mask & ~lungs).any()
    assert out.array[mask].min() >= -750.0
    through = mask & vessels
    assert through.any()
    assert np.array_equal(out.array[through], ct.array[through])  # vessels stay bright
    parenchyma = mask & ~vessels
    assert np.all(out.array[parenchyma] > ct.array[parenchyma])
    outside = ~lungs
    assert np.array_equal(out.array[outside], ct.array[outside])


def test_consolidation_blobs_are_dense():
    ct, right, left, vessels = _chest()
    out, mask = insert_consolidation_blobs(ct, right | left, n_blobs=2, seed=8)
    assert mask.any()
    assert out.array[mask & ~vessels].min() >= -100.0
    assert out.array[mask & ~vessels].max() <= 50.0


# --------------------------------------------------------------------------- effusion
def test_effusion_lies_posterior_and_leaves_the_lung():
    ct, right, left, _ = _chest()
    lungs = right | left
    out, lung, fluid = pleural_effusion(ct, lungs, depth_mm=15.0, seed=9)
    assert fluid.any() and np.array_equal(lung, lungs & ~fluid)
    post = _coord(ct, LPS_POSTERIOR)
    assert post[fluid].min() >= post[lungs].max() - 15.0 - 1e-3
    assert post[fluid].mean() > post[lung].mean() + 20.0
    values = out.array[fluid]
    assert values.min() >= 0.0 and values.max() <= 20.0


# --------------------------------------------------------------------------- purity
def test_inputs_are_not_mutated_and_provenance_is_recorded():
    ct, right, left, _ = _chest()
    lungs = right | left
    before = copy.deepcopy(ct)
    lungs_before = lungs.copy()
    results = [
        thick_slices(ct, 10.0),
        sharp_kernel_noise(ct, 60.0, seed=0),
        insert_emphysema(ct, lungs, seed=0).ct,
        insert_consolidation(ct, lungs, side="right", volume_ml=10.0, seed=0).ct,
        insert_ground_glass(ct, lungs, seed=0).ct,
        insert_consolidation_blobs(ct, lungs, seed=0).ct,
        pleural_effusion(ct, lungs, 10.0).ct,
    ]
    assert np.array_equal(ct.array, before.array) and np.array_equal(lungs, lungs_before)
    assert ct.metadata == before.metadata and ct.origin == before.origin
    for r in results:
        assert r.array is not ct.array and len(r.metadata["transforms"]) == 1
