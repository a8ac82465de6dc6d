"""All or nothing: a full disk, a writer that fails or cuts a file short, a move that fails half-way, an
existing (hand-edited) output, hostile input names. Each case asserts the exit code, the one message line
and the exact set of files left.

The full-disk cases use a real, small tmpfs where this machine lets the tests mount one (root on Linux);
the writer that fails midway runs everywhere.
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

sitk = pytest.importorskip("SimpleITK")
pytest.importorskip("torch")
pytest.importorskip("slicer")

from ParaspinalSegLib import cli, outputs  # noqa: E402

REPO = Path(__file__).resolve().parents[3]
NAMES = {"case01.seg.nrrd", "case01_labels.nii.gz", "case01_boxes.mrk.json", "case01_measurements.csv",
         "case01_overlay.png"}


@pytest.fixture(scope="module")
def weights(tmp_path_factory, save_tiny_weights) -> Path:
    return save_tiny_weights(tmp_path_factory.mktemp("weights") / "tiny")


def _volume(path: Path) -> Path:
    rng = np.random.default_rng(0)
    img = sitk.GetImageFromArray(rng.normal(200.0, 20.0, size=(3, 48, 40)).astype(np.int16))
    img.SetSpacing((1.5, 1.5, 4.0))
    sitk.WriteImage(img, str(path))
    return path


@pytest.fixture(scope="module")
def volume(tmp_path_factory) -> Path:
    return _volume(tmp_path_factory.mktemp("vol") / "case01.nii.gz")


def segment(capsys, volume, out, weights, *extra) -> tuple[int, list[str]]:
    code = cli.main([str(a) for a in ("segment", volume, "--slice", 1, "--weights", weights, "--device", "cpu",
                                      "--out", out, *extra)])
    return code, capsys.readouterr().err.strip().splitlines()


def tree(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (relative path → bytes); folders appear as entries ending in /."""
    if not folder.exists():
        return {}
    return {str(p.relative_to(folder)) + ("/" if p.is_dir() else ""): (b"" if p.is_dir() else p.read_bytes())
            for p in sorted(folder.rglob("*"))}


# ----------------------------------------------------------------------------------------------------
# Existing outputs


def test_existing_outputs_are_kept_unless_overwrite(capsys, tmp_path, volume, weights):
    out = tmp_path / "out"
    code, err = segment(capsys, volume, out, weights)
    assert code == 0, err
    seg = out / "case01.seg.nrrd"
    edited = seg.read_bytes().replace(b"Segment0_Name:=", b"Segment0_Name:=edited ", 1)  # a hand edit
    seg.write_bytes(edited)
    before = tree(out)

    # Refused before the model is loaded: bogus weights are never even opened.
    code, err = segment(capsys, volume, out, tmp_path / "no_such_weights.json")
    assert code == cli.EXIT_INPUT_ERROR and len(err) == 1
    assert "output already exists" in err[0] and "case01.seg.nrrd" in err[0] and "--overwrite" in err[0]
    assert tree(out) == before

    code, err = segment(capsys, volume, out, weights, "--overwrite")
    assert code == 0, err
    assert set(os.listdir(out)) == NAMES and seg.read_bytes() != edited


def test_a_concurrent_writer_is_not_overwritten_at_commit(tmp_path, volume, weights, monkeypatch, capsys):
    """The no-clobber move: a file that appears while the slice is being segmented wins, ours is rolled back."""
    out = tmp_path / "out"
    out.mkdir()
    real_commit = outputs.StagedOutputs.commit

    def commit_after_someone_else(self):
        (out / "case01_overlay.png").write_bytes(b"theirs")
        return real_commit(self)

    monkeypatch.setattr(outputs.StagedOutputs, "commit", commit_after_someone_else)
    code, err = segment(capsys, volume, out, weights)
    assert code == cli.EXIT_INPUT_ERROR and len(err) == 1 and "already exists" in err[0]
    assert tree(out) == {"case01_overlay.png": b"theirs"}


# ----------------------------------------------------------------------------------------------------
# Faults while writing


def test_writer_failing_midway_leaves_nothing(capsys, tmp_path, volume, weights, monkeypatch):
    from ParaspinalSegLib import overlay

    def full_disk(path, *args, **kwargs):
        Path(path).write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 100)  # part of the file, then the disk is full
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(overlay, "save_overlay", full_disk)
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    code, err = segment(capsys, volume, out, weights)
    assert code == cli.EXIT_IO_ERROR and len(err) == 1 and "No space left on device" in err[0], err
    assert tree(out) == {"notes.txt": b"mine"}

    code, err = segment(capsys, volume, tmp_path / "new" / "deeper", weights)  # folders it made go too
    assert code == cli.EXIT_IO_ERROR and not (tmp_path / "new").exists()


def test_writer_that_ignores_a_full_disk_is_caught(capsys, tmp_path, volume, weights, monkeypatch):
    from ParaspinalSegLib import overlay

    real = overlay.save_overlay

    def cut_short(path, *args, **kwargs):
        real(path, *args, **kwargs)
        data = Path(path).read_bytes()
        Path(path).write_bytes(data[: len(data) // 2])  # returns as if all went well

    monkeypatch.setattr(overlay, "save_overlay", cut_short)
    code, err = segment(capsys, volume, tmp_path / "out", weights)
    assert code == cli.EXIT_IO_ERROR and len(err) == 1 and "case01_overlay.png was written incomplete" in err[0]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("overwrite", [False, True])
def test_move_failing_half_way_is_rolled_back(capsys, tmp_path, volume, weights, monkeypatch, overwrite):
    out = tmp_path / "out"
    if overwrite:
        assert segment(capsys, volume, out, weights)[0] == 0
    before = tree(out)
    real_place = outputs._place
    calls = []

    def place(src, dst):
        calls.append(dst)
        if len(calls) == 3:
            raise OSError(errno.EIO, "Input/output error", str(dst))
        real_place(src, dst)

    monkeypatch.setattr(outputs, "_place", place)
    code, err = segment(capsys, volume, out, weights, *(["--overwrite"] if overwrite else []))
    assert code == cli.EXIT_IO_ERROR and len(err) == 1 and "Input/output error" in err[0]
    assert len(calls) == 3
    assert tree(out) == before  # two files had moved in: taken back; replaced ones restored


# ----------------------------------------------------------------------------------------------------
# A real full file system


@pytest.fixture
def small_fs(tmp_path):
    """A 256 kB tmpfs mounted for the test (skips where mounting is not allowed)."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if sys.platform != "linux" or os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("mounting a small tmpfs needs root on Linux; the failing-writer tests cover the rest")
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)], capture_output=True, timeout=30)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {res.stderr.decode(errors='replace').strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True, timeout=30)


def _fill(mnt: Path, leave_bytes: int) -> None:
    """Fill the file system so that about ``leave_bytes`` stay free."""
    free = shutil.disk_usage(mnt).free
    with open(mnt / "filler", "wb") as f:
        f.write(b"\0" * max(0, free - leave_bytes))


@pytest.mark.parametrize("leave_kb", [0, 8, 24, 40])
def test_full_disk_segment_exits_1_and_leaves_no_new_file(capsys, small_fs, volume, weights, leave_kb):
    _fill(small_fs, leave_kb * 1024)
    before = tree(small_fs)
    code, err = segment(capsys, volume, small_fs / "out", weights)
    assert code == cli.EXIT_IO_ERROR, err
    assert len(err) == 1 and err[0].startswith("paraspinalseg: error: "), err
    assert tree(small_fs) == before


def test_full_disk_stops_a_batch_with_consistent_files(capsys, small_fs, volume, weights):
    from test_batch_runs import assert_consistent

    listing = small_fs.parent / "list.csv"
    listing.write_text("".join(f"{volume},{n % 3},L{n}\n" for n in range(12)))
    out = small_fs / "out"
    code = cli.main([str(a) for a in ("batch", listing, "--out", out, "--weights", weights, "--device", "cpu",
                                      "--no-progress")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == cli.EXIT_IO_ERROR and len(err) == 1, err
    record = assert_consistent(out)
    assert record["state"] in ("running", "stopped")  # whatever the full disk let it record
    assert not [r for r in record["rows"] if r["status"] == "failed"]  # a full disk is not a bad row


# ----------------------------------------------------------------------------------------------------
# Names


@pytest.mark.parametrize("file_name, name", [
    ("...nii.gz", "volume"), ("-rf.nii.gz", "rf"), ("a b;c$(x).nii.gz", "a_b_c__x_"), (".hidden.nrrd", "hidden"),
])
def test_output_names_stay_inside_out_whatever_the_input_is_called(capsys, tmp_path, weights, file_name, name):
    src = tmp_path / "in"
    src.mkdir()
    vol = _volume(src / file_name)
    out = tmp_path / "out"
    code = cli.main(["segment", str(vol), "--slice", "0", "--weights", str(weights), "--device", "cpu", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    assert set(os.listdir(out)) == {n.replace("case01", name) for n in NAMES}
    assert sorted(os.listdir(tmp_path)) == ["in", "out"]


# ----------------------------------------------------------------------------------------------------
# Interrupting segment


def test_interrupted_segment_writes_nothing(tmp_path, volume, weights):
    if not Path("/proc/self/status").exists():
        pytest.skip("needs /proc to see when the signal handlers are installed")
    from test_batch_runs import TIMEOUT_S, _handlers_installed, _spawn, _wait_for

    out, tmpdir = tmp_path / "out", tmp_path / "tmp"
    proc = _spawn(["segment", volume, "--slice", 1, "--weights", weights, "--device", "cpu", "--out", out], tmpdir)
    try:
        _wait_for(lambda: _handlers_installed(proc.pid), proc, "the signal handlers")
        time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=TIMEOUT_S)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert err.strip().splitlines() == ["paraspinalseg: interrupted by SIGINT; nothing new was written"]
    assert not out.exists() and os.listdir(tmpdir) == []


def test_staging_left_by_a_killed_writer_is_removed_by_the_next_one(capsys, tmp_path, volume, weights):
    from ParaspinalSegLib.outputs import _own_prefix

    out = tmp_path / "out"
    out.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = out / _own_prefix(outputs.STAGING_PREFIX).replace(f"{os.getpid()}@", f"{dead.pid}@")
    (stale.parent / (stale.name + "abc")).mkdir()
    alive = out / (_own_prefix(outputs.STAGING_PREFIX) + "xyz")  # this process: still running, kept
    alive.mkdir()
    code, err = segment(capsys, volume, out, weights)
    assert code == 0, err
    assert set(os.listdir(out)) == NAMES | {alive.name}
    alive.rmdir()
