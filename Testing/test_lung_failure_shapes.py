"""Phantoms of the shapes on which classical lung masking failed on real scans it was not
tuned on (issue 16): emphysema and giant bullae (as dark as gas), gas under the lung base,
8 mm slices with sharp-kernel noise, lungs joined at the posterior junction, pleural
effusion, and dense consolidation against the mediastinum.

Each case starts from a phantom with ground truth and changes only what the case is about;
the truth of the lungs is the phantom's (emphysema, bullae and consolidation are lung, gas
and effusion are not).
"""
from __future__ import annotations

import functools

import numpy as np
import pytest
from lung_junction import join_lungs
from scipy import ndimage as ndi

from CovidCTDxLib.evaluation.scan_metrics import dice as dice_score
from CovidCTDxLib.lungs.engine import segment_lungs
from CovidCTDxLib.synthetic.phantom import make_phantom
from CovidCTDxLib.volume import CTVolume

#: Two empty masks score 0 here, not dice_score's default 1: an empty lung is a failure.
dice = functools.partial(dice_score, empty=0.0)


def _mm_distance(ct: CTVolume, centre) -> np.ndarray:
    """Distance (mm) of every voxel (z, y, x) from ``centre`` (voxel indices)."""
    sx, sy, sz = ct.spacing
    z, y, x = np.ogrid[: ct.shape[0], : ct.shape[1], : ct.shape[2]]
    dz, dy, dx = (z - centre[0]) * sz, (y - centre[1]) * sy, (x - centre[2]) * sx
    return np.sqrt(dz**2 + dy**2 + dx**2)


def _lung_point(lung: np.ndarray, height: float):
    """Centre (z, y, x) of a lung's axial section at ``height`` (0 base .. 1 apex)."""
    zs = np.nonzero(lung.any(axis=(1, 2)))[0]
    z = int(round(zs.min() + height * (zs.max() - zs.min())))
    ys, xs = np.nonzero(lung[z])
    return z, float(ys.mean()), float(xs.mean())


def _assert_lungs(m, right, left, target: float = 0.97) -> None:
    assert dice(m.right, right) >= target
    assert dice(m.left, left) >= target


def test_giant_bulla_with_a_wall_stays_lung():
    """A 40 mm bulla (-1000 HU) with a 4 mm wall in the right upper lobe: a region of pure gas
    that the coarse grid may cut off from the lung. It is lung (it lies inside the lung,
    with lung above and below it), not stomach gas: the old gas-share rule dropped it."""
    p = make_phantom(kind="normal", seed=21)
    r = _mm_distance(p.ct, _lung_point(p.right_lung, 0.72))
    inside, wall = (r < 40) & p.right_lung, (r >= 40) & (r < 44) & p.right_lung
    array = p.ct.array.copy()
    array[wall], array[inside] = 20, -1000
    m = segment_lungs(p.ct.with_array(array))
    _assert_lungs(m, p.right_lung, p.left_lung)
    assert m.right[inside].mean() >= 0.95


def test_emphysema_over_half_a_lung_stays_lung():
    """Low-attenuation areas (60 % of the voxels at -960..-1000 HU) over the upper half of
    the left lung, plus three bullae of 20-30 mm: lung as dark as gas."""
    p = make_phantom(kind="normal", seed=22)
    rng = np.random.default_rng(22)
    left = p.left_lung
    zs = np.nonzero(left.any(axis=(1, 2)))[0]
    region = left.copy()
    region[: (zs.min() + zs.max()) // 2] = False
    field = ndi.gaussian_filter(rng.normal(size=p.ct.shape).astype(np.float32), (1, 3, 3))
    laa = region & (field < np.quantile(field[region], 0.6))
    array = p.ct.array.copy()
    array[laa] = rng.uniform(-1000, -960, int(laa.sum())).astype(np.int16)
    for height, radius in ((0.6, 25.0), (0.75, 20.0), (0.85, 20.0)):
        bulla = (_mm_distance(p.ct, _lung_point(left, height)) < radius) & left
        array[bulla] = rng.normal(-1000, 8, int(bulla.sum())).clip(-1024, -985).astype(np.int16)
    assert np.mean(array[left] < -950) > 0.3, "severe emphysema (LAA-950 > 30 %) of the lung"
    m = segment_lungs(p.ct.with_array(array))
    _assert_lungs(m, p.right_lung, p.left_lung)


def _gas_under_left_base(p, touching: bool):
    """A pure-gas stomach bubble (-1000 HU) under the left lung base; ``touching`` lifts it
    to 2 phantom voxels under the lung (a thin diaphragm)."""
    zs = np.nonzero(p.lungs.any(axis=(1, 2)))[0]
    below = p.left_lung[zs.min() : zs.min() + 6].any(axis=0)
    ys, xs = np.nonzero(below)
    cy, cx = float(ys.mean()), float(xs.mean())
    k = zs.min() - (1 if touching else 4)
    r = _mm_distance(p.ct, (k, cy, cx))
    bubble = (r < 25.0) & p.body & ~ndi.binary_dilation(p.lungs, iterations=2)
    bubble[k + 1 :] = False  # flat top: the fundus under the dome
    return bubble


def test_pure_gas_stomach_under_the_lung_base_is_not_lung():
    """Uniform gas, not mottled with food: told from lung by where it lies (under the lung,
    no lung below it), never by how dark it is."""
    p = make_phantom(kind="normal", shape=(140, 160, 160), spacing=(2.2, 2.2, 3.5), seed=8)
    bubble = _gas_under_left_base(p, touching=False)
    assert bubble.sum() * p.ct.voxel_volume_ml > 20
    array = p.ct.array.copy()
    array[bubble] = np.random.default_rng(1).normal(-1000, 20, int(bubble.sum())).astype(np.int16)
    m = segment_lungs(p.ct.with_array(array))
    assert m.lungs[bubble].mean() <= 0.02
    _assert_lungs(m, p.right_lung, p.left_lung)


def test_air_outside_the_rib_cage_is_not_lung():
    """Air trapped in a skin fold of the lateral chest wall (inside the body outline,
    outside the ribs) is no lung, however lung-like its size."""
    p = make_phantom(kind="normal", seed=23)
    z, cy, _ = _lung_point(p.left_lung, 0.5)
    xs = np.nonzero(p.body[z, int(cy)])[0]
    r = _mm_distance(p.ct, (z, cy, xs.max() - 6))
    fold = (r < 30.0) & p.body & ~ndi.binary_dilation(p.lungs, iterations=6)
    array = p.ct.array.copy()
    array[fold] = -1000
    assert fold.sum() * p.ct.voxel_volume_ml > 20
    m = segment_lungs(p.ct.with_array(array))
    assert m.lungs[fold].mean() <= 0.02
    _assert_lungs(m, p.right_lung, p.left_lung)


def _slab_average(p, mm: float) -> tuple:
    """The phantom's CT averaged into ``mm``-thick contiguous slabs, truth by majority."""
    k = int(round(mm / p.ct.spacing[2]))
    n = p.ct.shape[0] // k
    a = p.ct.array[: n * k].astype(np.float32).reshape(n, k, *p.ct.shape[1:]).mean(axis=1)
    origin = p.ct.index_to_lps(np.array([0, 0, (k - 1) / 2.0]))
    spacing = (p.ct.spacing[0], p.ct.spacing[1], p.ct.spacing[2] * k)
    ct = CTVolume(np.round(a).astype(np.int16), spacing, tuple(origin), p.ct.direction)

    def truth(mask):
        return mask[: n * k].reshape(n, k, *mask.shape[1:]).mean(axis=1) >= 0.5

    return ct, truth


def _sharp_noise(ct: CTVolume, sd_hu: float, seed: int) -> CTVolume:
    """A B70f-like kernel: edge overshoot (unsharp masking) plus in-plane high-pass noise."""
    image = ct.array.astype(np.float32)
    out = image + (image - ndi.gaussian_filter(image, (0.0, 1.0, 1.0)))
    noise = np.random.default_rng(seed).normal(size=image.shape).astype(np.float32)
    noise -= ndi.gaussian_filter(noise, (0.0, 1.0, 1.0))
    out += noise * (sd_hu / noise.std())
    return ct.with_array(np.clip(out, -1024, 3071).astype(np.int16))


@pytest.mark.parametrize("mm", [8.0, 10.0])
def test_thick_slices_with_sharp_kernel_noise(mm):
    """8-10 mm slabs of a COVID phantom with 100 HU high-pass noise: no slice dropped."""
    p = make_phantom(kind="covid", severity="moderate", shape=(120, 176, 176),
                     spacing=(2.0, 2.0, 2.0), seed=24)
    ct, truth = _slab_average(p, mm)
    ct = _sharp_noise(ct, 100.0, seed=24)
    m = segment_lungs(ct)
    right, left = truth(p.right_lung), truth(p.left_lung)
    _assert_lungs(m, right, left)
    for mask, want in ((m.right, right), (m.left, left)):
        area, true_area = mask.sum(axis=(1, 2)), want.sum(axis=(1, 2))
        big = true_area >= 0.1 * true_area.max()
        assert (area[big] >= 0.6 * true_area[big]).all(), "no slice loses its lung"


def test_lungs_joined_at_the_posterior_junction_keep_their_sides():
    """Aerated lung bridging the two lungs behind the oesophagus, in front of the spine
    (the posterior junction line), over 30 slices: one air region, two named lungs."""
    p = make_phantom(kind="normal", seed=25)
    # posterior rows, in front of the lungs' most posterior reach; not through the spine
    array, right, left, _ = join_lungs(p, (15, 15), lambda rows: rows[-12:-6], max_hu=300)
    assert ndi.label(right | left)[1] < ndi.label(p.lungs)[1], "the bridge joins the lungs"
    m = segment_lungs(p.ct.with_array(array))
    _assert_lungs(m, right, left)
    assert not (m.right & p.left_lung).any() and not (m.left & p.right_lung).any()


@pytest.mark.xfail(strict=True, reason="known limitation: effusion is water density like "
                   "consolidation; the dense-disease fill takes ~46 % of it into the lung")
def test_pleural_effusion_is_not_lung():
    """A posterior pleural effusion (fluid, 10 HU) that compresses the right lower lobe: the
    fluid lies in the pleural space, outside the lung, and stays out of the mask."""
    p = make_phantom(kind="normal", seed=26)
    right = p.right_lung
    zs = np.nonzero(right.any(axis=(1, 2)))[0]
    ys = np.nonzero(right.any(axis=(0, 2)))[0]
    effusion = right.copy()
    effusion[zs.min() + (zs.max() - zs.min()) // 3 :] = False  # lower third of the lung
    y = np.arange(right.shape[1])[None, :, None]
    effusion &= y > ys.max() - 25.0 / p.ct.spacing[1]  # the 25 mm most posterior (dependent)
    array = p.ct.array.copy()
    array[effusion] = np.random.default_rng(26).normal(10, 20, int(effusion.sum())).astype(np.int16)
    m = segment_lungs(p.ct.with_array(array))
    lung_left_after = right & ~effusion
    assert dice(m.right, lung_left_after) >= 0.95
    assert m.right[effusion].mean() <= 0.35
    assert dice(m.left, p.left_lung) >= 0.97


@pytest.mark.xfail(strict=True, reason="known limitation: the ray-enclosure fill sees the heart "
                   "behind the consolidation and leaves it out (left Dice < 0.97)")
def test_dense_consolidation_against_the_mediastinum_is_filled():
    """Consolidation (40 HU) of the 30 mm of the left lower lobe that lie against the heart and
    the mediastinum, lower half of the lung: lung whose medial wall is soft tissue."""
    p = make_phantom(kind="normal", seed=27)
    left = p.left_lung
    zs = np.nonzero(left.any(axis=(1, 2)))[0]
    cons = np.zeros_like(left)
    for z in range(zs.min(), (zs.min() + zs.max()) // 2):
        for yy in np.nonzero(left[z].any(axis=1))[0]:
            xs = np.nonzero(left[z, yy])[0]
            cons[z, yy, xs[(xs - xs.min()) * p.ct.spacing[0] <= 30.0]] = True  # medial edge
    cons = ndi.binary_opening(cons, iterations=2) & left
    array = p.ct.array.copy()
    array[cons] = np.random.default_rng(27).normal(40, 15, int(cons.sum())).astype(np.int16)
    m = segment_lungs(p.ct.with_array(array))
    _assert_lungs(m, p.right_lung, p.left_lung)


# ------------------------------------------------- the real-scan transformations, on phantoms
@pytest.mark.slow
@pytest.mark.parametrize("kind", ["emphysema-half", "8mm-sharp", "10mm-sharp"])
def test_phantom_through_the_real_scan_transformations(kind):
    """The transformations the real-scan tests use (:mod:`CovidCTDxLib.synthetic.transforms`)
    applied to a phantom, where the truth is known: emphysema over half of the upper lungs
    (fraction 0.5), 8 / 10 mm slabs with 100 HU sharp-kernel noise."""
    from CovidCTDxLib.synthetic import transforms as tr

    p = make_phantom(kind="covid", severity="moderate", seed=28)
    right, left = p.right_lung, p.left_lung
    if kind == "emphysema-half":
        ct = tr.insert_emphysema(p.ct, p.lungs, fraction=0.5, upper_fraction=0.5, seed=28).ct
    else:
        thick = tr.thick_slices(p.ct, float(kind.split("mm")[0]))
        ct = tr.sharp_kernel_noise(thick, 100.0, seed=28)
        right, left = tr.resample_mask_like(right, p.ct, ct), tr.resample_mask_like(left, p.ct, ct)
    _assert_lungs(segment_lungs(ct), right, left)


def test_phantom_with_the_effusion_transformation():
    """A free dependent effusion (posterior crescent under a level surface, 30 mm deep)
    stays out of the lung; the smaller loculated one above is still a known failure."""
    from CovidCTDxLib.synthetic import transforms as tr

    p = make_phantom(kind="normal", seed=29)
    eff = tr.pleural_effusion(p.ct, p.right_lung, depth_mm=30.0, seed=29)
    m = segment_lungs(eff.ct)
    assert m.right[eff.effusion].mean() <= 0.2
    assert dice(m.left, p.left_lung) >= 0.97
