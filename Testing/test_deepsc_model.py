"""DeepSC-COVID network and losses: shapes, geometry of the exchange, gradients, learning."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from CovidCTDxLib.models.blocks import InceptionStem3D, crop_to_box, paste_from_box
from CovidCTDxLib.models.deepsc import DeepSCConfig, DeepSCCovid, evidence_map
from CovidCTDxLib.training import losses

TINY = DeepSCConfig(width=8, patch_size=(8, 32, 32), cls_slices=16, cls_size=32)


def _inputs(cfg: DeepSCConfig, n: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    patch = torch.rand(n, 1, *cfg.patch_size, generator=g)
    slices = torch.rand(n, 1, cfg.cls_slices, cfg.cls_size, cfg.cls_size, generator=g)
    box = torch.tensor([[0.1, 0.6, 0.2, 0.7, 0.3, 0.9]] * n)
    return patch, slices, box


def test_stem_widths_follow_paper_split():
    stem = InceptionStem3D(1, 32)
    outs = [b(torch.zeros(1, 1, 8, 16, 16)).shape[1] for b in (stem.b1, stem.b2, stem.b3, stem.b4)]
    assert outs == [8, 8, 12, 4]
    assert stem(torch.zeros(1, 1, 8, 16, 16)).shape == (1, 32, 4, 8, 8)


@pytest.mark.parametrize(
    "cfg",
    [
        TINY,
        DeepSCConfig(width=8, patch_size=(16, 48, 64), cls_slices=16, cls_size=48),
        DeepSCConfig(width=16, patch_size=(24, 32, 40), cls_slices=32, cls_size=64),
    ],
)
def test_output_shapes(cfg):
    torch.manual_seed(0)
    model = DeepSCCovid(cfg).eval()
    patch, slices, box = _inputs(cfg, n=2)
    with torch.inference_mode():
        out = model(patch, slices, box)
    pz, py, px = cfg.patch_size
    assert out.seg_logits.shape == (2, 2, pz, py, px)
    assert [o.shape[2:] for o in out.deep_logits] == [
        (pz // 8, py // 8, px // 8),
        (pz // 4, py // 4, px // 4),
        (pz // 2, py // 2, px // 2),
        (pz, py, px),
    ]
    assert out.cls_logits.shape == (2, 3)
    s, c = cfg.cls_slices, cfg.cls_size
    assert [cam.shape for cam in out.cams] == [(2, 3, s // 2 ** k, c // 2 ** k, c // 2 ** k) for k in (2, 3, 4)]
    ev = evidence_map(out.cams, (s, c, c))
    assert ev.shape == (2, 3, s, c, c) and float(ev.min()) >= 0 and float(ev.max()) <= 1 + 1e-6
    # The fc sees the 14w GAP vector (448 for the paper's width 32).
    assert model.classifier.fc.in_features == 14 * cfg.width


def test_paper_config_builds_with_448_features():
    model = DeepSCCovid(DeepSCConfig.paper())
    assert model.classifier.fc.in_features == 448
    assert model.exchange.alpha_seg.item() == pytest.approx(0.8) and model.exchange.beta_cls.item() == pytest.approx(0.2)


def test_crop_and_paste_are_geometric_inverses():
    vol = torch.zeros(1, 1, 8, 16, 16)
    vol[0, 0, 2:6, 4:12, 8:16] = 1.0
    box = torch.tensor([[2 / 8, 6 / 8, 4 / 16, 12 / 16, 8 / 16, 1.0]])
    crop = crop_to_box(vol, box, (4, 8, 8))
    assert torch.allclose(crop, torch.ones_like(crop))
    back = paste_from_box(crop, box, (8, 16, 16))
    assert torch.allclose(back, vol, atol=1e-5)


def test_task_aware_gradient_reaches_lesion_subnet():
    torch.manual_seed(0)
    model = DeepSCCovid(TINY)
    patch, slices, box = _inputs(TINY)
    out = model(patch, slices, box)
    # Force a pneumonia prediction so the evidence target is not zeroed.
    logits = out.cls_logits + torch.tensor([10.0, 0.0, 0.0])
    loss = losses.task_aware_loss(out.deep_logits, out.cams, logits, box)
    assert loss.item() > 0
    loss.backward()
    for name in ("enc3", "dec2", "dec1"):
        g = getattr(model.lesion, name).body[0].weight.grad
        assert g is not None and g.abs().sum() > 0, name
    assert model.lesion.heads[0].weight.grad.abs().sum() > 0
    assert model.classifier.fc.weight.grad.abs().sum() > 0  # and it shapes the evidence too


def test_task_aware_target_is_zero_for_non_pneumonia():
    torch.manual_seed(0)
    model = DeepSCCovid(TINY)
    patch, slices, box = _inputs(TINY)
    out = model(patch, slices, box)
    logits = out.cls_logits.detach() + torch.tensor([0.0, 0.0, 50.0])
    loss = losses.task_aware_loss(out.deep_logits, out.cams, logits, box)
    expected = 5 * sum(w * torch.softmax(o, 1)[:, 1].pow(2).mean() for o, w in zip(out.deep_logits[:3], (0.25, 0.25, 0.5)))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_inverse_frequency_weights():
    w = losses.inverse_frequency_weights([0, 0, 0, 1, 2, 2], 3)
    assert w[1] > w[2] > w[0] and w.mean().item() == pytest.approx(1.0)


def test_focal_is_smaller_than_ce_for_easy_examples():
    logits = torch.tensor([[5.0, 0.0, 0.0]])
    t = torch.tensor([0])
    assert losses.focal_loss(logits, t) < torch.nn.functional.cross_entropy(logits, t) * 0.1


def _batch(cfg, n=2, seed=0):
    patch, slices, box = _inputs(cfg, n, seed)
    lesion = torch.zeros(n, *cfg.patch_size)
    lesion[:, 2:6, 8:20, 8:20] = 1
    patch = patch * 0.2 + lesion[:, None] * 0.6  # bright cube = lesion
    lung = torch.ones_like(lesion)
    label = torch.tensor([0, 2][:n])
    return patch, slices, box, lesion, lung, label


def test_one_step_lowers_the_loss():
    torch.manual_seed(0)
    model = DeepSCCovid(TINY)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    patch, slices, box, lesion, lung, label = _batch(TINY)

    def total():
        out = model(patch, slices, box)
        return losses.deepsc_loss(out, lesion, lung, label, box)["total"]

    model.train()
    before = total()
    opt.zero_grad()
    before.backward()
    opt.step()
    with torch.no_grad():
        after = total()
    assert after.item() < before.item()


def test_overfits_a_tiny_phantom_batch():
    """A few dozen Adam steps on two phantom patches drive the loss down and fit the labels."""
    from CovidCTDxLib.synthetic.phantom import make_phantom
    from CovidCTDxLib.training.datasets import PatchDataset, prepare_case

    cfg = DeepSCConfig(width=8, patch_size=(8, 32, 32), cls_slices=16, cls_size=32, spacing=(5.0, 5.0, 8.0))
    cases = []
    for kind, label in (("covid", 0), ("normal", 2)):
        p = make_phantom(kind, "severe" if kind == "covid" else None, shape=(32, 80, 80), spacing=(4.5, 4.5, 8.0), seed=3)
        cases.append(prepare_case(kind, label, p.ct, p.right_lung | p.left_lung, p.lesion, cfg))
    ds = PatchDataset(cases, cfg, patches_per_case=1, lesion_fraction=1.0, seed=0)
    batch = torch.utils.data.default_collate([ds[0], ds[1]])
    assert batch["lesion"][0].sum() > 0 and batch["label"].tolist() == [0, 2]
    torch.manual_seed(0)
    model = DeepSCCovid(cfg)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    history = []
    for _ in range(40):
        out = model(batch["patch"], batch["slices"], batch["box"])
        terms = losses.deepsc_loss(out, batch["lesion"], batch["lung"], batch["label"], batch["box"])
        opt.zero_grad()
        terms["total"].backward()
        opt.step()
        history.append(terms["total"].item())
    assert history[-1] < 0.35 * history[0]
    assert out.cls_logits.argmax(1).tolist() == [0, 2]
    pred = out.seg_logits.argmax(1)[0].bool()
    truth = batch["lesion"][0].bool()
    dice = 2 * (pred & truth).sum().item() / (pred.sum().item() + truth.sum().item())
    assert dice > 0.6


def test_lesion_probability_undoes_the_class_weight_shift():
    from CovidCTDxLib.models.deepsc import lesion_probability

    cfg = DeepSCConfig.cpu()  # CE weights 0.1 / 1.0 -> log-odds shifted by log(10)
    logits = torch.zeros(1, 2, 1, 1, 3)
    logits[0, 1, 0, 0] = torch.tensor([0.0, np.log(10.0), 5.0])
    p = lesion_probability(logits, cfg)[0, 0, 0]
    assert p[0].item() == pytest.approx(1 / 11, rel=1e-4) and p[1].item() == pytest.approx(0.5, abs=1e-5) and p[2].item() > 0.9
