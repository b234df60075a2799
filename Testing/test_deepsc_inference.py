"""DeepSC-COVID inference on whole CTs: geometry of the outputs, orientation, provenance."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from CovidCTDxLib.deepsc.inference import plan_axis, prepare_scan, run_deepsc, window_starts
from CovidCTDxLib.errors import LungsNotFoundError, WeightsError
from CovidCTDxLib.models.deepsc import ARCHITECTURE, ARCHITECTURE_VERSION, DeepSCConfig, DeepSCCovid
from CovidCTDxLib.result import CLASS_KEYS, NOT_FOR_DIAGNOSIS, LungMasks
from CovidCTDxLib.volume import CTVolume
from CovidCTDxLib.weights import ModelCard, save_weights

CFG = DeepSCConfig(width=8, patch_size=(8, 32, 32), cls_slices=16, cls_size=32, spacing=(5.0, 5.0, 8.0))


@pytest.fixture(scope="module")
def random_weights(tmp_path_factory):
    torch.manual_seed(0)
    model = DeepSCCovid(CFG)
    path = tmp_path_factory.mktemp("w") / "deepsc_test.safetensors"
    card = ModelCard(ARCHITECTURE, ARCHITECTURE_VERSION, CFG.to_dict(), "random init", synthetic=True)
    save_weights(path, model.state_dict(), card)
    return path


@pytest.fixture(scope="module")
def small_ct():
    from CovidCTDxLib.synthetic.phantom import make_phantom

    p = make_phantom("covid", "moderate", shape=(24, 72, 80), spacing=(4.5, 4.5, 8.0), seed=5)
    return p.ct, LungMasks(p.right_lung, p.left_lung, p.airways, p.body)


def test_window_planner_covers_every_voxel():
    for n, p in [(100, 16), (115, 96), (150, 96), (40, 16), (16, 16), (301, 64)]:
        for scale in (1.0, 2.0):
            size, starts = plan_axis(n, p, 0.25, scale)
            covered = np.zeros(max(n, size), bool)
            for s in starts:
                covered[s : s + size] = True
            assert covered[:n].all() and size % 8 == 0 and size >= p
            assert size <= max(p, int(p * scale) // 8 * 8) or len(starts) == 1
    assert window_starts(100, 16, 0.25)[-1] == 84


def test_outputs_live_on_the_ct_grid(random_weights, small_ct):
    ct, lungs = small_ct
    seen = []
    out = run_deepsc(ct, lungs, random_weights, progress=lambda f, m: seen.append(f))
    assert out.lesion_probability.shape == ct.shape and out.lesion_probability.dtype == np.float32
    assert out.evidence.shape == ct.shape and out.evidence.dtype == np.float32
    assert out.lesion_mask.dtype == bool and out.lesion_mask.shape == ct.shape
    assert 0 <= out.lesion_probability.min() and out.lesion_probability.max() <= 1
    assert 0 <= out.evidence.min() and out.evidence.max() <= 1 + 1e-6
    # Nothing outside the lungs.
    assert not out.lesion_probability[~lungs.lungs].any() and not out.evidence[~lungs.lungs].any()
    assert list(out.probabilities) == list(CLASS_KEYS) and sum(out.probabilities.values()) == pytest.approx(1.0, abs=1e-5)
    assert out.provenance.not_for_diagnosis and out.provenance.to_dict()["label"] == NOT_FOR_DIAGNOSIS
    assert seen[0] == 0.0 and seen[-1] == 1.0 and seen == sorted(seen)


def test_flipped_scan_gives_flipped_outputs(random_weights, small_ct):
    """The model works in a canonical patient frame, so a scan stored flipped along x and
    y (other direction matrix) must give the same answer, flipped back onto its grid."""
    ct, lungs = small_ct
    ref = run_deepsc(ct, lungs, random_weights)
    flipped = CTVolume(
        np.ascontiguousarray(ct.array[:, ::-1, ::-1]), ct.spacing, ct.origin, ct.direction @ np.diag([-1.0, -1.0, 1.0])
    )
    fl = LungMasks(*(np.ascontiguousarray(a[:, ::-1, ::-1]) for a in (lungs.right, lungs.left, lungs.airways, lungs.body)))
    out = run_deepsc(flipped, fl, random_weights)
    assert np.allclose(out.lesion_probability[:, ::-1, ::-1], ref.lesion_probability, atol=1e-4)
    for k in CLASS_KEYS:
        assert out.probabilities[k] == pytest.approx(ref.probabilities[k], abs=1e-5)


def test_no_lungs_is_a_clear_error(random_weights, small_ct):
    ct, lungs = small_ct
    empty = np.zeros_like(lungs.right)
    with pytest.raises(LungsNotFoundError):
        run_deepsc(ct, LungMasks(empty, empty, empty, lungs.body), random_weights)


def test_weights_for_another_architecture_are_refused(tmp_path, small_ct):
    path = tmp_path / "racnet.safetensors"
    save_weights(path, {"w": torch.zeros(2)}, ModelCard("racnet", "1", {}, "x", synthetic=True))
    with pytest.raises(WeightsError, match="racnet"):
        run_deepsc(*small_ct, path)


def test_prepare_scan_windows_and_masks():
    hu = np.full((10, 40, 40), -1000, np.int16)
    hu[:, 10:30, 10:30] = -800
    hu[4:6, 15:20, 15:20] = 150
    lung = hu > -900
    scan = prepare_scan(hu, lung, (8.0, 5.0, 5.0), CFG)
    v = scan.volume
    assert v.shape[0] >= 8 and v.shape[1] >= 32 and float(v.max()) <= 1 and float(v.min()) >= 0
    assert float(v[~scan.lung].abs().max()) == 0
    assert float(v.max()) == pytest.approx((150 + 1400) / 1600, abs=0.02)
