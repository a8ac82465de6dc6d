"""Cross-sectional area (CSA), functional CSA, fat percentage and left/right asymmetry on one slice.

numpy + scipy, and scikit-image (Otsu) imported inside the functions that need it, so the module imports in
Slicer's Python before scikit-image is installed (:func:`errors.import_skimage`). The Slicer table, the command
line's CSV and the validation script all call :func:`measure_slice` and :func:`asymmetry` (one code path).

Definitions (field conventions, see ``shared/notes/model.md`` §5):

* **CSA** = pixel count × pixel area (s0 × s1 mm², so non-square pixels are handled; the product is the
  pixel's area because its axes are perpendicular: sheared grids are refused before anything is measured,
  :func:`preprocessing.check_perpendicular_axes`).
* **Fat %** = pixels brighter than a fat threshold / all pixels of the muscle × 100, the BS-ESNet paper's
  and Fortin/Battié's definition on T2 images (fat is bright). **Functional CSA** = CSA of the lean pixels.
  This is an *area fraction of fat-dominated pixels*, not the mean signal fat fraction a Dixon/PDFF map gives
  (see ``docs/fat-validation.md``).

Threshold methods (recorded with every row):

* ``"auto"`` (default, recorded as ``"auto-gmm"``): **one threshold per slice** from the two intensity
  populations, lean muscle and fat, in a region around the paraspinal muscles. The muscle masks are dilated
  by 10 mm (in mm, so anisotropic pixels are handled) to take in epimuscular and subcutaneous fat, pixels of
  disc/canal/lamina and pixels darker than the muscle's own lower tail (air, cortical bone, fascia) are left
  out, and a two-component Gaussian mixture is fitted by EM on the region's 1024-bin intensity histogram
  (milliseconds per slice; the same threshold as EM over every pixel within well under 1 %). The threshold is where the posterior of the
  fat component reaches 0.5 (the Bayes decision boundary). Why: a single muscle's histogram is unimodal when
  the muscle is lean, so any two-class split *within* it (Otsu, k-means) always finds "fat"; the dilated
  region always contains real fat, so the fat class is anchored to real fat and a lean muscle stays lean.
  Mixture models / EM for muscle–fat separation: Positano et al., "Accurate segmentation of subcutaneous and
  intermuscular adipose tissue from MR images of the thigh", J Magn Reson Imaging 2009;29:677–684 (EM on
  the intensity histogram); MuscleMap ``mm_extract_metrics -m gmm`` (GMM on T1/T2 muscle images); Ornowski
  et al., JOR Spine 2024, 10.1002/jsp2.1301 (Gaussian-mixture thresholds vs water–fat MRI in paraspinal
  muscles, r = 0.70–0.86). EM is initialised from an Otsu split and run in units of the histogram's range, and the whole
  threshold is computed in the slice's :class:`IntensityUnits` (offset removed in float64, range scaled by a
  power of two), so the result is equivariant to intensity scaling and offset: the same slice scaled (×1e-6 …
  ×1e30) or offset (±2e9) gives the same fat % and the threshold scaled and shifted (``test_measurements.py``).
  When no two distinct populations can be found (Ashman's D < 2 even with 20 and 40 mm regions), the
  threshold falls back to the lean muscle's robust mean + 3 robust SD (``"auto-lean+3sd"``) and says so in
  ``details``.
* ``"otsu"``: Otsu's threshold (scikit-image) of each muscle's own pixels, as in published
  per-muscle Otsu work; kept for comparison. It always splits a muscle into two classes.
* ``"otsu-region"``: Otsu on the same region as ``"auto"`` (one threshold per slice).
* a number: a manual threshold in image intensity units (``"manual"``).

Asymmetry % = 100 · (left − right) / mean(left, right) (signed symmetric percentage difference; positive =
left larger). Side-to-side differences of multifidus and erector spinae CSA are what spine studies report
(e.g. Niemeläinen, Briand, Battié, Spine 2011;36:2152; Fortin, Yuan, Battié, Phys Ther 2013;93:1540);
some use (larger − smaller)/larger instead, which is derivable from the left/right values kept in each record.

One room (past 500 lines) on purpose: CSA, the fat-threshold methods and asymmetry are one measurement
procedure that a reader checks end to end when a number is questioned, and the methods share the region
and histogram helpers they are defined by.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Optional, Sequence, Union

import numpy as np
from scipy import ndimage

from . import anatomy
from .errors import import_skimage
from .stenosis import stenosis_grade
from .validation import parse_threshold_method

Method = Union[str, float, int]

#: The canal segment is the dural sac: its CSA is graded for central stenosis.
SPINAL_CANAL_VALUE: int = anatomy.structure("spinal_canal").value
#: Label values whose surroundings define the fat/lean populations for the automatic threshold.
PARASPINAL_VALUES: tuple[int, ...] = (6, 7, 8, 9)
#: Structures that are not lean muscle or fat (disc and CSF are bright on T2): left out of the region.
NON_MUSCLE_VALUES: tuple[int, ...] = tuple(s.value for s in anatomy.STRUCTURES if not s.is_muscle)
#: Dilation radii (mm) tried in turn until two distinct populations are found.
REGION_RADII_MM: tuple[float, ...] = (10.0, 20.0, 40.0)
#: Ashman's D below which two Gaussians are not regarded as distinct populations.
MIN_SEPARATION = 2.0


@dataclass
class ThresholdResult:
    """A fat/lean threshold: pixels with intensity > ``value`` are fat."""

    value: Optional[float]
    method: str
    details: dict[str, Any] = field(default_factory=dict)


@dataclass
class StructureMeasurement:
    """Measurements of one structure on one slice. ``found=False`` rows carry None instead of numbers."""

    value: int
    key: str
    name: str
    found: bool
    pixel_count: int
    csa_mm2: Optional[float]
    functional_csa_mm2: Optional[float]
    fat_percent: Optional[float]
    mean_intensity: Optional[float]
    sd_intensity: Optional[float]
    threshold: Optional[float]
    method: str
    #: Canal only: central stenosis grade from the dural-sac CSA (:mod:`.stenosis`); None for other rows.
    stenosis_grade: Optional[str] = None
    #: Quality control of the row's structure (:mod:`.qc`): ``ok`` or ``check: reason; …``; "" = not checked.
    qc: str = ""
    #: Muscles only, when Dixon images were given: mean signal fat fraction F / (W + F) in % (:mod:`.dixon`).
    dixon_fat_fraction_percent: Optional[float] = None

    def to_row(self) -> dict[str, Any]:
        """Flat dict for CSV/table writers (None stays None; writers decide how to show it)."""
        return asdict(self)


@dataclass
class AsymmetryRecord:
    """Left/right comparison of one muscle pair (or the combined multifidus + erector spinae per side)."""

    key: str
    name: str
    left_values: tuple[int, ...]
    right_values: tuple[int, ...]
    found: bool
    left_csa_mm2: Optional[float]
    right_csa_mm2: Optional[float]
    csa_asymmetry_percent: Optional[float]
    left_functional_csa_mm2: Optional[float]
    right_functional_csa_mm2: Optional[float]
    functional_csa_asymmetry_percent: Optional[float]
    left_fat_percent: Optional[float]
    right_fat_percent: Optional[float]
    #: left − right, in percentage points.
    fat_percent_difference: Optional[float]

    def to_row(self) -> dict[str, Any]:
        row = asdict(self)
        row["left_values"] = ";".join(map(str, self.left_values))
        row["right_values"] = ";".join(map(str, self.right_values))
        return row


# --------------------------------------------------------------------------------------------------------
# thresholds


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of a 1-D sample (scikit-image's ``threshold_otsu`` on a ``bins`` histogram).

    The histogram spans [min, max] of the data, so the threshold is equivariant to scaling and offset;
    values above it form the bright class. A constant sample returns its value.
    """
    skimage = import_skimage()
    v = np.asarray(values, dtype=np.float64).ravel()
    v = v[np.isfinite(v)]
    if v.size == 0:
        raise ValueError("Otsu threshold of an empty sample")
    lo, hi = float(v.min()), float(v.max())
    if hi <= lo:
        return lo
    return float(skimage.filters.threshold_otsu(v, nbins=bins))


#: Histogram bins of the mixture fit: the bin width is 1/1024 of the region's intensity range, far below
#: any component's spread on an MRI slice (the fit matches a per-pixel EM to well under 1 % of the threshold).
MIXTURE_BINS = 1024


@dataclass
class GaussianMixture2:
    """Two 1-D Gaussians, component 0 darker (lean muscle), component 1 brighter (fat)."""

    weights: np.ndarray
    means: np.ndarray
    sds: np.ndarray
    iterations: int
    converged: bool

    @property
    def separation(self) -> float:
        """Ashman's D = √2·|μ1 − μ0| / √(σ0² + σ1²); D > 2 means clearly separated populations."""
        return float(np.sqrt(2.0) * abs(self.means[1] - self.means[0]) / np.sqrt(np.sum(self.sds**2)))

    def decision_boundary(self) -> Optional[float]:
        """Intensity above the lean mean where the fat posterior reaches 0.5 (None if it never does).

        Solved in the lean component's own units u = (x − μ0) / σ0, where the lean Gaussian is N(0, 1):
        the quadratic's coefficients are then free of the intensity scale and offset, so the boundary is
        equivariant to both (an image ×1e30 or +2e9 gives the same boundary, scaled and shifted). In
        intensity units the x² coefficient scales as 1/S² and the x coefficient as 1/S, and the constant
        term cancels m²/s² terms that lose every digit at large offsets."""
        (w0, w1), (m0, m1), (s0, s1) = (np.asarray(a, dtype=np.float64) for a in (self.weights, self.means, self.sds))
        mu, sigma = (m1 - m0) / s0, s1 / s0  # the fat component in lean units
        # w0 N(u; 0, 1) = w1 N(u; mu, sigma)  ⇔  a u² + b u + c = 0 (log form)
        a = 0.5 / sigma**2 - 0.5
        b = -mu / sigma**2
        c = 0.5 * mu**2 / sigma**2 + np.log((w0 * sigma) / w1)
        if a == 0.0:  # equal spreads: one crossing
            roots = [-c / b] if b != 0 else []
        else:
            disc = b * b - 4 * a * c
            if disc < 0:
                return None
            # Numerically stable pair of roots (no cancellation when a is tiny against b: then c / q ≈ −c / b).
            q = -0.5 * (b + np.copysign(np.sqrt(disc), b))
            roots = [q / a] + ([c / q] if q != 0 else [])
        # The boundary we want lies above the lean mean; the smallest such root is the lean→fat crossing.
        above = sorted(float(r) for r in roots if np.isfinite(r) and r >= 0)
        return float(m0 + above[0] * s0) if above else None


#: Bins are half-open [k, k + 1) in units of the bin width; a value this close below an edge counts as on it.
#: Integer images put many pixels exactly on edges, and an image scaled by 1e20 carries them a few 1e-16
#: off: without the slack such a pixel would change bin with the scale. 1e-9 bin widths is far above that
#: rounding and far below how close an integer level can come to an edge without being on it (1 / range
#: bin widths, range < 1e9).
EDGE_SLACK = 1e-9


def _histogram_counts(u: np.ndarray, bins: int) -> np.ndarray:
    """Counts of ``u`` in [0, 1] over ``bins`` equal bins (the top value in the last bin), robust to rounding
    at the edges (:data:`EDGE_SLACK`); the same counts as ``np.histogram`` for values off the edges."""
    idx = np.floor(np.asarray(u, dtype=np.float64) * bins + EDGE_SLACK).astype(np.intp)
    return np.bincount(np.clip(idx, 0, bins - 1), minlength=bins)


def fit_gaussian_mixture2(values: np.ndarray, bins: int = MIXTURE_BINS, max_iter: int = 300,
                          tol: float = 1e-9) -> GaussianMixture2:
    """Fit a 2-component 1-D Gaussian mixture by EM on the sample's histogram.

    EM runs over the ``bins`` bin centres weighted by their counts (cost independent of the pixel count:
    a few milliseconds per slice instead of a pass over every pixel per iteration). The histogram spans
    [min, max] of the sample and the fit works in units of that range, starting from scikit-image's Otsu
    split of the same histogram, so it is equivariant to intensity scaling and offset. Each component's
    variance gets Sheppard's correction (bin width² / 12, the spread binning removes), which also keeps
    noise-free images from collapsing to zero variance.
    """
    skimage = import_skimage()
    x = np.asarray(values, dtype=np.float64).ravel()
    if x.size < 4:
        raise ValueError("need at least 4 values for a 2-component mixture")
    lo, hi = float(x.min()), float(x.max())
    scale = hi - lo
    if scale <= 0:
        raise ValueError("a 2-component mixture needs at least two distinct values")
    counts = _histogram_counts((x - lo) / scale, bins)
    n = counts.astype(np.float64)
    z = (np.arange(bins) + 0.5) / bins  # bin centres in [0, 1]
    var_floor = (1.0 / bins) ** 2 / 12.0
    total = n.sum()
    t = skimage.filters.threshold_otsu(hist=(counts, z))
    low = z <= t
    if n[low].sum() in (0.0, total):
        low = np.cumsum(n) <= 0.5 * total
    w = np.array([n[low].sum(), n[~low].sum()]) / total
    m = np.array([np.average(z[low], weights=n[low]), np.average(z[~low], weights=n[~low])])
    v = np.array([np.average((z[low] - m[0]) ** 2, weights=n[low]),
                  np.average((z[~low] - m[1]) ** 2, weights=n[~low])]) + var_floor
    keep = n > 0  # empty bins carry no weight: leave them out of every iteration
    z, n = z[keep], n[keep]
    prev = -np.inf
    converged = False
    it = 0
    for it in range(1, max_iter + 1):
        # E step (log-domain for stability), over bins
        d2 = (z[None, :] - m[:, None]) ** 2
        logp = (np.log(np.maximum(w, 1e-300)) - 0.5 * np.log(2 * np.pi * v))[:, None] - d2 / (2 * v[:, None])
        mx = logp.max(axis=0)
        logsum = mx + np.log(np.exp(logp - mx).sum(axis=0))
        rn = np.exp(logp - logsum) * n  # responsibilities × counts
        ll = float(logsum @ n) / total
        # M step
        nk = rn.sum(axis=1) + 1e-12
        w = nk / total
        m = (rn @ z) / nk
        v = (rn * (z[None, :] - m[:, None]) ** 2).sum(axis=1) / nk + var_floor
        if abs(ll - prev) < tol:
            converged = True
            break
        prev = ll
    order = np.argsort(m)
    return GaussianMixture2(
        weights=w[order],
        means=m[order] * scale + lo,
        sds=np.sqrt(v[order]) * scale,
        iterations=it,
        converged=converged,
    )


def _as_spacing(spacing_mm: Sequence[float]) -> tuple[float, float]:
    s = tuple(float(x) for x in spacing_mm)
    if len(s) != 2 or not all(np.isfinite(s)) or min(s) <= 0:
        raise ValueError(f"spacing_mm must be two positive numbers (mm per pixel along axes 0 and 1), got {spacing_mm!r}")
    return s  # type: ignore[return-value]


def _check_inputs(image: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    img = np.asarray(image)
    lab = np.asarray(labels)
    if img.ndim != 2 or lab.ndim != 2:
        raise ValueError(f"image and labels must be 2-D slices, got shapes {img.shape} and {lab.shape}")
    if img.shape != lab.shape:
        raise ValueError(f"image {img.shape} and labels {lab.shape} must have the same shape")
    img = img.astype(np.float64)
    if not np.isfinite(img).all():
        raise ValueError("image contains NaN or infinite values")
    return img, lab


def fat_region(
    labels: np.ndarray, spacing_mm: Sequence[float] = (1.0, 1.0), radius_mm: float = REGION_RADII_MM[0]
) -> np.ndarray:
    """Boolean mask of the region the automatic threshold learns from: paraspinal muscles (or, if none,
    any muscle) dilated by ``radius_mm`` (Euclidean, in mm), minus disc, canal and lamina pixels."""
    lab = np.asarray(labels)
    dist = _distance_to_seeds(lab, _as_spacing(spacing_mm))
    if dist is None:
        return np.zeros(lab.shape, dtype=bool)
    return (dist <= radius_mm) & ~np.isin(lab, NON_MUSCLE_VALUES)


def _distance_to_seeds(lab: np.ndarray, spacing: tuple[float, float]) -> Optional[np.ndarray]:
    """Distance (mm) of every pixel to the nearest paraspinal (else any) muscle pixel; None without muscle.

    Computed once per slice and thresholded for every region radius tried."""
    seeds = np.isin(lab, PARASPINAL_VALUES)
    if not seeds.any():
        seeds = np.isin(lab, anatomy.MUSCLE_VALUES)
    if not seeds.any():
        return None
    # Only distances up to the largest radius matter: the transform runs on the seeds' bounding box grown by
    # that radius (exact there; everything outside is farther away) instead of the whole slice.
    (rows, cols), = ndimage.find_objects(seeds.astype(np.uint8))
    m0, m1 = (int(np.ceil(max(REGION_RADII_MM) / s)) + 1 for s in spacing)
    box = (slice(max(rows.start - m0, 0), rows.stop + m0), slice(max(cols.start - m1, 0), cols.stop + m1))
    dist = np.full(lab.shape, np.inf)
    dist[box] = ndimage.distance_transform_edt(~seeds[box], sampling=spacing)
    return dist


def _robust_lean(muscle_pixels: np.ndarray) -> tuple[float, float, float]:
    """(median, robust SD from the lower half, lower cutoff) of muscle pixels.

    The lower tail of a muscle is lean even when it holds fat, so the spread is taken from the median
    down to the 5th percentile (≈ 1.645 SD for a Gaussian)."""
    med = float(np.median(muscle_pixels))
    p5 = float(np.percentile(muscle_pixels, 5))
    sd = (med - p5) / 1.645
    return med, sd, med - 2.0 * (med - p5)


@dataclass(frozen=True)
class IntensityUnits:
    """The units every automatic threshold is computed in: ``x = offset + z · 2**exponent``.

    ``offset`` is the slice's darkest value and ``2**exponent`` the power of two just above its intensity
    range, so ``z`` lies in [0, 1). Subtracting the offset first (in float64) keeps an image stored at +2e9
    as precise as one at 0, and scaling by a power of two is exact, so an integer image's ``z`` are its
    values to the last bit; squares of ``z`` can neither overflow nor underflow, whatever the scanner's
    units (1e-6 or 1e30). Thresholds and intensities in ``details`` are mapped back to image units.
    """

    offset: float
    exponent: int

    @classmethod
    def of(cls, image: np.ndarray) -> "IntensityUnits":
        """The units of a (finite, float64) slice; a constant slice gets exponent 0."""
        lo, hi = float(image.min()), float(image.max())
        return cls(lo, math.frexp(hi - lo)[1] if hi > lo else 0)

    def standardise(self, x: np.ndarray) -> np.ndarray:
        """Image intensities → ``z``."""
        return np.ldexp(np.asarray(x, dtype=np.float64) - self.offset, -self.exponent)

    def intensity(self, z: float) -> float:
        """``z`` → image intensity."""
        return self.offset + math.ldexp(float(z), self.exponent)

    def spread(self, dz: float) -> float:
        """A difference or SD in ``z`` → image intensity units."""
        return math.ldexp(float(dz), self.exponent)

    def to_image(self, result: "ThresholdResult") -> "ThresholdResult":
        """A threshold computed in ``z`` with its intensity details, in image units."""
        def convert(d: dict[str, Any]) -> dict[str, Any]:
            out = {}
            for key, v in d.items():
                if key in _INTENSITY_DETAILS:
                    v = self.intensity(v)
                elif key in _SPREAD_DETAILS:
                    v = self.spread(v)
                elif key == "tried":
                    v = [convert(t) for t in v]
                out[key] = v
            return out

        value = None if result.value is None else self.intensity(result.value)
        return ThresholdResult(value, result.method, convert(result.details))


#: ``details`` entries that are intensities, and those that are spreads (see :meth:`IntensityUnits.to_image`).
_INTENSITY_DETAILS = frozenset({"lean_median", "lower_cutoff", "lean_mean", "fat_mean"})
_SPREAD_DETAILS = frozenset({"lean_sd", "fat_sd"})

#: A pixel this close below the lower cutoff (in ``z``, i.e. ~1e-9 of the slice's range) is on it: integer
#: images have pixels exactly on the cutoff, which rounding must not move out of the region when the image
#: is scaled; far below the spacing of any image's intensity levels.
CUTOFF_SLACK = 1e-9


def fat_threshold(
    image: np.ndarray,
    labels: np.ndarray,
    method: Method = "auto",
    *,
    spacing_mm: Sequence[float] = (1.0, 1.0),
    structure: Optional[int] = None,
) -> ThresholdResult:
    """Fat/lean threshold for one slice (pixels > ``value`` are fat).

    ``method``: ``"auto"`` (two-population Gaussian mixture in a region around the paraspinal muscles;
    see the module docstring), ``"otsu"`` (Otsu of the pixels of ``structure``, or of all muscle pixels when
    ``structure`` is None), ``"otsu-region"`` (Otsu on the auto region) or a number (manual threshold).
    ``spacing_mm`` (mm per pixel along axes 0 and 1) sets the region size in mm.
    Returns ``value=None`` with ``details["reason"]`` when there is nothing to threshold. Every automatic
    method is computed in :class:`IntensityUnits` of the slice, so scaling the image by any positive factor
    or adding any offset gives the same pixels above the threshold and the threshold scaled and shifted.
    """
    img, lab = _check_inputs(image, labels)
    spacing = _as_spacing(spacing_mm)

    name = parse_threshold_method(method)
    if isinstance(name, float):
        return ThresholdResult(name, "manual", {})
    units = IntensityUnits.of(img)
    return units.to_image(_automatic_threshold(units.standardise(img), lab, name, spacing, structure))


def _automatic_threshold(z: np.ndarray, lab: np.ndarray, name: str, spacing: tuple[float, float],
                         structure: Optional[int]) -> ThresholdResult:
    """:func:`fat_threshold` of a standardised slice ``z`` (values and details in ``z``)."""
    muscle = np.isin(lab, anatomy.MUSCLE_VALUES)
    if name == "otsu":
        mask = lab == structure if structure is not None else muscle
        if not mask.any():
            return ThresholdResult(None, "otsu", {"reason": "no pixels"})
        return ThresholdResult(otsu_threshold(z[mask]), "otsu", {"pixels": int(mask.sum())})

    seeds = np.isin(lab, PARASPINAL_VALUES)
    if not seeds.any():
        seeds = muscle
    if not seeds.any():
        return ThresholdResult(None, "otsu-region" if name == "otsu-region" else "auto-gmm", {"reason": "no muscle"})
    lean_med, lean_sd, cutoff = _robust_lean(z[seeds])

    details: dict[str, Any] = {"lean_median": lean_med, "lower_cutoff": cutoff}
    tried: list[dict[str, float]] = []
    dist = _distance_to_seeds(lab, spacing)
    candidates = (z >= cutoff - CUTOFF_SLACK) & ~np.isin(lab, NON_MUSCLE_VALUES)
    for radius in REGION_RADII_MM:
        region = candidates & (dist <= radius)  # = fat_region(lab, spacing, radius) & (z >= cutoff)
        vals = z[region]
        if name == "otsu-region" and vals.size:
            return ThresholdResult(otsu_threshold(vals), "otsu-region", {**details, "radius_mm": radius, "pixels": int(vals.size)})
        if vals.size < 10 or float(vals.max()) <= float(vals.min()):
            tried.append({"radius_mm": radius, "pixels": int(vals.size)})
            continue
        gmm = fit_gaussian_mixture2(vals)
        boundary = gmm.decision_boundary()
        info = {
            "radius_mm": radius,
            "pixels": int(vals.size),
            "lean_mean": float(gmm.means[0]),
            "lean_sd": float(gmm.sds[0]),
            "fat_mean": float(gmm.means[1]),
            "fat_sd": float(gmm.sds[1]),
            "fat_weight": float(gmm.weights[1]),
            "separation": gmm.separation,
            "em_iterations": gmm.iterations,
            "histogram_bins": MIXTURE_BINS,
        }
        tried.append(info)
        if gmm.separation >= MIN_SEPARATION and boundary is not None:
            return ThresholdResult(boundary, "auto-gmm", {**details, **info, "tried": tried})
    # No distinct fat population near the muscles: do not invent one.
    value = lean_med + 3.0 * lean_sd
    return ThresholdResult(
        value,
        "auto-lean+3sd",
        {**details, "tried": tried, "warning": "no distinct fat population around the muscles; "
         "threshold = lean median + 3 robust SD"},
    )


# --------------------------------------------------------------------------------------------------------
# measurements


def _resolve_structures(structures: Optional[Iterable[Union[int, str]]]) -> list[anatomy.Structure]:
    if structures is None:
        return list(anatomy.STRUCTURES)
    return [anatomy.structure(s) for s in structures]


def measure_slice(
    image: np.ndarray,
    labels: np.ndarray,
    spacing_mm: Sequence[float] = (1.0, 1.0),
    method: Method = "auto",
    *,
    structures: Optional[Iterable[Union[int, str]]] = None,
    fat_fraction: Optional[np.ndarray] = None,
) -> list[StructureMeasurement]:
    """Measure every requested structure (default: all nine) on one slice.

    ``image`` and ``labels`` are 2-D arrays on the same grid; ``spacing_mm = (s0, s1)`` is the pixel size
    along axes 0 and 1. One row per structure in the order requested; a structure with no pixels gets an
    explicit ``found=False`` row (None for every number). Fat % and functional CSA are given for the six
    muscles only. Label 255 (not annotated) is ignored. ``fat_fraction``: a Dixon fat-fraction map of the
    slice in [0, 1] with NaN for pixels left out (:meth:`dixon.DixonSource.fraction_map`); each muscle's
    mean becomes ``dixon_fat_fraction_percent``.
    """
    img, lab = _check_inputs(image, labels)
    dixon: dict[int, Optional[float]] = {}
    if fat_fraction is not None:
        from .dixon import dixon_fat_fraction_percent

        dixon = dixon_fat_fraction_percent(fat_fraction, lab, anatomy.MUSCLE_VALUES)
    s0, s1 = _as_spacing(spacing_mm)
    pixel_area = s0 * s1
    chosen = _resolve_structures(structures)

    slice_threshold: Optional[ThresholdResult] = None
    is_otsu = parse_threshold_method(method) == "otsu"
    if not is_otsu and any(s.is_muscle for s in chosen):
        slice_threshold = fat_threshold(img, lab, method, spacing_mm=(s0, s1))

    rows: list[StructureMeasurement] = []
    for st in chosen:
        mask = lab == st.value
        n = int(mask.sum())
        if n == 0:
            rows.append(
                StructureMeasurement(st.value, st.key, st.name, False, 0, None, None, None, None, None, None,
                                     _method_name(method, slice_threshold))
            )
            continue
        vals = img[mask]
        threshold: Optional[ThresholdResult] = None
        fat_pct: Optional[float] = None
        fcsa: Optional[float] = None
        if st.is_muscle:
            threshold = fat_threshold(img, lab, "otsu", structure=st.value) if is_otsu else slice_threshold
            if threshold is not None and threshold.value is not None:
                n_fat = int(np.count_nonzero(vals > threshold.value))
                fat_pct = 100.0 * n_fat / n
                fcsa = (n - n_fat) * pixel_area
        rows.append(
            StructureMeasurement(
                value=st.value,
                key=st.key,
                name=st.name,
                found=True,
                pixel_count=n,
                csa_mm2=n * pixel_area,
                functional_csa_mm2=fcsa,
                fat_percent=fat_pct,
                mean_intensity=float(vals.mean()),
                sd_intensity=float(vals.std(ddof=1)) if n > 1 else 0.0,
                threshold=None if threshold is None else threshold.value,
                method=(threshold.method if threshold is not None else _method_name(method, slice_threshold))
                if st.is_muscle
                else "",
                stenosis_grade=stenosis_grade(n * pixel_area) if st.value == SPINAL_CANAL_VALUE else None,
                dixon_fat_fraction_percent=dixon.get(st.value),
            )
        )
    return rows


def _method_name(method: Method, result: Optional[ThresholdResult]) -> str:
    if result is not None:
        return result.method
    name = parse_threshold_method(method)
    return "manual" if isinstance(name, float) else name


def _pct_diff(left: Optional[float], right: Optional[float]) -> Optional[float]:
    if left is None or right is None:
        return None
    mean = 0.5 * (left + right)
    return None if mean == 0 else 100.0 * (left - right) / mean


def asymmetry(records: Sequence[StructureMeasurement]) -> list[AsymmetryRecord]:
    """Left/right asymmetry for psoas, multifidus, erector spinae and multifidus + erector spinae per side.

    Asymmetry % = 100·(left − right)/mean(left, right) for CSA and functional CSA; the fat % difference is
    left − right in points (fat % of the combined group is pixel-weighted). A pair with a side not found
    gives ``found=False`` and None values.
    """
    by_value = {r.value: r for r in records}
    groups: list[tuple[str, str, tuple[int, ...], tuple[int, ...]]] = []
    for left, right in anatomy.MUSCLE_PAIRS:
        st = anatomy.BY_VALUE[left]
        base = st.key.rsplit("_", 1)[0]
        groups.append((base, st.name.replace("left ", ""), (left,), (right,)))
    groups.append(("multifidus_erector_spinae", "multifidus + erector spinae", (6, 8), (7, 9)))

    out: list[AsymmetryRecord] = []
    for key, name, lvals, rvals in groups:
        sides = []
        for vals in (lvals, rvals):
            recs = [by_value.get(v) for v in vals]
            if any(r is None or not r.found for r in recs):
                sides.append(None)
                continue
            csa = sum(r.csa_mm2 for r in recs)  # type: ignore[misc]
            have_fat = all(r.functional_csa_mm2 is not None for r in recs)
            fcsa = sum(r.functional_csa_mm2 for r in recs) if have_fat else None  # type: ignore[misc]
            fat = 100.0 * (csa - fcsa) / csa if have_fat and csa > 0 else None
            sides.append((csa, fcsa, fat))
        found = all(s is not None for s in sides)
        L = sides[0] or (None, None, None)
        R = sides[1] or (None, None, None)
        out.append(
            AsymmetryRecord(
                key=key,
                name=name,
                left_values=lvals,
                right_values=rvals,
                found=found,
                left_csa_mm2=L[0],
                right_csa_mm2=R[0],
                csa_asymmetry_percent=_pct_diff(L[0], R[0]) if found else None,
                left_functional_csa_mm2=L[1],
                right_functional_csa_mm2=R[1],
                functional_csa_asymmetry_percent=_pct_diff(L[1], R[1]) if found else None,
                left_fat_percent=L[2],
                right_fat_percent=R[2],
                fat_percent_difference=(L[2] - R[2]) if found and L[2] is not None and R[2] is not None else None,
            )
        )
    return out
