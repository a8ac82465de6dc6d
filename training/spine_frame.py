"""The anatomical frame of an axial lumbar slice, read from its manual disc and multifidus labels.

Canal and lamina derivation (``training.canal_lamina``) states every geometric rule in this frame, in mm:

* ``u``: lateral coordinate, 0 on the midline, positive toward the **patient's left**;
* ``v``: posterior coordinate, 0 on the posterior border of the disc at the midline, positive toward
  the patient's back.

The midline runs from the disc centroid to the midpoint between the two multifidi (whose medial borders
hug the spinous process), so a slice that is a little rotated in-plane keeps its rules. Arrays here are on
the shared-data grid ``a[i, j]`` (i toward patient left, j toward posterior; callers check the affine).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ParaspinalSegLib.anatomy import BY_KEY

DISC = BY_KEY["intervertebral_disc"].value
MULTIFIDUS_LEFT = BY_KEY["multifidus_left"].value
MULTIFIDUS_RIGHT = BY_KEY["multifidus_right"].value


class FrameError(ValueError):
    """The labels do not give an anatomical frame (a structure is missing or misplaced)."""


@dataclass(frozen=True)
class SpineFrame:
    """Lateral/posterior coordinates (mm) of every pixel and the landmarks the rules use."""

    #: (X, Y) lateral coordinate in mm, + toward patient left.
    u: np.ndarray
    #: (X, Y) posterior coordinate in mm, 0 at the disc's posterior border on the midline.
    v: np.ndarray
    #: Pixel spacing (mm) along i and j.
    spacing: tuple[float, float]
    #: Anterior-most and posterior-most v of the two multifidi together (mm).
    multifidus_front_mm: float
    multifidus_back_mm: float
    #: Largest |u| of either multifidus (mm): the lateral reach of the posterior arch.
    multifidus_reach_mm: float
    #: Half-width (mm) of the gap between the multifidi, median over the rows where both exist.
    interfidus_halfwidth_mm: float

    @property
    def pixel_area_mm2(self) -> float:
        return float(self.spacing[0] * self.spacing[1])

    def to_pixel(self, u_mm: float, v_mm: float) -> tuple[int, int]:
        """Nearest pixel (i, j) to the frame point (u, v)."""
        d = (self.u - u_mm) ** 2 + (self.v - v_mm) ** 2
        i, j = np.unravel_index(int(np.argmin(d)), d.shape)
        return int(i), int(j)


def _centroid_mm(mask: np.ndarray, spacing: tuple[float, float]) -> np.ndarray:
    ii, jj = np.nonzero(mask)
    return np.array([ii.mean() * spacing[0], jj.mean() * spacing[1]])


def spine_frame(labels: np.ndarray, spacing: tuple[float, float]) -> SpineFrame:
    """Frame of one slice from its labels (``a[i, j]`` grid); raises :class:`FrameError` without disc and both multifidi."""
    sp = (float(spacing[0]), float(spacing[1]))
    disc, mf_l, mf_r = labels == DISC, labels == MULTIFIDUS_LEFT, labels == MULTIFIDUS_RIGHT
    for name, m in (("disc", disc), ("multifidus_left", mf_l), ("multifidus_right", mf_r)):
        if m.sum() < 20:
            raise FrameError(f"no {name} label: the canal and lamina cannot be placed")
    c_disc = _centroid_mm(disc, sp)
    c_l, c_r = _centroid_mm(mf_l, sp), _centroid_mm(mf_r, sp)
    if c_l[0] <= c_r[0]:
        raise FrameError("multifidus_left lies on the patient's right of multifidus_right")
    mid_back = (c_l + c_r) / 2
    ap = mid_back - c_disc
    if ap[1] <= 0:
        raise FrameError("the multifidi are not posterior to the disc")
    ap /= np.linalg.norm(ap)
    lr = np.array([ap[1], -ap[0]])  # ap rotated so that +i (patient left) stays positive
    ii, jj = np.meshgrid(np.arange(labels.shape[0]) * sp[0], np.arange(labels.shape[1]) * sp[1], indexing="ij")
    di, dj = ii - c_disc[0], jj - c_disc[1]
    u = di * lr[0] + dj * lr[1]
    v = di * ap[0] + dj * ap[1]
    near_mid = disc & (np.abs(u) < 3.0)
    if not near_mid.any():
        raise FrameError("the disc does not cross the midline")
    v = v - float(v[near_mid].max())
    mf = mf_l | mf_r
    # Gap between the multifidi, row by row in the frame (1 mm bins of v).
    half = []
    for v0 in np.arange(float(v[mf].min()), float(v[mf].max()), 1.0):
        row = (v >= v0) & (v < v0 + 1.0)
        ul, ur = u[row & mf_l], u[row & mf_r]
        if ul.size and ur.size and ul.min() > ur.max():
            half.append((ul.min() - ur.max()) / 2)
    return SpineFrame(
        u=u, v=v, spacing=sp,
        multifidus_front_mm=float(v[mf].min()), multifidus_back_mm=float(v[mf].max()),
        multifidus_reach_mm=float(np.abs(u[mf]).max()),
        interfidus_halfwidth_mm=float(np.median(half)) if half else 2.0,
    )
