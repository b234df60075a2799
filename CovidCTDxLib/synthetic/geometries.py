"""Phantom cases on the geometries users actually feed the product, for product-path evaluation.

Why this module: a model scored only at its training geometry with ground-truth lungs says
nothing about what ``covidctdx run`` does. The evaluation and the OOD calibration
(``tools/calibrate_deepsc_ood.py``, ``Testing/test_deepsc_ood.py``) therefore draw phantoms
on two kinds of grid and let the pipeline make the lung masks:

* the CLI's own default (``covidctdx phantom`` without ``--shape``/``--spacing``);
* clinical chest CT grids: 512 × 512 at 0.6–0.9 mm in-plane, 1–5 mm slices, 96–300 slices
  covering 300–480 mm craniocaudally (a 1 mm scan has 300 slices, a 5 mm scan 96).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np

from .phantom import DEFAULT_SHAPE, DEFAULT_SPACING, KIND_LABELS

#: Phantom kinds and the pneumonia severities cycled through, so every class and grade appears.
KINDS = ("covid", "cap", "normal")
SEVERITIES = ("mild", "moderate", "severe", "critical")


@dataclass(frozen=True)
class PhantomCase:
    """One phantom to make: kind, severity (None for normal), seed and grid."""

    kind: str
    severity: Optional[str]
    seed: int
    shape: Tuple[int, int, int]  # (z, y, x)
    spacing: Tuple[float, float, float]  # (x, y, z) mm

    @property
    def name(self) -> str:
        z, y, x = self.shape
        sx, _, sz = self.spacing
        return f"{self.kind}-{self.severity or 'none'}-{self.seed}@{x}x{y}x{z}/{sx:.2f}x{sz:.1f}mm"


def clinical_geometry(rng: np.random.Generator) -> Tuple[Tuple[int, int, int], Tuple[float, float, float]]:
    """A 512 × 512 grid at 0.6–0.9 mm with 1–5 mm slices and 96–300 slices."""
    in_plane = float(rng.uniform(0.6, 0.9))
    dz = float(rng.uniform(1.0, 5.0))
    nz = int(np.clip(round(float(rng.uniform(300.0, 480.0)) / dz), 96, 300))
    return (nz, 512, 512), (round(in_plane, 3), round(in_plane, 3), round(dz, 2))


def product_cases(count: int, seed0: int, clinical_share: float = 0.5) -> List[PhantomCase]:
    """``count`` cases, classes in turn, the given share on clinical grids and the rest on the
    CLI default grid; seeds ``seed0``, ``seed0 + 1``, … (one per case, so sets made with seed
    ranges that do not overlap share no phantom)."""
    rng = np.random.default_rng(seed0)
    cases = []
    n_clinical = int(round(count * clinical_share))
    clinical = set(rng.permutation(count)[:n_clinical].tolist())
    for i in range(count):
        kind = KINDS[i % len(KINDS)]
        severity = None if kind == "normal" else SEVERITIES[(i // len(KINDS)) % len(SEVERITIES)]
        if i in clinical:
            shape, spacing = clinical_geometry(rng)
        else:
            shape, spacing = DEFAULT_SHAPE, DEFAULT_SPACING
        cases.append(PhantomCase(kind, severity, seed0 + i, tuple(shape), tuple(spacing)))  # type: ignore[arg-type]
    return cases


def label_index(kind: str, class_keys: Sequence[str]) -> int:
    """Index of a phantom kind's label in ``class_keys`` (result.CLASS_KEYS)."""
    return list(class_keys).index(KIND_LABELS[kind])
