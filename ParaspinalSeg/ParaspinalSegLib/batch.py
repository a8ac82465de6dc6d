"""Segment slices of volumes on disk and write the command line's output files (one slice or a CSV list).

For one slice :func:`segment_volume_to_folder` writes, into the output folder:

- ``<name>.seg.nrrd``: the nine named segments (IDs, names, colours, terminology) on the volume's grid,
  made by the Slicer module's own code path (:func:`workflow.segment_slice_into_scene`: segmenter,
  measurements, scene writers) on a headless MRML scene;
- ``<name>_labels.nii.gz``: label values of the anatomy table on the input volume's grid and geometry
  (only the segmented slice is non-zero);
- ``<name>_boxes.mrk.json``: one markups ROI per found structure, all in one Slicer markups file
  (Slicer's JSON format holds a list of markups and Slicer loads every one of them);
- ``<name>_measurements.csv``: the measurement table (one row per structure, units in the header);
- ``<name>_overlay.png``: the slice with contours, boxes and a legend, patient right on the viewer's left.

Everything is written into a private temporary folder first and moved into place only when every step
succeeded, so a failure leaves the output folder as it was. :func:`run_batch` runs many rows with one
model, keeps going past bad rows (``errors.csv``) and writes one combined ``measurements.csv``.
Torch is imported only when a model is loaded, VTK/MRML only when files are written.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import numpy as np

from . import anatomy
from .errors import InputError
from .geometry import vtk_matrix_from_array
from .validation import check_slice_index, validate_slice
from .volume_io import Volume, read_volume, write_label_volume

#: Output file name endings, appended to the volume's name.
OUTPUT_SUFFIXES: dict[str, str] = {
    "segmentation": ".seg.nrrd",
    "labels": "_labels.nii.gz",
    "boxes": "_boxes.mrk.json",
    "measurements": "_measurements.csv",
    "overlay": "_overlay.png",
}
COMBINED_MEASUREMENTS = "measurements.csv"
ERRORS_CSV = "errors.csv"
ERROR_COLUMNS = ("row", "volume", "slice", "level", "error")


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


def check_slice(volume: Volume, k: int) -> None:
    """Refuse a slice that cannot be segmented (all one value, NaN, ...) before any model is loaded."""
    validate_slice(volume.array[k], f"slice {k} of '{volume.name}'")


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
            raise OSError(f"could not write box {roi.GetName()} to {one}")
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
                               paths: dict[str, Path], scratch: Path, validated: bool) -> Any:
    """Segment and write segmentation, boxes and table through the Slicer button's own code path
    (:func:`workflow.segment_slice_into_scene`) on a headless MRML scene; return its outcome."""
    from . import scene as writers
    from .headless import create_headless_scene
    from .workflow import segment_slice_into_scene

    mrml, app_logic = create_headless_scene()
    try:
        volume_node = _add_volume_node(mrml, volume)
        outcome = segment_slice_into_scene(
            mrml, volume_node, k, segmenter, level=level, method=threshold_method, volume_ijk_to_ras=volume.ijk_to_ras,
            validated=validated,
        )
        segmentation = outcome.segmentation_node
        storage = segmentation.CreateDefaultStorageNode()
        mrml.AddNode(storage)
        storage.SetFileName(str(paths["segmentation"]))
        if not storage.WriteData(segmentation):
            raise OSError(f"could not write {paths['segmentation'].name}")
        rois = outcome.box_nodes
        write_boxes_file([rois[v] for v in sorted(rois)], paths["boxes"], scratch)
        writers.table_to_csv(outcome.table_node, paths["measurements"])
    finally:
        mrml.Clear(1)
        del app_logic
    return outcome


def segment_volume_to_folder(
    volume: Volume,
    k: Optional[int],
    out_dir: str | os.PathLike,
    segmenter: Any,
    *,
    level: str = "",
    threshold_method: Any = "auto",
    name: Optional[str] = None,
    validated: bool = False,
) -> SegmentOutputs:
    """Segment slice ``k`` of ``volume`` with a loaded ``SliceSegmenter`` and write the five outputs.

    ``k=None`` is allowed for single-slice volumes. Files are named after ``name`` (default: the
    volume's name). Raises :class:`InputError` for unusable input; nothing is written then.
    ``validated``: the caller already ran :func:`check_slice` on slice ``k`` (the content is checked once).
    """
    from .overlay import save_overlay
    from .preprocessing import slice_geometry_from_volume

    t0 = time.perf_counter()
    k = resolve_slice(volume, k)  # the content is checked by the scene workflow (or was by the caller)
    level = (level or "").strip()
    name = name or volume.name
    out = Path(out_dir)

    with tempfile.TemporaryDirectory(prefix="paraspinalseg-") as tmp:
        tmp_path = Path(tmp)
        staged = output_paths(tmp_path, name)
        scratch = tmp_path / "scratch"
        scratch.mkdir()
        outcome = _segment_in_headless_scene(volume, k, segmenter, level, threshold_method, staged, scratch, validated)
        result = outcome.result
        t_write = time.perf_counter()
        labels = np.zeros(volume.array.shape, np.uint8)
        labels[k] = result.labels
        write_label_volume(labels, volume, staged["labels"])
        title = f"{name}\nslice {k}" + (f", {level}" if level else "")
        save_overlay(staged["overlay"], volume.array[k], result.labels, slice_geometry_from_volume(volume.ijk_to_ras, k),
                     result.boxes, title=title)
        # Every output exists: only now touch the output folder.
        out.mkdir(parents=True, exist_ok=True)
        final = output_paths(out, name)
        for key, src in staged.items():
            shutil.move(str(src), str(final[key]))  # a rename when on the same file system
    t_end = time.perf_counter()
    return SegmentOutputs(
        volume_name=name,
        slice_index=k,
        level=level,
        out_dir=out.resolve(),
        files=final,
        found=list(result.found),
        missing=list(result.missing),
        device=str(result.device),
        model_version=str(result.model_version),
        seconds={
            "network": outcome.seconds["segment"],
            "write": outcome.seconds["measure"] + outcome.seconds["write"] + t_end - t_write,
            "total": t_end - t0,
        },
    )


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
) -> SegmentOutputs:
    """``paraspinalseg segment``: read the volume, check the slice, load the model, write the outputs.

    The volume and slice are checked before the (slow) model load, so bad input fails at once.
    """
    t0 = time.perf_counter()
    if not str(volume_path).strip():
        raise InputError("no volume given")
    volume = read_volume(volume_path)
    k = resolve_slice(volume, k)
    check_slice(volume, k)
    t_load = time.perf_counter()
    if segmenter is None:
        segmenter = load_segmenter(weights, device, threads, mirror_tta)
    load_s = time.perf_counter() - t_load
    outputs = segment_volume_to_folder(
        volume, k, out_dir, segmenter, level=level, threshold_method=threshold_method, validated=True
    )
    outputs.seconds["model_load"] = load_s
    outputs.seconds["total"] = time.perf_counter() - t0
    return outputs


# ----------------------------------------------------------------------------------------------------
# Many slices


@dataclass
class BatchItem:
    """One row of a batch list."""

    row: int
    volume: str
    slice_index: Optional[int]
    level: str = ""
    #: Why the row cannot be run at all (bad slice text), found while reading the list.
    problem: str = ""


@dataclass
class BatchSummary:
    """What :func:`run_batch` did."""

    out_dir: Path
    succeeded: list[SegmentOutputs]
    failed: list[tuple[BatchItem, str]]
    measurements_csv: Optional[Path]
    errors_csv: Path
    seconds: float
    model_load_seconds: float = 0.0

    def describe(self) -> str:
        n = len(self.succeeded) + len(self.failed)
        lines = [f"{len(self.succeeded)} of {n} rows segmented, {len(self.failed)} failed; outputs in {self.out_dir}"]
        if self.measurements_csv is not None:
            lines.append(f"  combined table: {self.measurements_csv.name}")
        if self.failed:
            lines.append(f"  failed rows and reasons: {self.errors_csv.name}")
        per = [o.seconds.get("total", 0.0) for o in self.succeeded]
        device = self.succeeded[0].device if self.succeeded else "-"
        timing = f"device {device}; {self.seconds:.2f} s in all (model load {self.model_load_seconds:.2f} s"
        if per:
            # The first slice also pays for loading VTK/MRML; the ones after it show the steady rate.
            timing += f", first slice {per[0]:.2f} s"
            if len(per) > 1:
                timing += f", then {np.mean(per[1:]):.2f} s per slice"
        lines.append(timing + ")")
        return "\n".join(lines)


_HEADER_WORDS = {"volume", "path", "file", "image", "volume_path", "filename"}
_SLICE_WORDS = {"slice", "k", "slice_index", "index"}


def read_batch_list(path: str | os.PathLike) -> list[BatchItem]:
    """Rows of a batch CSV: ``volume path, slice, level`` (header optional; ``#`` lines and blanks skipped).

    Relative volume paths are taken relative to the CSV's folder. A blank slice means "single-slice
    volume". A slice that is not a whole number is recorded as the row's problem (the run goes on).
    """
    p = Path(path)
    if not p.is_file():
        raise InputError(f"no such batch list: {p}")
    try:
        text = p.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read batch list {p}: {exc}") from None
    try:
        dialect = csv.Sniffer().sniff(text[:4096], delimiters=",;\t")
    except csv.Error:
        dialect = csv.excel
    items: list[BatchItem] = []
    first = True
    for line_no, cells in enumerate(csv.reader(text.splitlines(), dialect), start=1):
        cells = [c.strip() for c in cells]
        if not cells or not any(cells) or cells[0].startswith("#"):
            continue
        if first:
            first = False
            if _is_header(cells):
                continue
        volume = cells[0]
        if volume and not os.path.isabs(volume):
            volume = str((p.parent / volume))
        slice_text = cells[1] if len(cells) > 1 else ""
        level = cells[2] if len(cells) > 2 else ""
        item = BatchItem(row=line_no, volume=volume, slice_index=None, level=level)
        if slice_text:
            try:
                item.slice_index = int(slice_text)
            except ValueError:
                item.problem = f"slice {slice_text!r} is not a whole number"
        if not volume:
            item.problem = "no volume path"
        items.append(item)
    if not items:
        raise InputError(f"batch list {p} has no rows (expected: volume path, slice, level)")
    return items


def _is_header(cells: Sequence[str]) -> bool:
    """A first row like ``volume,slice,level`` (column names, no slice number)."""
    first = cells[0].lower()
    second = cells[1].lower() if len(cells) > 1 else ""
    return first in _HEADER_WORDS or second in _SLICE_WORDS


def _item_folder_name(item: BatchItem, volume_name: str, used: set[str]) -> str:
    base = f"{volume_name}_slice{item.slice_index}" if item.slice_index is not None else volume_name
    name, n = base, 2
    while name in used:
        name, n = f"{base}_{n}", n + 1
    used.add(name)
    return name


def run_batch(
    items: Iterable[BatchItem],
    out_dir: str | os.PathLike,
    segmenter: Any,
    *,
    threshold_method: Any = "auto",
    progress: bool = True,
) -> BatchSummary:
    """Segment every row with one loaded ``segmenter``; bad rows go to ``errors.csv``, the run goes on.

    Each row's outputs go into their own subfolder ``<volume>_slice<K>`` of ``out_dir``; the rows of all
    per-row measurement tables are joined into ``out_dir/measurements.csv``.
    """
    from tqdm import tqdm

    t0 = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    items = list(items)
    succeeded: list[SegmentOutputs] = []
    failed: list[tuple[BatchItem, str]] = []
    used: set[str] = set()
    cached: tuple[str, Optional[Volume]] = ("", None)  # consecutive rows often share a volume
    for item in tqdm(items, desc="segmenting", unit="slice", disable=not progress, leave=False):
        try:
            if item.problem:
                raise InputError(item.problem)
            if cached[0] != item.volume or cached[1] is None:
                cached = (item.volume, None)
                cached = (item.volume, read_volume(item.volume))
            volume = cached[1]
            assert volume is not None
            folder = out / _item_folder_name(item, volume.name, used)
            succeeded.append(
                segment_volume_to_folder(volume, item.slice_index, folder, segmenter, level=item.level,
                                         threshold_method=threshold_method)
            )
        except KeyboardInterrupt:
            raise
        except Exception as exc:  # noqa: BLE001 - a bad row must not stop the batch; the reason is recorded
            reason = " ".join(str(exc).split()) or type(exc).__name__
            if not isinstance(exc, (InputError, ValueError, OSError)):
                reason = f"{type(exc).__name__}: {reason}"
            failed.append((item, reason))

    errors_csv = out / ERRORS_CSV
    with open(errors_csv, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(ERROR_COLUMNS)
        for item, reason in failed:
            writer.writerow([item.row, item.volume, "" if item.slice_index is None else item.slice_index,
                             item.level, reason])
    measurements_csv = _combine_tables([o.files["measurements"] for o in succeeded], out / COMBINED_MEASUREMENTS)
    return BatchSummary(out.resolve(), succeeded, failed, measurements_csv, errors_csv, time.perf_counter() - t0)


def _combine_tables(paths: Sequence[Path], target: Path) -> Optional[Path]:
    """Join per-row measurement CSVs (same columns) into one file; None when there is nothing to join."""
    if not paths:
        return None
    header: Optional[list[str]] = None
    rows: list[list[str]] = []
    for p in paths:
        with open(p, newline="", encoding="utf-8") as f:
            reader = csv.reader(f)
            head = next(reader)
            if header is None:
                header = head
            elif head != header:
                raise OSError(f"{p} has different columns from the other measurement tables")
            rows.extend(reader)
    with open(target, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return target


def run_batch_file(
    list_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    weights: Optional[str] = None,
    device: str = "auto",
    threshold_method: Any = "auto",
    progress: bool = True,
    threads: Optional[int] = None,
    mirror_tta: bool = True,
) -> BatchSummary:
    """``paraspinalseg batch``: read the list, load the model once, run every row."""
    items = read_batch_list(list_path)
    t0 = time.perf_counter()
    segmenter = load_segmenter(weights, device, threads, mirror_tta)
    load_s = time.perf_counter() - t0
    summary = run_batch(items, out_dir, segmenter, threshold_method=threshold_method, progress=progress)
    summary.model_load_seconds = load_s
    summary.seconds += load_s
    return summary
