"""Box helpers on shapes with known answers (numpy only)."""

from __future__ import annotations

import numpy as np
import pytest

from ParaspinalSegLib.boxes import (
    box_from_mask,
    box_iou,
    boxes_from_labels,
    denormalise_box,
    normalised_box,
    rasterise_boxes,
)


def test_box_from_mask_half_open_bounds_and_empty():
    mask = np.zeros((20, 30), bool)
    mask[3:9, 5:17] = True
    mask[10, 2] = True  # outlier extends the box
    assert box_from_mask(mask) == (3, 2, 11, 17)
    assert box_from_mask(np.zeros((4, 4), bool)) is None
    with pytest.raises(ValueError):
        box_from_mask(np.zeros((2, 2, 2)))


def test_normalised_box_follows_contract_and_inverts():
    # A mask filling columns c0..c1-1 has cx = (c0 + c1) / 2 / W and w = (c1 - c0) / W.
    cx, cy, w, h = normalised_box(4, 10, 12, 30, H=40, W=50)
    assert (cx, cy, w, h) == pytest.approx((20 / 50, 8 / 40, 20 / 50, 8 / 40))
    assert denormalise_box(cx, cy, w, h, 40, 50) == pytest.approx((4, 10, 12, 30))


def test_mask_box_raster_round_trip_iou_one():
    H, W = 37, 53  # odd sizes: normalised coordinates are not exact binary fractions
    rng = np.random.default_rng(3)
    for _ in range(20):
        r0, r1 = sorted(rng.choice(H + 1, 2, replace=False))
        c0, c1 = sorted(rng.choice(W + 1, 2, replace=False))
        mask = np.zeros((H, W), bool)
        mask[r0:r1, c0:c1] = True
        box = normalised_box(*box_from_mask(mask), H, W)
        raster = rasterise_boxes(np.array([box]), H, W)
        assert raster.shape == (1, H, W) and raster.dtype == bool
        assert np.array_equal(raster[0], mask)
        assert box_iou(box, box) == pytest.approx(1.0)
        assert box_iou(box, normalised_box(*box_from_mask(raster[0]), H, W)) == pytest.approx(1.0)


def test_rasterise_uses_pixel_centres():
    # Box covering columns [1.4, 3.6) pixels: centres 1.5, 2.5, 3.5 are inside; 0.5, 4.5 are not.
    box = np.array([(1.4 + 3.6) / 2 / 10, 0.5, 2.2 / 10, 1.0])
    raster = rasterise_boxes(box, 1, 10)[0, 0]
    assert raster.tolist() == [False, True, True, True] + [False] * 6


def test_shifted_box_known_iou():
    a = normalised_box(0, 0, 10, 10, 100, 100)
    b = normalised_box(0, 5, 10, 15, 100, 100)  # shifted by half its width: overlap 50, union 150
    assert box_iou(a, b) == pytest.approx(1 / 3)
    c = normalised_box(20, 20, 30, 30, 100, 100)
    assert box_iou(a, c) == 0.0
    # Broadcast over arrays.
    ious = box_iou(np.array([a, a, a]), np.array([a, b, c]))
    assert ious.shape == (3,) and ious == pytest.approx([1.0, 1 / 3, 0.0])
    assert box_iou([0.5, 0.5, 0, 0], [0.5, 0.5, 0, 0]) == 0.0  # empty boxes: no division by zero


def test_boxes_from_labels_rows_and_presence():
    lab = np.zeros((32, 40), np.uint8)
    lab[2:6, 3:9] = 1
    lab[10:20, 30:35] = 9
    lab[0, 0] = 255  # not annotated: ignored
    boxes, present = boxes_from_labels(lab)
    assert boxes.shape == (9, 4) and boxes.dtype == np.float32
    assert present.tolist() == [True] + [False] * 7 + [True]
    assert boxes[0] == pytest.approx(normalised_box(2, 3, 6, 9, 32, 40))
    assert boxes[8] == pytest.approx(normalised_box(10, 30, 20, 35, 32, 40))
    assert np.all(boxes[1:8] == 0)
    raster = rasterise_boxes(boxes[present], 32, 40)
    assert np.array_equal(raster[0], lab == 1) and np.array_equal(raster[1], lab == 9)
