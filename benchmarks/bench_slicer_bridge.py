"""Slicer bridge speed on a full-size chest CT (512×512×300), real MRML from slicer-core.

Budget (docs/ARCHITECTURE.md): metrics recompute after an edit ≤ 1 s. Reference for reading masks
back: Slicer's own way (``slicer.util.arrayFromSegmentBinaryLabelmap`` = export each
segment to a labelmap node with ``ExportSegmentsToLabelmapNode``), in the same run.

Run: python benchmarks/bench_slicer_bridge.py [--shape Z Y X]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import slicer
import vtk

from CovidCTDxLib.result import LesionMasks, LungMasks, Result
from CovidCTDxLib.slicer_bridge import geometry, scene_writer, segmentation
from CovidCTDxLib.synthetic.phantom import make_phantom


def timed(label, fn, rows):
    start = time.perf_counter()
    out = fn()
    rows.append((label, time.perf_counter() - start))
    return out


def slicer_way_masks(scene, seg_node, volume):
    """What slicer.util.arrayFromSegmentBinaryLabelmap does, for every segment."""
    from vtk.util import numpy_support

    masks = {}
    segmentation = seg_node.GetSegmentation()
    for i in range(segmentation.GetNumberOfSegments()):
        segment_id = segmentation.GetNthSegmentID(i)
        ids = vtk.vtkStringArray()
        ids.InsertNextValue(segment_id)
        labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode")
        slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(seg_node, ids, labelmap, volume)
        image = labelmap.GetImageData()
        masks[segment_id] = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(image.GetDimensions()[::-1]) > 0
        scene.RemoveNode(labelmap)
    return masks


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", type=int, nargs=3, default=(300, 512, 512))
    args = parser.parse_args()
    rows = []
    phantom = timed(
        "phantom (setup)",
        lambda: make_phantom("covid", severity="moderate", shape=tuple(args.shape), spacing=(0.7, 0.7, 1.0), seed=0),
        rows,
    )
    ct = phantom.ct
    empty = np.zeros(ct.shape, bool)
    ggo = phantom.lesion & (phantom.lesion_type == 1)
    result = Result(
        ct=ct,
        lungs=LungMasks(phantom.right_lung, phantom.left_lung, phantom.airways, empty),
        lesions=LesionMasks(phantom.lesion, ggo, phantom.lesion & (phantom.lesion_type == 3)),
    )
    scene = slicer.vtkMRMLScene()
    volume = timed("CTVolume → volume node", lambda: geometry.volume_node_from_ct(scene, ct, "CT"), rows)
    timed("volume node → CTVolume", lambda: geometry.ct_from_volume_node(volume), rows)
    timed("Result → scene (no 3D surfaces)", lambda: scene_writer.write_result_to_scene(scene, result, volume, closed_surface=False), rows)
    nodes = timed("Result → scene (with 3D surfaces)", lambda: scene_writer.write_result_to_scene(scene, result, volume), rows)
    ours = timed("segmentation → masks (bridge)", lambda: segmentation.masks_from_segmentation_node(nodes.segmentation, volume), rows)
    ref = timed("segmentation → masks (Slicer's export per segment)", lambda: slicer_way_masks(scene, nodes.segmentation, volume), rows)
    assert all(np.array_equal(ours[k], ref[k]) for k in ref)
    timed("edit → recompute findings table", lambda: scene_writer.recompute_findings(scene, nodes.segmentation, volume), rows)

    print(f"shape (z, y, x) = {tuple(args.shape)}")
    print(f"{'step':55s} {'seconds':>8s}")
    for label, seconds in rows:
        print(f"{label:55s} {seconds:8.2f}")
    t = dict(rows)
    print(
        "\nmask read-back: bridge / Slicer export = "
        f"{t['segmentation → masks (bridge)'] / t['segmentation → masks (Slicer' + chr(39) + 's export per segment)']:.2f}"
    )
    print(f"recompute after edit: {t['edit → recompute findings table']:.2f} s (budget 1.0 s)")


if __name__ == "__main__":
    main()
