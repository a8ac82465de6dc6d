"""SIGINT / SIGTERM / SIGHUP for the command line: turn them into :class:`~ParaspinalSegLib.errors.Interrupted`,
and hold them back during steps that must not be cut in half.

:func:`install` makes both signals raise ``Interrupted`` (a ``BaseException``) in the main thread, so the
code's own ``finally`` / ``with`` blocks roll back half-done work and no ``except Exception`` mistakes an
interrupt for a bad row. Inside :func:`deferred`, and while any ``import`` runs,
a signal is only recorded and raised at the next safe point (the end of the outermost ``deferred``
block, or :func:`raise_pending`): interrupting a C extension's import half-way left a process that
crashed with a segmentation fault at exit or could not import numpy again. Outputs are moved into place
and run records are written inside ``deferred`` blocks, and so is clean-up itself. After the first signal further ones are recorded but not raised again, so the clean-up
the first one started runs to its end. Standard library only.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Any, Iterator, Optional

from .errors import Interrupted

#: SIGINT (Ctrl-C), SIGTERM (kill, job schedulers) and SIGHUP (the terminal closed), where they exist.
HANDLED_SIGNALS: tuple[int, ...] = tuple(
    s for s in (getattr(signal, n, None) for n in ("SIGINT", "SIGTERM", "SIGHUP")) if s is not None
)

_state: dict[str, Any] = {"depth": 0, "pending": None, "raised": None, "installed": False, "previous": {}}


def _in_import(frame: Any) -> bool:
    """Whether the interrupted code runs inside an ``import`` (a module's top level is being executed)."""
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib._bootstrap"):
            return True
        frame = frame.f_back
    return False


def _handler(signum: int, frame: Any) -> None:
    if _state["raised"] is not None:  # already shutting down: let that clean-up finish
        return
    # Raising inside an import leaves a half-initialised module (numpy, VTK: "cannot load module more
    # than once", crashes at exit); hold the signal until the next safe point instead.
    if _state["depth"] > 0 or _in_import(frame):
        if _state["pending"] is None:
            _state["pending"] = signum
        return
    _state["raised"] = signum
    raise Interrupted(signum)


def raise_pending() -> None:
    """A safe point: raise :class:`Interrupted` for a signal that was held back, if any."""
    signum = _state["pending"]
    if signum is not None and _state["raised"] is None and _state["depth"] == 0:
        _state["pending"] = None
        _state["raised"] = signum
        raise Interrupted(signum)


def install() -> bool:
    """Route SIGINT, SIGTERM and SIGHUP to :class:`Interrupted` (main thread only; returns whether it did)."""
    if threading.current_thread() is not threading.main_thread():
        return False
    previous = {s: signal.getsignal(s) for s in HANDLED_SIGNALS}
    for s in HANDLED_SIGNALS:
        signal.signal(s, _handler)
    _state.update(depth=0, pending=None, raised=None, installed=True, previous=previous)
    return True


def uninstall() -> None:
    """Put back the handlers :func:`install` replaced (tests that call the CLI in-process)."""
    if threading.current_thread() is not threading.main_thread() or not _state["installed"]:
        return
    for s, handler in _state["previous"].items():
        signal.signal(s, handler if handler is not None else signal.SIG_DFL)
    _state.update(depth=0, pending=None, raised=None, installed=False, previous={})


def finish() -> None:
    """The command's outcome is decided and reported: signals from now on are ignored, so one that
    arrives while the interpreter tears torch and VTK down cannot kill a finished run with a bare signal
    status (Python restores the default handlers during its shutdown)."""
    if threading.current_thread() is not threading.main_thread():
        return
    _state["raised"] = _state["raised"] or -1  # the handler is a no-op from here on
    for s in HANDLED_SIGNALS:
        signal.signal(s, signal.SIG_IGN)


def pending() -> Optional[int]:
    """The signal recorded inside :func:`deferred` and not yet raised, if any."""
    return _state["pending"]


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Hold SIGINT/SIGTERM back while the block runs; raise :class:`Interrupted` at its end if one came.

    Nested blocks raise at the end of the outermost one. Without :func:`install` this changes nothing
    (plain ``KeyboardInterrupt`` semantics stay).
    """
    _state["depth"] += 1
    try:
        yield
    finally:
        _state["depth"] -= 1
        raise_pending()
