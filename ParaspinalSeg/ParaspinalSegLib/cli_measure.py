"""``paraspinalseg measure VOLUME SEGMENTATION [--slice K] [--method auto|otsu|VALUE] --out CSV``.

Measures an existing segmentation (a label image on the volume's grid, or a Slicer ``.seg.nrrd``, e.g. one
drawn by hand) without running the network, with the same functions the Slicer table uses
(:func:`measurements.measure_slice`, :func:`measurements.asymmetry`), so manual and automatic
segmentations are measured the same way. ``cli.py`` calls :func:`register`; :func:`run` does the work.

Slices are ITK slices ``k`` (the third image index, ``arr[k]`` of SimpleITK's array); pixel spacing comes
from the volume header. A segmentation whose grid differs from the volume's (e.g. a ``.seg.nrrd`` cropped
to its extent) is resampled onto the volume's grid with nearest-neighbour interpolation; one whose labels
reach outside the volume is refused (:func:`segfile.check_inside`). Every measured slice first passes
``segment``'s own checks (:func:`slice_outputs.check_slice_content`: not constant, finite, axial).
The CSV has the columns of ``segment``'s ``<name>_measurements.csv`` (so the two concatenate), then pixel
count, mean and SD intensity and the segmentation file. Needs SimpleITK and numpy only.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from . import anatomy, segfile
from .errors import InputError, ParaspinalSegError
from .outputs import StagedOutputs, check_no_existing
from .measurements import asymmetry, measure_slice
from .scene import CSV_COLUMNS as TABLE_CSV_COLUMNS
from .scene import Column, rows_to_csv
from .validation import check_slice_index, parse_threshold_method

#: What ``measure`` adds after the measurement table's own columns (:data:`scene.CSV_COLUMNS`).
EXTRA_COLUMNS: tuple[Column, ...] = (
    Column("pixel_count", "Pixel count", "int", "", "Pixel count", "Pixels of the structure on the slice"),
    Column("mean_intensity", "Mean intensity", "double", "", "Mean intensity", "Mean image value inside the structure"),
    Column("sd_intensity", "SD intensity", "double", "", "SD intensity", "Standard deviation of the image values inside the structure"),
    Column("segmentation", "Segmentation", "string", "", "Segmentation file", "The segmentation that was measured"),
)
CSV_COLUMNS: tuple[Column, ...] = TABLE_CSV_COLUMNS + EXTRA_COLUMNS


class MeasureError(InputError):
    """A problem with the inputs of ``paraspinalseg measure`` (shown to the user without a traceback)."""


def register(subparsers: "argparse._SubParsersAction") -> argparse.ArgumentParser:
    """Add the ``measure`` sub-command to ``subparsers``; sets ``func=run`` on the parsed namespace."""
    p = subparsers.add_parser(
        "measure",
        help="measure CSA / fat %% of an existing segmentation (no network)",
        description="Measure CSA, functional CSA, fat % and left/right asymmetry of an existing "
        "segmentation (label image on the volume's grid, or Slicer .seg.nrrd).",
    )
    p.add_argument("volume", help="image volume (NIfTI, NRRD, anything SimpleITK reads)")
    p.add_argument("segmentation", help="label image (values as in the label table) or .seg.nrrd")
    p.add_argument("--slice", type=int, default=None, dest="slice",
                   help="slice index k (ITK index along the third axis); default: every slice with labels")
    p.add_argument("--level", default="", help="spinal level written in the Level column, e.g. L4/L5")
    p.add_argument("--method", default="auto",
                   help="fat threshold: auto (default), otsu, otsu-region, or a number (manual threshold)")
    p.add_argument("--out", required=True,
                   help="CSV to write (asymmetry goes to <stem>_asymmetry.csv next to it)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the CSVs if they exist (default: refuse, write nothing)")
    from . import dixon

    dixon.add_arguments(p)
    p.set_defaults(func=run)
    return p


def read_segmentation(path: Path, volume: Any) -> tuple[np.ndarray, list[str]]:
    """Label array (k, j, i) on the volume's grid with label-table values, plus notes for the user.

    :func:`segfile.read_segmentation` does the reading; segments it cannot map are skipped with a note.
    """
    try:
        read = segfile.read_segmentation(path, volume)
    except InputError as exc:
        raise MeasureError(str(exc)) from None
    notes = [
        f"segment {entry.id or entry.index!r} ({entry.name}) is not one of the nine structures: skipped"
        for entry in read.unmatched
    ]
    return read.labels, notes


#: More distinct values outside the label table than this: an image, not a label map.
MAX_UNKNOWN_LABELS = 8


def _check_label_map(labels: np.ndarray, name: str) -> list[str]:
    """Refuse a "label map" with many values outside the label table; note a few (they are ignored)."""
    values = np.unique(labels)
    unknown = [int(v) for v in values if int(v) not in anatomy.BY_VALUE and int(v) not in (0, 255)]
    if len(unknown) > MAX_UNKNOWN_LABELS:
        raise MeasureError(
            f"{name} is not a label map of the label table: it holds {len(unknown)} values outside it "
            f"({', '.join(map(str, unknown[:5]))}, …); is it the image rather than its segmentation?"
        )
    return [f"{name}: label values {', '.join(map(str, unknown))} are not in the label table: ignored"] if unknown else []


def measure_files(
    volume_path: Path, segmentation_path: Path, slice_index: Optional[int] = None, method: Any = "auto", level: str = "",
    dixon: Any = None,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[str]]:
    """Measurement rows (fields of :data:`CSV_COLUMNS`) and asymmetry rows for one volume + segmentation.

    ``dixon``: a :class:`~ParaspinalSegLib.dixon.DixonSource` for the Dixon fat-fraction column."""
    from .scene import slice_position_mm
    from .preprocessing import pixel_spacing, slice_geometry_from_volume
    from .qc import run_checks, with_qc
    from .slice_outputs import check_slice_content
    from .volume_io import check_slice_geometry, itk_image_like, read_volume, volume_name

    # The same reader as `segment`: NIfTI/NRRD/DICOM folders, scalar 2-D/3-D volumes, clear errors.
    volume = read_volume(volume_path)
    notes = list(check_slice_geometry(volume))  # refuses impossible geometry, warns about unusual
    labels, seg_notes = read_segmentation(segmentation_path, itk_image_like(volume.array, volume))
    notes += seg_notes
    notes += _check_label_map(labels, Path(segmentation_path).name)
    image = volume.array.astype(np.float64)  # (k, j, i)
    if labels.ndim == 2:
        labels = labels[None]
    if labels.shape != image.shape:
        raise MeasureError(f"segmentation {labels.shape} and volume {image.shape} differ after resampling")
    # Axis 0 of a slice is j, axis 1 is i: the same spacing the Slicer table and `segment` use.
    spacing = pixel_spacing(slice_geometry_from_volume(volume.ijk_to_ras, 0))

    if slice_index is not None:
        ks = [check_slice_index(slice_index, image.shape[0], volume.name)]
    else:
        ks = [k for k in range(image.shape[0]) if np.isin(labels[k], list(anatomy.BY_VALUE)).any()]
        if not ks:  # a CSV of headers only would read as "measured, nothing there"
            raise MeasureError(f"{Path(segmentation_path).name} has none of the nine structures on any slice of "
                               f"{volume.name}: nothing to measure")

    bad = ~np.isfinite(image)
    if bad.any():
        slices = sorted({int(k) for k in np.nonzero(bad)[0]})
        raise MeasureError(
            f"{volume.name} has {int(bad.sum())} NaN or infinite voxels (slices {', '.join(map(str, slices[:5]))}"
            f"{', …' if len(slices) > 5 else ''}): fat thresholds and intensities cannot be measured; fix the file"
        )
    for k in ks:  # `segment`'s checks of each slice (the volume's geometry was checked above), before any is measured
        check_slice_content(volume, k)
    rows: list[dict[str, Any]] = []
    asym_rows: list[dict[str, Any]] = []
    for k in ks:
        geometry = slice_geometry_from_volume(volume.ijk_to_ras, k)
        try:
            fraction = None if dixon is None else dixon.fraction_map(image[k].shape, geometry, labels[k]).fraction
        except InputError as exc:
            raise MeasureError(f"slice {k}: {exc}") from None
        # A segmentation from a file has no probabilities or detector boxes: layout, shape and image checks.
        recs = with_qc(measure_slice(image[k], labels[k], spacing, method, fat_fraction=fraction),
                       run_checks(labels[k], image[k], geometry))
        for r in recs:
            rows.append(
                {
                    "volume": volume_name(volume_path),
                    "slice": k,
                    "position_mm": slice_position_mm(geometry),
                    "dixon_fat_fraction_percent": r.dixon_fat_fraction_percent,
                    "level": level,
                    "structure": r.name,
                    "segment_id": r.key,
                    "found": r.found,
                    "csa_mm2": r.csa_mm2,
                    "functional_csa_mm2": r.functional_csa_mm2,
                    "fat_percent": r.fat_percent,
                    "threshold": r.threshold,
                    "method": r.method,
                    "stenosis_grade": r.stenosis_grade or "",
                    "qc": r.qc,
                    "model_version": "",  # a segmentation from a file: which model (if any) drew it is unknown
                    "pixel_count": r.pixel_count,
                    "mean_intensity": r.mean_intensity,
                    "sd_intensity": r.sd_intensity,
                    "segmentation": str(segmentation_path),
                }
            )
        for a in asymmetry(recs):
            asym_rows.append({"volume": volume_name(volume_path), "slice": k, **a.to_row()})
    return rows, asym_rows, notes


def _write_csv(path: Path, rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> None:
    with path.open("w", newline="", encoding="utf-8") as fh:
        wr = csv.DictWriter(fh, fieldnames=list(columns))
        wr.writeheader()
        for row in rows:
            # None → empty cell: "not found" must not read as 0.
            wr.writerow({c: ("" if row.get(c) is None else (repr(row[c]) if isinstance(row[c], float) else row[c])) for c in columns})


def asymmetry_path(out: Path) -> Path:
    """Where ``run`` writes the asymmetry rows for measurement CSV ``out``."""
    return out.with_name(out.stem + "_asymmetry" + (out.suffix or ".csv"))


def run(args: argparse.Namespace) -> int:
    """Run ``measure`` for parsed arguments; returns the process exit status (0 ok, 2 input error).

    Both CSVs are staged next to ``--out`` and appear together (:class:`outputs.StagedOutputs`); existing
    ones are refused before anything is measured unless ``--overwrite``.
    """
    out = Path(args.out)
    targets = [out, asymmetry_path(out)]
    try:
        from .dixon import source_from_args

        if out.is_dir():
            raise MeasureError(f"--out {out} is a folder; give the CSV file to write")
        if not args.overwrite:
            check_no_existing(targets)
        method = parse_threshold_method(args.method)
        rows, asym_rows, notes = measure_files(args.volume, args.segmentation, args.slice, method, args.level,
                                               source_from_args(args))
    except ParaspinalSegError as exc:  # MeasureError, the volume reader's errors, existing outputs
        print(f"paraspinalseg measure: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    for n in notes:
        print(f"paraspinalseg measure: note: {n}", file=sys.stderr)
    asym_cols = ["volume", "slice"] + (list(asym_rows[0].keys())[2:] if asym_rows else [])
    with StagedOutputs(out.parent, overwrite=args.overwrite) as stage:
        rows_to_csv(rows, stage.path(out.name), EXTRA_COLUMNS)
        _write_csv(stage.path(targets[1].name), asym_rows, asym_cols)
        stage.commit()
    found = sum(1 for r in rows if r["found"])
    print(f"measured {len(set(r['slice'] for r in rows))} slice(s), {found} structure(s) found → {args.out}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Stand-alone entry point (``python -m ParaspinalSegLib.cli_measure measure …``)."""
    parser = argparse.ArgumentParser(prog="paraspinalseg")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
