"""Score the models the way ``covidctdx run`` uses them: a phantom on a product geometry, the
pipeline's own lung masks (``lungs.engine.segment_lungs``, as the pipeline's lungs stage),
then DeepSC-COVID and RACNet with their verified weights.

Why not ground-truth lungs at the training grid: the product never has either, and the
issue that asked for this measured 5/9 correct through the product path while the
training-path test passed.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from ..deepsc.inference import run_deepsc
from ..lungs.engine import segment_lungs
from ..racnet.inference import run_racnet
from ..result import LungMasks
from ..synthetic.geometries import PhantomCase
from ..synthetic.phantom import make_phantom
from ..volume import CTVolume
from ..weights import LoadedWeights

log = logging.getLogger(__name__)


@dataclass
class CaseOutcome:
    """What both models said about one CT on the product path."""

    name: str
    label: Optional[str]  # truth (result.CLASS_KEYS), None for unlabelled scans
    severity_truth: Optional[str]
    predicted: str
    probabilities: Dict[str, float]
    feature: np.ndarray
    ood_distance: Optional[float]
    ood_threshold: Optional[float]
    racnet_label: Optional[str] = None
    racnet_covid_probability: Optional[float] = None
    racnet_ood: Optional[bool] = None
    seconds: float = 0.0

    def to_dict(self) -> Dict[str, Any]:
        """JSON row (without the feature vector)."""
        return {
            "name": self.name, "label": self.label, "severity_truth": self.severity_truth, "predicted": self.predicted,
            "probabilities": {k: round(v, 4) for k, v in self.probabilities.items()},
            "ood_distance": None if self.ood_distance is None else round(self.ood_distance, 3),
            "ood_threshold": None if self.ood_threshold is None else round(self.ood_threshold, 3),
            "racnet_label": self.racnet_label, "racnet_covid_probability": self.racnet_covid_probability,
            "racnet_ood": self.racnet_ood, "seconds": round(self.seconds, 1),
        }


def run_ct(ct: CTVolume, deepsc: LoadedWeights, racnet: Optional[LoadedWeights] = None, name: str = "",
           label: Optional[str] = None, severity_truth: Optional[str] = None, threads: int = 1) -> CaseOutcome:
    """Pipeline lungs → DeepSC-COVID (→ RACNet) on one CT. ``threads`` keeps runs modest on a
    shared machine; the numbers do not depend on it."""
    t0 = time.perf_counter()
    ct.validate()
    lungs: LungMasks = segment_lungs(ct)
    out = run_deepsc(ct, lungs, deepsc, threads=threads)
    outcome = CaseOutcome(name, label, severity_truth, max(out.probabilities, key=out.probabilities.get), out.probabilities,
                          out.feature, out.ood_distance, out.ood_threshold)
    if racnet is not None:
        sev = run_racnet(ct, lungs, racnet)
        outcome.racnet_label, outcome.racnet_covid_probability, outcome.racnet_ood = (
            sev.label, round(sev.covid_probability, 4), sev.out_of_distribution)
    outcome.seconds = time.perf_counter() - t0
    log.info("%s: truth %s, DeepSC %s %s, OOD distance %s; RACNet %s (OOD %s), %.1f s", name, label, outcome.predicted,
             {k: round(v, 2) for k, v in out.probabilities.items()}, out.ood_distance, outcome.racnet_label,
             outcome.racnet_ood, outcome.seconds)
    return outcome


def run_cases(cases: Sequence[PhantomCase], deepsc: LoadedWeights, racnet: Optional[LoadedWeights] = None,
              threads: int = 1) -> List[CaseOutcome]:
    """Make each phantom and run it through :func:`run_ct`."""
    outcomes = []
    for case in cases:
        p = make_phantom(case.kind, case.severity, shape=case.shape, spacing=case.spacing, seed=case.seed)
        outcomes.append(run_ct(p.ct, deepsc, racnet, case.name, p.label, p.severity, threads))
    return outcomes
