"""IJK/LPS/RAS geometry between CTVolume and MRML volume nodes: the only place that converts.

MRML volume nodes store an IJK->RAS matrix; ``CTVolume`` is LPS (like SimpleITK and DICOM):
LPS = diag(-1, -1, 1) . RAS. The full matrix (direction and spacing) is honoured, so flipped
and oblique volumes map to the same physical voxels both ways. ``slicer`` and ``vtk`` are
imported lazily so that importing CovidCTDxLib never needs Slicer.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from ..errors import GeometryError, InputError
from ..volume import CTVolume

#: LPS ↔ RAS: negate x and y. Its own inverse.
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


# --------------------------------------------------------------------------- imports
def import_slicer():
    """Import ``slicer`` lazily so that importing CovidCTDxLib never needs Slicer."""
    import slicer  # noqa: WPS433 - optional dependency

    return slicer


def import_vtk():
    import vtk
    from vtk.util import numpy_support

    return vtk, numpy_support


# --------------------------------------------------------------------------- geometry
def matrix_to_numpy(vtk_matrix) -> np.ndarray:
    return np.array([[vtk_matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def numpy_to_matrix(array: np.ndarray):
    vtk, _ = import_vtk()
    m = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            m.SetElement(r, c, float(array[r, c]))
    return m


def ijk_to_ras(volume_node) -> np.ndarray:
    """The 4x4 IJK→RAS matrix of a volume node, including a linear parent transform.

    A non-linear parent transform cannot be expressed on a voxel grid and is refused.
    """
    vtk, _ = import_vtk()
    m = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(m)
    matrix = matrix_to_numpy(m)
    transform = volume_node.GetParentTransformNode()
    if transform is not None:
        if not transform.IsTransformToWorldLinear():
            raise GeometryError(
                f"Volume '{volume_node.GetName()}' is under a non-linear transform. Harden the transform "
                "(Data module → right-click → Harden transform) before running CovidCTDx."
            )
        to_world = vtk.vtkMatrix4x4()
        transform.GetMatrixTransformToWorld(to_world)
        matrix = matrix_to_numpy(to_world) @ matrix
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
    _, numpy_support = import_vtk()
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


def image_data(array: np.ndarray, extent: Optional[Sequence[int]] = None):
    """A vtkImageData holding a deep copy of a (z, y, x) array.

    ``extent`` (i0, i1, j0, j1, k0, k1) places a sub-block inside a larger grid; VTK keeps
    the copy, so the numpy array may be freed afterwards.
    """
    vtk, numpy_support = import_vtk()
    array = np.ascontiguousarray(array)
    image = vtk.vtkImageData()
    if extent is None:
        image.SetDimensions(array.shape[2], array.shape[1], array.shape[0])
    else:
        image.SetExtent(*extent)
    vtk_array = numpy_support.numpy_to_vtk(array.ravel(), deep=True, array_type=numpy_support.get_vtk_array_type(array.dtype))
    image.GetPointData().SetScalars(vtk_array)
    return image


def new_volume_node(scene, name: str, array: np.ndarray, ijk_to_ras_matrix: np.ndarray, node_class: str = "vtkMRMLScalarVolumeNode"):
    node = scene.AddNewNodeByClass(node_class, name)
    node.SetIJKToRASMatrix(numpy_to_matrix(ijk_to_ras_matrix))
    node.SetAndObserveImageData(image_data(array))
    node.CreateDefaultDisplayNodes()
    return node


def volume_node_from_ct(scene, ct: CTVolume, name: str, node_class: str = "vtkMRMLScalarVolumeNode"):
    """Add a volume node holding the CT's voxels on its grid (LPS → RAS here, once)."""
    return new_volume_node(scene, name, ct.array, ras_matrix_for(ct), node_class)
