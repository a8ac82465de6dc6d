"""What every scene writer shares: the roles and references that mark ParaspinalSeg's output nodes, node
lookup and removal, subject hierarchy placement, and the check of an input volume.

Conventions (all scene writers)
- A slice is ``arr[k]`` of the volume array in Slicer order ``arr[k, j, i]`` (axis 0 = J, axis 1 = I).
- Segment IDs are the anatomy keys (``anatomy.Structure.key``); names, colours and terminology come from
  :mod:`anatomy`. Output nodes carry the attribute ``ParaspinalSeg.Role`` and a node reference
  ``ParaspinalSegVolume`` to their input volume so they are found again (also after a ``.mrb`` reload).
- Every writer validates all of its input before it changes the scene, and undoes its own partial
  changes if MRML still fails half-way, so a failure never leaves a half-written node.
- MRML + VTK + numpy only (no ``qt``, no ``slicer.app``, no ``slicer.util`` helpers that need them), so the
  same code runs inside Slicer and on a headless ``slicer-core`` scene (command line, tests).
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np

from .errors import InputError, SceneWriteError
from .geometry import array_from_vtk_matrix
from .validation import check_slice_index


ROLE_ATTRIBUTE = "ParaspinalSeg.Role"
STRUCTURE_ATTRIBUTE = "ParaspinalSeg.Structure"
SLICE_ATTRIBUTE = "ParaspinalSeg.SliceIndex"
VOLUME_ID_ATTRIBUTE = "ParaspinalSeg.VolumeID"
#: Node reference role from every output node to the volume it was computed from.
VOLUME_REFERENCE_ROLE = "ParaspinalSegVolume"

ROLE_SEGMENTATION = "segmentation"
ROLE_BOX = "box"
ROLE_BOX_FOLDER = "boxes"
ROLE_MEASUREMENTS = "measurements"

DEFAULT_TABLE_NAME = "ParaspinalSeg measurements"

_BINARY_LABELMAP = "Binary labelmap"


# ----------------------------------------------------------------------------------------------
# Small MRML helpers



def remove_node(scene, node) -> None:
    """Remove a node with its display and storage nodes (``RemoveNode`` alone leaves them behind headless)."""
    if node is None or node.GetScene() is None:
        return
    helpers = []
    if hasattr(node, "GetNumberOfDisplayNodes"):
        helpers += [node.GetNthDisplayNode(i) for i in range(node.GetNumberOfDisplayNodes())]
    if hasattr(node, "GetStorageNode"):
        helpers.append(node.GetStorageNode())
    scene.RemoveNode(node)
    for helper in helpers:
        if helper is not None and helper.GetScene() is not None:
            scene.RemoveNode(helper)

def _slicer():
    import slicer

    return slicer


def _nodes_by_class(scene, class_name: str) -> list:
    collection = scene.GetNodesByClass(class_name)
    nodes = [collection.GetItemAsObject(i) for i in range(collection.GetNumberOfItems())]
    return [n for n in nodes if n is not None]


def _subject_hierarchy(scene):
    sh = _slicer().vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    if sh is None:
        raise SceneWriteError("the scene has no subject hierarchy node")
    return sh


def _sh_item(scene, node, parent_item: Optional[int] = None) -> int:
    """Subject hierarchy item of ``node``; created under ``parent_item`` when missing.

    Inside Slicer the subject hierarchy plugin logic creates items for new data nodes; headless nobody
    does, so ``GetItemByDataNode(n) or CreateItem(parent, n)`` is right in both worlds.
    """
    sh = _subject_hierarchy(scene)
    item = sh.GetItemByDataNode(node)
    if not item:
        item = sh.CreateItem(parent_item if parent_item else sh.GetSceneItemID(), node)
    return item


def _volume_parent_item(scene, volume_node) -> int:
    """Subject hierarchy parent (study, patient or folder) of the volume; the scene if it has none."""
    sh = _subject_hierarchy(scene)
    volume_item = _sh_item(scene, volume_node)
    parent = sh.GetItemParent(volume_item)
    return parent if parent else sh.GetSceneItemID()


def volume_ijk_to_ras(volume_node) -> np.ndarray:
    """The volume's 4x4 IJK-to-RAS matrix (local coordinates, parent transform not applied)."""
    import vtk

    m = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(m)
    return array_from_vtk_matrix(m)


def validate_volume(volume_node) -> tuple[int, int, int]:
    """Check that ``volume_node`` is a single-component 3-D scalar volume; return its array shape (K, J, I).

    Raises :class:`SceneWriteError` with a clear message otherwise (no volume, no image data, RGB or
    vector volume, empty image).
    """
    if volume_node is None:
        raise SceneWriteError("no input volume")
    if not hasattr(volume_node, "IsA") or not volume_node.IsA("vtkMRMLScalarVolumeNode"):
        name = volume_node.GetClassName() if hasattr(volume_node, "GetClassName") else type(volume_node).__name__
        raise SceneWriteError(f"input must be a scalar volume node, got {name}")
    image = volume_node.GetImageData()
    if image is None:
        raise SceneWriteError(f"volume '{volume_node.GetName()}' has no image data")
    components = image.GetNumberOfScalarComponents()
    if components != 1 or volume_node.IsA("vtkMRMLVectorVolumeNode"):
        raise SceneWriteError(
            f"volume '{volume_node.GetName()}' has {components} components per voxel (RGB/vector); "
            "a single-component (grayscale) MRI volume is needed"
        )
    i, j, k = image.GetDimensions()
    if min(i, j, k) < 1 or image.GetPointData().GetScalars() is None:
        raise SceneWriteError(f"volume '{volume_node.GetName()}' is empty")
    return k, j, i


def _check_slice_index(k: Any, num_slices: int) -> int:
    try:
        return check_slice_index(k, num_slices)
    except InputError as exc:  # a writer's refusal is a SceneWriteError
        raise SceneWriteError(str(exc)) from None


def _find_volume_outputs(scene, class_name: str, role: str, volume_node) -> list:
    return [
        n
        for n in _nodes_by_class(scene, class_name)
        if n.GetAttribute(ROLE_ATTRIBUTE) == role and n.GetNodeReference(VOLUME_REFERENCE_ROLE) is volume_node
    ]
