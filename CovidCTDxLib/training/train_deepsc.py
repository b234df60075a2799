"""``covidctdx train deepsc``: train DeepSC-COVID with the paper's two-stage schedule.

Stage 1 (lr 1e-3): segmentation + classification losses — each subnet learns its task.
Stage 2 (lr 1e-4): all subnets fine-tuned jointly, adding the task-aware loss that couples
the lesion maps and the classifier's evidence maps. Both stages use Adam (0.9, 0.999) with
linear learning-rate decay (to 10 % at the end of the stage), as in the paper.

Every epoch: a resumable checkpoint (``checkpoint_last.pt``), validation on whole scans
(sliding window, as in inference) with lesion Dice, accuracy, macro AUC, macro-F1 and the
confusion matrix, appended to ``metrics.jsonl``. At the end: ``deepsc.safetensors`` with its
model card. Under ``torchrun --nproc_per_node N`` the same command trains with
DistributedDataParallel (gloo on CPU, NCCL on GPUs); rank 0 validates and writes files.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

from .. import __version__
from ..deepsc.inference import infer_prepared
from ..evaluation import scan_metrics
from ..models.deepsc import ARCHITECTURE, ARCHITECTURE_VERSION, DeepSCConfig, DeepSCCovid, DeepSCOutputs
from ..result import CLASS_KEYS
from ..weights import ModelCard, save_weights
from . import common
from .datasets import PatchDataset, PreparedCase, discover, load_record, phantom_case
from .losses import DeepSCLossWeights, deepsc_loss, inverse_frequency_weights

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint_last.pt"
WEIGHTS = "deepsc.safetensors"


@dataclass
class TrainOptions:
    """Schedule and bookkeeping; defaults follow the paper where it says something."""

    epochs_stage1: int = 20
    epochs_stage2: int = 10
    lr_stage1: float = 1e-3
    lr_stage2: float = 1e-4
    final_lr_fraction: float = 0.1
    batch_size: int = 2
    patches_per_case: int = 4
    lesion_fraction: float = 0.6
    seed: int = 0
    max_minutes: Optional[float] = None
    stage1_time_fraction: float = 0.75
    bf16: bool = False
    out_dir: Path = Path("deepsc_run")
    resume: bool = True
    device: Optional[str] = None
    threads: Optional[int] = None
    validate_every: int = 1
    val_window_scale: float = 1.0
    training_data: str = "unspecified"
    synthetic: bool = False
    notes: str = ""
    loss_weights: DeepSCLossWeights = field(default_factory=DeepSCLossWeights)


@dataclass
class TrainResult:
    weights_path: Optional[Path]
    history: List[Dict[str, Any]]
    wall_seconds: float
    stopped_early: bool


# ============================================================================ validation
def validate(model: DeepSCCovid, cases: Sequence[PreparedCase], window_scale: float = 1.0) -> Dict[str, Any]:
    """Whole-scan metrics on prepared cases: lesion Dice (inside the lung), classification."""
    model.eval()
    dices, probs, labels = [], [], []
    with torch.inference_mode():
        for case in cases:
            win = infer_prepared(model, case.scan, window_scale=window_scale)
            prob, cls = win.lesion_probability, win.class_probabilities
            if case.has_lesion_labels:
                dices.append(scan_metrics.dice((prob >= 0.5).numpy(), case.lesion.numpy(), case.scan.lung.numpy()))
            probs.append(cls)
            labels.append(case.label)
    metrics = common.classification_metrics(labels, np.asarray(probs), CLASS_KEYS)
    metrics["dice"] = common.mean_of(dices)
    metrics["dice_per_case"] = [round(d, 4) for d in dices]
    return metrics


# ============================================================================ training
def _lr_lambda(total_steps: int, final_fraction: float):
    def f(step: int) -> float:
        return 1.0 - (1.0 - final_fraction) * min(1.0, step / max(1, total_steps))

    return f


def train(
    train_cases: Sequence[PreparedCase],
    val_cases: Sequence[PreparedCase],
    config: DeepSCConfig,
    options: TrainOptions,
    ctx: Optional[common.DistContext] = None,
) -> TrainResult:
    """Two-stage training on prepared cases; resumes from ``out_dir/checkpoint_last.pt``."""
    t_start = time.perf_counter()
    ctx = ctx or common.setup_distributed(options.device, options.threads)
    out = Path(options.out_dir)
    if ctx.is_main:
        out.mkdir(parents=True, exist_ok=True)
    common.seed_everything(options.seed, ctx.rank)
    model = DeepSCCovid(config)
    ddp_model = ctx.wrap(model)
    dataset = PatchDataset(train_cases, config, options.patches_per_case, options.lesion_fraction, options.seed)
    sampler = DistributedSampler(dataset, ctx.world_size, ctx.rank, shuffle=True, seed=options.seed) if ctx.distributed else None
    loader = DataLoader(
        dataset,
        batch_size=options.batch_size,
        shuffle=sampler is None,
        sampler=sampler,
        drop_last=len(dataset) >= options.batch_size * ctx.world_size,
    )
    class_weights = inverse_frequency_weights([c.label for c in train_cases], config.num_classes).to(ctx.device)
    total_epochs = options.epochs_stage1 + options.epochs_stage2
    logger = common.MetricLogger(out / "metrics.jsonl", enabled=ctx.is_main)

    def make_stage(stage: int):
        lr = options.lr_stage1 if stage == 1 else options.lr_stage2
        epochs = options.epochs_stage1 if stage == 1 else options.epochs_stage2
        opt = torch.optim.Adam(ddp_model.parameters(), lr=lr, betas=(0.9, 0.999))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(epochs * max(1, len(loader)), options.final_lr_fraction))
        return opt, sched

    start_epoch, stage = 0, 1 if options.epochs_stage1 > 0 else 2
    optimizer, scheduler = make_stage(stage)
    ckpt = out / CHECKPOINT
    if options.resume and ckpt.exists():
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
        saved_stage = int(state.get("extra", {}).get("stage", 1))
        done = int(state.get("epoch", 0))
        stage = 1 if done < options.epochs_stage1 else 2
        if stage != saved_stage:
            optimizer, scheduler = make_stage(stage)
            common.load_checkpoint(ckpt, model, map_location=ctx.device)
        else:
            common.load_checkpoint(ckpt, model, optimizer, scheduler, map_location=ctx.device)
        start_epoch = done
        logger.history = (
            [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()] if (out / "metrics.jsonl").exists() else []
        )
        log.info("resumed from %s after epoch %d (stage %d)", ckpt, done, stage)

    stopped_early = False
    deadline = t_start + 60 * options.max_minutes if options.max_minutes else None
    # With a time budget, stage 1 also ends once its share of the budget is used, so the
    # joint fine-tuning stage always gets to run.
    stage1_deadline = t_start + 60 * options.max_minutes * options.stage1_time_fraction if options.max_minutes else None
    for epoch in range(start_epoch, total_epochs):
        new_stage = 1 if epoch < options.epochs_stage1 else 2
        if stage == 2 or (stage1_deadline is not None and time.perf_counter() > stage1_deadline and options.epochs_stage2 > 0):
            new_stage = 2
        if new_stage != stage:
            stage = new_stage
            optimizer, scheduler = make_stage(stage)
        weights = options.loss_weights if stage == 2 else DeepSCLossWeights(options.loss_weights.seg, options.loss_weights.cls, 0.0)
        dataset.set_epoch(epoch)
        if sampler is not None:
            sampler.set_epoch(epoch)
        ddp_model.train()
        sums: Dict[str, float] = {}
        n = 0
        for batch in loader:
            batch = {k: v.to(ctx.device) for k, v in batch.items()}
            with torch.autocast(ctx.device.type, dtype=torch.bfloat16, enabled=options.bf16):
                outs = ddp_model(batch["patch"], batch["slices"], batch["box"])
            if options.bf16:  # losses in float32
                outs = DeepSCOutputs(
                    outs.seg_logits.float(), [o.float() for o in outs.deep_logits], outs.cls_logits.float(), [c.float() for c in outs.cams]
                )
            terms = deepsc_loss(
                outs,
                batch["lesion"],
                batch["lung"],
                batch["label"],
                batch["box"],
                class_weights,
                weights,
                batch["seg_valid"],
                config.seg_class_weights,
            )
            optimizer.zero_grad(set_to_none=True)
            terms["total"].backward()
            optimizer.step()
            scheduler.step()
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach())
            n += 1
            if deadline is not None and time.perf_counter() > deadline:
                stopped_early = True
                break
        row: Dict[str, Any] = {"stage": stage, "lr": optimizer.param_groups[0]["lr"]}
        row.update({f"loss_{k}": ctx.all_reduce_mean(v / max(1, n)) for k, v in sums.items()})
        last = epoch == total_epochs - 1 or stopped_early
        if ctx.is_main:
            common.save_checkpoint(ckpt, model, optimizer, scheduler, epoch + 1, {"stage": stage})
            if val_cases and ((epoch + 1) % options.validate_every == 0 or last):
                row.update(validate(model, val_cases, options.val_window_scale))
        logger.log(epoch + 1, **row)
        ctx.barrier()
        if stopped_early:
            log.warning("time limit of %.1f min reached after epoch %d; stopping", options.max_minutes, epoch + 1)
            break

    wall = time.perf_counter() - t_start
    weights_path = None
    if ctx.is_main:
        final = next((r for r in reversed(logger.history) if "accuracy" in r), {})
        metrics = {k: final[k] for k in ("dice", "accuracy", "auc", "macro_f1", "confusion_matrix") if k in final}
        metrics.update({"epochs": len(logger.history), "train_wall_s": round(wall, 1)})
        card = model_card(config, options.training_data, options.synthetic, metrics, options.notes)
        weights_path = out / WEIGHTS
        save_weights(weights_path, model.state_dict(), card)
    ctx.barrier()
    return TrainResult(weights_path, logger.history, wall, stopped_early)


def model_card(config: DeepSCConfig, training_data: str, synthetic: bool, metrics: Dict[str, Any], notes: str = "") -> ModelCard:
    """The one place a DeepSC-COVID model card is built (trainer and demo-weights tool)."""
    return ModelCard(
        architecture=ARCHITECTURE,
        architecture_version=ARCHITECTURE_VERSION,
        config=config.to_dict(),
        training_data=training_data,
        synthetic=synthetic,
        metrics=metrics,
        project_version=__version__,
        notes=notes,
    )


# ============================================================================ CLI
def _triple(text: str, cast=float):
    parts = [cast(v) for v in text.split(",")]
    if len(parts) != 3:
        raise argparse.ArgumentTypeError("expected three comma-separated numbers")
    return tuple(parts)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="covidctdx train deepsc", description="Train DeepSC-COVID (two-stage schedule, resumable, DDP under torchrun)."
    )
    src = p.add_argument_group("data")
    src.add_argument(
        "--data", type=Path, action="append", default=[], help="dataset folder (DeepSC-COVID or MosMedData layout) or CSV; repeatable"
    )
    src.add_argument("--layout", default="auto", choices=["auto", "deepsc", "mosmed", "csv"])
    src.add_argument(
        "--val-data", type=Path, action="append", default=[], help="validation set (same formats); default: split off --val-fraction"
    )
    src.add_argument("--val-fraction", type=float, default=0.2)
    src.add_argument("--phantoms", type=int, default=0, help="add N synthetic phantoms (covid/cap/normal in turn) to the training data")
    src.add_argument("--training-data", default=None, help="description stored in the model card")
    net = p.add_argument_group("network")
    net.add_argument("--config", default="cpu", help="'cpu', 'paper' or a JSON file with DeepSCConfig fields")
    net.add_argument("--width", type=int)
    net.add_argument("--patch", type=lambda s: _triple(s, int), help="patch size z,y,x")
    net.add_argument("--cls-slices", type=int)
    net.add_argument("--cls-size", type=int)
    net.add_argument("--spacing", type=_triple, help="model spacing x,y,z mm")
    sch = p.add_argument_group("schedule")
    sch.add_argument("--epochs-stage1", type=int, default=20)
    sch.add_argument("--epochs-stage2", type=int, default=10)
    sch.add_argument("--lr-stage1", type=float, default=1e-3)
    sch.add_argument("--lr-stage2", type=float, default=1e-4)
    sch.add_argument("--batch-size", type=int, default=2)
    sch.add_argument("--patches-per-case", type=int, default=4)
    sch.add_argument("--bf16", action="store_true", help="bfloat16 autocast (fast on CPUs with AMX / GPUs)")
    common.add_run_arguments(p, Path("deepsc_run"))
    return p


def config_from_args(args: argparse.Namespace) -> DeepSCConfig:
    if args.config == "cpu":
        cfg = DeepSCConfig.cpu().to_dict()
    elif args.config == "paper":
        cfg = DeepSCConfig.paper().to_dict()
    else:
        cfg = json.loads(Path(args.config).read_text())
    for key, attr in (
        ("width", "width"),
        ("patch_size", "patch"),
        ("cls_slices", "cls_slices"),
        ("cls_size", "cls_size"),
        ("spacing", "spacing"),
    ):
        v = getattr(args, attr, None)
        if v is not None:
            cfg[key] = v
    return DeepSCConfig.from_dict(cfg)


def _phantom_specs(n: int, seed: int):
    kinds = [
        ("covid", "moderate"),
        ("cap", "mild"),
        ("normal", None),
        ("covid", "severe"),
        ("cap", "moderate"),
        ("normal", None),
        ("covid", "mild"),
    ]
    return [(kinds[i % len(kinds)][0], kinds[i % len(kinds)][1], seed * 1000 + i) for i in range(n)]


def run(args: argparse.Namespace) -> int:
    """Entry point of ``covidctdx train deepsc``; returns the exit code."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    ctx = common.setup_distributed(args.device, args.threads)
    config = config_from_args(args)
    records = [r for d in args.data for r in discover(d, args.layout)]
    val_records = [r for d in args.val_data for r in discover(d, args.layout)]
    if not records and not args.phantoms:
        raise SystemExit("Nothing to train on: give --data and/or --phantoms.")
    if records and not val_records and args.val_fraction > 0:
        rng = np.random.default_rng(args.seed)
        order = rng.permutation(len(records))
        n_val = max(1, int(round(len(records) * args.val_fraction))) if len(records) > 1 else 0
        val_records = [records[i] for i in order[:n_val]]
        records = [records[i] for i in order[n_val:]]
    train_cases = [load_record(r, config) for r in records]
    val_cases = [load_record(r, config) for r in val_records]
    if args.phantoms:
        train_cases += [phantom_case(k, s, sd, config) for k, s, sd in _phantom_specs(args.phantoms, args.seed)]
        if not val_cases:
            val_cases = [phantom_case(k, s, sd, config) for k, s, sd in _phantom_specs(3, args.seed + 1)]
    desc = args.training_data or (
        "synthetic phantoms" if not records else f"{len(records)} scans from {', '.join(str(d) for d in args.data)}"
    )
    options = TrainOptions(
        epochs_stage1=args.epochs_stage1,
        epochs_stage2=args.epochs_stage2,
        lr_stage1=args.lr_stage1,
        lr_stage2=args.lr_stage2,
        batch_size=args.batch_size,
        patches_per_case=args.patches_per_case,
        seed=args.seed,
        max_minutes=args.time_limit_min,
        bf16=args.bf16,
        out_dir=args.out,
        resume=not args.no_resume,
        device=args.device,
        threads=args.threads,
        training_data=desc,
        synthetic=not records,
    )
    result = train(train_cases, val_cases, config, options, ctx)
    if ctx.is_main:
        log.info("done in %.1f s; weights: %s", result.wall_seconds, result.weights_path)
    ctx.cleanup()
    return 0
