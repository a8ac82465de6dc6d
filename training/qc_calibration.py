"""Calibrate and audit the quality-control checks: held-out predictions and deliberately broken inputs.

``python -m training.qc_calibration --cv CV_DIR --data DIR [DIR ...] --out OUT [--every N] [--weights W.json]``

* ``--cv CV_DIR`` (a ``training.cv`` folder, finished or not): the folds of its ``splits_final.json``
  whose ``fold_K/final.json`` exists are used — fold K's final weights segment fold K's held-out slices,
  exactly as the shipped segmenter runs (the weights' training record must not contain any of them, or
  the tool stops). Unfinished folds are skipped and the summary names the folds used, so the calibration
  can be re-run as folds finish. ``--data`` must be the data the CV was split on (the scored source only;
  a ``--train-also`` source is never scored). This is what thresholds are chosen on, never training
  predictions.
* The broken inputs — every ``--every``-th slice rotated 90° or flipped anterior-posterior *in the header
  only* (pixels untouched, so the header lies), contrast inverted, heavy noise, and non-lumbar or
  empty-looking crops — segmented by the fold's own weights (``--weights W`` instead: by ``W``); every one
  should be flagged.
* Without ``--cv``, ``--weights W`` segments the dev slices; if ``W`` was trained on them those are training
  predictions, and the report says so (optimistic, not a calibration).

Good and bad slices are told apart by the mean Dice over the slice's MANUALLY labelled structures; labels a
tool derived (``derived_classes`` in the manifest, e.g. canal and lamina of the derived sy source) are scored
and reported separately (``derived_dice``): they are a reference of their own uncertainty, and a slice must
not count as badly segmented because the derivation, not the network, was off.

Segmentations are cached per weights file and input in ``OUT/cache`` (a re-run after another fold finished
segments only that fold). Writes ``OUT/qc_slices.csv`` (one row per slice and input kind: Dice, checks,
flags) and ``OUT/qc_summary.md``.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import sys
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np

from ParaspinalSegLib import qc
from ParaspinalSegLib.errors import InputError

from .data import SliceRecord, load_sources
from .metrics import dice
from .splits import fold_indices, read_splits

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


def scored_structures(r: SliceRecord, learned: Sequence[int]) -> tuple[list[int], list[int]]:
    """``(manual, derived)``: the slice's trusted structures the model learned, split by who labelled them."""
    derived = set(r.derived)
    trusted = [v for v in r.trusted_structures if v in learned]
    return [v for v in trusted if v not in derived], [v for v in trusted if v in derived]


def structure_dice(pred: np.ndarray, r: SliceRecord, structures: Sequence[int]) -> dict[int, float]:
    """Dice per structure, as the cross-validation scores it; a structure absent from both is left out.

    ``structures`` are ones the slice's source annotates, so a 255 pixel is "not this structure" (the data
    README's guarantee, :mod:`training.metrics`): a prediction painted into the not-annotated band is a
    false positive here too, and the good / bad split agrees with the CV's per-slice Dice.
    """
    scores = {int(v): dice(pred == v, r.labels == v) for v in structures}
    return {v: s for v, s in scores.items() if np.isfinite(s)}


def slice_dice(pred: np.ndarray, r: SliceRecord, learned: Sequence[int]) -> Optional[float]:
    """Mean Dice over the slice's manually labelled structures that the model learned (:func:`structure_dice`)."""
    scores = structure_dice(pred, r, scored_structures(r, learned)[0])
    return float(np.mean(list(scores.values()))) if scores else None


@dataclass
class Segmentation:
    """What the checks need of one :class:`~ParaspinalSegLib.segmenter.SliceResult` (cached as ``.npz``), or
    the message of an input the segmenter refused."""

    labels: np.ndarray
    raw_labels: Optional[np.ndarray] = None
    max_probability: Optional[np.ndarray] = None
    confidence: dict[int, float] = field(default_factory=dict)
    box_agreement: dict[int, float] = field(default_factory=dict)
    structures_learned: list[int] = field(default_factory=list)
    refused: str = ""

    @classmethod
    def of(cls, res: Any) -> "Segmentation":
        return cls(res.labels, res.raw_labels, res.max_probability, dict(res.confidence), dict(res.box_agreement),
                   list(res.structures_learned))

    def save(self, path: Path) -> None:
        meta = {"confidence": self.confidence, "box_agreement": self.box_agreement,
                "structures_learned": self.structures_learned, "refused": self.refused}
        arrays = {"labels": self.labels}
        if self.raw_labels is not None:
            arrays["raw_labels"] = self.raw_labels
        if self.max_probability is not None:  # float16: the checks compare it with 0.5 and average it
            arrays["max_probability"] = np.asarray(self.max_probability, np.float16)
        tmp = path.with_name(path.stem + ".tmp.npz")
        np.savez_compressed(tmp, meta=np.array(json.dumps(meta)), **arrays)
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> "Segmentation":
        with np.load(path) as z:
            meta = json.loads(str(z["meta"]))
            mp = z["max_probability"].astype(np.float32) if "max_probability" in z else None
            return cls(z["labels"], z["raw_labels"] if "raw_labels" in z else None, mp,
                       {int(k): v for k, v in meta["confidence"].items()},
                       {int(k): v for k, v in meta["box_agreement"].items()}, meta["structures_learned"], meta["refused"])

    def report(self, image: np.ndarray, m: np.ndarray, thresholds: qc.QCThresholds = qc.QCThresholds()) -> qc.QCReport:
        """The QC report of this segmentation of ``image``."""
        if self.refused:
            return qc.QCReport([qc.QCFlag(None, "refused", self.refused)])
        return qc.check_result(self, image, m, thresholds)


def weights_sha256(weights: Path) -> str:
    """The SHA-256 of the tensors a weights ``.json`` names (identifies the model in the cache)."""
    return str(json.loads(Path(weights).read_text(encoding="utf-8"))["weights_sha256"])


class CachedSegmenter:
    """Segments inputs with one weights file, keeping each result in ``cache_dir/<sha>/`` (None: no cache).
    The network is loaded on the first input not in the cache."""

    def __init__(self, weights: Path, cache_dir: Optional[Path], load: Callable[[Path], Any]) -> None:
        self.weights, self._load, self._segmenter = Path(weights), load, None
        self.dir = None if cache_dir is None else Path(cache_dir) / weights_sha256(weights)[:16]

    def segment(self, name: str, image: np.ndarray, m: np.ndarray) -> Segmentation:
        path = None if self.dir is None else self.dir / (re.sub(r"[^A-Za-z0-9_.-]+", "_", name) + ".npz")
        if path is not None and path.is_file():
            return Segmentation.load(path)
        if self._segmenter is None:
            self._segmenter = self._load(self.weights)
        try:
            seg = Segmentation.of(self._segmenter.segment(image, m))
        except InputError as exc:  # refused before segmenting: that is a flag too, with its message
            seg = Segmentation(np.zeros(np.shape(image), np.uint8), refused=str(exc))
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            seg.save(path)
        return seg


def _row(kind: str, fold: Any, r: SliceRecord, seg: Segmentation, report: qc.QCReport, scored: bool) -> dict[str, Any]:
    manual, derived = scored_structures(r, seg.structures_learned) if scored else ([], [])
    d_manual, d_derived = structure_dice(seg.labels, r, manual), structure_dice(seg.labels, r, derived)

    def mean(d: dict[int, float]) -> Any:
        return round(float(np.mean(list(d.values()))), 4) if d else ""

    return {"kind": kind, "fold": fold, "case_id": r.case_id, "mean_dice": mean(d_manual), "derived_dice": mean(d_derived),
            "dice": " ".join(f"{v}={s:.3f}" for v, s in sorted({**d_manual, **d_derived}.items())),
            "flagged": int(not report.ok), "checks": ";".join(sorted({f.check for f in report.flags})),
            "flags": " | ".join(f"{f.value}:{f.check}:{f.reason}" for f in report.flags)}


def scored_rows(seg: CachedSegmenter, records: Sequence[SliceRecord], kind: str, fold: Any,
                thresholds: qc.QCThresholds = qc.QCThresholds()) -> list[dict[str, Any]]:
    """One row per slice as given: its QC and its Dice against the labels."""
    rows = []
    for r in records:
        s = seg.segment(f"{r.case_id}__{kind}", r.image, r.slice_ijk_to_ras)
        rows.append(_row(kind, fold, r, s, s.report(r.image, r.slice_ijk_to_ras, thresholds), scored=True))
    return rows


def broken_rows(seg: CachedSegmenter, records: Sequence[SliceRecord], fold: Any,
                thresholds: qc.QCThresholds = qc.QCThresholds()) -> list[dict[str, Any]]:
    """One row per broken version (:func:`broken_inputs`) of each slice: its QC (no Dice)."""
    rows = []
    for r in records:
        for kind, image, m in broken_inputs(r, seed=zlib.crc32(r.case_id.encode())):
            s = seg.segment(f"{r.case_id}__{kind}", image, m)
            rows.append(_row(kind, fold, r, s, s.report(image, m, thresholds), scored=False))
    return rows


@dataclass
class HeldOut:
    """Held-out rows of the finished folds of a cross-validation and which folds they are."""

    rows: list[dict[str, Any]]
    folds_used: list[int]
    k: int

    @property
    def scope(self) -> str:
        def folds(fs: Sequence[int]) -> str:
            return ("fold " if len(fs) == 1 else "folds ") + ", ".join(map(str, fs))

        missing = [f for f in range(self.k) if f not in self.folds_used]
        return f"{folds(self.folds_used)} of {self.k}" + (f" ({folds(missing)} not finished)" if missing else " (all)")


def check_never_trained_on(weights: Path, held: Sequence[str]) -> None:
    """Refuse weights whose training record lists any of the ``held`` case ids among its training slices."""
    training = json.loads(Path(weights).read_text(encoding="utf-8")).get("training", {})
    trained = set(training.get("train_cases", []))
    if not trained:
        raise ValueError(f"{weights}: no training record (train_cases): cannot show its held-out slices are held out")
    leak = sorted(trained & set(held))
    if leak:
        raise ValueError(f"{weights} was trained on {len(leak)} of the fold's held-out slices ({leak[:3]}): "
                         "not this fold's weights, or not this split")


def held_out_rows(cv_dir: Path, records: Sequence[SliceRecord], segmenter_for: Callable[[Path], CachedSegmenter],
                  every: int = 0, broken_segmenter: Optional[CachedSegmenter] = None,
                  thresholds: qc.QCThresholds = qc.QCThresholds()) -> HeldOut:
    """Every finished fold's final weights on that fold's held-out slices (the CV's own ``splits_final.json``),
    with the broken versions of every ``every``-th of them (segmented by ``broken_segmenter`` if given)."""
    folds = fold_indices(records, read_splits(cv_dir))
    rows, used = [], []
    for fold, idx in enumerate(folds):
        weights = Path(cv_dir) / f"fold_{fold}" / "final.json"
        if not weights.is_file():
            continue
        held = [records[i] for i in idx]
        check_never_trained_on(weights, [r.case_id for r in held])
        seg = segmenter_for(weights)
        rows += scored_rows(seg, held, "held-out", fold, thresholds)
        if every:
            rows += broken_rows(broken_segmenter or seg, held[::every], fold, thresholds)
        used.append(fold)
    if not used:
        raise FileNotFoundError(f"{cv_dir}: no fold has finished (no fold_K/final.json): nothing held out to score yet")
    return HeldOut(rows, used, len(folds))


def _pct(n: int, total: int) -> str:
    return f"{100 * n / total:.1f} %" if total else "–"


CHECKS = ("box", "layout", "shape", "confidence", "image", "refused")


def _checks_of(row: dict[str, Any]) -> set[str]:
    return {f.split(":", 2)[1] for f in filter(None, row["flags"].split(" | "))}


def check_table(rows: Sequence[dict[str, Any]], good_kind: str) -> list[str]:
    """Markdown table: per group of slices (good / middling / bad held-out, each broken input) how many of
    them each check flagged — what it caught and how often it fires on good slices."""
    scored = [r for r in rows if r["kind"] == good_kind and r["mean_dice"] != ""]
    groups = [(f"{good_kind}, mean Dice ≥ {GOOD_DICE}", [r for r in scored if r["mean_dice"] >= GOOD_DICE]),
              (f"{good_kind}, {BAD_DICE} ≤ mean Dice < {GOOD_DICE}", [r for r in scored if BAD_DICE <= r["mean_dice"] < GOOD_DICE]),
              (f"{good_kind}, mean Dice < {BAD_DICE}", [r for r in scored if r["mean_dice"] < BAD_DICE])]
    groups += [(kind, [r for r in rows if r["kind"] == kind])
               for kind in dict.fromkeys(r["kind"] for r in rows if r["kind"] not in ("held-out", "dev"))]
    out = ["| slices | n | flagged | " + " | ".join(CHECKS) + " |", "| --- | --- | --- |" + " --- |" * len(CHECKS)]
    for name, rs in groups:
        fired = Counter(c for r in rs for c in _checks_of(r))
        out.append(f"| {name} | {len(rs)} | {sum(r['flagged'] for r in rs)} | " + " | ".join(str(fired[c]) for c in CHECKS) + " |")
    return out


def summarise(rows: Sequence[dict[str, Any]], good_kind: str, scope: str = "") -> str:
    """Markdown: the acceptance figures, per check how often it fired on good slices, the bad slices it
    missed, the derived structures' Dice, and the broken inputs."""
    good = [r for r in rows if r["kind"] == good_kind and r["mean_dice"] != ""]
    bad = [r for r in good if r["mean_dice"] < BAD_DICE]
    fine = [r for r in good if r["mean_dice"] >= GOOD_DICE]
    n_fine = sum(r["flagged"] for r in fine)
    lines = [f"Good slices ({good_kind}{', ' + scope if scope else ''}): {len(good)}; flagged "
             f"{sum(r['flagged'] for r in good)}. Bad/good by the mean Dice over manually labelled structures.", ""]
    lines.append(f"- mean Dice < {BAD_DICE}: {len(bad)} slices, {sum(r['flagged'] for r in bad)} flagged (all must be)")
    lines.append(f"- mean Dice ≥ {GOOD_DICE}: {len(fine)} slices, {_pct(n_fine, len(fine))} flagged "
                 f"(at most {100 * MAX_GOOD_FLAGGED:.0f} %)")
    derived = [r for r in good if r.get("derived_dice", "") != ""]
    if derived:
        dd = [r["derived_dice"] for r in derived]
        low = [r for r in derived if r["derived_dice"] < BAD_DICE]
        lines.append(f"- derived structures (scored apart): {len(derived)} slices, mean Dice {np.mean(dd):.3f}; "
                     f"{len(low)} below {BAD_DICE}, {sum(r['flagged'] for r in low)} of them flagged")
    reasons = Counter()
    for r in fine:
        flags = [f.split(":", 2) for f in filter(None, r["flags"].split(" | "))]
        reasons.update({f"{c}: {why.split('(')[0].strip()}" for _, c, why in flags})
    if reasons:
        lines += ["", f"| reason on a good slice (of {len(fine)}) | slices |", "| --- | --- |"]
        lines += [f"| {why} | {n} |" for why, n in reasons.most_common()]
    missed = [r for r in bad if not r["flagged"]]
    if missed:
        lines += ["", "Bad slices NOT flagged:"] + [f"- {r['case_id']} (fold {r['fold']}): mean Dice {r['mean_dice']}, {r['dice']}" for r in missed]
    flagged = sorted((r for r in good if r["flagged"]), key=lambda r: r["mean_dice"])
    if flagged:
        lines += ["", f"Flagged {good_kind} slices:"]
        lines += [f"- {r['case_id']} (fold {r['fold']}, mean Dice {r['mean_dice']}; {r['dice']}): {r['flags']}" for r in flagged]
    lines += ["", "Slices each check flagged:", "", *check_table(rows, good_kind)]
    return "\n".join(lines) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.qc_calibration", description=__doc__.split("\n\n")[0])
    p.add_argument("--cv", type=Path, help="a training.cv folder (finished or not): held-out predictions of its finished folds")
    p.add_argument("--data", nargs="+", required=True, help="the data the CV was split on (without --cv: dev source folders)")
    p.add_argument("--weights", type=Path, help="weights for the broken inputs (default with --cv: each fold's own); "
                   "without --cv: the weights to audit on the dev slices")
    p.add_argument("--every", type=int, default=1, help="broken versions of every N-th slice (0: none)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--no-cache", action="store_true", help="segment everything again (OUT/cache is not read or written)")
    args = p.parse_args(argv)
    if args.cv is None and args.weights is None:
        p.error("give --cv (held-out calibration) or --weights (audit on the dev slices)")

    from ParaspinalSegLib.segmenter import SliceSegmenter

    def segmenter_for(w: Path) -> CachedSegmenter:
        return CachedSegmenter(w, None if args.no_cache else args.out / "cache", lambda x: SliceSegmenter(x, device="cpu"))

    records = load_sources(args.data)
    fixed = segmenter_for(args.weights) if args.weights is not None else None
    if args.cv is not None:
        try:
            held = held_out_rows(args.cv, records, segmenter_for, args.every, fixed)
        except (FileNotFoundError, ValueError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        rows, good_kind, scope = held.rows, "held-out", held.scope
    else:
        rows = scored_rows(fixed, records, "dev", "") + (broken_rows(fixed, records[:: args.every], "") if args.every else [])
        good_kind, scope = "dev", ""
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "qc_slices.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    text = summarise(rows, good_kind, scope)
    if good_kind == "dev":
        text = ("**Good slices are the weights' own dev slices: training predictions if the weights were trained "
                "on them (optimistic; not a calibration).**\n\n") + text
    (args.out / "qc_summary.md").write_text(text, encoding="utf-8")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
