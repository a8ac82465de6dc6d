"""Evaluator metrics on known answers: Dice, HD95 on a known shift, detection counts, report."""

import math

import numpy as np
import pytest

from training.metrics import dice, hd95, score_slice
from training.report import markdown_table, mean_dice, summarise, write_report


def _square(n=40, r0=10, c0=10, size=12):
    m = np.zeros((n, n), bool)
    m[r0 : r0 + size, c0 : c0 + size] = True
    return m


def test_dice_perfect_and_known_imperfect():
    gt = np.zeros((40, 40), np.uint8)
    gt[_square()] = 6
    gt[_square(r0=25, c0=25, size=5)] = 255
    rows = score_slice(gt.copy(), gt, [6, 7], (1.0, 1.0))
    assert rows[0]["dice"] == 1.0 and rows[0]["hd95_mm"] == 0.0 and rows[0]["iou"] == 1.0
    assert math.isnan(rows[1]["dice"])  # absent in both: not scored
    pred = np.zeros_like(gt)
    pred[_square(size=12)] = 6
    pred[10:22, 10:16] = 0  # half of the square: Dice = 2*72/(72+144)
    rows = score_slice(pred, gt, [6], (1.0, 1.0))
    assert abs(rows[0]["dice"] - 2 * 72 / (72 + 144)) < 1e-12
    # predicting the structure on a 255 pixel is a false positive for that (trusted) structure
    pred = gt.copy()
    pred[gt == 255] = 6
    assert abs(score_slice(pred, gt, [6], (1.0, 1.0))[0]["dice"] - 2 * 144 / (144 + 169)) < 1e-12


def test_hd95_matches_medpy_on_curved_shapes():
    """Reference values computed with medpy 0.5.2 (``medpy.metric.binary.hd95``) on these very masks.

    Squares cannot tell the surfaces apart; curved and diagonal edges can: a 3×3-block erosion (the old
    code) gave 2.884 and 1.25 here.
    """
    yy, xx = np.mgrid[:40, :40]
    gt = (yy - 20) ** 2 + (xx - 18) ** 2 <= 36
    pred = ((yy - 21) / 7.0) ** 2 + ((xx - 20) / 5.0) ** 2 <= 1
    assert hd95(pred, gt, (0.8, 1.2)) == pytest.approx(3.364995667241113, abs=1e-9)
    diamond = np.abs(yy[:9, :9] - 4) + np.abs(xx[:9, :9] - 4) <= 3
    square = np.zeros((9, 9), bool)
    square[2:7, 2:7] = True
    assert hd95(diamond, square, (1.0, 2.0)) == pytest.approx(1.65, abs=1e-9)
    assert hd95(diamond, square) == pytest.approx(1.0, abs=1e-9)


def test_hd95_known_shift_in_mm():
    a = _square()
    b = np.roll(a, 3, axis=1)  # shift 3 columns
    assert abs(hd95(a, b, (1.0, 1.0)) - 3.0) < 1e-9
    assert abs(hd95(a, b, (2.0, 0.5)) - 1.5) < 1e-9  # column spacing 0.5 mm
    assert math.isnan(hd95(a, np.zeros_like(a)))
    assert dice(a, b) == 2 * (12 * 9) / 288


def test_detection_counts_and_report(tmp_path):
    gt = np.zeros((40, 40), np.uint8)
    gt[_square()] = 8
    gt[_square(r0=2, c0=25, size=6)] = 9
    pred = np.zeros_like(gt)
    pred[_square()] = 8
    pred[_square(r0=30, c0=2, size=4)] = 4  # spurious structure
    rows = score_slice(pred, gt, [4, 8, 9], (1.0, 1.0), pred_boxes={8: (10, 10, 22, 22)})
    by = {r["structure"]: r for r in rows}
    assert (by[8]["tp"], by[8]["fp"], by[8]["fn"]) == (1, 0, 0)
    assert (by[9]["tp"], by[9]["fn"]) == (0, 1) and by[9]["dice"] == 0.0
    assert (by[4]["fp"], by[4]["dice"]) == (1, 0.0)
    for r in rows:
        r.update(fold=0, source="s", case_id="c", subject_id="x")
    s = summarise(rows)
    assert s[8]["precision"] == 1.0 and s[9]["recall"] == 0.0
    assert abs(mean_dice(rows) - 1 / 3) < 1e-12
    assert "left erector spinae" in markdown_table(rows)
    paths = write_report(rows, tmp_path)
    assert paths["per_slice"].read_text().count("\n") == 4 and "fold 0" in paths["report"].read_text()
