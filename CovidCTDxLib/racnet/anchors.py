"""Latent anchors: per-class cluster centres of RACNet latents, for explanation and OOD flags.

The RACNet abstract builds "a set of anchors … through latent variable extraction from the
trained RACNet", giving "insight on the network's decision making". Our reading:

* After training, every training scan's aligned latent (``RACNet(...)["latent"]``) is
  grouped by its class (e.g. non-COVID, and each COVID severity), and k-means
  (``scipy.cluster.vq.kmeans2``, k-means++ init, fixed seed) places up to ``k`` centres per
  class. Each centre is a "typical scan" of that class in the space where the heads decide.
* At inference, a scan is explained by its nearest anchors and their Euclidean distances
  ("this scan looks most like the 2nd 'severe' prototype").
* Out of distribution: for each class, the distance from its training scans to their
  nearest same-class anchor gives a distribution; its ``percentile`` (99th) is the class
  threshold. A scan farther than the threshold from the anchors of **every** class is
  flagged: no training prototype vouches for it, so its probabilities should not be trusted.

Why a second anchor set: the aligned latent is LayerNorm-standardised and, after training,
concentrates along the few directions the heads use, so an input unlike any CT (noise,
a blank image) can still land near some class's latent anchors. The same k-means and
percentile thresholds are therefore also computed on the **mean per-slice CNN feature**
(input-level statistics, stored under ``input_anchors.``); a scan is out of distribution
if it is far from every class in *either* space. Only the latent anchors explain a
prediction.

Anchors travel in the weights file as three tensors (``anchors.centres`` (M, L) float32,
``anchors.labels`` (M,) int64 indices into the class names, ``anchors.thresholds`` (C,)
float32); the class names go in the model card (``config["anchor_classes"]``).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Sequence, Tuple

import numpy as np
import torch
from scipy.cluster.vq import kmeans2

from ..errors import WeightsError

log = logging.getLogger(__name__)

PREFIX = "anchors."
#: Second anchor set on the slice-feature mean (input statistics), see module docstring.
INPUT_PREFIX = "input_anchors."
#: A class gets at most one centre per this many training scans (a centre per scan would
#: make every in-class distance 0 and its threshold meaningless).
MIN_SCANS_PER_ANCHOR = 5


@dataclass
class AnchorMatch:
    """Explanation of one latent vector."""

    nearest: List[Dict[str, Any]]  # [{"class", "index", "distance", "threshold"}], closest first
    class_distances: Dict[str, float]  # distance to the nearest anchor of each class
    out_of_distribution: bool


@dataclass
class Anchors:
    """Per-class latent centres with per-class OOD distance thresholds."""

    centres: np.ndarray  # (M, L) float32
    labels: np.ndarray  # (M,) int, index into classes
    thresholds: np.ndarray  # (C,) float32
    classes: Tuple[str, ...]

    def __post_init__(self) -> None:
        self.centres = np.asarray(self.centres, dtype=np.float32)
        self.labels = np.asarray(self.labels, dtype=np.int64)
        self.thresholds = np.asarray(self.thresholds, dtype=np.float32)
        self.classes = tuple(self.classes)
        if self.centres.ndim != 2 or len(self.labels) != len(self.centres) or len(self.thresholds) != len(self.classes):
            raise ValueError("inconsistent anchor arrays")

    # ------------------------------------------------------------------ storage
    def to_tensors(self, prefix: str = PREFIX) -> Dict[str, torch.Tensor]:
        return {
            prefix + "centres": torch.from_numpy(self.centres.copy()),
            prefix + "labels": torch.from_numpy(self.labels.copy()),
            prefix + "thresholds": torch.from_numpy(self.thresholds.copy()),
        }

    @classmethod
    def from_tensors(cls, state: Mapping[str, torch.Tensor], classes: Sequence[str], prefix: str = PREFIX) -> "Anchors":
        try:
            return cls(
                state[prefix + "centres"].numpy(),
                state[prefix + "labels"].numpy(),
                state[prefix + "thresholds"].numpy(),
                tuple(classes),
            )
        except (KeyError, ValueError) as exc:
            raise WeightsError(f"The weights file has no usable latent anchors ({exc}); retrain or restore the file.") from exc

    # ------------------------------------------------------------------ inference
    def distances(self, latent: np.ndarray) -> np.ndarray:
        """Euclidean distance from latent(s) (L,) or (N, L) to every centre → (M,) or (N, M)."""
        z = np.asarray(latent, dtype=np.float64)
        d = np.linalg.norm(z[..., None, :] - self.centres.astype(np.float64), axis=-1)
        return d

    def class_distances(self, latent: np.ndarray) -> np.ndarray:
        """Distance to the nearest anchor of each class: (C,) or (N, C); inf if a class has none."""
        d = np.atleast_2d(self.distances(latent))
        out = np.full((d.shape[0], len(self.classes)), np.inf)
        for c in range(len(self.classes)):
            sel = self.labels == c
            if sel.any():
                out[:, c] = d[:, sel].min(axis=1)
        return out[0] if np.ndim(latent) == 1 else out

    def is_out_of_distribution(self, latent: np.ndarray) -> np.ndarray:
        """True where the latent is beyond the threshold of every class."""
        cd = np.atleast_2d(self.class_distances(latent))
        ood = np.all(cd > self.thresholds[None, :], axis=1)
        return bool(ood[0]) if np.ndim(latent) == 1 else ood

    def explain(self, latent: np.ndarray, k: int = 3) -> AnchorMatch:
        """Nearest ``k`` anchors of one latent (L,), class distances and the OOD flag."""
        z = np.asarray(latent, dtype=np.float64).reshape(-1)
        d = self.distances(z)
        order = np.argsort(d, kind="stable")[:k]
        # index of an anchor within its own class, so "severe #2" is stable and readable
        within = np.zeros(len(self.labels), dtype=int)
        for c in range(len(self.classes)):
            idx = np.nonzero(self.labels == c)[0]
            within[idx] = np.arange(len(idx))
        nearest = [
            {
                "class": self.classes[int(self.labels[i])],
                "index": int(within[i]),
                "distance": round(float(d[i]), 4),
                "threshold": round(float(self.thresholds[int(self.labels[i])]), 4),
            }
            for i in order
        ]
        cd = self.class_distances(z)
        return AnchorMatch(
            nearest=nearest,
            class_distances={c: float(cd[i]) for i, c in enumerate(self.classes)},
            out_of_distribution=bool(np.all(cd > self.thresholds)),
        )


def compute_anchors(
    latents: np.ndarray,
    labels: Sequence[int],
    classes: Sequence[str],
    k_per_class: int = 3,
    percentile: float = 99.0,
    seed: int = 0,
    margin: float = 1.25,
) -> Anchors:
    """k-means centres per class and per-class OOD thresholds from training latents.

    Args:
        latents: (N, L) latents of the training scans.
        labels: (N,) class index of each scan (into ``classes``).
        k_per_class: maximum centres per class (fewer if the class has < 5·k scans).
        percentile: of same-class nearest-anchor distances, used as the OOD threshold.
        margin: factor on that percentile. Why: with a few dozen scans per class the
            empirical 99th percentile is about the sample maximum and new in-distribution
            scans exceed it often (22 % of held-out phantoms were flagged without it).
        seed: k-means seed (results are reproducible).

    A class without training scans gets no anchors and threshold 0, so it can never vouch
    for a scan.
    """
    z = np.asarray(latents, dtype=np.float64)
    y = np.asarray(labels, dtype=int)
    if z.ndim != 2 or len(z) != len(y) or len(z) == 0:
        raise ValueError("latents must be (N, L) with one label per row")
    centres: List[np.ndarray] = []
    owners: List[int] = []
    thresholds = np.zeros(len(classes), dtype=np.float64)
    for c in range(len(classes)):
        zc = z[y == c]
        if len(zc) == 0:
            log.warning("no training scans of class %s: no anchors for it", classes[c])
            continue
        k = max(1, min(k_per_class, len(zc) // MIN_SCANS_PER_ANCHOR))
        if k == 1:
            cent = zc.mean(axis=0, keepdims=True)
        else:
            cent, assign = kmeans2(zc, k, minit="++", seed=seed + c)
            cent = cent[np.bincount(assign, minlength=k) > 0]  # drop empty clusters
        d = np.linalg.norm(zc[:, None, :] - cent[None], axis=-1).min(axis=1)
        thresholds[c] = margin * np.percentile(d, percentile)
        centres.append(cent)
        owners += [c] * len(cent)
    return Anchors(np.concatenate(centres), np.asarray(owners), thresholds, tuple(classes))
