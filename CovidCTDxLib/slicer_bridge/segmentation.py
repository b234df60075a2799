"""Masks <-> segmentation nodes: segments with our terminology and colours, and back to masks.

Why here and not in the Qt module: the same code runs inside Slicer, in ``PythonSlicer`` and in
the test suite on real MRML from ``slicer-core``; every function takes its nodes explicitly.
"""
from __future__ import annotations

from typing import Dict, Mapping, Optional, Tuple

import numpy as np

from ..errors import GeometryError, InputError
from ..result import LungMasks
from ..segments import SEGMENTS, SegmentSpec
from .geometry import ijk_to_ras, image_data, import_slicer, import_vtk, matrix_to_numpy, numpy_to_matrix

#: Attribute prefix for everything this module stores on nodes.
ATTRIBUTE_PREFIX = "CovidCTDx."
#: 3D opacity of lung segments, so lesions inside them stay visible.
LUNG_OPACITY_3D = 0.2


def register_segmentation_converter_rules() -> None:
    """Register the labelmap ⇄ closed-surface rules if nobody has yet.

    The Slicer application registers them at start-up; bare ``slicer-core`` (tests,
    PythonSlicer scripts) does not, and without them no 3D surface can be made.
    """
    slicer = import_slicer()
    factory = slicer.vtkSegmentationConverterFactory.GetInstance()
    present = {rule.GetClassName() for rule in factory.GetConverterRules()}
    for rule_class in (
        slicer.vtkBinaryLabelmapToClosedSurfaceConversionRule,
        slicer.vtkClosedSurfaceToBinaryLabelmapConversionRule,
    ):
        if rule_class.__name__ not in present:
            factory.RegisterConverterRule(rule_class())


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
    slicer = import_slicer()
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
        labelmap.ShallowCopy(image_data(mask[k0 : k1 + 1, j0 : j1 + 1, i0 : i1 + 1].astype(np.uint8), extent))
        labelmap.SetImageToWorldMatrix(ijk_to_ras_matrix)
        segment.AddRepresentation(slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName(), labelmap)
        if not segmentation.AddSegment(segment, segment_id):
            segment = None
    if segment is None:
        raise RuntimeError(f"Could not add segment '{segment_id}' to the segmentation.")
    if spec is not None:
        segment.SetColor(*spec.color_float)
        _set_terminology(segment, spec)


def place_in_hierarchy(scene, node, input_volume_node) -> None:
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
    slicer = import_slicer()
    # A segmentation copies the factory's rules when it is created: register them first.
    register_segmentation_converter_rules()
    shape = tuple(reference_volume_node.GetImageData().GetDimensions()[::-1])
    matrix = numpy_to_matrix(ijk_to_ras(reference_volume_node))
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


# --------------------------------------------------------------------------- result → scene
def set_lung_provenance(segmentation_node, lungs: LungMasks) -> None:
    """Which engine (and, for a neural lung model, which weights) drew the lung segments."""
    segmentation_node.SetAttribute(ATTRIBUTE_PREFIX + "lungs.method", lungs.method)
    if lungs.model_provenance:
        for key, value in lungs.model_provenance.items():
            segmentation_node.SetAttribute(f"{ATTRIBUTE_PREFIX}lungs.{key}", str(value))


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
    vtk, numpy_support = import_vtk()
    m = vtk.vtkMatrix4x4()
    labelmap.GetImageToWorldMatrix(m)
    if not np.allclose(matrix_to_numpy(m), reference_matrix, atol=1e-6):
        return None
    mask = np.zeros(dims[::-1], dtype=bool)
    i0, i1, j0, j1, k0, k1 = labelmap.GetExtent()
    scalars = labelmap.GetPointData().GetScalars()
    if scalars is None or i1 < i0 or j1 < j0 or k1 < k0:
        return mask
    block = numpy_support.vtk_to_numpy(scalars).reshape(k1 - k0 + 1, j1 - j0 + 1, i1 - i0 + 1)
    lo = [max(0, v) for v in (k0, j0, i0)]
    hi = [min(d, v + 1) for d, v in zip(dims[::-1], (k1, j1, i1))]
    if any(h <= low for low, h in zip(lo, hi)):
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
    slicer = import_slicer()
    _, numpy_support = import_vtk()
    dims = reference_volume_node.GetImageData().GetDimensions()
    reference_matrix = ijk_to_ras(reference_volume_node)
    reference = slicer.vtkOrientedImageData()
    reference.SetExtent(0, dims[0] - 1, 0, dims[1] - 1, 0, dims[2] - 1)
    reference.SetImageToWorldMatrix(numpy_to_matrix(reference_matrix))
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
