"""volume_io: reading NIfTI / NRRD / DICOM volumes into Slicer order + RAS geometry, refusing bad input."""

from __future__ import annotations

import os

import locale

import numpy as np
import pytest

sitk = pytest.importorskip("SimpleITK")

from ParaspinalSegLib import volume_io  # noqa: E402
from ParaspinalSegLib.errors import InputError  # noqa: E402


def _oblique_direction(deg: float = 12.0) -> np.ndarray:
    """Rotation about the S axis, LPS direction cosines (row-major as ITK wants them)."""
    t = np.deg2rad(deg)
    return np.array([[np.cos(t), -np.sin(t), 0.0], [np.sin(t), np.cos(t), 0.0], [0.0, 0.0, 1.0]])


def _image(shape=(3, 8, 10), spacing=(0.8, 0.9, 4.0), origin=(10.0, 20.0, 30.0), direction=None, dtype=np.int16):
    arr = np.arange(int(np.prod(shape)), dtype=dtype).reshape(shape)
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    if direction is not None:
        img.SetDirection(tuple(np.asarray(direction).ravel()))
    return img, arr


def test_nifti_geometry_matches_nibabel_ras_affine(tmp_path):
    nib = pytest.importorskip("nibabel")
    img, arr = _image(direction=_oblique_direction())
    path = tmp_path / "oblique.nii.gz"
    sitk.WriteImage(img, str(path))
    vol = volume_io.read_volume(path)
    assert vol.name == "oblique"
    assert vol.array.shape == (3, 8, 10)  # arr[k, j, i]
    np.testing.assert_array_equal(vol.array, arr)
    # nibabel's affine maps (i, j, k) to RAS: an independent reading of the same header.
    np.testing.assert_allclose(vol.ijk_to_ras, nib.load(str(path)).affine, atol=1e-4)


def test_identity_direction_is_lps_in_ras_terms(tmp_path):
    img, _ = _image()
    path = tmp_path / "lps.nrrd"
    sitk.WriteImage(img, str(path))
    m = volume_io.read_volume(path).ijk_to_ras
    # ITK identity = i towards patient left (−x in RAS), j towards posterior (−y), k superior.
    np.testing.assert_allclose(np.diag(m)[:3], [-0.8, -0.9, 4.0])
    np.testing.assert_allclose(m[:3, 3], [-10.0, -20.0, 30.0])


def test_nrrd_geometry_matches_slicer_reader(tmp_path):
    slicer = pytest.importorskip("slicer")
    img, arr = _image(direction=_oblique_direction(-20.0) @ np.diag([1.0, -1.0, -1.0]))
    path = tmp_path / "vol.nrrd"
    sitk.WriteImage(img, str(path))
    vol = volume_io.read_volume(path)

    scene = slicer.vtkMRMLScene()
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode")
    storage = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    storage.SetFileName(str(path))
    assert storage.ReadData(node)
    import vtk

    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    expected = np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)])
    np.testing.assert_allclose(vol.ijk_to_ras, expected, atol=1e-6)
    from vtk.util.numpy_support import vtk_to_numpy

    slicer_arr = vtk_to_numpy(node.GetImageData().GetPointData().GetScalars()).reshape(arr.shape)
    np.testing.assert_array_equal(vol.array, slicer_arr)


def test_dicom_series_folder(tmp_path):
    img, arr = _image()
    folder = tmp_path / "series"
    folder.mkdir()
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    with volume_io.preserved_locale():  # GDCM's writer switches the C locale too
        for k in range(arr.shape[0]):
            s = img[:, :, k]
            s.SetMetaData("0020|000e", "1.2.826.0.1.3680043.2.1125.1.7")
            s.SetMetaData("0008|0060", "MR")
            s.SetMetaData("0020|0037", "1\\0\\0\\0\\1\\0")
            s.SetMetaData("0020|0032", "\\".join(str(x) for x in img.TransformIndexToPhysicalPoint((0, 0, k))))
            s.SetMetaData("0020|0013", str(k))
            writer.SetFileName(str(folder / f"{k:03d}.dcm"))
            writer.Execute(s)
    before = locale.setlocale(locale.LC_ALL)
    vol = volume_io.read_volume(folder)
    assert locale.setlocale(locale.LC_ALL) == before  # reading DICOM leaves the host's locale alone
    assert vol.name == "series"
    np.testing.assert_array_equal(vol.array, arr)
    np.testing.assert_allclose(np.diag(vol.ijk_to_ras)[:3], [-0.8, -0.9, 4.0], atol=1e-6)
    np.testing.assert_allclose(vol.ijk_to_ras[:3, 3], [-10.0, -20.0, 30.0], atol=1e-6)


def test_two_d_image_becomes_one_slice(tmp_path):
    img = sitk.GetImageFromArray(np.ones((6, 7), np.float32))
    img.SetSpacing((0.5, 0.6))
    path = tmp_path / "slice.nrrd"
    sitk.WriteImage(img, str(path))
    vol = volume_io.read_volume(path)
    assert vol.array.shape == (1, 6, 7) and vol.dimension == 2
    np.testing.assert_allclose(np.diag(vol.ijk_to_ras)[:3], [-0.5, -0.6, 1.0])


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: sitk.Image([8, 8, 2], sitk.sitkVectorUInt8, 3), "colour/vector"),
        (lambda: sitk.Image([8, 8, 2], sitk.sitkVectorFloat32, 2), "colour/vector"),
        (lambda: sitk.Image([8, 8, 2, 3], sitk.sitkInt16), "4-D"),
    ],
    ids=["rgb", "vector", "4d"],
)
def test_refuses_non_scalar_and_4d(tmp_path, make, message):
    path = tmp_path / "bad.nrrd"
    sitk.WriteImage(make(), str(path))
    with pytest.raises(InputError, match=message):
        volume_io.read_volume(path)


def test_4d_with_one_frame_is_a_3d_volume(tmp_path):
    path = tmp_path / "one_frame.nii.gz"
    sitk.WriteImage(sitk.Image([8, 9, 2, 1], sitk.sitkInt16), str(path))
    assert volume_io.read_volume(path).array.shape == (2, 9, 8)


def test_missing_unreadable_and_empty_folder(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        volume_io.read_volume(tmp_path / "nothing.nii.gz")
    junk = tmp_path / "junk.nii.gz"
    junk.write_bytes(b"this is not an image")
    with pytest.raises(InputError, match="cannot read .*junk.nii.gz") as err:
        volume_io.read_volume(junk)
    assert "\n" not in str(err.value)  # one line, not ITK's multi-line dump
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match="without DICOM"):
        volume_io.read_volume(empty)


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".nrrd"])
def test_nan_and_inf_voxels_survive_reading(tmp_path, suffix):
    # ITK's NIfTI reader turns NaN into 0; read_volume puts them back so bad slices are refused.
    arr = np.ones((3, 8, 9), np.float32)
    arr[1, 5, 6] = np.nan
    arr[2, 0, 0] = np.inf
    path = tmp_path / f"nan{suffix}"
    sitk.WriteImage(sitk.GetImageFromArray(arr), str(path))
    got = volume_io.read_volume(path).array
    assert np.argwhere(np.isnan(got)).tolist() == [[1, 5, 6]]
    assert np.argwhere(np.isinf(got)).tolist() == [[2, 0, 0]]
    assert np.isfinite(got).sum() == arr.size - 2


def test_label_volume_written_on_input_grid(tmp_path):
    nib = pytest.importorskip("nibabel")
    img, _ = _image(direction=_oblique_direction())
    src = tmp_path / "t2.nrrd"
    sitk.WriteImage(img, str(src))
    vol = volume_io.read_volume(src)
    labels = np.zeros(vol.array.shape, np.uint8)
    labels[1, 2:5, 3:7] = 6
    out = volume_io.write_label_volume(labels, vol, tmp_path / "t2_labels.nii.gz")
    back = nib.load(str(out))
    np.testing.assert_allclose(back.affine, vol.ijk_to_ras, atol=1e-4)
    assert back.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(np.asarray(back.dataobj).transpose(2, 1, 0), labels)
    with pytest.raises(InputError, match="does not match"):
        volume_io.write_label_volume(labels[:2], vol, tmp_path / "x.nii.gz")


def test_label_volume_of_2d_input_stays_2d(tmp_path):
    img = sitk.GetImageFromArray(np.ones((6, 7), np.int16))
    img.SetOrigin((3.0, 4.0))
    src = tmp_path / "s.nrrd"
    sitk.WriteImage(img, str(src))
    vol = volume_io.read_volume(src)
    out = volume_io.write_label_volume(np.full((1, 6, 7), 2, np.uint8), vol, tmp_path / "s_labels.nrrd")
    back = sitk.ReadImage(str(out))
    assert back.GetDimension() == 2 and back.GetOrigin() == (3.0, 4.0)


def test_geometry_round_trip_and_names(tmp_path):
    m = np.eye(4)
    m[:3, :3] = _oblique_direction(33.0) @ np.diag([0.7, -0.8, 3.0])
    m[:3, 3] = (1.0, -2.0, 5.0)
    origin, spacing, direction = volume_io.itk_geometry_from_ijk_to_ras(m)
    np.testing.assert_allclose(volume_io.ijk_to_ras_from_itk(origin, spacing, direction), m, atol=1e-12)
    assert volume_io.volume_name("a/b/case01.nii.gz") == "case01"
    assert volume_io.volume_name("case.02.nrrd") == "case.02"
    assert volume_io.volume_name(os.fspath(tmp_path)) == tmp_path.name
