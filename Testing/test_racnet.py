"""RACNet: padding invariance, routing masks, CORAL, anchors/OOD, checkpoints, data, demo weights."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from CovidCTDxLib.errors import WeightsError
from CovidCTDxLib.models.racnet import (
    ARCHITECTURE,
    ARCHITECTURE_VERSION,
    RACNet,
    RACNetConfig,
    coral_loss,
    racnet_losses,
)
from CovidCTDxLib.racnet.anchors import Anchors, compute_anchors
from CovidCTDxLib.racnet.inference import (
    SlicePrep,
    load_racnet,
    model_card_config,
    predict_stack,
    prepare_scan,
    run_racnet,
    save_racnet_weights,
)
from CovidCTDxLib.result import SEVERITY_KEYS, SEVERITY_MIN_COVID_PROBABILITY, SEVERITY_NOT_APPLICABLE, LungMasks
from CovidCTDxLib.weights import ModelCard, load_weights

REPO = Path(__file__).resolve().parents[1]
DEMO_WEIGHTS = REPO / "Resources" / "weights" / "racnet_demo.safetensors"
SMALL = RACNetConfig(slice_size=32, feature_dim=32, gru_hidden=16, capsules=4, capsule_dim=8, latent_dim=16)


def _batch(scans):
    t = max(s.shape[0] for s in scans)
    x = torch.zeros(len(scans), t, *scans[0].shape[1:])
    for i, s in enumerate(scans):
        x[i, : s.shape[0]] = s
    return x, torch.tensor([s.shape[0] for s in scans])


# ---------------------------------------------------------------------------- network
@pytest.mark.parametrize("backbone", ["small", "resnet50"])
def test_padding_does_not_change_outputs(backbone):
    torch.manual_seed(0)
    cfg = RACNetConfig(**{**SMALL.to_dict(), "backbone": backbone})
    model = RACNet(cfg).eval()
    scans = [torch.rand(n, 1, 32, 32) for n in (3, 9, 6)]
    x, lengths = _batch(scans)
    with torch.no_grad():
        together = model(x, lengths)
        for i, s in enumerate(scans):
            alone = model(s[None])
            for key in ("covid_logits", "severity_logits", "latent", "capsules"):
                torch.testing.assert_close(together[key][i], alone[key][0], atol=1e-5, rtol=0)


def test_padding_content_is_ignored_and_gets_no_coupling():
    torch.manual_seed(1)
    model = RACNet(SMALL).eval()
    x, lengths = _batch([torch.rand(4, 1, 32, 32), torch.rand(8, 1, 32, 32)])
    noisy = x.clone()
    noisy[0, 4:] = torch.rand_like(noisy[0, 4:]) * 10  # garbage in the padding
    with torch.no_grad():
        a, b = model(x, lengths), model(noisy, lengths)
    torch.testing.assert_close(a["latent"], b["latent"], atol=1e-6, rtol=0)
    assert float(a["coupling"][0, 4:].abs().max()) == 0.0
    # each valid slice distributes all its vote over the capsules
    torch.testing.assert_close(a["coupling"][0, :4].sum(-1), torch.ones(4))


def test_latent_is_normalised():
    """Feature alignment: every latent lies in the same standardised space (mean 0, std 1)."""
    torch.manual_seed(2)
    model = RACNet(SMALL).eval()
    with torch.no_grad():
        z = model(torch.rand(3, 6, 1, 32, 32) * torch.tensor([1.0, 5.0, 0.1])[:, None, None, None, None])["latent"]
    torch.testing.assert_close(z.mean(dim=1), torch.zeros(3), atol=1e-4, rtol=0)
    torch.testing.assert_close(z.std(dim=1, unbiased=False), torch.ones(3), atol=2e-2, rtol=0)  # LayerNorm eps


def test_bad_lengths_rejected():
    model = RACNet(SMALL)
    with pytest.raises(ValueError):
        model(torch.rand(2, 3, 1, 32, 32), torch.tensor([0, 3]))
    with pytest.raises(ValueError):
        model(torch.rand(3, 1, 32, 32))


def test_coral_and_losses():
    g = torch.Generator().manual_seed(0)
    same = torch.randn(40, 8, generator=g)
    assert float(coral_loss(same, torch.zeros(40, dtype=torch.long))) == 0.0  # one domain: nothing to align
    a, b = torch.randn(200, 8, generator=g), torch.randn(200, 8, generator=g) * 3.0
    dom = torch.cat([torch.zeros(200), torch.ones(200)]).long()
    lz = torch.cat([a, b])
    assert float(coral_loss(lz, dom)) > 10 * float(coral_loss(torch.cat([a, torch.randn(200, 8, generator=g)]), dom))
    out = {"covid_logits": torch.randn(4, 2, requires_grad=True), "severity_logits": torch.randn(4, 4, requires_grad=True),
           "latent": torch.randn(4, 8, requires_grad=True)}
    losses = racnet_losses(out, torch.tensor([1, 0, 1, 0]), torch.tensor([2, -1, -1, -1]), torch.tensor([0, 0, 1, 1]))
    losses["total"].backward()
    assert out["severity_logits"].grad[1:].abs().sum() == 0, "no severity loss without a severity label"
    assert out["severity_logits"].grad[0].abs().sum() > 0


# ---------------------------------------------------------------------------- anchors
def _clusters(rng, n=60):
    centres = np.array([[6.0, 0, 0], [0, 6.0, 0], [0, 0, 6.0]])
    z = np.concatenate([c + rng.normal(0, 0.5, (n, 3)) for c in centres])
    y = np.repeat(np.arange(3), n)
    return centres, z, y


def test_anchor_computation_and_ood():
    rng = np.random.default_rng(0)
    true, z, y = _clusters(rng)
    anchors = compute_anchors(z, y, ("a", "b", "c"), k_per_class=2, seed=0)
    assert anchors.centres.shape == (6, 3)
    for c in range(3):  # every class's anchors sit around its true centre
        d = np.linalg.norm(anchors.centres[anchors.labels == c] - true[c], axis=1)
        assert d.max() < 1.5
    assert np.all(anchors.thresholds > 0)
    # training data: ≤ ~1 % flagged per class (99th percentile thresholds)
    assert anchors.is_out_of_distribution(z).mean() <= 0.02
    m = anchors.explain(true[1] + 0.1)
    assert m.nearest[0]["class"] == "b" and not m.out_of_distribution
    assert m.nearest == sorted(m.nearest, key=lambda a: a["distance"])
    far = anchors.explain(np.array([30.0, -30.0, 30.0]))
    assert far.out_of_distribution
    # reproducible with the seed
    again = compute_anchors(z, y, ("a", "b", "c"), k_per_class=2, seed=0)
    np.testing.assert_array_equal(again.centres, anchors.centres)


def test_anchor_counts_follow_class_size_and_roundtrip():
    rng = np.random.default_rng(1)
    z = np.concatenate([rng.normal(0, 1, (50, 4)), rng.normal(5, 1, (7, 4))])
    y = np.r_[np.zeros(50, int), np.ones(7, int)]
    anchors = compute_anchors(z, y, ("big", "small", "empty"), k_per_class=5)
    counts = np.bincount(anchors.labels, minlength=3)
    assert counts[0] == 5 and counts[1] == 1 and counts[2] == 0
    assert anchors.thresholds[2] == 0.0  # a class without scans never vouches for anything
    back = Anchors.from_tensors(anchors.to_tensors(), anchors.classes)
    np.testing.assert_array_equal(back.centres, anchors.centres)
    np.testing.assert_array_equal(back.labels, anchors.labels)
    with pytest.raises(WeightsError):
        Anchors.from_tensors({}, anchors.classes)


# ---------------------------------------------------------------------------- checkpoint round trip
def _save_tiny(path: Path, version: str = ARCHITECTURE_VERSION):
    torch.manual_seed(3)
    model = RACNet(SMALL)
    prep = SlicePrep(size=32)
    rng = np.random.default_rng(0)
    anchors = compute_anchors(rng.normal(size=(30, SMALL.latent_dim)), np.repeat([0, 1, 2], 10), ("non_covid", "mild", "moderate"))
    card = ModelCard(ARCHITECTURE, version, model_card_config(SMALL, prep, anchors.classes), "unit test", True)
    save_racnet_weights(path, {**model.state_dict(), **anchors.to_tensors()}, card)
    return model


def test_checkpoint_round_trip(tmp_path):
    path = tmp_path / "racnet_tiny.safetensors"
    model = _save_tiny(path).eval()
    bundle = load_racnet(load_weights(path, "racnet"))
    stack = np.random.default_rng(1).random((5, 32, 32), dtype=np.float32)
    with torch.no_grad():
        ref = model(torch.from_numpy(stack)[None, :, None])
    got = predict_stack(bundle.model, stack)
    np.testing.assert_allclose(got["latent"], ref["latent"][0].numpy(), atol=1e-6)
    assert bundle.anchors.classes == ("non_covid", "mild", "moderate")
    # tampering is caught by the weights layer, a version mismatch by the RACNet loader
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0xFF
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(bytes(raw))
    with pytest.raises(WeightsError):
        load_weights(bad, "racnet")
    old = tmp_path / "old.safetensors"
    _save_tiny(old, version="0")
    with pytest.raises(WeightsError):
        load_racnet(load_weights(old, "racnet"))


# ---------------------------------------------------------------------------- data
def test_cov19_ct_db_layout(tmp_path):
    from skimage.io import imsave

    from CovidCTDxLib.training.racnet_data import load_cov19_ct_db, read_severity_csv

    for split in ("train", "validation"):
        for cls, n_scans in (("covid", 2), ("non-covid", 1)):
            for s in range(n_scans):
                d = tmp_path / split / cls / f"ct_scan_{s}"
                d.mkdir(parents=True)
                for k in range(11):  # 0..10: numeric order differs from text order
                    imsave(str(d / f"{k}.jpg"), np.full((40, 40), 20 * k, np.uint8), check_contrast=False)
    csv = tmp_path / "severity.csv"
    csv.write_text("Name;Category\nct_scan_0;3\nct_scan_1;1\n")
    assert read_severity_csv(csv) == {"ct_scan_0": 2, "ct_scan_1": 0}
    items = load_cov19_ct_db(tmp_path, "train", csv, size=16)
    assert [(i.covid, i.severity) for i in items] == [(1, 2), (1, 0), (0, -1)]
    assert items[0].stack.shape == (11, 16, 16)
    means = items[0].stack.mean(axis=(1, 2))
    assert np.all(np.diff(means) > 0), "slices ordered by their number, not as text"


def test_prepare_scan_orientation_invariant():
    """A scan stored flipped left-right gives the same prepared stack."""
    from CovidCTDxLib.synthetic.phantom import make_phantom
    from CovidCTDxLib.volume import CTVolume

    ph = make_phantom(kind="cap", shape=(40, 96, 96), spacing=(3.6, 3.6, 7.0), seed=4)
    lungs = LungMasks(ph.right_lung, ph.left_lung, ph.airways, np.zeros(ph.ct.shape, bool))
    prep = SlicePrep(size=48)
    a, sel = prepare_scan(ph.ct, lungs, prep)
    d = ph.ct.direction.copy()
    d[:, 0] *= -1
    origin = ph.ct.index_to_lps(np.array([ph.ct.shape[2] - 1, 0, 0]))
    flipped = CTVolume(ph.ct.array[:, :, ::-1].copy(), ph.ct.spacing, tuple(origin), d)
    fl = LungMasks(ph.right_lung[:, :, ::-1], ph.left_lung[:, :, ::-1], ph.airways[:, :, ::-1], np.zeros(ph.ct.shape, bool))
    b, _ = prepare_scan(flipped, fl, prep)
    assert a.shape == (len(sel), 48, 48) and a.min() >= 0.0 and a.max() <= 1.0
    np.testing.assert_allclose(a, b, atol=1e-5)


@pytest.mark.slow
def test_trainer_writes_weights_and_resumes(tmp_path):
    from CovidCTDxLib.training import train_racnet

    common = ["--phantoms", "4", "--val-phantoms", "4", "--slice-size", "32", "--batch-size", "2", "--threads", "1", "--out", str(tmp_path)]
    args = train_racnet.build_parser().parse_args(common + ["--epochs", "1"])
    assert train_racnet.run(args) == 0
    assert (tmp_path / "checkpoint_001.pt").exists()
    args = train_racnet.build_parser().parse_args(common + ["--epochs", "2"])
    assert train_racnet.run(args) == 0
    assert (tmp_path / "checkpoint_002.pt").exists()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2, "the second run resumed at epoch 2 instead of starting over"
    w = load_weights(tmp_path / "racnet.safetensors", "racnet")
    assert w.card.synthetic and w.card.metrics["epochs_run"] == 2
    assert "severity_macro_f1" in w.card.metrics["validation"]
    load_racnet(w)


# ---------------------------------------------------------------------------- demo weights
@pytest.fixture(scope="module")
def demo():
    if not DEMO_WEIGHTS.exists():
        pytest.skip("demo weights not built (python tools/train_demo_racnet.py)")
    w = load_weights(DEMO_WEIGHTS, "racnet")
    return w, load_racnet(w)


def test_demo_card_says_synthetic(demo):
    w, _ = demo
    assert w.card.synthetic
    assert "not for diagnosis" in w.card.label
    assert "phantom" in w.card.training_data
    assert DEMO_WEIGHTS.stat().st_size < 5_000_000


@pytest.mark.slow
def test_demo_weights_on_held_out_phantoms(demo):
    """Held-out phantoms (seeds 900000+, never used for training, validation or model selection;
    the same set ``tools/train_demo_racnet.py`` reports): severity macro-F1 ≥ 0.7, COVID
    accuracy ≥ 0.9. 36 phantoms: with 18, one error moves the accuracy by 0.06."""
    from CovidCTDxLib.synthetic.phantom import make_phantom, severity_from_lvr
    from CovidCTDxLib.training.common import accuracy, macro_f1
    from CovidCTDxLib.training.racnet_data import PHANTOM_CYCLE, PHANTOM_GEOMETRIES

    w, bundle = demo
    covid_t, covid_p, sev_t, sev_p, ood = [], [], [], [], []
    for i in range(36):
        kind, sev = PHANTOM_CYCLE[i % len(PHANTOM_CYCLE)]
        geo = PHANTOM_GEOMETRIES[(i // len(PHANTOM_CYCLE)) % len(PHANTOM_GEOMETRIES)]
        ph = make_phantom(kind=kind, severity=sev, shape=geo[0], spacing=geo[1], seed=900_000 + i)
        lungs = LungMasks(ph.right_lung, ph.left_lung, ph.airways, np.zeros(ph.ct.shape, bool))
        s = run_racnet(ph.ct, lungs, w, bundle=bundle)
        assert abs(sum(s.probabilities.values()) - 1) < 1e-4
        grade = max(s.probabilities, key=s.probabilities.get)
        assert s.label == (grade if s.covid_probability >= SEVERITY_MIN_COVID_PROBABILITY else SEVERITY_NOT_APPLICABLE)
        covid_t.append(int(ph.label == "covid19"))
        covid_p.append(int(s.covid_probability >= 0.5))
        ood.append(s.out_of_distribution)
        if kind == "covid":
            sev_t.append(SEVERITY_KEYS.index(severity_from_lvr(ph.lvr_percent)))
            sev_p.append(SEVERITY_KEYS.index(grade))  # the grade head, scored even where the label is withheld
    assert accuracy(covid_t, covid_p) >= 0.9
    assert macro_f1(sev_t, sev_p, 4) >= 0.7
    assert np.mean(ood) <= 0.2, "held-out phantoms come from the training distribution"


def test_severity_is_not_applicable_unless_racnet_calls_covid(demo):
    """Through the product path (CLI default phantom grid, the pipeline's lung masks): a normal
    phantom gets no severity grade, a severe COVID-19 phantom gets one."""
    from CovidCTDxLib.lungs.engine import segment_lungs
    from CovidCTDxLib.synthetic.phantom import make_phantom

    w, bundle = demo
    normal = make_phantom("normal", None, seed=5)
    s = run_racnet(normal.ct, segment_lungs(normal.ct), w, bundle=bundle)
    assert s.covid_probability < SEVERITY_MIN_COVID_PROBABILITY and s.label == SEVERITY_NOT_APPLICABLE
    assert s.to_dict()["label"] == SEVERITY_NOT_APPLICABLE
    covid = make_phantom("covid", "severe", seed=5)
    s = run_racnet(covid.ct, segment_lungs(covid.ct), w, bundle=bundle)
    assert s.covid_probability >= SEVERITY_MIN_COVID_PROBABILITY and s.label in SEVERITY_KEYS


def test_noise_is_out_of_distribution(demo):
    _, bundle = demo
    rng = np.random.default_rng(0)
    size = bundle.prep.size
    for stack in (rng.random((30, size, size), dtype=np.float32), np.ones((30, size, size), np.float32)):
        assert bundle.out_of_distribution(predict_stack(bundle.model, stack))


@pytest.mark.realdata
def test_run_racnet_on_real_covid_scan(demo, covid_dicom_dir):
    """Smoke test on real data (no lung mask → COVID-CTset selection): a well-formed result."""
    from CovidCTDxLib.io.readers import read_ct

    w, bundle = demo
    s = run_racnet(read_ct(covid_dicom_dir), None, w, bundle=bundle)
    assert s.slices_used >= 10
    assert 0.0 <= s.covid_probability <= 1.0
    d = s.to_dict()
    assert d["weights"]["not_for_diagnosis"] and len(d["nearest_anchors"]) == 3
