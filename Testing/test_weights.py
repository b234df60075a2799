"""Weights format: round trip, provenance, and every rejection path a user can hit."""
from __future__ import annotations

import json
import pickle

import pytest
import torch

from CovidCTDxLib import __version__
from CovidCTDxLib.errors import WeightsError
from CovidCTDxLib.result import NOT_FOR_DIAGNOSIS
from CovidCTDxLib.weights import (
    ModelCard,
    card_sidecar,
    file_sha256,
    load_weights,
    save_weights,
    sha256_sidecar,
)


def _card(arch: str = "toy", synthetic: bool = True) -> ModelCard:
    return ModelCard(
        architecture=arch,
        architecture_version="1",
        config={"width": 4},
        training_data="synthetic phantoms",
        synthetic=synthetic,
        metrics={"dice": 0.7},
    )


@pytest.fixture()
def saved(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv3d(1, 4, 3), torch.nn.BatchNorm3d(4), torch.nn.Linear(4, 3))
    path = tmp_path / "toy.safetensors"
    digest = save_weights(path, model.state_dict(), _card())
    return path, digest, model.state_dict()


def test_round_trip_restores_tensors_card_and_provenance(saved):
    path, digest, sd = saved
    loaded = load_weights(path, "toy")
    assert loaded.sha256 == digest == file_sha256(path)
    assert set(loaded.state_dict) == set(sd)
    for k in sd:
        assert torch.equal(loaded.state_dict[k], sd[k])
    assert loaded.card.config == {"width": 4} and loaded.card.synthetic
    assert loaded.card.label == NOT_FOR_DIAGNOSIS
    prov = loaded.provenance()
    assert prov.weights_sha256 == digest and prov.not_for_diagnosis and prov.model == "toy"
    assert prov.to_dict()["label"] == NOT_FOR_DIAGNOSIS and prov.project_version == __version__
    side = json.loads(card_sidecar(path).read_text())
    assert side["sha256"] == digest and side["label"] == NOT_FOR_DIAGNOSIS
    assert sha256_sidecar(path).read_text().split()[0] == digest


def test_real_data_card_has_no_label():
    assert _card(synthetic=False).label == ""


def test_missing_file(tmp_path):
    with pytest.raises(WeightsError, match="not found"):
        load_weights(tmp_path / "nope.safetensors", "toy")


def test_wrong_architecture(saved):
    with pytest.raises(WeightsError, match="'toy'.*'deepsc-covid'"):
        load_weights(saved[0], "deepsc-covid")


def test_wrong_version(saved):
    with pytest.raises(WeightsError, match="version"):
        load_weights(saved[0], "toy", expected_version="2")


@pytest.mark.parametrize("keep_sidecars", [True, False])
def test_truncated(saved, keep_sidecars):
    path = saved[0]
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    if not keep_sidecars:
        sha256_sidecar(path).unlink()
        card_sidecar(path).unlink()
    with pytest.raises(WeightsError):
        load_weights(path, "toy")


@pytest.mark.parametrize("keep_sidecars", [True, False])
def test_tampered_byte(saved, keep_sidecars):
    path = saved[0]
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x01  # flip one bit inside the last tensor
    path.write_bytes(bytes(data))
    if not keep_sidecars:
        sha256_sidecar(path).unlink()
        card_sidecar(path).unlink()
    with pytest.raises(WeightsError, match="modified|SHA-256"):
        load_weights(path, "toy")


def test_expected_sha256_argument_overrides(saved):
    path, digest, _ = saved
    assert load_weights(path, "toy", expected_sha256=digest.upper()).sha256 == digest
    with pytest.raises(WeightsError, match="SHA-256"):
        load_weights(path, "toy", expected_sha256="0" * 64)


@pytest.mark.parametrize("how", ["torch", "pickle"])
def test_pickle_renamed_is_refused_without_unpickling(tmp_path, how):
    path = tmp_path / "evil.safetensors"
    if how == "torch":
        torch.save({"w": torch.zeros(3)}, path)
    else:
        path.write_bytes(pickle.dumps({"w": [0.0]}))
    with pytest.raises(WeightsError, match="pickle"):
        load_weights(path, "toy")


def test_foreign_safetensors_without_card(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(2)}, str(path))
    with pytest.raises(WeightsError, match="no model card"):
        load_weights(path, "toy")


def test_non_tensor_state_is_refused(tmp_path):
    with pytest.raises(TypeError):
        save_weights(tmp_path / "x.safetensors", {"step": 3}, _card())


def test_header_length_starting_with_0x80_is_not_mistaken_for_a_pickle(tmp_path):
    """A safetensors header of 128 + 256·k bytes makes the file start with byte 0x80."""
    card = _card()
    for pad in range(0, 300):
        card.notes = "x" * pad
        path = tmp_path / "w.safetensors"
        save_weights(path, {"w": torch.zeros(2)}, card)
        if path.read_bytes()[:1] == b"\x80":
            break
    else:
        pytest.fail("could not produce a header length with low byte 0x80")
    assert load_weights(path, "toy").card.notes == card.notes
