"""Bring one axial slice into the model's view and map the model's answers back onto the slice.

Numpy + scipy only: this module runs in 3D Slicer's Python (no torch, no scikit-image).

Geometry conventions (see ``docs/api-contract.md``):

- A slice is a 2-D array ``a[p, q]`` plus a 4×4 ``slice_ijk_to_ras`` matrix mapping ``(p, q, 0, 1)``
  to RAS millimetres: column 0 = step along axis 0, column 1 = step along axis 1, column 2 = slice
  normal × thickness, column 3 = RAS of the centre of pixel (0, 0).
- The *canonical* orientation is radiological display: rows run anterior → posterior, columns run
  patient right → patient left (RAS +x is patient right, so column steps point to −x and row steps
  to −y). Left and right are therefore decided from the matrix, never from the array layout.
- Continuous pixel coordinates: "centre-index" coordinates put pixel ``i``'s centre at ``i``;
  "edge" coordinates (used by boxes) put it at ``i + 0.5``, so pixel ``i`` covers ``[i, i + 1)``.

The model grid is square, ``size × size`` with isotropic spacing
``max(model spacing, FOV / size)`` so the whole field of view always fits; it is centred on the
slice's field of view and padded. :class:`ResampleGrid` records everything needed to go back, and
the way back is evaluated at the input's own pixel centres, so results land on the input grid.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Union

import numpy as np
from scipy import ndimage

from .errors import InputError, NonAxialSliceError
from .geometry import RasBox, pixel_box_to_ras

#: scipy.ndimage.affine_transform's warning for a 1-D matrix (scipy 1.13 in Slicer 5.8/5.10; gone in 1.14).
_SCIPY_1D_MATRIX_WARNING = "The behavior of affine_transform with a 1-D array"

__all__ = [
    "NonAxialSliceError",
    "CanonicalOrientation",
    "ModelInput",
    "NormalisationConfig",
    "ResampleGrid",
    "PreparedSlice",
    "DEFAULT_MAX_OBLIQUITY_DEG",
    "slice_geometry_from_volume",
    "slice_geometry_from_nifti_affine",
    "pixel_spacing",
    "slice_normal",
    "canonical_orientation",
    "canonical_ijk_to_ras",
    "to_canonical",
    "from_canonical",
    "normalise_intensity",
    "resample_grid",
    "prepare_slice",
]

#: Largest angle between the slice normal and the S axis accepted as "axial".
DEFAULT_MAX_OBLIQUITY_DEG = 30.0

#: Downsampling factor above which intensities are Gaussian-smoothed before resampling (anti-aliasing).
ANTIALIAS_ABOVE = 1.5

# Relative tolerance for "the same spacing": keeps the identity case exact despite float rounding
# (e.g. 320 * 0.8 / 320 need not give back 0.8 bit for bit).
_SAME_SPACING_RTOL = 1e-9

_AXIS_NAMES = (("R", "L", "sagittal"), ("A", "P", "coronal"), ("S", "I", "axial"))


# --------------------------------------------------------------------------------------------------
# Slice geometry
# --------------------------------------------------------------------------------------------------

def _as_matrix(m: Any) -> np.ndarray:
    """Return ``m`` as a float64 4×4 array, raising :class:`InputError` if it is not one."""
    mat = np.asarray(m, dtype=np.float64)
    if mat.shape != (4, 4) or not np.all(np.isfinite(mat)):
        raise InputError(f"expected a finite 4x4 IJK-to-RAS matrix, got shape {mat.shape}")
    return mat


def slice_geometry_from_volume(volume_ijk_to_ras: Any, k: int) -> np.ndarray:
    """Slice IJK-to-RAS matrix of ``arr[k]`` for a volume array in Slicer/SimpleITK order ``arr[k, j, i]``.

    Axis 0 of the slice is J and axis 1 is I, so the slice matrix's columns are the volume matrix's
    J column, I column, K column and the RAS position of voxel ``(i=0, j=0, k)``.
    ``volume_ijk_to_ras`` is e.g. Slicer's ``volumeNode.GetIJKToRASMatrix`` as a numpy array.
    """
    v = _as_matrix(volume_ijk_to_ras)
    m = np.eye(4)
    m[:3, 0] = v[:3, 1]
    m[:3, 1] = v[:3, 0]
    m[:3, 2] = v[:3, 2]
    m[:3, 3] = (v @ np.array([0.0, 0.0, float(k), 1.0]))[:3]
    return m


def slice_geometry_from_nifti_affine(affine: Any, k: int) -> np.ndarray:
    """Slice IJK-to-RAS matrix of ``arr[:, :, k]`` for a NIfTI volume in nibabel order ``arr[i, j, k]``.

    nibabel's affine already maps ``(i, j, k)`` to RAS (RAS+ world), so axis 0 = i and axis 1 = j.
    """
    v = _as_matrix(affine)
    m = np.eye(4)
    m[:3, :3] = v[:3, :3]
    m[:3, 3] = (v @ np.array([0.0, 0.0, float(k), 1.0]))[:3]
    return m


def pixel_spacing(slice_ijk_to_ras: Any) -> tuple[float, float]:
    """In-plane pixel spacing ``(s0, s1)`` in mm along the slice's axis 0 and axis 1."""
    m = _as_matrix(slice_ijk_to_ras)
    return float(np.linalg.norm(m[:3, 0])), float(np.linalg.norm(m[:3, 1]))


def _unit_axes(m: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Unit directions of axis 0, axis 1 and the normal ``d0 × d1`` (right-handed), all in RAS."""
    s0, s1 = np.linalg.norm(m[:3, 0]), np.linalg.norm(m[:3, 1])
    if s0 <= 0 or s1 <= 0:
        raise InputError("IJK-to-RAS matrix has a zero in-plane axis (pixel spacing 0)")
    d0, d1 = m[:3, 0] / s0, m[:3, 1] / s1
    n = np.cross(d0, d1)
    norm = np.linalg.norm(n)
    if norm < 1e-6:
        raise InputError("IJK-to-RAS matrix has parallel in-plane axes (degenerate slice geometry)")
    return d0, d1, n / norm


def slice_normal(slice_ijk_to_ras: Any) -> np.ndarray:
    """Unit normal (RAS) of the slice plane, computed from the in-plane axes (``d0 × d1``)."""
    return _unit_axes(_as_matrix(slice_ijk_to_ras))[2]


def _describe_direction(v: np.ndarray) -> str:
    """E.g. ``"(0.00, 0.71, 0.71) RAS, closest to A (coronal)"``."""
    axis = int(np.argmax(np.abs(v)))
    pos, neg, plane = _AXIS_NAMES[axis]
    letter = pos if v[axis] >= 0 else neg
    return f"({v[0]:.2f}, {v[1]:.2f}, {v[2]:.2f}) RAS, closest to {letter} ({plane})"


# --------------------------------------------------------------------------------------------------
# Canonical orientation
# --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class CanonicalOrientation:
    """How to turn an input slice into the canonical (radiological) view.

    Applied in this order to the last two axes: transpose (if ``transpose``), then reverse the rows
    (``flip_rows``), then reverse the columns (``flip_cols``).
    """

    transpose: bool = False
    flip_rows: bool = False
    flip_cols: bool = False

    @property
    def is_identity(self) -> bool:
        return not (self.transpose or self.flip_rows or self.flip_cols)

    def canonical_shape(self, input_shape: tuple[int, int]) -> tuple[int, int]:
        """Shape of the canonical array for an input of shape ``input_shape`` (last two axes)."""
        n0, n1 = int(input_shape[-2]), int(input_shape[-1])
        return (n1, n0) if self.transpose else (n0, n1)

    def canonical_to_input_index(self, input_shape: tuple[int, int]) -> np.ndarray:
        """3×3 matrix mapping canonical centre-index ``(r, c, 1)`` to input centre-index ``(p, q, 1)``."""
        nr, nc = self.canonical_shape(input_shape)
        # Undo the flips first (they were applied last) ...
        unflip = np.eye(3)
        if self.flip_rows:
            unflip[0, 0], unflip[0, 2] = -1.0, nr - 1.0
        if self.flip_cols:
            unflip[1, 1], unflip[1, 2] = -1.0, nc - 1.0
        # ... then the transpose.
        swap = np.array([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]) if self.transpose else np.eye(3)
        return swap @ unflip


def canonical_orientation(
    slice_ijk_to_ras: Any, max_obliquity_deg: float = DEFAULT_MAX_OBLIQUITY_DEG
) -> CanonicalOrientation:
    """Decide the transpose/flips that put a slice into radiological display orientation.

    Rows must step towards posterior (−y) and columns towards patient left (−x). Of the eight
    transpose/flip combinations the one whose row and column steps point most nearly that way is
    chosen, which is well defined for oblique slices too.

    Raises :class:`NonAxialSliceError` (a ``ValueError``) when the slice normal is more than
    ``max_obliquity_deg`` away from the S–I axis (sagittal, coronal or strongly oblique slices).
    """
    m = _as_matrix(slice_ijk_to_ras)
    d0, d1, n = _unit_axes(m)
    tilt = math.degrees(math.acos(min(1.0, abs(float(n[2])))))
    if tilt > max_obliquity_deg:
        raise NonAxialSliceError(
            f"slice is not axial: its normal {_describe_direction(n)} is {tilt:.1f} degrees from the "
            f"superior-inferior axis (at most {max_obliquity_deg:g} accepted). ParaspinalSeg segments "
            "axial slices only; choose an axial series or reformat the volume to axial."
        )
    best: Optional[CanonicalOrientation] = None
    best_score = -np.inf
    for transpose in (False, True):
        row_dir, col_dir = (d1, d0) if transpose else (d0, d1)
        for flip_rows in (False, True):
            for flip_cols in (False, True):
                r = -row_dir if flip_rows else row_dir
                c = -col_dir if flip_cols else col_dir
                score = -r[1] - c[0]  # rows → posterior (−y), columns → patient left (−x)
                if score > best_score + 1e-12:
                    best, best_score = CanonicalOrientation(transpose, flip_rows, flip_cols), score
    assert best is not None
    return best


def to_canonical(a: np.ndarray, orientation: CanonicalOrientation) -> np.ndarray:
    """Input layout → canonical layout on the last two axes (returns a C-contiguous copy)."""
    a = np.asarray(a)
    if a.ndim < 2:
        raise InputError(f"expected an array with at least 2 dimensions, got shape {a.shape}")
    if orientation.transpose:
        a = np.swapaxes(a, -1, -2)
    if orientation.flip_rows:
        a = a[..., ::-1, :]
    if orientation.flip_cols:
        a = a[..., ::-1]
    # Contiguous so torch.from_numpy (which rejects negative strides) can take it directly.
    return np.ascontiguousarray(a)


def from_canonical(a: np.ndarray, orientation: CanonicalOrientation) -> np.ndarray:
    """Canonical layout → input layout on the last two axes (inverse of :func:`to_canonical`)."""
    a = np.asarray(a)
    if a.ndim < 2:
        raise InputError(f"expected an array with at least 2 dimensions, got shape {a.shape}")
    if orientation.flip_cols:
        a = a[..., ::-1]
    if orientation.flip_rows:
        a = a[..., ::-1, :]
    if orientation.transpose:
        a = np.swapaxes(a, -1, -2)
    return np.ascontiguousarray(a)


def canonical_ijk_to_ras(
    slice_ijk_to_ras: Any, orientation: CanonicalOrientation, input_shape: tuple[int, int]
) -> np.ndarray:
    """4×4 matrix mapping canonical ``(r, c, 0, 1)`` to RAS for a slice of shape ``input_shape``."""
    m = _as_matrix(slice_ijk_to_ras)
    a = orientation.canonical_to_input_index(input_shape)
    embed = np.eye(4)
    embed[:2, :2] = a[:2, :2]
    embed[:2, 3] = a[:2, 2]
    return m @ embed


# --------------------------------------------------------------------------------------------------
# Model input and intensity normalisation (both recorded in the weights' JSON)
# --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ModelInput:
    """The model's input grid: isotropic pixel spacing (mm) and square size (pixels)."""

    spacing_mm: float = 0.8
    size: int = 256

    def __post_init__(self) -> None:
        if not (self.spacing_mm > 0) or int(self.size) != self.size or self.size < 1:
            raise ValueError(f"invalid model input: spacing_mm={self.spacing_mm}, size={self.size}")

    def to_dict(self) -> dict[str, Any]:
        return {"spacing_mm": float(self.spacing_mm), "size": int(self.size)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ModelInput":
        return cls(spacing_mm=float(d["spacing_mm"]), size=int(d["size"]))


@dataclass(frozen=True)
class NormalisationConfig:
    """Intensity normalisation: robust percentiles of the slice mapped to [0, 1] and clipped."""

    method: str = "percentile"
    low: float = 0.5
    high: float = 99.5

    def __post_init__(self) -> None:
        if self.method != "percentile":
            raise ValueError(f"unknown intensity normalisation method {self.method!r} (only 'percentile')")
        if not (0.0 <= self.low < self.high <= 100.0):
            raise ValueError(f"invalid percentiles low={self.low}, high={self.high}")

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "low": float(self.low), "high": float(self.high)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "NormalisationConfig":
        return cls(method=str(d.get("method", "percentile")), low=float(d["low"]), high=float(d["high"]))


def _as_normalisation(n: Union[None, NormalisationConfig, Mapping[str, Any]]) -> NormalisationConfig:
    if n is None:
        return NormalisationConfig()
    if isinstance(n, NormalisationConfig):
        return n
    return NormalisationConfig.from_dict(n)


def _as_model_input(m: Union[None, ModelInput, Mapping[str, Any]]) -> ModelInput:
    if m is None:
        return ModelInput()
    if isinstance(m, ModelInput):
        return m
    return ModelInput.from_dict(m)


def normalise_intensity(a: np.ndarray, low_pct: float = 0.5, high_pct: float = 99.5) -> np.ndarray:
    """Map the ``low_pct``/``high_pct`` percentiles of ``a`` to 0/1, clip to [0, 1], return float32.

    Percentiles move with any scaling ``a·x + b`` (a > 0), so the result does not depend on the
    scanner's intensity units. A constant image gives all zeros (nothing to normalise).
    """
    x = np.asarray(a, dtype=np.float64)
    if x.size == 0:
        raise InputError("cannot normalise an empty image")
    if not np.all(np.isfinite(x)):
        raise InputError("image contains NaN or infinite values")
    lo, hi = np.percentile(x, [low_pct, high_pct])
    if hi <= lo:  # e.g. a mostly-empty slice: fall back to the full range
        lo, hi = float(x.min()), float(x.max())
    if hi <= lo:
        return np.zeros(x.shape, dtype=np.float32)
    return np.clip((x - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)


# --------------------------------------------------------------------------------------------------
# Resampling grid
# --------------------------------------------------------------------------------------------------

def _interp_axis(values: np.ndarray, coords: np.ndarray, axis: int) -> np.ndarray:
    """Linear interpolation of ``values`` along ``axis`` at centre-index ``coords`` (edge-clamped).

    Separable and explicit so integer coordinates reproduce the samples bit for bit.
    """
    n = values.shape[axis]
    c = np.clip(coords, 0.0, n - 1.0)
    i0 = np.floor(c).astype(np.intp)
    i1 = np.minimum(i0 + 1, n - 1)
    w = (c - i0).astype(np.float32)
    shape = [1] * values.ndim
    shape[axis] = -1
    w = w.reshape(shape)
    v0 = np.take(values, i0, axis=axis)
    v1 = np.take(values, i1, axis=axis)
    return v0 * (1.0 - w) + v1 * w


def _nearest_index(coords: np.ndarray, n: int) -> np.ndarray:
    """Nearest pixel of centre-index ``coords`` (ties round up), clamped to ``[0, n - 1]``."""
    return np.clip(np.floor(coords + 0.5), 0, n - 1).astype(np.intp)


@dataclass(frozen=True, eq=False)  # eq=False: the numpy matrix field has no scalar ==
class ResampleGrid:
    """Everything needed to go from an input slice to the model grid and back.

    Model centre-index ``(u, v)`` maps to canonical centre-index
    ``(r, c) = (u·scale[0] + offset[0], v·scale[1] + offset[1])``; the canonical array is the input
    after :func:`to_canonical`. Both grids share the centre of the field of view.
    """

    input_shape: tuple[int, int]
    slice_ijk_to_ras: np.ndarray = field(repr=False)
    orientation: CanonicalOrientation
    #: Spacing (mm) of the canonical array's rows and columns.
    canonical_spacing: tuple[float, float]
    #: Isotropic spacing actually used on the model grid (≥ the model's nominal spacing).
    spacing_mm: float
    size: int

    # ---- derived geometry ------------------------------------------------------------------------
    @property
    def canonical_shape(self) -> tuple[int, int]:
        return self.orientation.canonical_shape(self.input_shape)

    @property
    def scale(self) -> tuple[float, float]:
        """Canonical pixels per model pixel along rows and columns (> 1 means downsampling)."""
        out = []
        for s_in in self.canonical_spacing:
            f = self.spacing_mm / s_in
            out.append(1.0 if abs(f - 1.0) < _SAME_SPACING_RTOL else f)
        return out[0], out[1]

    @property
    def offset(self) -> tuple[float, float]:
        """Canonical centre-index of model pixel 0 along rows and columns."""
        half = (self.size - 1) / 2.0
        return tuple((n - 1) / 2.0 - half * f for n, f in zip(self.canonical_shape, self.scale))  # type: ignore[return-value]

    @property
    def is_identity(self) -> bool:
        """True when the model grid *is* the canonical grid (no interpolation either way)."""
        return self.scale == (1.0, 1.0) and self.canonical_shape == (self.size, self.size)

    def model_to_canonical(self, u: Any, v: Any) -> tuple[np.ndarray, np.ndarray]:
        """Model centre-index ``(u, v)`` → canonical centre-index ``(r, c)``."""
        (fr, fc), (orr, oc) = self.scale, self.offset
        return np.asarray(u, dtype=np.float64) * fr + orr, np.asarray(v, dtype=np.float64) * fc + oc

    def canonical_to_model(self, r: Any, c: Any) -> tuple[np.ndarray, np.ndarray]:
        """Canonical centre-index ``(r, c)`` → model centre-index ``(u, v)``."""
        (fr, fc), (orr, oc) = self.scale, self.offset
        return (np.asarray(r, dtype=np.float64) - orr) / fr, (np.asarray(c, dtype=np.float64) - oc) / fc

    def canonical_ijk_to_ras(self) -> np.ndarray:
        """4×4 matrix: canonical ``(r, c, 0, 1)`` → RAS."""
        return canonical_ijk_to_ras(self.slice_ijk_to_ras, self.orientation, self.input_shape)

    def model_ijk_to_ras(self) -> np.ndarray:
        """4×4 matrix: model ``(u, v, 0, 1)`` → RAS (e.g. to save the model input as a volume)."""
        (fr, fc), (orr, oc) = self.scale, self.offset
        s = np.eye(4)
        s[0, 0], s[1, 1], s[0, 3], s[1, 3] = fr, fc, orr, oc
        return self.canonical_ijk_to_ras() @ s

    # ---- input grid → model grid -----------------------------------------------------------------
    def to_model(self, values: np.ndarray, order: int = 1, cval: float = 0.0, antialias: bool = True) -> np.ndarray:
        """Resample ``values`` (``(n0, n1)`` or ``(C, n0, n1)`` on the input grid) onto the model grid.

        ``order=1``: linear interpolation (float32), Gaussian pre-filtered along an axis that is
        downsampled by more than ``ANTIALIAS_ABOVE``. ``order=0``: nearest neighbour, dtype kept
        (use it for label images). Model pixels whose centre lies outside the input's field of
        view get ``cval``.
        """
        arr = np.asarray(values)
        squeeze = arr.ndim == 2
        if arr.ndim not in (2, 3) or tuple(arr.shape[-2:]) != tuple(self.input_shape):
            raise InputError(f"expected shape {self.input_shape} or (C, *{self.input_shape}), got {arr.shape}")
        if order not in (0, 1):
            raise ValueError("order must be 0 (nearest) or 1 (linear)")
        can = to_canonical(arr[None] if squeeze else arr, self.orientation)
        if order == 1:
            can = can.astype(np.float32, copy=False)
        if self.is_identity:
            out = can.copy()
            return out[0] if squeeze else out

        size = self.size
        nr, nc = self.canonical_shape
        r, c = self.model_to_canonical(np.arange(size), np.arange(size))
        if order == 0:
            out = can[:, _nearest_index(r, nr)][:, :, _nearest_index(c, nc)]
        else:
            (fr, fc), (orr, oc) = self.scale, self.offset
            out = np.empty((can.shape[0], size, size), dtype=np.float32)
            for i, chan in enumerate(can):
                if antialias:
                    # sigma (f - 1) / 2 input pixels, as scikit-image's resize does for anti-aliasing.
                    for axis, f in ((0, fr), (1, fc)):
                        if f > ANTIALIAS_ABOVE:
                            chan = ndimage.gaussian_filter1d(chan, (f - 1.0) / 2.0, axis=axis, mode="nearest")
                # The 1-D (diagonal) matrix takes scipy's fast zoom-and-shift path; scipy < 1.14 warns on
                # every call that its meaning changed in 0.18, which concerns code older than that.
                with warnings.catch_warnings():
                    warnings.filterwarnings("ignore", message=_SCIPY_1D_MATRIX_WARNING, category=UserWarning)
                    out[i] = ndimage.affine_transform(
                        chan, np.array([fr, fc]), offset=(orr, oc), output_shape=(size, size),
                        order=1, mode="nearest",
                    )
        # Padding: model pixels whose centre falls outside the input field of view.
        outside_r = (r < -0.5) | (r > nr - 0.5)
        outside_c = (c < -0.5) | (c > nc - 0.5)
        out[:, outside_r, :] = cval
        out[:, :, outside_c] = cval
        return out[0] if squeeze else out

    # ---- model grid → input grid -----------------------------------------------------------------
    def to_input(self, values: np.ndarray, order: int = 1) -> np.ndarray:
        """Map model-grid ``values`` (``(size, size)`` or ``(C, size, size)``) onto the input slice's grid.

        Evaluated at the input's own pixel centres: ``order=1`` interpolates linearly (float32, float64 kept; use
        it for logits/probabilities and take the argmax afterwards), ``order=0`` takes the nearest
        model pixel (dtype kept; use it for labels). Returns ``(n0, n1)`` or ``(C, n0, n1)`` in the
        input's layout. In the identity case the values come back unchanged, bit for bit.
        """
        arr = np.asarray(values)
        squeeze = arr.ndim == 2
        if arr.ndim not in (2, 3) or arr.shape[-2:] != (self.size, self.size):
            raise InputError(f"expected shape ({self.size}, {self.size}) or (C, {self.size}, {self.size}), got {arr.shape}")
        if order not in (0, 1):
            raise ValueError("order must be 0 (nearest) or 1 (linear)")
        if squeeze:
            arr = arr[None]
        if order == 1 and arr.dtype != np.float64:
            arr = arr.astype(np.float32, copy=False)
        if self.is_identity:
            can = arr.copy()
        else:
            nr, nc = self.canonical_shape
            u, v = self.canonical_to_model(np.arange(nr), np.arange(nc))
            if order == 0:
                can = arr[:, _nearest_index(u, self.size)][:, :, _nearest_index(v, self.size)]
            else:
                can = _interp_axis(_interp_axis(arr, u, axis=1), v, axis=2)
                can = can.astype(arr.dtype, copy=False)
        out = from_canonical(can, self.orientation)
        return out[0] if squeeze else out

    # ---- boxes -----------------------------------------------------------------------------------
    def _box_canonical_edges(self, cx: float, cy: float, w: float, h: float) -> tuple[float, float, float, float]:
        """Normalised model box → canonical edge coordinates ``(r0, c0, r1, c1)``."""
        n = self.size
        # Model edge → model centre-index (−0.5) → canonical centre-index → canonical edge (+0.5).
        u = np.array([(cy - h / 2) * n, (cy + h / 2) * n]) - 0.5
        v = np.array([(cx - w / 2) * n, (cx + w / 2) * n]) - 0.5
        r, c = self.model_to_canonical(u, v)
        (r0, r1), (c0, c1) = r + 0.5, c + 0.5
        return float(r0), float(c0), float(r1), float(c1)

    def box_to_input(self, cx: float, cy: float, w: float, h: float) -> tuple[float, float, float, float]:
        """Normalised model box ``(cx, cy, w, h)`` → ``(p0, q0, p1, q1)`` edge bounds on the input array.

        Floats in the input's pixel-edge coordinates (pixel ``p`` covers ``[p, p + 1)``), with
        ``p0 ≤ p1`` along axis 0 and ``q0 ≤ q1`` along axis 1; round them for integer bounds.
        """
        r0, c0, r1, c1 = self._box_canonical_edges(cx, cy, w, h)
        a = self.orientation.canonical_to_input_index(self.input_shape)
        corners = np.array([[r0 - 0.5, c0 - 0.5, 1.0], [r1 - 0.5, c1 - 0.5, 1.0]])
        pq = (a @ corners.T).T[:, :2] + 0.5
        p0, p1 = sorted(pq[:, 0])
        q0, q1 = sorted(pq[:, 1])
        return float(p0), float(q0), float(p1), float(q1)

    def box_to_ras(self, cx: float, cy: float, w: float, h: float) -> RasBox:
        """Normalised model box → :class:`RasBox` (centre, size along the slice axes, axis directions).

        The box is aligned with the slice's own axes, so an ROI built from it sits on the slice even
        when the volume is oblique.
        """
        return pixel_box_to_ras(self.box_to_input(cx, cy, w, h), self.slice_ijk_to_ras)


def resample_grid(
    input_shape: tuple[int, int],
    slice_ijk_to_ras: Any,
    model_input: Union[None, ModelInput, Mapping[str, Any]] = None,
    max_obliquity_deg: float = DEFAULT_MAX_OBLIQUITY_DEG,
) -> ResampleGrid:
    """Build the :class:`ResampleGrid` for a slice of ``input_shape`` (checks that it is axial).

    The spacing used is ``max(model spacing, FOV / size)`` with FOV the larger canonical extent, so
    the whole field of view fits in ``size × size``; the rest is padding.
    """
    mi = _as_model_input(model_input)
    m = _as_matrix(slice_ijk_to_ras)
    shape = (int(input_shape[-2]), int(input_shape[-1]))
    if min(shape) < 1:
        raise InputError(f"empty slice shape {shape}")
    orientation = canonical_orientation(m, max_obliquity_deg)
    s0, s1 = pixel_spacing(m)
    can_spacing = (s1, s0) if orientation.transpose else (s0, s1)
    nr, nc = orientation.canonical_shape(shape)
    fov = max(nr * can_spacing[0], nc * can_spacing[1])
    spacing = float(mi.spacing_mm)
    if fov / mi.size > spacing * (1.0 + _SAME_SPACING_RTOL):
        spacing = fov / mi.size
    return ResampleGrid(
        input_shape=shape,
        slice_ijk_to_ras=m.copy(),
        orientation=orientation,
        canonical_spacing=(float(can_spacing[0]), float(can_spacing[1])),
        spacing_mm=spacing,
        size=int(mi.size),
    )


@dataclass(frozen=True, eq=False)
class PreparedSlice:
    """The model's input image and the grid that maps its outputs back."""

    #: float32 ``(size, size)``, canonical orientation, intensities normalised to [0, 1], padding 0.
    image: np.ndarray
    grid: ResampleGrid

    @property
    def orientation(self) -> CanonicalOrientation:
        return self.grid.orientation


def prepare_slice(
    a: np.ndarray,
    slice_ijk_to_ras: Any,
    model_input: Union[None, ModelInput, Mapping[str, Any]] = None,
    normalisation: Union[None, NormalisationConfig, Mapping[str, Any]] = None,
    max_obliquity_deg: float = DEFAULT_MAX_OBLIQUITY_DEG,
) -> PreparedSlice:
    """Normalise, reorient and resample one 2-D slice for the network.

    Intensities are normalised on the input's own pixels (so resampling does not change the
    percentiles), then resampled linearly (anti-aliased when downsampling) onto the model grid;
    padding is 0, the normalised value of the low percentile.
    Raises :class:`InputError` for non-2-D/empty/non-finite input and :class:`NonAxialSliceError`.
    """
    arr = np.asarray(a)
    if arr.ndim != 2:
        raise InputError(f"expected a 2-D slice, got an array of shape {arr.shape}")
    norm = _as_normalisation(normalisation)
    grid = resample_grid(arr.shape, slice_ijk_to_ras, model_input, max_obliquity_deg)
    normalised = normalise_intensity(arr, norm.low, norm.high)
    image = grid.to_model(normalised, order=1, cval=0.0).astype(np.float32, copy=False)
    return PreparedSlice(image=image, grid=grid)
