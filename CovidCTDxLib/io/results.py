"""Writes a Result as the command-line contract's files (see docs/ARCHITECTURE.md).

OUT_DIR/segmentation.seg.nrrd, evidence.nrrd, results.json, findings.csv, report.md.
All files are written into a hidden temporary folder first and moved into place only when
every one succeeded, so a failure or a cancel never leaves a half-written result.
"""
from __future__ import annotations

import csv
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np

from .. import __version__
from ..result import Result
from ..segments import SEGMENT_ORDER
from .segmentation_file import write_segmentation, write_volume

FILES = ("segmentation.seg.nrrd", "evidence.nrrd", "results.json", "findings.csv", "report.md")


def json_safe(value: Any) -> Any:
    """JSON-safe copy: numpy scalars/arrays to Python, NaN to None (used by the CLI and the Slicer bridge)."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, np.ndarray):
        return json_safe(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def results_dict(result: Result, source: str = "") -> Dict[str, Any]:
    """The results.json content; keys and names follow the contract in docs/ARCHITECTURE.md."""
    ct = result.ct
    lungs: Optional[Dict[str, Any]] = None
    if result.lungs is not None:
        ml = ct.voxel_volume_ml
        lungs = {
            "right_ml": float(result.lungs.right.sum()) * ml,
            "left_ml": float(result.lungs.left.sum()) * ml,
            "total_ml": float(result.lungs.lungs.sum()) * ml,
            "airways_ml": float(result.lungs.airways.sum()) * ml,
            "method": result.lungs.method,
        }
        if result.lungs.model_provenance is not None:
            lungs["weights"] = dict(result.lungs.model_provenance)
    findings: Optional[Dict[str, Any]] = None
    if result.findings is not None:
        findings = result.findings.to_dict()
        findings["lesion_source"] = result.lesions.source if result.lesions is not None else None
        findings["rule_based_reading"] = result.reading.to_dict() if result.reading is not None else None
    provenance: Dict[str, Any] = {"project_version": __version__}
    if result.lungs is not None:
        provenance["lungs"] = {"method": result.lungs.method, **(result.lungs.model_provenance or {})}
    if result.lesions is not None:
        provenance["lesions"] = {"source": result.lesions.source}
    if result.classification is not None:
        provenance["deepsc"] = result.classification.provenance.to_dict()
    if result.severity is not None:
        provenance["racnet"] = result.severity.provenance.to_dict()
    payload = {
        "input": {
            "source": source or str(ct.metadata.get("source", "")),
            "shape_zyx": list(ct.shape),
            "spacing_mm": list(ct.spacing),
            "origin_lps_mm": list(ct.origin),
            "direction_lps": ct.direction.tolist(),
            "metadata": {k: v for k, v in ct.metadata.items() if isinstance(v, (str, int, float))},
        },
        "lungs": lungs,
        "classification": result.classification.to_dict() if result.classification else None,
        "severity": result.severity.to_dict() if result.severity else None,
        "findings": findings,
        "not_run": dict(result.skipped),
        "stages": {"run": list(result.stages), "added_as_dependency": {k: list(v) for k, v in result.added_stages.items()}},
        "provenance": provenance,
        "timings_s": dict(result.timings_s),
    }
    return json_safe(payload)


def segmentation_masks(result: Result) -> Dict[str, np.ndarray]:
    """The masks of a Result by segment ID, in display order; absent stages are skipped.

    Lesion sub-types are included (possibly empty) whenever lesions were computed, so a
    user can paint them in the Segment Editor and recompute. DeepSC-COVID's lesion mask is
    its own segment when the findings were computed from another lesion source.
    """
    masks: Dict[str, np.ndarray] = {}
    if result.lungs is not None:
        masks["right_lung"] = result.lungs.right
        masks["left_lung"] = result.lungs.left
        if result.lungs.airways is not None and np.any(result.lungs.airways):
            masks["airways"] = result.lungs.airways
    if result.lesions is not None:
        empty = np.zeros(result.lesions.lesion.shape, dtype=bool)
        masks["lesion"] = result.lesions.lesion
        masks["ggo"] = result.lesions.ggo if result.lesions.ggo is not None else empty
        masks["consolidation"] = result.lesions.consolidation if result.lesions.consolidation is not None else empty
    if result.deepsc_lesion is not None and (result.lesions is None or result.lesions.lesion is not result.deepsc_lesion):
        masks["deepsc_lesion"] = result.deepsc_lesion
    return {k: masks[k] for k in SEGMENT_ORDER if k in masks}


def findings_rows(result: Result) -> List[List[Any]]:
    rows: List[List[Any]] = [["name", "value", "unit", "definition"]]
    if result.findings is not None:
        rows += [list(r) for r in result.findings.rows()]
    return rows


def write_outputs(result: Result, out_dir: Path, source: str = "") -> Dict[str, Path]:
    """Write every output file atomically into ``out_dir``; returns name → path."""
    from .report import render_report

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".covidctdx-", dir=out_dir))
    try:
        written: Dict[str, Path] = {}
        masks = segmentation_masks(result)
        if masks:
            written["segmentation.seg.nrrd"] = write_segmentation(result.ct, masks, staging / "segmentation.seg.nrrd")
        if result.evidence is not None:
            written["evidence.nrrd"] = write_volume(result.ct, staging / "evidence.nrrd", result.evidence.astype(np.float32))
        payload = results_dict(result, source)
        (staging / "results.json").write_text(json.dumps(payload, indent=2))
        written["results.json"] = staging / "results.json"
        with open(staging / "findings.csv", "w", newline="") as f:
            csv.writer(f).writerows(findings_rows(result))
        written["findings.csv"] = staging / "findings.csv"
        (staging / "report.md").write_text(render_report(payload))
        written["report.md"] = staging / "report.md"
        final: Dict[str, Path] = {}
        for name, path in written.items():
            target = out_dir / name
            os.replace(path, target)
            final[name] = target
        for stale in set(FILES) - set(final):
            (out_dir / stale).unlink(missing_ok=True)  # a previous run's file must not pass for this run's
        return final
    finally:
        shutil.rmtree(staging, ignore_errors=True)
