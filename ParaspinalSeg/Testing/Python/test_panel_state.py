"""The module panel's state machine (ParaspinalSegLib.panel_state), driven without Qt.

The shell in ParaspinalSeg.py does exactly this per button: ``run = state.start(...)``; ``None`` means
refused; ``with run:`` around the work; it applies every PanelView the state reports.
"""

from __future__ import annotations

import pytest

from ParaspinalSegLib.panel_state import PROGRESS_DIALOG_TASKS, Cancelled, PanelState, Task, run_steps


class Recorder:
    """Collects the views the shell would apply (its on_change callback)."""

    def __init__(self):
        self.views = []

    def __call__(self, view):
        self.views.append(view)


def test_a_run_disables_actions_and_ends_idle_with_its_status():
    seen = Recorder()
    state = PanelState(seen)
    run = state.start(Task.SEGMENT_SLICE, "Segmenting slice 3…", failed="Segmentation failed; nothing was written.")
    assert run is not None
    assert state.busy and not state.view.actions_enabled and state.view.status == "Segmenting slice 3…"
    assert not state.view.show_progress_dialog  # one slice: busy cursor and status only
    with run:
        run.succeed("Segmented slice 3.")
    assert not state.busy and state.view.actions_enabled
    assert state.view.status == "Segmented slice 3." and state.last_error is None
    assert [v.busy for v in seen.views] == [True, False]


def test_a_second_click_while_running_is_refused_and_changes_nothing():
    state = PanelState()
    run = state.start(Task.INSTALL, "Installing PyTorch…", failed="Installation failed.")
    before = state.view
    # processEvents() inside the install delivers a click on Segment (or a second click on install):
    assert state.start(Task.SEGMENT_SLICE, "Segmenting…", failed="x") is None
    assert state.start(Task.INSTALL, "Installing…", failed="x") is None
    assert state.view == before
    with run:
        pass
    assert state.start(Task.SEGMENT_SLICE, "Segmenting…", failed="x") is not None  # idle again: accepted


@pytest.mark.parametrize("error", [RuntimeError("CUDA out of memory"), ValueError("slice 7 is outside the volume"),
                                   ImportError("No module named torch")])
def test_a_failure_resets_the_panel_and_says_nothing_was_written(error):
    state = PanelState()
    run = state.start(Task.SEGMENT_SLICE, "Segmenting slice 2…", failed="Segmentation failed; nothing was written.")
    with run:
        run.step("Loading the model…")
        raise error
    # The exception is not propagated (a Qt slot must return), the panel is idle and says what happened.
    assert not state.busy and state.view.actions_enabled and state.view.progress is None
    assert state.view.status == f"Segmentation failed; nothing was written. {error}"
    assert state.last_error is error
    assert state.start(Task.UPDATE_MEASUREMENTS, "Updating…", failed="x") is not None


def test_keyboard_interrupt_resets_the_state_but_is_not_swallowed():
    state = PanelState()
    with pytest.raises(KeyboardInterrupt):
        with state.start(Task.SEGMENT_SLICE, "Segmenting…", failed="Stopped."):
            raise KeyboardInterrupt
    assert not state.busy and state.view.status == "Stopped."


def test_multi_slice_run_shows_progress_and_cancel_keeps_finished_slices():
    state = PanelState()
    done = []
    cancel_after = 2

    def segment(k):
        done.append(k)
        return f"outcome {k}"

    def events():  # what processEvents delivers: the user presses Cancel once two slices are done
        if len(done) == cancel_after:
            state.cancel()

    run = state.start(Task.SEGMENT_SLICES, "Segmenting slices…", failed="Failed.",
                      cancelled="Cancelled: {done} of {total} slices segmented and kept.")
    assert state.view.show_progress_dialog and state.view.can_cancel
    with run:
        run_steps(run, [4, 5, 6, 7], segment, lambda k, n, total: f"Slice {k} ({n + 1} of {total})", keep_events=events)
    assert done == [4, 5]  # slice 6 never started
    assert isinstance(state.last_error, Cancelled)
    assert state.view.status == "Cancelled: 2 of 4 slices segmented and kept."
    assert not state.busy and not state.view.show_progress_dialog


def test_progress_counts_every_step_and_cancel_is_ignored_when_idle_or_not_cancellable():
    seen = Recorder()
    state = PanelState(seen)
    state.cancel()  # idle: nothing happens
    assert seen.views == []
    with state.start(Task.SEGMENT_SLICE, "one slice", failed="x"):
        state.cancel()  # one slice has no Cancel
        assert not state.view.cancel_requested
    with state.start(Task.SEGMENT_SLICES, "slices", failed="x") as run:
        results = run_steps(run, ["a", "b"], str.upper, lambda item, n, total: f"{n}/{total}")
        run.succeed("done")
    assert results == ["A", "B"]
    progress = [v.progress for v in seen.views if v.progress]
    assert progress == [(0, 2, "0/2"), (1, 2, "1/2"), (2, 2, "2 of 2 done")]
    assert state.view.status == "done"


def test_installs_and_multi_slice_runs_get_the_progress_dialog():
    assert PROGRESS_DIALOG_TASKS == {Task.INSTALL, Task.SEGMENT_SLICES}


def test_segment_slices_run_on_a_real_scene_cancel_keeps_finished_slices(mrml_scene, make_volume, save_tiny_weights,
                                                                          tmp_path):
    """The panel's "Segment slices" path: the state machine follows the stack generator on a real MRML
    scene; Cancel (pressed while the progress dialog repaints) stops before the next slice, the slices done
    stay in the segmentation and the table, and the panel ends idle with the cancelled status."""
    pytest.importorskip("slicer", reason="slicer-core (PyPI) is not installed")
    import numpy as np

    from ParaspinalSegLib import scene
    from ParaspinalSegLib.panel_state import follow
    from ParaspinalSegLib.segmenter import SliceSegmenter
    from ParaspinalSegLib.stack import segment_slices_into_scene

    rng = np.random.default_rng(0)
    array = rng.normal(200.0, 20.0, size=(5, 40, 44))
    jj, ii = np.mgrid[:40, :44]
    array[:, (jj - 24) ** 2 + (ii - 15) ** 2 < 40] = 600.0
    volume = make_volume(mrml_scene, shape=array.shape, spacing=(0.9, 0.9, 4.0), array=array)
    segmenter = SliceSegmenter(save_tiny_weights(tmp_path / "tiny", spacing_mm=1.5), device="cpu")

    state = PanelState()
    run = state.start(Task.SEGMENT_SLICES, "Segmenting slices…", failed="Failed.",
                      cancelled="Cancelled after {done} of {total} slices; the finished slices are kept.")
    finished = []

    def events():
        if len(finished) == 2:
            state.cancel()

    with run:
        outcomes = segment_slices_into_scene(mrml_scene, volume, [0, 1, 2, 3, 4], segmenter,
                                             cancel=lambda: run.cancel_requested,
                                             progress=lambda done, total, outcome: finished.append(outcome.k))
        follow(run, outcomes, 5, lambda done, total: f"slice {done + 1} of {total}", keep_events=events)
    assert finished == [0, 1]
    assert state.view.status == "Cancelled after 2 of 5 slices; the finished slices are kept."
    assert not state.busy
    rows = scene.rows_from_table(scene.find_measurement_table(mrml_scene))
    assert sorted({row["slice"] for row in rows}) == [0, 1]
    assert len(rows) == 2 * 9  # one row per slice x structure
