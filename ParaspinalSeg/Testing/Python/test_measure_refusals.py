"""``paraspinalseg measure`` refuses what it cannot measure truthfully — a "label map" that is the image,
NaN/Inf volumes, non-finite thresholds, implausible geometry — with one line and exit 2, and never
replaces existing CSVs without ``--overwrite``."""

from __future__ import annotations

import os
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
