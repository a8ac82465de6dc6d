"""Paired comparison of two cross-validations: known differences come out, identical runs tie."""

import csv

import numpy as np
import pytest

from training.compare import compare, main, read_per_slice
from training.report import SLICE_COLUMNS


def _write(path, dice_by_case):
    path.mkdir(parents=True, exist_ok=True)
    with open(path / "per_slice.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, SLICE_COLUMNS)
        w.writeheader()
        for (case, structure), d in dice_by_case.items():
            w.writerow({"fold": 0, "source": "s", "case_id": case, "subject_id": case, "structure": structure, "key": "k",
                        "dice": d, "hd95_mm": 1.0, "iou": 0.5, "gt_present": True, "pred_present": True, "tp": 1, "fp": 0, "fn": 0})
    return path


def _dice(rng, n=40, structures=(1, 6, 7), base=0.85):
    return {(f"C{i:02d}", s): float(np.clip(base + rng.normal(0, 0.04), 0, 1)) for i in range(n) for s in structures}


def test_identical_runs_tie():
    a = _dice(np.random.default_rng(0))
    r = compare(a, dict(a), n_boot=200)
    assert r["difference"] == 0.0 and r["ci95"] == (0.0, 0.0)
    assert all(d["p_wilcoxon"] == 1.0 and d["wins_a"] == d["wins_b"] == 0 for d in r["structures"].values())


def test_known_improvement_on_one_structure(tmp_path):
    rng = np.random.default_rng(1)
    b = _dice(rng)
    # A is B plus 3 points on multifidus (6) only, with a little noise.
    a = {k: min(1.0, v + (0.03 + rng.normal(0, 0.005) if k[1] == 6 else 0.0)) for k, v in b.items()}
    r = compare(a, b, n_boot=500)
    six = r["structures"][6]
    assert six["difference"] == pytest.approx(np.mean([a[k] - b[k] for k in a if k[1] == 6]))
    assert 0.0 < six["ci95"][0] < six["difference"] < six["ci95"][1]
    assert six["p_wilcoxon"] < 1e-6 and six["wins_a"] > 35
    assert r["structures"][1]["difference"] == 0.0
    # Headline: the mean over three structures moves by a third of the multifidus gain.
    assert r["difference"] == pytest.approx(six["difference"] / 3)
    assert r["ci95"][0] > 0

    out = tmp_path / "cmp.md"
    main([str(_write(tmp_path / "cv_a", a)), str(_write(tmp_path / "cv_b", b)), "--out", str(out), "--boot", "100"])
    text = out.read_text()
    assert "left multifidus" in text and "cv_a" in text and "difference +1.0 points" in text


def test_only_shared_pairs_count_and_disjoint_runs_refuse(tmp_path):
    rng = np.random.default_rng(2)
    a, b = _dice(rng, n=10), _dice(rng, n=10)
    b = {k: v for k, v in b.items() if k[0] != "C00"}
    assert compare(a, b, n_boot=50)["slices"] == 9
    with pytest.raises(ValueError, match="share no"):
        compare({("X", 1): 0.9}, {("Y", 1): 0.9})
    assert read_per_slice(_write(tmp_path / "cv", {("C", 1): 0.5})) == {("C", 1): 0.5}
    with pytest.raises(FileNotFoundError):
        read_per_slice(tmp_path / "missing")


def test_compare_refuses_cvs_on_different_splits(tmp_path):
    from training.compare import check_same_splits
    from training.splits import SPLITS_FILE, write_splits

    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    write_splits(a / SPLITS_FILE, [{"train": ["x"], "val": ["y", "z"]}, {"train": ["y", "z"], "val": ["x"]}])
    write_splits(b / SPLITS_FILE, [{"train": ["x"], "val": ["z", "y"]}, {"train": ["y", "z"], "val": ["x"]}])
    check_same_splits(a, b)  # same folds (order within a fold does not matter)
    write_splits(b / SPLITS_FILE, [{"train": ["y"], "val": ["x", "z"]}, {"train": ["x", "z"], "val": ["y"]}])
    with pytest.raises(ValueError, match="different fold splits"):
        check_same_splits(a, b)
