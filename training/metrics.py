"""Per-slice, per-structure metrics (numpy + scipy only): Dice, 95 % Hausdorff distance, detection IoU.

Only the structures the slice's source annotates are scored. For such a structure ``c`` a ground-truth
pixel labelled 255 counts as "not c" (the data README guarantees a 255 pixel is never a trusted class),
so a prediction of ``c`` there is a false positive. A structure absent from both the ground truth and the
prediction has no Dice/HD95 (NaN, left out of means); absent in one of them gives Dice 0 and HD95 NaN,
counted in the ``missed``/``spurious`` columns.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np
from scipy import ndimage

from ParaspinalSegLib.boxes import box_from_mask, pixel_box_iou


def dice(pred: np.ndarray, gt: np.ndarray) -> float:
    """Dice of two boolean masks; NaN when both are empty."""
    p, g = np.asarray(pred, bool), np.asarray(gt, bool)
    s = int(p.sum()) + int(g.sum())
    if s == 0:
        return math.nan
    return 2.0 * int((p & g).sum()) / s


#: medpy's and MONAI's surface: a mask pixel with a 4-neighbour outside the mask (erosion with the cross).
_SURFACE_STRUCTURE = ndimage.generate_binary_structure(2, 1)


def _surface(mask: np.ndarray) -> np.ndarray:
    return mask & ~ndimage.binary_erosion(mask, structure=_SURFACE_STRUCTURE, border_value=0)


def hd95(pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float] = (1.0, 1.0)) -> float:
    """95th percentile of the symmetric surface distances in mm, as medpy's ``hd95``; NaN if a mask is empty.

    Distances from each surface pixel of one mask to the nearest surface pixel of the other (Euclidean
    distance transform with the pixel ``spacing``), both directions pooled. The surface is what medpy
    (``metric.binary.__surface_distances``) and MONAI (``get_surface``) take: the mask minus its erosion
    with the 4-neighbour cross, so a pixel touching the outside only at a corner is inside, not surface.
    """
    p, g = np.asarray(pred, bool), np.asarray(gt, bool)
    if not p.any() or not g.any():
        return math.nan
    sp, sg = _surface(p), _surface(g)
    dt_g = ndimage.distance_transform_edt(~sg, sampling=spacing)
    dt_p = ndimage.distance_transform_edt(~sp, sampling=spacing)
    return float(np.percentile(np.concatenate([dt_g[sp], dt_p[sg]]), 95))


def score_slice(
    pred_labels: np.ndarray,
    gt_labels: np.ndarray,
    structures: Sequence[int],
    spacing: Sequence[float],
    pred_boxes: Optional[dict[int, Sequence[float]]] = None,
    iou_threshold: float = 0.5,
) -> list[dict]:
    """One row per scored structure: dice, hd95_mm, iou, gt_present, pred_present, tp/fp/fn (detection).

    ``pred_boxes``: pixel boxes ``(r0, c0, r1, c1)`` on the same grid for the predicted structures (the
    BSN detector's boxes); ``None`` = the predicted masks' boxes. A detection is a true positive when the
    structure is in the ground truth, predicted, and the box IoU ≥ ``iou_threshold``.
    """
    pred_labels = np.asarray(pred_labels)
    gt_labels = np.asarray(gt_labels)
    if pred_labels.shape != gt_labels.shape:
        raise ValueError(f"prediction {pred_labels.shape} and ground truth {gt_labels.shape} differ")
    rows = []
    for v in structures:
        p, g = pred_labels == v, gt_labels == v
        gt_box = box_from_mask(g)
        pb = (pred_boxes or {}).get(v) if pred_boxes is not None else box_from_mask(p)
        pred_present = bool(p.any())
        if not pred_present:
            pb = None
        iou = math.nan if pb is None or gt_box is None else pixel_box_iou(pb, gt_box)
        tp = gt_box is not None and pred_present and iou >= iou_threshold
        rows.append(
            {
                "structure": int(v),
                "dice": dice(p, g),
                "hd95_mm": hd95(p, g, spacing),
                "iou": iou,
                "gt_present": gt_box is not None,
                "pred_present": pred_present,
                "tp": int(tp),
                "fp": int(pred_present and not tp),
                "fn": int(gt_box is not None and not tp),
            }
        )
    return rows
