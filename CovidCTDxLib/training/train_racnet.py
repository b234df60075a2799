"""Train RACNet (``covidctdx train racnet …``), resumable, single process or DDP under torchrun.

Data: phantoms (default; synthetic, for the demo weights), a COV19-CT-DB tree, or
NIfTI/DICOM scans listed in CSV files (see ``racnet_data``).

Loss: COVID cross-entropy + severity cross-entropy (scans with a severity label) +
``coral_weight`` × CORAL between domains (``models.racnet.coral_loss``). Domains are the
source dataset crossed with a length augmentation: half of the training scans are shown
with every second slice only, so the latent of the same lungs at ~½ the slice count is
pulled onto the same distribution (the "feature alignment across input lengths").

Optimiser: AdamW with cosine learning-rate decay over the epochs or over the time budget,
whichever runs out first (:func:`cosine_lr`).

Metrics each epoch on the validation set, as in the COV19-CT-DB challenge: macro-F1 of
COVID vs non-COVID and macro-F1 of the four severities (COVID scans with a label), plus
per-class recall and accuracy. The best epoch by the mean of the two macro-F1s is kept.

After training, the latents of the training scans give the anchors (``anchors.py``),
stored in the same safetensors file as the network, with a model card.

Resuming: ``checkpoint_NNN.pt`` (``training/common``) is written after every epoch in
``--out``; rerunning the same command continues from the newest one (``--no-resume`` to
start over). Wall-time already spent is carried over, so ``--time-limit-min`` bounds the
whole run.

Distributed: ``torchrun --nproc_per_node=N -m CovidCTDxLib.app.cli train racnet …``; every
rank builds/loads its share of the scans, gradients are averaged by DDP, validation
predictions are gathered, rank 0 writes checkpoints and weights.
"""
from __future__ import annotations

import argparse
import copy
import logging
import math
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch

from ..evaluation import scan_metrics
from ..models.racnet import ARCHITECTURE, ARCHITECTURE_VERSION, RACNet, RACNetConfig, racnet_losses
from ..racnet.anchors import INPUT_PREFIX, compute_anchors
from ..racnet.inference import SlicePrep, model_card_config, save_racnet_weights
from ..result import SEVERITY_KEYS
from ..weights import ModelCard
from . import common
from .racnet_data import (
    ANCHOR_CLASSES,
    ScanItem,
    collate,
    iterate_batches,
    load_cov19_ct_db,
    load_csv_scans,
    make_phantom_items,
)

log = logging.getLogger(__name__)

#: Validation phantoms use seeds from here on, disjoint from training seeds.
HELD_OUT_SEED = 100_000


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="covidctdx train racnet", description="Train RACNet (COVID detection + severity).")
    d = p.add_argument_group("data")
    d.add_argument("--data", choices=("phantoms", "cov19ctdb", "csv"), default="phantoms")
    d.add_argument("--root", type=Path, help="COV19-CT-DB root (cov19ctdb) or training CSV (csv)")
    d.add_argument("--val", type=Path, help="validation CSV (csv data)")
    d.add_argument("--severity-csv", type=Path, help="COV19-CT-DB severity file (ct_scan_N;1..4)")
    d.add_argument("--phantoms", type=int, default=144, help="training phantoms")
    d.add_argument("--val-phantoms", type=int, default=24, help="held-out phantoms (seeds ≥ 100000)")
    d.add_argument("--phantom-seed", type=int, default=1000)
    d.add_argument("--cache", type=Path, default=None, help="folder caching prepared phantom stacks (.npz)")
    m = p.add_argument_group("model")
    m.add_argument("--backbone", choices=("small", "resnet50"), default="small")
    m.add_argument("--slice-size", type=int, default=128)
    m.add_argument("--encoder-widths", default="16,32,64,96", help="small CNN stage widths")
    m.add_argument("--slice-step-mm", type=float, default=0.0, help="thin slices to at least this spacing (0 = all)")
    t = p.add_argument_group("training")
    t.add_argument("--epochs", type=int, default=20)
    t.add_argument("--batch-size", type=int, default=4, help="scans per step and process")
    t.add_argument("--lr", type=float, default=2e-3)
    t.add_argument("--weight-decay", type=float, default=1e-4)
    t.add_argument("--coral-weight", type=float, default=0.1)
    t.add_argument("--severity-weight", type=float, default=1.0)
    t.add_argument("--anchors-k", type=int, default=3, help="k-means centres per class")
    o = common.add_run_arguments(p, Path("runs/racnet"))
    o.add_argument("--weights-out", type=Path, default=None, help="final weights (default OUT/racnet.safetensors)")
    o.add_argument("--training-data", default=None, help="text for the model card (default: from --data)")
    return p


# ---------------------------------------------------------------------------- data
def load_data(args: argparse.Namespace, prep: SlicePrep, ctx: common.DistContext):
    """(train items, validation items, description, synthetic) for this rank."""
    if args.data == "phantoms":
        train = make_phantom_items(args.phantoms, args.phantom_seed, prep, rank=ctx.rank, world=ctx.world_size, cache_dir=args.cache)
        val = make_phantom_items(args.val_phantoms, HELD_OUT_SEED, prep, rank=ctx.rank, world=ctx.world_size, cache_dir=args.cache)
        desc = f"synthetic phantoms ({args.phantoms} training, seeds {args.phantom_seed}+; severity from lesion volume ratio)"
        return train, val, desc, True
    if args.data == "cov19ctdb":
        if args.root is None:
            raise SystemExit("--root is required for --data cov19ctdb")
        train = load_cov19_ct_db(args.root, "train", args.severity_csv, prep.size)
        val = load_cov19_ct_db(args.root, "validation", args.severity_csv, prep.size)
        return train[ctx.rank :: ctx.world_size], val[ctx.rank :: ctx.world_size], f"COV19-CT-DB ({args.root.name})", False
    if args.root is None or args.val is None:
        raise SystemExit("--root (training CSV) and --val (validation CSV) are required for --data csv")
    train = load_csv_scans(args.root, prep)
    val = load_csv_scans(args.val, prep)
    return train[ctx.rank :: ctx.world_size], val[ctx.rank :: ctx.world_size], f"CT scans listed in {args.root.name}", False


def _augment(items: Sequence[ScanItem], rng: np.random.Generator) -> List[ScanItem]:
    """Length augmentation: half the scans keep every second slice (domain offset +1)."""
    out = []
    for it in items:
        if it.stack.shape[0] >= 4 and rng.random() < 0.5:
            off = int(rng.integers(0, 2))
            out.append(ScanItem(it.stack[off::2], it.covid, it.severity, 2 * it.domain + 1, it.name))
        else:
            out.append(ScanItem(it.stack, it.covid, it.severity, 2 * it.domain, it.name))
    return out


# ---------------------------------------------------------------------------- evaluation
@torch.no_grad()
def predict(model: torch.nn.Module, items: Sequence[ScanItem], batch_size: int = 8) -> Dict[str, np.ndarray]:
    """COVID probability, severity probabilities and latents of ``items`` (eval mode)."""
    net = common.unwrap(model)
    was = net.training
    net.eval()
    cov, sev, lat, feat = [], [], [], []
    for batch in iterate_batches(items, batch_size, range(len(items))):
        b = collate(batch)
        out = net(b["slices"], b["lengths"])
        cov.append(torch.softmax(out["covid_logits"], 1)[:, 1].numpy())
        sev.append(torch.softmax(out["severity_logits"], 1).numpy())
        lat.append(out["latent"].numpy())
        feat.append(out["slice_feature_mean"].numpy())
    net.train(was)
    if not cov:
        return {"covid": np.zeros(0), "severity": np.zeros((0, len(SEVERITY_KEYS))),
                "latent": np.zeros((0, net.config.latent_dim)), "feature": np.zeros((0, net.config.feature_dim))}
    return {"covid": np.concatenate(cov), "severity": np.concatenate(sev), "latent": np.concatenate(lat),
            "feature": np.concatenate(feat)}


def anchor_tensors(model: torch.nn.Module, items: Sequence[ScanItem], k: int, seed: int,
                   ctx: Optional[common.DistContext] = None) -> Dict[str, torch.Tensor]:
    """Latent and input anchors of the training scans (gathered over ranks), as tensors.

    Used at the end of training and by ``tools/train_demo_racnet.py`` to refresh the anchors
    of existing weights without retraining.
    """
    pr = predict(model, items)
    classes = np.asarray([it.anchor_class for it in items], int)
    latents, feats = pr["latent"], pr["feature"]
    if ctx is not None and ctx.distributed:
        latents, feats, classes = ctx.all_gather_array(latents), ctx.all_gather_array(feats), ctx.all_gather_array(classes)
    latent_anchors = compute_anchors(latents, classes, ANCHOR_CLASSES, k_per_class=k, seed=seed)
    input_anchors = compute_anchors(feats, classes, ANCHOR_CLASSES, k_per_class=k, seed=seed)
    return {**latent_anchors.to_tensors(), **input_anchors.to_tensors(INPUT_PREFIX)}


def _recall(y: np.ndarray, p: np.ndarray, n: int) -> List[float]:
    cm = common.confusion_matrix(y, p, n)
    return [float(cm[c, c] / cm[c].sum()) if cm[c].sum() else float("nan") for c in range(n)]


def evaluate(covid_true: np.ndarray, severity_true: np.ndarray, covid_prob: np.ndarray, severity_prob: np.ndarray) -> Dict[str, Any]:
    """COV19-CT-DB style metrics: macro-F1 and per-class recall for detection and severity."""
    cp = (covid_prob >= 0.5).astype(int)
    has = severity_true >= 0
    sp = severity_prob.argmax(axis=1) if len(severity_prob) else np.zeros(0, int)
    m: Dict[str, Any] = {
        "covid_accuracy": common.accuracy(covid_true, cp),
        "covid_macro_f1": common.macro_f1(covid_true, cp, 2),
        "covid_recall": dict(zip(("non_covid", "covid"), _recall(covid_true, cp, 2))),
        "covid_auc": scan_metrics.binary_auc(covid_true, covid_prob),
        "severity_n": int(has.sum()),
    }
    if has.any():
        m["severity_accuracy"] = common.accuracy(severity_true[has], sp[has])
        m["severity_macro_f1"] = common.macro_f1(severity_true[has], sp[has], len(SEVERITY_KEYS))
        m["severity_recall"] = dict(zip(SEVERITY_KEYS, _recall(severity_true[has], sp[has], len(SEVERITY_KEYS))))
        m["severity_confusion"] = common.confusion_matrix(severity_true[has], sp[has], len(SEVERITY_KEYS)).tolist()
    else:
        m["severity_macro_f1"] = float("nan")
    m["score"] = common.mean_of([m["covid_macro_f1"], m["severity_macro_f1"]])
    return m


def evaluate_items(model: torch.nn.Module, items: Sequence[ScanItem], ctx: Optional[common.DistContext] = None) -> Dict[str, Any]:
    """Predict ``items`` (this rank's share), gather across ranks, return :func:`evaluate`."""
    pr = predict(model, items)
    ct = np.asarray([it.covid for it in items], int)
    st = np.asarray([it.severity for it in items], int)
    if ctx is not None and ctx.distributed:
        ct, st = ctx.all_gather_array(ct), ctx.all_gather_array(st)
        pr = {k: ctx.all_gather_array(v) for k, v in pr.items()}
    return evaluate(ct, st, pr["covid"], pr["severity"])


# ---------------------------------------------------------------------------- main loop
def cosine_lr(base: float, progress: float, floor: float = 0.02) -> float:
    """Cosine decay from ``base`` to ``floor × base`` over progress 0..1.

    Progress is the larger of the epoch fraction and the fraction of ``--time-limit-min``
    used, so a run stopped by its time budget still ends with a small learning rate
    (on a shared CPU the number of epochs that fit is not known in advance).
    """
    p = min(max(progress, 0.0), 1.0)
    return base * (floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * p)))


def run(args: argparse.Namespace) -> int:
    """Train, validate every epoch, checkpoint, then write weights with anchors. Returns 0."""
    ctx = common.setup_distributed(args.device, args.threads)
    try:
        return _run(args, ctx)
    finally:
        ctx.cleanup()


def _run(args: argparse.Namespace, ctx: common.DistContext) -> int:
    rng = common.seed_everything(args.seed, ctx.rank)
    prep = SlicePrep(size=args.slice_size, slice_step_mm=args.slice_step_mm)
    cfg = RACNetConfig(backbone=args.backbone, slice_size=args.slice_size,
                       encoder_widths=tuple(int(w) for w in args.encoder_widths.split(",")))
    t_data = time.perf_counter()
    train_items, val_items, data_desc, synthetic = load_data(args, prep, ctx)
    data_s = time.perf_counter() - t_data
    log.info("data ready in %.0f s: %d training / %d validation scans on rank %d", data_s, len(train_items), len(val_items), ctx.rank)

    torch.manual_seed(args.seed)  # identical initial weights on every rank
    model = RACNet(cfg)
    net = ctx.wrap(model)
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    out_dir = Path(args.out)
    logger = common.MetricLogger(out_dir / "metrics.jsonl", enabled=ctx.is_main)

    start_epoch, spent_s, best = 1, 0.0, {"score": -1.0, "epoch": 0, "metrics": {}}
    best_state = None
    ckpt = None if args.no_resume else common.latest_checkpoint(out_dir)
    if ckpt is not None:
        info = common.load_checkpoint(ckpt, net, opt)
        start_epoch = info["epoch"] + 1
        spent_s = float(info["extra"].get("train_seconds", 0.0))
        best = info["extra"].get("best", best)
        best_path = out_dir / "best_model.pt"
        if best_path.exists():
            best_state = torch.load(best_path, map_location="cpu", weights_only=True)
        log.info("resumed from %s at epoch %d (%.0f s already spent)", ckpt.name, start_epoch, spent_s)

    # every rank must run the same number of steps per epoch (DDP all-reduces each one)
    n_local = len(train_items)
    if ctx.distributed:
        n_local = int(min(ctx.all_gather_array(np.asarray([n_local]))))
    steps = max(1, n_local // args.batch_size)
    limit_s = (args.time_limit_min or 0.0) * 60.0  # 0: no limit
    epoch = start_epoch - 1
    for epoch in range(start_epoch, args.epochs + 1):
        t0 = time.perf_counter()
        net.train()
        order = np.random.default_rng(args.seed * 1000 + epoch + ctx.rank).permutation(len(train_items))[: steps * args.batch_size]
        sums = {"total": 0.0, "covid": 0.0, "severity": 0.0, "coral": 0.0}
        for step, batch in enumerate(iterate_batches(train_items, args.batch_size, order)):
            elapsed = spent_s + time.perf_counter() - t0
            progress = (epoch - 1 + step / steps) / args.epochs
            if limit_s:
                progress = max(progress, elapsed / limit_s)
            if ctx.distributed:  # all ranks must use the same learning rate
                progress = ctx.all_reduce_mean(progress)
            for g in opt.param_groups:
                g["lr"] = cosine_lr(args.lr, progress)
            aug = _augment(batch, rng)
            b = collate(aug, flip_lr=rng.random(len(aug)) < 0.5)
            out = net(b["slices"], b["lengths"])
            losses = racnet_losses(out, b["covid"], b["severity"], b["domain"], args.coral_weight, args.severity_weight)
            opt.zero_grad(set_to_none=True)
            losses["total"].backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 5.0)
            opt.step()
            for k in sums:
                sums[k] += float(losses[k].detach()) / steps
        metrics = evaluate_items(net, val_items, ctx)
        spent_s += time.perf_counter() - t0
        if metrics["score"] > best["score"]:
            best = {"score": float(metrics["score"]), "epoch": epoch, "metrics": metrics}
            best_state = copy.deepcopy(common.unwrap(net).state_dict())
            if ctx.is_main:
                torch.save(best_state, out_dir / "best_model.pt")
        logger.log(epoch, loss=sums["total"], loss_covid=sums["covid"], loss_severity=sums["severity"], loss_coral=sums["coral"],
                   val_covid_f1=metrics["covid_macro_f1"], val_severity_f1=metrics["severity_macro_f1"],
                   val_covid_acc=metrics["covid_accuracy"], train_s=spent_s)
        if ctx.is_main:
            common.save_checkpoint(out_dir / f"checkpoint_{epoch:03d}.pt", net, opt, None, epoch,
                                   {"train_seconds": spent_s, "best": best})
        if limit_s and spent_s >= limit_s:
            log.info("time limit reached after epoch %d (%.0f s)", epoch, spent_s)
            break

    if best_state is not None:
        common.unwrap(net).load_state_dict(best_state)
    # anchors from the training scans (no augmentation), gathered over ranks
    anchor_state = anchor_tensors(net, train_items, args.anchors_k, args.seed, ctx)
    if ctx.is_main:
        state = {**common.unwrap(net).state_dict(), **anchor_state}
        card = ModelCard(
            architecture=ARCHITECTURE,
            architecture_version=ARCHITECTURE_VERSION,
            config={**model_card_config(cfg, prep, ANCHOR_CLASSES), "input": "jpg" if args.data == "cov19ctdb" else "hu"},
            training_data=args.training_data or data_desc,
            synthetic=synthetic,
            metrics={"validation": best.get("metrics", {}), "best_epoch": best.get("epoch", 0),
                     "epochs_run": epoch, "train_seconds": round(spent_s, 1), "data_seconds": round(data_s, 1),
                     "training_scans": int(len(train_items) * ctx.world_size),
                     "anchors_per_class": np.bincount(anchor_state["anchors.labels"].numpy(), minlength=len(ANCHOR_CLASSES)).tolist()},
            notes=("RACNet (our reading of the COV19-CT-DB abstract): per-slice CNN, GRU, dynamic routing, "
                   "latent alignment, COVID and severity heads, k-means latent anchors."
                   + (" Synthetic training data — not for diagnosis." if synthetic else "")),
        )
        path = args.weights_out or (out_dir / "racnet.safetensors")
        save_racnet_weights(path, state, card)
        log.info("weights written to %s (best epoch %d, score %.3f)", path, best.get("epoch", 0), best.get("score", float("nan")))
    ctx.barrier()
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
