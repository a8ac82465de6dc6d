"""All-or-nothing outputs: stage files on the target's own file system, then move them in together.

:class:`StagedOutputs` is the one way the command line puts results into a folder::

    with StagedOutputs(out_dir, overwrite=False) as stage:
        write_png(stage.path("case01_overlay.png"))      # anything: files or whole folders
        ...
        stage.commit()                                   # every entry appears, or none does

The staging folder is a hidden ``.paraspinalseg-staging-*`` folder *inside* the target folder, so every
move is a ``rename`` on one file system (no copy that a full disk could cut off). Before anything moves,
each staged file is flushed to disk (``fsync``: a full disk reports itself here, not later) and checked
for completeness (:func:`verify_output_file`). Entries that already exist in the target are refused with
:class:`~ParaspinalSegLib.errors.OutputExistsError` unless ``overwrite=True``; a file is placed with a
hard link, which refuses an existing name atomically, so a concurrent run cannot be overwritten either.
If any move fails, the ones already made are undone and replaced entries come back. Leaving the block
without ``commit()`` (an error, an interrupt) removes the staging folder and any folder it created.

:func:`atomic_write_text` replaces one file atomically (write a sibling, fsync, ``os.replace``).
Standard library only; signals are held back (:func:`interrupts.deferred`) while entries move.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Optional, Sequence

from .errors import InputError, OutputExistsError
from .interrupts import deferred, raise_pending

#: Everything this process has moved into place (what an interrupt message may say was written).
COMMITTED: list[Path] = []

STAGING_PREFIX = ".paraspinalseg-staging-"
_TMP_PREFIX = ".paraspinalseg-tmp-"


#: Longest name kept for an output (file systems allow 255 bytes; the suffixes need room).
MAX_NAME_CHARS = 120


def safe_output_name(name: str, fallback: str = "volume") -> str:
    """``name`` as a plain, visible file name: only letters, digits and ``-_.+``; no leading dots or
    dashes; at most :data:`MAX_NAME_CHARS` characters. Whatever an input file is called, outputs named
    after it stay inside the output folder (no ``/``, ``..``, hidden or option-like names)."""
    cleaned = "".join(c if (c.isalnum() or c in "-_.+") and c.isprintable() else "_" for c in str(name))
    cleaned = cleaned.lstrip(".-").rstrip(".")
    cleaned = cleaned[:MAX_NAME_CHARS].rstrip(".")
    return cleaned if cleaned.strip("_") else fallback


def make_folders(folder: Path) -> list[Path]:
    """Create ``folder`` and its missing parents; return the ones created (outermost first).

    A path whose existing part is a file is the user's mistake: :class:`InputError`, nothing created.
    """
    missing: list[Path] = []
    p = Path(folder)
    while not p.exists():
        missing.append(p)
        if p.parent == p:
            break
        p = p.parent
    if p.exists() and not p.is_dir():
        raise InputError(f"the output folder {folder} cannot be made: {p} is a file, not a folder")
    created: list[Path] = []
    for d in reversed(missing):
        try:
            d.mkdir()
        except FileExistsError:  # made by someone else meanwhile: not ours to remove
            continue
        created.append(d)
    return created


def _fsync_path(path: Path) -> None:
    """Flush a file (or a folder's entries) to disk; raises OSError (e.g. ENOSPC) if the data did not fit."""
    flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) if path.is_dir() else os.O_RDONLY
    try:
        fd = os.open(path, flags)
    except OSError:
        if path.is_dir():  # some platforms cannot open folders; their entries were flushed one by one
            return
        raise
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno in (errno.EINVAL, errno.EBADF, errno.ENOTSUP) and path.is_dir():
            return  # folders that cannot be fsynced (some file systems)
        raise
    finally:
        os.close(fd)


def verify_output_file(path: Path) -> None:
    """Refuse a staged output that is empty or incomplete (a writer that ignored a full disk).

    JSON must parse, CSV must end with a newline, PNG must end with its IEND chunk, gzip members must
    decompress to their end and NRRD/NIfTI must hold the bytes their header promises
    (:func:`file_integrity.check_file_complete`).
    """
    name = path.name.lower()
    size = path.stat().st_size
    if size == 0:
        raise OSError(errno.EIO, f"{path.name} was written empty (disk full?)")
    if name.endswith(".json"):
        try:
            json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as exc:
            raise OSError(errno.EIO, f"{path.name} was written incomplete ({exc})") from None
    elif name.endswith(".csv"):
        with open(path, "rb") as f:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                raise OSError(errno.EIO, f"{path.name} was written incomplete (no final line end)")
    elif name.endswith(".png"):
        with open(path, "rb") as f:
            head = f.read(8)
            f.seek(max(0, size - 12))
            tail = f.read()
        if head != b"\x89PNG\r\n\x1a\n" or b"IEND" not in tail:
            raise OSError(errno.EIO, f"{path.name} was written incomplete (PNG without its end chunk)")
    elif name.endswith((".nrrd", ".nhdr", ".nii", ".nii.gz")):
        from .file_integrity import check_file_complete

        try:
            check_file_complete(path)
        except InputError as exc:
            raise OSError(errno.EIO, f"{path.name} was written incomplete ({exc})") from None


def _place(src: Path, dst: Path) -> None:
    """Move ``src`` to ``dst`` on one file system, refusing (FileExistsError) if ``dst`` exists."""
    if src.is_dir():
        if os.path.lexists(dst):  # rename() would silently replace an empty folder
            raise FileExistsError(errno.EEXIST, "exists", str(dst))
        os.rename(src, dst)
        return
    try:
        os.link(src, dst)  # atomic "create if absent"
    except FileExistsError:
        raise
    except OSError as exc:  # file systems without hard links: check, then rename
        if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK, errno.ENOSYS):
            raise
        if os.path.lexists(dst):
            raise FileExistsError(errno.EEXIST, "exists", str(dst)) from None
        os.rename(src, dst)
        return
    os.unlink(src)


class StagedOutputs:
    """A staging folder inside ``target`` whose entries :meth:`commit` moves into ``target`` together.

    ``overwrite``: entries that exist in ``target`` are replaced (and restored if the commit fails);
    without it they are refused before anything moves.
    """

    def __init__(self, target: str | os.PathLike, *, overwrite: bool = False) -> None:
        self.target = Path(target)
        self.overwrite = bool(overwrite)
        self.staging: Optional[Path] = None
        self.committed: list[Path] = []
        self._created_dirs: list[Path] = []

    # -- life cycle ---------------------------------------------------------------------------------

    def __enter__(self) -> "StagedOutputs":
        try:
            with deferred():
                self._make_target()
                remove_stale_staging(self.target, only_dead=True)
                self.staging = Path(tempfile.mkdtemp(prefix=_own_prefix(STAGING_PREFIX), dir=self.target))
        except BaseException:  # an interrupt held back above is raised here, where __exit__ will not run
            with deferred():
                self.discard()
            raise
        return self

    def __exit__(self, *exc) -> None:
        with deferred():
            self.discard()

    def _make_target(self) -> None:
        self._created_dirs = make_folders(self.target)

    def discard(self) -> None:
        """Remove the staging folder and the folders this stage created, if they stayed empty."""
        if self.staging is not None:
            shutil.rmtree(self.staging, ignore_errors=True)
            self.staging = None
        if not self.committed:
            for d in reversed(self._created_dirs):
                with contextlib.suppress(OSError):
                    d.rmdir()
        self._created_dirs = []

    # -- writing --------------------------------------------------------------------------------------

    def path(self, name: str) -> Path:
        """Where to write entry ``name`` (a plain name: it lands at ``target/name``)."""
        if self.staging is None:
            raise RuntimeError("StagedOutputs used outside its with-block")
        if not name or Path(name).name != name or name in (".", ".."):
            raise ValueError(f"output name {name!r} is not a plain file name")
        return self.staging / name

    def entries(self) -> list[str]:
        """Names staged so far (sorted; hidden names are scratch space and never committed)."""
        assert self.staging is not None
        return sorted(p.name for p in self.staging.iterdir() if not p.name.startswith("."))

    def existing(self, names: Optional[Sequence[str]] = None) -> list[Path]:
        """Entries of ``target`` that committing ``names`` (default: the staged entries) would replace."""
        names = self.entries() if names is None else names
        return [self.target / n for n in names if os.path.lexists(self.target / n)]

    def commit(self) -> list[Path]:
        """Flush, check and move every staged entry into ``target``; all appear or none do."""
        assert self.staging is not None, "commit() outside the with-block"
        names = self.entries()
        raise_pending()  # a signal held back while the outputs were written (imports) drops them here
        self._commit(names)  # an interrupt held back meanwhile is raised after the last move (COMMITTED says so)
        return self.committed

    def _commit(self, names: list[str]) -> None:
        assert self.staging is not None
        with deferred():
            for n in names:
                _flush_and_verify(self.staging / n)
            _fsync_path(self.staging)
            if not self.overwrite:
                clash = self.existing(names)
                if clash:
                    raise OutputExistsError(_exists_message(clash))
            backup = self.staging / ".replaced"
            placed: list[tuple[Path, Optional[Path]]] = []  # (final path, backup of what it replaced)
            try:
                for n in names:
                    final = self.target / n
                    old: Optional[Path] = None
                    if self.overwrite and os.path.lexists(final):
                        backup.mkdir(exist_ok=True)
                        old = backup / n
                        os.rename(final, old)
                    try:
                        _place(self.staging / n, final)
                    except BaseException:
                        if old is not None:
                            os.rename(old, final)
                        raise
                    placed.append((final, old))
                _fsync_path(self.target)
            except FileExistsError as exc:
                self._undo(placed)
                raise OutputExistsError(_exists_message([Path(exc.filename or self.target)])) from None
            except BaseException:
                self._undo(placed)
                raise
            self.committed = [p for p, _ in placed]
            COMMITTED.extend(self.committed)

    def _undo(self, placed: list[tuple[Path, Optional[Path]]]) -> None:
        assert self.staging is not None
        for final, old in reversed(placed):
            with contextlib.suppress(OSError):
                os.rename(final, self.staging / final.name)
                if old is not None:
                    os.rename(old, final)


def _flush_and_verify(entry: Path) -> None:
    if entry.is_dir():
        for p in sorted(entry.rglob("*")):
            if p.is_file():
                _fsync_path(p)
                verify_output_file(p)
        _fsync_path(entry)
    else:
        _fsync_path(entry)
        verify_output_file(entry)


def _exists_message(paths: Sequence[Path]) -> str:
    shown = ", ".join(str(p) for p in paths[:3]) + (f" and {len(paths) - 3} more" if len(paths) > 3 else "")
    return f"output already exists: {shown}; nothing was written (use --overwrite to replace it)"


def check_no_existing(paths: Sequence[Path]) -> None:
    """Refuse early (before a slow step) when any of ``paths`` exists (:class:`OutputExistsError`)."""
    clash = [p for p in paths if os.path.lexists(p)]
    if clash:
        raise OutputExistsError(_exists_message(clash))


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Replace ``path`` with ``text`` (UTF-8) atomically: readers see the old file or the new, never half."""
    target = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=_own_prefix(_TMP_PREFIX), dir=target.parent)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; the file gets the usual permissions
        with deferred():
            with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return target


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _own_prefix(prefix: str) -> str:
    """``prefix`` + this process's id and host: a later run can tell whether the writer still lives."""
    return f"{prefix}{os.getpid()}@{_host()}-"


def _host() -> str:
    return "".join(c if c.isalnum() else "_" for c in socket.gethostname())[:40] or "host"


def _writer_alive(name: str, prefix: str) -> bool:
    """Whether the process named in a staging/temporary entry's name still runs (unknown → alive)."""
    pid_text, _, rest = name[len(prefix):].partition("@")
    host = rest.rsplit("-", 1)[0]
    if not pid_text.isdigit() or host != _host():
        return True
    try:
        os.kill(int(pid_text), 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def remove_stale_staging(folder: str | os.PathLike, *, only_dead: bool = False) -> list[Path]:
    """Remove staging folders and temporary files a killed run left in ``folder``.

    With the folder's lock held (a batch) everything of the kind goes; ``only_dead`` (no lock: ``segment``,
    ``measure``) removes only entries whose writer, named in the entry, no longer runs on this host.
    """
    removed = []
    with contextlib.suppress(OSError):
        for p in Path(folder).iterdir():
            prefix = next((x for x in (STAGING_PREFIX, _TMP_PREFIX) if p.name.startswith(x)), None)
            if prefix is None or (only_dead and _writer_alive(p.name, prefix)):
                continue
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    p.unlink()
            removed.append(p)
    return removed
