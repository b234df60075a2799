"""The shipped DeepSC-COVID demo weights: integrity, model card, and held-out phantom figures.

Requirement (issue 4): on held-out phantoms (new seeds) lesion Dice ≥ 0.6 and 3-class
accuracy ≥ 0.9. The held-out set is 18 phantoms — 6 COVID-19, 6 CAP, 6 normal, the
pneumonias from mild to critical with half of them mild (mild COVID-19 vs mild CAP is
the hard decision) — on seeds 7101..7118, which neither the training script (1000..1299)
nor its own held-out check (9001..9012) uses. The seeds were fixed before the weights
were trained; with 18 scans two errors fail the test (16/18 = 0.89).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from CovidCTDxLib.deepsc.inference import run_deepsc
from CovidCTDxLib.evaluation.scan_metrics import dice as dice_score
from CovidCTDxLib.models.deepsc import ARCHITECTURE, ARCHITECTURE_VERSION
from CovidCTDxLib.result import NOT_FOR_DIAGNOSIS, LungMasks
from CovidCTDxLib.weights import load_weights

DEMO = Path(__file__).resolve().parents[1] / "Resources" / "weights" / "deepsc_demo.safetensors"
SHAPE, SPACING = (64, 144, 144), (2.5, 2.5, 4.0)
SPECS = [("covid", "mild"), ("covid", "mild"), ("covid", "mild"), ("covid", "moderate"), ("covid", "severe"), ("covid", "critical"),
         ("cap", "mild"), ("cap", "mild"), ("cap", "mild"), ("cap", "moderate"), ("cap", "moderate"), ("cap", "severe"),
         ("normal", None), ("normal", None), ("normal", None), ("normal", None), ("normal", None), ("normal", None)]  # fmt: skip
HELD_OUT = [(kind, severity, 7101 + i) for i, (kind, severity) in enumerate(SPECS)]


@pytest.fixture(scope="module")
def demo():
    if not DEMO.exists():
        pytest.fail(f"demo weights missing: {DEMO} (run tools/train_demo_deepsc.py)")
    return load_weights(DEMO, ARCHITECTURE, expected_version=ARCHITECTURE_VERSION)


def test_demo_weights_are_small_verified_and_labelled(demo):
    assert DEMO.stat().st_size < 10 * 2**20
    card = demo.card
    assert card.synthetic and card.label == NOT_FOR_DIAGNOSIS
    assert "synthetic" in card.training_data
    assert card.metrics["held_out_lesion_dice"] >= 0.6
    assert 0.0 <= card.metrics["held_out_accuracy"] <= 1.0 and card.metrics["held_out_phantoms"] >= 12
    assert card.metrics["script_wall_s"] <= 20 * 60
    prov = demo.provenance().to_dict()
    assert prov["label"] == NOT_FOR_DIAGNOSIS and prov["weights_sha256"] == demo.sha256


@pytest.mark.slow
def test_held_out_phantoms_dice_and_accuracy(demo):
    from CovidCTDxLib.result import CLASS_KEYS
    from CovidCTDxLib.synthetic.phantom import make_phantom

    dices, confusion = [], np.zeros((len(CLASS_KEYS), len(CLASS_KEYS)), dtype=int)
    false_lesion = []
    for kind, severity, seed in HELD_OUT:
        p = make_phantom(kind, severity, shape=SHAPE, spacing=SPACING, seed=seed)
        lungs = LungMasks(p.right_lung, p.left_lung, p.airways, p.body)
        out = run_deepsc(p.ct, lungs, demo)
        pred = max(out.probabilities, key=out.probabilities.get)
        confusion[CLASS_KEYS.index(p.label), CLASS_KEYS.index(pred)] += 1
        if p.lesion.any():
            dices.append(dice_score(out.lesion_mask, p.lesion, lungs.lungs))
        else:  # a normal chest: almost no false lesion
            false_lesion.append(out.lesion_mask.sum() / lungs.lungs.sum())
    accuracy = np.trace(confusion) / len(HELD_OUT)
    print(f"held-out phantoms (n={len(HELD_OUT)}): Dice {np.mean(dices):.3f} (per case {np.round(dices, 3)}), "
          f"accuracy {accuracy:.3f}; confusion (rows true, cols pred, {CLASS_KEYS}):\n{confusion}")
    assert max(false_lesion) < 0.01
    assert np.mean(dices) >= 0.6
    assert accuracy >= 0.9
