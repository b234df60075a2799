"""Result ⇄ MRML scene: the only place that knows about Slicer nodes.

Why a separate, Qt-free module: the same code must run inside the Slicer application, in
``PythonSlicer`` scripts and in the test suite with ``slicer-core`` from PyPI (real MRML, no
GUI). It therefore only uses ``slicer`` (MRML, segmentation core) and ``vtk``, and every
function takes the scene explicitly instead of relying on ``slicer.mrmlScene``.

Geometry: MRML volume nodes store an IJK→RAS matrix; ``CTVolume`` is LPS (like SimpleITK
and DICOM). The conversion happens here and nowhere else: LPS = diag(-1, -1, 1) · RAS. The
full matrix (direction and spacing) is honoured, so flipped and oblique volumes map to the
same physical voxels both ways.

Writing is all-or-nothing: :func:`write_result_to_scene` remembers which nodes existed
before it started and removes every node it added if anything fails, so a failed or
cancelled run leaves the scene exactly as the user had it.
"""
from __future__ import annotations

import json
import logging
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from ..errors import GeometryError, InputError
from ..result import CLASS_KEYS, CLASS_NAMES, NOT_FOR_DIAGNOSIS, SEVERITY_KEYS, LungMasks, Provenance, Result
from ..io.results import json_safe, segmentation_masks
from ..segments import SEGMENTS, SegmentSpec
from ..volume import CTVolume

logger = logging.getLogger(__name__)

#: LPS ↔ RAS: negate x and y. Its own inverse.
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])

#: Attribute prefix for everything this module stores on nodes.
ATTRIBUTE_PREFIX = "CovidCTDx."
#: Segments written in this order (lungs first so lesions are drawn on top).
#: 3D opacity of lung segments, so lesions inside them stay visible.
LUNG_OPACITY_3D = 0.2
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


# --------------------------------------------------------------------------- imports
def _slicer():
    """Import ``slicer`` lazily so that importing CovidCTDxLib never needs Slicer."""
    import slicer  # noqa: WPS433 - optional dependency

    return slicer


def _vtk():
    import vtk
    from vtk.util import numpy_support

    return vtk, numpy_support


def register_segmentation_converter_rules() -> None:
    """Register the labelmap ⇄ closed-surface rules if nobody has yet.

    The Slicer application registers them at start-up; bare ``slicer-core`` (tests,
    PythonSlicer scripts) does not, and without them no 3D surface can be made.
    """
    slicer = _slicer()
    factory = slicer.vtkSegmentationConverterFactory.GetInstance()
    present = {rule.GetClassName() for rule in factory.GetConverterRules()}
    for rule_class in (
        slicer.vtkBinaryLabelmapToClosedSurfaceConversionRule,
        slicer.vtkClosedSurfaceToBinaryLabelmapConversionRule,
    ):
        if rule_class.__name__ not in present:
            factory.RegisterConverterRule(rule_class())


# --------------------------------------------------------------------------- geometry
def _matrix_to_numpy(vtk_matrix) -> np.ndarray:
    return np.array([[vtk_matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def _numpy_to_matrix(array: np.ndarray):
    vtk, _ = _vtk()
    m = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            m.SetElement(r, c, float(array[r, c]))
    return m


def ijk_to_ras(volume_node) -> np.ndarray:
    """The 4x4 IJK→RAS matrix of a volume node, including a linear parent transform.

    A non-linear parent transform cannot be expressed on a voxel grid and is refused.
    """
    vtk, _ = _vtk()
    m = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(m)
    matrix = _matrix_to_numpy(m)
    transform = volume_node.GetParentTransformNode()
    if transform is not None:
        if not transform.IsTransformToWorldLinear():
            raise GeometryError(
                f"Volume '{volume_node.GetName()}' is under a non-linear transform. Harden the transform "
                "(Data module → right-click → Harden transform) before running CovidCTDx."
            )
        to_world = vtk.vtkMatrix4x4()
        transform.GetMatrixTransformToWorld(to_world)
        matrix = _matrix_to_numpy(to_world) @ matrix
    return matrix


def ras_matrix_for(ct: CTVolume) -> np.ndarray:
    """The IJK→RAS matrix of a CTVolume (LPS internally)."""
    return LPS_TO_RAS @ ct.index_to_lps_matrix()


def ct_from_volume_node(volume_node, copy: bool = True) -> CTVolume:
    """A CTVolume (LPS, (z, y, x) array) from a scalar volume node.

    The array is copied by default so the CT stays valid if the node changes or is deleted
    while a stage runs; ``copy=False`` shares VTK's memory for synchronous read-only use
    (the recompute after an edit). Spacing and direction come from the full IJK→RAS matrix, so flipped
    (negative direction) and oblique volumes keep their physical voxel positions.
    """
    _, numpy_support = _vtk()
    if volume_node is None:
        raise InputError("No input volume selected.")
    image = volume_node.GetImageData()
    if image is None or image.GetPointData() is None or image.GetPointData().GetScalars() is None:
        raise InputError(f"Volume '{volume_node.GetName()}' has no voxel data.")
    if image.GetNumberOfScalarComponents() != 1:
        raise InputError(
            f"Volume '{volume_node.GetName()}' has {image.GetNumberOfScalarComponents()} components per voxel; "
            "a CT has one (is this a colour or vector image?)."
        )
    dims = image.GetDimensions()
    array = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(dims[::-1])
    if copy:
        array = array.copy()
    lps = LPS_TO_RAS @ ijk_to_ras(volume_node)
    axes = lps[:3, :3]
    spacing = np.linalg.norm(axes, axis=0)
    if np.any(spacing <= 0):
        raise GeometryError(f"Volume '{volume_node.GetName()}' has zero voxel spacing.")
    direction = axes / spacing
    metadata = {"source": f"Slicer volume node {volume_node.GetID()}", "name": volume_node.GetName(), "format": "mrml"}
    return CTVolume(array, tuple(spacing), tuple(lps[:3, 3]), direction, metadata)


def _image_data(array: np.ndarray, extent: Optional[Sequence[int]] = None):
    """A vtkImageData holding a deep copy of a (z, y, x) array.

    ``extent`` (i0, i1, j0, j1, k0, k1) places a sub-block inside a larger grid; VTK keeps
    the copy, so the numpy array may be freed afterwards.
    """
    vtk, numpy_support = _vtk()
    array = np.ascontiguousarray(array)
    image = vtk.vtkImageData()
    if extent is None:
        image.SetDimensions(array.shape[2], array.shape[1], array.shape[0])
    else:
        image.SetExtent(*extent)
    vtk_array = numpy_support.numpy_to_vtk(array.ravel(), deep=True, array_type=numpy_support.get_vtk_array_type(array.dtype))
    image.GetPointData().SetScalars(vtk_array)
    return image


def _new_volume_node(scene, name: str, array: np.ndarray, ijk_to_ras_matrix: np.ndarray, node_class: str = "vtkMRMLScalarVolumeNode"):
    node = scene.AddNewNodeByClass(node_class, name)
    node.SetIJKToRASMatrix(_numpy_to_matrix(ijk_to_ras_matrix))
    node.SetAndObserveImageData(_image_data(array))
    node.CreateDefaultDisplayNodes()
    return node


def volume_node_from_ct(scene, ct: CTVolume, name: str, node_class: str = "vtkMRMLScalarVolumeNode"):
    """Add a volume node holding the CT's voxels on its grid (LPS → RAS here, once)."""
    return _new_volume_node(scene, name, ct.array, ras_matrix_for(ct), node_class)


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


# --------------------------------------------------------------------------- segmentation
def _check_mask(name: str, mask: np.ndarray, shape: Tuple[int, ...]) -> np.ndarray:
    mask = np.asarray(mask)
    if mask.shape != tuple(shape):
        raise GeometryError(f"Segment '{name}' has shape {mask.shape} but the input volume has {tuple(shape)}.")
    return mask.astype(bool, copy=False)


def _bounding_extent(mask: np.ndarray) -> Optional[Tuple[int, int, int, int, int, int]]:
    """VTK extent (i0, i1, j0, j1, k0, k1) of the True voxels, or None if empty."""
    ranges = []
    for axis in (2, 1, 0):  # i = x (array axis 2), j = y, k = z
        other = tuple(a for a in range(3) if a != axis)
        hit = np.flatnonzero(np.any(mask, axis=other))
        if hit.size == 0:
            return None
        ranges.extend((int(hit[0]), int(hit[-1])))
    return tuple(ranges)  # type: ignore[return-value]


def _set_terminology(segment, spec: SegmentSpec) -> None:
    entry = spec.terminology_entry()
    if hasattr(segment, "SetTerminology"):  # Slicer ≥ 5.7
        segment.SetTerminology(entry)
    else:
        segment.SetTag(segment.GetTerminologyEntryTagName(), entry)


def _add_segment(segmentation_node, segment_id: str, mask: np.ndarray, ijk_to_ras_matrix) -> None:
    """Add one segment as its own cropped labelmap (overlaps with other segments allowed).

    An empty mask becomes an empty segment (still with name, colour and terminology), so
    the user can paint it in the Segment Editor.
    """
    slicer = _slicer()
    spec = SEGMENTS.get(segment_id)
    name = spec.name if spec else segment_id
    segmentation = segmentation_node.GetSegmentation()
    extent = _bounding_extent(mask)
    if extent is None:
        added = segmentation.AddEmptySegment(segment_id, name)
        segment = segmentation.GetSegment(segment_id) if added == segment_id else None
    else:
        segment = slicer.vtkSegment()
        segment.SetName(name)
        i0, i1, j0, j1, k0, k1 = extent
        labelmap = slicer.vtkOrientedImageData()
        labelmap.ShallowCopy(_image_data(mask[k0 : k1 + 1, j0 : j1 + 1, i0 : i1 + 1].astype(np.uint8), extent))
        labelmap.SetImageToWorldMatrix(ijk_to_ras_matrix)
        segment.AddRepresentation(slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName(), labelmap)
        if not segmentation.AddSegment(segment, segment_id):
            segment = None
    if segment is None:
        raise RuntimeError(f"Could not add segment '{segment_id}' to the segmentation.")
    if spec is not None:
        segment.SetColor(*spec.color_float)
        _set_terminology(segment, spec)


def _place_in_hierarchy(scene, node, input_volume_node) -> None:
    """Put ``node`` next to the input volume (under its study) in the subject hierarchy."""
    sh = scene.GetSubjectHierarchyNode()
    if sh is None or input_volume_node is None:
        return
    volume_item = sh.GetItemByDataNode(input_volume_node)
    if not volume_item:
        return
    parent = sh.GetItemParent(volume_item)
    item = sh.GetItemByDataNode(node) or sh.CreateItem(parent, node)
    sh.SetItemParent(item, parent)


def create_segmentation_node(
    scene,
    masks: Mapping[str, np.ndarray],
    reference_volume_node,
    name: str,
    closed_surface: bool = True,
):
    """A segmentation node with one segment per mask, on the reference volume's grid."""
    slicer = _slicer()
    # A segmentation copies the factory's rules when it is created: register them first.
    register_segmentation_converter_rules()
    shape = tuple(reference_volume_node.GetImageData().GetDimensions()[::-1])
    matrix = _numpy_to_matrix(ijk_to_ras(reference_volume_node))
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
    node.CreateDefaultDisplayNodes()
    node.SetReferenceImageGeometryParameterFromVolumeNode(reference_volume_node)
    node.SetNodeReferenceID(slicer.vtkMRMLSegmentationNode.GetReferenceImageGeometryReferenceRole(), reference_volume_node.GetID())
    for segment_id, mask in masks.items():
        _add_segment(node, segment_id, _check_mask(segment_id, mask, shape), matrix)
    # Merge segments that do not overlap into shared layers: smaller files, faster display.
    node.GetSegmentation().CollapseBinaryLabelmaps(False)
    display = node.GetDisplayNode()
    for segment_id in ("right_lung", "left_lung"):
        if node.GetSegmentation().GetSegment(segment_id) is not None:
            display.SetSegmentOpacity3D(segment_id, LUNG_OPACITY_3D)
    if closed_surface and node.GetSegmentation().GetNumberOfSegments():
        if not node.CreateClosedSurfaceRepresentation():
            raise RuntimeError("Could not create the 3D surfaces of the segmentation.")
        display.SetPreferredDisplayRepresentationName3D(slicer.vtkSegmentationConverter.GetClosedSurfaceRepresentationName())
    return node


# --------------------------------------------------------------------------- tables
def _column(values: Sequence[Any], kind: str, name: str):
    vtk, _ = _vtk()
    array = vtk.vtkStringArray() if kind == "string" else vtk.vtkDoubleArray()
    array.SetName(name)
    for v in values:
        if kind == "string":
            array.InsertNextValue("" if v is None else str(v))
        else:
            array.InsertNextValue(float("nan") if v is None else float(v))
    return array


def fill_table(table_node, columns: Sequence[Tuple[str, str, str, str]], rows: Sequence[Sequence[Any]]) -> None:
    """Replace a table node's content.

    ``columns``: (name, "string"|"double", unit, description); ``rows``: one value per
    column. Units and descriptions go into the table's schema, so Slicer shows them and
    saves them to the .schema.tsv next to the .tsv.
    """
    table_node.RemoveAllColumns()
    for index, (name, kind, unit, description) in enumerate(columns):
        table_node.AddColumn(_column([row[index] for row in rows], kind, name))
        if unit:
            table_node.SetColumnUnitLabel(name, unit)
        if description:
            table_node.SetColumnDescription(name, description)
    table_node.Modified()


def _table(scene, name: str, columns, rows, attributes: Mapping[str, Any], description: str = ""):
    node = scene.AddNewNodeByClass("vtkMRMLTableNode", name)
    fill_table(node, columns, rows)
    for key, value in attributes.items():
        node.SetAttribute(ATTRIBUTE_PREFIX + key, value if isinstance(value, str) else json.dumps(value))
    if description:
        node.SetDescription(description)
    return node


def _provenance_attributes(provenance: Provenance) -> Dict[str, Any]:
    return {f"weights.{k}": v for k, v in provenance.to_dict().items()}


def _provenance_text(provenance: Provenance) -> str:
    text = (
        f"Model {provenance.model}; weights {provenance.weights_file} (SHA-256 {provenance.weights_sha256}); "
        f"trained on {provenance.training_data}; CovidCTDx {provenance.project_version}."
    )
    return f"{text} {NOT_FOR_DIAGNOSIS}." if provenance.not_for_diagnosis else text


def _title(base: str, provenance: Provenance) -> str:
    return f"{base} ({NOT_FOR_DIAGNOSIS})" if provenance.not_for_diagnosis else base


CLASSIFICATION_COLUMNS = (
    ("class", "string", "", "Scan-level class (DeepSC-COVID)"),
    ("key", "string", "", "Machine-readable class key"),
    ("probability", "double", "", "Softmax probability, 0..1"),
    ("predicted", "string", "", "'yes' for the predicted class"),
)
SEVERITY_COLUMNS = (
    ("severity", "string", "", "Severity grade (RACNet)"),
    ("probability", "double", "", "Probability of this grade, 0..1"),
    ("predicted", "string", "", "'yes' for the predicted grade"),
    ("nearest_anchor_distance", "double", "", "Latent distance to the nearest anchor of this grade (smaller = more typical)"),
)
FINDINGS_COLUMNS = (
    ("name", "string", "", "Metric"),
    ("value", "double", "", "Value (see unit)"),
    ("unit", "string", "", "Unit of the value"),
    ("definition", "string", "", "How the metric is computed"),
)


def classification_table(scene, classification, name: str):
    rows = [
        (CLASS_NAMES[k], k, classification.probabilities.get(k), "yes" if k == classification.label else "")
        for k in CLASS_KEYS
    ]
    attributes = {"label": classification.label, "probabilities": dict(classification.probabilities)}
    attributes.update(_provenance_attributes(classification.provenance))
    return _table(scene, _title(name, classification.provenance), CLASSIFICATION_COLUMNS, rows, attributes,
                  _provenance_text(classification.provenance))


def severity_table(scene, severity, name: str):
    nearest: Dict[str, float] = {}
    for anchor in severity.anchors:
        key = str(anchor.get("class"))
        distance = float(anchor.get("distance", np.nan))
        nearest[key] = min(distance, nearest.get(key, np.inf))
    rows = [
        (k, severity.probabilities.get(k), "yes" if k == severity.label else "", nearest.get(k))
        for k in SEVERITY_KEYS
    ]
    attributes = {
        "label": severity.label,
        "probabilities": dict(severity.probabilities),
        "covid_probability": severity.covid_probability,
        "out_of_distribution": "true" if severity.out_of_distribution else "false",
        "anchors": list(severity.anchors),
        "slices_used": severity.slices_used,
    }
    attributes.update(_provenance_attributes(severity.provenance))
    title = _title(name, severity.provenance)
    if severity.out_of_distribution:
        title += " [OUT OF DISTRIBUTION]"
    description = _provenance_text(severity.provenance)
    if severity.out_of_distribution:
        description = "The scan is far from every training anchor: the severity is unreliable. " + description
    return _table(scene, title, SEVERITY_COLUMNS, rows, attributes, description)


def findings_rows(findings) -> List[Tuple[str, Optional[float], str, str]]:
    rows = []
    for name, value, unit, definition in findings.rows():
        rows.append((name, None if value is None else float(value), unit or "", definition or ""))
    return rows


def write_findings_table(scene, findings, name: str, table_node=None):
    """Fill (or create) a findings table: one row per metric with unit and definition."""
    rows = findings_rows(findings)  # evaluated before touching the scene
    if table_node is None:
        table_node = scene.AddNewNodeByClass("vtkMRMLTableNode", name)
    fill_table(table_node, FINDINGS_COLUMNS, rows)
    table_node.SetAttribute(ATTRIBUTE_PREFIX + "findings", json.dumps(json_safe(findings.to_dict())))
    return table_node


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
    node = _new_volume_node(scene, name, evidence, ijk_to_ras(reference_volume_node))
    display = node.GetDisplayNode()
    display.SetAndObserveColorNodeID(_evidence_color_node(scene).GetID())
    display.AutoWindowLevelOff()
    display.SetWindowLevelMinMax(0.0, 1.0)
    display.SetApplyThreshold(True)
    display.SetLowerThreshold(EVIDENCE_DISPLAY_THRESHOLD)
    display.SetUpperThreshold(1.0)
    return node


# --------------------------------------------------------------------------- result → scene
def _set_lung_provenance(segmentation_node, lungs: LungMasks) -> None:
    """Which engine (and, for a neural lung model, which weights) drew the lung segments."""
    segmentation_node.SetAttribute(ATTRIBUTE_PREFIX + "lungs.method", lungs.method)
    if lungs.model_provenance:
        for key, value in lungs.model_provenance.items():
            segmentation_node.SetAttribute(f"{ATTRIBUTE_PREFIX}lungs.{key}", str(value))


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
                _set_lung_provenance(out.segmentation, result.lungs)
        if result.classification is not None:
            out.classification_table = classification_table(scene, result.classification, f"{prefix} classification")
        if result.severity is not None:
            out.severity_table = severity_table(scene, result.severity, f"{prefix} severity")
        if result.findings is not None:
            out.findings_table = write_findings_table(scene, result.findings, f"{prefix} findings")
        if result.evidence is not None:
            out.evidence_volume = evidence_volume(scene, input_volume_node, result.evidence, f"{prefix} evidence")
        for node in out.nodes():
            node.SetAttribute(ATTRIBUTE_PREFIX + "inputVolume", input_volume_node.GetID())
            _place_in_hierarchy(scene, node, input_volume_node)
        if out.segmentation is not None:
            for node in out.nodes()[1:]:
                node.SetAttribute(ATTRIBUTE_PREFIX + "segmentation", out.segmentation.GetID())
    return out


# --------------------------------------------------------------------------- scene → masks → findings
def _segment_key(segment_id: str, segment_name: str) -> str:
    """Our segment ID for a segment, by ID first, then by (user-visible) name."""
    if segment_id in SEGMENTS:
        return segment_id
    wanted = segment_name.strip().lower()
    for spec in SEGMENTS.values():
        if wanted in (spec.name.lower(), spec.segment_id):
            return spec.segment_id
    return segment_id


def _labelmap_on_grid(labelmap, reference_matrix: np.ndarray, dims: Tuple[int, int, int]) -> Optional[np.ndarray]:
    """Fast path: a labelmap already on the reference grid (the usual case after our own
    write or Segment Editor edits) is pasted by extent, without resampling. None if not aligned."""
    vtk, numpy_support = _vtk()
    m = vtk.vtkMatrix4x4()
    labelmap.GetImageToWorldMatrix(m)
    if not np.allclose(_matrix_to_numpy(m), reference_matrix, atol=1e-6):
        return None
    mask = np.zeros(dims[::-1], dtype=bool)
    i0, i1, j0, j1, k0, k1 = labelmap.GetExtent()
    scalars = labelmap.GetPointData().GetScalars()
    if scalars is None or i1 < i0 or j1 < j0 or k1 < k0:
        return mask
    block = numpy_support.vtk_to_numpy(scalars).reshape(k1 - k0 + 1, j1 - j0 + 1, i1 - i0 + 1)
    lo = [max(0, v) for v in (k0, j0, i0)]
    hi = [min(d, v + 1) for d, v in zip(dims[::-1], (k1, j1, i1))]
    if any(h <= l for l, h in zip(lo, hi)):
        return mask
    mask[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]] = (
        block[lo[0] - k0 : hi[0] - k0, lo[1] - j0 : hi[1] - j0, lo[2] - i0 : hi[2] - i0] > 0
    )
    return mask


def masks_from_segmentation_node(segmentation_node, reference_volume_node) -> Dict[str, np.ndarray]:
    """Every segment as a bool (z, y, x) mask on the reference volume's grid.

    Works whatever the segmentation's own geometry, layers or source representation
    (e.g. after Segment Editor edits, a closed-surface import, or a different grid): a
    segment on another grid is resampled onto the reference volume through physical space.
    """
    slicer = _slicer()
    _, numpy_support = _vtk()
    dims = reference_volume_node.GetImageData().GetDimensions()
    reference_matrix = ijk_to_ras(reference_volume_node)
    reference = slicer.vtkOrientedImageData()
    reference.SetExtent(0, dims[0] - 1, 0, dims[1] - 1, 0, dims[2] - 1)
    reference.SetImageToWorldMatrix(_numpy_to_matrix(reference_matrix))
    segmentation = segmentation_node.GetSegmentation()
    if segmentation.GetNumberOfSegments() and not segmentation_node.CreateBinaryLabelmapRepresentation():
        raise InputError(f"Segmentation '{segmentation_node.GetName()}' cannot be converted to a labelmap.")
    masks: Dict[str, np.ndarray] = {}
    for index in range(segmentation.GetNumberOfSegments()):
        segment_id = segmentation.GetNthSegmentID(index)
        segment = segmentation.GetSegment(segment_id)
        labelmap = slicer.vtkOrientedImageData()
        segmentation_node.GetBinaryLabelmapRepresentation(segment_id, labelmap)
        mask = _labelmap_on_grid(labelmap, reference_matrix, dims)
        if mask is None:
            on_grid = slicer.vtkOrientedImageData()
            if not slicer.vtkOrientedImageDataResample.ResampleOrientedImageToReferenceOrientedImage(labelmap, reference, on_grid):
                raise GeometryError(f"Segment '{segment.GetName()}' could not be resampled onto '{reference_volume_node.GetName()}'.")
            scalars = on_grid.GetPointData().GetScalars()
            mask = np.zeros(dims[::-1], dtype=bool) if scalars is None else numpy_support.vtk_to_numpy(scalars).reshape(dims[::-1]) > 0
        masks[_segment_key(segment_id, segment.GetName())] = mask
    return masks


def recompute_findings(scene, segmentation_node, volume_node, table_node=None):
    """Recompute the findings table from a (possibly edited) segmentation.

    Same rules as the command line's ``covidctdx findings`` (``findings_from_masks``). The
    findings are computed before the scene is touched, so an error leaves an existing table
    as it was. Returns the (new or updated) findings table node.
    """
    from ..findings.recompute import findings_from_masks

    masks = masks_from_segmentation_node(segmentation_node, volume_node)
    ct = ct_from_volume_node(volume_node, copy=False)  # synchronous, read-only
    findings = findings_from_masks(ct, masks, "edited segmentation").findings
    name = f"{volume_node.GetName()} CovidCTDx findings"
    with scene_transaction(scene):
        created = table_node is None
        table_node = write_findings_table(scene, findings, name, table_node)
        table_node.SetAttribute(ATTRIBUTE_PREFIX + "segmentation", segmentation_node.GetID())
        table_node.SetAttribute(ATTRIBUTE_PREFIX + "inputVolume", volume_node.GetID())
        if created:
            _place_in_hierarchy(scene, table_node, volume_node)
    return table_node


def findings_from_table(table_node) -> Dict[str, Any]:
    """The findings dict stored on a findings table (for summaries)."""
    text = table_node.GetAttribute(ATTRIBUTE_PREFIX + "findings") if table_node is not None else None
    return json.loads(text) if text else {}
