"""One run per output folder: a lock file that names its holder and dies with it.

:class:`FolderLock` creates ``<folder>/.paraspinalseg.lock`` and holds an exclusive ``flock`` on it for
the whole run. The file records who holds it (process id, host, user, start time, command), so a second
run is refused with :class:`~ParaspinalSegLib.errors.OutputFolderLockedError` naming the holder. The
operating system drops the ``flock`` when the holder dies, however it dies, so a lock file left by a
killed run does not block the next one: it is taken over. Where ``fcntl`` does not exist (Windows) the
file is created exclusively and a holder whose process no longer runs on this host is taken over.
Standard library only.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import getpass
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any, Optional

from .errors import OutputFolderLockedError
from .interrupts import deferred
from .outputs import make_folders

try:  # POSIX
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

LOCK_NAME = ".paraspinalseg.lock"


def _holder_record() -> dict[str, Any]:
    try:
        user = getpass.getuser()
    except Exception:  # noqa: BLE001 - no user name in some containers
        user = ""
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "user": user,
        "started": _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat(),
        "command": " ".join(os.path.basename(a) if i == 0 else a for i, a in enumerate(sys.argv))[:300],
    }


def describe_holder(info: dict[str, Any]) -> str:
    """``process 123 on host (user), started …: command`` from a lock file's record."""
    if not info:
        return "an unknown process (the lock file is empty or unreadable)"
    who = f"process {info.get('pid', '?')} on {info.get('host', '?')}"
    if info.get("user"):
        who += f" ({info['user']})"
    if info.get("started"):
        who += f", started {info['started']}"
    if info.get("command"):
        who += f": {info['command']}"
    return who


def _read_record(fd_or_path: Any) -> dict[str, Any]:
    try:
        if isinstance(fd_or_path, int):
            os.lseek(fd_or_path, 0, os.SEEK_SET)
            text = os.read(fd_or_path, 65536).decode("utf-8", "replace")
        else:
            text = Path(fd_or_path).read_text(encoding="utf-8", errors="replace")
        data = json.loads(text)
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _pid_alive(pid: Any) -> bool:
    try:
        os.kill(int(pid), 0)
    except (OSError, ValueError, TypeError):
        return False
    return True


class FolderLock:
    """Exclusive lock on an output folder for one run (a context manager; the folder is created)."""

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self._fd: Optional[int] = None
        self._created: list[Path] = []

    def __enter__(self) -> "FolderLock":
        try:
            with deferred():  # an interrupt must not leave a lock file nobody holds
                self.acquire()
        except BaseException:  # an interrupt held back above is raised here, where __exit__ will not run
            with deferred():
                self.release()
            raise
        return self

    def __exit__(self, *exc) -> None:
        with deferred():
            self.release()

    def _refuse(self, info: dict[str, Any]) -> OutputFolderLockedError:
        return OutputFolderLockedError(
            f"{self.folder} is in use by another paraspinalseg run ({describe_holder(info)}); wait for it to "
            "end or stop it, or choose another --out (a lock left by a run that was killed is taken over "
            "automatically)"
        )

    def acquire(self) -> None:
        """Take the lock or raise :class:`OutputFolderLockedError`; writes this process's record.

        Folders it has to create are removed again by :meth:`release` if the run left them empty."""
        self._created = make_folders(self.folder)
        if fcntl is None:  # pragma: no cover - Windows
            self._acquire_exclusive_create()
            return
        for _ in range(10):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                info = _read_record(fd)
                for _ in range(20):  # the holder may be between taking the lock and writing its record
                    if info:
                        break
                    time.sleep(0.05)
                    info = _read_record(fd)
                os.close(fd)
                raise self._refuse(info) from None
            except OSError:
                os.close(fd)
                raise
            # The holder before us may have removed the file between our open and our flock: then we
            # locked an orphan and must start again on the file that is there now.
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                self._fd = fd
                self._write_record()
                return
            os.close(fd)
        raise self._refuse(_read_record(self.path))

    def _acquire_exclusive_create(self) -> None:  # pragma: no cover - Windows
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                info = _read_record(self.path)
                if info.get("host") == socket.gethostname() and not _pid_alive(info.get("pid")):
                    with contextlib.suppress(OSError):
                        self.path.unlink()
                    continue
                raise self._refuse(info) from None
            self._fd = fd
            self._write_record()
            return
        raise self._refuse(_read_record(self.path))

    def _write_record(self) -> None:
        assert self._fd is not None
        data = (json.dumps(_holder_record()) + "\n").encode("utf-8")
        os.ftruncate(self._fd, 0)
        os.lseek(self._fd, 0, os.SEEK_SET)
        os.write(self._fd, data)

    def release(self) -> None:
        """Remove the lock file and drop the lock (idempotent)."""
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            self.path.unlink()  # while still holding it, so nobody locks the file we remove
        with contextlib.suppress(OSError):
            os.close(self._fd)
        self._fd = None
        for d in reversed(self._created):  # a run that wrote nothing leaves no folder behind
            with contextlib.suppress(OSError):
                d.rmdir()
        self._created = []
