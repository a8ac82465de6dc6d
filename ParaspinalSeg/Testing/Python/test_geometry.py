"""One pixel-box → RAS convention for the segmenter's boxes, the detector's boxes and the ROI writer, and
the numpy ↔ vtkMatrix4x4 conversion."""

from __future__ import annotations

import numpy as np
import pytest

from ParaspinalSegLib.boxes import box_iou, normalised_box, pixel_box_iou
from ParaspinalSegLib.geometry import array_from_vtk_matrix, pixel_box_to_ras, vtk_matrix_from_array
from ParaspinalSegLib.preprocessing import resample_grid, slice_geometry_from_volume


def _oblique_volume() -> np.ndarray:
    c, s = np.cos(0.2), np.sin(0.2)
    m = np.eye(4)
    m[:3, :3] = np.array([[-c, -s, 0], [s, -c, 0], [0, 0, 1]]) @ np.diag([0.8, 0.9, 4.0])  # LPS-like, rotated
    m[:3, 3] = (12.0, -30.0, 55.0)
    return m


def test_pixel_box_centre_size_and_axes():
    vol = _oblique_volume()
    m = slice_geometry_from_volume(vol, 2)
    box = pixel_box_to_ras((10, 20, 14, 30), m)
    # Centre: the middle of pixel rows 10..13 (J) and columns 20..29 (I) on slice k = 2.
    np.testing.assert_allclose(box.center_ras, (vol @ [24.5, 11.5, 2, 1])[:3])
    np.testing.assert_allclose(box.size_mm, [4 * 0.9, 10 * 0.8])
    np.testing.assert_allclose(box.axes_ras @ box.axes_ras.T, np.eye(3), atol=1e-12)
    assert np.linalg.det(box.axes_ras) == pytest.approx(1.0)


def test_detector_boxes_use_the_same_convention():
    """A normalised model box mapped back (ResampleGrid) lands where its pixel bounds say."""
    m = slice_geometry_from_volume(_oblique_volume(), 0)
    grid = resample_grid((60, 50), m, {"spacing_mm": 1.0, "size": 64})
    p0, q0, p1, q1 = grid.box_to_input(0.4, 0.5, 0.2, 0.1)
    via_grid = grid.box_to_ras(0.4, 0.5, 0.2, 0.1)
    direct = pixel_box_to_ras((p0, q0, p1, q1), m)
    for a, b in zip(via_grid, direct):
        np.testing.assert_allclose(a, b)


def test_roi_writer_box_matches(monkeypatch):
    pytest.importorskip("vtk")
    from ParaspinalSegLib.scene import box_geometry

    vol = _oblique_volume()
    roi = box_geometry(vol, 2, (10, 20, 14, 30))
    box = pixel_box_to_ras((10, 20, 14, 30), slice_geometry_from_volume(vol, 2))
    np.testing.assert_allclose(roi.center_ras, box.center_ras)
    np.testing.assert_allclose(roi.size_mm, [10 * 0.8, 4 * 0.9, 4.0])  # along I, J, the normal
    np.testing.assert_allclose(roi.axes_ras[:, 0], vol[:3, 0] / 0.8)
    assert np.linalg.det(roi.axes_ras) == pytest.approx(1.0)


def test_pixel_iou_is_the_normalised_iou():
    a, b = (0, 0, 10, 10), (5, 0, 15, 10)
    assert pixel_box_iou(a, b) == pytest.approx(50 / 150)
    assert pixel_box_iou(a, b) == pytest.approx(box_iou(normalised_box(*a, 64, 32), normalised_box(*b, 64, 32)))
    assert pixel_box_iou(a, (20, 20, 30, 30)) == 0.0
    assert pixel_box_iou((3, 3, 3, 3), (3, 3, 3, 3)) == 0.0


def test_vtk_matrix_round_trip():
    pytest.importorskip("vtk")
    m = _oblique_volume()
    np.testing.assert_array_equal(array_from_vtk_matrix(vtk_matrix_from_array(m)), m)
    with pytest.raises(ValueError, match="4x4"):
        vtk_matrix_from_array(np.eye(2))
