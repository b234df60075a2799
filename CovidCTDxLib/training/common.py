"""Model-agnostic training utilities shared by every training loop (DeepSC-COVID, RACNet).

Why one module: device/DDP setup, seeding, resumable checkpoints, metric logging and the
evaluation metrics are the same whatever the network, and getting them subtly different
per model (e.g. two AUC definitions) would make reported numbers incomparable.

Distributed training follows ``torchrun`` conventions: when ``WORLD_SIZE`` > 1 in the
environment, :func:`setup_distributed` joins the process group (NCCL on GPUs, gloo on CPU);
otherwise everything runs in one process, which is the default.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, Mapping, Optional, Sequence, Union

import numpy as np
import torch
import torch.distributed as dist

from ..evaluation.scan_metrics import binary_auc

log = logging.getLogger(__name__)

PathLike = Union[str, Path]


# ============================================================================ devices / DDP
@dataclass
class DistContext:
    """Where this process runs and how it talks to its peers."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Only the main process writes checkpoints, logs and weights."""
        return self.rank == 0

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """Move ``model`` to the device and wrap it in DDP when distributed."""
        model = model.to(self.device)
        if not self.distributed:
            return model
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [self.local_rank] if self.device.type == "cuda" else None
        # find_unused_parameters: multi-task nets may skip a head on some batches.
        return DDP(model, device_ids=ids, find_unused_parameters=True)

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def all_reduce_mean(self, value: float) -> float:
        """Average a scalar over all processes (identity in single-process runs)."""
        if not self.distributed:
            return float(value)
        t = torch.tensor([float(value)], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return float(t.item()) / self.world_size

    def all_gather_array(self, array: np.ndarray) -> np.ndarray:
        """Concatenate per-process arrays along axis 0 (e.g. validation predictions)."""
        if not self.distributed:
            return array
        parts: list = [None] * self.world_size
        dist.all_gather_object(parts, np.asarray(array))
        return np.concatenate(parts, axis=0)

    def cleanup(self) -> None:
        if self.distributed and dist.is_initialized():
            dist.destroy_process_group()


def add_run_arguments(parser: argparse.ArgumentParser, default_out: Path) -> argparse._ArgumentGroup:
    """The run options every trainer shares, with one name each: output folder, resume, seed,
    device, threads and the wall-time limit (``--time-limit-min``)."""
    run = parser.add_argument_group("run")
    run.add_argument("-o", "--out", type=Path, default=default_out, help="output folder: checkpoints, metrics.jsonl, weights")
    run.add_argument("--no-resume", action="store_true", help="ignore an existing checkpoint in --out")
    run.add_argument(
        "--time-limit-min", type=float, default=None, help="stop after this much training wall time (minutes; weights are still saved)"
    )
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--device", choices=["cpu", "cuda"], default=None)
    run.add_argument("--threads", type=int, default=None)
    return run


def setup_distributed(device: Optional[str] = None, threads: Optional[int] = None) -> DistContext:
    """Create the :class:`DistContext` for this process.

    Args:
        device: "cpu", "cuda" or None (= cuda if available, else cpu).
        threads: torch intra-op threads on CPU; default = cores / local processes, so two
            gloo workers on a 2-core machine do not oversubscribe it.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
        n = threads or max(1, (os.cpu_count() or 1) // max(1, local_world))
        torch.set_num_threads(n)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
        log.info("joined process group: rank %d/%d on %s", rank, world, dev)
    return DistContext(rank=rank, local_rank=local_rank, world_size=world, device=dev)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The bare module inside DDP/DataParallel (what checkpoints and weights hold)."""
    return model.module if hasattr(model, "module") else model


def seed_everything(seed: int, rank: int = 0) -> np.random.Generator:
    """Seed python, numpy and torch (offset by rank so workers draw different patches).

    Returns a numpy Generator seeded the same way, for code that prefers explicit RNGs.
    """
    s = int(seed) + 1000 * int(rank)
    random.seed(s)
    np.random.seed(s % (2**32))
    torch.manual_seed(s)
    return np.random.default_rng(s)


# ============================================================================ checkpoints
def save_checkpoint(
    path: PathLike,
    model: torch.nn.Module,
    optimizer: Optional[torch.optim.Optimizer] = None,
    scheduler: Optional[Any] = None,
    epoch: int = 0,
    extra: Optional[Mapping[str, Any]] = None,
) -> Path:
    """Write a resumable training checkpoint atomically (tmp file + rename).

    Why not the weights format: resuming needs optimizer/scheduler state (non-tensor
    values). It is still read back with ``weights_only=True``, so a checkpoint cannot run
    code either; ship final models with :func:`CovidCTDxLib.weights.save_weights`.
    ``extra`` must hold plain types (numbers, strings, lists, dicts, tensors).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {
        "model": unwrap(model).state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "epoch": int(epoch),
        "extra": dict(extra or {}),
        "rng_torch": torch.get_rng_state(),
    }
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    tmp.replace(path)
    return path


def load_checkpoint(
    path: PathLike,
    model: torch.nn.Module,
    optimizer: Optional[torch.optim.Optimizer] = None,
    scheduler: Optional[Any] = None,
    map_location: Union[str, torch.device] = "cpu",
) -> Dict[str, Any]:
    """Restore a checkpoint written by :func:`save_checkpoint`; return ``{"epoch", "extra"}``.

    ``epoch`` is the last completed epoch, so a loop resumes at ``epoch + 1``.
    """
    from ..errors import WeightsError

    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"Checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises several types for corrupt / unsafe files
        raise WeightsError(f"Checkpoint {path.name} cannot be read safely ({exc}).") from exc
    unwrap(model).load_state_dict(state["model"])
    if optimizer is not None and state.get("optimizer") is not None:
        optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None and state.get("scheduler") is not None:
        scheduler.load_state_dict(state["scheduler"])
    if state.get("rng_torch") is not None:
        torch.set_rng_state(state["rng_torch"])
    return {"epoch": int(state.get("epoch", 0)), "extra": state.get("extra", {})}


def latest_checkpoint(directory: PathLike, pattern: str = "checkpoint_*.pt") -> Optional[Path]:
    """The newest checkpoint in ``directory`` by modification time, or None."""
    files = sorted(Path(directory).glob(pattern), key=lambda p: p.stat().st_mtime)
    return files[-1] if files else None


# ============================================================================ logging
class MetricLogger:
    """Append one JSON line of metrics per epoch and echo a compact line to ``logging``.

    Why JSON lines: a crash mid-run keeps every finished epoch, a resumed run appends, and
    the file is trivially plotted or diffed.
    """

    def __init__(self, path: Optional[PathLike], enabled: bool = True) -> None:
        self.path = Path(path) if path else None
        self.enabled = enabled
        self.history: list = []
        self._t0 = time.perf_counter()
        if self.enabled and self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def log(self, epoch: int, **metrics: Any) -> Dict[str, Any]:
        row = {"epoch": int(epoch), "elapsed_s": round(time.perf_counter() - self._t0, 2)}
        row.update({k: _jsonable(v) for k, v in metrics.items()})
        self.history.append(row)
        if self.enabled:
            if self.path is not None:
                with open(self.path, "a") as f:
                    f.write(json.dumps(row) + "\n")
            brief = " ".join(
                f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items() if not isinstance(v, (list, dict))
            )
            log.info("%s", brief)
        return row


def _jsonable(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        v = v.detach().cpu().numpy()
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, (np.floating, np.integer)):
        return v.item()
    return v


# ============================================================================ metrics
def confusion_matrix(y_true: Sequence[int], y_pred: Sequence[int], n_classes: int) -> np.ndarray:
    """``cm[i, j]`` = number of samples of true class i predicted as j."""
    cm = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(cm, (np.asarray(y_true, int), np.asarray(y_pred, int)), 1)
    return cm


def accuracy(y_true: Sequence[int], y_pred: Sequence[int]) -> float:
    t, p = np.asarray(y_true), np.asarray(y_pred)
    return float(np.mean(t == p)) if t.size else float("nan")


def macro_f1(y_true: Sequence[int], y_pred: Sequence[int], n_classes: int) -> float:
    """Unweighted mean F1 over classes present in truth or prediction."""
    cm = confusion_matrix(y_true, y_pred, n_classes)
    f1s = []
    for c in range(n_classes):
        tp = cm[c, c]
        fp = cm[:, c].sum() - tp
        fn = cm[c, :].sum() - tp
        if tp + fp + fn == 0:
            continue
        f1s.append(2 * tp / (2 * tp + fp + fn))
    return float(np.mean(f1s)) if f1s else float("nan")


def roc_auc(y_true: Sequence[int], probabilities: np.ndarray) -> float:
    """Macro one-vs-rest ROC AUC for (N, C) probabilities; binary AUC for (N,) scores.

    Classes absent from ``y_true`` are skipped (their AUC is undefined).
    """
    p = np.asarray(probabilities, dtype=float)
    y = np.asarray(y_true, int)
    if p.ndim == 1:
        return binary_auc(y, p)
    aucs = [binary_auc(y == c, p[:, c]) for c in range(p.shape[1])]
    aucs = [a for a in aucs if np.isfinite(a)]
    return float(np.mean(aucs)) if aucs else float("nan")


def classification_metrics(y_true: Sequence[int], probabilities: np.ndarray, class_names: Sequence[str]) -> Dict[str, Any]:
    """Accuracy, macro-F1, macro AUC and confusion matrix from (N, C) probabilities."""
    p = np.asarray(probabilities, dtype=float)
    y = np.asarray(y_true, int)
    pred = p.argmax(axis=1) if p.size else np.zeros(0, int)
    n = len(class_names)
    return {
        "accuracy": accuracy(y, pred),
        "macro_f1": macro_f1(y, pred, n),
        "auc": roc_auc(y, p) if p.size else float("nan"),
        "confusion_matrix": confusion_matrix(y, pred, n).tolist(),
        "classes": list(class_names),
    }


def mean_of(values: Iterable[float]) -> float:
    """Mean ignoring NaNs (NaN if nothing is finite)."""
    v = np.asarray([x for x in values if np.isfinite(x)], dtype=float)
    return float(v.mean()) if v.size else float("nan")
