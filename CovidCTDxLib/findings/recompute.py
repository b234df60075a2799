"""``covidctdx findings CT SEG``: recompute findings from a segmentation edited elsewhere.

Why a module of its own: the edit → recompute loop is the same in Slicer and on the
command line; here it starts from files (a seg.nrrd saved from Slicer, cropped or not),
in the Slicer bridge from a segmentation node. Both end in ``pipeline.run_findings_stage``
(``findings.metrics.compute_findings`` and the rule-based reading).
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Dict, Mapping

import numpy as np

from ..errors import InputError
from ..io.readers import read_ct
from ..io.segmentation_file import read_segmentation
from ..result import LesionMasks, LungMasks, Result
from ..volume import CTVolume

log = logging.getLogger(__name__)


def findings_from_masks(ct: CTVolume, masks: Mapping[str, np.ndarray], source: str, remask_missing_lungs: bool = False) -> Result:
    """Segment masks (possibly edited) on ``ct``'s grid → Result with lungs, lesions, zones, findings.

    The rules shared by ``covidctdx findings`` and the Slicer bridge: the lesion is clipped to
    the lungs and ground glass / consolidation to the lesion (so erasing part of a lesion also
    erases its sub-types there); missing sub-types are split from HU. Without lung segments
    the lungs are masked again when ``remask_missing_lungs``, else the masks are refused.
    """
    from ..lesions.density import split_lesion_types
    from ..lungs.zones import compute_zones
    from ..pipeline import run_findings_stage

    missing = [k for k in ("right_lung", "left_lung", "lesion") if k not in masks]
    if "lesion" in missing or (missing and not remask_missing_lungs):
        raise InputError(
            f"{source}: has no " + ", ".join(f"'{m}'" for m in missing) + " segment. Findings need the "
            "right_lung, left_lung and lesion segments that CovidCTDx created (renaming or deleting them breaks this)."
        )
    result = Result(ct=ct)
    empty = np.zeros(ct.shape, dtype=bool)
    if missing:
        from ..lungs.engine import segment_lungs

        log.warning("%s has no right_lung/left_lung segments; masking lungs again.", source)
        result.lungs = segment_lungs(ct)
    else:
        result.lungs = LungMasks(masks["right_lung"], masks["left_lung"], masks.get("airways", empty), empty, method=source)
    lesion = masks["lesion"] & result.lungs.lungs
    ggo, consolidation = masks.get("ggo"), masks.get("consolidation")
    if ggo is None or consolidation is None:
        ggo, consolidation = split_lesion_types(ct, lesion)
    result.lesions = LesionMasks(lesion, ggo & lesion, consolidation & lesion, source=source)
    result.zones = compute_zones(ct, result.lungs.right, result.lungs.left)
    start = time.perf_counter()
    run_findings_stage(result)
    result.timings_s["findings"] = round(time.perf_counter() - start, 3)
    return result


def result_from_segmentation(ct_path: Path, seg_path: Path) -> Result:
    """Lungs and lesions from the seg.nrrd (lungs re-masked only if it has none)."""
    start = time.perf_counter()
    ct = read_ct(ct_path)
    seg = read_segmentation(seg_path, ct)
    result = findings_from_masks(ct, seg.masks, f"segmentation file {Path(seg_path).name}", remask_missing_lungs=True)
    result.timings_s["total"] = round(time.perf_counter() - start, 3)
    result.skipped["classification"] = "Recomputing findings from a segmentation file; models not run."
    result.skipped["severity"] = "Recomputing findings from a segmentation file; models not run."
    return result


def recompute_findings_files(ct_path: Path, seg_path: Path, out_dir: Path) -> Dict[str, Path]:
    from ..io.results import write_outputs

    result = result_from_segmentation(ct_path, seg_path)
    return write_outputs(result, out_dir, source=str(ct_path))
