"""How far apart are two cross-validated models, compared with how far each is from the labels?

``python -m training.agreement runs/cv_bsesnet runs/cv_unet --data ../shared/data/sy_lumbar_muscle [--out F.md]``

Each held-out slice of each fold is segmented (as shipped, via ``SliceSegmenter``) by both folders'
``fold_k/final.json``; per structure the report gives the Dice of model A and of model B against the labels
and the Dice of A against B. When two differently built networks agree with each other far better than
either agrees with the labels, the remaining error is shared: it lies in what the labels say (annotation
convention, label noise, ambiguous borders) or in what the training labels taught both, not in one
architecture's variance, and neither ensembling nor a different network of this size is likely to close it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from ParaspinalSegLib.anatomy import BY_VALUE

from .data import SliceRecord, load_sources
from .metrics import dice
from .splits import SPLITS_FILE, read_splits


def held_out_folds(cv_dir: str | Path) -> list[list[str]]:
    """The held-out case ids of each fold, from a ``training.cv`` folder's ``cv_metrics.json``."""
    if (Path(cv_dir) / SPLITS_FILE).is_file():
        return [list(s["val"]) for s in read_splits(cv_dir)]
    path = Path(cv_dir) / "cv_metrics.json"  # a CV from before splits_final.json
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run python -m training.cv first")
    return [list(f) for f in json.loads(path.read_text(encoding="utf-8"))["folds"]]


def agreement_rows(seg_a: Any, seg_b: Any, records: Sequence[SliceRecord], fold: Any = "") -> list[dict[str, Any]]:
    """Per slice and structure (labelled by the slice's source, learned by both): Dice A–labels, B–labels, A–B."""
    learned = set(seg_a.structures_learned) & set(seg_b.structures_learned)
    rows = []
    for r in records:
        la = seg_a.segment(r.image, r.slice_ijk_to_ras).labels
        lb = seg_b.segment(r.image, r.slice_ijk_to_ras).labels
        for v in r.trusted_structures:
            if v in learned:
                gt = r.labels == v
                rows.append({"fold": fold, "case_id": r.case_id, "structure": v, "a_vs_labels": dice(la == v, gt),
                             "b_vs_labels": dice(lb == v, gt), "a_vs_b": dice(la == v, lb == v)})
    return rows


def cv_agreement(cv_a: str | Path, cv_b: str | Path, records: Sequence[SliceRecord], device: str = "cpu") -> list[dict[str, Any]]:
    """:func:`agreement_rows` over every fold the two CVs ran on the same split (final-epoch weights)."""
    from ParaspinalSegLib.segmenter import SliceSegmenter

    folds = held_out_folds(cv_a)
    if folds != held_out_folds(cv_b):
        raise ValueError(f"{cv_a} and {cv_b} were not run on the same folds")
    by_case = {r.case_id: r for r in records}
    rows: list[dict[str, Any]] = []
    for f, cases in enumerate(folds):
        wa, wb = Path(cv_a) / f"fold_{f}" / "final.json", Path(cv_b) / f"fold_{f}" / "final.json"
        if not (wa.is_file() and wb.is_file()):
            continue  # a fold that one of them did not run (--only-folds)
        missing = [c for c in cases if c not in by_case]
        if missing:
            raise ValueError(f"fold {f}'s held-out slices {missing[:3]} are not in the data given")
        rows += agreement_rows(SliceSegmenter(wa, device=device), SliceSegmenter(wb, device=device),
                               [by_case[c] for c in cases], fold=f)
    if not rows:
        raise ValueError("no fold was run by both cross-validations")
    return rows


def summarise_agreement(rows: Sequence[dict[str, Any]]) -> dict[int, dict[str, float]]:
    """``{structure: {"a_vs_labels", "b_vs_labels", "a_vs_b", "slices"}}``, means over slices (NaN = both empty, skipped)."""
    out: dict[int, dict[str, float]] = {}
    for v in sorted({int(r["structure"]) for r in rows}):
        sel = [r for r in rows if int(r["structure"]) == v]
        out[v] = {k: float(np.nanmean([r[k] for r in sel])) for k in ("a_vs_labels", "b_vs_labels", "a_vs_b")}
        out[v]["slices"] = len(sel)
    return out


def markdown(summary: dict[int, dict[str, float]], name_a: str, name_b: str) -> str:
    """Table: one row per structure plus the mean over structures, Dice in %."""
    lines = [f"| structure | {name_a} vs labels | {name_b} vs labels | {name_a} vs {name_b} | slices |", "|---|---|---|---|---|"]
    for v, s in summary.items():
        lines.append(f"| {BY_VALUE[v].name} | {100 * s['a_vs_labels']:.1f} | {100 * s['b_vs_labels']:.1f} | {100 * s['a_vs_b']:.1f} | {s['slices']} |")
    means = {k: 100 * float(np.mean([s[k] for s in summary.values()])) for k in ("a_vs_labels", "b_vs_labels", "a_vs_b")}
    lines.append(f"| **mean** | {means['a_vs_labels']:.1f} | {means['b_vs_labels']:.1f} | {means['a_vs_b']:.1f} | |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command line entry point (see the module docstring)."""
    ap = argparse.ArgumentParser(prog="python -m training.agreement", description=__doc__.split("\n\n")[0])
    ap.add_argument("cv_a", help="training.cv output folder of model A")
    ap.add_argument("cv_b", help="training.cv output folder of model B (same data and folds)")
    ap.add_argument("--data", nargs="+", required=True, help="the data folders the two CVs were run on")
    ap.add_argument("--out", default=None, help="write the table to this markdown file")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    rows = cv_agreement(args.cv_a, args.cv_b, load_sources(args.data), device=args.device)
    table = markdown(summarise_agreement(rows), Path(args.cv_a).name, Path(args.cv_b).name)
    print(table, end="")
    if args.out:
        Path(args.out).write_text(table, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
