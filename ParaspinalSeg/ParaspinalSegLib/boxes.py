"""Bounding boxes of structures: from masks, normalised for the network, rasterised for SAG, compared.

Numpy only (runs in 3D Slicer's Python). Conventions (``docs/api-contract.md``):

- Pixel bounds ``(r0, c0, r1, c1)`` are half-open: rows ``r0 .. r1-1`` and columns ``c0 .. c1-1``
  (pixel ``(r, c)`` covers ``[r, r+1) × [c, c+1)``).
- Normalised boxes are ``(cx, cy, w, h)``: ``cx, w`` along columns divided by ``W``; ``cy, h``
  along rows divided by ``H``.
- Pixel ``(r, c)`` is inside a normalised box if its centre ``(r + 0.5, c + 0.5)`` (pixel units)
  lies in the half-open box ``[y0, y1) × [x0, x1)``; half-open so that boxes from masks give back
  exactly the mask's bounding rectangle.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import numpy as np

__all__ = [
    "box_from_mask",
    "normalised_box",
    "denormalise_box",
    "boxes_from_labels",
    "rasterise_boxes",
    "box_iou",
    "pixel_box_iou",
]


def box_from_mask(mask: np.ndarray) -> Optional[tuple[int, int, int, int]]:
    """Half-open pixel bounds ``(r0, c0, r1, c1)`` of the non-zero pixels of a 2-D mask, or None if empty."""
    m = np.asarray(mask)
    if m.ndim != 2:
        raise ValueError(f"expected a 2-D mask, got shape {m.shape}")
    rows = np.flatnonzero(m.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(m.any(axis=0))
    return int(rows[0]), int(cols[0]), int(rows[-1]) + 1, int(cols[-1]) + 1


def normalised_box(r0: float, c0: float, r1: float, c1: float, H: int, W: int) -> tuple[float, float, float, float]:
    """Pixel bounds → normalised ``(cx, cy, w, h)`` for an image of ``H`` rows and ``W`` columns."""
    return (c0 + c1) / 2.0 / W, (r0 + r1) / 2.0 / H, (c1 - c0) / W, (r1 - r0) / H


def denormalise_box(cx: float, cy: float, w: float, h: float, H: int, W: int) -> tuple[float, float, float, float]:
    """Normalised ``(cx, cy, w, h)`` → float pixel-edge bounds ``(r0, c0, r1, c1)`` (inverse of :func:`normalised_box`)."""
    return (cy - h / 2.0) * H, (cx - w / 2.0) * W, (cy + h / 2.0) * H, (cx + w / 2.0) * W


def boxes_from_labels(labels: np.ndarray, num_structures: int = 9) -> tuple[np.ndarray, np.ndarray]:
    """Normalised boxes of label values ``1 .. num_structures`` in a 2-D label image.

    Returns ``boxes`` (``(num_structures, 4)`` float32, row ``v - 1`` for value ``v``, zeros where
    absent) and ``present`` (``(num_structures,)`` bool). Other values (background 0,
    not-annotated 255) are ignored.
    """
    lab = np.asarray(labels)
    if lab.ndim != 2:
        raise ValueError(f"expected a 2-D label image, got shape {lab.shape}")
    H, W = lab.shape
    boxes = np.zeros((num_structures, 4), dtype=np.float32)
    present = np.zeros(num_structures, dtype=bool)
    for v in range(1, num_structures + 1):
        b = box_from_mask(lab == v)
        if b is not None:
            boxes[v - 1] = normalised_box(*b, H, W)
            present[v - 1] = True
    return boxes, present


def rasterise_boxes(boxes: np.ndarray, H: int, W: int) -> np.ndarray:
    """Binary maps ``(N, H, W)`` of normalised boxes ``(N, 4)`` (a single ``(4,)`` box gives ``(1, H, W)``).

    Pixel ``(r, c)`` is set when its centre ``(r + 0.5, c + 0.5)`` lies in ``[y0, y1) × [x0, x1)``.
    """
    b = np.atleast_2d(np.asarray(boxes, dtype=np.float64))
    if b.ndim != 2 or b.shape[1] != 4:
        raise ValueError(f"expected boxes of shape (N, 4), got {np.shape(boxes)}")
    cx, cy, w, h = b.T
    x0, x1 = (cx - w / 2.0) * W, (cx + w / 2.0) * W
    y0, y1 = (cy - h / 2.0) * H, (cy + h / 2.0) * H
    # Round the edges to 1e-9 pixels so float noise from the normalisation cannot drop an edge pixel.
    x0, x1, y0, y1 = (np.round(e, 9) for e in (x0, x1, y0, y1))
    rc = np.arange(H, dtype=np.float64) + 0.5
    cc = np.arange(W, dtype=np.float64) + 0.5
    in_rows = (rc[None, :] >= y0[:, None]) & (rc[None, :] < y1[:, None])  # (N, H)
    in_cols = (cc[None, :] >= x0[:, None]) & (cc[None, :] < x1[:, None])  # (N, W)
    return in_rows[:, :, None] & in_cols[:, None, :]


def box_iou(a: np.ndarray, b: np.ndarray) -> Union[float, np.ndarray]:
    """Intersection over union of normalised boxes ``(..., 4)`` (broadcast); 0 where both are empty.

    Returns a float for two single boxes, else an array of the broadcast shape.
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    ax0, ax1 = a[..., 0] - a[..., 2] / 2, a[..., 0] + a[..., 2] / 2
    ay0, ay1 = a[..., 1] - a[..., 3] / 2, a[..., 1] + a[..., 3] / 2
    bx0, bx1 = b[..., 0] - b[..., 2] / 2, b[..., 0] + b[..., 2] / 2
    by0, by1 = b[..., 1] - b[..., 3] / 2, b[..., 1] + b[..., 3] / 2
    iw = np.clip(np.minimum(ax1, bx1) - np.maximum(ax0, bx0), 0.0, None)
    ih = np.clip(np.minimum(ay1, by1) - np.maximum(ay0, by0), 0.0, None)
    inter = iw * ih
    area_a = np.clip(a[..., 2], 0.0, None) * np.clip(a[..., 3], 0.0, None)
    area_b = np.clip(b[..., 2], 0.0, None) * np.clip(b[..., 3], 0.0, None)
    union = area_a + area_b - inter
    iou = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
    return float(iou) if iou.ndim == 0 else iou


def pixel_box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two pixel boxes ``(r0, c0, r1, c1)`` (half-open edges, floats allowed).

    The same measure as :func:`box_iou` (IoU does not depend on the unit), so detector agreement and
    detection metrics are computed one way; 0 when both boxes are empty.
    """
    return float(box_iou(normalised_box(*a, 1, 1), normalised_box(*b, 1, 1)))
