"""A rule-based reading of the findings: COVID-19-typical, CAP-typical or indeterminate.

Shown next to, never instead of, the neural classification: it explains which of
DeepSC-COVID's four findings (Wang et al., IEEE TMI 2021, Sec. II-B) point where.
Each finding votes for COVID-19, for CAP or for neither; the cut-offs sit between the
paper's COVID-19 and CAP averages:

1. count: 4.4 vs 1.7 lesions per scan; 55 % of COVID-19 scans have >= 4 lesions and 55 %
   of CAP scans exactly one -> >= 4 votes COVID-19, <= 1 votes CAP;
2. spread: COVID-19 lesions are scattered over both lungs, CAP lesions concentrated ->
   bilateral votes COVID-19, one lung votes CAP;
3. density: > 70 % of COVID-19 lesion HU lie in -960..-600, CAP has a second peak at
   -70..140 HU -> a dense share (lesion voxels >= -100 HU) <= 15 % votes COVID-19,
   >= 30 % votes CAP;
4. periphery: PLR 62.4 % vs 24.5 % -> >= 50 % votes COVID-19, <= 35 % votes CAP.

COVID-19-typical needs at least three COVID-19 votes and a margin of two over CAP votes;
CAP-typical the mirror image; anything else is indeterminate. No lesion -> "no_lesions".
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional

from ..result import Result
from .metrics import compute_findings

COUNT_COVID, COUNT_CAP = 4, 1
DENSE_HU = -100.0
DENSE_SHARE_COVID, DENSE_SHARE_CAP = 15.0, 30.0
PLR_COVID, PLR_CAP = 50.0, 35.0
MIN_VOTES, MIN_MARGIN = 3, 2


@dataclass
class Reading:
    label: str
    reasons: List[str] = field(default_factory=list)
    covid_votes: int = 0
    cap_votes: int = 0

    def to_dict(self) -> Dict[str, Any]:
        """The form results.json, the report and the Slicer tables carry."""
        return {"label": self.label, "reasons": list(self.reasons)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Reading":
        return cls(str(data["label"]), [str(r) for r in data.get("reasons", [])])


def dense_share_percent(findings) -> Optional[float]:
    """Share (%) of lesion voxels at or above ``DENSE_HU``, from the lesion HU histogram."""
    h = findings.hu_histogram
    total = h["below_first_edge"] + sum(h["counts"]) + h["above_last_edge"]
    if total == 0:
        return None
    edges = h["bin_edges_hu"]
    dense = h["above_last_edge"] + sum(c for lo, c in zip(edges[:-1], h["counts"]) if lo >= DENSE_HU)
    return 100.0 * dense / total


def read_findings(findings) -> Reading:
    """Vote the four findings into a COVID-19-typical / CAP-typical / indeterminate reading."""
    if findings.lesion_count == 0 or findings.lesion_volume_ml <= 0:
        return Reading("no_lesions", ["no lesion component large enough to count"])
    covid: List[str] = []
    cap: List[str] = []
    neutral: List[str] = []

    n = findings.lesion_count
    (covid if n >= COUNT_COVID else cap if n <= COUNT_CAP else neutral).append(f"{n} lesion(s) (COVID-19 avg 4.4, CAP 1.7)")
    (covid if findings.bilateral else cap).append("bilateral" if findings.bilateral else "one lung only")
    dense = dense_share_percent(findings)
    if dense is not None:
        text = f"{dense:.0f}% of lesion voxels >= {DENSE_HU:g} HU"
        (covid if dense <= DENSE_SHARE_COVID else cap if dense >= DENSE_SHARE_CAP else neutral).append(text)
    plr = findings.plr_percent
    if plr is not None:
        text = f"PLR {plr:.0f}% (COVID-19 avg 62.4, CAP 24.5)"
        (covid if plr >= PLR_COVID else cap if plr <= PLR_CAP else neutral).append(text)

    reasons = [f"COVID-19-like: {r}" for r in covid] + [f"CAP-like: {r}" for r in cap] + [f"neutral: {r}" for r in neutral]
    if len(covid) >= MIN_VOTES and len(covid) - len(cap) >= MIN_MARGIN:
        label = "covid19_typical"
    elif len(cap) >= MIN_VOTES and len(cap) - len(covid) >= MIN_MARGIN:
        label = "cap_typical"
    else:
        label = "indeterminate"
    return Reading(label, reasons, len(covid), len(cap))


def run_findings_stage(result: Result) -> None:
    """Findings from the Result's lungs, zones and lesions, and the rule-based reading of them.

    One function for the pipeline and for the recompute after an edit (CLI ``findings``, the
    Slicer bridge), so every front door shows the same reading of the same findings. It lives
    here, beside the reading, so that ``findings.recompute`` need not import the pipeline
    (which imports the stages): no package-level import cycle.
    """
    result.findings = compute_findings(result.ct, result.lungs, result.lesions, result.zones)
    result.reading = read_findings(result.findings)
