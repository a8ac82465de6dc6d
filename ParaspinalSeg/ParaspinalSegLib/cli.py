"""The ``paraspinalseg`` command: segment a slice, batch-process many, measure, describe the model.

::

    paraspinalseg segment VOLUME [--slice K] [--level L4/L5] --out DIR
    paraspinalseg batch LIST.csv --out DIR
    paraspinalseg measure VOLUME SEGMENTATION --out CSV      (when cli_measure is available)
    paraspinalseg info [--weights W]

Errors the user can fix (bad input, bad weights, no CUDA) print one ``paraspinalseg: error: …`` line and
exit with status 2, leaving nothing written. Heavy modules (torch, VTK/MRML, SimpleITK) are imported only
by the code paths that need them, so ``--help`` and ``--version`` answer at once.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Optional, Sequence

from . import __version__
from .errors import ParaspinalSegError

PROG = "paraspinalseg"

#: Exit status for problems with the user's input (same as argparse uses for bad arguments).
EXIT_INPUT_ERROR = 2


def _threshold_method(text: str) -> Any:
    """argparse type of ``--threshold-method``: :func:`validation.parse_threshold_method`."""
    from .validation import parse_threshold_method

    try:
        return parse_threshold_method(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _add_model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--weights", default=None, metavar="W",
                   help="weights file (.json or .safetensors) written by the trainer; default: the shipped model")
    p.add_argument("--device", default="auto", choices=("cpu", "cuda", "auto"),
                   help="where the network runs (default: auto = CUDA when available, else CPU)")
    p.add_argument("--threshold-method", default="auto", type=_threshold_method, metavar="auto|otsu|VALUE",
                   help="fat threshold: auto (Gaussian mixture around the paraspinal muscles, default), otsu "
                   "(per muscle), otsu-region, or a number in image intensity units")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="CPU threads for the network (default: half the CPU cores, at least 1)")
    p.add_argument("--no-mirror-tta", dest="mirror_tta", action="store_false",
                   help="one network pass per slice instead of two (the slice and its mirror image, averaged): "
                   "about half the network time, slightly lower accuracy, no longer exactly left-right consistent")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every sub-command (``measure`` only when ``cli_measure`` imports)."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Segment paraspinal muscles and spine on an axial lumbar MRI slice (BS-ESNet) and "
        "measure cross-sectional area and fat %. Outputs open in 3D Slicer.",
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    seg = sub.add_parser(
        "segment",
        help="segment one slice of a volume and write segmentation, labels, boxes, table and overlay",
        description="Segment slice K of a NIfTI, NRRD or DICOM-folder volume. Writes into DIR: "
        "<name>.seg.nrrd, <name>_labels.nii.gz, <name>_boxes.mrk.json, <name>_measurements.csv and "
        "<name>_overlay.png. Nothing is written if anything fails.",
    )
    seg.add_argument("volume", metavar="VOLUME", help="NIfTI (.nii/.nii.gz), NRRD (.nrrd/.nhdr) file or DICOM series folder")
    seg.add_argument("--slice", type=int, default=None, metavar="K", dest="slice",
                     help="slice index k (0-based, the volume's third voxel index, as in Slicer); "
                     "optional for single-slice volumes")
    seg.add_argument("--level", default="", metavar="L",
                     help="spinal level written to the table, e.g. L4/L5 (free text, default blank)")
    seg.add_argument("--out", required=True, metavar="DIR", help="output folder (created if missing)")
    _add_model_options(seg)
    seg.set_defaults(func=_run_segment)

    bat = sub.add_parser(
        "batch",
        help="segment many volumes/slices listed in a CSV with one model load",
        description="Rows of LIST.csv: volume path, slice, level (header optional; paths relative to the "
        "CSV's folder; slice may be blank for single-slice volumes). Writes one subfolder per row, a "
        "combined measurements.csv and errors.csv (rows that failed, with the reason) into DIR.",
    )
    bat.add_argument("list", metavar="LIST.csv", help="CSV with rows: volume path, slice, level")
    bat.add_argument("--out", required=True, metavar="DIR", help="output folder (created if missing)")
    _add_model_options(bat)
    bat.add_argument("--no-progress", action="store_true", help="no progress bar")
    bat.set_defaults(func=_run_batch)

    try:
        from . import cli_measure
    except ImportError:  # the measure command is optional
        cli_measure = None
    if cli_measure is not None:
        cli_measure.register(sub)

    info = sub.add_parser("info", help="describe a weights file (model card summary)",
                          description="Print the model card summary of the shipped or given weights.")
    info.add_argument("--weights", default=None, metavar="W", help="weights file; default: the shipped model")
    info.set_defaults(func=_run_info)
    return parser


# ----------------------------------------------------------------------------------------------------
# Sub-commands


def _run_segment(args: argparse.Namespace) -> int:
    from . import batch

    out = batch.segment_file(
        args.volume,
        args.slice,
        args.out,
        level=args.level,
        weights=args.weights,
        device=args.device,
        threshold_method=args.threshold_method,
        threads=args.threads,
        mirror_tta=args.mirror_tta,
    )
    print(out.describe())
    return 0


def _run_batch(args: argparse.Namespace) -> int:
    from . import batch

    summary = batch.run_batch_file(
        args.list,
        args.out,
        weights=args.weights,
        device=args.device,
        threshold_method=args.threshold_method,
        progress=not args.no_progress,
        threads=args.threads,
        mirror_tta=args.mirror_tta,
    )
    print(summary.describe())
    # Bad rows are reported in errors.csv; the run counts as failed (bad input) only when no row worked.
    return 0 if summary.succeeded else EXIT_INPUT_ERROR


def _run_info(args: argparse.Namespace) -> int:
    from .weights import read_weights_config

    config = read_weights_config(args.weights)
    print(config.summary())
    print(f"weights file: {config.weights_path}")
    return 0


# ----------------------------------------------------------------------------------------------------


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``paraspinalseg`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_INPUT_ERROR
    try:
        return int(args.func(args) or 0)
    except ParaspinalSegError as exc:
        print(f"{PROG}: error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_INPUT_ERROR
    except OSError as exc:  # e.g. output folder not writable, disk full
        print(f"{PROG}: error: {_one_line(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
