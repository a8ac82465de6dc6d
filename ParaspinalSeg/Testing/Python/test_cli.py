"""The ``paraspinalseg`` command line: segment, batch, info, and one clear error (exit 2) per bad input.

A tiny randomly initialised BS-ESNet (base width 4) saved with ``save_weights`` stands in for trained
weights: these tests check files, geometry, naming and errors, not segmentation quality. The outputs are
read back with Slicer's own readers (slicer-core) where Slicer would read them.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

sitk = pytest.importorskip("SimpleITK")
torch = pytest.importorskip("torch")
slicer = pytest.importorskip("slicer")

from ParaspinalSegLib import anatomy, cli  # noqa: E402

REPO = Path(__file__).resolve().parents[3]
SHAPE = (3, 48, 40)  # (k, j, i)
SPACING = (1.5, 1.5, 4.0)


@pytest.fixture(scope="module")
def weights(tmp_path_factory, save_tiny_weights) -> Path:
    return save_tiny_weights(tmp_path_factory.mktemp("weights") / "tiny")


def _anatomy_array(shape=SHAPE, seed: int = 0) -> np.ndarray:
    """Noise plus a few bright and dark blobs, so every slice has structure (not constant)."""
    rng = np.random.default_rng(seed)
    k, j, i = shape
    a = rng.normal(200.0, 20.0, size=shape)
    jj, ii = np.mgrid[:j, :i]
    for kk in range(k):
        a[kk][(jj - j * 0.6) ** 2 + (ii - i * 0.3) ** 2 < 40] = 600.0
        a[kk][(jj - j * 0.6) ** 2 + (ii - i * 0.7) ** 2 < 30] = 80.0
        a[kk][(jj - j * 0.3) ** 2 + (ii - i * 0.5) ** 2 < 25] = 900.0
    return a.astype(np.int16)


def _write(path: Path, arr: np.ndarray, direction=None, origin=(10.0, -20.0, 30.0), spacing=SPACING) -> Path:
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    if direction is not None:
        img.SetDirection(tuple(np.asarray(direction, float).ravel()))
    sitk.WriteImage(img, str(path))
    return path


@pytest.fixture(scope="module")
def volume(tmp_path_factory) -> Path:
    return _write(tmp_path_factory.mktemp("vol") / "case01.nii.gz", _anatomy_array())


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


# ----------------------------------------------------------------------------------------------------


def test_help_lists_commands_and_imports_nothing_heavy():
    code = (
        "import sys; from ParaspinalSegLib import cli; p = cli.build_parser(); h = p.format_help(); "
        "print(all(c in h for c in ('segment', 'batch', 'info'))); "
        "print(sorted(m for m in ('torch', 'slicer', 'vtk', 'SimpleITK') if m in sys.modules))"
    )
    env = {"PYTHONPATH": f"{REPO / 'ParaspinalSeg'}:{REPO}", "PATH": "/usr/bin:/bin"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split("\n")[:2] == ["True", "[]"]


def test_version_and_help(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip().startswith("paraspinalseg ")
    with pytest.raises(SystemExit):
        cli.main(["segment", "--help"])
    assert "--slice" in capsys.readouterr().out


def test_segment_writes_the_five_outputs_slicer_can_read(capsys, tmp_path, volume, weights):
    out = tmp_path / "out"
    code, stdout, err = run_cli(capsys, "segment", volume, "--slice", 1, "--level", "L4/L5",
                                "--weights", weights, "--device", "cpu", "--out", out)
    assert code == 0, err
    files = {p.name for p in out.iterdir()}
    assert files == {"case01.seg.nrrd", "case01_labels.nii.gz", "case01_boxes.mrk.json",
                     "case01_measurements.csv", "case01_overlay.png"}
    assert str(out.resolve()) in stdout and "device cpu" in stdout and " s" in stdout

    # Labels on the input grid and geometry; only the segmented slice is labelled.
    labels_img = sitk.ReadImage(str(out / "case01_labels.nii.gz"))
    ref = sitk.ReadImage(str(volume))
    assert labels_img.GetSize() == ref.GetSize()
    np.testing.assert_allclose(labels_img.GetOrigin(), ref.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(labels_img.GetSpacing(), ref.GetSpacing(), atol=1e-5)
    np.testing.assert_allclose(labels_img.GetDirection(), ref.GetDirection(), atol=1e-6)
    labels = sitk.GetArrayFromImage(labels_img)
    assert labels.dtype == np.uint8 and not labels[0].any() and not labels[2].any()
    assert set(np.unique(labels[1])) <= set(range(10))

    # .seg.nrrd: nine segments with IDs, names, colours, terminology; content equals the label file.
    from ParaspinalSegLib import scene, slice_outputs
    from ParaspinalSegLib.headless import create_headless_scene
    from ParaspinalSegLib.volume_io import read_volume

    mrml, app_logic = create_headless_scene()
    seg = mrml.AddNewNodeByClass("vtkMRMLSegmentationNode")
    storage = mrml.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
    storage.SetFileName(str(out / "case01.seg.nrrd"))
    assert storage.ReadData(seg)
    segmentation = seg.GetSegmentation()
    assert sorted(segmentation.GetSegmentIDs()) == sorted(s.key for s in anatomy.STRUCTURES)
    for s in anatomy.STRUCTURES:
        segment = segmentation.GetSegment(s.key)
        assert segment.GetName() == s.name
        np.testing.assert_allclose(segment.GetColor(), s.color, atol=1e-6)
        assert segment.GetTerminology().rstrip("|") == s.terminology.rstrip("|")
    vol_node = slice_outputs._add_volume_node(mrml, read_volume(volume))
    np.testing.assert_array_equal(scene.read_slice_labels(seg, vol_node, 1), labels[1])

    # Boxes: one file, Slicer's markups logic loads one locked ROI per found structure, named after it.
    found = sorted(int(v) for v in np.unique(labels[1]) if v)
    boxes = json.loads((out / "case01_boxes.mrk.json").read_text())
    assert [m["type"] for m in boxes["markups"]] == ["ROI"] * len(found)
    app_logic.GetModuleLogic("Markups").LoadMarkups(str(out / "case01_boxes.mrk.json"))
    rois = mrml.GetNodesByClass("vtkMRMLMarkupsROINode")
    names = {rois.GetItemAsObject(n).GetName() for n in range(rois.GetNumberOfItems())}
    assert names == {f"case01 {anatomy.BY_VALUE[v].name} box" for v in found}

    # Table: one row per structure, units in the header, level and slice recorded.
    with open(out / "case01_measurements.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == anatomy.NUM_STRUCTURES
    assert {"CSA (mm2)", "Functional CSA (mm2)", "Fat (%)"} <= set(rows[0])
    assert {r["Level"] for r in rows} == {"L4/L5"} and {r["Slice"] for r in rows} == {"1"}
    by_id = {r["Segment ID"]: r for r in rows}
    for v in range(1, 10):
        r = by_id[anatomy.BY_VALUE[v].key]
        n = int((labels[1] == v).sum())
        assert r["Found"] == ("yes" if n else "no")
        if n:
            assert float(r["CSA (mm2)"]) == pytest.approx(n * SPACING[0] * SPACING[1])

    assert (out / "case01_overlay.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Quality control: a QC cell in every row and one QC line on the terminal.
    assert all(r["QC"] == "ok" or r["QC"].startswith("check: ") for r in rows)
    assert "QC: " in stdout


def test_same_anatomy_stored_lps_or_ras_gives_the_same_result(capsys, tmp_path, weights):
    """Physically identical volumes stored with opposite I/J axes: labels and boxes coincide in space."""
    arr = _anatomy_array(seed=3)
    lps = _write(tmp_path / "lps.nrrd", arr)
    k, j, i = arr.shape
    origin = np.array([10.0, -20.0, 30.0]) + np.array([(i - 1) * SPACING[0], (j - 1) * SPACING[1], 0.0])
    ras = _write(tmp_path / "ras.nrrd", arr[:, ::-1, ::-1].copy(), direction=np.diag([-1.0, -1.0, 1.0]),
                 origin=tuple(origin))
    for path in (lps, ras):
        code, _, err = run_cli(capsys, "segment", path, "--slice", 2, "--weights", weights, "--device", "cpu",
                               "--out", tmp_path / "out")
        assert code == 0, err
    a = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "out" / "lps_labels.nii.gz")))
    b = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "out" / "ras_labels.nii.gz")))
    b = b[:, ::-1, ::-1]
    assert a[2].any()
    # A swapped side or flipped axis would disagree almost everywhere. Exact equality is not asked for:
    # when two components of a structure tie in size, which one "keep largest" keeps may depend on the
    # storage order (reported to the segmenter's owner).
    assert np.mean(a[a > 0] == b[a > 0]) > 0.97 and np.mean(a[b > 0] == b[b > 0]) > 0.97

    def centres(name):
        doc = json.loads((tmp_path / "out" / f"{name}_boxes.mrk.json").read_text())
        return {m["name"].split(" ", 1)[1]: np.array(m["center"]) for m in doc["markups"]}

    ca, cb = centres("lps"), centres("ras")
    assert ca.keys() == cb.keys() and ca
    same = [f"{anatomy.BY_VALUE[v].name} box" for v in range(1, 10) if np.array_equal(a == v, b == v) and (a == v).any()]
    assert same
    for key in same:  # boxes of identical masks lie at the same place in patient space
        np.testing.assert_allclose(ca[key], cb[key], atol=1e-3)


def test_single_slice_volume_needs_no_slice_option(capsys, tmp_path, weights):
    two_d = tmp_path / "one.nrrd"
    img = sitk.GetImageFromArray(_anatomy_array((1, 40, 40))[0])
    img.SetSpacing((1.5, 1.5))
    sitk.WriteImage(img, str(two_d))
    code, stdout, err = run_cli(capsys, "segment", two_d, "--weights", weights, "--device", "cpu",
                                "--threshold-method", "otsu", "--out", tmp_path / "o")
    assert code == 0, err
    assert "slice 0 of one" in stdout
    assert sitk.ReadImage(str(tmp_path / "o" / "one_labels.nii.gz")).GetDimension() == 2


# ----------------------------------------------------------------------------------------------------
# Bad input: one error line, exit status 2, nothing written.


def _bad_volume(kind: str, d: Path) -> tuple[Path | str, list[str]]:
    """A bad input of the given kind and the extra arguments that go with it."""
    if kind == "missing":
        return d / "nope.nii.gz", []
    if kind == "no volume":
        return "", []
    if kind == "rgb":
        p = d / "rgb.nrrd"
        sitk.WriteImage(sitk.Image([16, 16, 2], sitk.sitkVectorUInt8, 3), str(p))
        return p, ["--slice", "0"]
    if kind == "vector":
        p = d / "vec.nii.gz"
        sitk.WriteImage(sitk.Image([16, 16, 2], sitk.sitkVectorFloat32, 2), str(p))
        return p, ["--slice", "0"]
    if kind == "4d":
        p = d / "seq.nii.gz"
        sitk.WriteImage(sitk.Image([16, 16, 2, 3], sitk.sitkInt16), str(p))
        return p, ["--slice", "0"]
    if kind == "unreadable":
        p = d / "junk.nrrd"
        p.write_bytes(b"NRRD0004\nthis is not a header\n")
        return p, ["--slice", "0"]
    arr = _anatomy_array().astype(np.float32)
    if kind == "slice out of range":
        return _write(d / "v.nii.gz", arr), ["--slice", "3"]
    if kind == "slice missing":
        return _write(d / "v.nii.gz", arr), []
    if kind == "all-zero slice":
        arr[1] = 0
        return _write(d / "v.nii.gz", arr), ["--slice", "1"]
    if kind == "nan":
        arr[1, 5, 5] = np.nan
        return _write(d / "v.nii.gz", arr), ["--slice", "1"]
    if kind == "sagittal":  # slices stacked left-right: the segmenter refuses non-axial slices
        sagittal = np.array([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])
        return _write(d / "v.nii.gz", arr, direction=sagittal), ["--slice", "1"]
    raise AssertionError(kind)


@pytest.mark.parametrize(
    "kind, message",
    [
        ("missing", "no such file"),
        ("no volume", "no volume"),
        ("rgb", "colour/vector"),
        ("vector", "colour/vector"),
        ("4d", "4-D"),
        ("unreadable", "cannot read"),
        ("slice out of range", "out of range"),
        ("slice missing", "--slice"),
        ("all-zero slice", "empty"),
        ("nan", "NaN"),
        ("sagittal", "not axial"),
    ],
)
def test_bad_input_gives_one_error_line_and_writes_nothing(capsys, tmp_path, weights, kind, message):
    path, extra = _bad_volume(kind, tmp_path)
    out = tmp_path / "out"
    code, stdout, err = run_cli(capsys, "segment", path, *extra, "--weights", weights, "--device", "cpu",
                                "--out", out)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("paraspinalseg: error: ") and message in lines[0], err
    assert not out.exists()


def test_weights_failing_checksum_is_refused_and_nothing_written(capsys, tmp_path, volume, weights, tampered_weights):
    bad = tampered_weights(weights)  # one tensor byte changed: same size, same layout, wrong checksum
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "segment", volume, "--slice", 0, "--weights", bad,
                           "--device", "cpu", "--out", out)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("paraspinalseg: error: "), err
    assert "checksum" in lines[0].lower() or "sha-256" in lines[0].lower(), err
    assert not out.exists()


def test_bad_threshold_method_is_an_argument_error(capsys, volume):
    with pytest.raises(SystemExit) as e:
        cli.main(["segment", str(volume), "--threshold-method", "median", "--out", "x"])
    assert e.value.code == 2
    assert "threshold-method" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------
# batch


def test_batch_keeps_going_past_bad_rows(capsys, tmp_path, volume, weights):
    from ParaspinalSegLib.batch import read_batch_list

    single = tmp_path / "single.nrrd"
    sitk.WriteImage(sitk.GetImageFromArray(_anatomy_array((1, 40, 40))[0]), str(single))
    listing = tmp_path / "list.csv"
    listing.write_text(
        "volume,slice,level\n"
        f"{volume},0,L3/L4\n"
        f"{volume},2,L4/L5\n"
        "missing.nii.gz,0,\n"
        f"{volume},7,L5/S1\n"
        f"{volume},two,\n"
        "single.nrrd,,\n"  # relative to the list's folder; single-slice volume needs no slice
    )
    items = read_batch_list(listing)
    assert [i.row for i in items] == [2, 3, 4, 5, 6, 7]
    assert items[-1].volume == str(single) and items[-1].slice_index is None
    assert items[4].problem

    out = tmp_path / "out"
    code, stdout, err = run_cli(capsys, "batch", listing, "--out", out, "--weights", weights, "--device", "cpu",
                                "--no-progress")
    assert code == 0, err
    assert "3 of 6 rows segmented" in stdout
    with open(out / "errors.csv", newline="") as f:
        errors = list(csv.DictReader(f))
    assert [int(e["row"]) for e in errors] == [4, 5, 6]
    assert "no such file" in errors[0]["error"] and "out of range" in errors[1]["error"]
    assert "whole number" in errors[2]["error"]
    with open(out / "measurements.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3 * anatomy.NUM_STRUCTURES
    assert [r["Level"] for r in rows[:: anatomy.NUM_STRUCTURES]] == ["L3/L4", "L4/L5", ""]
    assert {p.name for p in out.iterdir() if p.is_dir()} == {"case01_slice0", "case01_slice2", "single"}
    assert (out / "case01_slice2" / "case01_overlay.png").is_file()
    assert "qc: " in stdout and "of 3 slices flagged" in stdout
    assert all(r["QC"] == "ok" or r["QC"].startswith("check: ") for r in rows)


def test_batch_with_no_good_row_fails(capsys, tmp_path, weights):
    listing = tmp_path / "list.csv"
    listing.write_text("nothing_here.nii.gz,0,L4/L5\n")
    code, _, _ = run_cli(capsys, "batch", listing, "--out", tmp_path / "out", "--weights", weights,
                         "--device", "cpu", "--no-progress")
    assert code == 2
    assert (tmp_path / "out" / "errors.csv").read_text().count("\n") == 2


def test_info_prints_model_card(capsys, weights):
    code, stdout, _ = run_cli(capsys, "info", "--weights", weights)
    assert code == 0
    assert "tiny" in stdout and "structures learned" in stdout


def test_an_argument_error_is_one_line_with_exit_2(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["segment", "x.nii.gz", "--threshold-method", "nan", "--out", "o"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "finite number" in lines[0] and "--help" in lines[0], err


# ----------------------------------------------------------------------------------------------------
# Path arguments and weights paths that cannot be meant


@pytest.mark.parametrize("argv, shown", [
    (["segment", "{volume}", "--slice", "0", "--out", ""], "--out"),
    (["segment", "", "--out", "{out}"], "VOLUME"),
    (["segment", "{volume}", "--slice", "0", "--out", "{out}", "--weights", ""], "--weights"),
    (["segment", "{volume}", "--slice", "0", "--out", "{out}", "--water-image", " ", "--fat-image", "{volume}"],
     "--water-image"),
    (["batch", "{listing}", "--out", ""], "--out"),
    (["batch", "", "--out", "{out}"], "LIST.csv"),
    (["info", "--weights", ""], "--weights"),
    (["measure", "{volume}", "{volume}", "--out", ""], "--out"),
    (["measure", "{volume}", "", "--out", "{out}"], "SEGMENTATION"),
], ids=["segment --out", "segment VOLUME", "segment --weights", "segment --water-image", "batch --out",
        "batch LIST", "info --weights", "measure --out", "measure SEGMENTATION"])
def test_an_empty_path_argument_is_refused_and_nothing_written(capsys, tmp_path, volume, monkeypatch, argv, shown):
    listing = tmp_path / "list.csv"
    listing.write_text(f"{volume},0,L4/L5\n")
    monkeypatch.chdir(tmp_path)  # where an empty --out would have written
    before = sorted(p.name for p in tmp_path.iterdir())
    code = cli.main([a.format(volume=volume, out=tmp_path / "out", listing=listing) for a in argv])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == cli.EXIT_INPUT_ERROR and len(lines) == 1, lines
    assert lines[0].startswith(f"paraspinalseg: error: argument {shown}: empty path, no ")
    assert sorted(p.name for p in tmp_path.iterdir()) == before


@pytest.mark.parametrize("kind", ["image", "folder", "folder.json"])
def test_weights_path_that_is_no_weights_file_says_what_it_is(capsys, tmp_path, volume, kind):
    if kind == "image":
        given = _write(tmp_path / "t2.nrrd", _anatomy_array())
        expected = "exists but is not a weights file"
    else:
        given = tmp_path / kind
        given.mkdir()
        expected = "is a folder, not a weights file"
    out = tmp_path / "out"
    for argv in (["segment", volume, "--slice", 0, "--out", out, "--device", "cpu", "--weights", given],
                 ["info", "--weights", given]):
        code, _, err = run_cli(capsys, *argv)
        lines = err.strip().splitlines()
        assert code == cli.EXIT_INPUT_ERROR and len(lines) == 1 and expected in lines[0], err
        assert "not found" not in lines[0] and str(given) in lines[0]
    assert not out.exists()


def test_info_verifies_the_checksum_as_segment_does(capsys, tmp_path, volume, weights, tampered_weights):
    code, stdout, _ = run_cli(capsys, "info", "--weights", weights)
    sha = json.loads(Path(weights).read_text())["weights_sha256"]
    assert code == 0 and f"checksum: SHA-256 {sha} verified" in stdout

    bad = tampered_weights(weights)  # one tensor byte flipped
    before = {p: p.read_bytes() for p in bad.parent.iterdir()}
    code, stdout, err = run_cli(capsys, "info", "--weights", bad)
    _, _, seg_err = run_cli(capsys, "segment", volume, "--slice", 0, "--weights", bad, "--device", "cpu",
                            "--out", tmp_path / "out")
    lines = err.strip().splitlines()
    assert code == cli.EXIT_INPUT_ERROR and stdout == "" and len(lines) == 1 and "checksum mismatch" in lines[0]
    assert lines == seg_err.strip().splitlines()  # the same message segment gives
    assert {p: p.read_bytes() for p in bad.parent.iterdir()} == before

    # A JSON whose recorded SHA-256 was edited (tensors untouched) is refused the same way.
    edited = tmp_path / "edited"
    edited.mkdir()
    config = json.loads(Path(weights).read_text())
    config["weights_sha256"] = "0" * 64
    (edited / "tiny.json").write_text(json.dumps(config))
    (edited / "tiny.safetensors").write_bytes(Path(weights).with_suffix(".safetensors").read_bytes())
    code, _, err = run_cli(capsys, "info", "--weights", edited / "tiny.json")
    assert code == cli.EXIT_INPUT_ERROR and "checksum mismatch" in err and len(err.strip().splitlines()) == 1


def test_info_needs_no_torch(tmp_path, weights):
    """Slicer's Python has no torch: ``info`` (checksum included) runs with torch made unimportable."""
    code = ("import sys; sys.modules['torch'] = None\n"
            "from ParaspinalSegLib import cli\n"
            f"sys.exit(cli.main(['info', '--weights', {str(weights)!r}]))\n")
    env = dict(os.environ, PYTHONPATH=f"{REPO / 'ParaspinalSeg'}:{REPO}")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "verified" in proc.stdout
