"""Geometry shared by the segmenter, the scene writers and the Slicer glue: pixel boxes in patient space
and 4×4 matrices between numpy and VTK.

One convention for a box on a slice (``docs/api-contract.md``): pixel bounds ``(p0, q0, p1, q1)`` are
half-open edges on the slice array ``a[p, q]`` (pixel ``p`` covers ``[p, p + 1)``, its centre is index
``p``), and the slice's IJK-to-RAS matrix maps ``(p, q, 0, 1)`` to RAS. A volume slice ``arr[k]`` gets that
matrix from :func:`preprocessing.slice_geometry_from_volume` (axis 0 = J, axis 1 = I).

numpy only; VTK is imported by the two matrix functions when they run, so this module loads in a Python
without VTK or torch.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import numpy as np

__all__ = ["RasBox", "pixel_box_to_ras", "array_from_vtk_matrix", "vtk_matrix_from_array"]


class RasBox(NamedTuple):
    """A box in patient space, aligned with the slice's own axes (for an oriented Slicer ROI)."""

    #: RAS (mm) of the box centre, shape (3,).
    center_ras: np.ndarray
    #: Extent (mm) along the slice's axis 0 and axis 1, shape (2,).
    size_mm: np.ndarray
    #: Columns: unit RAS directions of axis 0, axis 1 and the normal (axis0 × axis1), shape (3, 3).
    axes_ras: np.ndarray


def pixel_box_to_ras(pixel: Sequence[float], slice_ijk_to_ras: Any) -> RasBox:
    """Half-open pixel bounds ``(p0, q0, p1, q1)`` on a slice → :class:`RasBox` (centre, size, axes).

    Floats are allowed (a detector's box mapped back is not on whole pixels). The box's axes follow
    the slice's axes, so an ROI built from it sits on the slice even when the volume is oblique; the
    normal is ``axis0 × axis1`` (a right-handed frame, also for volumes stored left-handed).
    """
    p0, q0, p1, q1 = (float(v) for v in pixel)
    m = np.asarray(slice_ijk_to_ras, dtype=np.float64)
    s0, s1 = float(np.linalg.norm(m[:3, 0])), float(np.linalg.norm(m[:3, 1]))
    d0, d1 = m[:3, 0] / s0, m[:3, 1] / s1
    n = np.cross(d0, d1)
    n /= np.linalg.norm(n)
    # Edge coordinate e ↔ centre-index e - 0.5 (pixel p covers [p, p+1), its centre is index p).
    centre = m @ np.array([(p0 + p1) / 2 - 0.5, (q0 + q1) / 2 - 0.5, 0.0, 1.0])
    return RasBox(centre[:3], np.array([(p1 - p0) * s0, (q1 - q0) * s1]), np.stack([d0, d1, n], axis=1))


def array_from_vtk_matrix(vtk_matrix: Any) -> np.ndarray:
    """A ``vtkMatrix4x4`` (or anything with ``GetElement(r, c)``) as a float64 4×4 array."""
    return np.array([[vtk_matrix.GetElement(r, c) for c in range(4)] for r in range(4)], dtype=np.float64)


def vtk_matrix_from_array(array: Any) -> Any:
    """A new ``vtkMatrix4x4`` holding the 4×4 ``array`` (a 3×3 array fills the rotation part only)."""
    import vtk

    a = np.asarray(array, dtype=np.float64)
    if a.shape not in ((4, 4), (3, 3)):
        raise ValueError(f"expected a 4x4 or 3x3 matrix, got shape {a.shape}")
    matrix = vtk.vtkMatrix4x4()
    n = a.shape[0]
    for r in range(n):
        for c in range(n):
            matrix.SetElement(r, c, float(a[r, c]))
    return matrix
