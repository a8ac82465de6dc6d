"""Quality control of one segmented slice: plausibility checks that need no ground truth.

Each check is a plain function of arrays and numbers that returns a list of :class:`QCFlag`; a flag names
the structure it concerns (or None for the whole slice) and says why in a few words a clinician can act
on. :func:`run_checks` runs them all and gives a :class:`QCReport` whose :meth:`QCReport.cell` is what the
measurement table's ``QC`` column shows: ``ok`` or ``check: reason; reason``.

The checks and their thresholds (:class:`QCThresholds`; ``docs/quality-control.md`` records how each was
chosen, what it caught and its false-flag rate):

* **detector box vs mask** — BS-ESNet's BSN detects one box per structure on its preliminary mask; the
  decoder's final mask should fill about the same box. Low IoU means the two halves of the network
  disagree on where the structure is.
* **anatomical layout**, in patient coordinates (RAS from the slice matrix, never the screen): left
  structures on the patient's left of the midline the disc and canal define, right ones on the right; on
  each side the multifidus medial to the erector spinae; the psoas lateral to the disc and not behind the
  canal; the canal posterior to the disc; the lamina posterior to the canal.
* **shape** — fragmentation before largest-component cleaning, holes, an area far outside the range seen
  in training (mm²), and a left/right area ratio outside what healthy and diseased spines show.
* **confidence** — mean maximum probability inside the structure, and the share of its pixels that are
  uncertain (maximum probability below 0.5).
* **image** — a field of view or pixel size unlike any training slice, noise far above any training
  slice's, a background brighter than the body (inverted contrast), or a slice on which no disc and no
  muscle pair was found (not a lumbar slice, or the model is lost).

numpy + scipy only, so the Slicer module can run the checks without scikit-image or torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Mapping, Optional, Sequence

import numpy as np
from scipy import ndimage

from . import anatomy

__all__ = [
    "QCFlag",
    "QCReport",
    "QCThresholds",
    "TRAINING_AREA_RANGE_MM2",
    "check_box_agreement",
    "check_layout",
    "check_shape",
    "check_confidence",
    "check_image",
    "check_result",
    "with_qc",
    "image_statistics",
    "run_checks",
    "structure_centroids_ras",
]

#: Per structure, the smallest and largest CSA (mm²) in the nine-class model's training labels: pixels ×
#: pixel area over every slice that trusts the structure and shows it (sy_lumbar_muscle with its estimated
#: 0.37 mm spacing, myosegmentum_lpm; canal and lamina: the derived labels of the sy slices whose review
#: accepted them, 116 of 134). Computed by ``python -m training.area_ranges --data
#: <derived sy_lumbar_muscle> ../shared/data/myosegmentum_lpm``; recompute when the training data change.
TRAINING_AREA_RANGE_MM2: dict[int, tuple[float, float]] = {
    1: (699.0, 2360.0),
    2: (63.0, 299.0),
    3: (364.0, 1211.0),
    4: (140.0, 1963.0),
    5: (129.0, 1891.0),
    6: (164.0, 1418.0),
    7: (218.0, 1392.0),
    8: (256.0, 2638.0),
    9: (200.0, 2474.0),
}


@dataclass(frozen=True)
class QCThresholds:
    """Every threshold the checks use, in one place (values: see ``docs/quality-control.md``)."""

    #: Detector box vs final-mask box IoU below this is flagged.
    min_box_iou: float = 0.3
    #: Structures whose detector box is compared with the mask. Not the canal: in the nine-class
    #: cross-validation its detector gives one fixed box (16 × 11 mm, 9–21 mm anterior of the canal) on
    #: every held-out slice, so its IoU (median 0.00) says nothing about the segmentation.
    box_structures: tuple[int, ...] = (1, 3, 4, 5, 6, 7, 8, 9)
    #: Tolerance (mm) for "left of the midline", "posterior to", "medial to".
    layout_tolerance_mm: float = 5.0
    #: Share of a structure's pixels outside its largest component (before cleaning) above this.
    max_fragment_share: float = 0.15
    #: Share of a structure's filled area that is a hole above this.
    max_hole_share: float = 0.10
    #: Area flagged below ``area_low_factor × training minimum`` or above ``area_high_factor × maximum``.
    area_low_factor: float = 0.5
    area_high_factor: float = 1.5
    #: Left/right CSA ratio of a pair outside [1/x, x] is flagged (training labels span 0.39 … 1.84).
    max_pair_ratio: float = 3.0
    #: Mean maximum probability inside a structure below this is flagged.
    min_confidence: float = 0.70
    #: Share of a structure's pixels with maximum probability < 0.5 above this is flagged.
    max_uncertain_share: float = 0.25
    #: Field of view (mm, the larger side) outside this range is unlike every training slice.
    fov_range_mm: tuple[float, float] = (120.0, 520.0)
    #: Pixel size (mm) outside this range is unlike every training slice.
    pixel_range_mm: tuple[float, float] = (0.2, 2.5)
    #: Noise (Immerkær estimate) over the 1st–99th percentile range above this (training: ≤ 0.0041).
    max_noise_ratio: float = 0.03
    #: Median of the image's outer frame, as a fraction of the 1st–99th percentile range, above this:
    #: the background is brighter than the body (training: ≤ 0.13; inverted contrast ≥ 0.9).
    max_background_level: float = 0.5


@dataclass(frozen=True)
class QCFlag:
    """One reason to look again. ``value`` is the structure's label value, or None for the whole slice."""

    value: Optional[int]
    check: str
    reason: str


@dataclass
class QCReport:
    """All flags of one slice."""

    flags: list[QCFlag] = field(default_factory=list)

    def for_structure(self, value: int) -> list[QCFlag]:
        """Flags of structure ``value`` plus the slice-wide ones (they concern every row)."""
        return [f for f in self.flags if f.value in (value, None)]

    def cell(self, value: int) -> str:
        """The ``QC`` column of structure ``value``'s row: ``ok`` or ``check: reason; reason``."""
        reasons = list(dict.fromkeys(f.reason for f in self.for_structure(value)))
        return "ok" if not reasons else "check: " + "; ".join(reasons)

    @property
    def flagged_values(self) -> list[int]:
        """Structures with a structure-specific flag, ascending."""
        return sorted({f.value for f in self.flags if f.value is not None})

    @property
    def ok(self) -> bool:
        return not self.flags

    def summary(self) -> str:
        """One line for the command line and the panel's status."""
        if self.ok:
            return "QC: ok"
        parts = []
        slice_wide = list(dict.fromkeys(f.reason for f in self.flags if f.value is None))
        if slice_wide:
            parts.append("slice: " + "; ".join(slice_wide))
        names = [anatomy.BY_VALUE[v].name for v in self.flagged_values]
        if names:
            parts.append("check " + ", ".join(names))
        return "QC: " + " | ".join(parts)


# --------------------------------------------------------------------------------------------------
# geometry helpers


def _pixel_axes_mm(slice_ijk_to_ras: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    m = np.asarray(slice_ijk_to_ras, dtype=np.float64)
    return m[:3, 0], m[:3, 1]


def structure_centroids_ras(labels: np.ndarray, slice_ijk_to_ras: np.ndarray) -> dict[int, np.ndarray]:
    """RAS (mm) centroid of each structure present in ``labels`` (2-D, on the slice's own grid)."""
    m = np.asarray(slice_ijk_to_ras, dtype=np.float64)
    out: dict[int, np.ndarray] = {}
    for v, box in _bounding_boxes(labels).items():  # each structure inside its own box: cheap on 512²
        p, q = np.nonzero(labels[box] == v)
        out[int(v)] = (m @ np.array([p.mean() + box[0].start, q.mean() + box[1].start, 0.0, 1.0]))[:3]
    return out


@dataclass(frozen=True)
class _Midline:
    """The spine's midline on the slice, in RAS mm: a point on it and the unit normal toward patient left."""

    origin: np.ndarray
    to_left: np.ndarray

    def lateral(self, point: np.ndarray) -> float:
        """Signed distance (mm) of ``point`` from the midline, positive toward the patient's left."""
        return float((point[:2] - self.origin) @ self.to_left)


def _midline(c: Mapping[int, np.ndarray]) -> Optional[_Midline]:
    """The line through the disc and canal centroids (a patient lying rotated rotates it too); with one of
    them, the anterior-posterior line through it; else the line midway between a muscle pair."""
    posterior = np.array([0.0, -1.0])
    if 1 in c and 2 in c:
        d = c[2][:2] - c[1][:2]
        # Trust the disc → canal direction only where it is roughly posterior (a broken layout is flagged
        # by the posterior checks, not rotated away).
        if np.linalg.norm(d) > 1e-6 and (d / np.linalg.norm(d)) @ posterior > np.cos(np.deg2rad(45)):
            posterior = d / np.linalg.norm(d)
    to_left = np.array([posterior[1], -posterior[0]])
    if to_left @ np.array([-1.0, 0.0]) < 0:  # patient left is −x in RAS
        to_left = -to_left
    central = [c[v][:2] for v in (1, 2) if v in c]
    if central:
        return _Midline(np.mean(central, axis=0), to_left)
    for left in (6, 8, 4):
        if left in c and left + 1 in c:
            return _Midline((c[left][:2] + c[left + 1][:2]) / 2, to_left)
    return None


# --------------------------------------------------------------------------------------------------
# the checks


def check_box_agreement(box_iou: Mapping[int, float], t: QCThresholds = QCThresholds()) -> list[QCFlag]:
    """Flag structures (of ``t.box_structures``) whose BSN detector box and final-mask box overlap by less
    than ``t.min_box_iou``."""
    return [
        QCFlag(int(v), "box", f"detector box disagrees with mask (IoU {iou:.2f})")
        for v, iou in sorted(box_iou.items())
        if iou < t.min_box_iou and int(v) in t.box_structures
    ]


def check_layout(labels: np.ndarray, slice_ijk_to_ras: np.ndarray, t: QCThresholds = QCThresholds()) -> list[QCFlag]:
    """Flag structures that lie where anatomy forbids, in patient coordinates (RAS: +x right, +y anterior)."""
    c = structure_centroids_ras(labels, slice_ijk_to_ras)
    tol = t.layout_tolerance_mm
    flags: list[QCFlag] = []
    mid = _midline(c)
    if mid is not None:
        for st in anatomy.STRUCTURES:
            if st.side is None or st.value not in c:
                continue
            x = mid.lateral(c[st.value])
            if (st.side == "left" and x < -tol) or (st.side == "right" and x > tol):
                other = "right" if st.side == "left" else "left"
                flags.append(QCFlag(st.value, "layout", f"on the patient's {other} of the midline"))
        for mf, es in ((6, 8), (7, 9)):
            if mf in c and es in c and abs(mid.lateral(c[mf])) > abs(mid.lateral(c[es])) + tol:
                flags.append(QCFlag(mf, "layout", "multifidus lateral to the erector spinae"))
                flags.append(QCFlag(es, "layout", "erector spinae medial to the multifidus"))
        if 1 in c:
            disc_box = _bounding_boxes(labels).get(1)
            disc_half_width = _half_width_mm(labels[disc_box] == 1, slice_ijk_to_ras, disc_box)
            for ps in (4, 5):
                if ps in c and abs(mid.lateral(c[ps])) < disc_half_width * 0.5:
                    flags.append(QCFlag(ps, "layout", "psoas not lateral to the disc"))
    for ps in (4, 5):
        if ps in c and 2 in c and c[ps][1] < c[2][1] - tol:
            flags.append(QCFlag(ps, "layout", "psoas posterior to the canal"))
    if 1 in c and 2 in c and c[2][1] > c[1][1] - tol:
        flags.append(QCFlag(2, "layout", "canal not posterior to the disc"))
    if 2 in c and 3 in c and c[3][1] > c[2][1] - tol:
        flags.append(QCFlag(3, "layout", "lamina not posterior to the canal"))
    front = c.get(2, c.get(1))
    if front is not None:
        for mf in (6, 7):
            if mf in c and c[mf][1] > front[1] + tol:
                flags.append(QCFlag(mf, "layout", "multifidus anterior to the spine"))
    return flags


def _half_width_mm(mask: np.ndarray, slice_ijk_to_ras: np.ndarray, box: tuple[slice, slice]) -> float:
    """Half the left-right (RAS x) extent in mm of ``mask``, a crop of the slice at ``box``."""
    p, q = np.nonzero(mask)
    if p.size == 0:
        return 0.0
    p, q = p + box[0].start, q + box[1].start
    m = np.asarray(slice_ijk_to_ras, dtype=np.float64)
    x = m[0, 0] * p + m[0, 1] * q
    return float((x.max() - x.min() + abs(m[0, 0]) + abs(m[0, 1])) / 2)


def _bounding_boxes(labels: np.ndarray) -> dict[int, tuple[slice, slice]]:
    """Bounding slices of every structure present (one pass over the image)."""
    lab = np.where(np.asarray(labels) < anatomy.NUM_CLASSES, labels, 0).astype(np.int32)
    objects = ndimage.find_objects(lab, max_label=anatomy.NUM_CLASSES - 1)
    return {v: objects[v - 1] for v in anatomy.BY_VALUE if objects[v - 1] is not None}


#: 8-connectivity, as the largest-component cleaning uses (``postprocessing``): a piece joined to the rest
#: through a diagonal step is not removed by the cleaning, so it is no fragment either.
_FULL_CONNECTIVITY = np.ones((3, 3), bool)


def check_shape(
    labels: np.ndarray,
    spacing_mm: Sequence[float],
    raw_labels: Optional[np.ndarray] = None,
    t: QCThresholds = QCThresholds(),
    area_range_mm2: Mapping[int, tuple[float, float]] = TRAINING_AREA_RANGE_MM2,
) -> list[QCFlag]:
    """Fragmentation (``raw_labels``: the labels before largest-component cleaning), holes, area out of the
    training range, and implausible left/right ratios."""
    pixel_area = float(spacing_mm[0]) * float(spacing_mm[1])
    flags: list[QCFlag] = []
    areas: dict[int, float] = {}
    boxes = _bounding_boxes(labels)
    raw_boxes = _bounding_boxes(raw_labels) if raw_labels is not None else {}
    for s in anatomy.STRUCTURES:
        if s.value not in boxes:
            continue
        mask = labels[boxes[s.value]] == s.value
        n = int(mask.sum())
        areas[s.value] = n * pixel_area
        if raw_labels is not None and s.value in raw_boxes:
            raw = raw_labels[raw_boxes[s.value]] == s.value
            comp, k = ndimage.label(raw, structure=_FULL_CONNECTIVITY)
            if k > 1:
                sizes = np.bincount(comp.ravel())[1:]
                share = 1.0 - sizes.max() / sizes.sum()
                if share > t.max_fragment_share:
                    flags.append(QCFlag(s.value, "shape", f"fragmented ({k} pieces, {100 * share:.0f} % outside the largest)"))
        filled = ndimage.binary_fill_holes(np.pad(mask, 1))
        holes = int(filled.sum()) - n
        if holes and holes / filled.sum() > t.max_hole_share:
            flags.append(QCFlag(s.value, "shape", f"holes ({100 * holes / filled.sum():.0f} % of its area)"))
        lo, hi = area_range_mm2.get(s.value, (0.0, np.inf))
        if areas[s.value] < t.area_low_factor * lo:
            flags.append(QCFlag(s.value, "shape", f"area {areas[s.value]:.0f} mm² far below training ({lo:.0f}–{hi:.0f})"))
        elif areas[s.value] > t.area_high_factor * hi:
            flags.append(QCFlag(s.value, "shape", f"area {areas[s.value]:.0f} mm² far above training ({lo:.0f}–{hi:.0f})"))
    for left in (4, 6, 8):
        right = left + 1
        if left in areas and right in areas:
            ratio = areas[left] / areas[right]
            if not (1.0 / t.max_pair_ratio <= ratio <= t.max_pair_ratio):
                reason = f"left/right area ratio {ratio:.2f}"
                flags += [QCFlag(left, "shape", reason), QCFlag(right, "shape", reason)]
    return flags


def check_confidence(
    labels: np.ndarray,
    max_probability: Optional[np.ndarray] = None,
    confidence: Optional[Mapping[int, float]] = None,
    t: QCThresholds = QCThresholds(),
) -> list[QCFlag]:
    """Low mean maximum probability inside a structure, or many uncertain pixels (max probability < 0.5).

    ``max_probability`` is the per-pixel maximum class probability on the labels' grid; without it the
    per-structure mean ``confidence`` the segmenter reports is used alone.
    """
    flags: list[QCFlag] = []
    boxes = _bounding_boxes(labels)
    for s in anatomy.STRUCTURES:
        if s.value not in boxes:
            continue
        box = boxes[s.value]
        if max_probability is not None:
            inside = np.asarray(max_probability)[box][labels[box] == s.value]
            mean = float(inside.mean())
            uncertain = float(np.mean(inside < 0.5))
        elif confidence is not None and s.value in confidence:
            mean, uncertain = float(confidence[s.value]), 0.0
        else:
            continue
        if mean < t.min_confidence:
            flags.append(QCFlag(s.value, "confidence", f"low confidence ({mean:.2f})"))
        if uncertain > t.max_uncertain_share:
            flags.append(QCFlag(s.value, "confidence", f"{100 * uncertain:.0f} % uncertain pixels"))
    return flags


_LAPLACIAN_DIFFERENCE = np.array([[1.0, -2.0, 1.0], [-2.0, 4.0, -2.0], [1.0, -2.0, 1.0]])


def image_statistics(image: np.ndarray) -> tuple[float, float]:
    """``(noise ratio, background level)`` of a slice, both relative to its 1st–99th percentile range.

    Noise: Immerkær's fast estimate (Comput Vis Image Underst 1996;64:300–302), the mean absolute response
    to a difference of two Laplacians, which cancels smooth anatomy and keeps pixel noise. Background: the
    median of the outer frame (1/20 of the shorter side), where an MRI slice holds air or the body's edge.
    """
    a = np.asarray(image, dtype=np.float64)
    # float32 halves the cost, but only after the offset is gone: an image stored at +2e9 would keep
    # steps of 128 in float32, and its quantisation would read as noise.
    a = (a - a.min() if a.size else a).astype(np.float32)
    # Percentiles of every other pixel in each direction: the same to a fraction of a percent, 4× cheaper.
    lo, hi = (float(v) for v in np.percentile(a[::2, ::2], [1.0, 99.0]))
    span = max(hi - lo, 1e-12)
    if min(a.shape) < 3:
        return 0.0, 0.0
    response = ndimage.correlate(a, _LAPLACIAN_DIFFERENCE.astype(np.float32), mode="reflect")[1:-1, 1:-1]
    noise = float(np.sqrt(np.pi / 2.0) * np.abs(response, dtype=np.float64).mean() / 6.0)
    b = max(2, min(a.shape) // 20)
    frame = np.concatenate([a[:b].ravel(), a[-b:].ravel(), a[:, :b].ravel(), a[:, -b:].ravel()])
    return noise / span, float((np.median(frame) - lo) / span)


def check_image(
    image: np.ndarray,
    labels: np.ndarray,
    spacing_mm: Sequence[float],
    structures_learned: Sequence[int] = tuple(range(1, 10)),
    t: QCThresholds = QCThresholds(),
) -> list[QCFlag]:
    """Slice-wide flags: field of view or pixel size unlike training; a slice that does not look lumbar."""
    flags: list[QCFlag] = []
    s0, s1 = float(spacing_mm[0]), float(spacing_mm[1])
    fov = max(image.shape[0] * s0, image.shape[1] * s1)
    if not (t.fov_range_mm[0] <= fov <= t.fov_range_mm[1]):
        flags.append(QCFlag(None, "image", f"field of view {fov:.0f} mm unlike training ({t.fov_range_mm[0]:.0f}–{t.fov_range_mm[1]:.0f})"))
    if not all(t.pixel_range_mm[0] <= s <= t.pixel_range_mm[1] for s in (s0, s1)):
        flags.append(QCFlag(None, "image", f"pixel size {s0:.2f}×{s1:.2f} mm unlike training"))
    noise, background = image_statistics(image)
    if noise > t.max_noise_ratio:
        flags.append(QCFlag(None, "image", f"image far noisier than training (noise {100 * noise:.1f} % of range)"))
    if background > t.max_background_level:
        flags.append(QCFlag(None, "image", "background brighter than the body: contrast unlike training"))
    present = set(int(v) for v in np.unique(labels))
    learned = set(structures_learned)
    pairs = [(a, a + 1) for a in (4, 6, 8) if {a, a + 1} <= learned]
    has_pair = any({a, b} <= present for a, b in pairs)
    if not has_pair and not ({1} & learned & present):
        flags.append(QCFlag(None, "image", "no disc and no muscle pair found: not a lumbar slice?"))
    return flags


def run_checks(
    labels: np.ndarray,
    image: np.ndarray,
    slice_ijk_to_ras: np.ndarray,
    *,
    raw_labels: Optional[np.ndarray] = None,
    max_probability: Optional[np.ndarray] = None,
    confidence: Optional[Mapping[int, float]] = None,
    box_iou: Optional[Mapping[int, float]] = None,
    structures_learned: Sequence[int] = tuple(range(1, 10)),
    thresholds: QCThresholds = QCThresholds(),
) -> QCReport:
    """All checks on one slice. Inputs on the slice's own grid; pass what you have (edited segments have no
    probabilities or boxes: then only layout, shape and image checks run)."""
    labels = np.asarray(labels)
    m = np.asarray(slice_ijk_to_ras, dtype=np.float64)
    s0, s1 = (float(np.linalg.norm(a)) for a in _pixel_axes_mm(m))
    report = QCReport()
    report.flags += check_image(image, labels, (s0, s1), structures_learned, thresholds)
    report.flags += check_layout(labels, m, thresholds)
    report.flags += check_shape(labels, (s0, s1), raw_labels, thresholds)
    report.flags += check_confidence(labels, max_probability, confidence, thresholds)
    if box_iou:
        report.flags += check_box_agreement(box_iou, thresholds)
    return report


def check_result(result: Any, image: np.ndarray, slice_ijk_to_ras: np.ndarray,
                 thresholds: QCThresholds = QCThresholds()) -> QCReport:
    """All checks on a :class:`~ParaspinalSegLib.segmenter.SliceResult` of ``image`` (what the network gave:
    raw labels, probabilities, detector boxes, confidence)."""
    return run_checks(
        result.labels, image, slice_ijk_to_ras,
        raw_labels=getattr(result, "raw_labels", None),
        max_probability=getattr(result, "max_probability", None),
        confidence=result.confidence, box_iou=result.box_agreement,
        structures_learned=result.structures_learned, thresholds=thresholds,
    )


def with_qc(records: Sequence[Any], report: QCReport) -> list[Any]:
    """Measurement records (dataclasses with ``value`` and ``qc``) with their ``QC`` cells filled in."""
    return [replace(r, qc=report.cell(r.value)) for r in records]
