"""The module panel's state machine: one task at a time, buttons, status line, progress and Cancel.

Plain Python (no Qt, no MRML), so the headless tests drive exactly what the panel does. The widget in
``ParaspinalSeg.py`` is a thin shell: each button asks :meth:`PanelState.start` for a :class:`Run`
(``None``: another task is running, the click is refused), does its work inside ``with run:``, and
applies :class:`PanelView` (enabled buttons, status text, progress dialog) whenever it changes.

Why it exists: torch import, model load, inference and installs run on Slicer's GUI thread, and the
``processEvents()`` that keeps the window responsive also delivers a second click, which would start a
second run or install inside the first. And ``slicer.util.tryWithErrorDisplay`` re-raises after
showing its message, so code after it never ran and the panel stayed "Segmenting…". Here every run
ends through :meth:`Run.__exit__`, which resets the state whatever happened (the idea of
MONAIAuto3DSeg's ``Lib/process.py``: a task object with a running flag, a stop request and one place
where it ends).
"""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterable, Optional, Sequence

from .errors import ParaspinalSegError

logger = logging.getLogger(__name__)


class Task(enum.Enum):
    """What the panel can be busy with."""

    SEGMENT_SLICE = "segment slice"
    SEGMENT_SLICES = "segment slices"
    INSTALL = "install"
    UPDATE_MEASUREMENTS = "update measurements"
    EXPORT_CSV = "export CSV"
    ALIGN_VIEW = "align view"


#: Tasks that show a progress dialog (they take long or have several steps) and offer Cancel there.
PROGRESS_DIALOG_TASKS = frozenset({Task.SEGMENT_SLICES, Task.INSTALL})


class Cancelled(ParaspinalSegError):
    """The user pressed Cancel; raised by :meth:`Run.check_cancel` between two steps."""


@dataclass(frozen=True)
class PanelView:
    """Everything the shell shows that depends on the state (apply it all on each change)."""

    task: Optional[Task] = None
    status: str = ""
    #: (steps done, steps in all, label); None when there is nothing to count.
    progress: Optional[tuple[int, int, str]] = None
    cancel_requested: bool = False

    @property
    def busy(self) -> bool:
        return self.task is not None

    @property
    def actions_enabled(self) -> bool:
        """Whether any button that starts work may be enabled (each also has its own conditions)."""
        return not self.busy

    @property
    def show_progress_dialog(self) -> bool:
        return self.task in PROGRESS_DIALOG_TASKS

    @property
    def can_cancel(self) -> bool:
        return self.show_progress_dialog and not self.cancel_requested


class PanelState:
    """One task at a time; ``on_change(view)`` is called after every change of :attr:`view`."""

    def __init__(self, on_change: Optional[Callable[[PanelView], None]] = None) -> None:
        self._view = PanelView()
        self._on_change = on_change
        #: The last failure (exception) of a run, None after a success; for tests and logs.
        self.last_error: Optional[BaseException] = None

    @property
    def view(self) -> PanelView:
        return self._view

    @property
    def busy(self) -> bool:
        return self._view.busy

    def _set(self, **changes: Any) -> None:
        self._view = replace(self._view, **changes)
        if self._on_change is not None:
            self._on_change(self._view)

    def set_status(self, text: str) -> None:
        """Status line text while idle (e.g. a hint), or the running task's current step."""
        self._set(status=text)

    def start(self, task: Task, status: str, *, failed: str, cancelled: str = "") -> Optional["Run"]:
        """A :class:`Run` of ``task`` showing ``status``; None (and nothing changes) while another runs.

        ``failed`` is the status line after an error (the error text is appended); ``cancelled`` after
        Cancel (``{done}``/``{total}`` are filled in).
        """
        if self.busy:
            logger.info("ParaspinalSeg: '%s' refused while '%s' runs", task.value, self._view.task.value)
            return None
        run = Run(self, task, failed=failed, cancelled=cancelled or "Cancelled after {done} of {total} steps.")
        self.last_error = None
        self._set(task=task, status=status, progress=None, cancel_requested=False)
        return run

    def cancel(self) -> None:
        """Ask the running task to stop at its next step (a no-op when idle or not cancellable)."""
        if self._view.can_cancel:
            self._set(cancel_requested=True)

    def _end(self, status: str, error: Optional[BaseException]) -> None:
        self.last_error = error
        self._set(task=None, status=status, progress=None, cancel_requested=False)


class Run:
    """One task from start to end; use it as a context manager (``with run: ...``).

    Leaving the block always returns the panel to idle. An exception inside is recorded
    (``state.last_error``), put on the status line, logged, and **not** propagated: the shell shows
    it to the user inside the block (``slicer.util.tryWithErrorDisplay``), and a Qt slot must return
    normally. :class:`Cancelled` ends the run with the ``cancelled`` status.
    """

    def __init__(self, state: PanelState, task: Task, *, failed: str, cancelled: str) -> None:
        self.state = state
        self.task = task
        self.failed = failed
        self.cancelled_text = cancelled
        self.final_status: Optional[str] = None
        self.done = 0
        self.total = 0

    def __enter__(self) -> "Run":
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc is None:
            self.state._end(self.final_status or "", None)
        elif isinstance(exc, Cancelled):
            self.state._end(self.cancelled_text.format(done=self.done, total=self.total), exc)
        elif isinstance(exc, Exception):
            logger.error("ParaspinalSeg: %s failed: %s", self.task.value, exc, exc_info=(exc_type, exc, tb))
            self.state._end(f"{self.failed} {exc}".strip(), exc)
        else:  # KeyboardInterrupt, SystemExit: reset, but let them through
            self.state._end(self.failed, exc)
            return False
        return True

    @property
    def cancel_requested(self) -> bool:
        return self.state.view.cancel_requested

    def check_cancel(self) -> None:
        """Raise :class:`Cancelled` if the user pressed Cancel (call it between steps)."""
        if self.cancel_requested:
            raise Cancelled("cancelled by the user")

    def step(self, status: str) -> None:
        """Show the current step on the status line."""
        self.state.set_status(status)

    def progress(self, done: int, total: int, label: str) -> None:
        """``done`` of ``total`` steps finished; ``label`` says what runs now."""
        self.done, self.total = int(done), int(total)
        self.state._set(progress=(self.done, self.total, label), status=label)

    def succeed(self, status: str) -> None:
        """The status line once the run has ended without error."""
        self.final_status = status


def run_steps(
    run: Run,
    items: Sequence[Any],
    work: Callable[[Any], Any],
    label: Callable[[Any, int, int], str],
    *,
    keep_events: Callable[[], None] = lambda: None,
) -> list:
    """Do ``work(item)`` for each item, with progress and Cancel between items; the results in order.

    Cancel stops before the next item and raises :class:`Cancelled`; what finished stays done (for
    a multi-slice run: the segmented slices stay in the scene). ``keep_events`` (the shell passes
    ``slicer.app.processEvents``) lets the progress dialog repaint and its Cancel button be pressed.
    """
    results = []
    total = len(items)
    for n, item in enumerate(items):
        run.progress(n, total, label(item, n, total))
        keep_events()
        run.check_cancel()
        results.append(work(item))
    run.progress(total, total, f"{total} of {total} done")
    keep_events()
    return results


def follow(
    run: Run,
    outcomes: Iterable[Any],
    total: int,
    label: Callable[[int, int], str],
    *,
    keep_events: Callable[[], None] = lambda: None,
) -> list:
    """Consume ``outcomes`` (a generator that asks ``run.cancel_requested`` between its steps, such as
    :func:`~ParaspinalSegLib.stack.segment_slices_into_scene`) with progress; the outcomes in order.

    ``label(done, total)`` says what runs next. If the generator stopped because Cancel was pressed,
    :class:`Cancelled` is raised after it, so the run ends with the "cancelled" status; what finished stays.
    """
    results: list = []
    run.progress(0, total, label(0, total))
    keep_events()
    for outcome in outcomes:
        results.append(outcome)
        run.progress(len(results), total, label(len(results), total))
        keep_events()
    run.check_cancel()
    return results


def refuse_reason(view: PanelView, own_problem: str) -> str:
    """Why a button is disabled ("" if enabled): busy first, then the button's own reason."""
    if view.busy:
        return f"Wait until '{view.task.value}' has finished."
    return own_problem


__all__ = (
    "Task", "PROGRESS_DIALOG_TASKS", "Cancelled", "PanelView", "PanelState", "Run", "run_steps", "follow",
    "refuse_reason",
)
