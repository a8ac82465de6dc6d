"""The ``paraspinalseg`` command: segment a slice, batch-process many, measure, describe the model.

::

    paraspinalseg segment VOLUME [--slice K] [--level L4/L5] --out DIR
    paraspinalseg batch LIST.csv --out DIR
    paraspinalseg measure VOLUME SEGMENTATION --out CSV      (when cli_measure is available)
    paraspinalseg info [--weights W]

Every failure prints one ``paraspinalseg: …`` line (no traceback) and leaves no new file. Exit status
(:data:`EXIT_CODES`, README "What happens when things go wrong"): 0 done; 1 the file system failed
(disk full, no permission); 2 bad input, arguments or weights, or outputs that exist without
``--overwrite``; 3 the output folder is locked by another run; 70 an internal error (a bug: set
``PARASPINALSEG_DEBUG=1`` for the traceback); 130 / 143 / 129 interrupted by SIGINT (Ctrl-C) / SIGTERM /
SIGHUP. Heavy modules (torch, VTK/MRML, SimpleITK) are imported only by the code paths that need them,
so ``--help`` and ``--version`` answer at once and bad input fails before torch loads; a signal that
arrives during any import is held back to the next safe point (an interrupt half-way through a C
extension's import used to crash the process).
"""

from __future__ import annotations

import argparse
import typing
import os
import sys
from typing import Any, Optional, Sequence

from . import __version__, interrupts
from .errors import InputError, Interrupted, OutputFolderLockedError, ParaspinalSegError

PROG = "paraspinalseg"

EXIT_OK = 0
#: Reading or writing files failed (disk full, permission denied); nothing new is left.
EXIT_IO_ERROR = 1
#: Problems with the user's input (same as argparse uses for bad arguments), existing outputs included.
EXIT_INPUT_ERROR = 2
#: The output folder is held by another run (its lock names the holder).
EXIT_LOCKED = 3
#: A bug: an exception nobody raised on purpose.
EXIT_INTERNAL_ERROR = 70
#: Every exit status the command uses and what it means (README and ``--help`` list the same).
EXIT_CODES: dict[int, str] = {
    EXIT_OK: "done",
    EXIT_IO_ERROR: "the file system failed (disk full, permission denied); no new file was left",
    EXIT_INPUT_ERROR: "bad input, arguments or weights, or outputs exist (use --overwrite); nothing was written",
    EXIT_LOCKED: "the output folder is in use by another run (the message names it)",
    EXIT_INTERNAL_ERROR: "internal error (a bug; PARASPINALSEG_DEBUG=1 shows the traceback)",
    129: "interrupted by SIGHUP (the terminal closed)",
    130: "interrupted by SIGINT (Ctrl-C)",
    143: "interrupted by SIGTERM",
}


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
    p.add_argument("--threshold-method", default="auto", type=_threshold_method, metavar="auto|otsu|otsu-region|VALUE",
                   help="fat threshold: auto (Gaussian mixture around the paraspinal muscles, default), otsu "
                   "(per muscle), otsu-region, or a number in image intensity units")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="CPU threads for the network (default: half the CPU cores, at least 1)")
    p.add_argument("--no-mirror-tta", dest="mirror_tta", action="store_false",
                   help="one network pass per slice instead of two (the slice and its mirror image, averaged): "
                   "about half the network time, slightly lower accuracy, no longer exactly left-right consistent")


def _add_dixon_options(p: argparse.ArgumentParser, note: str = "") -> None:
    from .dixon import add_arguments  # numpy only at import: --help stays light

    add_arguments(p, note)


class _OneLineParser(argparse.ArgumentParser):
    """An argument error is one line naming the command and where its help is (not argparse's usage block),
    like every other error of the command; exit status 2 as documented."""

    def error(self, message: str) -> "typing.NoReturn":  # type: ignore[name-defined]
        self.exit(EXIT_INPUT_ERROR, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every sub-command (``measure`` only when ``cli_measure`` imports)."""
    parser = _OneLineParser(
        prog=PROG,
        description="Segment paraspinal muscles and spine on an axial lumbar MRI slice (BS-ESNet) and "
        "measure cross-sectional area and fat %. Outputs open in 3D Slicer.",
        epilog="exit status: " + "; ".join(f"{code} {what}" for code, what in EXIT_CODES.items()),
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_OneLineParser)

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
    seg.add_argument("--slices", default=None, metavar="SPEC",
                     help="whole-stack mode: all, A-B or K1,K2,... (0-based, inclusive ranges); writes one "
                     "segmentation, label volume, box file and table (one row per slice x structure) plus one "
                     "overlay per slice")
    seg.add_argument("--batch-size", type=int, default=1, metavar="N",
                     help="with --slices: slices per network pass (worth raising on CUDA; default 1)")
    seg.add_argument("--level", default="", metavar="L",
                     help="spinal level written to the table, e.g. L4/L5 (free text, default blank)")
    seg.add_argument("--out", required=True, metavar="DIR", help="output folder (created if missing)")
    seg.add_argument("--overwrite", action="store_true",
                     help="replace this volume's outputs if they exist in DIR (default: refuse, write nothing)")
    _add_model_options(seg)
    _add_dixon_options(seg)
    seg.set_defaults(func=_run_segment)

    bat = sub.add_parser(
        "batch",
        help="segment many volumes/slices listed in a CSV with one model load",
        description="Rows of LIST.csv: volume path, slice, level[, water, fat] (header optional: with one, "
        "columns are read by name; paths relative to the CSV's folder; slice may be blank for single-slice "
        "volumes). Writes one subfolder per row, a combined measurements.csv (segment's columns, then List row, "
        "Row folder, Volume path) and errors.csv (rows that failed, with the reason) and batch_run.json "
        "(the state of every row) into DIR, all three rewritten atomically after every row. DIR is locked "
        "while the run lasts; an interrupted run is continued with --resume.",
    )
    bat.add_argument("list", metavar="LIST.csv", help="CSV with rows: volume path, slice, level")
    bat.add_argument("--out", required=True, metavar="DIR", help="output folder (created if missing)")
    again = bat.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true",
                       help="continue the run recorded in DIR: rows done are kept, failed and pending rows run "
                       "(same list and settings required)")
    again.add_argument("--overwrite", action="store_true",
                       help="start a new run in a DIR that holds outputs, replacing them (default: refuse)")
    _add_model_options(bat)
    _add_dixon_options(bat, "; for batch: the images of rows whose list names none (list columns 4-5 or "
                       "water/fat/fat_fraction_map headers give them per row)")
    bat.add_argument("--no-progress", action="store_true", help="no progress bar")
    bat.set_defaults(func=_run_batch)

    try:
        from . import cli_measure
    except ImportError:  # the measure command is optional
        cli_measure = None
    if cli_measure is not None:
        cli_measure.register(sub)

    info = sub.add_parser("info", help="describe a weights file (model card summary)",
                          description="Print the model card summary of the shipped or given weights, after "
                          "checking the tensor file's SHA-256 against its config (a mismatch exits 2, as segment).")
    info.add_argument("--weights", default=None, metavar="W", help="weights file; default: the shipped model")
    info.set_defaults(func=_run_info)
    return parser


# ----------------------------------------------------------------------------------------------------
# Sub-commands


def _run_segment(args: argparse.Namespace) -> int:
    from . import batch
    from .dixon import source_from_args

    if args.slices is not None:
        return _run_stack(args)
    if args.batch_size != 1:
        raise InputError("--batch-size needs --slices (whole-stack mode)")
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
        overwrite=args.overwrite,
        dixon=source_from_args(args),
    )
    for warning in out.warnings:
        _say(f"warning: {warning}")
    print(out.describe())
    return 0


def _run_stack(args: argparse.Namespace) -> int:
    """``segment VOLUME --slices SPEC``: check everything, load the model once, segment the slices."""
    import time

    from . import batch
    from .dixon import source_from_args
    from .stack import parse_slices
    from .stack_outputs import check_stack_outputs, segment_stack_to_folder
    from .volume_io import read_volume

    if args.slice is not None:
        raise InputError("give either --slice K or --slices SPEC, not both")
    if args.batch_size < 1:
        raise InputError(f"--batch-size must be at least 1, got {args.batch_size}")
    t0 = time.perf_counter()
    volume = read_volume(args.volume)
    ks = parse_slices(args.slices, volume.num_slices)
    for k in ks:  # every slice checked before the model loads
        batch.check_slice(volume, k)
    if not args.overwrite:
        check_stack_outputs(volume, ks, args.out)
    dixon = source_from_args(args)
    if dixon is not None:  # Dixon images that miss the stack are refused before the model loads
        dixon.check_volume_slices(volume.array.shape, volume.ijk_to_ras, ks)
    t_load = time.perf_counter()
    segmenter = batch.load_segmenter(args.weights, args.device, args.threads, args.mirror_tta)
    load_s = time.perf_counter() - t_load
    out = segment_stack_to_folder(volume, ks, args.out, segmenter, level=args.level,
                                  threshold_method=args.threshold_method, dixon=dixon, batch_size=args.batch_size,
                                  overwrite=args.overwrite, validated=True)
    out.seconds.update(model_load=load_s, total=time.perf_counter() - t0)
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
        # A progress bar only on a terminal: in a log file its redraws bury the messages.
        progress=not args.no_progress and sys.stderr.isatty(),
        threads=args.threads,
        mirror_tta=args.mirror_tta,
        overwrite=args.overwrite,
        resume=args.resume,
        dixon_defaults=(args.water_image or "", args.fat_image or "", args.fat_fraction_map or ""),
        dixon_noise_floor=args.dixon_noise_floor,
    )
    print(summary.describe())
    # Bad rows are reported in errors.csv; the run counts as failed (bad input) only when no row worked.
    return EXIT_OK if summary.rows_done else EXIT_INPUT_ERROR


def _run_info(args: argparse.Namespace) -> int:
    from .weights import read_weights_config, verify_weights_file

    config = read_weights_config(args.weights)
    # The card of a file segment would refuse is refused too (hashlib only: no torch needed).
    verify_weights_file(config)
    print(config.summary())
    print(f"weights file: {config.weights_path}")
    print(f"checksum: SHA-256 {config.weights_sha256} verified")
    return 0


#: Path arguments: dest → (how ``--help`` names it, what it is); an empty one is refused, never read as ``.``.
# Kept as strings by the parsers (``type=Path`` would turn "" into ".").
_PATH_ARGUMENTS = {"volume": ("VOLUME", "volume"), "segmentation": ("SEGMENTATION", "segmentation"),
                   "list": ("LIST.csv", "batch list"), "out": ("--out", "output folder or file"),
                   "weights": ("--weights", "weights file"), "water_image": ("--water-image", "water image"),
                   "fat_image": ("--fat-image", "fat image"), "fat_fraction_map": ("--fat-fraction-map", "fat-fraction map")}


def _refuse_empty_paths(args: argparse.Namespace) -> None:
    """``--out "$OUT"`` with ``OUT`` unset is ``--out ""``, which the file system would take as the current
    folder: refused (exit 2, one line) before anything is read or written."""
    for dest, (shown, what) in _PATH_ARGUMENTS.items():
        value = getattr(args, dest, None)
        if isinstance(value, str) and not value.strip():
            raise InputError(f"argument {shown}: empty path, no {what} given (an unset shell variable?)")


# ----------------------------------------------------------------------------------------------------


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``paraspinalseg`` console script; returns the exit status."""
    installed = interrupts.install()
    try:
        try:
            return _main(argv)
        except Interrupted as exc:  # arrived while another outcome was being reported: it wins
            _say(f"interrupted by {exc.signal_name}")
            return exc.exit_code
    finally:
        if installed and argv is not None:  # called in-process (tests): leave the caller's handlers as they were
            interrupts.uninstall()
        elif installed:  # the console script: the process ends with this status whatever arrives now
            interrupts.finish()


def _main(argv: Optional[Sequence[str]]) -> int:
    from .outputs import COMMITTED

    COMMITTED.clear()  # one command's outputs (tests call main() again in one process)
    try:
        with interrupts.deferred():  # start-up: imports only
            parser = build_parser()
            args = parser.parse_args(argv)
            if not getattr(args, "func", None):
                parser.print_help()
                return EXIT_INPUT_ERROR
        _refuse_empty_paths(args)
        status = int(args.func(args) or 0)
        interrupts.raise_pending()
        return status
    except Interrupted as exc:
        detail = getattr(exc, "detail", "") or _written_so_far()
        _say(f"interrupted by {exc.signal_name}" + (f"; {detail}" if detail else ""))
        return exc.exit_code
    except KeyboardInterrupt:
        _say("interrupted by SIGINT")
        return 130
    except OutputFolderLockedError as exc:
        _say(f"error: {_one_line(exc)}")
        return EXIT_LOCKED
    except ParaspinalSegError as exc:
        _say(f"error: {_one_line(exc)}")
        return EXIT_INPUT_ERROR
    except OSError as exc:  # e.g. output folder not writable, disk full
        _say(f"error: {_os_error_line(exc)}")
        return EXIT_IO_ERROR
    except MemoryError:
        _say("error: out of memory")
        return EXIT_IO_ERROR
    except Exception as exc:  # noqa: BLE001 - a bug: one line, the traceback on request
        if os.environ.get("PARASPINALSEG_DEBUG"):
            raise
        _say(f"internal error: {type(exc).__name__}: {_one_line(exc)} (set PARASPINALSEG_DEBUG=1 for the traceback)")
        return EXIT_INTERNAL_ERROR


def _written_so_far() -> str:
    """What an interrupted command leaves: nothing, or outputs it had already completed and moved in."""
    from .outputs import COMMITTED

    if not COMMITTED:
        return "nothing new was written"
    folders = sorted({str(p.parent) for p in COMMITTED})
    return f"{len(COMMITTED)} outputs were complete by then and are in {', '.join(folders)}"


def _say(line: str) -> None:
    print(f"{PROG}: {line}", file=sys.stderr, flush=True)


def _os_error_line(exc: OSError) -> str:
    """``strerror: filename`` (e.g. ``No space left on device: out/x.png``) rather than ``[Errno 28] …``."""
    if exc.strerror:
        return " ".join(exc.strerror.split()) + (f": {exc.filename}" if exc.filename else "")
    return _one_line(exc)


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
