"""Signal fat fraction from a Dixon water/fat pair (or a fat-fraction map), per muscle, on the segmented slice.

The measurement is the field's *signal fat fraction*: per pixel ``F / (W + F)`` of the water and fat
magnitude images, averaged over the muscle's pixels, in percent (the "Dixon fat fraction (%)" column,
beside the threshold-based fat % of :mod:`measurements`). With a fat-fraction map (e.g. the scanner's
FF or PDFF series) the map's own values are averaged.

**Noise floor.** Where W + F is at noise level the ratio is noise (about 0.5 on magnitude images), so
such pixels are left out: a pixel counts only if ``W + F >= floor``. The default floor is
:data:`NOISE_FLOOR_FRACTION` (5 %) of the 99th percentile of W + F over the slice: background air and
signal voids fall below it, muscle (tens of percent of the bright end) lies far above it. A fixed floor
in the images' units can be given instead (``noise_floor``). A map has no magnitudes: only its
non-finite pixels are left out. Map values are fractions in [0, 1]; a map whose largest value exceeds
1.5 is read as percent (0–100) and divided by 100 (stated in the result).

**Grids.** The water/fat images (or the map) are sampled onto the segmented slice's pixels through both
images' IJK-to-RAS matrices (trilinear; the same grid is used as it is, without interpolation). Pixels that
fall outside the Dixon image are left out like noise pixels; images that do not overlap the segmented
slice at all are refused with an :class:`~ParaspinalSegLib.errors.InputError`, and so are images that give
none of the slice's muscle pixels a value (:func:`check_muscles_covered`: outside them, NaN there, or below
the noise floor), which would otherwise leave the Dixon column silently empty.

numpy + scipy only (the Slicer module calls it on volume nodes' arrays).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

import numpy as np

from .anatomy import MUSCLE_VALUES
from .errors import InputError

#: Default noise floor: pixels with W + F below this fraction of the slice's 99th percentile of W + F are left out.
NOISE_FLOOR_FRACTION = 0.05
#: A map with a value above this is taken to be in percent.
PERCENT_MAP_LIMIT = 1.5
#: Matrices closer than this (mm) describe the same grid: no interpolation.
SAME_GRID_TOLERANCE_MM = 1e-3


@dataclass
class DixonImage:
    """One Dixon input volume: voxels ``arr[k, j, i]`` and the IJK-to-RAS matrix (4×4) of its grid."""

    array: np.ndarray
    ijk_to_ras: np.ndarray
    name: str = ""


@dataclass
class DixonSource:
    """Water + fat images, or a fat-fraction map, to measure the Dixon fat fraction from.

    ``noise_floor``: a fixed floor on W + F in the images' units (None: :data:`NOISE_FLOOR_FRACTION` of the
    slice's 99th percentile of W + F).
    """

    water: Optional[DixonImage] = None
    fat: Optional[DixonImage] = None
    fat_fraction_map: Optional[DixonImage] = None
    noise_floor: Optional[float] = None

    def __post_init__(self) -> None:
        problem = pairing_problem(self.water is not None, self.fat is not None, self.fat_fraction_map is not None)
        if problem:
            raise InputError(problem)
        if self.water is None and self.fat_fraction_map is None:
            raise InputError("no Dixon images given")
        if self.noise_floor is not None and not (np.isfinite(self.noise_floor) and self.noise_floor >= 0):
            raise InputError(f"the Dixon noise floor must be a non-negative number, got {self.noise_floor!r}")
        for img in (self.water, self.fat, self.fat_fraction_map):
            if img is not None:
                a = np.asarray(img.array)
                if a.ndim == 2:
                    img.array = a[None]
                elif a.ndim != 3:
                    raise InputError(f"Dixon image {img.name or ''} must be 2-D or 3-D, got shape {a.shape}")
                if not np.issubdtype(img.array.dtype, np.number) or np.iscomplexobj(img.array):
                    raise InputError(f"Dixon image {img.name or ''} must hold real numbers, got {img.array.dtype}")

    def check_volume_slices(self, volume_shape: Sequence[int], volume_ijk_to_ras: np.ndarray, slices: Sequence[int]) -> None:
        """Refuse (:class:`InputError`) Dixon images that miss the first or last of ``slices`` of the volume,
        so a command can say so before it loads a model (every slice is checked again when measured)."""
        from .preprocessing import slice_geometry_from_volume

        ks = sorted({int(k) for k in slices})
        for k in {ks[0], ks[-1]} if ks else set():
            self.fraction_map(tuple(volume_shape[1:3]), slice_geometry_from_volume(volume_ijk_to_ras, k))

    def fraction_map(self, shape: tuple[int, int], slice_ijk_to_ras: np.ndarray,
                     labels: Optional[np.ndarray] = None) -> "SliceFatFraction":
        """Per-pixel fat fraction in [0, 1] on the segmented slice (NaN = left out), with what was done.

        ``labels``: the slice's label map; when given, Dixon images that leave every muscle pixel of it
        without a value (outside them, non-finite there, or below the noise floor) are refused with an
        :class:`InputError` rather than giving an empty Dixon column (:func:`check_muscles_covered`)."""
        if self.fat_fraction_map is not None:
            ff, inside, resampled = sample_onto_slice(self.fat_fraction_map, shape, slice_ijk_to_ras)
            finite = np.isfinite(ff)
            percent = bool(ff[finite].max() > PERCENT_MAP_LIMIT) if finite.any() else False
            if percent:
                ff = ff / 100.0
            ff = np.where(finite, np.clip(ff, 0.0, 1.0), np.nan)
            result = SliceFatFraction(ff, None, resampled, "map in percent" if percent else "map")
            what, reason = f"the fat-fraction map{_quoted(self.fat_fraction_map)}", "no finite value"
        else:
            assert self.water is not None and self.fat is not None
            w, inside_w, res_w = sample_onto_slice(self.water, shape, slice_ijk_to_ras)
            f, inside_f, res_f = sample_onto_slice(self.fat, shape, slice_ijk_to_ras)
            ff, floor = signal_fat_fraction(w, f, self.noise_floor)
            result = SliceFatFraction(ff, floor, res_w or res_f, "water/fat")
            inside = inside_w & inside_f
            what = f"the water and fat images{_quoted(self.water, self.fat)}"
            reason = f"no pixel with W + F at or above the noise floor ({floor:g})"
        if labels is not None:
            check_muscles_covered(result.fraction, inside, labels, what, reason)
        return result


def pairing_problem(water: bool, fat: bool, fat_fraction_map: bool, where: str = "") -> str:
    """Why Dixon inputs given this way cannot be used together (blank if they can): water and fat go in
    pairs, and a pair and a fat-fraction map exclude each other. ``where`` says where they were given (a
    list's columns, the options); checked on paths before any image is read, and on the images."""
    at = f" ({where})" if where else ""
    if water != fat:
        given, absent = ("water", "fat") if water else ("fat", "water")
        return f"a Dixon {given} image without a {absent} image{at}: the fat fraction needs both"
    if water and fat_fraction_map:
        return f"both water and fat images and a fat-fraction map{at}: give one or the other, not both"
    return ""


@dataclass
class SliceFatFraction:
    """The fat-fraction map of one slice and how it was made."""

    #: Fat fraction in [0, 1] per pixel of the segmented slice; NaN where left out (noise, outside).
    fraction: np.ndarray
    #: The W + F floor used (None for a map).
    noise_floor: Optional[float]
    #: True when the Dixon images lay on another grid and were interpolated.
    resampled: bool
    source: str

    def percent_per_structure(self, labels: np.ndarray, values: Iterable[int]) -> dict[int, Optional[float]]:
        """Mean fat fraction (%) over each structure's counted pixels; None where no pixel counts."""
        return dixon_fat_fraction_percent(self.fraction, labels, values)


def check_muscles_covered(fraction: np.ndarray, inside: np.ndarray, labels: np.ndarray,
                          what: str = "the Dixon images", reason: str = "no finite value") -> None:
    """Refuse (:class:`InputError`) Dixon images that give none of the slice's muscle pixels a value.

    ``fraction``: the slice's fat-fraction map (NaN = left out); ``inside``: pixels inside the Dixon
    images; ``what`` names the images, ``reason`` says why a pixel inside them gets no value. A slice without muscle pixels
    passes (there is nothing to measure); muscles covered in part are measured on the pixels that have a
    value."""
    lab = np.asarray(labels)
    muscle = np.isin(lab, MUSCLE_VALUES)
    if lab.shape != np.shape(fraction) or not muscle.any():
        return
    if np.isfinite(fraction[muscle]).any():
        return
    n = int(muscle.sum())
    if not np.asarray(inside)[muscle].any():
        raise InputError(f"none of the {n} muscle pixels of the segmented slice lie inside {what} (they meet the "
                         "slice only outside the muscles): give Dixon images of the segmented slices")
    raise InputError(f"{what}: {reason} on any of the {n} muscle pixels of the segmented slice, so the Dixon fat "
                     "fraction cannot be measured")


def signal_fat_fraction(water: np.ndarray, fat: np.ndarray, noise_floor: Optional[float] = None
                        ) -> tuple[np.ndarray, float]:
    """Per-pixel F / (W + F) clipped to [0, 1], NaN where W + F is below the noise floor or unknown.

    Returns the map and the floor used (``noise_floor``, or :data:`NOISE_FLOOR_FRACTION` of the 99th
    percentile of the finite W + F values).
    """
    w = np.asarray(water, dtype=np.float64)
    f = np.asarray(fat, dtype=np.float64)
    if w.shape != f.shape:
        raise InputError(f"water {w.shape} and fat {f.shape} images differ in shape")
    total = w + f
    finite = np.isfinite(total)
    if not finite.any():
        raise InputError("the water and fat images have no finite pixel on the segmented slice")
    if noise_floor is None:
        noise_floor = NOISE_FLOOR_FRACTION * float(np.percentile(total[finite], 99))
    counted = finite & (total >= noise_floor) & (total > 0)
    out = np.full(total.shape, np.nan)
    out[counted] = np.clip(f[counted] / total[counted], 0.0, 1.0)
    return out, float(noise_floor)


def dixon_fat_fraction_percent(fraction: np.ndarray, labels: np.ndarray, values: Iterable[int]
                               ) -> dict[int, Optional[float]]:
    """Mean of ``fraction`` (NaN pixels left out) over each label value's pixels, in percent."""
    ff = np.asarray(fraction, dtype=np.float64)
    lab = np.asarray(labels)
    if ff.shape != lab.shape:
        raise InputError(f"fat-fraction map {ff.shape} and labels {lab.shape} differ in shape")
    values = [int(v) for v in values]
    counted = np.isfinite(ff)
    # One pass for all structures: sums and counts of the counted pixels per label value.
    index = np.where(counted, lab, 0).astype(np.int64).ravel()
    size = max([int(lab.max()) if lab.size else 0] + values) + 1
    sums = np.bincount(index, weights=np.where(counted, ff, 0.0).ravel(), minlength=size)
    counts = np.bincount(index, minlength=size)
    return {v: (100.0 * sums[v] / counts[v] if v > 0 and counts[v] > 0 else None) for v in values}


def sample_onto_slice(image: DixonImage, shape: tuple[int, int], slice_ijk_to_ras: np.ndarray
                      ) -> tuple[np.ndarray, np.ndarray, bool]:
    """``image`` sampled at the pixel centres of the segmented slice ``a[p, q]`` (geometry ``slice_ijk_to_ras``).

    Returns (values, inside mask, resampled?). On the same grid the slice is taken as it is; otherwise
    trilinear interpolation in the image's voxel space, NaN outside it. Refuses no overlap at all.
    """
    arr = np.asarray(image.array)
    m_src = np.asarray(image.ijk_to_ras, dtype=np.float64)
    m_dst = np.asarray(slice_ijk_to_ras, dtype=np.float64)
    n0, n1 = int(shape[0]), int(shape[1])
    # Slice pixel (p, q) ↔ volume voxel (i=q, j=p) of the slice plane; source voxel = inv(M_src) · RAS.
    src_from_dst = np.linalg.inv(m_src) @ m_dst
    k_src = src_from_dst[2, 3]
    same = (
        np.allclose(src_from_dst[:3, :3], [[0, 1, 0], [1, 0, 0], [0, 0, 1]], atol=1e-6)
        and np.allclose(src_from_dst[:2, 3], 0.0, atol=SAME_GRID_TOLERANCE_MM / max(_min_spacing(m_src), 1e-9))
        and abs(k_src - round(k_src)) < 1e-6
        and arr.shape[1:] == (n0, n1)
    )
    if same:
        k = int(round(k_src))
        if not 0 <= k < arr.shape[0]:
            raise InputError(f"{_label(image)} does not overlap the segmented slice (that slice would be its "
                             f"slice {k}, outside 0..{arr.shape[0] - 1})")
        values = arr[k].astype(np.float64)
        return values, np.ones((n0, n1), bool), False
    pp, qq = np.meshgrid(np.arange(n0, dtype=np.float64), np.arange(n1, dtype=np.float64), indexing="ij")
    pts = np.stack([pp.ravel(), qq.ravel(), np.zeros(pp.size), np.ones(pp.size)])
    ijk = (src_from_dst @ pts)[:3]  # (i, j, k) of the source
    kji = ijk[::-1]
    extent = np.array(arr.shape, dtype=np.float64)[:, None] - 1.0
    # A single-slice image (2-D file) covers half a voxel either side of its plane.
    half = np.where(extent == 0, 0.5, 1e-6)
    inside = np.all((kji >= -half) & (kji <= extent + half), axis=0)
    if not inside.any():
        raise InputError(f"{_label(image)} does not overlap the segmented slice")
    from scipy import ndimage  # here, so the command line's --help does not load scipy

    values = ndimage.map_coordinates(arr.astype(np.float64), np.clip(kji, 0, extent), order=1, mode="nearest")
    values[~inside] = np.nan
    return values.reshape(n0, n1), inside.reshape(n0, n1), True


def _quoted(*images: DixonImage) -> str:
    """`` ('water', 'fat')`` for named images, empty when they have no names."""
    names = [f"'{i.name}'" for i in images if i.name]
    return f" ({', '.join(names)})" if names else ""


def _label(image: DixonImage) -> str:
    return f"Dixon image '{image.name}'" if image.name else "the Dixon image"


def _min_spacing(m: np.ndarray) -> float:
    return float(min(np.linalg.norm(m[:3, c]) for c in range(3)))


def dixon_source_from_volumes(water=None, fat=None, fat_fraction_map=None, noise_floor: Optional[float] = None
                              ) -> DixonSource:
    """A :class:`DixonSource` from :class:`~ParaspinalSegLib.volume_io.Volume` objects (or anything with
    ``array``, ``ijk_to_ras`` and ``name``)."""

    def wrap(v) -> Optional[DixonImage]:
        return None if v is None else DixonImage(np.asarray(v.array), np.asarray(v.ijk_to_ras, float), str(getattr(v, "name", "")))

    return DixonSource(wrap(water), wrap(fat), wrap(fat_fraction_map), noise_floor)


def dixon_source_from_nodes(water_node=None, fat_node=None, fat_fraction_node=None,
                            noise_floor: Optional[float] = None) -> Optional[DixonSource]:
    """A :class:`DixonSource` from Slicer scalar volume nodes (the panel's optional selectors); None when
    no node is given. Parent transforms are included (IJK to world)."""
    if water_node is None and fat_node is None and fat_fraction_node is None:
        return None
    from .workflow import volume_array, volume_ijk_to_world

    def wrap(node) -> Optional[DixonImage]:
        if node is None:
            return None
        return DixonImage(np.array(volume_array(node)), volume_ijk_to_world(node), node.GetName())

    return DixonSource(wrap(water_node), wrap(fat_node), wrap(fat_fraction_node), noise_floor)


# ----------------------------------------------------------------------------------------------------
# Command line (segment, batch, measure)


def add_arguments(parser, note: str = "") -> None:
    """The Dixon options of ``segment``, ``batch`` and ``measure`` (``note`` is added to the group text)."""
    g = parser.add_argument_group(
        "Dixon fat fraction",
        "Water and fat images (or a fat-fraction map) of the same slices add a 'Dixon fat fraction (%)' column: "
        "mean F/(W+F) per muscle over pixels with W+F above the noise floor. Images on another grid are "
        "sampled onto the segmented slices (trilinear); images that do not overlap them are refused" + note + ".")
    g.add_argument("--water-image", metavar="W", default=None, help="Dixon water image (NIfTI, NRRD or DICOM folder)")
    g.add_argument("--fat-image", metavar="F", default=None, help="Dixon fat image of the same slices")
    g.add_argument("--fat-fraction-map", metavar="M", default=None,
                   help="fat-fraction map instead of W and F (fractions 0-1, or percent when its maximum is > 1.5)")
    g.add_argument("--dixon-noise-floor", metavar="VALUE", type=float, default=None,
                   help=f"leave out pixels with W+F below VALUE (image units); default {NOISE_FLOOR_FRACTION:g} x the "
                   "slice's 99th percentile of W+F")


def source_from_paths(water=None, fat=None, fat_fraction_map=None, noise_floor: Optional[float] = None
                      ) -> Optional[DixonSource]:
    """Read the given Dixon files into a :class:`DixonSource` (None when none is given)."""
    if not any(str(p or "").strip() for p in (water, fat, fat_fraction_map)):
        if noise_floor is not None:
            raise InputError("--dixon-noise-floor needs --water-image and --fat-image")
        return None
    from .volume_io import read_volume

    def read(path):
        return read_volume(path) if str(path or "").strip() else None

    return dixon_source_from_volumes(read(water), read(fat), read(fat_fraction_map), noise_floor)


def source_from_args(args) -> Optional[DixonSource]:
    """:func:`source_from_paths` for parsed :func:`add_arguments` options."""
    return source_from_paths(getattr(args, "water_image", None), getattr(args, "fat_image", None),
                             getattr(args, "fat_fraction_map", None), getattr(args, "dixon_noise_floor", None))
