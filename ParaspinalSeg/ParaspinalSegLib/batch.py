"""``paraspinalseg batch``: segment the slices a CSV lists with one model, in a run that stays true.

A run into ``DIR`` (see README, "What happens when things go wrong"):

- holds the folder's lock (:class:`runlock.FolderLock`) for its whole life, so a second run into the same
  folder is refused with a message naming the holder;
- writes each row into its own subfolder ``<volume>_slice<K>`` (never one of the run's own file names),
  staged and moved in as a whole (:class:`outputs.StagedOutputs`): a row folder is complete or absent;
- after every row rewrites, each atomically, ``measurements.csv`` (the tables of the rows done, each row
  followed by :data:`ROW_COLUMNS`: list row, row folder, volume path),
  ``errors.csv`` (the rows that failed, with the reason) and ``batch_run.json`` (every row's state, the
  settings, and whether the run finished or was interrupted), so at any moment the combined files describe
  exactly the rows the record says are done or failed;
- refuses a folder that holds outputs already, unless ``overwrite`` (replace them) or ``resume``
  (continue the recorded run: rows done are kept, failed and pending rows are run; the list and the
  settings must be those of the recorded run);
- on SIGINT/SIGTERM drops the row in progress (its staging folder goes), records the run as interrupted
  and re-raises :class:`~ParaspinalSegLib.errors.Interrupted`: an interrupt is never a bad row.

The one-slice work (segmenting, the five files) lives in :mod:`slice_outputs`.

One room (past 500 lines) on purpose: the run record, the lock, the per-row staging and the interrupt
handling are one state machine whose invariants (combined files = rows recorded done) only hold together.
"""

from __future__ import annotations

import contextlib
import csv
import datetime as _dt
import errno
import io
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence

import numpy as np

from .batch_list import BatchItem, read_batch_list  # noqa: F401 - read_batch_list: batch's API
from .dixon import pairing_problem
from .errors import InputError, Interrupted, OutputExistsError
from .interrupts import deferred, raise_pending
from .outputs import StagedOutputs, atomic_write_text, remove_stale_staging, safe_output_name
from .runlock import FolderLock
from .slice_outputs import (  # noqa: F401 - segment_file / segment_volume_to_folder: the one-slice API, kept here too
    OUTPUT_SUFFIXES,
    SegmentOutputs,
    check_slice,
    load_segmenter,
    output_paths,
    outputs_record,
    resolve_slice,
    segment_file,
    segment_volume_to_folder,
    write_slice_outputs,
)
from .volume_io import Volume, read_volume, volume_name

COMBINED_MEASUREMENTS = "measurements.csv"
ERRORS_CSV = "errors.csv"
RUN_RECORD = "batch_run.json"
RUN_FORMAT = "paraspinalseg-batch-run"
RUN_FORMAT_VERSION = 1
ERROR_COLUMNS = ("row", "volume", "slice", "level", "error")
#: Appended to each row of the combined measurements.csv (after the columns of ``segment``'s table): which
#: list row, row folder and volume file it came from, so two subjects' ``t2_ax`` slice 0 stay apart.
ROW_COLUMNS = ("List row", "Row folder", "Volume path")
#: Names in the run folder that belong to the run itself: never a row folder's name.
RESERVED_NAMES = (COMBINED_MEASUREMENTS, ERRORS_CSV, RUN_RECORD)


def _item_folder_name(item: BatchItem, used: set[str]) -> str:
    """``<volume>_slice<K>`` (or ``<volume>`` without a slice), made unique within the run; ``used`` holds
    the names taken, case-folded (a case-insensitive file system would merge ``A`` and ``a``)."""
    vname = safe_output_name(volume_name(item.volume)) if item.volume else "volume"
    base = f"{vname}_slice{item.slice_index}" if item.slice_index is not None else vname
    name, n = base, 2
    while name.casefold() in used:
        name, n = f"{base}_{n}", n + 1
    used.add(name.casefold())
    return name


# ----------------------------------------------------------------------------------------------------
# The run record


@dataclass
class RowState:
    """One list row in a run: where its outputs go and how it went (``pending``, ``done``, ``failed``)."""

    item: BatchItem
    folder: str
    status: str = "pending"
    error: str = ""
    #: Path of the row's measurement table, relative to the run folder (rows done).
    table: str = ""
    #: Warnings about the row's input (unusual geometry); the row was still segmented.
    warnings: list[str] = field(default_factory=list)

    def key(self) -> list:
        return [self.item.row, self.item.volume, self.item.slice_index, self.item.level]


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


@dataclass
class BatchRun:
    """The state of a run in ``out``; :meth:`save` writes the combined files and the record."""

    out: Path
    rows: list[RowState]
    settings: dict[str, Any]
    started: str = field(default_factory=_now)
    state: str = "running"
    interrupted_by: str = ""
    #: Rows done by an earlier (interrupted) run and kept.
    resumed_done: int = 0
    replace_existing: bool = False
    #: ``--overwrite``: the previous run's row folders go when this run starts.
    replace_previous: bool = False
    _tables: dict[int, tuple[list[str], list[list[str]]]] = field(default_factory=dict, repr=False)

    # -- combined files -------------------------------------------------------------------------------

    def table_of(self, row: RowState) -> tuple[list[str], list[list[str]]]:
        """(header, rows) of a done row's measurement table (read once, then kept)."""
        if row.item.row not in self._tables:
            with open(self.out / row.table, newline="", encoding="utf-8") as f:
                reader = csv.reader(f)
                header = next(reader)
                self._tables[row.item.row] = (header, list(reader))
        return self._tables[row.item.row]

    def _measurements_text(self) -> str:
        from .scene import CSV_COLUMNS, csv_header

        header: list[str] = [csv_header(c) for c in CSV_COLUMNS]
        body: list[list[Any]] = []
        for n, row in enumerate(r for r in self.rows if r.status == "done"):
            head, rows = self.table_of(row)
            if n == 0:
                header = head
            elif head != header:
                raise OSError(f"{row.table} has different columns from the other measurement tables")
            source = [row.item.row, row.folder, row.item.volume]
            body.extend([*r, *source] for r in rows)
        return _csv_text([[*header, *ROW_COLUMNS], *body])

    def _errors_text(self) -> str:
        lines: list[Sequence[Any]] = [ERROR_COLUMNS]
        for r in self.rows:
            if r.status == "failed":
                i = r.item
                lines.append([i.row, i.volume, "" if i.slice_index is None else i.slice_index, i.level, r.error])
        return _csv_text(lines)

    def to_dict(self) -> dict[str, Any]:
        done = [r.item.row for r in self.rows if r.status == "done"]
        failed = [r.item.row for r in self.rows if r.status == "failed"]
        return {
            "format": RUN_FORMAT,
            "format_version": RUN_FORMAT_VERSION,
            "state": self.state,
            "interrupted_by": self.interrupted_by,
            "started": self.started,
            "updated": _now(),
            "settings": self.settings,
            "combined": {COMBINED_MEASUREMENTS: done, ERRORS_CSV: failed},
            "rows": [
                {"row": r.item.row, "volume": r.item.volume, "slice": r.item.slice_index, "level": r.item.level,
                 "folder": r.folder, "status": r.status, "error": r.error, "table": r.table, "warnings": r.warnings}
                for r in self.rows
            ],
        }

    def save(self) -> None:
        """Rewrite ``measurements.csv``, ``errors.csv`` and ``batch_run.json``, each atomically."""
        with deferred():
            measurements = self._measurements_text()
            atomic_write_text(self.out / COMBINED_MEASUREMENTS, measurements)
            atomic_write_text(self.out / ERRORS_CSV, self._errors_text())
            atomic_write_text(self.out / RUN_RECORD, json.dumps(self.to_dict(), indent=1) + "\n")

    def start(self) -> None:
        """Take the folder over (with its lock held): remove what a killed run left and, with
        ``--overwrite``, the previous run's row folders; write the initial combined files and record."""
        if self.replace_previous:
            _remove_previous_run(self.out)
        remove_stale_staging(self.out)
        self.save()

    def counts(self) -> dict[str, int]:
        c = {"done": 0, "failed": 0, "pending": 0}
        for r in self.rows:
            c[r.status] = c.get(r.status, 0) + 1
        return c


def _csv_text(rows: Iterable[Sequence[Any]]) -> str:
    buf = io.StringIO()
    csv.writer(buf).writerows(rows)
    return buf.getvalue()


def plan_rows(items: Sequence[BatchItem]) -> list[RowState]:
    """Each list row with its output folder name (decided from the list alone, so a resumed run finds them)."""
    used = {n.casefold() for n in RESERVED_NAMES}  # a volume errors.csv.nrrd gets folder errors.csv_2
    return [RowState(item, _item_folder_name(item, used)) for item in items]


def read_run_record(out: str | os.PathLike) -> Optional[dict[str, Any]]:
    """The ``batch_run.json`` in ``out`` (None when there is none); InputError when it is not one."""
    path = Path(out) / RUN_RECORD
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise InputError(f"{path} is not a readable batch run record ({exc}); use --overwrite to start a new run") from None
    if not isinstance(data, dict) or data.get("format") != RUN_FORMAT or not isinstance(data.get("rows"), list):
        raise InputError(f"{path} is not a ParaspinalSeg batch run record; use --overwrite to start a new run")
    return data


def _describe_record(data: dict[str, Any]) -> str:
    rows = [r for r in data["rows"] if isinstance(r, dict)]
    done = sum(1 for r in rows if r.get("status") == "done")
    return f"a batch run ({data.get('state', '?')}, {done} of {len(rows)} rows done, updated {data.get('updated', '?')})"


def prepare_run(
    items: Sequence[BatchItem],
    out_dir: str | os.PathLike,
    settings: dict[str, Any],
    *,
    overwrite: bool = False,
    resume: bool = False,
) -> BatchRun:
    """Decide what a run into ``out_dir`` does, before any model is loaded (call with the folder's lock).

    Refuses (:class:`OutputExistsError`, :class:`InputError`) a folder with outputs unless ``overwrite``
    or ``resume``; a resume must have the recorded run's rows and settings. Writes nothing:
    :meth:`BatchRun.start` does, once the model has loaded.
    """
    if overwrite and resume:
        raise InputError("--resume and --overwrite exclude each other (continue the run, or replace it)")
    out = Path(out_dir)
    rows = plan_rows(items)
    record = read_run_record(out) if not overwrite else None
    run = BatchRun(out, rows, dict(settings), replace_existing=overwrite or resume, replace_previous=overwrite)
    if record is not None and not resume:
        raise OutputExistsError(
            f"{out} holds {_describe_record(record)}; continue it with --resume or replace it with --overwrite"
        )
    if record is not None:
        _carry_over(run, record)
    elif not overwrite:
        clash = [out / n for n in (COMBINED_MEASUREMENTS, ERRORS_CSV)] + [out / r.folder for r in rows]
        clash = [p for p in clash if os.path.lexists(p)]
        if clash:
            what = "nothing to resume (no batch_run.json) and it" if resume else "it"
            shown = ", ".join(p.name for p in clash[:3]) + (f" and {len(clash) - 3} more" if len(clash) > 3 else "")
            raise OutputExistsError(
                f"{out} is not empty: {what} holds outputs this run would replace ({shown}); "
                "use --overwrite to replace them or choose another --out"
            )
    return run


def _row_complete(out: Path, folder: str, table: str) -> bool:
    """Whether a recorded row's folder holds its five outputs (its table is ``<folder>/<name>_measurements.csv``)."""
    parts = Path(table).parts
    suffix = OUTPUT_SUFFIXES["measurements"]
    if len(parts) != 2 or parts[0] != folder or not parts[1].endswith(suffix):
        return False
    name = parts[1][: -len(suffix)]
    return all(p.is_file() for p in output_paths(out / folder, name).values())


def _remove_previous_run(out: Path) -> None:
    """``--overwrite``: remove the row folders a previous run recorded (only those, and only plain names)."""
    try:
        record = read_run_record(out)
    except InputError:
        return  # not our record: its files are replaced one by one as the new run writes them
    if record is None:
        return
    for r in record["rows"]:
        folder = r.get("folder") if isinstance(r, dict) else None
        if isinstance(folder, str) and folder and safe_output_name(folder) == folder and (out / folder).is_dir():
            with deferred():
                shutil.rmtree(out / folder)


def _carry_over(run: BatchRun, record: dict[str, Any]) -> None:
    """Take the statuses of an interrupted run's rows; refuse when list or settings differ."""
    old_rows = [r for r in record["rows"] if isinstance(r, dict)]
    old_keys = [[r.get("row"), r.get("volume"), r.get("slice"), r.get("level")] for r in old_rows]
    new_keys = [r.key() for r in run.rows]
    if old_keys != new_keys:
        first = next((n for n, (a, b) in enumerate(zip(old_keys, new_keys)) if a != b), min(len(old_keys), len(new_keys)))
        raise InputError(
            f"cannot resume: the list is not the one of the run in {run.out} (they differ from list entry "
            f"{first + 1} on: {len(old_keys)} rows recorded, {len(new_keys)} given); use --overwrite to start again"
        )
    old_settings = record.get("settings") or {}
    differ = sorted(k for k in set(old_settings) | set(run.settings) if old_settings.get(k) != run.settings.get(k))
    if differ:
        parts = ", ".join(f"{k}: {old_settings.get(k)!r} then, {run.settings.get(k)!r} now" for k in differ)
        raise InputError(f"cannot resume: the run in {run.out} used other settings ({parts}); use the same options or --overwrite")
    run.started = str(record.get("started") or run.started)
    for row, old in zip(run.rows, old_rows):
        table = str(old.get("table") or "")
        if old.get("status") == "done" and old.get("folder") == row.folder and _row_complete(run.out, row.folder, table):
            row.status, row.table = "done", table
            row.warnings = [str(w) for w in old.get("warnings") or [] if isinstance(w, str)]
            run.resumed_done += 1
    # Rows to run whose folder exists: complete (the run was killed between moving the folder in and
    # recording it) → done; anything else is not this run's to replace.
    for row in run.rows:
        folder = run.out / row.folder
        if row.status == "done" or not os.path.lexists(folder):
            continue
        table = next((f"{row.folder}/{p.name}" for p in sorted(folder.glob("*" + OUTPUT_SUFFIXES["measurements"]))
                      if folder.is_dir()), "")
        if table and _row_complete(run.out, row.folder, table):
            row.status, row.table = "done", table
            run.resumed_done += 1
            continue
        raise OutputExistsError(
            f"cannot resume: {folder} exists but does not hold the row's five outputs; it is not replaced "
            "without --overwrite (remove it to run the row again)"
        )


# ----------------------------------------------------------------------------------------------------
# Running the rows


@dataclass
class BatchSummary:
    """What a batch run did."""

    out_dir: Path
    succeeded: list[SegmentOutputs]
    failed: list[tuple[BatchItem, str]]
    measurements_csv: Path
    errors_csv: Path
    seconds: float
    model_load_seconds: float = 0.0
    #: Rows done by the interrupted run this one resumed (not redone).
    resumed_done: int = 0
    #: Rows done with warnings about their input.
    warned: int = 0

    @property
    def rows_done(self) -> int:
        return len(self.succeeded) + self.resumed_done

    def describe(self) -> str:
        n = self.rows_done + len(self.failed)
        head = f"{self.rows_done} of {n} rows segmented, {len(self.failed)} failed"
        if self.resumed_done:
            head += f" ({self.resumed_done} done before, kept)"
        lines = [head + f"; outputs in {self.out_dir}",
                 f"  combined table: {self.measurements_csv.name} ({self.rows_done} rows' tables)"]
        if self.failed:
            lines.append(f"  failed rows and reasons: {self.errors_csv.name}")
        if self.succeeded:
            flagged = sum(o.qc_flagged for o in self.succeeded)
            scope = " of this run's" if self.resumed_done else ""
            lines.append(f"  qc: {flagged}{scope} of {len(self.succeeded)} slices flagged for a second look"
                         + (" (QC column of the table)" if flagged else ""))
        if self.warned:
            lines.append(f"  {self.warned} rows segmented with warnings (unusual geometry): see batch_run.json")
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


def _run_row(run: BatchRun, row: RowState, segmenter: Any, threshold_method: Any,
             read: Callable[[str], Volume], session: Any = None, dixon: Any = None) -> SegmentOutputs:
    """Segment one row into its staged folder, move the folder in and record the row as done.

    An interrupt while the row works drops it (the staging folder goes); from the move on it is held
    back until the record says the row is done, so a row folder never exists without its record.
    """
    t0 = time.perf_counter()
    item = row.item
    if item.problem:
        raise InputError(item.problem)
    volume = read(item.volume)
    k = resolve_slice(volume, item.slice_index)
    row.warnings = check_slice(volume, k)
    name = safe_output_name(volume.name)
    level = (item.level or "").strip()
    with StagedOutputs(run.out, overwrite=run.replace_existing) as stage:
        folder = stage.path(row.folder)
        folder.mkdir()
        scratch = stage.path(".scratch")
        scratch.mkdir()
        outcome, _, parts = write_slice_outputs(volume, k, folder, scratch, segmenter, name=name, level=level,
                                                threshold_method=threshold_method, validated=True, session=session,
                                                dixon=dixon(item) if dixon is not None else None)
        final = run.out / row.folder
        files = output_paths(final, name)
        raise_pending()  # held back during the row's imports: the row is dropped, not finished
        with deferred():
            stage.commit()
            row.status, row.error, row.table = "done", "", str(Path(row.folder) / files["measurements"].name)
            run.save()
    return outputs_record(outcome, name, k, level, final, files, t0, parts)


#: Errors of the output file system, not of a row: every further row would fail the same way.
_FATAL_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS}
_LOW_SPACE_BYTES = 1 << 20


def _output_failed(exc: OSError, out: Path) -> bool:
    """Whether a row's OSError is the output file system failing (full, read-only), not the row's input.

    Writers that are not Python's (ITK, VTK) report a full disk only as "could not write", so a write
    failure while the output file system has (almost) no free space counts as a full disk too.
    """
    name = getattr(exc, "filename", None)
    if name:
        try:
            if not Path(name).resolve().is_relative_to(out.resolve()):
                return False
        except (OSError, ValueError):
            pass
    if exc.errno in _FATAL_ERRNOS:
        return True
    try:
        return shutil.disk_usage(out).free < _LOW_SPACE_BYTES
    except OSError:
        return True


def _stop(run: BatchRun, row: RowState, exc: OSError) -> None:
    """The output file system failed: record what can be recorded (the files stay consistent either way)."""
    row.status, row.error, row.table = "pending", "", ""
    run.state = "stopped"
    with contextlib.suppress(OSError):
        run.save()


def _reason(exc: Exception) -> str:
    reason = " ".join(str(exc).split()) or type(exc).__name__
    if not isinstance(exc, (InputError, ValueError, OSError)):
        reason = f"{type(exc).__name__}: {reason}"
    return reason


def execute_run(run: BatchRun, segmenter: Any, *, threshold_method: Any = "auto", progress: bool = True,
                dixon_defaults: Sequence[str] = ("", "", ""), dixon_noise_floor: Optional[float] = None) -> BatchSummary:
    """Run every row of ``run`` not done yet; the combined files and record are rewritten after each.

    One headless MRML scene serves every row (cleared between rows). ``dixon_defaults`` (water, fat,
    fat-fraction map paths) are the Dixon images of rows whose list names none.
    """
    from tqdm import tqdm

    from .dixon import source_from_paths
    from .headless import SceneSession

    dixon_cache: dict[tuple[str, ...], Any] = {}

    def dixon(item: BatchItem) -> Any:
        paths = item.dixon_paths() if any(item.dixon_paths()) else tuple(dixon_defaults)
        if paths not in dixon_cache:  # only images that were read are kept: a failure is retried by the next row
            dixon_cache.clear()
            dixon_cache[paths] = source_from_paths(*paths, noise_floor=dixon_noise_floor if any(paths) else None)
        return dixon_cache[paths]

    t0 = time.perf_counter()
    succeeded: list[SegmentOutputs] = []
    cached: dict[str, Volume] = {}  # consecutive rows often share a volume

    def read(path: str) -> Volume:
        if path not in cached:
            cached.clear()
            cached[path] = read_volume(path)
        return cached[path]

    todo = [r for r in run.rows if r.status != "done"]
    session = SceneSession()
    try:
        run.start()
        for row in tqdm(todo, desc="segmenting", unit="slice", disable=not progress, leave=False):
            raise_pending()
            row.status, row.error, row.table, row.warnings = "pending", "", "", []
            try:
                succeeded.append(_run_row(run, row, segmenter, threshold_method, read, session, dixon))
                continue
            except OSError as exc:
                if _output_failed(exc, run.out):
                    _stop(run, row, exc)
                    raise
                row.status, row.error, row.table = "failed", _reason(exc), ""
            except Exception as exc:  # noqa: BLE001 - a bad row must not stop the batch; the reason is recorded
                row.status, row.error, row.table = "failed", _reason(exc), ""
            run.save()
    except (Interrupted, KeyboardInterrupt) as exc:
        run.state = "interrupted"
        run.interrupted_by = getattr(exc, "signal_name", "SIGINT")
        with deferred():
            run.save()
        c = run.counts()
        dropped = "the row in progress dropped" if c["pending"] else "no row was left to run"
        exc.detail = (f"{c['done']} of {len(run.rows)} rows done, {c['failed']} failed, {dropped}; "
                      f"{COMBINED_MEASUREMENTS}, {ERRORS_CSV} and {RUN_RECORD} in {run.out} describe them; "
                      "continue with --resume")
        raise
    finally:
        session.close()
    run.state = "finished"
    run.save()
    failed = [(r.item, r.error) for r in run.rows if r.status == "failed"]
    return BatchSummary(run.out.resolve(), succeeded, failed, run.out / COMBINED_MEASUREMENTS, run.out / ERRORS_CSV,
                        time.perf_counter() - t0, resumed_done=run.resumed_done,
                        warned=sum(1 for r in run.rows if r.status == "done" and r.warnings))


def run_settings(segmenter: Any = None, *, weights_sha256: str = "", threshold_method: Any = "auto",
                 mirror_tta: Optional[bool] = None) -> dict[str, Any]:
    """What makes two runs' rows comparable (a resume must match): model checksum, threshold, mirror TTA."""
    config = getattr(segmenter, "config", None)
    sha = weights_sha256 or str(getattr(config, "weights_sha256", "") or "")
    if mirror_tta is None:
        mirror_tta = bool(getattr(segmenter, "mirror_tta", True))
    return {"weights_sha256": sha, "threshold_method": str(threshold_method), "mirror_tta": bool(mirror_tta)}


def run_batch(
    items: Iterable[BatchItem],
    out_dir: str | os.PathLike,
    segmenter: Any,
    *,
    threshold_method: Any = "auto",
    progress: bool = True,
    overwrite: bool = False,
    resume: bool = False,
    dixon_defaults: Sequence[str] = ("", "", ""),
    dixon_noise_floor: Optional[float] = None,
) -> BatchSummary:
    """Segment every row with one loaded ``segmenter`` into ``out_dir`` (lock, checks, rows; see the module)."""
    with FolderLock(out_dir):
        run = prepare_run(list(items), out_dir, run_settings(segmenter, threshold_method=threshold_method),
                          overwrite=overwrite, resume=resume)
        return execute_run(run, segmenter, threshold_method=threshold_method, progress=progress,
                           dixon_defaults=dixon_defaults, dixon_noise_floor=dixon_noise_floor)


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
    overwrite: bool = False,
    resume: bool = False,
    dixon_defaults: Sequence[str] = ("", "", ""),
    dixon_noise_floor: Optional[float] = None,
) -> BatchSummary:
    """``paraspinalseg batch``: read the list, take the folder, check it, load the model once, run the rows.

    Everything that can refuse the run (list, lock, existing outputs, a resume that does not match) is
    checked before the model loads.
    """
    from .weights import read_weights_config

    items = read_batch_list(list_path)
    problem = pairing_problem(*(bool(path) for path in dixon_defaults), where="--water-image and --fat-image")
    if problem:  # every row without its own images would fail the same way
        raise InputError(problem)
    sha = read_weights_config(weights).weights_sha256
    with FolderLock(out_dir):
        settings = run_settings(weights_sha256=sha, threshold_method=threshold_method, mirror_tta=mirror_tta)
        run = prepare_run(items, out_dir, settings, overwrite=overwrite, resume=resume)
        t0 = time.perf_counter()
        segmenter = load_segmenter(weights, device, threads, mirror_tta)
        raise_pending()  # a signal held back during torch's import takes effect before the first row
        load_s = time.perf_counter() - t0
        summary = execute_run(run, segmenter, threshold_method=threshold_method, progress=progress,
                              dixon_defaults=dixon_defaults, dixon_noise_floor=dixon_noise_floor)
    summary.model_load_seconds = load_s
    summary.seconds += load_s
    return summary
