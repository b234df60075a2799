"""``covidctdx findings CT SEG``: recompute findings from a segmentation edited elsewhere.

Why a module of its own: the edit → recompute loop is the same in Slicer and on the
command line; here it starts from files (a seg.nrrd saved from Slicer, cropped or not),
in the Slicer bridge from a segmentation node. Both end in ``findings.compute_findings``.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Dict

import numpy as np

from .errors import InputError
from .io import read_ct, read_segmentation
from .result import LesionMasks, LungMasks, Result

log = logging.getLogger(__name__)


def result_from_segmentation(ct_path: Path, seg_path: Path) -> Result:
    """Lungs and lesions from the seg.nrrd (lungs re-masked only if it has none)."""
    from .findings import compute_findings
    from .zones import compute_zones

    start = time.perf_counter()
    ct = read_ct(ct_path)
    seg = read_segmentation(seg_path, ct)
    result = Result(ct=ct)
    masks = seg.masks
    if "lesion" not in masks:
        raise InputError(f"{seg_path}: has no 'lesion' segment (segments: {', '.join(seg.names.values())}).")
    empty = np.zeros(ct.shape, dtype=bool)
    if "right_lung" in masks and "left_lung" in masks:
        result.lungs = LungMasks(masks["right_lung"], masks["left_lung"], masks.get("airways", empty), empty, method="from segmentation file")
    else:
        from .lungs import segment_lungs

        log.warning("%s has no right_lung/left_lung segments; masking lungs again.", seg_path)
        result.lungs = segment_lungs(ct)
    lesion = masks["lesion"] & result.lungs.lungs
    ggo, consolidation = masks.get("ggo"), masks.get("consolidation")
    if ggo is None or consolidation is None:
        from .lesions import split_lesion_types

        ggo, consolidation = split_lesion_types(ct, lesion)
    result.lesions = LesionMasks(lesion, ggo & lesion, consolidation & lesion, source=f"segmentation file {Path(seg_path).name}")
    result.zones = compute_zones(ct, result.lungs.right, result.lungs.left)
    t = time.perf_counter()
    result.findings = compute_findings(ct, result.lungs, result.lesions, result.zones)
    result.timings_s["findings"] = round(time.perf_counter() - t, 3)
    result.timings_s["total"] = round(time.perf_counter() - start, 3)
    result.skipped["classification"] = "Recomputing findings from a segmentation file; models not run."
    result.skipped["severity"] = "Recomputing findings from a segmentation file; models not run."
    return result


def recompute_findings_files(ct_path: Path, seg_path: Path, out_dir: Path) -> Dict[str, Path]:
    from .outputs import write_outputs

    result = result_from_segmentation(ct_path, seg_path)
    return write_outputs(result, out_dir, source=str(ct_path))
