"""What the "Segment slice" and "Update measurements" buttons do, on any MRML scene.

One code path for the Slicer module and the command line (``batch`` runs it on a headless scene):

    check volume and slice → slice k and its geometry → segmenter → measurements
    → segmentation + table rows + boxes written into the scene (all or nothing)

MRML + numpy only. Torch is reached only through the segmenter object the caller passes in (anything
with ``segment(slice_array, slice_ijk_to_ras, *, validated) -> SliceResult``, normally a loaded
:class:`~ParaspinalSegLib.segmenter.SliceSegmenter`), so this module imports in a Slicer without torch.

Conventions as in :mod:`scene`: slice ``k`` is ``arr[k]`` of the volume array ``arr[k, j, i]``. Every
input problem is an :class:`~ParaspinalSegLib.errors.InputError` raised before the scene changes; if a
writer still fails half-way, what this call wrote is undone, so no half-written node is left behind.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

from . import anatomy, qc, scene
from .errors import InputError
from .geometry import array_from_vtk_matrix, vtk_matrix_from_array
from .preprocessing import check_perpendicular_axes, pixel_spacing, slice_geometry_from_volume
from .slice_view import ALIGNMENT_TOLERANCE_DEG, ViewSlice, aligned_slice_to_ras, red_view_slice_index
from .validation import check_slice_index, validate_slice


@dataclass(eq=False)
class SliceOutcome:
    """What :func:`segment_slice_into_scene` wrote and found."""

    volume_name: str
    k: int
    level: str
    segmentation_node: Any
    table_node: Any
    #: The new ROI node of each found structure, by label value.
    box_nodes: dict[int, Any]
    #: The segmenter's :class:`~ParaspinalSegLib.segmenter.SliceResult` (labels, boxes, device, ...).
    result: Any
    #: One :class:`~ParaspinalSegLib.measurements.StructureMeasurement` per structure.
    measurements: list
    #: Seconds: ``segment`` (the segmenter call), ``measure``, ``write`` and ``total``.
    seconds: dict[str, float] = field(default_factory=dict)
    #: The slice's quality-control report (:mod:`.qc`); its cells are in the table's QC column.
    qc: Optional["qc.QCReport"] = None


# ----------------------------------------------------------------------------------------------
# Input: volume, slice, geometry


def check_volume(volume_node: Any) -> tuple[int, int, int]:
    """Array shape (K, J, I) of a usable volume, or an InputError saying why it cannot be used.

    Refused: no volume, not a scalar volume, a labelmap, no image data, RGB/vector volumes, empty images.
    """
    shape = scene.validate_volume(volume_node)
    if volume_node.IsA("vtkMRMLLabelMapVolumeNode"):
        raise InputError(f"'{volume_node.GetName()}' is a labelmap, not an MRI: choose the grey-value image")
    return shape


def volume_array(volume_node: Any) -> np.ndarray:
    """The volume's voxels as ``arr[k, j, i]`` (a view of the node's memory; do not write to it)."""
    from vtk.util import numpy_support

    shape = check_volume(volume_node)
    scalars = volume_node.GetImageData().GetPointData().GetScalars()
    return numpy_support.vtk_to_numpy(scalars).reshape(shape)


def volume_ijk_to_world(volume_node: Any) -> np.ndarray:
    """IJK to world RAS, parent transform included (views and patient directions live in world space).

    Equals the node's own IJK-to-RAS when it is under no transform. A non-linear parent transform is
    an InputError: the volume's slices are curved in world space, so there is no slice geometry.
    """
    import vtk

    check_volume(volume_node)
    ijk_to_ras = scene.volume_ijk_to_ras(volume_node)
    parent = volume_node.GetParentTransformNode()
    if parent is None:
        return ijk_to_ras
    if not parent.IsTransformToWorldLinear():
        raise InputError(
            f"volume '{volume_node.GetName()}' is under a non-linear transform; harden the transform first "
            "(Data module: right-click the volume, 'Harden transform')"
        )
    local_to_world = vtk.vtkMatrix4x4()
    parent.GetMatrixTransformToWorld(local_to_world)
    return array_from_vtk_matrix(local_to_world) @ ijk_to_ras


def check_slice(volume_node: Any, k: Any) -> np.ndarray:
    """A copy of slice ``arr[k]`` if it can be segmented, else an InputError naming slice and volume.

    Checks the volume, the slice index, the slice's geometry in world space (a linear parent transform,
    in-plane axes perpendicular: :func:`preprocessing.check_perpendicular_axes`) and the slice content (not
    all one value, no NaN/infinity, large enough), so a caller can refuse bad input before loading a model.
    """
    num_k = check_volume(volume_node)[0]
    k = check_slice_index(k, num_k, volume_node.GetName())
    check_perpendicular_axes(volume_ijk_to_world(volume_node), f"volume '{volume_node.GetName()}'",
                             names=("i", "j", "k"))
    return validate_slice(np.array(volume_array(volume_node)[k]), f"slice {k} of '{volume_node.GetName()}'")


def _measure(image: np.ndarray, labels: np.ndarray, slice_ijk_to_ras: np.ndarray, method: Any,
             dixon: Any = None) -> list:
    """Measurement records of one slice; ``dixon`` (a :class:`~ParaspinalSegLib.dixon.DixonSource`) adds the
    Dixon fat fraction of each muscle (refused when it gives no muscle pixel a value)."""
    from .measurements import measure_slice

    try:
        fraction = None if dixon is None else dixon.fraction_map(image.shape, slice_ijk_to_ras, labels).fraction
        return measure_slice(image, labels, pixel_spacing(slice_ijk_to_ras), method, fat_fraction=fraction)
    except InputError:
        raise
    except ValueError as exc:  # e.g. an unknown threshold method
        raise InputError(str(exc)) from None


# ----------------------------------------------------------------------------------------------
# Undo of a partial write


class _Snapshot:
    """What a slice write may change in existing nodes, to put back exactly if a later writer fails.

    Only what changes is kept: the segmentation's segment IDs, references and role, slice k of the
    segments the label writer changed (its :class:`~ParaspinalSegLib.scene.WriteReport`), and the small
    measurement table. No copy of the whole segmentation (a 512 x 512 x 200 volume has 9 x 52 MB of
    segment voxels), so a click costs the same on a large stack as on one slice.
    """

    _REFERENCE_ROLES = (scene.VOLUME_REFERENCE_ROLE,)

    def __init__(self, segmentation_node: Any, table_node: Any) -> None:
        import vtk

        self.segmentation_node = segmentation_node
        self.table_node = table_node
        self.slice_write: Optional[scene.WriteReport] = None
        self.volume_node: Any = None
        if segmentation_node is not None:
            segmentation = segmentation_node.GetSegmentation()
            self.segment_ids = {segmentation.GetNthSegmentID(i) for i in range(segmentation.GetNumberOfSegments())}
            roles = self._REFERENCE_ROLES + (segmentation_node.GetReferenceImageGeometryReferenceRole(),)
            self.references = {role: segmentation_node.GetNodeReferenceID(role) for role in roles}
            self.role = segmentation_node.GetAttribute(scene.ROLE_ATTRIBUTE)
        self.table = None
        if table_node is not None:
            self.table = vtk.vtkTable()
            self.table.DeepCopy(table_node.GetTable())

    def wrote_slice(self, volume_node: Any, report: "scene.WriteReport") -> None:
        """Remember what the label writer changed (called once it has succeeded)."""
        self.volume_node, self.slice_write = volume_node, report

    def restore(self) -> None:
        node = self.segmentation_node
        if node is not None and node.GetScene() is not None:
            was_modifying = node.StartModify()
            try:
                if self.slice_write is not None:
                    scene.undo_slice_write(node, self.volume_node, self.slice_write)
                segmentation = node.GetSegmentation()
                added = [segmentation.GetNthSegmentID(i) for i in range(segmentation.GetNumberOfSegments())]
                for segment_id in added:
                    if segment_id not in self.segment_ids:
                        segmentation.RemoveSegment(segment_id)
                for role, node_id in self.references.items():
                    node.SetNodeReferenceID(role, node_id)
                node.SetAttribute(scene.ROLE_ATTRIBUTE, self.role)  # None removes an attribute we added
            finally:
                node.EndModify(was_modifying)
        if self.table_node is not None and self.table_node.GetScene() is not None:
            self.table_node.GetTable().DeepCopy(self.table)
            self.table_node.Modified()


def _write_slice(
    mrml_scene: Any,
    volume_node: Any,
    k: int,
    result: Any,
    records: list,
    *,
    segmentation_node: Any,
    level: str,
    position_mm: Optional[float] = None,
) -> tuple[Any, Any, dict[int, Any]]:
    """Segmentation, table rows and boxes of one slice: all written, or none (undone on failure)."""
    existing = segmentation_node or scene.find_segmentation(mrml_scene, volume_node)
    existing_table = scene.find_measurement_table(mrml_scene)
    snapshot = _Snapshot(existing, existing_table)
    created: list[Any] = []
    try:
        seg = scene.get_or_create_segmentation(mrml_scene, volume_node, segmentation_node)
        if seg is not existing:
            created.append(seg)
        snapshot.wrote_slice(volume_node, scene.write_slice_labels(seg, volume_node, k, result.labels))
        table = scene.get_or_create_measurement_table(mrml_scene)
        if table is not existing_table:
            created.append(table)
        scene.write_measurement_rows(
            table, records, volume=volume_node, slice_index=k, level=level, model_version=result.model_version,
            position_mm=position_mm,
        )
        # clear_others: the boxes shown are always those of the slice segmented last. The box writer
        # undoes its own nodes if it fails, and removes the old boxes only once the new ones exist.
        boxes = scene.write_boxes(mrml_scene, volume_node, k, result.boxes, clear_others=True)
    except Exception:
        # A SceneWriteError (bad input found by a writer) is an InputError: it reaches the user as it is.
        for node in created:
            scene.remove_node(mrml_scene, node)
        snapshot.restore()
        raise
    return seg, table, boxes


# ----------------------------------------------------------------------------------------------
# The two buttons


def segment_slice_into_scene(
    mrml_scene: Any,
    volume_node: Any,
    k: int,
    segmenter: Any,
    *,
    segmentation_node: Any = None,
    level: str = "",
    method: Any = "auto",
    show_boxes: bool = True,
    volume_ijk_to_ras: Optional[np.ndarray] = None,
    validated: bool = False,
    dixon: Any = None,
    result: Any = None,
) -> SliceOutcome:
    """Segment slice ``k`` of ``volume_node`` and write segments, table rows and boxes into the scene.

    ``segmentation_node`` None reuses the segmentation made before for this volume or creates one;
    other slices of it (and the user's edits there) are kept. ``method`` is "auto", "otsu" or a number
    (manual fat threshold). ``volume_ijk_to_ras`` is the geometry to segment and measure in (the
    Slicer module gives IJK-to-world when the volume is under a linear transform); default: the
    node's own IJK-to-RAS. Input, network and measurements all run before the scene is touched.
    The slice's content is checked once per call: here, or by the caller that says ``validated=True``
    because it ran :func:`check_slice` on the same slice before loading a model.
    ``dixon``: water/fat images or a fat-fraction map (:class:`~ParaspinalSegLib.dixon.DixonSource`, e.g.
    from :func:`~ParaspinalSegLib.dixon.dixon_source_from_nodes`) for the "Dixon fat fraction" column.
    ``result``: the segmenter's result for this slice when it was already computed (several slices through
    the network at once, :meth:`SliceSegmenter.segment_many`); the segmenter is not called then.
    """
    t0 = time.perf_counter()
    if validated:
        k = check_slice_index(k, check_volume(volume_node)[0], volume_node.GetName())
        image = np.array(volume_array(volume_node)[k])
    else:
        image = check_slice(volume_node, k)
    k = int(k)
    level = "" if level is None else str(level).strip()
    ijk_to_ras = scene.volume_ijk_to_ras(volume_node) if volume_ijk_to_ras is None else np.asarray(volume_ijk_to_ras, float)
    slice_ijk_to_ras = slice_geometry_from_volume(ijk_to_ras, k)
    t1 = time.perf_counter()
    if result is None:
        result = segmenter.segment(image, slice_ijk_to_ras, validated=True)
    t2 = time.perf_counter()
    report = qc.check_result(result, image, slice_ijk_to_ras)
    records = qc.with_qc(_measure(image, result.labels, slice_ijk_to_ras, method, dixon), report)
    t3 = time.perf_counter()
    seg, table, boxes = _write_slice(
        mrml_scene, volume_node, k, result, records, segmentation_node=segmentation_node, level=level,
        position_mm=scene.slice_position_mm(slice_ijk_to_ras),
    )
    scene.set_boxes_visible(mrml_scene, volume_node, show_boxes)
    t4 = time.perf_counter()
    return SliceOutcome(
        volume_name=volume_node.GetName(),
        k=k,
        level=level,
        segmentation_node=seg,
        table_node=table,
        box_nodes=boxes,
        result=result,
        measurements=records,
        qc=report,
        seconds={"segment": t2 - t1, "measure": t3 - t2, "write": t4 - t3, "total": t4 - t0},
    )


def describe_outcome(outcome: SliceOutcome) -> str:
    """Status line: which slice, what ran where and how long, and which structures were not found."""
    result = outcome.result
    device = "GPU" if str(result.device).startswith("cuda") else "CPU"
    learned = len(result.found) + len(result.missing)
    text = (
        f"Segmented slice {outcome.k} of {outcome.volume_name} on {device} in {result.seconds:.2f} s: "
        f"{len(result.found)} of {learned} structures found."
    )
    if result.missing:
        text += " Not found: " + ", ".join(anatomy.BY_VALUE[v].name for v in result.missing) + "."
    if outcome.qc is not None and not outcome.qc.ok:
        text += " " + outcome.qc.summary() + " (see the QC column)."
    return text


def update_measurements(
    mrml_scene: Any,
    volume_node: Any,
    k: int,
    *,
    segmentation_node: Any = None,
    level: Optional[str] = None,
    method: Any = "auto",
    volume_ijk_to_ras: Optional[np.ndarray] = None,
    dixon: Any = None,
) -> Any:
    """Recompute slice ``k``'s table rows from the segments as they are now (after manual edits).

    Replaces exactly that slice's rows of this volume; the model version recorded for the slice is
    kept, and so is its level when ``level`` is None. A slice that was never measured and has no
    segment pixels is refused. Returns the table node.
    """
    num_k = check_volume(volume_node)[0]
    k = check_slice_index(k, num_k, volume_node.GetName())
    seg = segmentation_node or scene.find_segmentation(mrml_scene, volume_node)
    if seg is None:
        raise InputError(f"volume '{volume_node.GetName()}' has no ParaspinalSeg segmentation yet: segment a slice first")
    labels = scene.read_slice_labels(seg, volume_node, k)
    table = scene.find_measurement_table(mrml_scene)
    previous = [
        row for row in (scene.rows_from_table(table) if table is not None else [])
        if scene.row_of_volume(row, volume_node) and row["slice"] == k
    ]
    if not previous and not labels.any():
        raise InputError(f"slice {k} of '{volume_node.GetName()}' has no segments: segment it first")
    ijk_to_ras = scene.volume_ijk_to_ras(volume_node) if volume_ijk_to_ras is None else np.asarray(volume_ijk_to_ras, float)
    slice_ijk_to_ras = slice_geometry_from_volume(ijk_to_ras, k)
    image = np.array(volume_array(volume_node)[k])
    # The segments as edited: layout, shape and image checks again (probabilities and detector boxes were the
    # network's and no longer describe them).
    report = qc.run_checks(labels, image, slice_ijk_to_ras)
    records = qc.with_qc(_measure(image, labels, slice_ijk_to_ras, method, dixon), report)
    versions = {row["model_version"] for row in previous}
    levels = {row["level"] for row in previous}
    if level is None:
        level = levels.pop() if len(levels) == 1 else ""
    created = table is None
    table = scene.get_or_create_measurement_table(mrml_scene)
    try:
        scene.write_measurement_rows(
            table, records, volume=volume_node, slice_index=k, level=level,
            model_version=versions.pop() if len(versions) == 1 else "",
            position_mm=scene.slice_position_mm(slice_ijk_to_ras),
        )
    except Exception:
        if created:
            scene.remove_node(mrml_scene, table)
        raise
    return table


def export_measurements_csv(table_node: Any, path: str | os.PathLike) -> Path:
    """Write the measurement table to ``path`` as CSV (units in the header; ``.csv`` added if missing)."""
    if table_node is None or table_node.GetNumberOfRows() == 0:
        raise InputError("there are no measurements yet: segment a slice first")
    path = Path(path)
    if path.suffix.lower() != ".csv":
        path = path.with_name(path.name + ".csv")
    scene.table_to_csv(table_node, path)
    return path


# ----------------------------------------------------------------------------------------------
# Slice views (the Red view) on the volume


def view_slice(volume_node: Any, slice_node: Any, tolerance_deg: float = ALIGNMENT_TOLERANCE_DEG) -> Optional[ViewSlice]:
    """Which voxel slice of ``volume_node`` the slice view ``slice_node`` shows (None if either is missing).

    A volume under a non-linear transform is reported as not aligned, with an unknown (NaN) angle.
    """
    if slice_node is None or volume_node is None or volume_node.GetImageData() is None:
        return None
    parent = volume_node.GetParentTransformNode()
    if parent is not None and not parent.IsTransformToWorldLinear():
        return ViewSlice(k=0, aligned=False, inside=False, angle_deg=math.nan, offset=0.0)
    return red_view_slice_index(
        volume_ijk_to_world(volume_node), array_from_vtk_matrix(slice_node.GetSliceToRAS()),
        volume_node.GetImageData().GetDimensions(), tolerance_deg,
    )


def align_view(volume_node: Any, slice_node: Any) -> ViewSlice:
    """Rotate ``slice_node``'s view onto the volume's slices and move it to the nearest one."""
    aligned = aligned_slice_to_ras(
        volume_ijk_to_world(volume_node), array_from_vtk_matrix(slice_node.GetSliceToRAS()),
        volume_node.GetImageData().GetDimensions(),
    )
    slice_node.GetSliceToRAS().DeepCopy(vtk_matrix_from_array(aligned))
    slice_node.UpdateMatrices()
    return view_slice(volume_node, slice_node)
