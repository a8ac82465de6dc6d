"""The per-structure CSA range of the training labels, which the QC's area check compares against.

``python -m training.area_ranges --data DIR [DIR ...]`` prints ``qc.TRAINING_AREA_RANGE_MM2`` as a Python
literal to paste into ``ParaspinalSegLib/qc.py``: per structure the smallest and largest CSA (pixels ×
pixel area, mm²) over every slice that TRUSTS that structure (manual labels, or derived labels a person
accepted; 255 and untrusted values never count) and shows it at all. Give it the data the model was
trained on (e.g. the derived sy source and myosegmentum_lpm for the nine-class model).
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

import numpy as np

from ParaspinalSegLib.anatomy import BY_VALUE

from .data import SliceRecord, load_sources


def trusted_areas(records: Sequence[SliceRecord]) -> dict[int, list[float]]:
    """``{value: [CSA mm², ...]}`` of each structure on every slice that trusts it and shows it."""
    areas: dict[int, list[float]] = {}
    for r in records:
        pixel_area = float(np.prod(np.linalg.norm(np.asarray(r.slice_ijk_to_ras, float)[:3, :2], axis=0)))
        for v in r.trusted_structures:
            n = int(np.count_nonzero(r.labels == v))
            if n:  # a trusted structure absent from the slice says nothing about its size
                areas.setdefault(v, []).append(n * pixel_area)
    return dict(sorted(areas.items()))


def training_area_ranges(records: Sequence[SliceRecord]) -> dict[int, tuple[float, float]]:
    """``{value: (min, max)}`` CSA in mm² of each structure over the slices that trust it and show it."""
    return {v: (min(a), max(a)) for v, a in trusted_areas(records).items()}


def format_ranges(ranges: dict[int, tuple[float, float]], counts: Optional[dict[int, int]] = None) -> str:
    """The ranges as the ``TRAINING_AREA_RANGE_MM2`` literal (whole mm², structure names as comments)."""
    lines = ["TRAINING_AREA_RANGE_MM2: dict[int, tuple[float, float]] = {"]
    for v, (lo, hi) in ranges.items():
        note = f", {counts[v]} slices" if counts else ""
        lines.append(f"    {v}: ({round(lo):.1f}, {round(hi):.1f}),  # {BY_VALUE[v].name}{note}")
    return "\n".join(lines + ["}"])


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.area_ranges", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", nargs="+", required=True, help="the training source folders")
    args = p.parse_args(argv)
    areas = trusted_areas(load_sources(args.data))
    print(format_ranges({v: (min(a), max(a)) for v, a in areas.items()}, {v: len(a) for v, a in areas.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
