"""Calibrate and audit the quality-control checks: held-out predictions and deliberately broken inputs.

``python -m training.qc_calibration --weights W.json --data DIR [DIR ...] [--cv CV_DIR] --out OUT``

* ``--cv CV_DIR`` (a finished ``training.cv`` run): every fold's final weights segment that fold's held-out
  slices, exactly as the shipped segmenter runs; each slice's mean Dice over its labelled structures is set
  next to whether QC flagged it. This is what thresholds are chosen on — never training predictions.
* ``--weights W``: the broken inputs, made from the dev slices — rotated 90° or flipped anterior-posterior
  *in the header only* (pixels untouched, so the header lies), contrast inverted, heavy noise, and
  non-lumbar or empty-looking crops — segmented by ``W``; every one should be flagged.
* Without ``--cv`` the good-slice figures come from ``W`` on the dev slices; if ``W`` was trained on them
  those are training predictions, and the report says so (optimistic, not a calibration).

Writes ``OUT/qc_slices.csv`` (one row per slice and input kind: Dice, flags) and ``OUT/qc_summary.md``.
"""

from __future__ import annotations

import argparse
import csv
import sys
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np

from ParaspinalSegLib import qc
from ParaspinalSegLib.errors import InputError

from .data import SliceRecord, load_sources, subject_folds
from .metrics import dice

#: Slices whose mean Dice is below this must all be flagged; at most ``MAX_GOOD_FLAGGED`` of those at or
#: above ``GOOD_DICE`` may be.
BAD_DICE, GOOD_DICE, MAX_GOOD_FLAGGED = 0.5, 0.85, 0.10


def _rotate_in_plane(m: np.ndarray, degrees: float) -> np.ndarray:
    """The slice matrix with its two in-plane axes rotated about the slice normal (pixels untouched)."""
    out = m.copy()
    a = np.deg2rad(degrees)
    c0, c1 = m[:3, 0].copy(), m[:3, 1].copy()
    out[:3, 0] = np.cos(a) * c0 + np.sin(a) * c1 * (np.linalg.norm(c0) / np.linalg.norm(c1))
    out[:3, 1] = -np.sin(a) * c0 * (np.linalg.norm(c1) / np.linalg.norm(c0)) + np.cos(a) * c1
    return out


def _flip_anterior_posterior(m: np.ndarray) -> np.ndarray:
    """The slice matrix with the in-plane axis closest to anterior-posterior reversed (pixels untouched)."""
    out = m.copy()
    axis = int(np.argmax(np.abs(m[1, :2])))
    out[:3, axis] = -m[:3, axis]
    return out


def broken_inputs(r: SliceRecord, seed: int = 0) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
    """``(kind, image, slice_ijk_to_ras)`` for each deliberately broken version of one dev slice."""
    a = r.image.astype(np.float64)
    m = r.slice_ijk_to_ras
    rng = np.random.default_rng(seed)
    yield "header rotated 90°", a, _rotate_in_plane(m, 90.0)
    yield "header flipped anterior-posterior", a, _flip_anterior_posterior(m)
    yield "contrast inverted", a.max() - a, m
    yield "heavy noise", a + rng.normal(0.0, 1.0 * a.std(), a.shape), m
    # The anterior quarter of the field of view (abdomen, no spine): kept at the slice's own spacing.
    p = a.shape[0] // 4
    ap = int(np.argmax(np.abs(m[1, :2])))
    crop = a[:p, :] if ap == 0 else a[:, :p]
    yield "non-lumbar crop", crop, m
    # A corner of the field of view: air and a rim of skin, nothing to segment.
    yield "empty-looking crop", a[: a.shape[0] // 6, : a.shape[1] // 6], m


def slice_dice(pred: np.ndarray, r: SliceRecord, learned: Sequence[int]) -> Optional[float]:
    """Mean Dice over the slice's labelled structures that the model learned (255 ignored)."""
    known = r.labels != 255
    scores = [dice(pred[known] == v, r.labels[known] == v) for v in r.trusted_structures if v in learned]
    scores = [s for s in scores if np.isfinite(s)]
    return float(np.mean(scores)) if scores else None


def _row(kind: str, fold: Any, r: SliceRecord, d: Optional[float], report: qc.QCReport) -> dict[str, Any]:
    return {"kind": kind, "fold": fold, "case_id": r.case_id, "mean_dice": "" if d is None else round(d, 4),
            "flagged": int(not report.ok), "flags": " | ".join(f"{f.value}:{f.reason}" for f in report.flags)}


def held_out_rows(cv_dir: Path, records: Sequence[SliceRecord], k: int, segmenter_for: Callable[[Path], Any]) -> list[dict[str, Any]]:
    """Good-slice rows from each fold's final weights on that fold's held-out slices."""
    rows = []
    for fold, idx in enumerate(subject_folds(records, k)):
        weights = cv_dir / f"fold_{fold}" / "final.json"
        if not weights.is_file():
            raise FileNotFoundError(f"{weights} is missing: finish the cross-validation first")
        seg = segmenter_for(weights)
        for i in idx:
            r = records[i]
            res = seg.segment(r.image, r.slice_ijk_to_ras)
            rows.append(_row("held-out", fold, r, slice_dice(res.labels, r, res.structures_learned), qc.check_result(res, r.image, r.slice_ijk_to_ras)))
    return rows


def summarise(rows: Sequence[dict[str, Any]], good_kind: str) -> str:
    """Markdown: the acceptance figures and, per check, how often it fired on good slices."""
    good = [r for r in rows if r["kind"] == good_kind and r["mean_dice"] != ""]
    bad = [r for r in good if r["mean_dice"] < BAD_DICE]
    fine = [r for r in good if r["mean_dice"] >= GOOD_DICE]
    lines = [f"Good slices ({good_kind}): {len(good)}; flagged {sum(r['flagged'] for r in good)}.", ""]
    lines.append(f"- mean Dice < {BAD_DICE}: {len(bad)} slices, {sum(r['flagged'] for r in bad)} flagged "
                 f"(all must be)")
    share = sum(r["flagged"] for r in fine) / len(fine) if fine else 0.0
    lines.append(f"- mean Dice ≥ {GOOD_DICE}: {len(fine)} slices, {100 * share:.1f} % flagged "
                 f"(at most {100 * MAX_GOOD_FLAGGED:.0f} %)")
    reasons = Counter()
    for r in fine:
        for f in filter(None, r["flags"].split(" | ")):
            reasons[f.split(":", 1)[1].split("(")[0].strip()] += 1
    if reasons:
        lines += ["", "| check fired on a good slice | times |", "| --- | --- |"]
        lines += [f"| {reason} | {n} |" for reason, n in reasons.most_common()]
    lines += ["", "| broken input | slices | flagged |", "| --- | --- | --- |"]
    for kind in dict.fromkeys(r["kind"] for r in rows if r["kind"] not in ("held-out", "dev")):
        ks = [r for r in rows if r["kind"] == kind]
        lines.append(f"| {kind} | {len(ks)} | {sum(r['flagged'] for r in ks)} |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.qc_calibration", description=__doc__.split("\n\n")[0])
    p.add_argument("--weights", required=True, help="weights for the broken inputs (and good slices without --cv)")
    p.add_argument("--data", nargs="+", required=True, help="dev source folders")
    p.add_argument("--cv", type=Path, help="finished training.cv folder: held-out predictions")
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--every", type=int, default=1, help="use every N-th dev slice for the broken inputs")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)

    from ParaspinalSegLib.segmenter import SliceSegmenter

    records = load_sources(args.data)
    seg = SliceSegmenter(args.weights, device="cpu")
    if args.cv is not None:
        rows = held_out_rows(args.cv, records, args.folds, lambda w: SliceSegmenter(w, device="cpu"))
        good_kind = "held-out"
    else:
        rows = []
        for r in records:
            res = seg.segment(r.image, r.slice_ijk_to_ras)
            rows.append(_row("dev", "", r, slice_dice(res.labels, r, res.structures_learned), qc.check_result(res, r.image, r.slice_ijk_to_ras)))
        good_kind = "dev"
    for i, r in enumerate(records[:: args.every]):
        for kind, image, m in broken_inputs(r, seed=i):
            try:
                res = seg.segment(image, m)
            except InputError as exc:  # refused before segmenting: caught, with its message
                rows.append(_row(kind, "", r, None, qc.QCReport([qc.QCFlag(None, "refused", str(exc))])))
                continue
            rows.append(_row(kind, "", r, None, qc.check_result(res, image, m)))
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "qc_slices.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    text = summarise(rows, good_kind)
    if good_kind == "dev":
        text = ("**Good slices are the weights' own dev slices: training predictions if the weights were trained "
                "on them (optimistic; not a calibration).**\n\n") + text
    (args.out / "qc_summary.md").write_text(text, encoding="utf-8")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
