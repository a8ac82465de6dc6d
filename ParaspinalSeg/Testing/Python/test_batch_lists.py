"""``paraspinalseg batch`` lists and combined files: rows of same-named volumes stay apart, a list's
columns mean what the README says (a header reads them by name and refuses a value it cannot name), Dixon
images come in pairs, and a volume named after the run's own files just works.

Real files (SimpleITK) in ``tmp_path``, the command run in-process with tiny random weights.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

sitk = pytest.importorskip("SimpleITK")
pytest.importorskip("torch")
pytest.importorskip("slicer")

from ParaspinalSegLib import anatomy, cli  # noqa: E402
from ParaspinalSegLib.batch import ROW_COLUMNS, read_batch_list  # noqa: E402
from ParaspinalSegLib.errors import InputError  # noqa: E402
from ParaspinalSegLib.scene import CSV_COLUMNS, csv_header  # noqa: E402


@pytest.fixture(scope="module")
def weights(tmp_path_factory, save_tiny_weights) -> Path:
    return save_tiny_weights(tmp_path_factory.mktemp("weights") / "tiny")


def _write(path: Path, seed: int, slices: int = 1) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.random.default_rng(seed).normal(200.0, 20.0, size=(slices, 40, 36)).astype(np.int16)
    img = sitk.GetImageFromArray(arr[0] if slices == 1 else arr)
    img.SetSpacing((1.5, 1.5) if slices == 1 else (1.5, 1.5, 4.0))
    sitk.WriteImage(img, str(path))
    return path


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _batch(capsys, listing: Path, out: Path, weights: Path, *extra) -> tuple[int, str, list[str]]:
    code = cli.main([str(a) for a in ("batch", listing, "--out", out, "--weights", weights, "--device", "cpu",
                                       "--no-progress", *extra)])
    stdout, err = capsys.readouterr()
    return code, stdout, err.strip().splitlines()


def _snapshot(folder: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_same_named_volumes_in_two_folders_are_told_apart(capsys, tmp_path, weights):
    """The README's layout: sub-001/t2_ax.nrrd and sub-002/t2_ax.nrrd, both single-slice."""
    a = _write(tmp_path / "sub-001" / "t2_ax.nrrd", seed=1)
    b = _write(tmp_path / "sub-002" / "t2_ax.nrrd", seed=2)
    listing = tmp_path / "cohort.csv"
    listing.write_text("volume,slice,level\nsub-001/t2_ax.nrrd,,L4/L5\nsub-002/t2_ax.nrrd,,L4/L5\n")
    out = tmp_path / "results"
    code, _, err = _batch(capsys, listing, out, weights)
    assert code == 0, err

    with open(out / "measurements.csv", newline="", encoding="utf-8") as f:
        header = next(csv.reader(f))
    seg_header = next(csv.reader(open(out / "t2_ax" / "t2_ax_measurements.csv", newline="", encoding="utf-8")))
    # segment's table keeps the Slicer layout; batch appends its columns after it, in order
    assert seg_header == [csv_header(c) for c in CSV_COLUMNS]
    assert header == seg_header + list(ROW_COLUMNS)
    rows = _rows(out / "measurements.csv")
    assert len(rows) == 2 * anatomy.NUM_STRUCTURES
    assert {(r["Volume"], r["Slice"]) for r in rows} == {("t2_ax", "0")}  # what used to be all there was
    first, second = rows[: anatomy.NUM_STRUCTURES], rows[anatomy.NUM_STRUCTURES:]
    assert {(r["List row"], r["Row folder"], r["Volume path"]) for r in first} == {("2", "t2_ax", str(a))}
    assert {(r["List row"], r["Row folder"], r["Volume path"]) for r in second} == {("3", "t2_ax_2", str(b))}
    record = json.loads((out / "batch_run.json").read_text())
    assert [(r["folder"], r["volume"]) for r in record["rows"]] == [("t2_ax", str(a)), ("t2_ax_2", str(b))]
    assert (out / "t2_ax_2" / "t2_ax_measurements.csv").is_file()
    # errors.csv already names each failed row by list row and volume path
    assert next(csv.reader(open(out / "errors.csv", newline=""))) == ["row", "volume", "slice", "level", "error"]


def test_headed_list_refuses_a_value_in_an_unnamed_column(capsys, tmp_path, weights):
    stack = _write(tmp_path / "stack3.nrrd", seed=3, slices=3)
    water = _write(tmp_path / "sample.nrrd", seed=4, slices=3)
    listing = tmp_path / "list.csv"
    listing.write_text(f"volume,slice,level\n{stack.name},2,L3/L4,{water.name},\n")
    with pytest.raises(InputError, match=r"line 2: column 4 \('sample.nrrd'\) has no name in the header"):
        read_batch_list(listing)
    out = tmp_path / "out"
    code, _, err = _batch(capsys, listing, out, weights)
    assert code == cli.EXIT_INPUT_ERROR and len(err) == 1 and "has no name in the header" in err[0], err
    assert "columns named water and fat" in err[0] and not out.exists()
    # A spreadsheet's header with blank cells above the wider rows names nothing either.
    listing.write_text(f"volume,slice,level,,\n{stack.name},2,L3/L4,{water.name},{water.name}\n")
    with pytest.raises(InputError, match=r"line 2: column 4 \('sample.nrrd'\) has no name in the header"):
        read_batch_list(listing)
    # A metadata column that merely mentions fat is a column like any other, not a misspelt Dixon column.
    listing.write_text(f"volume,slice,level,fat_grade\n{stack.name},2,L3/L4,2\n")
    assert read_batch_list(listing)[0].problem == ""

    # A header almost naming a Dixon column is refused too; blank extra cells and other named columns are fine.
    listing.write_text(f"volume,slice,level,water_path,fat_path\n{stack.name},2,L3/L4,{water.name},{water.name}\n")
    with pytest.raises(InputError, match="column 4 is headed 'water_path', not a Dixon column name"):
        read_batch_list(listing)
    listing.write_text(f"volume,slice,level,subject\n{stack.name},2,L3/L4,sub-003,,\n")
    (item,) = read_batch_list(listing)
    assert item.dixon_paths() == ("", "", "") and not item.problem

    # Named columns in any order are read by name; a headerless list reads columns 4-5.
    listing.write_text(f"volume,slice,level,fat,water\n{stack.name},2,L3/L4,{water.name},{stack.name}\n")
    (item,) = read_batch_list(listing)
    assert (item.water_image, item.fat_image) == (str(stack), str(water))
    listing.write_text(f"{stack.name},2,L3/L4,{water.name},{stack.name}\n")
    (item,) = read_batch_list(listing)
    assert (item.water_image, item.fat_image) == (str(water), str(stack))


@pytest.mark.parametrize("header", ["", "volume,slice,level,water,fat\n"], ids=["no header", "header"])
def test_a_water_image_without_a_fat_image_is_a_failed_row(capsys, tmp_path, weights, header):
    stack = _write(tmp_path / "stack3.nrrd", seed=3, slices=3)
    water = _write(tmp_path / "water.nrrd", seed=4, slices=3)
    listing = tmp_path / "list.csv"
    listing.write_text(f"{header}{stack.name},2,L3/L4,{water.name},\n{stack.name},1,L4/L5,,{water.name}\n"
                       f"{stack.name},0,L5/S1\n")
    out = tmp_path / "out"
    code, stdout, err = _batch(capsys, listing, out, weights)
    assert code == 0 and "1 of 3 rows segmented, 2 failed" in stdout, (stdout, err)
    errors = _rows(out / "errors.csv")
    assert [e["slice"] for e in errors] == ["2", "1"]
    assert "a Dixon water image without a fat image" in errors[0]["error"]
    assert "a Dixon fat image without a water image" in errors[1]["error"]
    assert ("columns water and fat" if header else "columns 4 and 5") in errors[0]["error"]
    assert {p.name for p in out.iterdir() if p.is_dir()} == {"stack3_slice0"}


@pytest.mark.parametrize("name", ["errors.csv", "measurements.csv", "batch_run.json", "Errors.CSV"])
def test_a_volume_named_like_the_runs_own_files_just_works(capsys, tmp_path, weights, name):
    _write(tmp_path / f"{name}.nrrd", seed=5)
    listing = tmp_path / "list.csv"
    listing.write_text(f"volume,slice,level\n{name}.nrrd,,L4/L5\n")
    out = tmp_path / "out"
    code, stdout, err = _batch(capsys, listing, out, weights)
    assert code == 0 and "1 of 1 rows segmented" in stdout, err
    folder = out / f"{name}_2"
    assert (folder / f"{name}_measurements.csv").is_file() and len(list(folder.iterdir())) == 5
    assert (out / "errors.csv").is_file() and (out / "measurements.csv").is_file()
    assert _rows(out / "measurements.csv")[0]["Row folder"] == f"{name}_2"

    # The run is continued (nothing to do) and replaced like any other.
    before = _snapshot(out)
    code, stdout, _ = _batch(capsys, listing, out, weights, "--resume")
    assert code == 0 and "1 done before, kept" in stdout
    assert {p for p in _snapshot(out)} == set(before)


def test_batch_water_image_option_without_fat_image_is_refused_before_the_model_loads(capsys, tmp_path):
    stack = _write(tmp_path / "stack3.nrrd", seed=3, slices=3)
    listing = tmp_path / "list.csv"
    listing.write_text(f"{stack.name},2,L3/L4\n")
    out = tmp_path / "out"
    # weights that do not exist: the Dixon options are refused first
    code, _, err = _batch(capsys, listing, out, tmp_path / "no_weights.json", "--water-image", stack)
    assert code == cli.EXIT_INPUT_ERROR and len(err) == 1, err
    assert "a Dixon water image without a fat image (--water-image and --fat-image)" in err[0]
    assert not out.exists()
