"""``paraspinalseg measure`` refuses what it cannot measure truthfully — a "label map" that is the image,
NaN/Inf volumes, non-finite thresholds, implausible geometry, constant or non-axial slices (as ``segment``
does), labels reaching outside the volume, Dixon images that give the muscles no value, folders and
unreadable files — with one line and exit 2, writes nothing then, and never replaces existing CSVs
without ``--overwrite``."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

sitk = pytest.importorskip("SimpleITK")

from ParaspinalSegLib import cli  # noqa: E402


def _write(arr: np.ndarray, path: Path, spacing=(0.8, 1.1, 4.0)) -> Path:
    im = sitk.GetImageFromArray(arr)
    im.SetSpacing(spacing)
    sitk.WriteImage(im, str(path))
    return path


@pytest.fixture
def case(tmp_path):
    rng = np.random.default_rng(0)
    img = rng.normal(300, 30, (2, 60, 50)).astype(np.float32)
    lab = np.zeros((2, 60, 50), np.uint8)
    lab[0, 20:35, 12:22], lab[0, 20:35, 28:38] = 6, 7
    return tmp_path, _write(img, tmp_path / "img.nii.gz"), _write(lab, tmp_path / "lab.nii.gz"), img


def measure(capsys, *argv) -> tuple[int, list[str]]:
    code = cli.main(["measure", *map(str, argv)])
    return code, capsys.readouterr().err.strip().splitlines()


def test_good_case_measures_then_refuses_to_overwrite(case, capsys):
    d, img, lab, _ = case
    code, err = measure(capsys, img, lab, "--out", d / "m.csv")
    assert code == 0, err
    before = {p: p.read_bytes() for p in (d / "m.csv", d / "m_asymmetry.csv")}
    code, err = measure(capsys, img, lab, "--method", "otsu", "--out", d / "m.csv")
    assert code == 2 and len(err) == 1 and "already exists" in err[0] and "--overwrite" in err[0]
    assert {p: p.read_bytes() for p in before} == before
    code, err = measure(capsys, img, lab, "--method", "otsu", "--out", d / "m.csv", "--overwrite")
    assert code == 0 and {p: p.read_bytes() for p in before} != before


@pytest.mark.parametrize("kind, message", [
    ("the image itself", "is not a label map: it holds non-integer values"),
    ("an int16 image", "is not a label map: its values run from"),
    ("a uint8 image", "is not a label map of the label table: it holds"),
    ("NaN labels", "is not a label map: it holds 1 NaN or infinite values"),
])
def test_a_label_map_that_is_not_one_is_refused(case, capsys, kind, message):
    d, img, lab, arr = case
    seg = {
        "the image itself": lambda: img,
        "an int16 image": lambda: _write((arr * 3).astype(np.int16), d / "i16.nrrd"),
        "a uint8 image": lambda: _write(np.clip(arr - 200, 0, 255).astype(np.uint8), d / "u8.nrrd"),
        "NaN labels": lambda: _write(np.where(np.arange(arr.size).reshape(arr.shape) == 7, np.nan, 0).astype(np.float32),
                                     d / "nan.nrrd"),
    }[kind]()
    code, err = measure(capsys, img, seg, "--out", d / "m.csv")
    assert code == 2 and len(err) == 1 and message in err[0], err
    assert sorted(os.listdir(d)) == sorted({"img.nii.gz", "lab.nii.gz", Path(seg).name})


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_volume_with_nan_or_inf_is_refused(case, capsys, bad):
    d, _, lab, arr = case
    arr = arr.copy()
    arr[0, 5, 5] = bad
    img = _write(arr, d / "bad.nii.gz")
    code, err = measure(capsys, img, lab, "--out", d / "m.csv")
    assert code == 2 and len(err) == 1 and "1 NaN or infinite voxels" in err[0], err
    assert not (d / "m.csv").exists()


@pytest.mark.parametrize("threshold", ["nan", "inf", "-inf", "NaN"])
def test_non_finite_threshold_is_refused(case, capsys, threshold):
    d, img, lab, _ = case
    code, err = measure(capsys, img, lab, f"--method={threshold}", "--out", d / "m.csv")
    assert code == 2 and len(err) == 1 and "threshold" in err[0], err
    assert not (d / "m.csv").exists()
    with pytest.raises(SystemExit) as e:
        cli.main(["segment", str(img), f"--threshold-method={threshold}", "--out", str(d / "o")])
    assert e.value.code == 2 and not (d / "o").exists()
    capsys.readouterr()


def test_impossible_geometry_is_refused_with_its_numbers(case, capsys):
    d, _, lab, arr = case
    img = _write(arr, d / "tiny_fov.nii.gz", spacing=(0.06, 0.06, 4.0))
    lab2 = _write(sitk.GetArrayFromImage(sitk.ReadImage(str(lab))), d / "lab2.nii.gz", spacing=(0.06, 0.06, 4.0))
    code, err = measure(capsys, img, lab2, "--out", d / "m.csv")
    assert code == 2 and len(err) == 1 and "field of view 3 x 3.6 mm" in err[0], err
    assert not (d / "m.csv").exists()


@pytest.mark.parametrize("cut", [0.9, 0.5])
def test_truncated_label_file_is_refused(case, capsys, cut):
    d, img, _, _ = case
    lab = _write(np.ones((2, 60, 50), np.uint8) * 6, d / "lab.nii")
    lab.write_bytes(lab.read_bytes()[: int(lab.stat().st_size * cut)])
    code, err = measure(capsys, img, lab, "--out", d / "m.csv")
    assert code == 2 and len(err) == 1 and "lab.nii is truncated" in err[0], err
    assert not (d / "m.csv").exists()


# ----------------------------------------------------------------------------------------------------
# `segment`'s own checks, per measured slice: constant slices and non-axial geometry


def _only_inputs_left(d: Path, *names: str) -> None:
    """Nothing was written: the folder holds the inputs and nothing else."""
    assert sorted(os.listdir(d)) == sorted(names)


def test_a_constant_slice_is_refused_as_segment_refuses_it(case, capsys):
    d, _, lab, arr = case
    const = _write(np.full_like(arr, 500.0), d / "const.nii.gz")
    code, err = measure(capsys, const, lab, "--out", d / "m.csv")
    assert code == 2 and len(err) == 1, err
    assert err[0] == ("paraspinalseg measure: error: slice 0 of 'const': slice is empty: every pixel has the value 500.0 "
                      "(nothing to segment)")
    _only_inputs_left(d, "img.nii.gz", "lab.nii.gz", "const.nii.gz")


def test_the_check_is_per_measured_slice(case, capsys):
    d, _, _, arr = case
    arr = arr.copy()
    arr[1] = 0.0  # slice 1 blank, slice 0 a real image
    vol = _write(arr, d / "half.nii.gz")
    lab = np.zeros(arr.shape, np.uint8)
    lab[:, 20:35, 12:22] = 6  # labels on both slices
    lab_path = _write(lab, d / "both.nii.gz")
    code, err = measure(capsys, vol, lab_path, "--out", d / "m.csv")
    assert code == 2 and len(err) == 1 and "slice 1 of 'half': slice is empty: every pixel has the value 0.0" in err[0], err
    assert not (d / "m.csv").exists()
    code, err = measure(capsys, vol, lab_path, "--slice", "0", "--out", d / "m.csv")
    assert code == 0, err  # the blank slice is not measured: nothing to refuse


def _rotated_about_lr(degrees: float) -> tuple[float, ...]:
    """ITK direction (columns = i, j, k axes, LPS) of slices tilted ``degrees`` about the left-right axis."""
    c, s = np.cos(np.radians(degrees)), np.sin(np.radians(degrees))
    return tuple(np.array([[1, 0, 0], [0, c, -s], [0, s, c]], float).ravel())


SAGITTAL = (0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0, -1.0, 0.0)  # slices stacked left-right (normal = R/L)


@pytest.mark.parametrize("direction, tilt", [(SAGITTAL, "90.0 degrees"), (_rotated_about_lr(45), "45.0 degrees")])
def test_a_non_axial_volume_is_refused_as_segment_refuses_it(case, capsys, direction, tilt):
    d, _, lab, arr = case
    names = []
    for name, a in (("vol.nii.gz", arr), ("seg.nii.gz", sitk.GetArrayFromImage(sitk.ReadImage(str(lab))))):
        im = sitk.GetImageFromArray(a)
        im.SetSpacing((0.8, 1.1, 4.0))
        im.SetDirection(direction)
        sitk.WriteImage(im, str(d / name))
        names.append(name)
    code, err = measure(capsys, d / "vol.nii.gz", d / "seg.nii.gz", "--out", d / "m.csv")
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("paraspinalseg measure: error: slice 0 of 'vol': slice is not axial: ") and tilt in err[0], err
    assert "(at most 30 accepted)" in err[0]
    _only_inputs_left(d, "img.nii.gz", "lab.nii.gz", *names)


def test_a_slightly_oblique_volume_is_measured(case, capsys):
    """20 degrees is inside segment's limit: measured, like segment would."""
    d, _, lab, arr = case
    for name, a in (("vol.nii.gz", arr), ("seg.nii.gz", sitk.GetArrayFromImage(sitk.ReadImage(str(lab))))):
        im = sitk.GetImageFromArray(a)
        im.SetSpacing((0.8, 1.1, 4.0))
        im.SetDirection(_rotated_about_lr(20))
        sitk.WriteImage(im, str(d / name))
    code, err = measure(capsys, d / "vol.nii.gz", d / "seg.nii.gz", "--out", d / "m.csv")
    assert code == 0, err


# ----------------------------------------------------------------------------------------------------
# A label map on another grid that reaches outside the volume


def _write_at(arr: np.ndarray, path: Path, origin, spacing=(0.8, 1.1, 4.0)) -> Path:
    im = sitk.GetImageFromArray(arr)
    im.SetSpacing(spacing)
    im.SetOrigin(tuple(float(o) for o in origin))
    sitk.WriteImage(im, str(path))
    return path


def test_labels_shifted_half_out_of_the_volume_are_refused_with_the_share(case, capsys):
    d, img, _, _ = case
    lab = np.zeros((2, 60, 50), np.uint8)
    lab[0, 20:35, 5:15], lab[0, 20:35, 35:45] = 6, 7  # 150 pixels each
    shifted = _write_at(lab, d / "shifted.nii.gz", (20 * 0.8, 0.0, 0.0))  # +16 mm: columns 30.. leave the volume
    code, err = measure(capsys, img, shifted, "--out", d / "m.csv")
    assert code == 2 and len(err) == 1, err
    assert ("shifted.nii.gz reaches outside the volume: 150 of its 300 labelled voxels on the volume's slices "
            "(50.0 %) lie outside the volume's grid") in err[0], err
    _only_inputs_left(d, "img.nii.gz", "lab.nii.gz", "shifted.nii.gz")


def test_labels_not_overlapping_the_volume_are_refused_and_no_header_only_csv(case, capsys):
    d, img, lab, _ = case
    far = _write_at(sitk.GetArrayFromImage(sitk.ReadImage(str(lab))), d / "far.nii.gz", (150.0, 0.0, 0.0))
    code, err = measure(capsys, img, far, "--out", d / "m.csv")
    assert code == 2 and len(err) == 1 and "far.nii.gz does not overlap the volume: none of its labelled voxels" in err[0], err
    _only_inputs_left(d, "img.nii.gz", "lab.nii.gz", "far.nii.gz")


def test_a_whole_stack_segmentation_measures_the_sub_stack_it_covers(case, capsys):
    """Labels on slices the volume does not have (a whole-stack .seg measured on an extracted sub-stack) are
    lost from no measured slice: measured, not refused; a map only on other slices does not overlap."""
    d, img, _, _ = case
    lab = np.zeros((5, 60, 50), np.uint8)
    lab[:, 20:35, 5:15], lab[:, 20:35, 35:45] = 6, 7  # on every slice, two before and one after the volume's
    stack = _write_at(lab, d / "stack.nii.gz", (0.0, 0.0, -2 * 4.0))
    code, err = measure(capsys, img, stack, "--out", d / "m.csv")
    assert code == 0, err
    with (d / "m.csv").open(newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r["Segment ID"] == "multifidus_left"]
    assert sorted(r["Slice"] for r in rows) == ["0", "1"] and {r["Pixel count"] for r in rows} == {"150"}
    elsewhere = _write_at(lab, d / "elsewhere.nii.gz", (0.0, 0.0, 5 * 4.0))  # slices 5..9: none of the volume's
    code, err = measure(capsys, img, elsewhere, "--out", d / "m2.csv")
    assert code == 2 and len(err) == 1 and "does not overlap the volume" in err[0], err


def test_a_segmentation_without_any_structure_writes_no_csv(case, capsys):
    d, img, _, _ = case
    empty = _write(np.zeros((2, 60, 50), np.uint8), d / "empty.nii.gz")
    code, err = measure(capsys, img, empty, "--out", d / "m.csv")
    assert code == 2 and len(err) == 1 and "none of the nine structures on any slice" in err[0], err
    _only_inputs_left(d, "img.nii.gz", "lab.nii.gz", "empty.nii.gz")


@pytest.mark.parametrize("shift_voxels, refused", [(0.4, False), (-0.4, False), (0.6, True), (-0.6, True)])
def test_the_edge_tolerance_is_half_a_voxel(case, capsys, shift_voxels, refused):
    """Labels touching the volume's edge columns, on a grid shifted by a fraction of a voxel: kept while
    their centres stay within the edge voxels (nearest neighbour puts them there), refused beyond."""
    d, img, _, _ = case
    lab = np.zeros((2, 60, 50), np.uint8)
    lab[0, 20:35, 0:10], lab[0, 20:35, 40:50] = 6, 7  # from the first column to the last
    path = _write_at(lab, d / "edge.nii.gz", (shift_voxels * 0.8, 0.0, 0.0))
    code, err = measure(capsys, img, path, "--out", d / "m.csv")
    if refused:
        assert code == 2 and len(err) == 1 and "15 of its 300 labelled voxels on the volume's slices (5.0 %) lie outside" in err[0], err
        assert not (d / "m.csv").exists()
    else:
        assert code == 0, err
        with (d / "m.csv").open(newline="") as fh:
            counts = {r["Segment ID"]: r["Pixel count"] for r in csv.DictReader(fh)}
        assert counts["multifidus_left"] == counts["multifidus_right"] == "150"  # nothing lost


# ----------------------------------------------------------------------------------------------------
# Dixon images that give the muscles no value


def _dixon_case(case):
    """The case's volume and labels plus a fat fraction image on the volume's grid (values 0.3)."""
    d, img, lab, arr = case
    return d, img, lab, np.full(arr.shape, 0.3, np.float32)


def _no_warnings_measure(capsys, *argv):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code, err = measure(capsys, *argv)
    assert not [w for w in caught if issubclass(w.category, RuntimeWarning)], [str(w.message) for w in caught]
    assert not any("Warning" in line for line in err), err
    return code, err


def test_an_all_nan_fat_fraction_map_is_refused_without_numpy_warnings(case, capsys):
    d, img, lab, ff = _dixon_case(case)
    nan_map = _write(np.full_like(ff, np.nan), d / "ffnan.nii.gz")
    code, err = _no_warnings_measure(capsys, img, lab, "--fat-fraction-map", nan_map, "--out", d / "m.csv")
    assert code == 2 and len(err) == 1, err
    assert err[0] == ("paraspinalseg measure: error: slice 0: the fat-fraction map ('ffnan'): no finite value on any of the "
                      "300 muscle pixels of the segmented slice, so the Dixon fat fraction cannot be measured")
    _only_inputs_left(d, "img.nii.gz", "lab.nii.gz", "ffnan.nii.gz")


def test_a_fat_fraction_map_beside_the_muscles_is_refused(case, capsys):
    d, img, lab, ff = _dixon_case(case)
    sliver = _write_at(ff[:, :10, :], d / "sliver.nii.gz", (0.0, 0.0, 0.0))  # rows 0-9; the muscles are rows 20-34
    code, err = _no_warnings_measure(capsys, img, lab, "--fat-fraction-map", sliver, "--out", d / "m.csv")
    assert code == 2 and len(err) == 1, err
    assert ("none of the 300 muscle pixels of the segmented slice lie inside the fat-fraction map ('sliver')"
            in err[0]), err
    _only_inputs_left(d, "img.nii.gz", "lab.nii.gz", "sliver.nii.gz")


def test_a_map_covering_part_of_the_muscles_is_measured_there(case, capsys):
    d, img, lab, ff = _dixon_case(case)
    part = _write_at(ff[:, :, :25], d / "part.nii.gz", (0.0, 0.0, 0.0))  # columns 0-24: the left block (12-21) only
    code, err = _no_warnings_measure(capsys, img, lab, "--fat-fraction-map", part, "--out", d / "m.csv")
    assert code == 0, err
    with (d / "m.csv").open(newline="") as fh:
        dixon = {r["Segment ID"]: r["Dixon fat fraction (%)"] for r in csv.DictReader(fh)}
    assert float(dixon["multifidus_left"]) == pytest.approx(30.0) and dixon["multifidus_right"] == ""


def test_water_and_fat_images_below_the_noise_floor_on_the_muscles_are_refused(case, capsys):
    d, img, lab, arr = case
    water = _write(np.full_like(arr, 100.0), d / "w.nii.gz")
    fat = _write(np.full_like(arr, 20.0), d / "f.nii.gz")
    code, err = _no_warnings_measure(capsys, img, lab, "--water-image", water, "--fat-image", fat,
                                     "--dixon-noise-floor", "1000", "--out", d / "m.csv")
    assert code == 2 and len(err) == 1, err
    assert ("the water and fat images ('w', 'f'): no pixel with W + F at or above the noise floor (1000) on any of "
            "the 300 muscle pixels") in err[0], err
    _only_inputs_left(d, "img.nii.gz", "lab.nii.gz", "w.nii.gz", "f.nii.gz")
    code, err = _no_warnings_measure(capsys, img, lab, "--water-image", water, "--fat-image", fat, "--out", d / "m.csv")
    assert code == 0, err  # the default floor (5 % of the slice's 99th percentile) keeps them


# ----------------------------------------------------------------------------------------------------
# Folders and unreadable files: one clean line, no HDF5 or ITK diagnostics


def _run_in_subprocess(*argv) -> "subprocess.CompletedProcess[str]":
    """The command as a user runs it: C libraries write their diagnostics to the process's own stderr,
    which capsys does not see."""
    repo = Path(__file__).resolve().parents[3]
    env = {**os.environ, "PYTHONPATH": f"{repo / 'ParaspinalSeg'}:{repo}"}
    return subprocess.run([sys.executable, "-m", "ParaspinalSegLib.cli", "measure", *map(str, argv)],
                          capture_output=True, text=True, env=env, timeout=120)


@pytest.mark.parametrize("which", ["segmentation", "volume"])
def test_a_folder_is_refused_in_one_line(case, which):
    d, img, lab, _ = case
    folder = d / "a_folder"
    folder.mkdir()
    (folder / "notes.txt").write_text("not an image\n")
    argv = (img, folder) if which == "segmentation" else (folder, lab)
    res = _run_in_subprocess(*argv, "--out", d / "m.csv")
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1, res.stderr
    assert "HDF5" not in res.stderr and "sitk::" not in res.stderr
    what = "a label image" if which == "segmentation" else "an image volume"
    assert lines[0] == (f"paraspinalseg measure: error: {folder} is a folder without DICOM images, not {what} "
                        f"(give {what} file or a DICOM series folder)"), lines
    assert sorted(os.listdir(d)) == ["a_folder", "img.nii.gz", "lab.nii.gz"]


@pytest.mark.parametrize("content, why", [
    (b"hello, not an image\n", 'Unable to determine ImageIO reader for "{junk}")'),
    (b"NRRD0004\nthis is not a header\n", "Error reading {junk}: didn't see"),
])
@pytest.mark.parametrize("which", ["segmentation", "volume"])
def test_an_unreadable_file_is_one_line_without_itk_source_paths(case, capsys, content, why, which):
    d, img, lab, _ = case
    junk = d / ("junk.nrrd" if content.startswith(b"NRRD") else "junk.nii.gz")
    junk.write_bytes(content)
    argv = (img, junk) if which == "segmentation" else (junk, lab)
    code, err = measure(capsys, *argv, "--out", d / "m.csv")
    assert code == 2 and len(err) == 1, err
    what = "a label image" if which == "segmentation" else "an image volume"
    assert err[0].startswith(f"paraspinalseg measure: error: cannot read {junk} as {what} (") and why.format(junk=junk) in err[0], err
    assert not any(s in err[0] for s in ("sitk::", "itk::", ".cxx", "0x", "Exception thrown")), err
    assert not (d / "m.csv").exists()
