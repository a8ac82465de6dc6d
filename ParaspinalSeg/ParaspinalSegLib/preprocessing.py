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

The model grid is a square window of ``size × size`` pixels at ONE fixed spacing (the weights'
``model_input``, 0.8 mm × 256 for the shipped model), whose rows run posterior and columns to the
patient's left whatever the slice's own pixel axes are: an in-plane rotation of the slice against the
patient is undone by resampling, not only flips and transposes. The window is placed on the spine:
training centres it on the labelled structures, inference on what the network found in a first pass
(:func:`place_window`). :class:`ResampleGrid` records everything needed to go back, and the way back is
evaluated at the input's own pixel centres, so results land on the input grid.

Why 0.8 mm: the sy_lumbar_muscle slices the shipped model learned on were seen at 0.8 mm, so the
weights stay meaningful on sy-like slices; 256 pixels of 0.8 mm (204.8 mm) hold the disc, psoas and
paraspinal muscles with room to spare (largest extent on the sy dev slices 114 mm AP × 149 mm LR) and
keep the network's cost at today's; measured figures in ``Resources/Models/MODEL.md``.

One room: geometry of a slice, intensity normalisation and the model grid both ways are the single job
"bring a slice into the model's view and back"; splitting them would split matrices shared by all three.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Union

import numpy as np
from scipy import ndimage

from .errors import InputError, NonAxialSliceError
from .geometry import RasBox, pixel_box_to_ras

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
    "MAX_AXIS_COSINE",
    "check_perpendicular_axes",
    "SLICE_AXIS_NAMES",
    "slice_normal",
    "canonical_orientation",
    "canonical_ijk_to_ras",
    "to_canonical",
    "from_canonical",
    "normalise_intensity",
    "resample_grid",
    "patient_axes",
    "anatomy_centre_ras",
    "place_window",
    "WINDOW_SPINE",
    "WINDOW_FIELD_OF_VIEW",
    "RECENTRE_TOLERANCE_MM",
    "EDGE_MARGIN_MM",
    "MAX_RECENTRES",
    "prepare_slice",
]

#: Largest angle between the slice normal and the S axis accepted as "axial".
DEFAULT_MAX_OBLIQUITY_DEG = 30.0

#: Downsampling factor above which intensities are Gaussian-smoothed before resampling (anti-aliasing).
ANTIALIAS_ABOVE = 1.5


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


#: Largest |cos| of the angle between two voxel axes still taken as perpendicular (0.057° off 90°). MRI
#: scanners write orthonormal directions; what reaches us is their rounding: float32 NIfTI sform entries
#: (relative 6e-8, so |cos| ~1e-7), quaternion qforms (orthogonal by construction), DICOM's decimal
#: direction cosines (6 or more digits: |cos| ~1e-6). A shear beyond that is a broken or hand-made header,
#: and on it the pixel area is |a × b|, not |a|·|b|, while ITK's NIfTI writer turns the grid into another,
#: rotated one. At 1e-3 itself |a|·|b| exceeds |a × b| by only cos²/2 = 5e-7, so everything accepted is
#: measured as if perpendicular without a measurable error.
MAX_AXIS_COSINE = 1e-3

#: Names of a slice matrix's axes in messages (axis 0 runs down the rows, axis 1 along a row).
SLICE_AXIS_NAMES = ("row", "column")


def check_perpendicular_axes(ijk_to_ras: Any, what: str, columns: tuple[int, ...] = (0, 1),
                             names: tuple[str, ...] = SLICE_AXIS_NAMES) -> None:
    """Refuse (:class:`InputError`, "implausible geometry") a matrix whose voxel axes ``columns`` are not
    perpendicular within :data:`MAX_AXIS_COSINE`, naming the angle between them. ``what`` starts the
    message (e.g. the volume's name); ``names[c]`` names column ``c`` (``("i", "j", "k")`` for a volume)."""
    m = _as_matrix(ijk_to_ras)
    for n, a in enumerate(columns):
        for b in columns[n + 1:]:
            u, v = m[:3, a], m[:3, b]
            lengths = float(np.linalg.norm(u) * np.linalg.norm(v))
            if lengths <= 0:
                continue  # a zero-length axis is refused where the spacing is checked
            cos = float(np.dot(u, v)) / lengths
            if abs(cos) > MAX_AXIS_COSINE:
                angle = math.degrees(math.acos(max(-1.0, min(1.0, cos))))
                raise InputError(
                    f"{what}: implausible geometry: its {names[a]} and {names[b]} axes are {angle:.2f} degrees "
                    "apart, not perpendicular (a sheared direction matrix or transform; MRI scanners write "
                    "perpendicular axes). Areas on a sheared grid would be wrong, so nothing is segmented or "
                    "measured; correct the header or resample the volume onto a perpendicular grid"
                )


def pixel_spacing(slice_ijk_to_ras: Any) -> tuple[float, float]:
    """In-plane pixel spacing ``(s0, s1)`` in mm along the slice's axis 0 and axis 1.

    The pixel area is ``s0 · s1`` only for perpendicular axes, so a sheared slice is refused
    (:func:`check_perpendicular_axes`)."""
    m = _as_matrix(slice_ijk_to_ras)
    check_perpendicular_axes(m, "the slice")
    return float(np.linalg.norm(m[:3, 0])), float(np.linalg.norm(m[:3, 1]))


def _unit_axes(m: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Unit directions of axis 0, axis 1 and the normal ``d0 × d1`` (right-handed), all in RAS.

    A sheared slice (in-plane axes not perpendicular) is refused: every segmentation passes here, so the
    Slicer module, ``segment`` and ``batch`` refuse it alike."""
    s0, s1 = np.linalg.norm(m[:3, 0]), np.linalg.norm(m[:3, 1])
    if s0 <= 0 or s1 <= 0:
        raise InputError("IJK-to-RAS matrix has a zero in-plane axis (pixel spacing 0)")
    check_perpendicular_axes(m, "the slice")
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

#: The model window: ``size`` px of exactly ``spacing_mm`` along the patient's axes, placed on the spine by a
#: first look (one physical scale whatever the field of view).
WINDOW_SPINE = "spine"
#: The window of models trained before the spine window: the whole field of view, at
#: ``max(spacing_mm, field of view / size)``, centred on it (the scale follows the field of view).
WINDOW_FIELD_OF_VIEW = "field_of_view"
WINDOWS = (WINDOW_SPINE, WINDOW_FIELD_OF_VIEW)


@dataclass(frozen=True)
class ModelInput:
    """The model's input grid: isotropic pixel spacing (mm), square size (pixels) and how the window is
    laid on a slice (:data:`WINDOW_SPINE` or :data:`WINDOW_FIELD_OF_VIEW`)."""

    spacing_mm: float = 0.8
    size: int = 256
    window: str = WINDOW_SPINE

    def __post_init__(self) -> None:
        if not (self.spacing_mm > 0) or int(self.size) != self.size or self.size < 1:
            raise ValueError(f"invalid model input: spacing_mm={self.spacing_mm}, size={self.size}")
        if self.window not in WINDOWS:
            raise ValueError(f"invalid model input: window must be one of {WINDOWS}, got {self.window!r}")

    def to_dict(self) -> dict[str, Any]:
        return {"spacing_mm": float(self.spacing_mm), "size": int(self.size), "window": self.window}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ModelInput":
        # A weights file without "window" predates the key: it was trained on the field-of-view window, and
        # a model must see what it was trained on (a field-of-view model on the spine window loses most of a
        # Dixon slice's muscles, measured in MODEL.md). This is the one default of the key, on purpose.
        return cls(spacing_mm=float(d["spacing_mm"]), size=int(d["size"]), window=str(d.get("window", WINDOW_FIELD_OF_VIEW)))


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
# Model grid: the patient's axes, one spacing, a window placed on the spine
# --------------------------------------------------------------------------------------------------

#: The window is moved when the structures the network found are off its centre by more than this
#: (mm, along either patient axis). Training windows are centred on the labelled structures, snapped to
#: the lattice (±6.4 mm) and shifted by up to ±0.2 of the half-window (``augmentation.shift`` 0.1 →
#: ±20.5 mm at 0.8 mm × 256): up to ±26.9 mm, so a window within this distance shows the network what
#: training showed it. (With 10 mm, two thirds of the sy dev slices, whose anatomy lies ~20 mm behind the
#: field of view's centre, needed a second placement: twice the network time for nothing.)
RECENTRE_TOLERANCE_MM = 25.0
#: ... or when they come closer than this to an edge beyond which the slice goes on (they may continue
#: there; at an edge of the slice's own field of view there is nothing more to see).
EDGE_MARGIN_MM = 8.0
#: At most this many extra network passes to place the window.
MAX_RECENTRES = 2
#: Window positions step by this many model pixels in patient space (see :func:`resample_grid`): the
#: network's total stride (4 poolings). Measured on dev slices, a window moved by one model pixel changes a
#: small psoas' CSA by up to 8 %; moved by 16, by 2 %.
WINDOW_LATTICE = 16


def patient_axes(slice_ijk_to_ras: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Unit RAS directions of the model grid's rows (→ posterior), columns (→ patient left) and normal.

    Both lie in the slice plane: columns are the patient's left (RAS −x) projected onto the plane,
    rows are ``normal × columns`` with the normal pointing superior, so for a true axial slice they
    are exactly −x and −y whatever the pixel axes are (rotated, flipped, transposed).
    """
    m = _as_matrix(slice_ijk_to_ras)
    _, _, n = _unit_axes(m)
    if n[2] < 0:
        n = -n
    left = np.array([-1.0, 0.0, 0.0])
    col = left - float(left @ n) * n
    norm = float(np.linalg.norm(col))
    if norm < 1e-6:
        raise NonAxialSliceError("slice plane contains no left-right direction (sagittal slice)")
    col /= norm
    return np.cross(n, col), col, n


def _is_integral(a: np.ndarray, tol: float = 1e-9) -> bool:
    return bool(np.all(np.abs(a - np.round(a)) <= tol))


@dataclass(frozen=True, eq=False)  # eq=False: the numpy matrix fields have no scalar ==
class ResampleGrid:
    """A ``size × size`` window at ``spacing_mm`` in the patient's axes, placed on one input slice.

    Model centre-index ``(u, v)`` (rows → posterior, columns → patient left) maps to input
    centre-index ``(p, q) = linear @ (u, v) + offset``. ``linear`` is any 2×2 matrix (rotation, flip,
    transpose and scale together), so a slice whose pixel axes are rotated in-plane against the patient
    is rotated back. When the axes agree up to flips and the spacings are equal, ``offset`` is whole
    input pixels: the grids share their pixel centres and both ways are exact copies.
    """

    input_shape: tuple[int, int]
    slice_ijk_to_ras: np.ndarray = field(repr=False)
    #: Nearest-axes (transpose/flip) orientation of the input; kept for displays and tie-breaks.
    orientation: CanonicalOrientation
    spacing_mm: float
    size: int
    #: 2×2: input centre-index per model centre-index step (columns: one row step, one column step).
    linear: np.ndarray = field(repr=False)
    #: Input centre-index (p, q) of model pixel (0, 0).
    offset: np.ndarray = field(repr=False)

    # ---- geometry --------------------------------------------------------------------------------
    @property
    def is_exact(self) -> bool:
        """True when model pixels are input pixels (a signed permutation, whole-pixel offset)."""
        a = self.linear
        return (_is_integral(a) and bool(np.all(np.abs(np.round(a)).sum(axis=0) == 1))
                and bool(np.all(np.abs(np.round(a)).sum(axis=1) == 1)))

    @property
    def is_identity(self) -> bool:
        """True when the model grid *is* the input grid (no interpolation, no padding, no crop)."""
        return (self.is_exact and np.array_equal(np.round(self.linear), np.eye(2))
                and np.array_equal(self.offset, [0.0, 0.0]) and self.input_shape == (self.size, self.size))

    @property
    def input_steps(self) -> tuple[float, float]:
        """Input pixels per model pixel along the input's axis 0 and axis 1 (> 1 means downsampling)."""
        s0, s1 = pixel_spacing(self.slice_ijk_to_ras)
        return self.spacing_mm / s0, self.spacing_mm / s1

    def model_to_input(self, u: Any, v: Any) -> tuple[np.ndarray, np.ndarray]:
        """Model centre-index ``(u, v)`` → input centre-index ``(p, q)`` (broadcasting)."""
        u, v = np.asarray(u, dtype=np.float64), np.asarray(v, dtype=np.float64)
        a, t = self.linear, self.offset
        return a[0, 0] * u + a[0, 1] * v + t[0], a[1, 0] * u + a[1, 1] * v + t[1]

    def input_to_model(self, p: Any, q: Any) -> tuple[np.ndarray, np.ndarray]:
        """Input centre-index ``(p, q)`` → model centre-index ``(u, v)`` (broadcasting)."""
        p, q = np.asarray(p, dtype=np.float64) - self.offset[0], np.asarray(q, dtype=np.float64) - self.offset[1]
        b = np.linalg.inv(self.linear)
        return b[0, 0] * p + b[0, 1] * q, b[1, 0] * p + b[1, 1] * q

    def model_ijk_to_ras(self) -> np.ndarray:
        """4×4 matrix: model ``(u, v, 0, 1)`` → RAS (e.g. to save the model input as a volume)."""
        e = np.eye(4)
        e[:2, :2], e[:2, 3] = self.linear, self.offset
        return _as_matrix(self.slice_ijk_to_ras) @ e

    @property
    def centre_ras(self) -> np.ndarray:
        """RAS (mm) of the window's centre."""
        h = (self.size - 1) / 2.0
        return (self.model_ijk_to_ras() @ np.array([h, h, 0.0, 1.0]))[:3]

    def _input_region(self) -> tuple[slice, slice]:
        """Input pixels whose centre can lie in the window (its footprint's bounding box, clipped)."""
        e = np.array([-0.5, self.size - 0.5])
        p, q = self.model_to_input(e[:, None], e[None, :])
        n0, n1 = self.input_shape
        p0, p1 = max(0, int(np.floor(p.min() + 0.5))), min(n0, int(np.ceil(p.max() + 0.5)))
        q0, q1 = max(0, int(np.floor(q.min() + 0.5))), min(n1, int(np.ceil(q.max() + 0.5)))
        return slice(p0, max(p0, p1)), slice(q0, max(q0, q1))

    # ---- input grid → model grid -----------------------------------------------------------------
    def antialias(self, values: np.ndarray) -> np.ndarray:
        """Gaussian pre-filter along input axes downsampled by more than ``ANTIALIAS_ABOVE`` (float32).

        sigma = (f - 1) / 2 input pixels, as scikit-image's resize uses. Depends only on the spacings, so
        one filtered slice serves every window placement (``to_model(..., antialias=False)``).
        """
        out = np.asarray(values, dtype=np.float32)
        for axis, f in enumerate(self.input_steps):
            if f > ANTIALIAS_ABOVE:
                out = ndimage.gaussian_filter1d(out, (f - 1.0) / 2.0, axis=out.ndim - 2 + axis, mode="nearest")
        return out

    def _check(self, arr: np.ndarray, shape: tuple[int, int], order: int) -> None:
        if arr.ndim not in (2, 3) or tuple(arr.shape[-2:]) != tuple(shape):
            raise InputError(f"expected shape {shape} or (C, *{shape}), got {arr.shape}")
        if order not in (0, 1):
            raise ValueError("order must be 0 (nearest) or 1 (linear)")

    def to_model(self, values: np.ndarray, order: int = 1, cval: float = 0.0, antialias: bool = True) -> np.ndarray:
        """Resample ``values`` (``(n0, n1)`` or ``(C, n0, n1)`` on the input grid) onto the model grid.

        ``order=1``: linear interpolation (float32), anti-aliased (:meth:`antialias`) unless told not to.
        ``order=0``: nearest neighbour, dtype kept (use it for label images). Model pixels whose centre
        lies outside the input's field of view get ``cval``.
        """
        arr = np.asarray(values)
        self._check(arr, self.input_shape, order)
        squeeze = arr.ndim == 2
        arr = arr[None] if squeeze else arr
        if order == 1:
            arr = self.antialias(arr) if antialias else arr.astype(np.float32, copy=False)
        size, (n0, n1) = self.size, self.input_shape
        p, q = self.model_to_input(np.arange(size)[:, None], np.arange(size)[None, :])
        outside = (p < -0.5) | (p > n0 - 0.5) | (q < -0.5) | (q > n1 - 0.5)
        if self.is_exact or order == 0:
            pi = np.clip(np.floor(p + 0.5), 0, n0 - 1).astype(np.intp)
            qi = np.clip(np.floor(q + 0.5), 0, n1 - 1).astype(np.intp)
            out = arr[:, pi, qi]
        else:
            out = np.empty((arr.shape[0], size, size), dtype=np.float32)
            for i, chan in enumerate(arr):
                # A full 2×2 matrix: no deprecated 1-D (diagonal) form, which newer scipy warns about.
                ndimage.affine_transform(chan, self.linear, offset=self.offset, output_shape=(size, size),
                                         output=out[i], order=1, mode="nearest")
        out[:, outside] = cval
        return out[0] if squeeze else out

    # ---- model grid → input grid -----------------------------------------------------------------
    def to_input(self, values: np.ndarray, order: int = 1, cval: Union[float, Any] = 0.0) -> np.ndarray:
        """Map model-grid ``values`` (``(size, size)`` or ``(C, size, size)``) onto the input slice's grid.

        Evaluated at the input's own pixel centres: ``order=1`` interpolates linearly (float32, float64
        kept; use it for probabilities and take the argmax afterwards), ``order=0`` takes the nearest
        model pixel (dtype kept; use it for labels). Input pixels outside the window get ``cval``: a
        number, or one per channel (e.g. probability 1 for background). When the grids share pixel
        centres (:attr:`is_exact`) the values come back unchanged, bit for bit.
        """
        arr = np.asarray(values)
        self._check(arr, (self.size, self.size), order)
        squeeze = arr.ndim == 2
        arr = arr[None] if squeeze else arr
        if order == 1 and arr.dtype != np.float64:
            arr = arr.astype(np.float32, copy=False)
        fill = np.broadcast_to(np.asarray(cval, dtype=arr.dtype if order == 0 else np.float64), (arr.shape[0],))
        out = np.empty((arr.shape[0], *self.input_shape), dtype=arr.dtype)
        out[...] = fill[:, None, None].astype(arr.dtype)
        rs, cs = self._input_region()
        if rs.stop > rs.start and cs.stop > cs.start:
            size = self.size
            u, v = self.input_to_model(np.arange(rs.start, rs.stop)[:, None], np.arange(cs.start, cs.stop)[None, :])
            inside = (u >= -0.5) & (u <= size - 0.5) & (v >= -0.5) & (v <= size - 0.5)
            if self.is_exact or order == 0:
                ui = np.clip(np.floor(u + 0.5), 0, size - 1).astype(np.intp)
                vi = np.clip(np.floor(v + 0.5), 0, size - 1).astype(np.intp)
                region = arr[:, ui, vi]
            else:
                b = np.linalg.inv(self.linear)
                start = np.array([u[0, 0], v[0, 0]])
                region = np.empty((arr.shape[0], rs.stop - rs.start, cs.stop - cs.start), dtype=arr.dtype)
                for i, chan in enumerate(arr):
                    ndimage.affine_transform(chan, b, offset=start, output_shape=region.shape[1:],
                                             output=region[i], order=1, mode="nearest")
            region[:, ~inside] = fill[:, None].astype(arr.dtype)
            out[:, rs, cs] = region
        return out[0] if squeeze else out

    # ---- boxes -----------------------------------------------------------------------------------
    def box_to_input(self, cx: float, cy: float, w: float, h: float) -> tuple[float, float, float, float]:
        """Normalised model box ``(cx, cy, w, h)`` → ``(p0, q0, p1, q1)`` edge bounds on the input array.

        Floats in the input's pixel-edge coordinates (pixel ``p`` covers ``[p, p + 1)``), with
        ``p0 ≤ p1`` along axis 0 and ``q0 ≤ q1`` along axis 1: the input-aligned bounding box of the
        (possibly rotated) model box; round them for integer bounds.
        """
        n = self.size
        # Model edge → model centre-index (−0.5) → input centre-index → input edge (+0.5).
        u = np.array([(cy - h / 2) * n, (cy + h / 2) * n]) - 0.5
        v = np.array([(cx - w / 2) * n, (cx + w / 2) * n]) - 0.5
        p, q = self.model_to_input(u[:, None], v[None, :])
        return float(p.min() + 0.5), float(q.min() + 0.5), float(p.max() + 0.5), float(q.max() + 0.5)

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
    centre_ras: Optional[Any] = None,
) -> ResampleGrid:
    """Place the model window on a slice of ``input_shape`` (checks that the slice is axial).

    The window is ``size × size`` pixels of ``spacing_mm``, its rows and columns along the patient's
    axes (:func:`patient_axes`), centred on ``centre_ras`` (projected onto the slice plane) or, without
    one, on the centre of the slice's field of view. The centre then snaps to a patient-space lattice
    of ``WINDOW_LATTICE`` model pixels (moving ≤ 6.4 mm per axis at 0.8 mm) and, when the slice's axes
    agree with the patient's up to flips at the model spacing, by ≤ half a pixel more onto the slice's
    own pixel centres, so that case is an exact copy both ways.
    """
    mi = _as_model_input(model_input)
    m = _as_matrix(slice_ijk_to_ras)
    shape = (int(input_shape[-2]), int(input_shape[-1]))
    if min(shape) < 1:
        raise InputError(f"empty slice shape {shape}")
    orientation = canonical_orientation(m, max_obliquity_deg)
    rows, cols, _ = patient_axes(m)
    s, size = float(mi.spacing_mm), int(mi.size)
    field_of_view = mi.window == WINDOW_FIELD_OF_VIEW
    if field_of_view:
        # The whole field of view fits: its extent along the patient's axes (edge to edge) sets the scale.
        extent = max(sum(abs(float(axis @ m[:3, i])) * shape[i] for i in range(2)) for axis in (rows, cols))
        if extent / size > s * (1.0 + 1e-9):
            s = extent / size
        centre_ras = None
    to_pixels = np.linalg.pinv(m[:3, :2])  # RAS offset in the plane → input pixel steps
    linear = to_pixels @ np.stack([rows * s, cols * s], axis=1)
    if _is_integral(linear, 1e-9):
        linear = np.round(linear)  # keep the exact case exact despite float rounding of the matrix
    if centre_ras is None:
        centre = np.array([(shape[0] - 1) / 2.0, (shape[1] - 1) / 2.0])
    else:
        c = np.asarray(centre_ras, dtype=np.float64).reshape(-1)[:3]
        if c.shape != (3,) or not np.all(np.isfinite(c)):
            raise InputError(f"window centre must be a finite RAS point, got {centre_ras!r}")
        centre = to_pixels @ (c - m[:3, 3])
    h = (size - 1) / 2.0
    # The window's centre moves onto a patient-space lattice through the RAS origin, WINDOW_LATTICE model
    # pixels apart: the same anatomy on another pixel grid (padded, rotated) then meets the very same model
    # pixels, two windows differ by whole network strides (between which the network is equivariant), and
    # a slice mirrored about a lattice plane gets the mirrored window.
    step = s * WINDOW_LATTICE
    c = m[:3, 3] + m[:3, :2] @ centre
    if not field_of_view:  # a field-of-view window stays centred on the field of view (it must contain it)
        a, b = float(rows @ c), float(cols @ c)
        c = c + (round(a / step) * step - a) * rows + (round(b / step) * step - b) * cols
    offset = to_pixels @ (c - m[:3, 3]) - linear @ np.array([h, h])
    if _is_integral(linear, 0.0) and bool(np.all(np.abs(linear).sum(axis=0) == 1)):
        # Axes agree up to flips and the spacings are equal: model pixels on input pixel centres, so
        # both ways are exact copies (no half-pixel shift, no blur).
        offset = np.round(offset)
    return ResampleGrid(input_shape=shape, slice_ijk_to_ras=m.copy(), orientation=orientation,
                        spacing_mm=s, size=size, linear=linear, offset=offset)


def anatomy_centre_ras(labels: np.ndarray, ijk_to_ras: Any, values: Optional[Any] = None) -> Optional[np.ndarray]:
    """RAS centre of the bounding box, in the patient's axes, of the labelled structures (None if none).

    ``labels`` is a 2-D label image on the grid of ``ijk_to_ras`` (a slice or the model grid);
    ``values``: the label values that count (default: every structure, 1 … 9; 0 and 255 never count).
    Training centres its windows with this on the ground truth, inference on the network's first look,
    so both use one definition of "the spine's centre".
    """
    lab = np.asarray(labels)
    if values is None:
        mask = (lab >= 1) & (lab <= 9)
    else:
        mask = np.isin(lab, np.asarray(list(values)))
    if not mask.any():
        return None
    m = _as_matrix(ijk_to_ras)
    rows, cols, _ = patient_axes(m)
    a = np.array([rows @ m[:3, 0], rows @ m[:3, 1]])
    b = np.array([cols @ m[:3, 0], cols @ m[:3, 1]])
    p, q = np.nonzero(mask)
    # Bounding box along the patient axes of the pixel centres (exact for rotated grids too).
    along_rows = a[0] * p + a[1] * q
    along_cols = b[0] * p + b[1] * q
    mid_r = 0.5 * (along_rows.min() + along_rows.max())
    mid_c = 0.5 * (along_cols.min() + along_cols.max())
    return m[:3, 3] + mid_r * rows + mid_c * cols


def place_window(labels_on_model: np.ndarray, grid: ResampleGrid,
                 tolerance_mm: float = RECENTRE_TOLERANCE_MM, margin_mm: float = EDGE_MARGIN_MM) -> Optional[np.ndarray]:
    """Judge a window from what the network found in it: ``None`` if it is well placed, else a new centre.

    ``labels_on_model``: the network's labels on ``grid``'s model pixels. The window is kept when the
    structures' centre (:func:`anatomy_centre_ras`) is within ``tolerance_mm`` of the window's centre
    along both patient axes and no structure comes closer than ``margin_mm`` to a window edge beyond
    which the slice has pixels; otherwise the RAS point to centre it on is returned. Nothing found:
    kept (nothing to centre on).
    """
    lab = np.asarray(labels_on_model)
    mask = (lab >= 1) & (lab <= 9)
    if not mask.any():
        return None
    r, c = np.nonzero(mask.any(axis=1))[0], np.nonzero(mask.any(axis=0))[0]
    s, n = grid.spacing_mm, grid.size
    h = (n - 1) / 2.0
    off_r, off_c = (0.5 * (r[0] + r[-1]) - h) * s, (0.5 * (c[0] + c[-1]) - h) * s
    # Does the slice go on beyond each window edge, next to the structures? (model pixels one step outside)
    (n0, n1), k = grid.input_shape, np.arange(n)

    def beyond(u: Any, v: Any) -> bool:
        p, q = grid.model_to_input(u, v)
        return bool(np.any((p >= -0.5) & (p <= n0 - 0.5) & (q >= -0.5) & (q <= n1 - 0.5)))

    rows, cols = k[r[0]:r[-1] + 1], k[c[0]:c[-1] + 1]
    gaps = [(r[0], beyond(-1, cols)), (n - 1 - r[-1], beyond(n, cols)),
            (c[0], beyond(rows, -1)), (n - 1 - c[-1], beyond(rows, n))]
    crowded = any(g * s < margin_mm and more for g, more in gaps)
    if max(abs(off_r), abs(off_c)) <= tolerance_mm and not crowded:
        return None
    return anatomy_centre_ras(lab, grid.model_ijk_to_ras())


@dataclass(frozen=True, eq=False)
class PreparedSlice:
    """The model's input image and the grid that maps its outputs back."""

    #: float32 ``(size, size)``, patient axes, intensities normalised to [0, 1], padding 0.
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
    centre_ras: Optional[Any] = None,
) -> PreparedSlice:
    """Normalise one 2-D slice and resample it onto the model window (see :func:`resample_grid`).

    Intensities are normalised on the input's own pixels (so resampling does not change the
    percentiles), then resampled linearly (anti-aliased when downsampling) onto the model grid;
    padding is 0, the normalised value of the low percentile. Training and inference both call this.
    Raises :class:`InputError` for non-2-D/empty/non-finite input and :class:`NonAxialSliceError`.
    """
    arr = np.asarray(a)
    if arr.ndim != 2:
        raise InputError(f"expected a 2-D slice, got an array of shape {arr.shape}")
    norm = _as_normalisation(normalisation)
    grid = resample_grid(arr.shape, slice_ijk_to_ras, model_input, max_obliquity_deg, centre_ras)
    normalised = normalise_intensity(arr, norm.low, norm.high)
    image = grid.to_model(normalised, order=1, cval=0.0).astype(np.float32, copy=False)
    return PreparedSlice(image=image, grid=grid)
