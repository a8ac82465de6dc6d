"""One slice of a volume on disk → the command line's five output files, placed all at once.

:func:`segment_volume_to_folder` writes, for volume ``<name>``:

- ``<name>.seg.nrrd``: the nine named segments (IDs, names, colours, terminology) on the volume's grid,
  made by the Slicer module's own code path (:func:`workflow.segment_slice_into_scene`: segmenter,
  measurements, scene writers) on a headless MRML scene;
- ``<name>_labels.nii.gz``: label values of the anatomy table on the input volume's grid and geometry
  (only the segmented slice is non-zero);
- ``<name>_boxes.mrk.json``: one markups ROI per found structure, all in one Slicer markups file
  (Slicer's JSON format holds a list of markups and Slicer loads every one of them);
- ``<name>_measurements.csv``: the measurement table (one row per structure, units in the header);
- ``<name>_overlay.png``: the slice with contours, boxes and a legend, patient right on the viewer's left.

The files are written into a staging folder on the output folder's own file system and appear together
(:class:`outputs.StagedOutputs`): a failure, a full disk or an interrupt leaves the output folder as it
was, and existing outputs are replaced only with ``overwrite=True``. ``<name>`` is made safe
(:func:`outputs.safe_output_name`), so no input name can place a file outside the output folder.
Torch is imported only when a model is loaded, VTK/MRML only when files are written.
"""

from __future__ import annotations

import errno
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from . import anatomy
from .errors import InputError
from .geometry import vtk_matrix_from_array
from .interrupts import raise_pending
from .outputs import StagedOutputs, check_no_existing, safe_output_name
from .validation import check_slice_index, validate_slice
from .volume_io import Volume, check_slice_geometry, read_volume, write_label_volume

#: Output file name endings, appended to the volume's name.
OUTPUT_SUFFIXES: dict[str, str] = {
    "segmentation": ".seg.nrrd",
    "labels": "_labels.nii.gz",
    "boxes": "_boxes.mrk.json",
    "measurements": "_measurements.csv",
    "overlay": "_overlay.png",
}


@dataclass
class SegmentOutputs:
    """Where one slice's outputs went and what happened."""

    volume_name: str
    slice_index: int
    level: str
    out_dir: Path
    files: dict[str, Path]
    found: list[int]
    missing: list[int]
    device: str
    model_version: str
    #: Seconds: ``network`` (segmenter call), ``write`` (all outputs), ``total`` (this call).
    seconds: dict[str, float] = field(default_factory=dict)
    #: The quality-control line (``QC: ok`` or what to check) and whether anything was flagged.
    qc_summary: str = ""
    qc_flagged: bool = False
    #: Warnings about the input (unusual geometry) for the user; the outputs were written.
    warnings: list[str] = field(default_factory=list)

    def describe(self) -> str:
        """A few lines for the terminal: what was found, where the files are, device and time."""
        found = ", ".join(anatomy.BY_VALUE[v].name for v in self.found) or "none"
        lines = [
            f"slice {self.slice_index} of {self.volume_name}"
            + (f" ({self.level})" if self.level else "")
            + f": {len(self.found)} structures found ({found})",
        ]
        if self.missing:
            lines.append("not found: " + ", ".join(anatomy.BY_VALUE[v].name for v in self.missing))
        if self.qc_summary:
            lines.append(self.qc_summary + ("" if not self.qc_flagged else " (QC column of the table)"))
        lines.append(f"outputs in {self.out_dir}:")
        lines += [f"  {p.name}" for p in self.files.values()]
        s = self.seconds
        timing = f"device {self.device}; {s.get('total', 0.0):.2f} s"
        parts = [f"{key} {s[key]:.2f} s" for key in ("model_load", "network", "write") if key in s]
        if parts:
            timing += " (" + ", ".join(parts) + ")"
        lines.append(timing + f"; model {self.model_version}")
        return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------
# One slice


def resolve_slice(volume: Volume, k: Optional[int]) -> int:
    """The slice index to segment: ``k`` checked against the volume, or 0 for a single-slice volume."""
    n = volume.num_slices
    if k is None:
        if n == 1:
            return 0
        raise InputError(
            f"{volume.name} has {n} slices: choose one with --slice K (0..{n - 1}, the third voxel index "
            "as Slicer shows it)"
        )
    return check_slice_index(k, n, volume.name)


def check_slice(volume: Volume, k: int) -> list[str]:
    """Refuse a slice that cannot be segmented or measured (all one value, NaN, impossible geometry, not
    axial, ...) before any model is loaded; return warnings about unusual geometry
    (:func:`volume_io.check_slice_geometry`). ``segment``, ``batch`` and ``measure`` all call it."""
    warnings = check_slice_geometry(volume)
    check_slice_content(volume, k)
    return warnings


def check_slice_content(volume: Volume, k: int) -> None:
    """The per-slice half of :func:`check_slice` (its pixels and its plane, not the volume's geometry), for a
    caller that checked the volume once and goes through several of its slices."""
    from .errors import NonAxialSliceError
    from .preprocessing import canonical_orientation, slice_geometry_from_volume

    where = f"slice {k} of '{volume.name}'"
    validate_slice(volume.array[k], where)
    try:  # the segmenter's own test (more than 30 degrees off axial), here so it refuses before the model loads
        canonical_orientation(slice_geometry_from_volume(volume.ijk_to_ras, k))
    except NonAxialSliceError as exc:
        raise NonAxialSliceError(f"{where}: {exc}") from None


def output_paths(folder: str | os.PathLike, name: str) -> dict[str, Path]:
    """The five output paths for volume ``name`` in ``folder``."""
    return {key: Path(folder) / f"{name}{suffix}" for key, suffix in OUTPUT_SUFFIXES.items()}


def _add_volume_node(scene: Any, volume: Volume) -> Any:
    """A scalar volume node holding the volume's voxels and geometry (reference for the writers)."""
    import vtk
    from vtk.util import numpy_support

    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", volume.name)
    image = vtk.vtkImageData()
    k, j, i = volume.array.shape
    image.SetDimensions(i, j, k)
    scalars = numpy_support.numpy_to_vtk(np.ascontiguousarray(volume.array).ravel(), deep=True)
    image.GetPointData().SetScalars(scalars)
    node.SetAndObserveImageData(image)
    node.SetIJKToRASMatrix(vtk_matrix_from_array(volume.ijk_to_ras))
    return node


def write_boxes_file(roi_nodes: Sequence[Any], path: str | os.PathLike, scratch: str | os.PathLike) -> Path:
    """Write several markups ROIs into one ``.mrk.json`` (one entry per ROI in its ``markups`` list).

    Each ROI is written by its own default storage node (``vtkMRMLMarkupsROIJsonStorageNode``, which keeps
    size and orientation); the files' ``markups`` lists are then joined. Slicer's markups reader creates
    one node per entry.
    """
    merged: Optional[dict] = None
    for n, roi in enumerate(roi_nodes):
        storage = roi.CreateDefaultStorageNode()
        one = Path(scratch) / f"roi_{n}.mrk.json"
        storage.SetFileName(str(one))
        if not storage.WriteData(roi):
            raise OSError(errno.EIO, f"could not write {Path(path).name} (box {roi.GetName()}; disk full?)")
        content = json.loads(one.read_text(encoding="utf-8"))
        one.unlink()
        # Slicer names a node read from a file after the file unless the entry has a "name" (read by
        # Slicer's markups JSON reader, not written by its writer): keep the structure's name.
        for entry in content["markups"]:
            entry.setdefault("name", roi.GetName())
        if merged is None:
            merged = content
        else:
            merged["markups"].extend(content["markups"])
    if merged is None:  # no structure found: a valid markups file with no markups
        merged = {
            "@schema": "https://raw.githubusercontent.com/slicer/slicer/master/Modules/Loadable/Markups/"
            "Resources/Schema/markups-schema-v1.0.3.json#",
            "markups": [],
        }
    out = Path(path)
    out.write_text(json.dumps(merged, indent=2), encoding="utf-8")
    return out


def _segment_in_headless_scene(volume: Volume, k: int, segmenter: Any, level: str, threshold_method: Any,
                               paths: dict[str, Path], scratch: Path, validated: bool, *, session: Any = None,
                               dixon: Any = None) -> tuple[Any, dict[str, float]]:
    """Segment and write segmentation, boxes and table through the Slicer button's own code path
    (:func:`workflow.segment_slice_into_scene`) on a headless MRML scene; return its outcome and the seconds
    spent on the scene itself (``scene``: volume node, clearing) and on these files (``files``).

    ``session``: a :class:`headless.SceneSession` whose scene is reused and cleared afterwards (a batch
    passes one for all its rows); None makes a scene for this call only."""
    from . import scene as writers
    from .headless import SceneSession
    from .workflow import segment_slice_into_scene

    import vtk

    own = session is None
    session = SceneSession() if own else session
    t0 = time.perf_counter()
    mrml = session.scene()
    # A failing VTK writer logs its own lines; the command reports the failure once, as an OSError.
    shown = vtk.vtkObject.GetGlobalWarningDisplay()
    vtk.vtkObject.GlobalWarningDisplayOff()
    try:
        volume_node = _add_volume_node(mrml, volume)
        t1 = time.perf_counter()
        outcome = segment_slice_into_scene(
            mrml, volume_node, k, segmenter, level=level, method=threshold_method, volume_ijk_to_ras=volume.ijk_to_ras,
            validated=validated, dixon=dixon,
        )
        t2 = time.perf_counter()
        segmentation = outcome.segmentation_node
        storage = segmentation.CreateDefaultStorageNode()
        mrml.AddNode(storage)
        storage.SetFileName(str(paths["segmentation"]))
        if not storage.WriteData(segmentation):
            raise OSError(errno.EIO, f"could not write {paths['segmentation'].name}", str(paths["segmentation"]))
        rois = outcome.box_nodes
        write_boxes_file([rois[v] for v in sorted(rois)], paths["boxes"], scratch)
        writers.table_to_csv(outcome.table_node, paths["measurements"])
        t3 = time.perf_counter()
    finally:
        vtk.vtkObject.SetGlobalWarningDisplay(shown)
        t_clear = time.perf_counter()
        session.close() if own else session.clear()
        t_end = time.perf_counter()
    return outcome, {"scene": (t1 - t0) + (t_end - t_clear), "files": t3 - t2}


def write_slice_outputs(
    volume: Volume,
    k: int,
    folder: Path,
    scratch: Path,
    segmenter: Any,
    *,
    name: str,
    level: str = "",
    threshold_method: Any = "auto",
    validated: bool = False,
    session: Any = None,
    dixon: Any = None,
) -> tuple[Any, dict[str, Path], dict[str, float]]:
    """Segment slice ``k`` and write the five outputs into ``folder`` (a staging folder: nothing else is
    there); ``scratch`` is a private folder for intermediate files. ``validated``: the caller already ran
    :func:`check_slice` on slice ``k`` (the content is checked once). ``session``: a
    :class:`headless.SceneSession` to reuse; ``dixon``: a :class:`~ParaspinalSegLib.dixon.DixonSource` for the
    Dixon fat-fraction column. Returns ``(outcome, paths, seconds spent on the scene and on the files)``."""
    from .overlay import save_overlay
    from .preprocessing import slice_geometry_from_volume

    paths = output_paths(folder, name)
    outcome, parts = _segment_in_headless_scene(volume, k, segmenter, level, threshold_method, paths, scratch,
                                                validated, session=session, dixon=dixon)
    result = outcome.result
    t_write = time.perf_counter()
    labels = np.zeros(volume.array.shape, np.uint8)
    labels[k] = result.labels
    write_label_volume(labels, volume, paths["labels"])
    title = f"{name}\nslice {k}" + (f", {level}" if level else "")
    flagged = outcome.qc.flagged_values if outcome.qc is not None else []
    save_overlay(paths["overlay"], volume.array[k], result.labels, slice_geometry_from_volume(volume.ijk_to_ras, k),
                 result.boxes, title=title, flagged=flagged)
    parts["files"] += time.perf_counter() - t_write
    return outcome, paths, parts


def outputs_record(outcome: Any, name: str, k: int, level: str, out: Path, files: dict[str, Path],
                    t0: float, parts: dict[str, float]) -> SegmentOutputs:
    """The :class:`SegmentOutputs` of a slice; ``seconds`` break the time into ``network`` (the segmenter
    call), ``fit`` (fat threshold and measurements), ``scene`` (MRML nodes) and ``files`` (the outputs,
    staging and placing included), plus ``write`` (= fit + scene + files) and ``total``."""
    result = outcome.result
    total = time.perf_counter() - t0
    network, fit = outcome.seconds["segment"], outcome.seconds["measure"]
    scene_s = outcome.seconds["write"] + parts["scene"]
    return SegmentOutputs(
        volume_name=name,
        slice_index=k,
        level=level,
        out_dir=out.resolve(),
        files=files,
        found=list(result.found),
        missing=list(result.missing),
        device=str(result.device),
        model_version=str(result.model_version),
        qc_summary=outcome.qc.summary() if outcome.qc is not None else "",
        qc_flagged=outcome.qc is not None and not outcome.qc.ok,
        seconds={
            "network": network,
            "fit": fit,
            "scene": scene_s,
            # The rest of the call: the five files, staging and placing them.
            "files": max(total - network - fit - scene_s, parts["files"]),
            "write": total - network,
            "total": total,
        },
    )


def segment_volume_to_folder(
    volume: Volume,
    k: Optional[int],
    out_dir: str | os.PathLike,
    segmenter: Any,
    *,
    level: str = "",
    threshold_method: Any = "auto",
    name: Optional[str] = None,
    overwrite: bool = False,
    validated: bool = False,
    dixon: Any = None,
) -> SegmentOutputs:
    """Segment slice ``k`` of ``volume`` with a loaded ``SliceSegmenter`` and write the five outputs.

    ``k=None`` is allowed for single-slice volumes. Files are named after ``name`` (default: the
    volume's name), made safe for a file name. Raises :class:`InputError` for unusable input and
    :class:`~ParaspinalSegLib.errors.OutputExistsError` when an output exists and ``overwrite`` is
    false; in every failure the output folder is left as it was. ``validated``: the caller already ran
    :func:`check_slice` on slice ``k``. ``dixon``: a :class:`~ParaspinalSegLib.dixon.DixonSource` for the
    Dixon fat-fraction column.
    """
    t0 = time.perf_counter()
    k = resolve_slice(volume, k)  # the content is checked by the scene workflow (or was by the caller)
    level = (level or "").strip()
    name = safe_output_name(name or volume.name)
    out = Path(out_dir)
    if not overwrite:
        check_no_existing(list(output_paths(out, name).values()))
    with StagedOutputs(out, overwrite=overwrite) as stage:
        scratch = stage.path(".scratch")
        scratch.mkdir()
        outcome, staged, parts = write_slice_outputs(
            volume, k, stage.staging, scratch, segmenter, name=name, level=level, threshold_method=threshold_method,
            validated=validated, dixon=dixon,
        )
        stage.commit()
    return outputs_record(outcome, name, k, level, out, output_paths(out, name), t0, parts)


def default_threads() -> int:
    """CPU threads for the network: half the cores, at least 1.

    One 2-D slice is a small job: extra threads gain little, and on a busy machine (more runnable
    processes than cores) OpenMP threads waiting for each other made one slice 5-20x slower in our
    measurements, so the command line leaves half the cores to everything else.
    """
    return max(1, (os.cpu_count() or 2) // 2)


def load_segmenter(weights: Optional[str] = None, device: str = "auto", threads: Optional[int] = None,
                   mirror_tta: bool = True) -> Any:
    """Load the model once (imports torch); ``threads`` CPU threads for torch (None: :func:`default_threads`).

    ``mirror_tta``: average with the mirrored slice (``SliceSegmenter``'s default; off = half the network time).
    """
    from .errors import import_torch
    from .segmenter import SliceSegmenter

    torch = import_torch()
    n = default_threads() if not threads else int(threads)
    if n < 1:
        raise InputError(f"--threads must be at least 1, got {n}")
    torch.set_num_threads(n)
    return SliceSegmenter(weights=weights, device=device, mirror_tta=mirror_tta)


def segment_file(
    volume_path: str | os.PathLike,
    k: Optional[int],
    out_dir: str | os.PathLike,
    *,
    level: str = "",
    weights: Optional[str] = None,
    device: str = "auto",
    threshold_method: Any = "auto",
    threads: Optional[int] = None,
    segmenter: Any = None,
    mirror_tta: bool = True,
    overwrite: bool = False,
    dixon: Any = None,
) -> SegmentOutputs:
    """``paraspinalseg segment``: read the volume, check the slice, load the model, write the outputs.
    ``dixon``: a :class:`~ParaspinalSegLib.dixon.DixonSource` (or None) for the Dixon fat-fraction column.

    The volume, the slice and the output names are checked before the (slow) model load, so bad input
    and existing outputs (without ``overwrite``) fail at once.
    """
    t0 = time.perf_counter()
    if not str(volume_path).strip():
        raise InputError("no volume given")
    volume = read_volume(volume_path)
    raise_pending()  # a Ctrl-C held back during the reader's imports takes effect here
    k = resolve_slice(volume, k)
    warnings = check_slice(volume, k)
    if not overwrite:
        check_no_existing(list(output_paths(out_dir, safe_output_name(volume.name)).values()))
    if dixon is not None:  # Dixon images that miss the slice are refused before the model loads
        dixon.check_volume_slices(volume.array.shape, volume.ijk_to_ras, [k])
    t_load = time.perf_counter()
    if segmenter is None:
        segmenter = load_segmenter(weights, device, threads, mirror_tta)
        raise_pending()
    load_s = time.perf_counter() - t_load
    outputs = segment_volume_to_folder(
        volume, k, out_dir, segmenter, level=level, threshold_method=threshold_method, overwrite=overwrite,
        validated=True, dixon=dixon,
    )
    outputs.warnings = warnings
    outputs.seconds["model_load"] = load_s
    outputs.seconds["total"] = time.perf_counter() - t0
    return outputs


