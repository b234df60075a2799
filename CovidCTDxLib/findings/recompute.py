"""``covidctdx findings CT SEG``: recompute findings from a segmentation edited elsewhere.

Why a module of its own: the edit → recompute loop is the same in Slicer and on the
command line; here it starts from files (a seg.nrrd saved from Slicer, cropped or not),
in the Slicer bridge from a segmentation node. Both end in ``findings.reading.run_findings_stage``
(``findings.metrics.compute_findings`` and the rule-based reading).
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Dict, Mapping, Optional

import numpy as np

from ..errors import InputError, OutputError
from ..io.output_folder import OutputFolder
from ..io.readers import Spacing, read_ct
from ..io.results import FILES, result_from_outputs, write_outputs
from ..io.segmentation_file import read_segmentation
from ..result import LesionMasks, LungMasks, Result
from ..volume import CTVolume
from .reading import run_findings_stage

log = logging.getLogger(__name__)

#: HU below which a voxel inside the body is aerated lung (or ground glass).
LUNG_DENSITY_HU = -300.0
#: Share of a segmentation's lung voxels that must be aerated lung on the CT: below
#: REFUSE the lungs are on another scan's anatomy; below WARN they are recorded as doubtful
#: (a very dense, "white" lung legitimately has little air, so that band is not refused).
LUNGS_ON_LUNGS_REFUSE = 0.25
LUNGS_ON_LUNGS_WARN = 0.5


def findings_from_masks(ct: CTVolume, masks: Mapping[str, np.ndarray], source: str, remask_missing_lungs: bool = False) -> Result:
    """Segment masks (possibly edited) on ``ct``'s grid → Result with lungs, lesions, zones, findings.

    The rules shared by ``covidctdx findings`` and the Slicer bridge: the lesion is clipped to
    the lungs and ground glass / consolidation to the lesion (so erasing part of a lesion also
    erases its sub-types there); missing sub-types are split from HU. Without lung segments
    the lungs are masked again when ``remask_missing_lungs``, else the masks are refused.
    """
    from ..lesions.density import split_lesion_types
    from ..lungs.zones import compute_zones

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


def check_lungs_on_lungs(ct: CTVolume, masks: Mapping[str, np.ndarray], source: str) -> None:
    """Refuse lung segments that do not lie on this CT's lungs (a segmentation of another scan).

    Aerated lung = air (< -300 HU) not connected to the image border, i.e. inside the body;
    computed on every other row and column, which is plenty for a share.
    """
    from scipy import ndimage

    lungs = (masks["right_lung"] | masks["left_lung"])[:, ::2, ::2]
    if not lungs.any():
        raise InputError(f"{source}: the right_lung and left_lung segments are empty.")
    air = ct.array[:, ::2, ::2] < LUNG_DENSITY_HU
    labels, _ = ndimage.label(air)
    border = np.unique(np.concatenate([labels[:, [0, -1], :].ravel(), labels[:, :, [0, -1]].ravel()]))
    inner_air = air & ~np.isin(labels, border[border > 0])
    share = float(inner_air[lungs].mean())
    if share < LUNGS_ON_LUNGS_REFUSE:
        raise InputError(
            f"{source}: only {share:.0%} of its lung voxels are aerated lung on this CT; it was drawn on another "
            "scan or is misplaced. Give the CT the segmentation was made on."
        )
    if share < LUNGS_ON_LUNGS_WARN:
        ct.warn(f"{source}: only {share:.0%} of its lung voxels are aerated lung on this CT; check that it belongs to this scan.")


def result_from_segmentation(ct: CTVolume, seg_path: Path) -> Result:
    """Lungs and lesions from the seg.nrrd (lungs re-masked only if it has none)."""
    start = time.perf_counter()
    source = f"segmentation file {Path(seg_path).name}"
    seg = read_segmentation(seg_path, ct)
    if "right_lung" in seg.masks and "left_lung" in seg.masks:
        check_lungs_on_lungs(ct, seg.masks, source)
    result = findings_from_masks(ct, seg.masks, source, remask_missing_lungs=True)
    result.deepsc_lesion = seg.masks.get("deepsc_lesion")  # not an input of the findings, but kept
    result.timings_s["total"] = round(time.perf_counter() - start, 3)
    result.skipped["classification"] = "Recomputing findings from a segmentation file; models not run."
    result.skipped["severity"] = "Recomputing findings from a segmentation file; models not run."
    return result


def previous_run(out_dir: Path, ct: CTVolume) -> Optional[Result]:
    """The run already in ``out_dir`` (to keep its other stages' results), None for a new folder.

    Refuses a folder holding another CT's results, or contract files without results.json:
    overwriting them would destroy what this call did not write.
    """
    present = [name for name in FILES if (out_dir / name).exists()]
    if not present:
        return None
    if "results.json" not in present:
        raise OutputError(
            f"{out_dir} holds {', '.join(present)} but no results.json; refusing to replace files of an unknown run. "
            "Choose another -o."
        )
    try:
        previous = json.loads((out_dir / "results.json").read_text())["input"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise OutputError(f"{out_dir}/results.json is unreadable ({exc}); choose another -o.") from None
    same = (
        list(previous.get("shape_zyx", [])) == list(ct.shape)
        and np.allclose(previous.get("spacing_mm", [0, 0, 0]), ct.spacing, rtol=1e-3)
        and np.allclose(previous.get("origin_lps_mm", [0, 0, 0]), ct.origin, atol=0.5)
    )
    if not same:
        raise OutputError(
            f"{out_dir} holds the results of another CT ({previous.get('source', '?')}, shape "
            f"{previous.get('shape_zyx')}); choose another -o for this one."
        )
    return result_from_outputs(out_dir, ct)


def recompute_findings_files(ct_path: Path, seg_path: Path, out_dir: Path, spacing: Optional[Spacing] = None) -> Dict[str, Path]:
    """``covidctdx findings``: recompute into ``out_dir``, keeping a run's other results there.

    Into a run's own folder the classification, severity, evidence map and DeepSC-COVID's
    lesion segment of that run are kept; lungs, lesions and findings are replaced.
    """
    with OutputFolder(out_dir) as folder:
        ct = read_ct(ct_path, spacing=spacing)
        previous = previous_run(folder.path, ct) if folder.path.is_dir() else None
        result = result_from_segmentation(ct, seg_path)
        if previous is not None:
            result.classification, result.severity = previous.classification, previous.severity
            result.evidence = previous.evidence
            if result.deepsc_lesion is None:
                result.deepsc_lesion = previous.deepsc_lesion
            for key in ("classification", "severity"):
                if key in previous.skipped:
                    result.skipped[key] = previous.skipped[key]
                elif getattr(result, key) is not None:
                    result.skipped.pop(key, None)
            result.timings_s = {**previous.timings_s, **result.timings_s}
        return write_outputs(result, folder, source=str(ct_path))
