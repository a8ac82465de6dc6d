"""QC calibration tool: the broken inputs lie only where they should, Dice per slice, the summary's figures."""

from __future__ import annotations

import numpy as np

from ParaspinalSegLib import qc
from training.qc_calibration import broken_inputs, slice_dice, summarise
from training.tests.synthetic import synthetic_slice


def test_broken_inputs_change_the_header_or_the_pixels_as_named():
    r = synthetic_slice(n=64)
    kinds = {kind: (image, m) for kind, image, m in broken_inputs(r)}
    assert set(kinds) == {"header rotated 90°", "header flipped anterior-posterior", "contrast inverted",
                          "heavy noise", "non-lumbar crop", "empty-looking crop"}
    image, m = kinds["header rotated 90°"]
    assert np.array_equal(image, r.image)  # pixels untouched: only the header lies
    # axis 0 pointed to patient left (−x); rotated 90° in-plane it points along ±y, lengths kept.
    assert abs(m[0, 0]) < 1e-9 and abs(abs(m[1, 0]) - 1.0) < 1e-9
    assert np.allclose(np.linalg.norm(m[:3, :2], axis=0), np.linalg.norm(r.slice_ijk_to_ras[:3, :2], axis=0))
    image, m = kinds["header flipped anterior-posterior"]
    assert np.array_equal(image, r.image) and m[1, 1] == -r.slice_ijk_to_ras[1, 1] and m[0, 0] == r.slice_ijk_to_ras[0, 0]
    image, _ = kinds["contrast inverted"]
    assert np.allclose(image, r.image.max() - r.image)
    # The non-lumbar crop is the anterior quarter (axis 1 is anterior-posterior here): no disc, no muscles.
    image, _ = kinds["non-lumbar crop"]
    assert image.shape == (64, 16)
    assert not np.isin(r.labels[:, :16], (1, 4, 5, 6, 7, 8, 9)).any()


def test_slice_dice_ignores_not_annotated_pixels():
    r = synthetic_slice(n=64)
    assert slice_dice(np.where(r.labels == 255, 0, r.labels), r, range(1, 10)) == 1.0
    pred = np.where(r.labels == 255, 1, r.labels)  # 255 pixels painted as disc: not counted
    assert slice_dice(pred, r, range(1, 10)) == 1.0
    pred = r.labels.copy()
    pred[pred == 6] = 0
    assert abs(slice_dice(pred, r, range(1, 10)) - 6 / 7) < 1e-9


def test_summary_counts_bad_and_good_slices_and_broken_inputs():
    rows = [
        {"kind": "held-out", "mean_dice": 0.3, "flagged": 1, "flags": "6:low confidence (0.4)"},
        {"kind": "held-out", "mean_dice": 0.9, "flagged": 0, "flags": ""},
        {"kind": "held-out", "mean_dice": 0.9, "flagged": 1, "flags": "4:detector box disagrees with mask (IoU 0.1)"},
        {"kind": "contrast inverted", "mean_dice": "", "flagged": 1, "flags": "None:x"},
        {"kind": "contrast inverted", "mean_dice": "", "flagged": 0, "flags": ""},
    ]
    text = summarise(rows, "held-out")
    assert "mean Dice < 0.5: 1 slices, 1 flagged" in text
    assert "mean Dice ≥ 0.85: 2 slices, 50.0 % flagged" in text
    assert "| detector box disagrees with mask | 1 |" in text
    assert "| contrast inverted | 2 | 1 |" in text
