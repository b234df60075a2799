"""Out-of-distribution check for DeepSC-COVID: Mahalanobis distance of the pooled
classification features to class-conditional statistics of labelled scans.

Why: a softmax always sums to one, so DeepSC-COVID gives a confident class to a real scan
from another scanner, to noise or to an 8×8×8 volume alike. The 14w-long GAP vector the FC
layer classifies (``DeepSCOutputs.pooled``, averaged over the sliding windows the same way
as the class probabilities) says how much a scan resembles what the network was fitted on.

* Fit (``fit_statistics``): per-class means and one shared (tied) covariance of the features
  of labelled in-distribution scans, as in Lee et al., "A simple unified framework for
  detecting out-of-distribution samples and adversarial attacks" (NeurIPS 2018). With a few
  dozen scans and 112 features the sample covariance is singular, so it is shrunk towards a
  scaled identity with the Ledoit-Wolf intensity (no tuning knob).
* Score (``FeatureStatistics.distance``): the Mahalanobis distance to the nearest class mean.
* Threshold (``calibrate_threshold``): the largest distance among *held-out*
  in-distribution scans (not the fitted ones). For n exchangeable held-out scans, a new
  scan from the same distribution exceeds their maximum with probability 1/(n+1), so 30
  calibration scans flag about 3 % of in-distribution scans; it does not depend on the
  shape of the distance distribution.

The statistics travel inside the weights file as tensors ``ood.means`` (C, F),
``ood.precision`` (F, F) and ``ood.threshold`` (1,), so the same SHA-256 and card checks as
the network's own tensors cover them (``weights.load_weights``); there is no pickle and no
second file to drift out of step. Weights without them (e.g. from ``covidctdx train``)
still load, and their outputs say the check was not made.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Dict, Mapping, Optional, Sequence

import numpy as np
import torch

from ..errors import WeightsError

log = logging.getLogger(__name__)

PREFIX = "ood."
_KEYS = ("means", "precision", "threshold")


@dataclass
class FeatureStatistics:
    """Class means, shared precision matrix and the calibrated distance threshold."""

    means: np.ndarray  # (C, F) float64
    precision: np.ndarray  # (F, F) float64, inverse of the shrunk tied covariance
    threshold: float

    def __post_init__(self) -> None:
        self.means = np.asarray(self.means, dtype=np.float64)
        self.precision = np.asarray(self.precision, dtype=np.float64)
        self.threshold = float(self.threshold)
        f = self.means.shape[-1] if self.means.ndim == 2 else -1
        if self.means.ndim != 2 or self.precision.shape != (f, f):
            raise ValueError(f"inconsistent OOD statistics: means {self.means.shape}, precision {self.precision.shape}")

    # ------------------------------------------------------------------ storage
    def to_tensors(self) -> Dict[str, torch.Tensor]:
        return {
            PREFIX + "means": torch.from_numpy(self.means.astype(np.float32)),
            PREFIX + "precision": torch.from_numpy(self.precision.astype(np.float32)),
            PREFIX + "threshold": torch.tensor([self.threshold], dtype=torch.float32),
        }

    @classmethod
    def from_state(cls, state: Mapping[str, torch.Tensor]) -> Optional["FeatureStatistics"]:
        """The statistics in a weights file's tensors; None when the file has none."""
        present = [PREFIX + k in state for k in _KEYS]
        if not any(present):
            return None
        try:
            return cls(
                state[PREFIX + "means"].double().numpy(),
                state[PREFIX + "precision"].double().numpy(),
                float(state[PREFIX + "threshold"].reshape(-1)[0]),
            )
        except (KeyError, ValueError, IndexError) as exc:
            raise WeightsError(
                f"The weights file's DeepSC-COVID OOD statistics are incomplete ({exc}); retrain or restore the file."
            ) from exc

    # ------------------------------------------------------------------ inference
    def class_distances(self, feature: np.ndarray) -> np.ndarray:
        """Mahalanobis distance of feature(s) (F,) or (N, F) to each class mean → (C,) or (N, C)."""
        x = np.asarray(feature, dtype=np.float64)
        diff = x[..., None, :] - self.means  # (..., C, F)
        d2 = np.einsum("...cf,fg,...cg->...c", diff, self.precision, diff)
        return np.sqrt(np.clip(d2, 0.0, None))

    def distance(self, feature: np.ndarray) -> np.ndarray:
        """Distance to the nearest class mean: scalar for (F,), (N,) for (N, F)."""
        return self.class_distances(feature).min(axis=-1)

    def is_out_of_distribution(self, feature: np.ndarray) -> np.ndarray:
        """True where the feature is farther than the threshold from every class mean."""
        return self.distance(feature) > self.threshold


def ledoit_wolf(centred: np.ndarray) -> np.ndarray:
    """Ledoit-Wolf shrunk covariance of already-centred rows (N, F).

    Why shrinkage: fewer scans than features make the sample covariance singular, and its
    small eigenvalues would turn any tiny deviation along them into a huge distance. The
    Ledoit-Wolf intensity is the one that minimises the expected Frobenius error, so it
    needs no hand-set constant.
    """
    x = np.asarray(centred, dtype=np.float64)
    n, f = x.shape
    s = x.T @ x / n
    mu = np.trace(s) / f
    d2 = np.sum((s - mu * np.eye(f)) ** 2) / f
    b2 = sum(np.sum((np.outer(r, r) - s) ** 2) for r in x) / (n * n * f)
    shrink = 1.0 if d2 <= 0 else min(b2, d2) / d2
    return shrink * mu * np.eye(f) + (1.0 - shrink) * s


def fit_statistics(features: np.ndarray, labels: Sequence[int], num_classes: int) -> FeatureStatistics:
    """Class means and the shrunk tied covariance of labelled in-distribution features.

    The threshold is left at infinity; set it with :func:`calibrate_threshold` on scans
    that were not used here.
    """
    x = np.asarray(features, dtype=np.float64)
    y = np.asarray(labels, dtype=int)
    if x.ndim != 2 or len(x) != len(y):
        raise ValueError("features must be (N, F) with one label per row")
    missing = [c for c in range(num_classes) if not np.any(y == c)]
    if missing:
        raise ValueError(f"no scans of classes {missing}: every class needs some to have a mean")
    means = np.stack([x[y == c].mean(axis=0) for c in range(num_classes)])
    cov = ledoit_wolf(x - means[y])
    return FeatureStatistics(means, np.linalg.inv(cov), float("inf"))


def calibrate_threshold(held_out_distances: Sequence[float]) -> float:
    """The largest distance among held-out in-distribution scans (see the module docstring:
    a new in-distribution scan exceeds it with probability 1/(n+1))."""
    d = np.asarray(held_out_distances, dtype=np.float64)
    if d.size == 0 or not np.all(np.isfinite(d)):
        raise ValueError("calibration needs finite distances of at least one held-out scan")
    return float(d.max())
