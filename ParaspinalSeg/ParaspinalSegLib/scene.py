"""Scene writers: the segmentation, ROI boxes and measurement table ParaspinalSeg puts into an MRML scene.

MRML + VTK + numpy only (no ``qt``, no ``slicer.app``, no ``slicer.util`` helpers that need them), so the
same code runs inside Slicer and on a headless ``slicer-core`` scene (command line, tests).

Conventions
- A slice is ``arr[k]`` of the volume array in Slicer order ``arr[k, j, i]`` (axis 0 = J, axis 1 = I).
- Segment IDs are the anatomy keys (``anatomy.Structure.key``); names, colours and terminology come from
  :mod:`anatomy`. Output nodes carry the attribute ``ParaspinalSeg.Role`` and a node reference
  ``ParaspinalSegVolume`` to their input volume so they are found again (also after a ``.mrb`` reload).
- Every writer validates all of its input before it changes the scene, and undoes its own partial
  changes if MRML still fails half-way, so a failure never leaves a half-written node.
- Segmentation and volume must share the same parent transform (the usual case); the slice geometry is
  then computed in their common local coordinates.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np

from . import anatomy
from .errors import InputError, SceneWriteError
from .geometry import array_from_vtk_matrix, pixel_box_to_ras, vtk_matrix_from_array
from .validation import check_slice_index
from .terminology import set_segment_terminology

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


# ----------------------------------------------------------------------------------------------
# Segmentation


def _check_segmentation(segmentation_node, volume_node) -> None:
    if segmentation_node is None or not segmentation_node.IsA("vtkMRMLSegmentationNode"):
        raise SceneWriteError("a segmentation node is needed")
    source = segmentation_node.GetSegmentation().GetSourceRepresentationName()
    if source != _BINARY_LABELMAP:
        raise SceneWriteError(
            f"segmentation '{segmentation_node.GetName()}' is stored as '{source}'; ParaspinalSeg writes "
            f"'{_BINARY_LABELMAP}' segmentations (choose another or a new output segmentation)"
        )
    if segmentation_node.GetTransformNodeID() != volume_node.GetTransformNodeID():
        raise SceneWriteError(
            f"segmentation '{segmentation_node.GetName()}' and volume '{volume_node.GetName()}' are under "
            "different transforms; put them under the same transform (or harden it) first"
        )
    # A segmentation made for another volume lives on that volume's grid: writing this volume's slices
    # into it would resample (and crop) the other volume's segments.
    owner = segmentation_node.GetNodeReference(VOLUME_REFERENCE_ROLE)
    if owner is not None and owner.GetID() != volume_node.GetID():
        raise SceneWriteError(
            f"segmentation '{segmentation_node.GetName()}' holds the results for volume '{owner.GetName()}', "
            f"not '{volume_node.GetName()}'; choose that volume, or a new output segmentation"
        )


def ensure_segments(segmentation_node) -> list[str]:
    """Add each of the nine segments that is missing (empty, with ID, name, colour, terminology).

    Existing segments are left as they are (the user may have renamed or recoloured them).
    Returns the IDs that were added.
    """
    segmentation = segmentation_node.GetSegmentation()
    added = []
    for s in anatomy.STRUCTURES:
        if segmentation.GetSegment(s.key) is not None:
            continue
        segmentation.AddEmptySegment(s.key, s.name, list(s.color))
        segment = segmentation.GetSegment(s.key)
        segment.SetName(s.name)
        segment.SetColor(*s.color)
        # Not auto-generated: Slicer must not replace them from the terminology or a colour table.
        segment.SetNameAutoGenerated(False)
        segment.SetColorAutoGenerated(False)
        set_segment_terminology(segment, s.terminology)  # Slicer 5.8 has no SetTerminology
        added.append(s.key)
    return added


def find_segmentation(scene, volume_node):
    """The ParaspinalSeg segmentation written for ``volume_node`` earlier, or None."""
    found = _find_volume_outputs(scene, "vtkMRMLSegmentationNode", ROLE_SEGMENTATION, volume_node)
    return found[0] if found else None


def get_or_create_segmentation(scene, volume_node, segmentation_node=None):
    """The segmentation node holding ParaspinalSeg's nine segments for ``volume_node``.

    With ``segmentation_node`` given, that node is used (the user chose it); otherwise the one
    ParaspinalSeg made earlier for this volume is reused, or a new one is created. The node's
    reference geometry is the volume, it sits next to the volume in the subject hierarchy (same study
    or folder), and the nine segments exist (missing ones are added empty).
    """
    validate_volume(volume_node)
    if segmentation_node is not None:
        _check_segmentation(segmentation_node, volume_node)
    else:
        segmentation_node = find_segmentation(scene, volume_node)
        if segmentation_node is not None:
            _check_segmentation(segmentation_node, volume_node)

    created = segmentation_node is None
    if created:
        segmentation_node = scene.AddNewNodeByClass(
            "vtkMRMLSegmentationNode", f"{volume_node.GetName()} ParaspinalSeg"
        )
    try:
        was_modifying = segmentation_node.StartModify()
        try:
            if created:
                segmentation_node.CreateDefaultDisplayNodes()
                segmentation_node.SetAndObserveTransformNodeID(volume_node.GetTransformNodeID())
            if created or segmentation_node.GetNodeReference(
                segmentation_node.GetReferenceImageGeometryReferenceRole()
            ) is None:
                segmentation_node.SetReferenceImageGeometryParameterFromVolumeNode(volume_node)
                segmentation_node.SetNodeReferenceID(
                    segmentation_node.GetReferenceImageGeometryReferenceRole(), volume_node.GetID()
                )
            segmentation_node.SetAttribute(ROLE_ATTRIBUTE, ROLE_SEGMENTATION)
            segmentation_node.SetNodeReferenceID(VOLUME_REFERENCE_ROLE, volume_node.GetID())
            ensure_segments(segmentation_node)
        finally:
            segmentation_node.EndModify(was_modifying)
        parent = _volume_parent_item(scene, volume_node)
        sh = _subject_hierarchy(scene)
        item = _sh_item(scene, segmentation_node, parent)
        if created and sh.GetItemParent(item) != parent:
            sh.SetItemParent(item, parent)
    except Exception:
        if created:
            remove_node(scene, segmentation_node)
        raise
    return segmentation_node


def _reference_geometry(volume_node, k: Optional[int] = None):
    """An (unallocated) oriented image with the volume's grid; only slice ``k`` when given."""
    import vtk

    slicer = _slicer()
    extent = list(volume_node.GetImageData().GetExtent())
    if k is not None:
        extent[4] = extent[5] = extent[4] + k
    geometry = slicer.vtkOrientedImageData()
    geometry.SetExtent(extent)
    m = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(m)
    geometry.SetGeometryFromImageToWorldMatrix(m)
    return geometry


def _segment_array(segmentation_node, segment_id: str, volume_node, k: Optional[int] = None) -> np.ndarray:
    """Binary mask (uint8 0/1) of one segment on the volume's grid: (K, J, I), or (J, I) for slice ``k``."""
    from vtk.util import numpy_support

    slicer = _slicer()
    reference = _reference_geometry(volume_node, k)
    e = reference.GetExtent()
    shape = (e[5] - e[4] + 1, e[3] - e[2] + 1, e[1] - e[0] + 1)
    out = np.zeros(shape, dtype=np.uint8)

    segment = segmentation_node.GetSegmentation().GetSegment(segment_id)
    if segment is None:
        return out[0] if k is not None else out
    # Segments may share one labelmap layer (Segment Editor does this); each is its label value there.
    label_value = segment.GetLabelValue()
    labelmap = slicer.vtkOrientedImageData()
    ok = slicer.vtkSlicerSegmentationsModuleLogic.GetSegmentBinaryLabelmapRepresentation(
        segmentation_node, segment_id, labelmap, False
    )
    le = labelmap.GetExtent()
    if ok and le[0] <= le[1] and le[2] <= le[3] and le[4] <= le[5] and labelmap.GetPointData().GetScalars():
        resampled = slicer.vtkOrientedImageData()
        if not slicer.vtkOrientedImageDataResample.ResampleOrientedImageToReferenceOrientedImage(
            labelmap, reference, resampled, False, False
        ):
            raise RuntimeError(f"could not resample segment '{segment_id}' onto volume '{volume_node.GetName()}'")
        re_ = resampled.GetExtent()
        scalars = resampled.GetPointData().GetScalars()
        if re_[0] <= re_[1] and re_[2] <= re_[3] and re_[4] <= re_[5] and scalars is not None:
            values = numpy_support.vtk_to_numpy(scalars).reshape(
                re_[5] - re_[4] + 1, re_[3] - re_[2] + 1, re_[1] - re_[0] + 1
            )
            # Paste the overlap of the resampled extent and the reference extent.
            lo = [max(re_[2 * a], e[2 * a]) for a in range(3)]
            hi = [min(re_[2 * a + 1], e[2 * a + 1]) for a in range(3)]
            if all(lo[a] <= hi[a] for a in range(3)):
                src = values[
                    lo[2] - re_[4]: hi[2] - re_[4] + 1,
                    lo[1] - re_[2]: hi[1] - re_[2] + 1,
                    lo[0] - re_[0]: hi[0] - re_[0] + 1,
                ]
                out[
                    lo[2] - e[4]: hi[2] - e[4] + 1,
                    lo[1] - e[2]: hi[1] - e[2] + 1,
                    lo[0] - e[0]: hi[0] - e[0] + 1,
                ] = src == label_value
    return out[0] if k is not None else out


def _slice_modifier(volume_node, k: int, mask: Optional[np.ndarray]):
    """Slice ``k`` of the volume's grid as an oriented image (uint8): ``mask`` there, or zeros."""
    import vtk
    from vtk.util import numpy_support

    image = _reference_geometry(volume_node, k)
    image.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
    values = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())
    values[:] = 0 if mask is None else np.ascontiguousarray(mask, dtype=np.uint8).ravel()
    image.Modified()
    return image


def _set_segment_slice(segmentation_node, segment_id: str, volume_node, k: int, mask: np.ndarray, *, clear: bool) -> None:
    """Make slice ``k`` of one segment equal ``mask`` (J, I); no other voxel of any segment changes.

    Segment Editor's "set within an extent" (qSlicerSegmentEditorAbstractEffect): remove the segment
    on the slice (minimum with zeros, limited to the slice's extent), then paint ``mask`` there
    (masking mode, same extent). Both work on segments sharing one labelmap layer, touch only the
    slice's voxels, and never resample the rest of the segment. ``clear=False`` skips the removal
    (the slice is already empty).
    """
    logic = _slicer().vtkSlicerSegmentationsModuleLogic
    modifier = _slice_modifier(volume_node, k, None if clear else mask)
    extent = list(modifier.GetExtent())
    if clear:
        if not logic.SetBinaryLabelmapToSegment(modifier, segmentation_node, segment_id, logic.MODE_MERGE_MIN, extent):
            raise RuntimeError(f"could not clear slice {k} of segment '{segment_id}'")
        if not mask.any():
            return
        modifier = _slice_modifier(volume_node, k, mask)
    if mask.any() and not logic.SetBinaryLabelmapToSegment(modifier, segmentation_node, segment_id, logic.MODE_MERGE_MASK, extent):
        raise RuntimeError(f"could not write slice {k} of segment '{segment_id}'")


def _check_labels(labels_2d: Any, shape: tuple[int, int]) -> np.ndarray:
    labels = np.asarray(labels_2d)
    if labels.ndim != 2:
        raise SceneWriteError(f"labels must be a 2-D array, got {labels.ndim}-D with shape {labels.shape}")
    if labels.shape != shape:
        raise SceneWriteError(
            f"labels shape {labels.shape} does not match the volume slice shape {shape} (rows = J, columns = I)"
        )
    if labels.dtype.kind == "f":
        if not np.isfinite(labels).all() or (labels != np.round(labels)).any():
            raise SceneWriteError("labels must be whole numbers (NaN or fractional values found)")
    elif labels.dtype.kind not in "iub":
        raise SceneWriteError(f"labels must be an integer array, got dtype {labels.dtype}")
    values = np.unique(labels)
    bad = [int(v) for v in values if not 0 <= v <= anatomy.NUM_STRUCTURES]
    if bad:
        raise SceneWriteError(
            f"labels contain values {bad[:10]} outside 0..{anatomy.NUM_STRUCTURES} (the anatomy table's values)"
        )
    return labels.astype(np.uint8)


@dataclass
class WriteReport:
    """What :func:`write_slice_labels` did."""

    segmentation_id: str
    volume_name: str
    slice_index: int
    #: Keys of the structures written on the slice (present in the labels), in anatomy order.
    written: list[str] = field(default_factory=list)
    #: Keys of the structures absent from the labels: their content on this slice was cleared.
    missing: list[str] = field(default_factory=list)
    #: Pixels per written structure on the slice.
    pixel_counts: dict[str, int] = field(default_factory=dict)
    #: Slice ``slice_index`` of each segment this write changed, as it was before (for :func:`undo_slice_write`).
    previous: dict[str, np.ndarray] = field(default_factory=dict, repr=False)
    #: Segments this write created (they did not exist before).
    added: list[str] = field(default_factory=list)

    def message(self) -> str:
        """One line for a status bar or log."""
        text = f"slice {self.slice_index} of '{self.volume_name}': {len(self.written)} of {anatomy.NUM_STRUCTURES} structures written"
        if self.missing:
            names = ", ".join(anatomy.BY_KEY[k].name for k in self.missing)
            text += f"; not found: {names}"
        return text


def write_slice_labels(segmentation_node, volume_node, k: int, labels_2d: Any) -> WriteReport:
    """Write one slice's labels (values of the anatomy table) into the nine segments.

    ``labels_2d`` is the result for ``arr[k]`` of the volume array ``arr[k, j, i]`` (shape (J, I)).
    Only slice ``k`` of each segment is replaced; every other slice (and any manual edit there) is kept.
    Structures absent from ``labels_2d`` are cleared on slice ``k`` and listed in ``report.missing``.
    Everything is validated first; if MRML fails half-way the segments are restored.
    """
    num_k, num_j, num_i = validate_volume(volume_node)
    _check_segmentation(segmentation_node, volume_node)
    k = _check_slice_index(k, num_k)
    labels = _check_labels(labels_2d, (num_j, num_i))

    report = WriteReport(segmentation_node.GetID(), volume_node.GetName(), k)
    was_modifying = segmentation_node.StartModify()
    try:
        report.added = ensure_segments(segmentation_node)
        masks = {s.key: labels == s.value for s in anatomy.STRUCTURES}
        for s in anatomy.STRUCTURES:
            count = int(masks[s.key].sum())
            if count:
                report.written.append(s.key)
                report.pixel_counts[s.key] = count
            else:
                report.missing.append(s.key)
            current = _segment_array(segmentation_node, s.key, volume_node, k)
            if not np.array_equal(current, masks[s.key]):
                report.previous[s.key] = current  # untouched segments stay exactly as they are
        # Clear every changed segment on the slice before painting any: the nine masks are disjoint,
        # so no segment is painted over another's old pixels (which would split shared layers).
        for key, current in report.previous.items():
            if current.any():
                _set_segment_slice(segmentation_node, key, volume_node, k, np.zeros_like(current), clear=True)
        for key in report.previous:
            _set_segment_slice(segmentation_node, key, volume_node, k, masks[key], clear=False)
    except Exception:
        try:
            undo_slice_write(segmentation_node, volume_node, report)
        except Exception:  # pragma: no cover - best effort; the original error matters more
            pass
        raise
    finally:
        segmentation_node.EndModify(was_modifying)
    return report


def undo_slice_write(segmentation_node, volume_node, report: WriteReport) -> None:
    """Put back what :func:`write_slice_labels` changed: slice ``k`` of each changed segment, and remove
    the segments it added. The rest of the segmentation was never touched."""
    k = report.slice_index
    segmentation = segmentation_node.GetSegmentation()
    was_modifying = segmentation_node.StartModify()
    try:
        for key, previous in report.previous.items():
            if key in report.added or segmentation.GetSegment(key) is None:
                continue
            _set_segment_slice(segmentation_node, key, volume_node, k, previous, clear=True)
        for key in report.added:
            segmentation.RemoveSegment(key)
    finally:
        segmentation_node.EndModify(was_modifying)


def read_slice_labels(segmentation_node, volume_node, k: int) -> np.ndarray:
    """Current labels (uint8, shape (J, I)) of slice ``k`` from the nine segments, e.g. after manual edits.

    Where segments overlap, the structure earlier in the anatomy table wins. Segments that were deleted
    read as absent.
    """
    num_k, num_j, num_i = validate_volume(volume_node)
    _check_segmentation(segmentation_node, volume_node)
    k = _check_slice_index(k, num_k)
    labels = np.zeros((num_j, num_i), dtype=np.uint8)
    for s in anatomy.STRUCTURES:
        mask = _segment_array(segmentation_node, s.key, volume_node, k).astype(bool)
        labels[mask & (labels == 0)] = s.value
    return labels


# ----------------------------------------------------------------------------------------------
# ROI boxes


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


# ----------------------------------------------------------------------------------------------
# Measurement table


@dataclass(frozen=True)
class Column:
    """One measurement table column."""

    field: str  # key in row dicts
    name: str  # table column name
    kind: str  # "string", "int" or "double"
    unit: str
    title: str
    description: str


COLUMNS: tuple[Column, ...] = (
    Column("volume", "Volume", "string", "", "Volume", "Name of the image volume"),
    Column("slice", "Slice", "int", "", "Slice index", "Index k of the axial slice arr[k] (0-based, Slicer order)"),
    Column("position_mm", "Position", "double", "mm", "Slice position",
           "Superior (S) coordinate of the slice in patient RAS (its first pixel's), as Slicer's axial slice offset shows it"),
    Column("level", "Level", "string", "", "Spinal level", "Spinal level of the slice chosen by the user (e.g. L4/L5); blank if not given"),
    Column("structure", "Structure", "string", "", "Structure", "Structure name"),
    Column("segment_id", "Segment ID", "string", "", "Segment ID", "Stable segment ID of the structure"),
    Column("found", "Found", "string", "", "Found", "yes if the structure is present on the slice, no otherwise"),
    Column("csa_mm2", "CSA", "double", "mm2", "Cross-sectional area", "Area of the structure on the slice"),
    Column("functional_csa_mm2", "Functional CSA", "double", "mm2", "Functional (lean) cross-sectional area", "Area of the muscle below the fat threshold"),
    Column("fat_percent", "Fat", "double", "%", "Fat fraction", "Percentage of the muscle area above the fat threshold"),
    Column("threshold", "Threshold", "double", "", "Fat threshold", "Intensity threshold separating fat from muscle"),
    Column("method", "Method", "string", "", "Threshold method", "How the fat threshold was chosen"),
    Column("dixon_fat_fraction_percent", "Dixon fat fraction", "double", "%", "Dixon fat fraction",
           "Muscles only, when water and fat images (or a fat-fraction map) were given: mean signal fat fraction "
           "F/(W+F) over the muscle's pixels above the noise floor"),
    Column("stenosis_grade", "Stenosis grade", "string", "", "Central stenosis grade (dural-sac CSA)",
           "Canal row only: normal (CSA >= 100 mm2), relative (75 to 100 mm2) or absolute (< 75 mm2) stenosis "
           "(Schonstrom 1985, Hamanishi 1994); an area grade on a disc-level slice, not a Schizas grade"),
    Column("qc", "QC", "string", "", "Quality control",
           "ok, or check: why this segment needs another look (plausibility checks without ground truth; "
           "docs/quality-control.md)"),
    Column("model_version", "Model version", "string", "", "Model version", "Segmentation model that produced the segments"),
    # Identifies the volume when two share a name (two series named alike) or one is renamed; it means
    # nothing outside the scene, so CSV exports leave it out.
    Column("volume_id", "Volume node ID", "string", "", "Volume node ID", "MRML node ID of the image volume"),
)
COLUMN_BY_FIELD = {c.field: c for c in COLUMNS}
#: Columns of CSV exports (the node ID is scene-internal).
CSV_COLUMNS: tuple[Column, ...] = tuple(c for c in COLUMNS if c.field != "volume_id")

_MEASUREMENT_FIELDS = ("csa_mm2", "functional_csa_mm2", "fat_percent", "threshold", "method", "stenosis_grade", "dixon_fat_fraction_percent", "qc", "found")


def _new_array(kind: str):
    import vtk

    return {"string": vtk.vtkStringArray, "int": vtk.vtkIntArray, "double": vtk.vtkDoubleArray}[kind]()


def _ensure_columns(table_node) -> None:
    for c in COLUMNS:
        if table_node.GetTable().GetColumnByName(c.name) is None:
            array = _new_array(c.kind)
            array.SetName(c.name)
            array.SetNumberOfTuples(table_node.GetNumberOfRows())
            table_node.AddColumn(array)
        table_node.SetColumnUnitLabel(c.name, c.unit)
        table_node.SetColumnTitle(c.name, c.title)
        table_node.SetColumnDescription(c.name, c.description)


def find_measurement_table(scene, name: str = DEFAULT_TABLE_NAME):
    """ParaspinalSeg's measurement table called ``name``, or None."""
    for node in _nodes_by_class(scene, "vtkMRMLTableNode"):
        if node.GetAttribute(ROLE_ATTRIBUTE) == ROLE_MEASUREMENTS and node.GetName() == name:
            return node
    return None


def get_or_create_measurement_table(scene, name: str = DEFAULT_TABLE_NAME):
    """The measurement table node (one row per volume, slice and structure), created when missing."""
    table_node = find_measurement_table(scene, name)
    created = table_node is None
    if created:
        table_node = scene.AddNewNodeByClass("vtkMRMLTableNode", name)
    try:
        was_modifying = table_node.StartModify()
        try:
            table_node.SetAttribute(ROLE_ATTRIBUTE, ROLE_MEASUREMENTS)
            _ensure_columns(table_node)
        finally:
            table_node.EndModify(was_modifying)
        _sh_item(scene, table_node)
    except Exception:
        if created:
            remove_node(scene, table_node)
        raise
    return table_node


def _get(row: Any, name: str, default: Any = None) -> Any:
    if isinstance(row, Mapping):
        return row.get(name, default)
    return getattr(row, name, default)


def _optional_float(value: Any, what: str) -> float:
    if value is None or value == "":
        return math.nan
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise SceneWriteError(f"{what} must be a number, got {value!r}") from None
    if math.isinf(number):
        raise SceneWriteError(f"{what} is infinite")
    return number


def _normalise_row(row: Any, volume: str, slice_index: int, level: str, model_version: str,
                   position_mm: Optional[float] = None) -> dict[str, Any]:
    key = _get(row, "key") or _get(row, "segment_id")
    if key is None and _get(row, "structure") is not None:
        key = next((s.key for s in anatomy.STRUCTURES if s.name == _get(row, "structure")), None)
    if key not in anatomy.BY_KEY:
        raise SceneWriteError(f"measurement row for unknown structure {key!r}; known: {sorted(anatomy.BY_KEY)}")
    s = anatomy.BY_KEY[key]
    found = _get(row, "found", True)
    if isinstance(found, str):
        found = found.strip().lower() in ("yes", "true", "1")
    out = {
        "volume": volume,
        "slice": slice_index,
        "position_mm": _optional_float(position_mm, "slice position"),
        "level": level,
        "structure": s.name,
        "segment_id": s.key,
        "found": bool(found),
        "csa_mm2": _optional_float(_get(row, "csa_mm2"), f"CSA of {s.name}"),
        "functional_csa_mm2": _optional_float(_get(row, "functional_csa_mm2"), f"functional CSA of {s.name}"),
        "fat_percent": _optional_float(_get(row, "fat_percent"), f"fat % of {s.name}"),
        "threshold": _optional_float(_get(row, "threshold"), f"threshold of {s.name}"),
        "method": str(_get(row, "method", "") or ""),
        "dixon_fat_fraction_percent": _optional_float(_get(row, "dixon_fat_fraction_percent"),
                                                      f"Dixon fat fraction of {s.name}"),
        "stenosis_grade": str(_get(row, "stenosis_grade", "") or ""),
        "qc": str(_get(row, "qc", "") or ""),
        "model_version": str(_get(row, "model_version", None) or model_version or ""),
    }
    for name in ("csa_mm2", "functional_csa_mm2"):
        if out[name] < 0:
            raise SceneWriteError(f"{COLUMN_BY_FIELD[name].title} of {s.name} is negative ({out[name]})")
    for name in ("fat_percent", "dixon_fat_fraction_percent"):
        if not (math.isnan(out[name]) or 0.0 <= out[name] <= 100.0):
            raise SceneWriteError(f"{COLUMN_BY_FIELD[name].title} of {s.name} is outside 0..100 ({out[name]})")
    return out


def rows_from_table(table_node) -> list[dict[str, Any]]:
    """All rows of a measurement table as dicts keyed by :data:`COLUMNS` fields (NaN for empty numbers)."""
    table = table_node.GetTable()
    rows = []
    for r in range(table_node.GetNumberOfRows()):
        row: dict[str, Any] = {}
        for c in COLUMNS:
            array = table.GetColumnByName(c.name)
            if array is None:
                row[c.field] = "" if c.kind == "string" else math.nan
            elif c.kind == "string":
                row[c.field] = str(array.GetValue(r))
            elif c.kind == "int":
                row[c.field] = int(array.GetValue(r))
            else:
                row[c.field] = float(array.GetValue(r))
        row["found"] = row["found"] == "yes"
        rows.append(row)
    return rows


def _fill_table(table_node, rows: Sequence[Mapping[str, Any]]) -> None:
    table = table_node.GetTable()
    for c in COLUMNS:
        array = table.GetColumnByName(c.name)
        array.SetNumberOfTuples(len(rows))
        for r, row in enumerate(rows):
            value = row[c.field]
            if c.field == "found":
                value = "yes" if value else "no"
            array.SetValue(r, value if c.kind != "double" else float(value))
        array.Modified()
    table.Modified()


def write_measurement_rows(
    table_node,
    rows: Iterable[Any],
    *,
    volume: Any,
    slice_index: int,
    level: str = "",
    model_version: str = "",
    position_mm: Optional[float] = None,
) -> int:
    """Replace the rows of (``volume``, ``slice_index``) with ``rows``; return how many were written.

    ``position_mm``: the slice's position (:func:`slice_position_mm`), written in every row of the slice.

    ``rows`` are measurement records (objects or dicts with ``key``, ``found``, ``csa_mm2``,
    ``functional_csa_mm2``, ``fat_percent``, ``threshold``, ``method``; ``None`` for a missing
    number), one per structure. ``volume`` is the volume node or its name. All rows are validated before
    the table changes; rows of other volumes and slices are kept. Rows are kept sorted by volume,
    slice and anatomy order.
    """
    volume_name = volume.GetName() if hasattr(volume, "GetName") else str(volume)
    volume_id = volume.GetID() if hasattr(volume, "GetID") else ""
    if not volume_name:
        raise SceneWriteError("measurement rows need a volume name")
    if isinstance(slice_index, (bool, np.bool_)) or not isinstance(slice_index, (int, np.integer)) or slice_index < 0:
        raise SceneWriteError(f"slice index must be a non-negative integer, got {slice_index!r}")
    level = "" if level is None else str(level).strip()
    if "\n" in level or "\r" in level:
        raise SceneWriteError("spinal level must be a single line of text")
    new_rows = [_normalise_row(row, volume_name, int(slice_index), level, model_version, position_mm) for row in rows]
    for row in new_rows:
        row["volume_id"] = volume_id
    keys = [row["segment_id"] for row in new_rows]
    if len(set(keys)) != len(keys):
        raise SceneWriteError("measurement rows contain the same structure more than once")

    _ensure_columns(table_node)
    kept = [
        row
        for row in rows_from_table(table_node)
        if not (row_of_volume(row, volume) and row["slice"] == int(slice_index))
    ]
    order = {s.key: s.value for s in anatomy.STRUCTURES}
    all_rows = sorted(
        kept + new_rows, key=lambda row: (row["volume"], row["slice"], order.get(row["segment_id"], 99))
    )
    was_modifying = table_node.StartModify()
    try:
        _fill_table(table_node, all_rows)
    finally:
        table_node.EndModify(was_modifying)
    return len(new_rows)


def slice_position_mm(slice_ijk_to_ras: Any) -> float:
    """Position of a slice for the table: the S coordinate (mm, patient RAS) of its first pixel.

    ``slice_ijk_to_ras`` is the slice's 4×4 matrix (:func:`preprocessing.slice_geometry_from_volume`). On an
    axial slice every pixel has this S coordinate, the value Slicer shows as the Red view's slice offset;
    along a stack it grows by the slice spacing.
    """
    return float(np.asarray(slice_ijk_to_ras, dtype=float)[2, 3])


def row_of_volume(row: Mapping[str, Any], volume: Any) -> bool:
    """Whether a table row belongs to ``volume`` (node or name): by node ID; by name only where either
    side has no ID (rows written for a name, or a name given)."""
    volume_name = volume.GetName() if hasattr(volume, "GetName") else str(volume)
    volume_id = volume.GetID() if hasattr(volume, "GetID") else ""
    if volume_id and row.get("volume_id"):
        return row["volume_id"] == volume_id
    return row["volume"] == volume_name


def csv_header(column: Column) -> str:
    """CSV header of a column with its unit, e.g. ``CSA (mm2)``."""
    return f"{column.name} ({column.unit})" if column.unit else column.name


def _csv_value(column: Column, value: Any) -> str:
    if column.field == "found":
        return "yes" if value else "no"
    if column.kind == "double":
        return "" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{float(value):.10g}"
    return str(value)


def rows_to_csv(rows: Iterable[Mapping[str, Any]], path: str | os.PathLike, extra_columns: Sequence[Column] = ()) -> None:
    """Write measurement row dicts (as from :func:`rows_from_table`) to a CSV file with units in the header.

    ``extra_columns`` go after the table's own columns, so files with and without them still line up.
    """
    columns = CSV_COLUMNS + tuple(extra_columns)
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow([csv_header(c) for c in columns])
        for row in rows:
            writer.writerow([_csv_value(c, row.get(c.field)) for c in columns])


def table_to_csv(table_node, path: str | os.PathLike) -> None:
    """Export the measurement table to CSV (plain ``csv`` module; units in the header, empty = no value)."""
    rows_to_csv(rows_from_table(table_node), path)
