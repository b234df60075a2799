"""DeepSC-COVID's out-of-distribution check (deepsc/ood.py) and how the front doors show it.

What is required (issue 19): the demo weights carry feature statistics verified like the
weights; at most 5 % of in-distribution phantoms (product path: pipeline lung masks, the
CLI default and clinical grids) are flagged; real scans from other scanners and degenerate
inputs (noise in the lungs, an 8×8×8 volume) are flagged; a flagged scan leads with
"not assessable (out of distribution)" in results.json, the CLI line and the report.
"""
from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from CovidCTDxLib.app.cli import main
from CovidCTDxLib.deepsc.inference import load_model, load_statistics, run_deepsc
from CovidCTDxLib.deepsc.ood import PREFIX, FeatureStatistics, calibrate_threshold, fit_statistics, ledoit_wolf
from CovidCTDxLib.errors import WeightsError
from CovidCTDxLib.io.readers import read_ct
from CovidCTDxLib.result import CLASS_KEYS, NOT_ASSESSABLE, LungMasks
from CovidCTDxLib.synthetic.geometries import product_cases
from CovidCTDxLib.synthetic.phantom import make_phantom
from CovidCTDxLib.training.product_path import run_cases, run_ct
from CovidCTDxLib.volume import CTVolume
from CovidCTDxLib.weights import load_weights

WEIGHTS = Path(__file__).resolve().parents[1] / "Resources" / "weights"
DEMO = WEIGHTS / "deepsc_demo.safetensors"
SAMPLE_A0001 = Path(__file__).resolve().parents[1] / "Resources" / "SampleData" / "A0001_chest_ct.nii.gz"


@pytest.fixture(scope="module")
def demo():
    return load_weights(DEMO, "deepsc")


@pytest.fixture(scope="module")
def racnet():
    return load_weights(WEIGHTS / "racnet_demo.safetensors", "racnet")


# --------------------------------------------------------------------------- the statistics themselves
class _GaussianClasses:
    """Three classes with different means and a shared, strongly correlated covariance."""

    def __init__(self, rng: np.random.Generator, features: int = 40) -> None:
        self.rng = rng
        self.mix = rng.normal(size=(features, features)) / np.sqrt(features)
        self.means = rng.normal(scale=3.0, size=(3, features))

    def draw(self, n_per_class: int):
        labels = np.repeat(np.arange(3), n_per_class)
        noise = self.rng.normal(size=(len(labels), self.means.shape[1])) @ self.mix
        return self.means[labels] + noise, labels


def test_ledoit_wolf_is_invertible_with_fewer_scans_than_features():
    """45 scans of 112 features: the sample covariance is singular, the shrunk one is not."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(45, 112))
    x -= x.mean(axis=0)
    cov = ledoit_wolf(x)
    assert np.linalg.matrix_rank(x.T @ x) < 112
    assert np.linalg.eigvalsh(cov).min() > 0


def test_threshold_flags_few_new_in_distribution_points_and_every_shifted_one():
    source = _GaussianClasses(np.random.default_rng(1))
    stats = fit_statistics(*source.draw(15), 3)
    stats.threshold = calibrate_threshold(stats.distance(source.draw(10)[0]))
    fresh, _ = source.draw(200)
    # The max of 30 calibration points is exceeded by 1/31 ≈ 3 % of new points in expectation;
    # 8 % allows for the spread of that maximum over one draw of 30.
    assert stats.is_out_of_distribution(fresh).mean() <= 0.08
    shifted = fresh + 4.0 * source.rng.normal(size=fresh.shape)  # the same points, much more noise
    assert stats.is_out_of_distribution(shifted).mean() >= 0.95


def test_statistics_round_trip_and_refuse_a_missing_class():
    x, y = _GaussianClasses(np.random.default_rng(2), features=8).draw(6)
    stats = fit_statistics(x, y, 3)
    stats.threshold = 3.5
    back = FeatureStatistics.from_state(stats.to_tensors())
    np.testing.assert_allclose(back.means, stats.means, rtol=1e-6)
    assert back.threshold == pytest.approx(3.5)
    assert FeatureStatistics.from_state({}) is None
    with pytest.raises(ValueError, match="no scans of classes"):
        fit_statistics(x[y != 2], y[y != 2], 3)


# --------------------------------------------------------------------------- the shipped statistics
def test_demo_weights_carry_statistics_for_this_network(demo):
    stats = load_statistics(demo)
    assert stats is not None
    assert stats.means.shape == (len(CLASS_KEYS), 14 * demo.card.config["width"])
    assert np.isfinite(stats.threshold) and stats.threshold > 0
    assert demo.card.metrics["ood_threshold"] == pytest.approx(stats.threshold, rel=1e-4)
    load_model(demo)  # the statistics are not network parameters: strict loading still works


def test_changed_statistics_fail_the_checksum(tmp_path):
    """The statistics are inside the verified file: altering the threshold is caught."""
    for f in WEIGHTS.glob("deepsc_demo.*"):
        shutil.copy(f, tmp_path / f.name)
    path = tmp_path / DEMO.name
    blob = bytearray(path.read_bytes())
    header_len = struct.unpack("<Q", blob[:8])[0]
    header = json.loads(blob[8 : 8 + header_len])
    start, _ = header[PREFIX + "threshold"]["data_offsets"]
    offset = 8 + header_len + start
    blob[offset : offset + 4] = struct.pack("<f", 1e6)
    path.write_bytes(bytes(blob))
    with pytest.raises(WeightsError):
        load_weights(path, "deepsc")


# --------------------------------------------------------------------------- in distribution: unseen product-path phantoms
@pytest.fixture(scope="module")
def unseen(demo, racnet):
    """12 phantoms on seeds 90000+ (the calibration tool uses 60000–80029), half on clinical
    grids, through the product path (pipeline lung masks)."""
    return run_cases(product_cases(12, 90000), demo, racnet)


@pytest.mark.slow
def test_unseen_product_path_phantoms_are_rarely_flagged(unseen):
    """With the expected rate ≈ 3 % (deepsc/ood.py), two or more flags in 12 happen in < 6 %
    of draws, so more than one flag means the calibration does not hold."""
    flagged = [o.name for o in unseen if o.ood_distance > o.ood_threshold]
    assert len(flagged) <= 1, flagged


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason=(
    "measured 2026-12-07 (tools/calibrate_deepsc_ood.py, 30 unseen product-path phantoms): the demo DeepSC-COVID, "
    "trained on ground-truth lungs at one grid, is far below 0.9 through the product path; see the model card's "
    "product_path_accuracy and README; needs retraining (issue 19 item 1)"))
def test_unseen_product_path_phantoms_are_classified(unseen):
    """Issue 19's target: 3-class accuracy ≥ 0.9 on unseen phantoms through the product path."""
    assert np.mean([o.predicted == o.label for o in unseen]) >= 0.9


# --------------------------------------------------------------------------- out of distribution
def _noise_in_the_lungs(seed: int = 0) -> CTVolume:
    """A default phantom whose lung parenchyma is replaced by white noise: the pipeline still
    finds the lungs, but nothing inside them looks like lung, lesion or normal."""
    p = make_phantom("normal", None, seed=seed)
    a = p.ct.array.copy()
    lung = p.right_lung | p.left_lung
    a[lung] = np.random.default_rng(seed).normal(-700, 300, int(lung.sum())).clip(-1024, 500)
    return CTVolume(a, p.ct.spacing, p.ct.origin, p.ct.direction)


@pytest.mark.xfail(strict=True, reason=(
    "measured 2026-12-08: distance 11.3 < threshold 16.8 (DeepSC calls it covid19 0.96); the pooled features of the demo "
    "network do not separate noise-filled lungs from diseased phantom lungs"))
def test_noise_in_the_lungs_is_flagged(demo):
    outcome = run_ct(_noise_in_the_lungs(), demo)
    assert outcome.ood_distance > outcome.ood_threshold


@pytest.mark.xfail(strict=True, reason="measured 2026-12-08: distance 13.6 < threshold 16.8; not flagged by the demo features")
def test_an_8x8x8_volume_is_flagged(demo):
    """The readers refuse such a thumbnail (GeometryError); DeepSC-COVID called directly on it,
    with the phantom's lungs resampled alike, must still not vouch for it."""
    p = make_phantom("normal", None, seed=3)
    ref = sitk.Image(8, 8, 8, sitk.sitkFloat32)
    ref.SetSpacing((30.0, 30.0, 30.0))
    centre = [o + (n - 1) * s / 2 for o, n, s in zip(p.ct.origin, reversed(p.ct.shape), p.ct.spacing)]
    ref.SetOrigin(tuple(c - 3.5 * 30.0 for c in centre))

    def resample(array: np.ndarray, interpolator: int, fill: float) -> np.ndarray:
        img = sitk.GetImageFromArray(array.astype(np.float32))
        img.SetSpacing(p.ct.spacing)
        img.SetOrigin(p.ct.origin)
        return sitk.GetArrayFromImage(sitk.Resample(img, ref, sitk.Transform(), interpolator, fill))

    hu = resample(p.ct.array, sitk.sitkLinear, -1000.0).astype(np.int16)
    coarse = CTVolume(hu, (30.0, 30.0, 30.0), ref.GetOrigin(), np.eye(3))
    right = resample(p.right_lung, sitk.sitkNearestNeighbor, 0.0) > 0.5
    left = resample(p.left_lung, sitk.sitkNearestNeighbor, 0.0) > 0.5
    empty = np.zeros_like(right)
    out = run_deepsc(coarse, LungMasks(right, left, empty, np.ones_like(right)), demo, threads=1)
    assert out.out_of_distribution, (out.ood_distance, out.ood_threshold)


def test_real_sample_scan_a0001_is_flagged(demo):
    """A0001 (bundled sample, Philips, 5 mm, lung cancer): a scanner and anatomy the demo
    weights never saw through the product path."""
    outcome = run_ct(read_ct(SAMPLE_A0001), demo)
    assert outcome.ood_distance > outcome.ood_threshold


@pytest.mark.realdata
@pytest.mark.slow
@pytest.mark.parametrize("fixture", ["covid_dicom_dir", "cap_dicom_dir", "normal_dicom_dir"])
@pytest.mark.xfail(strict=True, reason=(
    "measured 2026-12-08: P001 13.0, cap002 9.9, normal001 14.7, all below threshold 16.8: the demo features "
    "are not discriminative enough to flag these real scans (A0001 is flagged at 31.7)"))
def test_shared_real_dicom_scans_are_flagged(fixture, request, demo):
    outcome = run_ct(read_ct(request.getfixturevalue(fixture)), demo)
    assert outcome.ood_distance > outcome.ood_threshold, (outcome.ood_distance, outcome.ood_threshold)


# --------------------------------------------------------------------------- what a reader sees
def test_cli_leads_with_not_assessable_for_a_flagged_scan(tmp_path, capsys):
    """The bundled real scan A0001 is flagged (measured distance 31.7, threshold 16.8)."""
    out = tmp_path / "out"
    assert main(["-q", "run", str(SAMPLE_A0001), "-o", str(out), "--stages", "lungs,deepsc,findings"]) == 0
    r = json.loads((out / "results.json").read_text())
    cls = r["classification"]
    assert cls["out_of_distribution"] is True and cls["ood_distance"] > cls["ood_threshold"] > 0
    line = next(s for s in capsys.readouterr().out.splitlines() if s.startswith("classification:"))
    assert line.startswith(f"classification: {NOT_ASSESSABLE}")
    assert line.index(NOT_ASSESSABLE) < line.index(cls["label"])  # the label only as a detail
    report = (out / "report.md").read_text()
    assert report.index("## Findings") < report.index("Rule-based reading") < report.index("### Classification")
    section = report[report.index("### Classification"):]
    assert section.splitlines()[1].startswith(NOT_ASSESSABLE)
