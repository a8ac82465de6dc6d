"""Scene writers: the segmentation, ROI boxes and measurement table ParaspinalSeg puts into an MRML scene.

One module per writer (conventions and shared helpers in :mod:`scene_nodes`):

- :mod:`scene_segmentation`: the nine segments, written and read one slice at a time;
- :mod:`scene_boxes`: one ROI box per structure;
- :mod:`scene_table`: the measurement table and its CSV export.

This module gathers their public names, so callers keep writing ``scene.write_slice_labels(...)``,
``scene.write_boxes(...)``, ``scene.write_measurement_rows(...)``. Patch a writer's internals in its own
module (e.g. ``scene_boxes.box_geometry``), not here.
"""

from __future__ import annotations

from .scene_nodes import (
    ROLE_ATTRIBUTE,
    STRUCTURE_ATTRIBUTE,
    SLICE_ATTRIBUTE,
    VOLUME_ID_ATTRIBUTE,
    VOLUME_REFERENCE_ROLE,
    ROLE_SEGMENTATION,
    ROLE_BOX,
    ROLE_BOX_FOLDER,
    ROLE_MEASUREMENTS,
    DEFAULT_TABLE_NAME,
    remove_node,
    volume_ijk_to_ras,
    validate_volume,
)
from .scene_segmentation import (
    ensure_segments,
    find_segmentation,
    get_or_create_segmentation,
    WriteReport,
    write_slice_labels,
    undo_slice_write,
    read_slice_labels,
)
from .scene_boxes import (
    BoxGeometry,
    box_geometry,
    find_boxes,
    write_boxes,
    set_boxes_visible,
)
from .scene_table import (
    Column,
    COLUMNS,
    COLUMN_BY_FIELD,
    CSV_COLUMNS,
    find_measurement_table,
    get_or_create_measurement_table,
    rows_from_table,
    write_measurement_rows,
    slice_position_mm,
    row_of_volume,
    csv_header,
    rows_to_csv,
    table_to_csv,
)
from .errors import SceneWriteError  # raised by every writer

__all__ = [
    "ROLE_ATTRIBUTE",
    "STRUCTURE_ATTRIBUTE",
    "SLICE_ATTRIBUTE",
    "VOLUME_ID_ATTRIBUTE",
    "VOLUME_REFERENCE_ROLE",
    "ROLE_SEGMENTATION",
    "ROLE_BOX",
    "ROLE_BOX_FOLDER",
    "ROLE_MEASUREMENTS",
    "DEFAULT_TABLE_NAME",
    "remove_node",
    "volume_ijk_to_ras",
    "validate_volume",
    "ensure_segments",
    "find_segmentation",
    "get_or_create_segmentation",
    "WriteReport",
    "write_slice_labels",
    "undo_slice_write",
    "read_slice_labels",
    "BoxGeometry",
    "box_geometry",
    "find_boxes",
    "write_boxes",
    "set_boxes_visible",
    "Column",
    "COLUMNS",
    "COLUMN_BY_FIELD",
    "CSV_COLUMNS",
    "find_measurement_table",
    "get_or_create_measurement_table",
    "rows_from_table",
    "write_measurement_rows",
    "slice_position_mm",
    "row_of_volume",
    "csv_header",
    "rows_to_csv",
    "table_to_csv",
    "SceneWriteError",
]
