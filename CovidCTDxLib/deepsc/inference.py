"""DeepSC-COVID on a whole CT: preprocessing shared with training, sliding-window inference,
paste-back to the CT grid.

Preprocessing (docs/ARCHITECTURE.md, DeepSC-COVID): reorient to a canonical patient frame, crop to the
lung bounding box (+ margin), clip HU to the model's window and scale to 0..1, zero
everything outside the lungs, resample to the model's spacing. The lesion subnet then runs
over overlapping patches whose outputs are blended with a Gaussian weight (centre voxels
are trusted more than patch borders); class probabilities and evidence maps are averaged
over patches weighted by how much lung each patch holds. Outputs are resampled back to the
original CT grid and orientation.

Training (``training/datasets.py``) uses :func:`prepare_scan` and :func:`slice_stack` too,
so the network sees identical inputs in both.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import LungsNotFoundError, WeightsError
from ..grid import bbox
from ..models.deepsc import ARCHITECTURE, DeepSCConfig, DeepSCCovid, evidence_map, lesion_probability
from ..progress import ProgressCallback
from ..result import CLASS_KEYS, LungMasks, Provenance
from ..volume import CTVolume
from ..weights import LoadedWeights, load_weights
from .ood import PREFIX as OOD_PREFIX
from .ood import FeatureStatistics

log = logging.getLogger(__name__)

#: Lung bounding box margin: keeps pleural-based lesions away from the crop border.
BOX_MARGIN_MM = 6.0
WINDOW_BATCH = 4


# ============================================================================ preprocessing
@dataclass
class PreparedScan:
    """A scan on the model grid, plus what is needed to paste results back.

    ``volume``/``lung`` are (Z, Y, X) on the model grid, padded at the end to at least
    the patch size; ``crop`` is the lung box in the canonical CT array; ``shape`` is the
    unpadded model-grid shape.
    """

    volume: torch.Tensor  # float32 0..1, zero outside the lungs
    lung: torch.Tensor  # bool
    crop: Tuple[slice, slice, slice]
    shape: Tuple[int, int, int]
    extras: Dict[str, torch.Tensor] = field(default_factory=dict)  # e.g. resampled lesion labels


def lung_box(lung: np.ndarray, spacing_zyx: Sequence[float], margin_mm: float = BOX_MARGIN_MM) -> Tuple[slice, slice, slice]:
    """Bounding box of ``lung`` grown by ``margin_mm``, clipped to the array."""
    box = bbox(lung, [int(np.ceil(margin_mm / s)) for s in spacing_zyx])
    if box is None:
        raise LungsNotFoundError("No lung voxels were found, so DeepSC-COVID cannot run. Check that the scan covers the chest.")
    return box


def _resize(t: torch.Tensor, size: Sequence[int], mode: str = "trilinear") -> torch.Tensor:
    """Resize a (Z, Y, X) tensor; identity when the size already matches."""
    if tuple(t.shape) == tuple(size):
        return t
    kw = {} if mode == "nearest" else {"align_corners": False}
    return F.interpolate(t[None, None], size=tuple(size), mode=mode, **kw)[0, 0]


def model_grid_shape(crop_shape: Sequence[int], spacing_zyx: Sequence[float], config: DeepSCConfig) -> Tuple[int, int, int]:
    target = (config.spacing[2], config.spacing[1], config.spacing[0])
    return tuple(max(1, int(round(n * s / t))) for n, s, t in zip(crop_shape, spacing_zyx, target))  # type: ignore[return-value]


def prepare_scan(
    hu: np.ndarray,
    lung: np.ndarray,
    spacing_zyx: Sequence[float],
    config: DeepSCConfig,
    extras: Optional[Dict[str, np.ndarray]] = None,
) -> PreparedScan:
    """Window, lung-mask, crop and resample a canonical (z, y, x) HU array for the model.

    ``extras`` are label masks on the same grid (e.g. ``{"lesion": ...}``) resampled the
    same way (linear interpolation, threshold 0.5), for training.
    """
    crop = lung_box(lung, spacing_zyx)
    lo, hi = config.hu_window
    sub = torch.from_numpy(np.ascontiguousarray(hu[crop], dtype=np.float32))
    lung_sub = torch.from_numpy(np.ascontiguousarray(lung[crop])).float()
    vol = ((sub.clamp_(lo, hi) - lo) / (hi - lo)).mul_(lung_sub)
    shape = model_grid_shape(vol.shape, spacing_zyx, config)
    vol = _resize(vol, shape)
    lung_m = _resize(lung_sub, shape) > 0.5
    vol = vol * lung_m
    out_extras = {k: _resize(torch.from_numpy(np.ascontiguousarray(v[crop])).float(), shape) > 0.5 for k, v in (extras or {}).items()}
    pad = [max(0, p - n) for p, n in zip(config.patch_size, shape)]
    if any(pad):
        spec = (0, pad[2], 0, pad[1], 0, pad[0])
        vol = F.pad(vol, spec)
        lung_m = F.pad(lung_m, spec)
        out_extras = {k: F.pad(v, spec) for k, v in out_extras.items()}
    return PreparedScan(vol.contiguous(), lung_m.contiguous(), crop, shape, out_extras)


def slice_stack(volume: torch.Tensor, config: DeepSCConfig, offsets: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(1, S, c, c) classification input: S slices evenly spaced over z, resized in-plane.

    Slice i is the one at the centre of the i-th of S equal z-intervals, matching the
    ``align_corners=False`` convention of the patch boxes. ``offsets`` (S values in
    [-0.5, 0.5), training only) move each pick within its interval, so the classifier
    sees different slices of the same scan instead of memorising one fixed stack.
    """
    z = volume.shape[0]
    pos = torch.arange(config.cls_slices, dtype=torch.float64) + 0.5
    if offsets is not None:
        pos = pos + offsets.double()
    idx = (pos * z / config.cls_slices).long().clamp_(0, z - 1)
    sl = volume[idx][None]  # (1, S, Y, X)
    sl = F.interpolate(sl, size=(config.cls_size, config.cls_size), mode="bilinear", align_corners=False, antialias=True)
    return sl  # (C=1, S, c, c): one dataset sample; batch it as (N, 1, S, c, c)


# ============================================================================ windows
def window_starts(n: int, p: int, overlap: float) -> List[int]:
    """Start indices covering [0, n) with patches of size p and the given overlap fraction."""
    if n <= p:
        return [0]
    step = max(1, int(round(p * (1 - overlap))))
    starts = list(range(0, n - p, step))
    starts.append(n - p)
    return sorted(set(starts))


def gaussian_weight(size: Sequence[int], sigma_scale: float = 0.125) -> torch.Tensor:
    """nnU-Net style importance map: a Gaussian centred on the patch, min clipped > 0."""
    axes = []
    for n in size:
        x = torch.arange(n, dtype=torch.float32) - (n - 1) / 2
        axes.append(torch.exp(-0.5 * (x / (n * sigma_scale)) ** 2))
    g = axes[0][:, None, None] * axes[1][None, :, None] * axes[2][None, None, :]
    g = g / g.max()
    return g.clamp_min(1e-3)


# ============================================================================ model
def load_model(weights: Union[LoadedWeights, str, Path]) -> Tuple[DeepSCCovid, LoadedWeights]:
    """Build the network described by the weights' card and load its tensors (the ``ood.``
    statistics, see :func:`load_statistics`, are not network parameters)."""
    if not isinstance(weights, LoadedWeights):
        weights = load_weights(weights, expected_architecture=ARCHITECTURE)
    try:
        config = DeepSCConfig.from_dict(weights.card.config)
    except (TypeError, ValueError) as exc:
        raise WeightsError(f"{weights.path.name}: the model card's DeepSC config is invalid ({exc}).") from exc
    model = DeepSCCovid(config)
    state = {k: v for k, v in weights.state_dict.items() if not k.startswith(OOD_PREFIX)}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise WeightsError(f"{weights.path.name} does not fit the DeepSC-COVID network its card describes ({exc}).") from exc
    return model.eval(), weights


def load_statistics(weights: LoadedWeights) -> Optional[FeatureStatistics]:
    """The OOD feature statistics shipped in the weights file, or None (see ``deepsc/ood.py``).

    Why the size check: statistics of another network width would compare unrelated numbers.
    """
    stats = FeatureStatistics.from_state(weights.state_dict)
    width = DeepSCConfig.from_dict(weights.card.config).width
    if stats is not None and stats.means.shape[1] != 14 * width:
        raise WeightsError(f"{weights.path.name}: OOD statistics have {stats.means.shape[1]} features, the network {14 * width}.")
    return stats


def default_threads() -> int:
    """CPU threads for inference: the cores not already busy, at least one.

    Why not simply all cores: on a shared machine intra-op threads that lose their core
    stall each other at every barrier; measured on the 2-core target with a load of ~3,
    DeepSC took 3-5x longer with 2 threads than with 1. On an idle machine this returns
    all cores.
    """
    cores = os.cpu_count() or 1
    try:
        busy = os.getloadavg()[0]
    except (AttributeError, OSError):  # not available on Windows
        busy = 0.0
    return max(1, min(cores, int(cores - busy + 0.5)))


@dataclass
class DeepSCOutput:
    """DeepSC-COVID results on the original CT grid (z, y, x)."""

    lesion_probability: np.ndarray  # float32 0..1
    lesion_mask: np.ndarray  # bool
    evidence: np.ndarray  # float32 0..1, CAM of the predicted class
    probabilities: Dict[str, float]  # over result.CLASS_KEYS
    provenance: Provenance
    windows: int = 0
    seconds: float = 0.0
    feature: Optional[np.ndarray] = None  # (14w,) pooled classification feature, window-averaged
    #: Mahalanobis distance to the nearest class mean and its threshold; None without statistics.
    ood_distance: Optional[float] = None
    ood_threshold: Optional[float] = None

    @property
    def out_of_distribution(self) -> Optional[bool]:
        """True when the scan is farther than the threshold from every class; None when unchecked."""
        if self.ood_distance is None or self.ood_threshold is None:
            return None
        return self.ood_distance > self.ood_threshold


class WindowOutputs(NamedTuple):
    """What the sliding window gives, on the model grid."""

    lesion_probability: torch.Tensor  # (Z, Y, X) on the padded grid
    class_probabilities: np.ndarray  # (K,)
    evidence: torch.Tensor  # (K, S, c, c) on the slice grid
    windows: int
    feature: np.ndarray  # (14w,) pooled classification feature, lung-weighted over windows


def plan_axis(n: int, patch: int, overlap: float, scale: float) -> Tuple[int, List[int]]:
    """Window size and starts along one axis of length ``n``.

    With ``scale`` = 1 windows have the training patch size. With ``scale`` > 1 the
    windows grow (up to ``scale`` × patch, multiples of 8) so that fewer, larger windows
    cover the axis: the lesion subnet is fully convolutional, and large windows run
    several times faster per voxel on CPU while the overlap overhead shrinks.
    """
    if scale <= 1.0:
        return patch, window_starts(n, patch, overlap)
    biggest = max(patch, int(patch * scale) // 8 * 8)
    if n <= biggest:
        return max(patch, -(-n // 8) * 8), [0]
    o = int(round(patch * overlap))
    k = -(-(n - o) // (biggest - o))
    window = -(-(n + (k - 1) * o) // k)  # ceil: k windows with overlap o cover n
    size = max(patch, -(-window // 8) * 8)
    starts = sorted({int(round(v)) for v in np.linspace(0, n - size, k)})
    return size, starts


def infer_prepared(
    model: DeepSCCovid,
    scan: PreparedScan,
    overlap: float = 0.25,
    progress: Optional[ProgressCallback] = None,
    window_scale: float = 1.0,
) -> WindowOutputs:
    """Sliding window on the model grid. Class probabilities, evidence and the pooled
    feature are averaged over windows weighted by how much lung each window holds."""
    cfg = model.config
    vol, lung = scan.volume, scan.lung
    Z, Y, X = vol.shape
    plans = [plan_axis(n, p, overlap, window_scale) for n, p in zip((Z, Y, X), cfg.patch_size)]
    size = tuple(p[0] for p in plans)
    need = [max(n, s) for n, s in zip((Z, Y, X), size)]
    if need != [Z, Y, X]:  # windows larger than the scan: pad with "no lung"
        spec = (0, need[2] - X, 0, need[1] - Y, 0, need[0] - Z)
        vol, lung = F.pad(vol, spec), F.pad(lung, spec)
    Zp, Yp, Xp = vol.shape
    slices = slice_stack(scan.volume, cfg)[None]  # (1, 1, S, c, c); boxes refer to the unpadded scan
    feats = model.encode_slices(slices)
    g = gaussian_weight(size)
    acc = torch.zeros(Zp, Yp, Xp)
    wsum = torch.zeros(Zp, Yp, Xp)
    cls_acc = torch.zeros(cfg.num_classes, dtype=torch.float64)
    ev_acc = torch.zeros(cfg.num_classes, cfg.cls_slices, cfg.cls_size, cfg.cls_size)
    feat_acc = torch.zeros(14 * cfg.width, dtype=torch.float64)
    total_w = 0.0
    sz, sy, sx = size
    starts = [
        (z, y, x)
        for z in plans[0][1]
        for y in plans[1][1]
        for x in plans[2][1]
        if bool(lung[z : z + sz, y : y + sy, x : x + sx].any())
    ]
    batch = max(1, WINDOW_BATCH * int(np.prod(cfg.patch_size)) // int(np.prod(size)))
    for b0 in range(0, len(starts), batch):
        chunk = starts[b0 : b0 + batch]
        patches = torch.stack([vol[z : z + sz, y : y + sy, x : x + sx] for z, y, x in chunk])[:, None]
        boxes = torch.tensor([[z / Z, (z + sz) / Z, y / Y, (y + sy) / Y, x / X, (x + sx) / X] for z, y, x in chunk])
        out = model(patches, box=boxes, slice_features=feats)
        prob = lesion_probability(out.seg_logits, cfg)
        cls = torch.softmax(out.cls_logits, dim=1).double()
        ev = evidence_map(out.cams, (cfg.cls_slices, cfg.cls_size, cfg.cls_size))
        for i, (z, y, x) in enumerate(chunk):
            acc[z : z + sz, y : y + sy, x : x + sx] += prob[i] * g
            wsum[z : z + sz, y : y + sy, x : x + sx] += g
            w = float(lung[z : z + sz, y : y + sy, x : x + sx].float().mean())
            cls_acc += w * cls[i]
            ev_acc += w * ev[i]
            feat_acc += w * out.pooled[i].double()
            total_w += w
        if progress is not None:
            progress(0.1 + 0.75 * min(1.0, (b0 + len(chunk)) / len(starts)), f"DeepSC-COVID window {b0 + len(chunk)}/{len(starts)}")
    prob_map = (torch.where(wsum > 0, acc / wsum.clamp_min(1e-6), torch.zeros(())) * lung)[:Z, :Y, :X]
    norm = max(total_w, 1e-9)
    return WindowOutputs(prob_map, (cls_acc / norm).numpy(), ev_acc / norm, len(starts), (feat_acc / norm).numpy())


def _to_ct_grid(grid_map: torch.Tensor, scan: PreparedScan, lung: np.ndarray) -> np.ndarray:
    """Resample a model-grid map (unpadded extent) to the lung box, zero it outside the
    lungs and paste it into a zero array of the canonical CT shape.

    Masking only inside the box keeps the full-volume work to one allocation.
    """
    Z, Y, X = scan.shape
    crop_shape = tuple(s.stop - s.start for s in scan.crop)
    out = np.zeros(lung.shape, dtype=np.float32)
    sub = _resize(grid_map[:Z, :Y, :X].float(), crop_shape).clamp_(0, 1)
    sub.mul_(torch.from_numpy(np.ascontiguousarray(lung[scan.crop])))
    out[scan.crop] = sub.numpy()
    return out


def run_deepsc(
    ct: CTVolume,
    lungs: LungMasks,
    weights: Union[LoadedWeights, str, Path],
    progress: Optional[ProgressCallback] = None,
    overlap: float = 0.25,
    threshold: float = 0.5,
    threads: Optional[int] = None,
    window_scale: float = 1.0,
) -> DeepSCOutput:
    """Lesion probability / mask, evidence map and class probabilities for one CT.

    Args:
        ct: the CT in HU; lungs: its lung masks (the model only looks inside them).
        weights: verified weights or a path to a DeepSC-COVID ``.safetensors`` file.
        progress: ``(fraction, message)`` callback; raising from it (cancel) aborts.
        overlap: fraction of patch overlap between neighbouring windows.
        threads: torch CPU threads (default: :func:`default_threads`); restored afterwards.
        window_scale: windows may grow up to this multiple of the training patch (see
            :func:`plan_axis`); 1 reproduces the paper's patch-sized windows.
    """
    t0 = time.perf_counter()
    if progress is not None:
        progress(0.0, "Loading DeepSC-COVID")
    model, loaded = load_model(weights)
    stats = load_statistics(loaded)
    cfg = model.config
    orient = ct.canonical_frame()
    hu = orient.to_canonical(ct.array)
    lung = orient.to_canonical(lungs.lungs)
    spacing = orient.spacing_zyx(ct)
    prev_threads = torch.get_num_threads()
    torch.set_num_threads(threads or default_threads())
    try:
        with torch.inference_mode():
            if progress is not None:
                progress(0.05, "Preparing the lungs for DeepSC-COVID")
            scan = prepare_scan(hu, lung, spacing, cfg)
            win = infer_prepared(model, scan, overlap, progress, window_scale)
            prob_grid, cls_probs, ev_grid, n_windows = win.lesion_probability, win.class_probabilities, win.evidence, win.windows
            if progress is not None:
                progress(0.9, "Mapping DeepSC-COVID outputs back to the CT grid")
            label = int(np.argmax(cls_probs))
            # The slice grid spans the padded model grid; take the unpadded part.
            ev_model = _resize(ev_grid[label], tuple(scan.volume.shape))
            prob = _to_ct_grid(prob_grid, scan, lung)
            evidence = _to_ct_grid(ev_model, scan, lung)
    finally:
        torch.set_num_threads(prev_threads)
    prob_ct = orient.from_canonical(prob)
    ev_ct = orient.from_canonical(evidence)
    mask = prob_ct >= threshold
    probabilities = {k: float(p) for k, p in zip(CLASS_KEYS, cls_probs)}
    distance = float(stats.distance(win.feature)) if stats is not None else None
    seconds = time.perf_counter() - t0
    if progress is not None:
        progress(1.0, "DeepSC-COVID done")
    out = DeepSCOutput(prob_ct, mask, ev_ct, probabilities, loaded.provenance(), n_windows, seconds, win.feature,
                       distance, stats.threshold if stats is not None else None)
    log.info("DeepSC-COVID: %d windows in %.1f s, probabilities %s, OOD distance %s (threshold %s)", n_windows, seconds,
             probabilities, distance, out.ood_threshold)
    return out
