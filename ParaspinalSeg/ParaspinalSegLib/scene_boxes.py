"""The ROI box writer: one locked markups ROI per structure on the segmented slice, coloured like its segment,
all of a volume's boxes in one subject-hierarchy folder. Conventions: :mod:`scene_nodes`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from . import anatomy
from .errors import SceneWriteError
from .geometry import pixel_box_to_ras, vtk_matrix_from_array
from .scene_nodes import (
    ROLE_ATTRIBUTE,
    STRUCTURE_ATTRIBUTE,
    SLICE_ATTRIBUTE,
    VOLUME_ID_ATTRIBUTE,
    VOLUME_REFERENCE_ROLE,
    ROLE_BOX,
    ROLE_BOX_FOLDER,
    remove_node,
    _subject_hierarchy,
    _sh_item,
    _volume_parent_item,
    volume_ijk_to_ras,
    validate_volume,
    _check_slice_index,
    _find_volume_outputs,
)


@dataclass(frozen=True)
class BoxGeometry:
    """A box on a volume slice in patient coordinates (RAS, mm)."""

    center_ras: tuple[float, float, float]
    #: Edge lengths along the box axes: I direction, J direction, slice normal (mm).
    size_mm: tuple[float, float, float]
    #: 3x3, columns = unit axis directions in RAS (right-handed).
    axes_ras: np.ndarray


def _box_pixel(box: Any) -> tuple[float, float, float, float]:
    pixel = box.get("pixel") if isinstance(box, Mapping) else getattr(box, "pixel", box)
    try:
        values = tuple(float(v) for v in pixel)
    except TypeError:
        raise SceneWriteError(f"a box needs pixel bounds (p0, q0, p1, q1), got {box!r}") from None
    if len(values) != 4:
        raise SceneWriteError(f"a box needs 4 pixel bounds (p0, q0, p1, q1), got {len(values)}")
    return values  # type: ignore[return-value]


def box_geometry(ijk_to_ras: np.ndarray, k: int, pixel: Sequence[float]) -> BoxGeometry:
    """Patient-space box for pixel bounds ``(p0, q0, p1, q1)`` on slice ``arr[k]`` (p along J, q along I).

    Pixel ``(p, q)`` covers ``[p, p+1) x [q, q+1)``, i.e. voxel centres sit at integer IJK and the box
    edges at half-voxel offsets. The box spans one slice thickness along the slice normal, so it shows
    on slice ``k`` only; its axes follow the volume's I and J axes (also for oblique volumes).
    """
    from .preprocessing import slice_geometry_from_volume

    m = np.asarray(ijk_to_ras, dtype=float)
    box = pixel_box_to_ras(pixel, slice_geometry_from_volume(m, k))
    # The ROI's axes in the volume's I, J order (its first size is along I), with the right-handed normal
    # I × J: the slice box's axes are (J, I, J × I).
    d_j, d_i, n = box.axes_ras.T
    axes = np.stack([d_i, d_j, -n], axis=1)
    center = box.center_ras
    size = (box.size_mm[1], box.size_mm[0], float(np.linalg.norm(m[:3, 2])))
    return BoxGeometry(tuple(float(c) for c in center), tuple(float(s) for s in size), axes)


def _box_folder(scene, volume_node, folder_name: Optional[str], create: bool) -> int:
    import vtk

    sh = _subject_hierarchy(scene)
    ids = vtk.vtkIdList()
    sh.GetItemChildren(sh.GetSceneItemID(), ids, True)
    children = [ids.GetId(i) for i in range(ids.GetNumberOfIds())]
    for item in children:
        if (
            sh.GetItemAttribute(item, ROLE_ATTRIBUTE) == ROLE_BOX_FOLDER
            and sh.GetItemAttribute(item, VOLUME_ID_ATTRIBUTE) == volume_node.GetID()
        ):
            return item
    if not create:
        return 0
    parent = _volume_parent_item(scene, volume_node)
    item = sh.CreateFolderItem(parent, folder_name or f"{volume_node.GetName()} ParaspinalSeg boxes")
    sh.SetItemAttribute(item, ROLE_ATTRIBUTE, ROLE_BOX_FOLDER)
    sh.SetItemAttribute(item, VOLUME_ID_ATTRIBUTE, volume_node.GetID())
    return item


def find_boxes(scene, volume_node) -> dict[str, Any]:
    """ParaspinalSeg's ROI box nodes of ``volume_node`` by structure key."""
    return {
        n.GetAttribute(STRUCTURE_ATTRIBUTE): n
        for n in _find_volume_outputs(scene, "vtkMRMLMarkupsROINode", ROLE_BOX, volume_node)
    }


def write_boxes(
    scene,
    volume_node,
    k: int,
    boxes: Mapping[int, Any],
    folder_name: Optional[str] = None,
    *,
    clear_others: bool = False,
) -> dict[int, Any]:
    """One locked markups ROI per structure on slice ``k``, coloured like its segment.

    ``boxes`` maps label value → box with ``pixel=(p0, q0, p1, q1)`` (attribute, mapping key, or the
    4 numbers themselves): float pixel bounds ``[p0, p1) x [q0, q1)`` on ``arr[k]`` (p along J, q
    along I). Each ROI replaces this volume's previous box of the same structure; with
    ``clear_others`` the volume's boxes of structures not in ``boxes`` are removed too. All boxes of a
    volume sit in one subject-hierarchy folder (``folder_name``, created next to the volume).
    Returns the new ROI nodes by label value.
    """
    num_k, num_j, num_i = validate_volume(volume_node)
    k = _check_slice_index(k, num_k)
    checked: dict[int, tuple[float, float, float, float]] = {}
    for value, box in boxes.items():
        if value not in anatomy.BY_VALUE:
            raise SceneWriteError(f"unknown structure value {value!r}; known: {sorted(anatomy.BY_VALUE)}")
        p0, q0, p1, q1 = _box_pixel(box)
        if not all(math.isfinite(v) for v in (p0, q0, p1, q1)):
            raise SceneWriteError(f"box of {anatomy.BY_VALUE[value].name} has non-finite bounds")
        eps = 1e-6
        if not (-eps <= p0 < p1 <= num_j + eps and -eps <= q0 < q1 <= num_i + eps):
            raise SceneWriteError(
                f"box of {anatomy.BY_VALUE[value].name} ({p0}, {q0}, {p1}, {q1}) is empty or outside the "
                f"slice ({num_j} x {num_i} pixels)"
            )
        checked[value] = (p0, q0, p1, q1)

    ijk_to_ras = volume_ijk_to_ras(volume_node)
    old = find_boxes(scene, volume_node)
    new_nodes: dict[int, Any] = {}
    folder_existed = bool(_box_folder(scene, volume_node, folder_name, create=False))
    folder = 0
    try:
        folder = _box_folder(scene, volume_node, folder_name, create=True)
        for value, pixel in checked.items():
            s = anatomy.BY_VALUE[value]
            geometry = box_geometry(ijk_to_ras, k, pixel)
            roi = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", f"{volume_node.GetName()} {s.name} box")
            new_nodes[value] = roi
            roi.CreateDefaultDisplayNodes()
            object_to_node = np.eye(4)
            object_to_node[:3, :3] = geometry.axes_ras
            object_to_node[:3, 3] = geometry.center_ras
            roi.SetAndObserveObjectToNodeMatrix(vtk_matrix_from_array(object_to_node))
            roi.SetSize(*geometry.size_mm)
            roi.SetAndObserveTransformNodeID(volume_node.GetTransformNodeID())
            display = roi.GetDisplayNode()
            display.SetSelectedColor(*s.color)
            display.SetColor(*s.color)
            # Nine long node names over the slice hide the anatomy, and a locked box needs no drag handles.
            display.SetPropertiesLabelVisibility(False)
            display.SetHandlesInteractive(False)
            roi.SetLocked(True)
            roi.SetAttribute(ROLE_ATTRIBUTE, ROLE_BOX)
            roi.SetAttribute(STRUCTURE_ATTRIBUTE, s.key)
            roi.SetAttribute(SLICE_ATTRIBUTE, str(k))
            roi.SetNodeReferenceID(VOLUME_REFERENCE_ROLE, volume_node.GetID())
            _subject_hierarchy(scene).SetItemParent(_sh_item(scene, roi, folder), folder)
    except Exception:
        for roi in new_nodes.values():
            remove_node(scene, roi)
        if folder and not folder_existed:
            _subject_hierarchy(scene).RemoveItem(folder, False, False)
        raise
    replaced = {anatomy.BY_VALUE[v].key for v in checked}
    for key, node in old.items():
        if key in replaced or clear_others:
            remove_node(scene, node)
    return new_nodes


def set_boxes_visible(scene, volume_node, visible: bool) -> int:
    """Show or hide all ParaspinalSeg boxes of ``volume_node`` at once; returns how many were changed."""
    nodes = list(find_boxes(scene, volume_node).values())
    for node in nodes:
        display = node.GetDisplayNode()
        if display is not None:
            display.SetVisibility(bool(visible))
    return len(nodes)
