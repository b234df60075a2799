"""The neural lung model hook from weights on disk: checks, provenance, CLI and pipeline.

The network used here is a real :class:`UNet2D` whose weights are set by hand to an air
threshold (HU below about -540 -> lung), so its masks can be checked against ground truth
without training anything: the point is the path from a user's file to the outputs.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from CovidCTDxLib.app.cli import main
from CovidCTDxLib.errors import WeightsError
from CovidCTDxLib.evaluation.scan_metrics import dice as dice_score
from CovidCTDxLib.io.segmentation_file import write_volume
from CovidCTDxLib.lungs.model_hook import TorchLungModel
from CovidCTDxLib.models.lung_unet import UNet2D
from CovidCTDxLib.pipeline import PipelineOptions, run_pipeline
from CovidCTDxLib.synthetic.phantom import make_phantom
from CovidCTDxLib.weights import file_sha256, sha256_sidecar

#: Normalised intensity below which the hand-set network says "lung": -1024 + 0.3 * 1624 HU.
AIR_THRESHOLD = 0.3


def air_threshold_model() -> TorchLungModel:
    """A one-level U-Net computing relu(t - x) and scoring lung against background on it."""
    net = UNet2D(in_channels=1, n_classes=3, depth=1, wf=0)
    with torch.no_grad():
        for p in net.parameters():
            p.zero_()
        first, second = net.down_path[0].block[0], net.down_path[0].block[3]
        first.weight[0, 0, 1, 1], first.bias[0] = -1.0, AIR_THRESHOLD
        second.weight[0, 0, 1, 1] = 1.0
        for bn in (net.down_path[0].block[2], net.down_path[0].block[5]):
            bn.weight.fill_(1.0)
        net.last.weight[1, 0, 0, 0] = 20.0  # "lung" wins where relu(t - x) > 0.05
        net.last.bias[0] = 1.0
    return TorchLungModel(net, size=128)


@pytest.fixture(scope="module")
def small_phantom():
    return make_phantom(kind="normal", shape=(48, 160, 160), spacing=(2.2, 2.2, 7.0), seed=21)


@pytest.fixture()
def model_file(tmp_path):
    path = tmp_path / "air_unet.safetensors"
    air_threshold_model().save(path)
    return path


def test_save_writes_a_checksum_sidecar_that_loading_verifies(model_file):
    digest = file_sha256(model_file)
    assert sha256_sidecar(model_file).read_text().split()[0] == digest
    loaded = TorchLungModel.from_file(model_file)
    assert loaded.weights_sha256 == digest and loaded.weights_file == model_file.name
    assert loaded.provenance()["weights_sha256"] == digest


def test_a_modified_file_is_refused(model_file):
    blob = bytearray(model_file.read_bytes())
    blob[-1] ^= 0xFF  # one flipped bit in the last weight
    model_file.write_bytes(bytes(blob))
    with pytest.raises(WeightsError, match="SHA-256"):
        TorchLungModel.from_file(model_file)


def test_a_digest_given_by_the_caller_wins_over_the_sidecar(model_file):
    with pytest.raises(WeightsError, match="SHA-256"):
        TorchLungModel.from_file(model_file, expected_sha256="0" * 64)
    assert TorchLungModel.from_file(model_file, expected_sha256=file_sha256(model_file)).weights_file


def test_a_pickle_checkpoint_is_refused_unread(tmp_path):
    path = tmp_path / "r231.pth"
    torch.save(UNet2D(depth=1, wf=0).state_dict(), path)
    with pytest.raises(WeightsError, match="pickle"):
        TorchLungModel.from_file(path)


def test_pipeline_uses_the_model_and_records_its_weights(small_phantom, model_file):
    result = run_pipeline(small_phantom.ct, PipelineOptions(stages=("lungs",), lung_model=model_file))
    lungs = result.lungs
    assert lungs.method == "model:TorchLungModel"
    assert lungs.model_provenance["weights_sha256"] == file_sha256(model_file)
    # The threshold also marks the air around the patient; the body mask keeps it out.
    assert not (lungs.lungs & ~small_phantom.body).any()
    # A threshold leaves the vessels out of the lung (the truth holds them): ~0.95, not 0.98.
    assert dice_score(lungs.right, small_phantom.right_lung) >= 0.93
    assert dice_score(lungs.left, small_phantom.left_lung) >= 0.93


def test_cli_run_with_a_lung_model_shows_its_weights(small_phantom, model_file, tmp_path):
    ct_path = tmp_path / "ct.nrrd"
    write_volume(small_phantom.ct, ct_path)
    out = tmp_path / "out"
    assert main(["-q", "run", str(ct_path), "-o", str(out), "--stages", "lungs", "--lung-model", str(model_file)]) == 0
    results = json.loads((out / "results.json").read_text())
    digest = file_sha256(model_file)
    assert results["lungs"]["method"] == "model:TorchLungModel"
    assert results["lungs"]["weights"]["weights_sha256"] == digest
    assert results["provenance"]["lungs"]["weights_file"] == model_file.name
    truth_ml = small_phantom.right_lung.sum() * small_phantom.ct.voxel_volume_ml
    assert results["lungs"]["right_ml"] == pytest.approx(truth_ml, rel=0.08)
    assert f"{model_file.name} (SHA-256 {digest[:12]}" in (out / "report.md").read_text()


def test_cli_refuses_a_tampered_lung_model_and_writes_nothing(small_phantom, model_file, tmp_path):
    ct_path = tmp_path / "ct.nrrd"
    write_volume(small_phantom.ct, ct_path)
    sha256_sidecar(model_file).write_text(f"{'1' * 64}  {model_file.name}\n")
    out = tmp_path / "out"
    assert main(["-q", "run", str(ct_path), "-o", str(out), "--stages", "lungs", "--lung-model", str(model_file)]) != 0
    assert not out.exists() or not any(out.iterdir())


def test_air_threshold_model_is_a_working_network(small_phantom):
    """Guards the fixture itself: aerated lung and outside air labelled 1, soft tissue 0."""
    labels = air_threshold_model().predict(small_phantom.ct)
    assert np.mean(labels[small_phantom.lungs] == 1) > 0.9  # the rest: vessels
    assert np.mean(labels[~small_phantom.body] == 1) > 0.9
    tissue = small_phantom.body & ~small_phantom.lungs & (small_phantom.ct.array > -100)
    assert np.mean(labels[tissue] == 0) > 0.99


def test_the_slicer_background_worker_gets_the_lung_model(model_file):
    """The module's background process rebuilds its options from JSON: the file must survive."""
    from CovidCTDxLib.app.worker import options_from_dict, options_to_dict

    options = PipelineOptions(stages=("lungs", "findings"), lung_model=model_file)
    assert options_from_dict(json.loads(json.dumps(options_to_dict(options)))).lung_model == model_file
    assert options_from_dict(options_to_dict(PipelineOptions())).lung_model is None
