"""Plain dataclasses that carry stage outputs between the pipeline and its front doors.

Why plain dataclasses: the same Result feeds the Slicer bridge, the CLI writers and the
tests, so it must hold no Slicer, Qt or torch types. Masks are numpy bool arrays on the CT
grid in (z, y, x) order.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import numpy as np

from .volume import CTVolume

#: Labels the product shows, in this order, in tables and JSON.
CLASS_KEYS = ("covid19", "cap", "non_pneumonia")
CLASS_NAMES = {"covid19": "COVID-19", "cap": "Community-acquired pneumonia", "non_pneumonia": "Non-pneumonia"}
SEVERITY_KEYS = ("mild", "moderate", "severe", "critical")
#: Severity label when the scan is not called COVID-19: a grade of a disease the model does not
#: see would be a finding invented for a normal or CAP scan.
SEVERITY_NOT_APPLICABLE = "not_applicable"
#: RACNet's own COVID-19 probability from which a severity grade is reported. 0.5 is where its
#: two-class head calls COVID-19 (argmax), so a grade is shown exactly when that head says
#: COVID-19; it is a decision rule, not a tuned number, and holds for any weights.
SEVERITY_MIN_COVID_PROBABILITY = 0.5
#: What every front door shows first when a model's input is out of distribution; the model's
#: label follows only as a secondary detail.
NOT_ASSESSABLE = "not assessable (out of distribution)"

NOT_FOR_DIAGNOSIS = "synthetic training data — not for diagnosis"
#: The pipeline's stages, in run order: the one list the CLI, the worker and the Slicer module use.
STAGES = ("lungs", "deepsc", "racnet", "findings")
#: What each stage needs run before it: every model and the findings work inside the lung mask.
STAGE_DEPENDENCIES = {"lungs": (), "deepsc": ("lungs",), "racnet": ("lungs",), "findings": ("lungs",)}


@dataclass
class LungMasks:
    """Output of lung masking. All arrays are bool on the CT grid (z, y, x)."""

    right: np.ndarray
    left: np.ndarray
    airways: np.ndarray
    body: np.ndarray
    method: str = "classical"
    #: For a neural lung model: which weights made the masks (file, SHA-256, training data).
    model_provenance: Optional[Dict[str, str]] = None

    @property
    def lungs(self) -> np.ndarray:
        return self.right | self.left


@dataclass
class LungZones:
    """Regional masks for scoring.

    ``labels`` is uint8 on the CT grid: 0 outside the lungs, then ZONE_NAMES order.
    ``peripheral`` is the lung shell within ``peripheral_thickness_mm`` of the lung border.
    """

    labels: np.ndarray
    peripheral: np.ndarray
    peripheral_thickness_mm: float

    ZONE_NAMES = ("right_upper", "right_middle", "right_lower", "left_upper", "left_middle", "left_lower")

    def zone(self, name: str) -> np.ndarray:
        return self.labels == (self.ZONE_NAMES.index(name) + 1)


@dataclass
class LesionMasks:
    """Lesion segmentation (bool arrays on the CT grid) and who produced it."""

    lesion: np.ndarray
    ggo: Optional[np.ndarray] = None
    consolidation: Optional[np.ndarray] = None
    source: str = "density engine"


@dataclass
class Provenance:
    """Where a model output came from; shown next to every model output."""

    model: str
    weights_file: str
    weights_sha256: str
    training_data: str
    not_for_diagnosis: bool
    project_version: str
    model_card: Dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> Dict[str, Any]:
        return {
            "model": self.model,
            "weights_file": self.weights_file,
            "weights_sha256": self.weights_sha256,
            "training_data": self.training_data,
            "not_for_diagnosis": self.not_for_diagnosis,
            "label": NOT_FOR_DIAGNOSIS if self.not_for_diagnosis else "",
            "project_version": self.project_version,
        }


@dataclass
class Classification:
    """Scan-level 3-class output of DeepSC-COVID, with its out-of-distribution check.

    ``out_of_distribution`` is None when the weights carry no feature statistics (the check
    was not made), else whether ``ood_distance`` (Mahalanobis distance of the pooled
    classification features to the nearest class mean, ``deepsc/ood.py``) exceeds
    ``ood_threshold``.
    """

    label: str  # one of CLASS_KEYS
    probabilities: Dict[str, float]
    provenance: Provenance
    out_of_distribution: Optional[bool] = None
    ood_distance: Optional[float] = None
    ood_threshold: Optional[float] = None

    def to_dict(self) -> Dict[str, Any]:
        return {
            "label": self.label,
            "probabilities": dict(self.probabilities),
            "out_of_distribution": self.out_of_distribution,
            "ood_distance": self.ood_distance,
            "ood_threshold": self.ood_threshold,
            "weights": self.provenance.to_dict(),
        }


@dataclass
class Severity:
    """Scan-level RACNet output: COVID detection, severity, anchors and OOD flag.

    ``label`` is a grade only when ``covid_probability`` ≥ SEVERITY_MIN_COVID_PROBABILITY,
    else SEVERITY_NOT_APPLICABLE; ``probabilities`` are always the grade head's output (the
    grade it would give if the scan were COVID-19), for scripts that want them.
    """

    label: str  # one of SEVERITY_KEYS, or SEVERITY_NOT_APPLICABLE
    probabilities: Dict[str, float]
    covid_probability: float
    anchors: List[Dict[str, Any]]  # nearest anchors: {"class":..., "index":..., "distance":...}
    out_of_distribution: bool
    provenance: Provenance
    slices_used: int = 0

    def to_dict(self) -> Dict[str, Any]:
        return {
            "label": self.label,
            "probabilities": dict(self.probabilities),
            "covid_probability": self.covid_probability,
            "nearest_anchors": list(self.anchors),
            "out_of_distribution": self.out_of_distribution,
            "slices_used": self.slices_used,
            "weights": self.provenance.to_dict(),
        }


@dataclass
class Result:
    """Everything one pipeline run produced. A stage that did not run is None and has a
    reason in ``skipped``: the product never invents a value for it."""

    ct: CTVolume
    lungs: Optional[LungMasks] = None
    zones: Optional[LungZones] = None
    lesions: Optional[LesionMasks] = None
    lesion_probability: Optional[np.ndarray] = None  # float32 0..1 on the CT grid
    deepsc_lesion: Optional[np.ndarray] = None  # DeepSC-COVID's lesion mask (bool), when it ran
    evidence: Optional[np.ndarray] = None  # float32 0..1 on the CT grid (CAM)
    classification: Optional[Classification] = None
    severity: Optional[Severity] = None
    findings: Optional[Any] = None  # findings.metrics.Findings
    reading: Optional[Any] = None  # findings.reading.Reading: the rule-based reading of the findings
    skipped: Dict[str, str] = field(default_factory=dict)
    #: Stages run, in order (requested ones plus their dependencies).
    stages: List[str] = field(default_factory=list)
    #: Stages run only because a selected stage needs them, with the stages that needed them.
    added_stages: Dict[str, List[str]] = field(default_factory=dict)
    timings_s: Dict[str, float] = field(default_factory=dict)
