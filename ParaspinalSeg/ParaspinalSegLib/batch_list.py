"""The list file of ``paraspinalseg batch``: one slice per row (volume path, slice, level, Dixon images).

Without a header, columns 4 and 5 are the water and fat images; with a header, columns are read by name,
and a filled column the header does not name is refused rather than silently ignored (README, "Cohort
use"). The Dixon pairing rule is :func:`dixon.pairing_problem`, the one the images are checked by.
"""

from __future__ import annotations

import csv
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from .dixon import pairing_problem
from .errors import InputError

@dataclass
class BatchItem:
    """One row of a batch list."""

    row: int
    volume: str
    slice_index: Optional[int]
    level: str = ""
    #: Why the row cannot be run at all (bad slice text), found while reading the list.
    problem: str = ""
    #: Dixon images of the row (paths; blank = none): water and fat, or a fat-fraction map.
    water_image: str = ""
    fat_image: str = ""
    fat_fraction_map: str = ""

    def dixon_paths(self) -> tuple[str, str, str]:
        return self.water_image, self.fat_image, self.fat_fraction_map


_HEADER_WORDS = {"volume", "path", "file", "image", "volume_path", "filename"}
_SLICE_WORDS = {"slice", "k", "slice_index", "index"}
#: Header names of the optional Dixon columns (without a header: columns 4 and 5 are water and fat).
_DIXON_COLUMNS = {"water_image": ("water", "water_image", "water image"), "fat_image": ("fat", "fat_image", "fat image"),
                  "fat_fraction_map": ("fat_fraction_map", "fat fraction map", "ff", "ff_map", "pdff")}


def read_batch_list(path: str | os.PathLike) -> list[BatchItem]:
    """Rows of a batch CSV: ``volume path, slice, level[, water, fat]`` (header optional; ``#`` lines and
    blanks skipped).

    Relative paths are taken relative to the CSV's folder. A blank slice means "single-slice volume". A
    slice that is not a whole number, or a water image without a fat image, is recorded as the row's
    problem (the run goes on). Dixon images per row: without a header, columns 4 and 5 (water, fat); with
    a header, the columns named ``water``/``water_image``, ``fat``/``fat_image`` and ``fat_fraction_map``
    (any order after the first three; other named columns are ignored). :class:`InputError` for a list
    whose header leaves a filled column unnamed or names a column almost like a Dixon one: ignoring it
    would silently drop images.
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
    dixon_index: dict[str, Optional[int]] = {"water_image": 3, "fat_image": 4}
    header: Optional[list[str]] = None

    def path_cell(cells: list[str], i: Optional[int]) -> str:
        text = cells[i] if i is not None and i < len(cells) else ""
        return os.path.abspath(p.parent / text) if text else text

    for line_no, cells in enumerate(csv.reader(text.splitlines(), dialect), start=1):
        cells = [c.strip() for c in cells]
        if not cells or not any(cells) or cells[0].startswith("#"):
            continue
        if first:
            first = False
            if _is_header(cells):
                header = cells
                dixon_index = _header_dixon_columns(cells, p)
                continue
        if header is not None:
            _refuse_unnamed_cells(cells, header, p, line_no)
        volume = cells[0]
        if volume:  # absolute, so a run is the same run whichever folder --resume is started from
            volume = os.path.abspath(p.parent / volume)
        slice_text = cells[1] if len(cells) > 1 else ""
        level = cells[2] if len(cells) > 2 else ""
        item = BatchItem(row=line_no, volume=volume, slice_index=None, level=level,
                         **{field: path_cell(cells, i) for field, i in dixon_index.items()})
        if slice_text:
            try:
                item.slice_index = int(slice_text)
            except ValueError:
                item.problem = f"slice {slice_text!r} is not a whole number"
        if not volume:
            item.problem = "no volume path"
        item.problem = item.problem or _dixon_problem(item, header is not None)
        items.append(item)
    if not items:
        raise InputError(f"batch list {p} has no rows (expected: volume path, slice, level)")
    return items


def _header_dixon_columns(cells: Sequence[str], p: Path) -> dict[str, Optional[int]]:
    """Where a header puts the Dixon columns (by name only). A name that looks like a Dixon column but is
    none of the known ones (``water_path``, ``fat_img``) is refused: ignoring it would drop its images."""
    names = [c.lower() for c in cells]
    known = {w for words in _DIXON_COLUMNS.values() for w in words}
    for n, name in enumerate(names[3:], start=4):
        words = set(re.split(r"[^a-z0-9]+", name))
        dixonish = words & {"water", "fat", "ff", "pdff", "fraction"} or name.startswith("water")
        # ... and says it holds a file: "fat_grade" or "fat_infiltration" are a table's own metadata columns.
        if name not in known and dixonish and words & {"image", "img", "path", "file", "map", "nii", "nrrd", "series"}:
            raise InputError(
                f"batch list {p}: column {n} is headed {cells[n - 1]!r}, not a Dixon column name; name the Dixon "
                "columns water, fat or fat_fraction_map (or rename this one)"
            )
    return {field: next((i for i, n in enumerate(names) if n in words), None) for field, words in _DIXON_COLUMNS.items()}


def _refuse_unnamed_cells(cells: Sequence[str], header: Sequence[str], p: Path, line_no: int) -> None:
    """With a header, columns are read by name: a value in a column the header does not name would be
    silently ignored (a water image in column 4 under ``volume,slice,level``), so the list is refused. A blank
    header cell names nothing either (spreadsheets write ``volume,slice,level,,`` above wider rows)."""
    extra = next((n for n in range(3, len(cells)) if cells[n] and (n >= len(header) or not header[n].strip())), None)
    if extra is not None:
        raise InputError(
            f"batch list {p}, line {line_no}: column {extra + 1} ({cells[extra]!r}) has no name in the header "
            f"({','.join(header)}); with a header, Dixon images go in columns named water and fat (or "
            "fat_fraction_map); without a header, columns 4 and 5 are water and fat"
        )


def _dixon_problem(item: BatchItem, headed: bool) -> str:
    """Why a row's Dixon images cannot be used (a water image without a fat image, ...); blank if they can."""
    return pairing_problem(*(bool(path) for path in item.dixon_paths()),
                           where="columns water and fat" if headed else "columns 4 and 5")


def _is_header(cells: Sequence[str]) -> bool:
    """A first row like ``volume,slice,level`` (column names, no slice number)."""
    first = cells[0].lower()
    second = cells[1].lower() if len(cells) > 1 else ""
    return first in _HEADER_WORDS or second in _SLICE_WORDS
