"""DeepSC-COVID training: dataset layouts, lesion-biased sampling, the two-stage loop,
resuming, and (slow) a 2-process DDP run with gloo."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from CovidCTDxLib.errors import InputError
from CovidCTDxLib.models.deepsc import DeepSCConfig
from CovidCTDxLib.training import datasets as D
from CovidCTDxLib.training import train_deepsc as T
from CovidCTDxLib.weights import load_weights

CFG = DeepSCConfig(width=8, patch_size=(8, 32, 32), cls_slices=16, cls_size=32, spacing=(5.0, 5.0, 8.0))


@pytest.fixture(scope="module")
def phantoms():
    from CovidCTDxLib.synthetic.phantom import make_phantom

    return {
        k: make_phantom(k, "moderate" if k != "normal" else None, shape=(24, 72, 80), spacing=(4.5, 4.5, 8.0), seed=7)
        for k in ("covid", "cap", "normal")
    }


@pytest.fixture(scope="module")
def prepared(phantoms):
    labels = {"covid": 0, "cap": 1, "normal": 2}
    return [D.prepare_case(k, labels[k], p.ct, p.right_lung | p.left_lung, p.lesion, CFG) for k, p in phantoms.items()]


def _write(arr, like, path: Path):
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(like.spacing)
    img.SetOrigin(like.origin)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(img, str(path))


def test_deepsc_layout(tmp_path, phantoms):
    p = phantoms["covid"]
    _write(p.ct.array, p.ct, tmp_path / "covid/data-nii/s1.nii.gz")
    _write(p.lesion.astype(np.uint8), p.ct, tmp_path / "covid/segment_label/s1.nii")
    _write(p.ct.array, p.ct, tmp_path / "cap/data-nii/s2.nii.gz")
    _write(p.ct.array, p.ct, tmp_path / "normal/data-nii/s3.nii.gz")
    recs = D.discover(tmp_path)
    by = {r.name: r for r in recs}
    assert set(by) == {"s1", "s2", "s3"}
    assert by["s1"].label == 0 and by["s1"].lesion.name == "s1.nii"
    assert by["s2"].label == 1 and by["s2"].lesion is None
    assert by["s3"].label == 2


def test_mosmed_layout(tmp_path, phantoms):
    p = phantoms["covid"]
    _write(p.ct.array, p.ct, tmp_path / "studies/CT-0/study_0001.nii.gz")
    _write(p.ct.array, p.ct, tmp_path / "studies/CT-2/study_0300.nii.gz")
    _write(p.lesion.astype(np.uint8), p.ct, tmp_path / "masks/study_0300_mask.nii.gz")
    recs = {r.name: r for r in D.discover(tmp_path)}
    assert recs["study_0001"].label == 2 and recs["study_0001"].lesion is None
    assert recs["study_0300"].label == 0 and recs["study_0300"].lesion.name == "study_0300_mask.nii.gz"


def test_csv_layout_loads_with_given_lungs(tmp_path, phantoms):
    p = phantoms["cap"]
    _write(p.ct.array, p.ct, tmp_path / "img/a.nii.gz")
    _write(p.lesion.astype(np.uint8), p.ct, tmp_path / "img/a_les.nii.gz")
    _write((p.right_lung | p.left_lung).astype(np.uint8), p.ct, tmp_path / "img/a_lung.nii.gz")
    (tmp_path / "list.csv").write_text("path,label,lesion,lungs\nimg/a.nii.gz,CAP,img/a_les.nii.gz,img/a_lung.nii.gz\n")
    (rec,) = D.discover(tmp_path / "list.csv")
    assert rec.label == 1
    case = D.load_record(rec, CFG)
    assert case.lesion.any() and case.slices.shape == (1, 16, 32, 32)
    (tmp_path / "bad.csv").write_text("path,label\nimg/a.nii.gz,flu\n")
    with pytest.raises(InputError, match="flu"):
        D.discover(tmp_path / "bad.csv")


def _sparse_case() -> D.PreparedCase:
    """A 32×128×128 scan with one small lesion: random patches rarely hit it."""
    from CovidCTDxLib.deepsc.inference import PreparedScan

    vol = torch.full((32, 128, 128), 0.2)
    lesion = torch.zeros(32, 128, 128, dtype=torch.bool)
    lesion[10:14, 60:68, 90:98] = True
    scan = PreparedScan(vol, torch.ones_like(lesion), (slice(0, 32),) * 3, (32, 128, 128))
    return D.PreparedCase("sparse", 0, scan, lesion, torch.zeros(1, 16, 32, 32))


def test_lesion_biased_sampling():
    case = _sparse_case()
    need = D.MIN_LESION_FRACTION * np.prod(CFG.patch_size)
    ds = D.PatchDataset([case], CFG, patches_per_case=300, seed=1)
    hits = np.mean([float(ds[i]["lesion"].sum()) >= need for i in range(len(ds))])
    uniform = D.PatchDataset([case], CFG, patches_per_case=300, lesion_fraction=0.0, seed=1)
    base = np.mean([float(uniform[i]["lesion"].sum()) >= need for i in range(len(uniform))])
    assert base < 0.1
    assert 0.6 - 0.08 <= hits - base * 0.4 <= 0.6 + 0.08  # 60 % lesion-centred + random hits
    s = ds[0]
    assert s["patch"].shape == (1, *CFG.patch_size) and s["box"].shape == (6,)
    assert ds[3]["patch"].equal(D.PatchDataset([case], CFG, 300, seed=1)[3]["patch"])  # reproducible


def test_two_stage_training_writes_weights_metrics_and_resumes(tmp_path, prepared):
    opts = T.TrainOptions(
        epochs_stage1=1,
        epochs_stage2=1,
        batch_size=2,
        patches_per_case=1,
        out_dir=tmp_path,
        threads=1,
        training_data="test phantoms",
        synthetic=True,
    )
    res = T.train(prepared, prepared[:2], CFG, opts)
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in rows] == [1, 2]
    assert "loss_task_aware" not in rows[0] and "loss_task_aware" in rows[1]
    assert {"dice", "accuracy", "auc", "confusion_matrix"} <= set(rows[-1])
    assert np.array(rows[-1]["confusion_matrix"]).sum() == 2
    w = load_weights(res.weights_path, "deepsc")
    assert w.card.synthetic and w.card.config["patch_size"] == [8, 32, 32]
    # Resume: one more stage-2 epoch continues from epoch 2.
    opts.epochs_stage2 = 2
    res2 = T.train(prepared, [], CFG, opts)
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3] and len(res2.history) == 3


def test_cli_parser_builds_config():
    args = T.build_parser().parse_args(["--phantoms", "3", "--width", "16", "--patch", "16,48,48", "--spacing", "2,2,3"])
    cfg = T.config_from_args(args)
    assert cfg.width == 16 and cfg.patch_size == (16, 48, 48) and cfg.spacing == (2.0, 2.0, 3.0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_ddp_two_processes_gloo(tmp_path):
    """torchrun-style 2-process run on CPU: both ranks train, rank 0 writes the weights."""
    code = (
        "import sys; from CovidCTDxLib.training import train_deepsc as T;"
        "a=T.build_parser().parse_args(sys.argv[1:]); raise SystemExit(T.run(a))"
    )
    args = [
        "--phantoms",
        "2",
        "--width",
        "8",
        "--patch",
        "8,32,32",
        "--cls-slices",
        "16",
        "--cls-size",
        "32",
        "--spacing",
        "5,5,8",
        "--epochs-stage1",
        "1",
        "--epochs-stage2",
        "0",
        "--patches-per-case",
        "2",
        "--batch-size",
        "1",
        "-o",
        str(tmp_path),
        "--threads",
        "1",
    ]
    port = _free_port()
    procs = []
    for rank in range(2):
        env = dict(
            os.environ,
            WORLD_SIZE="2",
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            LOCAL_WORLD_SIZE="2",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
        )
        procs.append(subprocess.Popen([sys.executable, "-c", code, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    outs = [p.communicate(timeout=600)[0].decode() for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert "rank 1/2" in outs[1] or "joined process group" in outs[0] + outs[1]
    assert (tmp_path / "deepsc.safetensors").exists()
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 1
