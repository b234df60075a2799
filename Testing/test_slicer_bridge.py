"""The Slicer bridge against real MRML from slicer-core (no Slicer application, no fakes).

What is checked: geometry both ways (incl. flipped and oblique volumes, against the NRRD
that MRML itself writes), segment IDs/names/colours/terminology, closed surfaces, seg.nrrd
round trip through the MRML storage node and the CLI reader, table columns and units,
subject hierarchy placement, edit → recompute, and that a failure leaves the scene as it
was.
"""
from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List

import numpy as np
import pytest

slicer = pytest.importorskip("slicer")
vtk = pytest.importorskip("vtk")

from CovidCTDxLib.errors import CovidCTDxError, GeometryError, InputError  # noqa: E402
from CovidCTDxLib.result import (  # noqa: E402
    CLASS_KEYS,
    NOT_ASSESSABLE,
    NOT_FOR_DIAGNOSIS,
    SEVERITY_KEYS,
    SEVERITY_NOT_APPLICABLE,
    Classification,
    LesionMasks,
    LungMasks,
    Provenance,
    Result,
    Severity,
)
from CovidCTDxLib.segments import COVIDCTDX_CONTEXT, SEGMENTS  # noqa: E402
from CovidCTDxLib.slicer_bridge import geometry, panel_text, scene_writer, segmentation, tables  # noqa: E402
from CovidCTDxLib.volume import LPS_LEFT, CTVolume  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TERMINOLOGY_FILE = REPO / "Resources" / "Terminology" / "CovidCTDx.term.json"
SHAPE = (16, 40, 48)  # z, y, x: small, but anisotropic so axis mix-ups show


def _rotation(axis: np.ndarray, degrees: float) -> np.ndarray:
    axis = axis / np.linalg.norm(axis)
    a = np.radians(degrees)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(a) * k + (1 - np.cos(a)) * k @ k


DIRECTIONS = {
    "identity": np.eye(3),
    # i runs patient right→left reversed (radiological flip) and k runs head→feet.
    "flipped": np.diag([-1.0, 1.0, -1.0]),
    "oblique": _rotation(np.array([0.3, 1.0, 0.2]), 25.0),
}


def make_ct(direction: np.ndarray) -> CTVolume:
    rng = np.random.default_rng(0)
    array = rng.integers(-1000, 100, size=SHAPE).astype(np.int16)
    return CTVolume(array, (0.9, 0.7, 2.5), (-17.0, 31.0, -120.0), direction)


def make_masks(ct: CTVolume) -> Dict[str, np.ndarray]:
    """Two 'lungs' split in patient coordinates (LPS x), a lesion in the right one."""
    x = ct.lps_coordinate(LPS_LEFT)
    x = np.broadcast_to(x, ct.shape)
    centre = np.median(x)
    body = np.zeros(ct.shape, bool)
    body[2:-2, 5:-5, 4:-4] = True
    right = body & (x < centre - 2)
    left = body & (x > centre + 2)
    lesion = np.zeros(ct.shape, bool)
    zz, yy, xx = np.nonzero(right)
    c = (int(np.median(zz)), int(np.median(yy)), int(np.median(xx)))
    lesion[c[0] - 3 : c[0] + 3, c[1] - 5 : c[1] + 5, c[2] - 4 : c[2] + 4] = True
    lesion &= right
    ggo = lesion.copy()
    ggo[c[0] :] = False
    consolidation = lesion & ~ggo
    return {"right_lung": right, "left_lung": left, "lesion": lesion, "ggo": ggo, "consolidation": consolidation}


PROVENANCE = Provenance("DeepSC-COVID", "deepsc_demo.safetensors", "ab" * 32, "synthetic phantoms", True, "0.1.0")


@dataclass
class TableFindings:
    """Stands in for findings.Findings in the table-writer test (only its two methods)."""

    values: List[tuple]

    def rows(self):
        return self.values

    def to_dict(self):
        return {name: value for name, value, _, _ in self.values}


def make_result(ct: CTVolume, masks: Dict[str, np.ndarray], **overrides) -> Result:
    lungs = LungMasks(masks["right_lung"], masks["left_lung"], np.zeros(ct.shape, bool), masks["right_lung"] | masks["left_lung"])
    lesions = LesionMasks(masks["lesion"], ggo=masks["ggo"], consolidation=masks["consolidation"])
    classification = Classification("covid19", {"covid19": 0.7, "cap": 0.2, "non_pneumonia": 0.1}, PROVENANCE)
    severity = Severity(
        "moderate",
        {"mild": 0.2, "moderate": 0.6, "severe": 0.15, "critical": 0.05},
        0.9,
        [{"class": "moderate", "index": 3, "distance": 0.8}, {"class": "mild", "index": 1, "distance": 1.4},
         {"class": "moderate", "index": 0, "distance": 1.1}],
        True,
        PROVENANCE,
        slices_used=16,
    )
    findings = TableFindings([("lesion_volume_ml", 1.25, "mL", "Volume of the lesion segment"),
                              ("lesion_count", 1, "", "Connected lesion components")])
    evidence = np.linspace(0, 1, int(np.prod(ct.shape)), dtype=np.float32).reshape(ct.shape)
    fields = dict(ct=ct, lungs=lungs, lesions=lesions, classification=classification, severity=severity,
                  findings=findings, evidence=evidence)
    fields.update(overrides)
    return Result(**fields)


@pytest.fixture
def scene():
    s = slicer.vtkMRMLScene()
    slicer.vtkMRMLSubjectHierarchyNode.ResolveSubjectHierarchy(s)
    return s


def _node_ids(scene) -> List[str]:
    return [scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())]


def _ijk_to_ras(node) -> np.ndarray:
    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    return np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)])


# --------------------------------------------------------------------------- geometry
@pytest.mark.parametrize("kind", sorted(DIRECTIONS))
def test_volume_round_trip_keeps_geometry(scene, kind):
    ct = make_ct(DIRECTIONS[kind])
    node = geometry.volume_node_from_ct(scene, ct, "CT")
    expected = np.diag([-1.0, -1.0, 1.0, 1.0]) @ ct.index_to_lps_matrix()
    np.testing.assert_allclose(_ijk_to_ras(node), expected, atol=1e-9)
    # One voxel: MRML's RAS position is the CT's LPS position with x, y negated.
    ijk = np.array([7, 23, 11])
    ras = _ijk_to_ras(node) @ np.append(ijk, 1.0)
    lps = ct.index_to_lps(ijk)
    np.testing.assert_allclose(ras[:3], [-lps[0], -lps[1], lps[2]], atol=1e-9)
    back = geometry.ct_from_volume_node(node)
    np.testing.assert_array_equal(back.array, ct.array)
    np.testing.assert_allclose(back.spacing, ct.spacing)
    np.testing.assert_allclose(back.origin, ct.origin, atol=1e-9)
    np.testing.assert_allclose(back.direction, ct.direction, atol=1e-9)


@pytest.mark.parametrize("kind", ["flipped", "oblique"])
def test_ct_from_node_matches_the_nrrd_mrml_writes(scene, kind, tmp_path):
    """Independent check of the RAS→LPS conversion: MRML writes the node, SimpleITK reads it."""
    sitk = pytest.importorskip("SimpleITK")
    ct = make_ct(DIRECTIONS[kind])
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "CT")
    ras_dirs = np.diag([-1.0, -1.0, 1.0]) @ ct.direction
    m = vtk.vtkMatrix4x4()
    for r in range(3):
        for c in range(3):
            m.SetElement(r, c, ras_dirs[r, c])
    node.SetIJKToRASDirectionMatrix(m)
    node.SetSpacing(*ct.spacing)
    node.SetOrigin(-ct.origin[0], -ct.origin[1], ct.origin[2])
    image = vtk.vtkImageData()
    image.SetDimensions(SHAPE[2], SHAPE[1], SHAPE[0])
    from vtk.util import numpy_support

    image.GetPointData().SetScalars(numpy_support.numpy_to_vtk(ct.array.ravel(), deep=True, array_type=vtk.VTK_SHORT))
    node.SetAndObserveImageData(image)
    storage = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    path = tmp_path / "ct.nrrd"
    storage.SetFileName(str(path))
    assert storage.WriteData(node)
    reference = sitk.ReadImage(str(path))
    got = geometry.ct_from_volume_node(node)
    np.testing.assert_array_equal(got.array, sitk.GetArrayFromImage(reference))
    np.testing.assert_allclose(got.spacing, reference.GetSpacing(), atol=1e-6)
    np.testing.assert_allclose(got.origin, reference.GetOrigin(), atol=1e-6)
    np.testing.assert_allclose(got.direction, np.array(reference.GetDirection()).reshape(3, 3), atol=1e-6)


def test_linear_parent_transform_is_honoured(scene):
    ct = make_ct(np.eye(3))
    node = geometry.volume_node_from_ct(scene, ct, "CT")
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    shift = vtk.vtkMatrix4x4()
    shift.SetElement(0, 3, 10.0)  # 10 mm towards patient right (RAS +x)
    transform.SetMatrixTransformToParent(shift)
    node.SetAndObserveTransformNodeID(transform.GetID())
    moved = geometry.ct_from_volume_node(node)
    np.testing.assert_allclose(moved.origin, np.array(ct.origin) + [-10.0, 0.0, 0.0])


# --------------------------------------------------------------------------- segmentation
@pytest.mark.parametrize("kind", sorted(DIRECTIONS))
def test_segmentation_matches_input_geometry(scene, kind):
    ct = make_ct(DIRECTIONS[kind])
    masks = make_masks(ct)
    volume = geometry.volume_node_from_ct(scene, ct, "CT")
    nodes = scene_writer.write_result_to_scene(scene, make_result(ct, masks), volume)
    seg_node = nodes.segmentation
    # Reference geometry is the input's grid.
    assert seg_node.GetNodeReferenceID(slicer.vtkMRMLSegmentationNode.GetReferenceImageGeometryReferenceRole()) == volume.GetID()
    # Each segment's labelmap lives in the input's IJK→RAS frame.
    labelmap = slicer.vtkOrientedImageData()
    seg_node.GetBinaryLabelmapRepresentation("lesion", labelmap)
    m = vtk.vtkMatrix4x4()
    labelmap.GetImageToWorldMatrix(m)
    np.testing.assert_allclose([[m.GetElement(r, c) for c in range(4)] for r in range(4)], _ijk_to_ras(volume), atol=1e-9)
    # A lesion voxel's RAS position falls inside the lesion labelmap at the same world point.
    k, j, i = np.argwhere(masks["lesion"])[0]
    ras = _ijk_to_ras(volume) @ np.array([i, j, k, 1.0])
    world_to_image = vtk.vtkMatrix4x4()
    labelmap.GetWorldToImageMatrix(world_to_image)
    ijk = np.rint([sum(world_to_image.GetElement(r, c) * ras[c] for c in range(4)) for r in range(3)]).astype(int)
    assert labelmap.GetScalarComponentAsDouble(*ijk, 0) == 1
    # Masks come back identical, and the right lung is on the patient's right (RAS x larger).
    back = segmentation.masks_from_segmentation_node(seg_node, volume)
    for name, mask in masks.items():
        np.testing.assert_array_equal(back[name], mask, err_msg=name)
    ras_x = lambda mask: np.mean((_ijk_to_ras(volume) @ np.c_[np.argwhere(mask)[:, ::-1], np.ones(mask.sum())].T)[0])  # noqa: E731
    assert ras_x(back["right_lung"]) > ras_x(back["left_lung"])


def test_segments_ids_names_colours_terminology(scene):
    ct = make_ct(np.eye(3))
    volume = geometry.volume_node_from_ct(scene, ct, "CT")
    seg_node = scene_writer.write_result_to_scene(scene, make_result(ct, make_masks(ct)), volume).segmentation
    segmentation = seg_node.GetSegmentation()
    ids = [segmentation.GetNthSegmentID(i) for i in range(segmentation.GetNumberOfSegments())]
    assert ids == ["right_lung", "left_lung", "lesion", "ggo", "consolidation"]
    terminologies = slicer.vtkSlicerTerminologiesModuleLogic()
    assert terminologies.LoadTerminologyFromFile(str(TERMINOLOGY_FILE)) == COVIDCTDX_CONTEXT
    for segment_id in ids:
        spec = SEGMENTS[segment_id]
        segment = segmentation.GetSegment(segment_id)
        assert segment.GetName() == spec.name
        np.testing.assert_allclose(segment.GetColor(), spec.color_float, atol=1e-6)
        entry_text = segment.GetTerminology()
        assert entry_text == spec.terminology_entry()
        entry = slicer.vtkSlicerTerminologyEntry()
        assert terminologies.DeserializeTerminologyEntry(entry_text, entry)
        assert entry.GetTypeObject().GetCodeValue() == spec.type.value
        if spec.context == COVIDCTDX_CONTEXT:  # our own entries must exist in the shipped file
            found = slicer.vtkSlicerTerminologyType()
            category = slicer.vtkSlicerTerminologyCategory()
            n = terminologies.GetNumberOfCategoriesInTerminology(COVIDCTDX_CONTEXT)
            codes = set()
            for c in range(n):
                terminologies.GetNthCategoryInTerminology(COVIDCTDX_CONTEXT, c, category)
                for t in range(terminologies.GetNumberOfTypesInTerminologyCategory(COVIDCTDX_CONTEXT, category)):
                    terminologies.GetNthTypeInTerminologyCategory(COVIDCTDX_CONTEXT, category, t, found)
                    codes.add((category.GetCodeValue(), found.GetCodeValue()))
            assert (spec.category.value, spec.type.value) in codes
    # Lungs are see-through in 3D so lesions show; every non-empty segment has a surface.
    display = seg_node.GetDisplayNode()
    assert display.GetSegmentOpacity3D("right_lung") < 0.5
    for segment_id in ("right_lung", "left_lung", "lesion"):
        surface = vtk.vtkPolyData()
        assert seg_node.GetClosedSurfaceRepresentation(segment_id, surface)
        assert surface.GetNumberOfPoints() > 0


def test_segmentation_records_which_lung_engine_and_weights_drew_the_lungs(scene):
    ct = make_ct(DIRECTIONS["oblique"])
    masks = make_masks(ct)
    volume = geometry.volume_node_from_ct(scene, ct, "CT")
    classical = scene_writer.write_result_to_scene(scene, make_result(ct, masks), volume, closed_surface=False).segmentation
    assert classical.GetAttribute(segmentation.ATTRIBUTE_PREFIX + "lungs.method") == "classical"
    assert classical.GetAttribute(segmentation.ATTRIBUTE_PREFIX + "lungs.weights_sha256") is None
    weights = {"model": "UNet2D lung model", "weights_file": "r231.safetensors", "weights_sha256": "cd" * 32,
               "training_data": "user-supplied; not validated by CovidCTDx"}
    result = make_result(ct, masks)
    result.lungs.method, result.lungs.model_provenance = "model:TorchLungModel", weights
    neural = scene_writer.write_result_to_scene(scene, result, volume, closed_surface=False).segmentation
    assert neural.GetAttribute(segmentation.ATTRIBUTE_PREFIX + "lungs.method") == "model:TorchLungModel"
    assert neural.GetAttribute(segmentation.ATTRIBUTE_PREFIX + "lungs.weights_sha256") == "cd" * 32
    assert neural.GetAttribute(segmentation.ATTRIBUTE_PREFIX + "lungs.weights_file") == "r231.safetensors"


def test_seg_nrrd_written_by_mrml_reads_back(scene, tmp_path):
    from CovidCTDxLib.io.segmentation_file import read_segmentation

    ct = make_ct(DIRECTIONS["oblique"])
    masks = make_masks(ct)
    volume = geometry.volume_node_from_ct(scene, ct, "CT")
    seg_node = scene_writer.write_result_to_scene(scene, make_result(ct, masks), volume, closed_surface=False).segmentation
    path = tmp_path / "edited.seg.nrrd"
    storage = scene.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
    storage.SetFileName(str(path))
    assert storage.WriteData(seg_node)
    reread = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    reader = scene.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
    reader.SetFileName(str(path))
    assert reader.ReadData(reread)
    back = segmentation.masks_from_segmentation_node(reread, volume)
    assert reread.GetSegmentation().GetSegment("lesion").GetTerminology() == SEGMENTS["lesion"].terminology_entry()
    # The CLI's reader (covidctdx findings) understands the file Slicer saves.
    cli = read_segmentation(path, ct)
    for name, mask in masks.items():
        np.testing.assert_array_equal(back[name], mask, err_msg=name)
        np.testing.assert_array_equal(cli.masks[name], mask, err_msg=name)


def test_masks_are_resampled_onto_a_differently_indexed_reference(scene):
    """Same physical voxels, i axis reversed: exercises the resampling path, not the fast paste."""
    ct = make_ct(np.eye(3))
    masks = make_masks(ct)
    volume = geometry.volume_node_from_ct(scene, ct, "CT")
    seg_node = scene_writer.write_result_to_scene(scene, make_result(ct, masks), volume, closed_surface=False).segmentation
    nx = ct.shape[2]
    origin = np.array(ct.origin) + np.array([(nx - 1) * ct.spacing[0], 0.0, 0.0])
    mirrored = CTVolume(ct.array[:, :, ::-1].copy(), ct.spacing, tuple(origin), np.diag([-1.0, 1.0, 1.0]))
    reference = geometry.volume_node_from_ct(scene, mirrored, "CT mirrored index")
    back = segmentation.masks_from_segmentation_node(seg_node, reference)
    for name, mask in masks.items():
        np.testing.assert_array_equal(back[name], mask[:, :, ::-1], err_msg=name)


# --------------------------------------------------------------------------- tables, evidence, hierarchy
def test_tables_columns_units_and_provenance(scene):
    ct = make_ct(np.eye(3))
    volume = geometry.volume_node_from_ct(scene, ct, "CT")
    result = make_result(ct, make_masks(ct))
    nodes = scene_writer.write_result_to_scene(scene, result, volume, closed_surface=False)

    table = nodes.classification_table
    assert [table.GetColumnName(i) for i in range(table.GetNumberOfColumns())] == ["class", "key", "probability", "predicted"]
    keys = [table.GetCellText(r, 1) for r in range(table.GetNumberOfRows())]
    assert keys == list(CLASS_KEYS)
    probabilities = [float(table.GetCellText(r, 2)) for r in range(3)]
    assert probabilities == pytest.approx([0.7, 0.2, 0.1])
    assert [table.GetCellText(r, 3) for r in range(3)] == ["yes", "", ""]
    assert NOT_FOR_DIAGNOSIS in table.GetName() and NOT_FOR_DIAGNOSIS in table.GetDescription()
    assert table.GetAttribute("CovidCTDx.weights.weights_sha256") == PROVENANCE.weights_sha256
    assert table.GetAttribute("CovidCTDx.weights.training_data") == "synthetic phantoms"

    severity = nodes.severity_table
    assert [severity.GetColumnName(i) for i in range(severity.GetNumberOfColumns())] == [
        "severity", "probability", "predicted", "nearest_anchor_distance"]
    assert [severity.GetCellText(r, 0) for r in range(4)] == list(SEVERITY_KEYS)
    assert float(severity.GetCellText(1, 3)) == pytest.approx(0.8)  # min over the two 'moderate' anchors
    assert np.isnan(float(severity.GetCellText(2, 3)))  # no 'severe' anchor
    assert severity.GetAttribute("CovidCTDx.out_of_distribution") == "true"
    assert "OUT OF DISTRIBUTION" in severity.GetName()
    assert len(json.loads(severity.GetAttribute("CovidCTDx.anchors"))) == 3

    findings = nodes.findings_table
    assert [findings.GetColumnName(i) for i in range(4)] == ["name", "value", "unit", "definition"]
    assert findings.GetCellText(0, 0) == "lesion_volume_ml" and findings.GetCellText(0, 2) == "mL"
    assert float(findings.GetCellText(0, 1)) == pytest.approx(1.25)
    assert findings.GetColumnDescription("definition")
    assert tables.findings_from_table(findings)["lesion_count"] == 1


def test_evidence_volume_on_input_grid_with_colour_map(scene):
    ct = make_ct(DIRECTIONS["flipped"])
    volume = geometry.volume_node_from_ct(scene, ct, "CT")
    result = make_result(ct, make_masks(ct))
    evidence = scene_writer.write_result_to_scene(scene, result, volume, closed_surface=False).evidence_volume
    np.testing.assert_allclose(_ijk_to_ras(evidence), _ijk_to_ras(volume))
    np.testing.assert_array_equal(geometry.ct_from_volume_node(evidence).array, result.evidence)
    display = evidence.GetDisplayNode()
    assert display.GetColorNode() is not None
    assert display.GetApplyThreshold() and display.GetLowerThreshold() == pytest.approx(scene_writer.EVIDENCE_DISPLAY_THRESHOLD)


def test_outputs_are_placed_under_the_input_study(scene):
    ct = make_ct(np.eye(3))
    volume = geometry.volume_node_from_ct(scene, ct, "CT")
    sh = scene.GetSubjectHierarchyNode()
    patient = sh.CreateSubjectItem(sh.GetSceneItemID(), "Patient")
    study = sh.CreateStudyItem(patient, "Chest CT study")
    sh.CreateItem(study, volume)
    nodes = scene_writer.write_result_to_scene(scene, make_result(ct, make_masks(ct)), volume, closed_surface=False)
    for node in nodes.nodes():
        assert sh.GetItemParent(sh.GetItemByDataNode(node)) == study, node.GetName()


def test_absent_stages_create_no_nodes(scene):
    ct = make_ct(np.eye(3))
    volume = geometry.volume_node_from_ct(scene, ct, "CT")
    masks = make_masks(ct)
    result = make_result(ct, masks, lesions=None, classification=None, severity=None, findings=None, evidence=None)
    nodes = scene_writer.write_result_to_scene(scene, result, volume, closed_surface=False)
    assert nodes.nodes() == [nodes.segmentation]
    segmentation = nodes.segmentation.GetSegmentation()
    assert [segmentation.GetNthSegmentID(i) for i in range(segmentation.GetNumberOfSegments())] == ["right_lung", "left_lung"]


# --------------------------------------------------------------------------- failures leave the scene alone
class ExplodingFindings(TableFindings):
    def rows(self):
        raise RuntimeError("findings failed mid-way")


@pytest.mark.parametrize(
    "failure",
    ["mask_wrong_shape", "findings_raise", "evidence_wrong_shape"],
)
def test_failure_mid_run_leaves_scene_unchanged(scene, failure):
    ct = make_ct(DIRECTIONS["oblique"])
    volume = geometry.volume_node_from_ct(scene, ct, "CT")
    masks = make_masks(ct)
    if failure == "mask_wrong_shape":  # lungs are already written when the ggo fails
        result = make_result(ct, masks, lesions=LesionMasks(masks["lesion"], ggo=np.zeros((3, 3, 3), bool)))
        expected = GeometryError
    elif failure == "findings_raise":  # segmentation + two tables exist by then
        result = make_result(ct, masks, findings=ExplodingFindings([]))
        expected = RuntimeError
    else:  # the very last output fails
        result = make_result(ct, masks, evidence=np.zeros((2, 2, 2), np.float32))
        expected = GeometryError
    before = _node_ids(scene)
    sh = scene.GetSubjectHierarchyNode()
    items_before = sh.GetNumberOfItems()
    with pytest.raises(expected):
        scene_writer.write_result_to_scene(scene, result, volume)
    assert _node_ids(scene) == before
    assert sh.GetNumberOfItems() == items_before


# --------------------------------------------------------------------------- edit → recompute
def _erase_half_of_lesion(seg_node, volume) -> np.ndarray:
    """What a Segment Editor 'Erase' does: replace the segment's labelmap through the API."""
    masks = segmentation.masks_from_segmentation_node(seg_node, volume)
    lesion = masks["lesion"].copy()
    zz = np.nonzero(lesion)[0]
    lesion[zz.min() + (zz.max() - zz.min() + 1) // 2 :] = False
    edited = slicer.vtkOrientedImageData()
    edited.ShallowCopy(geometry.image_data(lesion.astype(np.uint8)))
    edited.SetImageToWorldMatrix(geometry.numpy_to_matrix(geometry.ijk_to_ras(volume)))
    assert slicer.vtkSlicerSegmentationsModuleLogic.SetBinaryLabelmapToSegment(
        edited, seg_node, "lesion", slicer.vtkSlicerSegmentationsModuleLogic.MODE_REPLACE)
    return lesion


def test_edit_then_masks_follow(scene):
    ct = make_ct(DIRECTIONS["oblique"])
    masks = make_masks(ct)
    volume = geometry.volume_node_from_ct(scene, ct, "CT")
    seg_node = scene_writer.write_result_to_scene(scene, make_result(ct, masks), volume).segmentation
    lesion = _erase_half_of_lesion(seg_node, volume)
    assert lesion.sum() == masks["lesion"].sum() // 2
    back = segmentation.masks_from_segmentation_node(seg_node, volume)
    np.testing.assert_array_equal(back["lesion"], lesion)
    np.testing.assert_array_equal(back["right_lung"], masks["right_lung"])  # other segments untouched


def test_edit_then_recompute_halves_lesion_volume(scene):
    ct = make_ct(np.eye(3))
    masks = make_masks(ct)
    volume = geometry.volume_node_from_ct(scene, ct, "CT")
    seg_node = scene_writer.write_result_to_scene(scene, make_result(ct, masks, findings=None), volume).segmentation
    table = scene_writer.recompute_findings(scene, seg_node, volume)
    before = tables.findings_from_table(table)["lesion_volume_ml"]
    assert before == pytest.approx(masks["lesion"].sum() * ct.voxel_volume_ml, abs=1e-3)  # findings round to µL
    _erase_half_of_lesion(seg_node, volume)
    same_table = scene_writer.recompute_findings(scene, seg_node, volume, table)
    assert same_table is table
    after = tables.findings_from_table(table)["lesion_volume_ml"]
    assert after == pytest.approx(before / 2, abs=1e-3)
    names = [table.GetCellText(r, 0) for r in range(table.GetNumberOfRows())]
    row = names.index("lesion_volume_ml")
    assert float(table.GetCellText(row, 1)) == pytest.approx(after)
    assert table.GetCellText(row, 2) == "mL"


def test_recompute_without_lesion_segment_is_refused_and_changes_nothing(scene):
    ct = make_ct(np.eye(3))
    volume = geometry.volume_node_from_ct(scene, ct, "CT")
    result = make_result(ct, make_masks(ct), lesions=None, findings=None)
    seg_node = scene_writer.write_result_to_scene(scene, result, volume, closed_surface=False).segmentation
    before = _node_ids(scene)
    with pytest.raises(InputError, match="lesion"):
        scene_writer.recompute_findings(scene, seg_node, volume)
    assert _node_ids(scene) == before


# --------------------------------------------------------------------------- background worker
@pytest.fixture(scope="module")
def small_phantom():
    from CovidCTDxLib.synthetic.phantom import make_phantom

    return make_phantom("covid", severity="moderate", shape=(40, 112, 112), spacing=(3.0, 3.0, 6.5), seed=1)


def test_worker_runs_out_of_process_and_result_lands_in_scene(scene, small_phantom):
    from CovidCTDxLib.app.worker import SUCCEEDED, WorkerJob
    from CovidCTDxLib.pipeline import PipelineOptions

    volume = geometry.volume_node_from_ct(scene, small_phantom.ct, "Phantom")
    ct = geometry.ct_from_volume_node(volume)
    job = WorkerJob(ct, PipelineOptions(stages=("lungs", "findings"))).start()
    try:
        assert job.wait(timeout=240) == SUCCEEDED, job.error
        assert job.fraction == pytest.approx(1.0)
        result = job.result()
        nodes = scene_writer.write_result_to_scene(scene, result, volume, closed_surface=False)
    finally:
        job.cleanup()
    # Findings travel through findings.csv/results.json into the table, units included.
    table = nodes.findings_table
    rows = {table.GetCellText(r, 0): (table.GetCellText(r, 1), table.GetCellText(r, 2)) for r in range(table.GetNumberOfRows())}
    assert rows["lesion_volume_ml"][1] == "mL"
    assert float(rows["lesion_volume_ml"][0]) == pytest.approx(result.findings.to_dict()["lesion_volume_ml"])
    # ...and recomputing from the segmentation in the scene gives the same lesion volume.
    recomputed = tables.findings_from_table(scene_writer.recompute_findings(scene, nodes.segmentation, volume))
    assert recomputed["lesion_volume_ml"] == pytest.approx(result.findings.to_dict()["lesion_volume_ml"], rel=0.02)
    masks = segmentation.masks_from_segmentation_node(nodes.segmentation, volume)
    # The worker's lungs overlap the phantom's true lungs, on the right side each.
    for side, truth in (("right_lung", small_phantom.right_lung), ("left_lung", small_phantom.left_lung)):
        dice = 2 * np.sum(masks[side] & truth) / (masks[side].sum() + truth.sum())
        assert dice > 0.8, (side, dice)
    assert nodes.classification_table is None  # stage not selected: no invented output


def test_worker_cancel_kills_process_and_leaves_scene_unchanged(scene, small_phantom):
    from CovidCTDxLib.app.worker import CANCELLED, WorkerJob
    from CovidCTDxLib.pipeline import PipelineOptions

    volume = geometry.volume_node_from_ct(scene, small_phantom.ct, "Phantom")
    before = _node_ids(scene)
    job = WorkerJob(geometry.ct_from_volume_node(volume), PipelineOptions(stages=("lungs",))).start()
    try:
        job.cancel()
        assert job.wait(timeout=30) == CANCELLED
        assert job._proc.poll() is not None
        assert not (job.output_dir / "results.json").exists()
        with pytest.raises(CovidCTDxError):
            job.result()
    finally:
        job.cleanup()
    assert _node_ids(scene) == before
    assert not job.work_dir.exists()


def test_worker_reports_user_errors(tmp_path):
    from CovidCTDxLib.app.worker import FAILED, WorkerJob
    from CovidCTDxLib.pipeline import PipelineOptions

    # Uniform soft tissue: a valid volume file, but no air → not a chest CT in HU.
    ct = CTVolume(np.zeros((20, 64, 64), np.int16), (3.0, 3.0, 5.0))
    job = WorkerJob(ct, PipelineOptions(stages=("lungs",)), work_dir=tmp_path / "job").start()
    assert job.wait(timeout=120) == FAILED
    assert job.error_type == "NotCTError", job.error
    assert "HU" in job.error or "air" in job.error


def test_headless_batch_over_a_folder(tmp_path, small_phantom):
    """Logic.processFolder's engine: every CT in a folder → one output folder; bad cases reported."""
    from CovidCTDxLib.app.worker import process_folder
    from CovidCTDxLib.io.segmentation_file import write_volume
    from CovidCTDxLib.pipeline import PipelineOptions

    cases = tmp_path / "cases"
    cases.mkdir()
    write_volume(small_phantom.ct, cases / "phantom.nrrd")
    write_volume(CTVolume(np.zeros((20, 64, 64), np.int16), (3.0, 3.0, 5.0)), cases / "not_a_chest.nii.gz")
    messages = []
    status = process_folder(cases, tmp_path / "out", PipelineOptions(stages=("lungs",)), lambda f, m: messages.append((f, m)))
    assert status["phantom"] == "ok"
    assert "not_a_chest" in status and status["not_a_chest"] != "ok"
    assert (tmp_path / "out" / "phantom" / "results.json").exists()
    assert not (tmp_path / "out" / "not_a_chest" / "results.json").exists()
    assert messages[-1][0] == 1.0


# --------------------------------------------------------------------------- panel texts
def test_panel_summary_shows_the_rule_based_reading_after_an_edit(scene):
    """The reading the pipeline computes reaches the panel, and follows a recompute."""
    ct = make_ct(np.eye(3))
    masks = make_masks(ct)
    volume = geometry.volume_node_from_ct(scene, ct, "CT")
    nodes = scene_writer.write_result_to_scene(scene, make_result(ct, masks, findings=None), volume)
    assert panel_text.summary_texts(nodes.classification_table, nodes.severity_table, None)["reading"] == "–"
    table = scene_writer.recompute_findings(scene, nodes.segmentation, volume)
    reading = tables.reading_from_table(table)
    assert "CAP-like: one lung only" in reading["reasons"]  # the lesion lies in the right lung only
    assert reading["label"] in tables.READING_NAMES
    text = panel_text.summary_texts(nodes.classification_table, nodes.severity_table, table)
    assert text["reading"].startswith(tables.READING_NAMES[reading["label"]])
    assert "one lung only" in text["reading"]
    assert text["classification"].startswith("COVID-19")
    assert "lesions 1" in text["metrics"]


def test_out_of_distribution_and_not_applicable_lead_the_tables_and_the_panel(scene):
    """An OOD classification reads "not assessable" before its class in the table and the
    panel; a severity of a scan RACNet does not call COVID-19 shows no grade at all."""
    ct = make_ct(np.eye(3))
    volume = geometry.volume_node_from_ct(scene, ct, "CT")
    classification = Classification("covid19", {"covid19": 0.87, "cap": 0.1, "non_pneumonia": 0.03}, PROVENANCE,
                                    out_of_distribution=True, ood_distance=41.5, ood_threshold=12.25)
    severity = Severity(SEVERITY_NOT_APPLICABLE, {"mild": 0.1, "moderate": 0.2, "severe": 0.3, "critical": 0.4}, 0.12,
                        [{"class": "non_covid", "index": 0, "distance": 0.5}], False, PROVENANCE, slices_used=16)
    result = make_result(ct, make_masks(ct), classification=classification, severity=severity)
    nodes = scene_writer.write_result_to_scene(scene, result, volume, closed_surface=False)

    table = nodes.classification_table
    assert NOT_ASSESSABLE.upper() in table.GetName()
    assert table.GetDescription().startswith(NOT_ASSESSABLE)
    assert [table.GetCellText(r, 3) for r in range(3)] == ["not assessable", "", ""]
    assert table.GetAttribute("CovidCTDx.out_of_distribution") == "true"
    assert float(table.GetAttribute("CovidCTDx.ood_distance")) == pytest.approx(41.5)

    sev = nodes.severity_table
    assert [sev.GetCellText(r, 2) for r in range(4)] == ["", "", "", ""]  # no grade is marked
    assert sev.GetDescription().startswith("not applicable (RACNet COVID-19 probability 12.0% < 50.0%)")

    text = panel_text.summary_texts(nodes.classification_table, nodes.severity_table, nodes.findings_table)
    assert text["classification"].startswith(NOT_ASSESSABLE)
    assert text["classification"].index(NOT_ASSESSABLE) < text["classification"].index("COVID-19")
    assert "12.2" in text["classification"] and "41.5" in text["classification"]
    assert text["severity"].startswith("not applicable")
    assert not any(grade in text["severity"] for grade in SEVERITY_KEYS)


def test_model_cards_are_read_without_torch_and_escaped(tmp_path):
    (tmp_path / "deepsc_x.safetensors").write_bytes(b"\0" * 8)
    (tmp_path / "deepsc_x.json").write_text('{"architecture": "deepsc", "training_data": "<phantoms>", "synthetic": true}')
    (tmp_path / "racnet_y.safetensors").write_bytes(b"\0" * 8)
    (tmp_path / "racnet_y.json").write_text("{not json")
    code = (
        "import sys, json; from CovidCTDxLib.weights import read_model_cards; "
        f"cards = read_model_cards({str(tmp_path)!r}); assert 'torch' not in sys.modules; print(json.dumps(cards))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    cards = json.loads(out)
    assert [c["file"] for c in cards] == ["deepsc_x.safetensors", "racnet_y.safetensors"]
    assert cards[0]["synthetic"] is True and cards[1]["synthetic"] is None  # unreadable card claims nothing
    html = panel_text.model_cards_html(cards)
    assert "&lt;phantoms&gt;" in html and "<phantoms>" not in html
