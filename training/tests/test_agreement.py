"""Inter-model agreement of two cross-validations: the right fold's model scores the right slices."""

import csv

import pytest

from training.agreement import cv_agreement, markdown, summarise_agreement
from training.cv import cross_validate
from training.tests.synthetic import synthetic_slice, tiny_config


@pytest.fixture(scope="module")
def two_cvs(tmp_path_factory):
    root = tmp_path_factory.mktemp("agree")
    recs = [synthetic_slice(64, seed=i) for i in range(4)]
    cross_validate(tiny_config(epochs=1, network={"preset": "unet"}), recs, root / "unet", k=2, progress=False)
    cross_validate(tiny_config(epochs=2), recs, root / "bsesnet", k=2, progress=False)
    return root, recs


def _per_slice(folder):
    with open(folder / "per_slice.csv", newline="") as f:
        return {(r["case_id"], int(r["structure"])): float(r["dice"]) for r in csv.DictReader(f) if r["dice"] not in ("", "nan")}


def test_a_model_agrees_with_itself_and_matches_its_cv_scores(two_cvs):
    root, recs = two_cvs
    rows = cv_agreement(root / "unet", root / "unet", recs)
    assert {r["case_id"] for r in rows} == {r.case_id for r in recs}
    scored = [r for r in rows if r["a_vs_b"] == r["a_vs_b"]]  # NaN: the model predicted the structure nowhere
    assert scored and all(r["a_vs_b"] == 1.0 for r in scored)
    # Each slice was segmented by the fold model that held it out: the CV's own per-slice Dice comes back.
    cv = _per_slice(root / "unet")
    matched = [r for r in rows if (r["case_id"], r["structure"]) in cv]
    assert len(matched) >= len(recs)
    for r in matched:
        assert r["a_vs_labels"] == pytest.approx(cv[(r["case_id"], r["structure"])])


def test_two_different_models(two_cvs):
    root, recs = two_cvs
    rows = cv_agreement(root / "bsesnet", root / "unet", recs)
    a, b = _per_slice(root / "bsesnet"), _per_slice(root / "unet")
    matched = [r for r in rows if (r["case_id"], r["structure"]) in a.keys() & b.keys()]
    assert len(matched) >= len(recs)
    for r in matched:
        key = (r["case_id"], r["structure"])
        assert r["a_vs_labels"] == pytest.approx(a[key]) and r["b_vs_labels"] == pytest.approx(b[key])
    summary = summarise_agreement(rows)
    assert set(summary) == {1, 4, 5, 6, 7, 8, 9} and all(s["slices"] == 4 for s in summary.values())
    table = markdown(summary, "bsesnet", "unet")
    assert "| intervertebral disc |" in table and "bsesnet vs unet" in table and "**mean**" in table


def test_different_folds_are_refused(two_cvs, tmp_path):
    root, recs = two_cvs
    other = [synthetic_slice(64, seed=i) for i in range(4, 8)]
    cross_validate(tiny_config(epochs=1, network={"preset": "unet"}), other, tmp_path / "other", k=2, progress=False)
    with pytest.raises(ValueError, match="same folds"):
        cv_agreement(root / "unet", tmp_path / "other", recs + other)
    with pytest.raises(FileNotFoundError, match="training.cv first"):
        cv_agreement(root / "unet", tmp_path, recs)
