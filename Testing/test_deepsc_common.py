"""Shared training utilities (training/common.py): metrics, checkpoints, logging, seeding."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from CovidCTDxLib.errors import WeightsError
from CovidCTDxLib.evaluation import scan_metrics
from CovidCTDxLib.training import common


def test_dice_handles_mask_and_empty():
    a = np.zeros((4, 4), bool)
    b = np.zeros((4, 4), bool)
    assert scan_metrics.dice(a, b) == 1.0
    a[0, :2] = True
    b[0, 1:3] = True
    assert scan_metrics.dice(a, b) == pytest.approx(0.5)
    m = np.zeros((4, 4), bool)
    m[0, 1] = True
    assert scan_metrics.dice(a, b, mask=m) == pytest.approx(1.0)


def test_auc_matches_pair_counting():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 50)
    s = rng.random(50) + 0.5 * y
    pairs = [(sp > sn) + 0.5 * (sp == sn) for sp in s[y == 1] for sn in s[y == 0]]
    assert scan_metrics.binary_auc(y, s) == pytest.approx(np.mean(pairs))
    assert np.isnan(scan_metrics.binary_auc(np.ones(3), [0.1, 0.2, 0.3]))


def test_classification_metrics():
    y = [0, 0, 1, 1, 2, 2]
    p = np.array([[0.8, 0.1, 0.1], [0.4, 0.5, 0.1], [0.1, 0.8, 0.1], [0.2, 0.7, 0.1], [0.1, 0.1, 0.8], [0.3, 0.1, 0.6]])
    m = common.classification_metrics(y, p, ["a", "b", "c"])
    assert m["accuracy"] == pytest.approx(5 / 6)
    assert m["confusion_matrix"] == [[1, 1, 0], [0, 2, 0], [0, 0, 2]]
    # F1: a=2/3, b=0.8, c=1
    assert m["macro_f1"] == pytest.approx((2 / 3 + 0.8 + 1) / 3)
    assert 0.5 < m["auc"] <= 1.0


def test_checkpoint_resume_restores_model_and_optimizer(tmp_path):
    common.seed_everything(0)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    sched.step()
    path = common.save_checkpoint(tmp_path / "checkpoint_0001.pt", model, opt, sched, epoch=1, extra={"best": 0.5})
    model2 = torch.nn.Linear(3, 2)
    opt2 = torch.optim.Adam(model2.parameters(), lr=1.0)
    sched2 = torch.optim.lr_scheduler.StepLR(opt2, 1, gamma=0.5)
    info = common.load_checkpoint(path, model2, opt2, sched2)
    assert info == {"epoch": 1, "extra": {"best": 0.5}}
    assert torch.equal(model.weight, model2.weight)
    assert opt2.param_groups[0]["lr"] == pytest.approx(5e-3)
    assert common.latest_checkpoint(tmp_path) == path
    with pytest.raises(WeightsError):
        common.load_checkpoint(tmp_path / "missing.pt", model2)


def test_metric_logger_writes_json_lines(tmp_path):
    ml = common.MetricLogger(tmp_path / "m.jsonl")
    ml.log(1, loss=np.float32(0.5), cm=np.eye(2, dtype=int))
    ml.log(2, loss=0.25)
    rows = [json.loads(line) for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2] and rows[0]["cm"] == [[1, 0], [0, 1]]


def test_single_process_context():
    ctx = common.setup_distributed("cpu", threads=1)
    assert not ctx.distributed and ctx.is_main
    m = ctx.wrap(torch.nn.Linear(2, 2))
    assert common.unwrap(m) is m
    assert ctx.all_reduce_mean(3.0) == 3.0
