"""Writes a Result as the command-line contract's files (see docs/ARCHITECTURE.md).

OUT_DIR/segmentation.seg.nrrd, evidence.nrrd, results.json, findings.csv, report.md.
All files are written into a hidden staging folder beside OUT_DIR first and moved into place
only when every one succeeded (:mod:`.output_folder`), so a failure or a cancel never leaves
a half-written result; :func:`result_from_outputs` reads them back.
"""
from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import numpy as np

from .. import __version__
from ..errors import OutputError
from ..result import Classification, LesionMasks, LungMasks, Provenance, Result, Severity
from ..segments import SEGMENT_ORDER
from ..volume import CTVolume
from .output_folder import OutputFolder, PathLike
from .segmentation_file import read_segmentation, write_segmentation, write_volume

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
            "warnings": list(ct.warnings),
            "resampled_gaps": list(ct.metadata.get("resampled_gaps", [])),
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


def write_outputs(result: Result, out_dir: Union[PathLike, OutputFolder], source: str = "") -> Dict[str, Path]:
    """Write every output file atomically into ``out_dir``; returns name → path.

    ``out_dir`` may be an :class:`OutputFolder` opened (checked and locked) before the work
    started, as the CLI does; a plain path is opened here. Contract files of a previous run
    that this result does not produce are removed, so they cannot pass for this run's;
    nothing else in the folder is touched.
    """
    if not isinstance(out_dir, OutputFolder):
        with OutputFolder(out_dir) as folder:
            return write_outputs(result, folder, source)
    from .report import render_report

    folder = out_dir
    names: List[str] = []
    current = "results"
    try:
        masks = segmentation_masks(result)
        if masks:
            current = "segmentation.seg.nrrd"
            write_segmentation(result.ct, masks, folder.staged(current))
            names.append(current)
        if result.evidence is not None:
            current = "evidence.nrrd"
            write_volume(result.ct, folder.staged(current), result.evidence.astype(np.float32))
            names.append(current)
        payload = results_dict(result, source)
        current = "results.json"
        folder.staged(current).write_text(json.dumps(payload, indent=2))
        names.append(current)
        current = "findings.csv"
        with open(folder.staged(current), "w", newline="") as f:
            csv.writer(f).writerows(findings_rows(result))
        names.append(current)
        current = "report.md"
        folder.staged(current).write_text(render_report(payload))
        names.append(current)
    except (OSError, OutputError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise OutputError(f"Writing {current} for {folder.path} failed ({reason}); nothing was written there.") from None
    return folder.commit(names, remove=FILES)


# --------------------------------------------------------------------------- outputs → Result
@dataclass
class StoredFindings:
    """Findings read back from findings.csv/results.json; same interface as findings.Findings."""

    table: List[Tuple[str, Optional[float], str, str]]
    values: Dict[str, Any]

    def rows(self) -> List[Tuple[str, Optional[float], str, str]]:
        return list(self.table)

    def to_dict(self) -> Dict[str, Any]:
        return dict(self.values)


def _provenance(d: Dict[str, Any]) -> Provenance:
    return Provenance(
        model=d.get("model", ""),
        weights_file=d.get("weights_file", ""),
        weights_sha256=d.get("weights_sha256", ""),
        training_data=d.get("training_data", ""),
        not_for_diagnosis=bool(d.get("not_for_diagnosis", True)),
        project_version=d.get("project_version", ""),
    )


def _float_or_none(text: str) -> Optional[float]:
    try:
        return float(text)
    except (TypeError, ValueError):
        return None


def result_from_outputs(out_dir: Path, ct: CTVolume) -> Result:
    """Rebuild a Result (on ``ct``'s grid) from the files ``write_outputs`` produced."""
    import SimpleITK as sitk

    out_dir = Path(out_dir)
    payload = json.loads((out_dir / "results.json").read_text())
    result = Result(ct=ct, skipped=dict(payload.get("not_run") or {}), timings_s=dict(payload.get("timings_s") or {}))
    seg_path = out_dir / "segmentation.seg.nrrd"
    masks = read_segmentation(seg_path, ct).masks if seg_path.exists() else {}
    empty = np.zeros(ct.shape, dtype=bool)
    if "right_lung" in masks and "left_lung" in masks:
        method = (payload.get("lungs") or {}).get("method", "classical")
        result.lungs = LungMasks(masks["right_lung"], masks["left_lung"], masks.get("airways", empty), empty, method)
    if "lesion" in masks:
        source = ((payload.get("provenance") or {}).get("lesions") or {}).get("source", "")
        result.lesions = LesionMasks(masks["lesion"], masks.get("ggo"), masks.get("consolidation"), source)
    result.deepsc_lesion = masks.get("deepsc_lesion")
    evidence_path = out_dir / "evidence.nrrd"
    if evidence_path.exists():
        result.evidence = sitk.GetArrayFromImage(sitk.ReadImage(str(evidence_path))).astype(np.float32)
    c = payload.get("classification")
    if c:
        result.classification = Classification(c["label"], dict(c["probabilities"]), _provenance(c.get("weights") or {}),
                                               c.get("out_of_distribution"), c.get("ood_distance"), c.get("ood_threshold"))
    s = payload.get("severity")
    if s:
        result.severity = Severity(
            s["label"], dict(s["probabilities"]), float(s.get("covid_probability") or 0.0), list(s.get("nearest_anchors") or []),
            bool(s.get("out_of_distribution")), _provenance(s.get("weights") or {}), int(s.get("slices_used") or 0),
        )
    findings_csv = out_dir / "findings.csv"
    if payload.get("findings") and findings_csv.exists():
        with open(findings_csv, newline="") as f:
            rows = list(csv.reader(f))[1:]
        table = [(r[0], _float_or_none(r[1]), r[2], r[3]) for r in rows if len(r) >= 4]
        result.findings = StoredFindings(table, payload["findings"])
        reading = payload["findings"].get("rule_based_reading")
        if reading:
            from ..findings.reading import Reading

            result.reading = Reading.from_dict(reading)
    return result
