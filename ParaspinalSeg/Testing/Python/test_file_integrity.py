"""Files that lie: truncated or padded NIfTI / NRRD / MetaImage files, DICOM series with missing or
duplicated slices, and geometry that cannot be an MRI slice are refused with one clear message; the
command line exits 2 and writes nothing.
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np
import pytest

sitk = pytest.importorskip("SimpleITK")

from ParaspinalSegLib import volume_io  # noqa: E402
from ParaspinalSegLib.errors import InputError  # noqa: E402
from ParaspinalSegLib.file_integrity import check_file_complete  # noqa: E402

SHAPE = (3, 48, 40)
CUTS = (0.999, 0.9, 0.5, 0.2)


def _image(dtype=np.int16) -> sitk.Image:
    rng = np.random.default_rng(1)
    img = sitk.GetImageFromArray(rng.normal(300, 40, SHAPE).astype(dtype))
    img.SetSpacing((1.5, 1.5, 4.0))
    return img


def _write(path: Path, compress: bool = False, dtype=np.int16) -> Path:
    sitk.WriteImage(_image(dtype), str(path), compress)
    return path


def _cut(path: Path, fraction: float) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])
    return path


@pytest.mark.parametrize("cut", CUTS)
@pytest.mark.parametrize("name", ["v.nii", "v.nii.gz", "v.nrrd", "v_gz.nrrd", "v.mha"])
def test_truncated_file_is_refused(tmp_path, name, cut):
    path = _write(tmp_path / name.replace("_gz", ""), compress="gz" in name)
    before = volume_io.read_volume(path).array  # complete: reads
    assert before.shape == SHAPE
    _cut(path, cut)
    with pytest.raises(InputError, match="truncated|cannot read|corrupt") as err:
        volume_io.read_volume(path)
    assert "\n" not in str(err.value)


def test_truncated_nifti_is_refused_before_itk_pads_it_with_zeros(tmp_path):
    # The bug: ITK reads a .nii cut to 90 % and fills the missing rows with zeros.
    path = _cut(_write(tmp_path / "v.nii"), 0.9)
    image = sitk.ReadImage(str(path))  # ITK alone: no complaint
    assert sitk.GetArrayFromImage(image)[-1, -1].max() == 0  # the cut rows read as zeros
    with pytest.raises(InputError, match=r"v.nii is truncated: it holds \d+ bytes of image data where its header promises 11520 \(9\d %\)"):
        volume_io.read_volume(path)


@pytest.mark.parametrize("name", ["v.nii", "v.nrrd", "v.mha"])
def test_extra_bytes_after_the_data_are_refused(tmp_path, name):
    path = _write(tmp_path / name)
    path.write_bytes(path.read_bytes() + b"\0" * 64)
    with pytest.raises(InputError, match="64 bytes more image data than its header describes"):
        volume_io.read_volume(path)


def test_nii_gz_with_a_second_gzip_member_or_garbage_is_refused(tmp_path):
    path = _write(tmp_path / "v.nii.gz", compress=True)
    good = path.read_bytes()
    path.write_bytes(good + gzip.compress(b"\1" * 100))  # decompresses to 100 bytes too many
    with pytest.raises(InputError, match="100 bytes more decompressed image data"):
        volume_io.read_volume(path)
    path.write_bytes(good + b"this is not gzip")
    with pytest.raises(InputError, match="truncated or corrupt"):
        volume_io.read_volume(path)
    data = bytearray(good)
    data[-6] ^= 0xFF  # CRC of the stream
    path.write_bytes(bytes(data))
    with pytest.raises(InputError, match="truncated or corrupt"):
        volume_io.read_volume(path)


def test_header_claiming_a_huge_volume_is_refused_without_allocating(tmp_path):
    path = _write(tmp_path / "v.nii")
    data = bytearray(path.read_bytes())
    data[42:44] = np.int16(30000).tobytes()  # dim[1]
    data[44:46] = np.int16(30000).tobytes()  # dim[2]: 30000 x 30000 x 3 int16 = 5.4 GB
    path.write_bytes(bytes(data))
    with pytest.raises(InputError, match="truncated.*promises 5400000000"):
        volume_io.read_volume(path)


def test_detached_nrrd_with_a_short_data_file_is_refused(tmp_path):
    sitk.WriteImage(_image(), str(tmp_path / "v.nhdr"))
    raw = next(p for p in tmp_path.iterdir() if p.suffix == ".raw")
    _cut(raw, 0.5)
    with pytest.raises(InputError, match="truncated"):
        volume_io.read_volume(tmp_path / "v.nhdr")


def test_complete_files_of_every_kind_pass(tmp_path):
    for name, compress in (("a.nii", False), ("b.nii.gz", True), ("c.nrrd", False), ("d.nrrd", True),
                           ("e.mha", False), ("f.mha", True), ("g.nhdr", False)):
        check_file_complete(_write(tmp_path / name, compress, np.float32))


# ----------------------------------------------------------------------------------------------------
# DICOM series


def _dicom_series(folder: Path, positions_mm) -> Path:
    img = _image()
    folder.mkdir()
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    with volume_io.preserved_locale():
        for n, z in enumerate(positions_mm):
            s = img[:, :, n % SHAPE[0]]
            s.SetMetaData("0020|000e", "1.2.826.0.1.3680043.2.1125.1.8")
            s.SetMetaData("0008|0060", "MR")
            s.SetMetaData("0020|0037", "1\\0\\0\\0\\1\\0")
            s.SetMetaData("0020|0032", f"0\\0\\{z}")
            s.SetMetaData("0020|0013", str(n))
            writer.SetFileName(str(folder / f"{n:03d}.dcm"))
            writer.Execute(s)
    return folder


def test_dicom_series_evenly_spaced_reads(tmp_path):
    vol = volume_io.read_volume(_dicom_series(tmp_path / "ok", [0.0, 4.0, 8.0, 12.0]))
    assert vol.num_slices == 4 and vol.spacing_mm[2] == pytest.approx(4.0)


def test_dicom_series_with_a_missing_slice_is_refused(tmp_path):
    folder = _dicom_series(tmp_path / "gap", [0.0, 4.0, 12.0, 16.0])
    with pytest.raises(InputError, match=r"8.00 mm between 001.dcm and 002.dcm where the other slices are 4.00 mm "
                                         r"apart \(about 1 slice\(s\) missing\)"):
        volume_io.read_volume(folder)


def test_dicom_series_with_a_duplicated_slice_is_refused(tmp_path):
    folder = _dicom_series(tmp_path / "dup", [0.0, 4.0, 4.0, 8.0])
    with pytest.raises(InputError, match="two slices at one position .*duplicated slice"):
        volume_io.read_volume(folder)


# ----------------------------------------------------------------------------------------------------
# Geometry that cannot be an MRI slice


@pytest.mark.parametrize(
    "spacing, size, refused",
    [
        ((100.0, 100.0), (40, 48), "pixel size outside"),
        ((0.075, 0.075), (40, 48), "field of view outside"),  # a 3 mm field of view
        ((0.01, 0.01), (400, 400), "pixel size outside"),
        ((8.0, 8.0), (200, 200), "field of view outside"),  # 1.6 m
    ],
)
def test_impossible_geometry_is_refused_with_its_numbers(tmp_path, spacing, size, refused):
    img = sitk.GetImageFromArray(np.random.default_rng(0).normal(300, 40, (1, size[1], size[0])).astype(np.int16))
    img.SetSpacing((*spacing, 4.0))
    path = tmp_path / "odd.nrrd"
    sitk.WriteImage(img, str(path))
    vol = volume_io.read_volume(path)
    with pytest.raises(InputError, match=refused) as err:
        volume_io.check_slice_geometry(vol)
    assert f"pixels of {spacing[0]:.3g} x {spacing[1]:.3g} mm" in str(err.value)


def test_unusual_geometry_is_measured_with_a_warning(tmp_path):
    img = sitk.GetImageFromArray(np.zeros((1, 100, 100), np.int16))
    img.SetSpacing((5.0, 5.0, 4.0))
    path = tmp_path / "coarse.nrrd"
    sitk.WriteImage(img, str(path))
    warnings = volume_io.check_slice_geometry(volume_io.read_volume(path))
    assert len(warnings) == 1 and "unusual pixel size" in warnings[0] and "pixels of 5 x 5 mm" in warnings[0]


def test_compressed_stream_cut_inside_its_header_is_refused(tmp_path):
    path = _write(tmp_path / "v.mha", compress=True)
    data = path.read_bytes()
    head = data.index(b"ElementDataFile = LOCAL\n") + len(b"ElementDataFile = LOCAL\n")
    path.write_bytes(data[: head + 1])
    with pytest.raises(InputError, match="truncated or corrupt"):
        volume_io.read_volume(path)
    assert zlib  # zlib streams are what MetaImage compresses with


def test_gzip_stream_under_a_plain_name_is_checked_as_gzip(tmp_path):
    path = _write(tmp_path / "v.nii.gz", compress=True)
    renamed = tmp_path / "renamed.nii"
    renamed.write_bytes(path.read_bytes()[: int(path.stat().st_size * 0.9)])
    with pytest.raises(InputError, match="truncated"):
        volume_io.read_volume(renamed)


@pytest.mark.parametrize("offset, value, message", [
    (80, float("nan"), r"voxel sizes \[nan, 1.5, 4.0\] mm \(pixdim\) are not all finite and non-zero"),
    (80, 0.0, r"voxel sizes \[0.0, 1.5, 4.0\] mm"),
    (256, float("inf"), "its qform .* NaN or infinite"),
    (280, float("nan"), "its sform .* NaN or infinite"),
])
def test_nifti_header_with_impossible_geometry_fields_is_refused(tmp_path, offset, value, message):
    # ITK would replace such a spacing by 1 mm and measure on it without a word.
    import struct

    path = _write(tmp_path / "v.nii")
    data = bytearray(path.read_bytes())
    data[offset:offset + 4] = struct.pack("<f", value)
    path.write_bytes(bytes(data))
    with pytest.raises(InputError, match=message):
        volume_io.read_volume(path)


def test_itk_warnings_stay_off_stderr(tmp_path, capfd):
    import struct

    path = _write(tmp_path / "v.nii")
    data = bytearray(path.read_bytes())
    data[80:84] = struct.pack("<f", 30.0)  # pixdim disagrees with the sform: ITK warns on stderr
    path.write_bytes(bytes(data))
    volume_io.read_volume(path)
    assert capfd.readouterr().err == ""


# ----------------------------------------------------------------------------------------------------
# Sheared direction matrices: not an MRI grid, and ITK's NIfTI writer would rotate the labels written back


def _sheared(path: Path, columns, array=None) -> Path:
    """A volume file whose direction columns (unit vectors, ITK's LPS) are ``columns`` (i, j[, k])."""
    a = np.random.default_rng(2).normal(300, 40, SHAPE).astype(np.int16) if array is None else array
    if len(columns) == 2:
        img = sitk.GetImageFromArray(a[0])
        img.SetSpacing((1.5, 1.5))
    else:
        img = sitk.GetImageFromArray(a)
        img.SetSpacing((1.5, 1.5, 4.0))
    img.SetDirection(tuple(np.asarray(columns, float).T.ravel()))
    sitk.WriteImage(img, str(path))
    return path


_T = np.radians(13.0)
SHEARS = [
    ("in-plane 13 degrees", [(1, 0, 0), (np.sin(_T), np.cos(_T), 0), (0, 0, 1)], "i and j axes are 77.00 degrees"),
    ("k leaning 11.5 degrees", [(1, 0, 0), (0, 1, 0), (0.2, 0, 0.98)], "i and k axes are 78.47 degrees"),
    ("2-D slice, 0.1 degrees", [(1, 0), (np.sin(np.radians(0.1)), np.cos(np.radians(0.1)))], "i and j axes are 89.90 degrees"),
]


@pytest.mark.parametrize("case, columns, angle", SHEARS, ids=[s[0] for s in SHEARS])
def test_sheared_directions_are_refused_as_implausible_geometry(tmp_path, case, columns, angle):
    d = np.asarray(columns, float)
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    vol = volume_io.read_volume(_sheared(tmp_path / "sheared.nrrd", d))
    with pytest.raises(InputError, match=rf"sheared: implausible geometry: its {angle} apart, not perpendicular"):
        volume_io.check_slice_geometry(vol)


def test_an_oblique_nifti_rounded_to_float32_is_accepted(tmp_path):
    """NIfTI stores its sform in float32: the rounding of an oblique scanner orientation is no shear."""
    t = np.radians(17.0)
    r = np.array([[np.cos(t), 0, np.sin(t)], [0, 1, 0], [-np.sin(t), 0, np.cos(t)]]) @ np.array(
        [[np.cos(t / 3), -np.sin(t / 3), 0], [np.sin(t / 3), np.cos(t / 3), 0], [0, 0, 1]])
    path = _sheared(tmp_path / "oblique.nii.gz", r.astype(np.float32).T)
    warnings = volume_io.check_slice_geometry(volume_io.read_volume(path))  # raises if refused
    assert all("unusual field of view" in w for w in warnings), warnings  # the small test FOV only


def test_sheared_volume_is_refused_by_segment_measure_and_batch_exit_2_nothing_written(tmp_path, capsys,
                                                                                        save_tiny_weights):
    """The hostile case: NRRD ``space directions`` with a 13-degree shear were measured with a 12 % too large
    pixel area and written back rotated. Every command line entry refuses it with one line, exit 2."""
    pytest.importorskip("torch")
    from ParaspinalSegLib import cli

    weights = save_tiny_weights(tmp_path / "w" / "tiny")
    d = np.array(SHEARS[0][1], float)
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    work = tmp_path / "work"
    work.mkdir()
    vol = _sheared(work / "sheared.nrrd", d)
    labels = np.zeros(SHAPE, np.uint8)
    labels[1, 20:30, 8:16], labels[1, 20:30, 24:32] = 8, 9
    lab = _sheared(work / "sheared_labels.nrrd", d, labels)
    (work / "list.csv").write_text("volume,slice,level\nsheared.nrrd,1,L4/L5\n")
    contents = sorted(p.name for p in work.iterdir())
    message = "sheared: implausible geometry: its i and j axes are 77.00 degrees apart, not perpendicular"
    runs = {
        "segment": ["segment", vol, "--slice", "1", "--out", work / "seg", "--weights", weights, "--device", "cpu"],
        "measure": ["measure", vol, lab, "--slice", "1", "--out", work / "m.csv"],
    }
    for name, argv in runs.items():
        code = cli.main([str(a) for a in argv])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and message in err[0], (name, code, err)
        assert sorted(p.name for p in work.iterdir()) == contents, name
    # batch: the row fails with the same reason (no row folder); with no row left the run exits 2
    code = cli.main([str(a) for a in ["batch", work / "list.csv", "--out", work / "b", "--weights", weights,
                                      "--device", "cpu", "--no-progress"]])
    capsys.readouterr()
    assert code == 2
    assert message in (work / "b" / "errors.csv").read_text()
    assert sorted(p.name for p in (work / "b").iterdir() if not p.name.startswith(".")) == [
        "batch_run.json", "errors.csv", "measurements.csv"]
