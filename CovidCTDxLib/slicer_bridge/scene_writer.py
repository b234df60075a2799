"""A whole Result into the MRML scene (and edited masks back into findings), as one transaction.

Why Qt-free (like the whole ``slicer_bridge`` package): the same code must run inside the
Slicer application, in ``PythonSlicer`` scripts and in the test suite with ``slicer-core``
from PyPI (real MRML, no GUI). It only uses ``slicer`` (MRML, segmentation core) and ``vtk``,
and every function takes the scene explicitly instead of relying on ``slicer.mrmlScene``.
Geometry conversions live in :mod:`.geometry`, segments in :mod:`.segmentation`, tables in
:mod:`.tables`.

Writing is all-or-nothing: :func:`write_result_to_scene` remembers which nodes existed
before it started and removes every node it added if anything fails, so a failed or
cancelled run leaves the scene exactly as the user had it.
"""
from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, List, Optional

import numpy as np

from ..errors import GeometryError
from ..io.results import segmentation_masks
from ..result import Result
from .geometry import ct_from_volume_node, ijk_to_ras, new_volume_node
from .segmentation import (
    ATTRIBUTE_PREFIX,
    create_segmentation_node,
    masks_from_segmentation_node,
    place_in_hierarchy,
    set_lung_provenance,
)
from .tables import classification_table, severity_table, write_findings_table

logger = logging.getLogger(__name__)
#: Evidence maps are probabilities; values below this are transparent in the overlay.
EVIDENCE_DISPLAY_THRESHOLD = 0.2
#: Slicer colour tables tried, in order, for the evidence map.
EVIDENCE_COLOR_NODE_IDS = (
    "vtkMRMLColorTableNodeFileInferno.txt",
    "vtkMRMLColorTableNodeFileColdToHotRainbow.txt",
    "vtkMRMLColorTableNodeRainbow",
)
EVIDENCE_COLOR_NODE_NAME = "CovidCTDx evidence"


@dataclass
class ResultNodes:
    """The nodes one run added to the scene (None for outputs whose stage did not run)."""

    segmentation: Any = None
    classification_table: Any = None
    severity_table: Any = None
    findings_table: Any = None
    evidence_volume: Any = None

    def nodes(self) -> List[Any]:
        return [
            n
            for n in (self.segmentation, self.classification_table, self.severity_table, self.findings_table, self.evidence_volume)
            if n is not None
        ]


# --------------------------------------------------------------------------- atomic writes
@contextmanager
def scene_transaction(scene) -> Iterator[None]:
    """Remove every node added inside the block if the block raises.

    Why diff node IDs instead of tracking our own calls: MRML adds display, storage and
    colour nodes on its own; comparing the scene before and after catches all of them.
    """
    before = {scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())}
    try:
        yield
    except BaseException as exc:
        added = [scene.GetNthNode(i) for i in range(scene.GetNumberOfNodes())]
        added = [n for n in added if n is not None and n.GetID() not in before]
        for node in reversed(added):
            if scene.IsNodePresent(node):
                scene.RemoveNode(node)
        logger.warning("Removed %d node(s) added before the failure (%s); the scene is as it was.", len(added), exc)
        raise


# --------------------------------------------------------------------------- evidence map
def _evidence_color_node(scene):
    for node_id in EVIDENCE_COLOR_NODE_IDS:
        node = scene.GetNodeByID(node_id)
        if node is not None:
            return node
    existing = scene.GetFirstNodeByName(EVIDENCE_COLOR_NODE_NAME)
    if existing is not None:
        return existing
    # Bare MRML (no colour logic): a black→red→yellow ramp like "Inferno".
    node = scene.AddNewNodeByClass("vtkMRMLColorTableNode", EVIDENCE_COLOR_NODE_NAME)
    node.SetTypeToUser()
    n = 256
    node.SetNumberOfColors(n)
    for i in range(n):
        t = i / (n - 1)
        node.SetColor(i, min(1.0, 2.0 * t), max(0.0, 2.0 * t - 1.0), 0.0, 1.0)
    return node


def evidence_volume(scene, reference_volume_node, evidence: np.ndarray, name: str):
    """The evidence (CAM) map as a volume on the reference grid with a heat colour map."""
    shape = tuple(reference_volume_node.GetImageData().GetDimensions()[::-1])
    evidence = np.asarray(evidence, dtype=np.float32)
    if evidence.shape != shape:
        raise GeometryError(f"Evidence map has shape {evidence.shape} but the input volume has {shape}.")
    node = new_volume_node(scene, name, evidence, ijk_to_ras(reference_volume_node))
    display = node.GetDisplayNode()
    display.SetAndObserveColorNodeID(_evidence_color_node(scene).GetID())
    display.AutoWindowLevelOff()
    display.SetWindowLevelMinMax(0.0, 1.0)
    display.SetApplyThreshold(True)
    display.SetLowerThreshold(EVIDENCE_DISPLAY_THRESHOLD)
    display.SetUpperThreshold(1.0)
    return node


def write_result_to_scene(
    scene,
    result: Result,
    input_volume_node,
    name_prefix: Optional[str] = None,
    closed_surface: bool = True,
) -> ResultNodes:
    """Add a Result's segmentation, tables and evidence map to the scene, all or nothing.

    Outputs whose stage did not run (None in the Result) are simply not created. New nodes
    sit next to the input volume in the subject hierarchy (under its study).
    """
    prefix = name_prefix or f"{input_volume_node.GetName()} CovidCTDx"
    out = ResultNodes()
    with scene_transaction(scene):
        masks = segmentation_masks(result)
        if masks:
            out.segmentation = create_segmentation_node(scene, masks, input_volume_node, f"{prefix} segmentation", closed_surface)
            if result.lungs is not None:
                set_lung_provenance(out.segmentation, result.lungs)
        if result.classification is not None:
            out.classification_table = classification_table(scene, result.classification, f"{prefix} classification")
        if result.severity is not None:
            out.severity_table = severity_table(scene, result.severity, f"{prefix} severity")
        if result.findings is not None:
            out.findings_table = write_findings_table(scene, result.findings, f"{prefix} findings", reading=result.reading)
        if result.evidence is not None:
            out.evidence_volume = evidence_volume(scene, input_volume_node, result.evidence, f"{prefix} evidence")
        for node in out.nodes():
            node.SetAttribute(ATTRIBUTE_PREFIX + "inputVolume", input_volume_node.GetID())
            place_in_hierarchy(scene, node, input_volume_node)
        if out.segmentation is not None:
            for node in out.nodes()[1:]:
                node.SetAttribute(ATTRIBUTE_PREFIX + "segmentation", out.segmentation.GetID())
    return out


def recompute_findings(scene, segmentation_node, volume_node, table_node=None):
    """Recompute the findings table from a (possibly edited) segmentation.

    Same rules as the command line's ``covidctdx findings`` (``findings_from_masks``). The
    findings are computed before the scene is touched, so an error leaves an existing table
    as it was. Returns the (new or updated) findings table node.
    """
    from ..findings.recompute import findings_from_masks

    masks = masks_from_segmentation_node(segmentation_node, volume_node)
    ct = ct_from_volume_node(volume_node, copy=False)  # synchronous, read-only
    recomputed = findings_from_masks(ct, masks, "edited segmentation")
    name = f"{volume_node.GetName()} CovidCTDx findings"
    with scene_transaction(scene):
        created = table_node is None
        table_node = write_findings_table(scene, recomputed.findings, name, table_node, reading=recomputed.reading)
        table_node.SetAttribute(ATTRIBUTE_PREFIX + "segmentation", segmentation_node.GetID())
        table_node.SetAttribute(ATTRIBUTE_PREFIX + "inputVolume", volume_node.GetID())
        if created:
            place_in_hierarchy(scene, table_node, volume_node)
    return table_node
