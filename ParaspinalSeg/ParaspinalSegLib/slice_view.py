"""Which voxel slice a Slicer slice view shows, and how to put the view exactly onto one (numpy only).

The Slicer module segments "the slice the Red view shows". That is a voxel slice ``arr[k]`` of the
volume only when the view plane lies in the volume's slices (view normal parallel to the volume's K
axis); then the voxels are used as they are, without interpolation, and the result lies on the volume's
own grid. These functions decide that from two 4x4 matrices, so they run (and are tested) without
Slicer: the volume's IJK-to-RAS (world, parent transform included) and the slice node's SliceToRAS
(columns: view x axis, view y axis, view normal, view centre).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

#: The view counts as aligned with the volume's slices when its normal is within this angle of the K axis.
ALIGNMENT_TOLERANCE_DEG = 0.5


@dataclass(frozen=True)
class ViewSlice:
    """What a slice view shows of a volume."""

    #: Index of the voxel slice under the view centre (may be outside the volume, see ``inside``).
    k: int
    #: The view normal is parallel to the volume's K axis (within the tolerance).
    aligned: bool
    #: ``0 <= k < number of slices``.
    inside: bool
    #: Angle between the view normal and the K axis, degrees (NaN: unknown, e.g. non-linear transform).
    angle_deg: float
    #: Distance of the view centre from the centre of slice ``k``, in slices (-0.5 .. 0.5).
    offset: float


def _matrix(m: Any) -> np.ndarray:
    return np.asarray(m, dtype=float).reshape(4, 4)


def red_view_slice_index(
    volume_ijk_to_ras: Any,
    slice_to_ras: Any,
    dimensions: Sequence[int],
    tolerance_deg: float = ALIGNMENT_TOLERANCE_DEG,
) -> ViewSlice:
    """Which volume slice K a view shows, and whether the view lies in the volume's slices.

    ``volume_ijk_to_ras`` and ``slice_to_ras`` are 4x4 arrays; ``dimensions`` is the volume's (I, J, K)
    size. When the view is aligned every pixel of the view lies in voxel slice
    ``K = round(K coordinate of the view centre)``, so that slice can be used without interpolation.
    """
    m = _matrix(volume_ijk_to_ras)
    s = _matrix(slice_to_ras)
    k_axis = m[:3, 2] / np.linalg.norm(m[:3, 2])
    normal = s[:3, 2] / np.linalg.norm(s[:3, 2])
    cosine = min(1.0, abs(float(np.dot(k_axis, normal))))
    angle_deg = math.degrees(math.acos(cosine))
    centre_ijk = np.linalg.solve(m, np.append(s[:3, 3], 1.0))
    k = int(np.floor(centre_ijk[2] + 0.5))  # round half up, the same on both sides of zero
    return ViewSlice(
        k=k,
        aligned=angle_deg <= tolerance_deg,
        inside=0 <= k < int(dimensions[2]),
        angle_deg=angle_deg,
        offset=float(centre_ijk[2] - k),
    )


def aligned_slice_to_ras(volume_ijk_to_ras: Any, slice_to_ras: Any, dimensions: Sequence[int]) -> np.ndarray:
    """SliceToRAS that puts a view exactly onto one of the volume's slices, keeping its look.

    The view normal becomes the volume's K axis (same sense as the current normal), the view's
    horizontal axis the volume's I or J axis closest to the current horizontal axis, and the vertical
    axis the remaining in-plane axis, pointing the way the current vertical axis points. So the view
    keeps its handedness: Slicer's axial default (x to patient left, y anterior, z superior) is a
    left-handed frame, and forcing a right-handed one would turn the image upside down. The view centre keeps its
    in-plane position and moves to the nearest voxel slice centre K (clamped into the volume).
    Arguments as for :func:`red_view_slice_index`; returns a 4x4 array.
    """
    m = _matrix(volume_ijk_to_ras)
    s = _matrix(slice_to_ras)
    axes = m[:3, :3] / np.linalg.norm(m[:3, :3], axis=0)
    current = s[:3, :3] / np.linalg.norm(s[:3, :3], axis=0)
    normal = axes[:, 2] * (1.0 if np.dot(axes[:, 2], current[:, 2]) >= 0 else -1.0)
    scores = [np.dot(axes[:, a], current[:, 0]) for a in (0, 1)]
    best = int(np.argmax(np.abs(scores)))
    horizontal = axes[:, best] * (1.0 if scores[best] >= 0 else -1.0)
    horizontal = horizontal - np.dot(horizontal, normal) * normal  # orthogonal even for sheared volumes
    horizontal /= np.linalg.norm(horizontal)
    vertical = np.cross(normal, horizontal)
    if np.dot(vertical, current[:, 1]) < 0:
        vertical = -vertical
    centre_ijk = np.linalg.solve(m, np.append(s[:3, 3], 1.0))
    centre_ijk[2] = min(max(np.floor(centre_ijk[2] + 0.5), 0), int(dimensions[2]) - 1)
    aligned = np.eye(4)
    aligned[:3, 0] = horizontal
    aligned[:3, 1] = vertical
    aligned[:3, 2] = normal
    aligned[:3, 3] = (m @ centre_ijk)[:3]
    return aligned
