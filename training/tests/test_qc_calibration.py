"""QC calibration tool: the broken inputs lie only where they should, Dice per slice (manual and derived
apart), a partly finished CV scored fold by fold with its own weights, the cache, the summary's figures."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from ParaspinalSegLib import qc
from training.qc_calibration import (CachedSegmenter, Segmentation, broken_inputs, held_out_rows, scored_structures,
                                     slice_dice, structure_dice, summarise)
from training.tests.synthetic import synthetic_slice, tiny_config


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


def test_slice_dice_scores_the_not_annotated_band_as_the_cv_does():
    from training.metrics import score_slice

    r = synthetic_slice(n=64)
    assert slice_dice(np.where(r.labels == 255, 0, r.labels), r, range(1, 10)) == 1.0
    pred = np.where(r.labels == 255, 1, r.labels)  # 255 pixels painted as disc: false positives, as in the CV
    disc = structure_dice(pred, r, [1])[1]
    assert disc < 1.0
    cv = {row["structure"]: row["dice"] for row in score_slice(pred, r.labels, [1], (1.0, 1.0))}
    assert abs(disc - cv[1]) < 1e-12
    pred = r.labels.copy()
    pred[pred == 6] = 0
    assert abs(slice_dice(pred, r, range(1, 10)) - 6 / 7) < 1e-9


def test_derived_structures_are_scored_apart_from_the_manual_ones():
    r = synthetic_slice(n=64)
    r = dataclasses.replace(r, labels=r.labels.copy(), trusted=r.trusted.copy(), derived=(2,))
    r.labels[30:34, 44:48] = 2  # a derived canal
    r.trusted[2] = True
    manual, derived = scored_structures(r, range(1, 10))
    assert derived == [2] and 2 not in manual and manual == [1, 4, 5, 6, 7, 8, 9]
    pred = np.where(r.labels == 2, 0, r.labels)  # the canal missed: only the derived Dice drops
    assert slice_dice(pred, r, range(1, 10)) == 1.0 and structure_dice(pred, r, derived) == {2: 0.0}
    assert scored_structures(r, [1, 4, 5, 6, 7, 8, 9]) == (manual, [])  # a model that never learned the canal


def _row(mean_dice, flags="", kind="held-out", derived=""):
    return {"kind": kind, "fold": 0, "case_id": "c", "mean_dice": mean_dice, "derived_dice": derived, "dice": "",
            "flagged": int(bool(flags)), "flags": flags}


def test_summary_counts_bad_and_good_slices_and_broken_inputs():
    rows = [
        _row(0.3, "6:confidence:low confidence (0.4)", derived=0.2),
        _row(0.45),
        _row(0.9, derived=0.8),
        _row(0.9, "4:box:detector box disagrees with mask (IoU 0.1)"),
        _row("", "None:image:x", kind="contrast inverted"),
        _row("", kind="contrast inverted"),
    ]
    text = summarise(rows, "held-out", "fold 0 of 5 (folds 1, 2, 3, 4 not finished)")
    assert "held-out, fold 0 of 5 (folds 1, 2, 3, 4 not finished)" in text
    assert "mean Dice < 0.5: 2 slices, 1 flagged" in text
    assert "mean Dice ≥ 0.85: 2 slices, 50.0 % flagged" in text
    assert "| box: detector box disagrees with mask | 1 |" in text
    assert "derived structures (scored apart): 2 slices, mean Dice 0.500; 1 below 0.5, 1 of them flagged" in text
    assert "Bad slices NOT flagged:\n- c (fold 0): mean Dice 0.45" in text
    assert "| contrast inverted | 2 | 1 |" in text
    # Per group of slices, how many each check flagged.
    assert "| held-out, mean Dice ≥ 0.85 | 2 | 1 | 1 | 0 | 0 | 0 | 0 | 0 |" in text
    assert "| held-out, mean Dice < 0.5 | 2 | 1 | 0 | 0 | 0 | 1 | 0 | 0 |" in text
    assert "| contrast inverted | 2 | 1 | 0 | 0 | 0 | 0 | 1 | 0 |" in text


def test_segmentation_cache_round_trip(tmp_path):
    labels = np.zeros((8, 8), np.uint8)
    labels[2:5, 2:5] = 1
    seg = Segmentation(labels, labels.copy(), np.full((8, 8), 0.625, np.float32), {1: 0.9}, {1: 0.8}, [1, 4])
    seg.save(tmp_path / "s.npz")
    back = Segmentation.load(tmp_path / "s.npz")
    assert np.array_equal(back.labels, labels) and np.allclose(back.max_probability, 0.625)
    assert back.confidence == {1: 0.9} and back.box_agreement == {1: 0.8} and back.structures_learned == [1, 4]
    refused = Segmentation(labels, refused="not an axial slice")
    refused.save(tmp_path / "r.npz")
    report = Segmentation.load(tmp_path / "r.npz").report(labels.astype(float), np.eye(4))
    assert [f.check for f in report.flags] == ["refused"]


def test_a_partly_finished_cv_is_scored_fold_by_fold_with_each_folds_own_weights(tmp_path):
    from ParaspinalSegLib.segmenter import SliceSegmenter
    from training.cv import cross_validate
    from training.splits import read_splits

    recs = [synthetic_slice(64, seed=i) for i in range(4)]
    cross_validate(tiny_config(epochs=1, network={"preset": "unet"}), recs, tmp_path / "cv", k=2, progress=False, only_folds=[1])
    loaded = []

    def segmenter_for(w: Path) -> CachedSegmenter:
        loaded.append(w)
        return CachedSegmenter(w, tmp_path / "cache", lambda x: SliceSegmenter(x, device="cpu"))

    held = held_out_rows(tmp_path / "cv", recs, segmenter_for, every=1)
    val = set(read_splits(tmp_path / "cv")[1]["val"])
    assert held.folds_used == [1] and held.scope == "fold 1 of 2 (fold 0 not finished)"
    assert loaded == [tmp_path / "cv" / "fold_1" / "final.json"]
    scored = [r for r in held.rows if r["kind"] == "held-out"]
    assert {r["case_id"] for r in scored} == val and all(r["fold"] == 1 for r in held.rows)
    assert all(r["mean_dice"] != "" for r in scored)
    broken = [r for r in held.rows if r["kind"] != "held-out"]
    assert len(broken) == 6 * len(val) and all(r["mean_dice"] == "" for r in broken)
    # Re-run: everything comes from the cache, with the same result.
    cached = list((tmp_path / "cache").rglob("*.npz"))
    assert len(cached) == 7 * len(val)
    assert held_out_rows(tmp_path / "cv", recs, segmenter_for, every=1).rows == held.rows

    # Weights that were trained on a held-out slice are refused, not scored.
    final = tmp_path / "cv" / "fold_1" / "final.json"
    config = json.loads(final.read_text())
    config["training"]["train_cases"].append(sorted(val)[0])
    final.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="trained on 1 of the fold's held-out slices"):
        held_out_rows(tmp_path / "cv", recs, segmenter_for)
    final.unlink()
    with pytest.raises(FileNotFoundError, match="no fold has finished"):
        held_out_rows(tmp_path / "cv", recs, segmenter_for)
