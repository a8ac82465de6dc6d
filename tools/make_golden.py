#!/usr/bin/env python
"""Regenerate the golden reference of the shipped model: the shipped sample slice segmented with the shipped
weights by ``paraspinalseg segment`` (CPU, the defaults), stored as a label map and the measurement table.

``ParaspinalSeg/Testing/Python/test_golden.py`` segments the sample again and compares against these files,
so any change to pre-/post-processing, the network or the measurements that moves a result shows up. When a
change moves the result on purpose (e.g. new resampling, new weights), rerun this command in the same commit
and say in the commit message why the reference moved.

The sample is redistributable (``ParaspinalSeg/Resources/Sample/README.md``), so are these derived files.

Usage::

    python tools/make_golden.py            # rewrite ParaspinalSeg/Testing/Python/golden/
    python tools/make_golden.py --check    # only compare (what the test does), exit 1 on a difference
"""

from __future__ import annotations

import argparse
import csv
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "ParaspinalSeg" / "Resources" / "Sample" / "TUM01_sample_inphase.nrrd"
GOLDEN_DIR = REPO / "ParaspinalSeg" / "Testing" / "Python" / "golden"
LABELS_FILE = "sample_labels.npz"
TABLE_FILE = "sample_measurements.csv"

#: Tolerances of the comparison, per structure (CPU builds and BLAS libraries may flip a boundary pixel).
#: Pixels whose label differs, as a share of the structure's reference area (at least MIN_PIXELS allowed).
MAX_CHANGED_FRACTION = 0.01
MIN_PIXELS = 3
#: Relative tolerance of CSA, functional CSA and threshold; absolute tolerance of fat % (points).
AREA_RTOL = 0.01
FAT_ATOL = 0.5


def segment_sample(out_dir: Path) -> tuple[np.ndarray, Path]:
    """Run ``paraspinalseg segment`` on the sample (shipped weights, CPU); return the slice's labels and the table."""
    sys.path.insert(0, str(REPO / "ParaspinalSeg"))
    from ParaspinalSegLib import batch

    out = batch.segment_file(SAMPLE, None, out_dir, device="cpu", threads=1)
    import SimpleITK as sitk

    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(out.files["labels"])))
    return labels[out.slice_index].astype(np.uint8), out.files["measurements"]


def read_table(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _close(a: str, b: str, rtol: float = 0.0, atol: float = 0.0) -> bool:
    if a == "" or b == "":
        return a == b
    return abs(float(a) - float(b)) <= atol + rtol * abs(float(b))


def compare(labels: np.ndarray, table: list[dict[str, str]], golden_dir: Path = GOLDEN_DIR) -> list[str]:
    """Differences from the stored reference beyond the tolerances above (empty: the result holds)."""
    sys.path.insert(0, str(REPO / "ParaspinalSeg"))
    from ParaspinalSegLib import anatomy

    ref = np.load(golden_dir / LABELS_FILE)["labels"]
    if ref.shape != labels.shape:
        return [f"label map shape {labels.shape} != reference {ref.shape}"]
    problems = []
    for s in anatomy.STRUCTURES:
        a, b = labels == s.value, ref == s.value
        changed = int(np.count_nonzero(a != b))
        allowed = max(MIN_PIXELS, MAX_CHANGED_FRACTION * int(b.sum()))
        if changed > allowed:
            problems.append(f"{s.name}: {changed} pixels changed (reference area {int(b.sum())}, allowed {allowed:.0f})")
    ref_rows = {r["Segment ID"]: r for r in read_table(golden_dir / TABLE_FILE)}
    rows = {r["Segment ID"]: r for r in table}
    if set(rows) != set(ref_rows):
        return problems + [f"table rows {sorted(rows)} != reference {sorted(ref_rows)}"]
    for key, r in rows.items():
        g = ref_rows[key]
        # The canal's grade and the quality-control verdict are what a user reads first: exact.
        for column in ("Found", "Method", "Stenosis grade", "QC"):
            if r[column] != g[column]:
                problems.append(f"{key} {column}: {r[column]!r} != reference {g[column]!r}")
        for column in ("CSA (mm2)", "Functional CSA (mm2)", "Threshold"):
            if not _close(r[column], g[column], rtol=AREA_RTOL):
                problems.append(f"{key} {column}: {r[column]} != reference {g[column]} (±{100 * AREA_RTOL:g} %)")
        if not _close(r["Fat (%)"], g["Fat (%)"], atol=FAT_ATOL):
            problems.append(f"{key} fat %: {r['Fat (%)']} != reference {g['Fat (%)']} (±{FAT_ATOL} points)")
    return problems


def main(argv: Any = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="compare with the stored reference instead of rewriting it")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        labels, table_path = segment_sample(Path(tmp))
        if args.check:
            problems = compare(labels, read_table(table_path))
            print("\n".join(problems) or "golden reference holds")
            return 1 if problems else 0
        GOLDEN_DIR.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(GOLDEN_DIR / LABELS_FILE, labels=labels)
        shutil.copyfile(table_path, GOLDEN_DIR / TABLE_FILE)
    print(f"wrote {GOLDEN_DIR / LABELS_FILE} and {GOLDEN_DIR / TABLE_FILE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
