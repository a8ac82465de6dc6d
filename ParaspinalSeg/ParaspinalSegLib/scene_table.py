"""The measurement table writer: one table node with one row per (volume, slice, structure), columns with
units, titles and descriptions, and its CSV export. Conventions: :mod:`scene_nodes`.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from . import anatomy
from .errors import SceneWriteError
from .scene_nodes import (
    ROLE_ATTRIBUTE,
    ROLE_MEASUREMENTS,
    DEFAULT_TABLE_NAME,
    remove_node,
    _nodes_by_class,
    _sh_item,
)


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
           "Canal row only: normal (CSA >= 100 mm2), relative (75 mm2 <= CSA < 100 mm2) or absolute (< 75 mm2) stenosis "
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
