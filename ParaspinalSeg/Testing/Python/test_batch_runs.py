"""``paraspinalseg batch`` under faults: interrupts at several moments, two runs on one folder, reruns,
``--resume`` and ``--overwrite``, a stale lock. Real subprocesses of the command, each bounded in time,
each with its own TMPDIR that must be empty afterwards.

Whatever moment a run is stopped at, the folder must be *consistent*: the row folders present are exactly
the rows ``batch_run.json`` calls done, ``measurements.csv`` holds exactly their tables, ``errors.csv``
exactly the failed rows, and no staging folder, temporary file or lock is left.
"""

from __future__ import annotations

import contextlib
import csv
import json
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

from ParaspinalSegLib import anatomy, cli  # noqa: E402

REPO = Path(__file__).resolve().parents[3]
N_ROWS = 6
COMBINED = {"batch_run.json", "measurements.csv", "errors.csv"}
#: Longest a subprocess may take here (a loaded 2-core box); a hang fails the test instead of the suite.
TIMEOUT_S = 180


@pytest.fixture(scope="module")
def weights(tmp_path_factory, save_tiny_weights) -> Path:
    return save_tiny_weights(tmp_path_factory.mktemp("weights") / "tiny")


@pytest.fixture(scope="module")
def listing(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("cases")
    rng = np.random.default_rng(0)
    arr = rng.normal(200.0, 20.0, size=(3, 48, 40)).astype(np.int16)
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((1.5, 1.5, 4.0))
    sitk.WriteImage(img, str(d / "case01.nii.gz"))
    lst = d / "list.csv"
    lst.write_text("volume,slice,level\n" + "".join(f"case01.nii.gz,{n % 3},L{n}\n" for n in range(N_ROWS)))
    return lst


def _env(tmpdir: Path) -> dict[str, str]:
    tmpdir.mkdir(exist_ok=True)
    return dict(os.environ, PYTHONPATH=f"{REPO / 'ParaspinalSeg'}{os.pathsep}{REPO}", OMP_NUM_THREADS="1",
                TMPDIR=str(tmpdir), PYTHONUNBUFFERED="1")


def _spawn(args, tmpdir: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "ParaspinalSegLib.cli", *map(str, args)], env=_env(tmpdir),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _batch_args(listing: Path, out: Path, weights: Path, *extra) -> list:
    return ["batch", listing, "--out", out, "--weights", weights, "--device", "cpu", "--no-progress", *extra]


def _run(args, tmpdir: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ParaspinalSegLib.cli", *map(str, args)], env=_env(tmpdir),
                          capture_output=True, text=True, timeout=TIMEOUT_S)


def _wait_for(condition, proc: subprocess.Popen, what: str, timeout: float = TIMEOUT_S) -> None:
    end = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (rc {proc.returncode}) before {what}: {proc.stderr.read()}")
        if time.monotonic() > end:
            proc.kill()
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def _handlers_installed(pid: int) -> bool:
    """Both SIGINT and SIGTERM are caught (Linux: the SigCgt mask in /proc)."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    mask = int(next(ln.split()[1] for ln in text.splitlines() if ln.startswith("SigCgt:")), 16)
    return all(mask >> (s - 1) & 1 for s in (signal.SIGINT, signal.SIGTERM))


def _row_folders(out: Path) -> set[str]:
    return {p.name for p in out.iterdir() if p.is_dir()} if out.is_dir() else set()


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def assert_consistent(out: Path) -> dict:
    """The folder describes exactly the rows its record says; nothing else is there. Returns the record."""
    names = set(os.listdir(out)) if out.is_dir() else set()
    assert not [n for n in names if n.startswith(".")], names  # no staging, temporary file or lock
    if not names:
        return {}
    assert COMBINED <= names, names
    record = json.loads((out / "batch_run.json").read_text())
    done = [r for r in record["rows"] if r["status"] == "done"]
    failed = [r for r in record["rows"] if r["status"] == "failed"]
    assert names == COMBINED | {r["folder"] for r in done}
    for r in done:
        assert len(os.listdir(out / r["folder"])) == 5
    table = _rows(out / "measurements.csv")
    assert len(table) == anatomy.NUM_STRUCTURES * len(done)
    assert [t["Level"] for t in table[:: anatomy.NUM_STRUCTURES]] == [r["level"] for r in done]
    assert [int(e["row"]) for e in _rows(out / "errors.csv")] == [r["row"] for r in failed]
    assert record["combined"] == {"measurements.csv": [r["row"] for r in done], "errors.csv": [r["row"] for r in failed]}
    return record


# ----------------------------------------------------------------------------------------------------
# Interrupts


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
@pytest.mark.parametrize("moment", ["start-up imports", "first row done", "third row done"])
def test_interrupt_leaves_a_consistent_folder_and_resume_finishes_it(tmp_path, listing, weights, sig, moment):
    if not Path("/proc/self/status").exists():
        pytest.skip("needs /proc to see when the signal handlers are installed")
    out, tmpdir = tmp_path / "out", tmp_path / "tmp"
    proc = _spawn(_batch_args(listing, out, weights), tmpdir)
    try:
        _wait_for(lambda: _handlers_installed(proc.pid), proc, "the signal handlers")
        if moment != "start-up imports":
            n = 1 if moment == "first row done" else 3
            _wait_for(lambda: len(_row_folders(out)) >= n, proc, f"{n} row folders")
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=TIMEOUT_S)
    finally:
        proc.kill()
    assert proc.returncode == 128 + sig, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"paraspinalseg: interrupted by {signal.Signals(sig).name}"), err
    record = assert_consistent(out)
    if moment != "start-up imports":
        assert record["state"] == "interrupted" and record["interrupted_by"] == signal.Signals(sig).name
        assert not [r for r in record["rows"] if r["status"] == "failed"]  # an interrupt is never a bad row
        assert "--resume" in lines[0]
    assert os.listdir(tmpdir) == []
    if moment != "third row done":
        return

    # --resume keeps the rows done (same folders, untouched) and runs the rest.
    before = {f: (out / f).stat().st_ino for f in _row_folders(out)}
    res = _run(_batch_args(listing, out, weights, "--resume"), tmpdir)
    assert res.returncode == 0, res.stderr
    record = assert_consistent(out)
    assert record["state"] == "finished" and len(_row_folders(out)) == N_ROWS
    assert {f: (out / f).stat().st_ino for f in before} == before
    if before:
        assert f"({len(before)} done before, kept)" in res.stdout
    assert os.listdir(tmpdir) == []


def test_killed_run_leaves_no_lock_that_blocks_and_its_staging_is_cleaned(tmp_path, listing, weights):
    out, tmpdir = tmp_path / "out", tmp_path / "tmp"
    proc = _spawn(_batch_args(listing, out, weights), tmpdir)
    try:
        _wait_for(lambda: len(_row_folders(out)) >= 1, proc, "a row folder")
        _wait_for(lambda: any(n.startswith(".paraspinalseg-staging-") for n in os.listdir(out)), proc, "a staging folder")
        proc.kill()  # SIGKILL: nothing can clean up
        proc.wait(timeout=TIMEOUT_S)
    finally:
        proc.kill()
    assert (out / ".paraspinalseg.lock").exists()
    res = _run(_batch_args(listing, out, weights, "--resume"), tmpdir)
    assert res.returncode == 0, res.stderr
    record = assert_consistent(out)  # the stale lock was taken over, the staging folder removed
    assert record["state"] == "finished"


# ----------------------------------------------------------------------------------------------------
# Two runs, reruns


def test_second_run_on_the_same_folder_is_refused_naming_the_holder(tmp_path, listing, weights, capsys):
    out, tmpdir = tmp_path / "out", tmp_path / "tmp"
    proc = _spawn(_batch_args(listing, out, weights), tmpdir)
    try:
        _wait_for(lambda: (out / ".paraspinalseg.lock").exists() and (out / ".paraspinalseg.lock").stat().st_size > 0,
                  proc, "the lock")
        code = cli.main(list(map(str, _batch_args(listing, out, weights))))
        err = capsys.readouterr().err
        snapshot = {f for f in _row_folders(out) if not f.startswith(".")}
        _, first_err = proc.communicate(timeout=TIMEOUT_S)
    finally:
        proc.kill()
    assert code == cli.EXIT_LOCKED
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "in use by another paraspinalseg run" in lines[0] and f"process {proc.pid}" in lines[0], err
    assert proc.returncode == 0, first_err
    record = assert_consistent(out)
    assert record["state"] == "finished" and len(_row_folders(out)) == N_ROWS and snapshot <= _row_folders(out)


def test_rerun_is_refused_and_overwrite_replaces_the_whole_run(tmp_path, listing, weights, capsys):
    out, tmpdir = tmp_path / "out", tmp_path / "tmp"
    assert _run(_batch_args(listing, out, weights), tmpdir).returncode == 0
    files = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}

    code = cli.main(list(map(str, _batch_args(listing, out, weights))))
    err = capsys.readouterr().err
    assert code == cli.EXIT_INPUT_ERROR and "--resume" in err and "--overwrite" in err and len(err.strip().splitlines()) == 1
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == files  # untouched

    # A rerun with --overwrite in which every row fails: the table describes that run (no rows), not the old one.
    bad = tmp_path / "bad.csv"
    bad.write_text("missing1.nii.gz,0,L1\nmissing2.nii.gz,0,L2\n")
    code = cli.main(list(map(str, _batch_args(bad, out, weights, "--overwrite"))))
    capsys.readouterr()
    assert code == cli.EXIT_INPUT_ERROR
    record = assert_consistent(out)
    assert set(os.listdir(out)) == COMBINED and _rows(out / "measurements.csv") == []
    assert [e["error"].startswith("no such file") for e in _rows(out / "errors.csv")] == [True, True]
    assert record["state"] == "finished"
    assert os.listdir(tmpdir) == []


def test_resume_refuses_another_list_or_other_settings(tmp_path, listing, weights, capsys):
    out, tmpdir = tmp_path / "out", tmp_path / "tmp"
    assert _run(_batch_args(listing, out, weights), tmpdir).returncode == 0
    files = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    other = tmp_path / "other.csv"
    other.write_text(listing.read_text().replace("case01.nii.gz", str(listing.parent / "case01.nii.gz")).replace(",L3", ",L3/L4"))
    for args, message in (
        (_batch_args(other, out, weights, "--resume"), "not the one of the run"),
        (_batch_args(listing, out, weights, "--resume", "--threshold-method", "otsu"), "other settings"),
        (_batch_args(listing, out, weights, "--resume", "--overwrite"), "not allowed with"),
    ):
        with pytest.raises(SystemExit) if "--overwrite" in args else contextlib.nullcontext():
            code = cli.main(list(map(str, args)))
            assert code == cli.EXIT_INPUT_ERROR
        err = capsys.readouterr().err
        assert message in err, err
        assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == files


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path, listing, weights, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / ".paraspinalseg.lock").write_text(json.dumps({"pid": 2 ** 22 + 7, "host": "elsewhere"}))
    code = cli.main(list(map(str, _batch_args(listing, out, weights, "--resume"))))
    assert code == 0, capsys.readouterr().err
    assert assert_consistent(out)["state"] == "finished"


def test_sighup_stops_a_batch_like_sigterm(tmp_path, listing, weights):
    if not Path("/proc/self/status").exists() or not hasattr(signal, "SIGHUP"):
        pytest.skip("needs /proc and SIGHUP")
    out, tmpdir = tmp_path / "out", tmp_path / "tmp"
    proc = _spawn(_batch_args(listing, out, weights), tmpdir)
    try:
        _wait_for(lambda: len(_row_folders(out)) >= 1, proc, "a row folder")
        proc.send_signal(signal.SIGHUP)
        _, err = proc.communicate(timeout=TIMEOUT_S)
    finally:
        proc.kill()
    assert proc.returncode == 129 and err.strip().startswith("paraspinalseg: interrupted by SIGHUP"), err
    assert assert_consistent(out)["interrupted_by"] == "SIGHUP"


def test_a_run_that_fails_before_its_first_row_leaves_nothing(tmp_path, listing, weights, capsys, tampered_weights):
    bad = tampered_weights(weights)  # fails only when the model loads, after the folder was checked and locked
    out = tmp_path / "new" / "out"
    code = cli.main(list(map(str, _batch_args(listing, out, bad))))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == cli.EXIT_INPUT_ERROR and len(err) == 1 and "checksum" in err[0], err
    assert not (tmp_path / "new").exists()

    # A previous run replaced with --overwrite stays as it was when the new run cannot start.
    out = tmp_path / "out"
    assert cli.main(list(map(str, _batch_args(listing, out, weights)))) == 0
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    code = cli.main(list(map(str, _batch_args(listing, out, bad, "--overwrite"))))
    capsys.readouterr()
    assert code == cli.EXIT_INPUT_ERROR and {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_out_that_is_a_file_is_an_input_error(tmp_path, listing, weights, capsys):
    (tmp_path / "taken").write_text("x")
    code = cli.main(list(map(str, _batch_args(listing, tmp_path / "taken", weights))))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == cli.EXIT_INPUT_ERROR and len(err) == 1 and "is a file, not a folder" in err[0]
    assert (tmp_path / "taken").read_text() == "x"


def test_resume_from_another_folder_and_a_damaged_row_is_never_replaced(tmp_path, listing, weights, capsys, monkeypatch):
    out = tmp_path / "out"
    assert cli.main(list(map(str, _batch_args(listing, out, weights)))) == 0
    record = json.loads((out / "batch_run.json").read_text())
    damaged = record["rows"][1]["folder"]
    next((out / damaged).glob("*_overlay.png")).unlink()  # a row folder that lost a file is not done ...
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    monkeypatch.chdir(listing.parent.parent)
    relative = Path(listing.parent.name) / listing.name  # the same list, named from elsewhere
    code = cli.main(list(map(str, _batch_args(relative, out, weights, "--resume"))))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == cli.EXIT_INPUT_ERROR and len(err) == 1 and f"{damaged} exists but does not hold" in err[0], err
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before  # ... and not replaced either

    shutil.rmtree(out / damaged)  # the user's decision: run it again
    kept = {r["folder"]: (out / r["folder"]).stat().st_ino for r in record["rows"] if r["folder"] != damaged}
    code = cli.main(list(map(str, _batch_args(relative, out, weights, "--resume"))))
    stdout = capsys.readouterr().out
    assert code == 0 and f"({N_ROWS - 1} done before, kept)" in stdout
    assert {f: (out / f).stat().st_ino for f in kept} == kept
    assert len(os.listdir(out / damaged)) == 5 and assert_consistent(out)["state"] == "finished"
