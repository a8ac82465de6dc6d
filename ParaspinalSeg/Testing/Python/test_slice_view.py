"""Red view geometry (ParaspinalSegLib.slice_view): which voxel slice a view shows and how to align it.

Volumes are stored LPS-like, RAS, with K pointing inferior, and tilted (oblique acquisition); views are
Slicer's axial default (screen x to patient left) moved, tilted and rotated.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from ParaspinalSegLib.slice_view import ALIGNMENT_TOLERANCE_DEG, aligned_slice_to_ras, red_view_slice_index


def _ijk_to_ras(directions, spacing, origin):
    m = np.eye(4)
    m[:3, :3] = np.asarray(directions, float) @ np.diag(spacing)
    m[:3, 3] = origin
    return m


def _axial_slice_to_ras(z, rotation=np.eye(3)):
    s = np.eye(4)
    # Slicer's axial default (vtkMRMLSliceNode.SetOrientationToAxial): x to patient left, y anterior,
    # z superior -- a left-handed frame.
    s[:3, :3] = np.asarray(rotation) @ np.diag([-1.0, 1.0, 1.0])
    s[:3, 3] = (3.0, -7.0, z)
    return s


def _rotation(axis, degrees):
    a = math.radians(degrees)
    c, s = math.cos(a), math.sin(a)
    return {"x": np.array([[1, 0, 0], [0, c, -s], [0, s, c]]),
            "y": np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]]),
            "z": np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])}[axis]


VOLUME_DIRECTIONS = [np.diag([-1.0, -1.0, 1.0]), np.eye(3), np.diag([1.0, -1.0, -1.0])]
VOLUME_IDS = ["LPS", "RAS", "K-inferior"]


@pytest.mark.parametrize("directions", VOLUME_DIRECTIONS, ids=VOLUME_IDS)
def test_axial_view_reports_the_slice_under_its_centre(directions):
    m = _ijk_to_ras(directions, (0.7, 0.7, 4.0), (20.0, 30.0, -12.0))
    dims = (64, 64, 5)
    for k in range(5):
        z = (m @ np.array([10.0, 20.0, k, 1.0]))[2]
        view = red_view_slice_index(m, _axial_slice_to_ras(z + 0.9), dims)  # 0.9 mm off the centre: still k
        assert view.k == k and view.aligned and view.inside, (k, view)
        assert view.offset == pytest.approx(0.9 / 4.0 * directions[2][2])
        assert view.angle_deg < 1e-6
    outside = red_view_slice_index(m, _axial_slice_to_ras(m[2, 3] + 5 * 4.0 * directions[2][2]), dims)
    assert outside.k == 5 and not outside.inside
    below = red_view_slice_index(m, _axial_slice_to_ras(m[2, 3] - 1 * 4.0 * directions[2][2]), dims)
    assert below.k == -1 and not below.inside


def test_tilted_view_is_reported_as_not_aligned():
    m = _ijk_to_ras(np.diag([-1.0, -1.0, 1.0]), (0.8, 0.8, 4.0), (25.0, 25.0, -4.0))
    dims = (64, 64, 3)
    slightly = red_view_slice_index(m, _axial_slice_to_ras(4.0, _rotation("x", 0.3)), dims)
    assert slightly.aligned and slightly.angle_deg == pytest.approx(0.3, abs=1e-6)
    tilted = red_view_slice_index(m, _axial_slice_to_ras(4.0, _rotation("x", 11.5)), dims)
    assert not tilted.aligned and tilted.angle_deg == pytest.approx(11.5, abs=1e-6)
    assert ALIGNMENT_TOLERANCE_DEG < 11.5
    assert red_view_slice_index(m, _axial_slice_to_ras(4.0, _rotation("x", 11.5)), dims, tolerance_deg=12.0).aligned
    # A sagittal view of an axial volume: 90 degrees off.
    sagittal = red_view_slice_index(m, _axial_slice_to_ras(4.0, _rotation("y", 90.0)), dims)
    assert not sagittal.aligned and sagittal.angle_deg == pytest.approx(90.0)


def test_oblique_volume_needs_a_view_rotated_with_it():
    tilt = _rotation("x", 12.0) @ _rotation("z", 20.0)
    m = _ijk_to_ras(tilt @ np.diag([-1.0, -1.0, 1.0]), (0.8, 0.8, 3.5), (5.0, 5.0, 5.0))
    dims = (48, 40, 6)
    # A plain axial view cuts through several slices of a tilted volume: not aligned.
    plain = red_view_slice_index(m, _axial_slice_to_ras((m @ [20, 20, 3, 1])[2]), dims)
    assert not plain.aligned and plain.angle_deg == pytest.approx(12.0, abs=0.5)
    # A view rotated with the volume is aligned and reports the slice under its centre.
    s = _axial_slice_to_ras(0.0, tilt)
    s[:3, 3] = (m @ np.array([20.0, 10.0, 4.0, 1.0]))[:3]
    view = red_view_slice_index(m, s, dims)
    assert view.aligned and view.k == 4 and abs(view.offset) < 1e-9


@pytest.mark.parametrize("tilt_deg", [0.0, 7.0, 25.0])
@pytest.mark.parametrize("directions", VOLUME_DIRECTIONS, ids=VOLUME_IDS)
def test_aligned_matrix_puts_the_view_exactly_on_a_slice(directions, tilt_deg):
    volume_rotation = _rotation("x", tilt_deg)
    m = _ijk_to_ras(volume_rotation @ directions, (0.75, 0.75, 4.0), (40.0, 50.0, -30.0))
    dims = (80, 80, 7)
    start = _axial_slice_to_ras(0.0, _rotation("y", 4.0))
    start[:3, 3] = (m @ [40, 40, 2.3, 1])[:3]
    before = red_view_slice_index(m, start, dims)
    assert not before.aligned  # the 4 degree tilt of the view alone is over the tolerance
    aligned = aligned_slice_to_ras(m, start, dims)
    rotation = aligned[:3, :3]
    np.testing.assert_allclose(rotation.T @ rotation, np.eye(3), atol=1e-9)  # orthonormal
    # Same handedness as the view it came from (Slicer's axial view is left-handed): not mirrored.
    assert np.linalg.det(rotation) == pytest.approx(np.sign(np.linalg.det(start[:3, :3])))
    view = red_view_slice_index(m, aligned, dims)
    assert view.aligned and view.inside and view.angle_deg < 1e-6
    assert abs(view.offset) < 1e-9  # exactly on a voxel slice centre
    assert view.k == before.k == 2  # the nearest slice, not another one
    # In-plane position kept: only the K coordinate of the centre changed.
    centre_before = np.linalg.solve(m, np.append(start[:3, 3], 1.0))
    centre_after = np.linalg.solve(m, np.append(aligned[:3, 3], 1.0))
    np.testing.assert_allclose(centre_after[:2], centre_before[:2], atol=1e-9)
    # The look is kept: screen x still points to patient left, screen y anterior, normal superior-ish.
    assert aligned[0, 0] < -0.9 and aligned[1, 1] > 0.8 and aligned[2, 2] > 0.8
    # Far outside the volume, the view is brought back onto its first or last slice.
    up, down = start.copy(), start.copy()
    up[2, 3] += 500.0
    down[2, 3] -= 500.0
    k_up = red_view_slice_index(m, aligned_slice_to_ras(m, up, dims), dims).k
    k_down = red_view_slice_index(m, aligned_slice_to_ras(m, down, dims), dims).k
    assert {k_up, k_down} == {0, dims[2] - 1}
    assert (k_up == dims[2] - 1) == (directions[2][2] > 0)  # superior is the last slice unless K points down


@pytest.mark.parametrize("screen", [np.eye(3), np.diag([-1.0, 1.0, 1.0]), np.diag([1.0, -1.0, 1.0])],
                         ids=["radiological", "neurological", "upside-down"])
def test_aligning_an_aligned_view_does_not_move_or_flip_it(screen):
    m = _ijk_to_ras(np.diag([-1.0, -1.0, 1.0]), (0.8, 0.8, 4.0), (25.0, 25.0, -4.0))
    s = _axial_slice_to_ras(4.0, screen)
    s[:3, 3] = (m @ np.array([30.0, 12.0, 2.0, 1.0]))[:3]
    np.testing.assert_allclose(aligned_slice_to_ras(m, s, (64, 64, 3)), s, atol=1e-12)
