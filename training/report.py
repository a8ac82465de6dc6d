"""Table-1-style reports (mean ± SD per structure) and per-slice CSVs from evaluator rows.

Every row says what its ground truth is (``ground_truth``): ``manual`` (an annotator's outline) or
``derived`` (labels derived by rule and reviewed by eye, ``training.derive_labels``; see
``docs/derived-labels.md``). The headline mean Dice is over manually labelled structures only; structures
scored against derived labels get their own figure and are marked "(derived labels)" wherever they appear.
Rows without the column (``per_slice.csv`` written before it existed) count as manual, so old reports
read the same.

``python -m training.report CV_DIR --data DIR [DIR ...] --out NEW_DIR`` re-writes a report from a
``per_slice.csv``, marking the rows whose labels the data folders' manifests call derived
(``derived_classes``): for a CV scored by code that did not yet write the flag.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import shutil
import sys
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import numpy as np

from ParaspinalSegLib.anatomy import BY_VALUE

#: Per-slice CSV columns, in order.
SLICE_COLUMNS = ["fold", "source", "case_id", "subject_id", "structure", "key", "ground_truth", "dice", "hd95_mm", "iou",
                 "gt_present", "pred_present", "tp", "fp", "fn"]
MANUAL, DERIVED = "manual", "derived"
#: What "derived" means, once per report.
DERIVED_NOTE = ("*Derived labels*: the ground truth of the structures marked \"(derived labels)\" was not outlined by an "
                "annotator but derived by rule from the image and the manual labels (`training/derive_labels.py`) and "
                "reviewed by eye (`docs/derived-labels.md`); their Dice measures agreement with that derivation, not "
                "accuracy against an expert, and is left out of the headline mean.")


def is_derived(row: dict[str, Any]) -> bool:
    """Whether a row's ground truth is derived (rows without ``ground_truth`` are manual)."""
    return str(row.get("ground_truth") or "").strip().lower() == DERIVED


def split_rows(rows: Sequence[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(rows against manual labels, rows against derived labels)."""
    manual = [r for r in rows if not is_derived(r)]
    return manual, [r for r in rows if is_derived(r)]


def _mean_sd(values: Iterable[float]) -> tuple[float, float, int]:
    v = np.array([x for x in values if x is not None and not math.isnan(x)], dtype=float)
    if v.size == 0:
        return math.nan, math.nan, 0
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0, int(v.size)


def summarise(rows: Sequence[dict[str, Any]]) -> dict[int, dict[str, float]]:
    """Per structure: mean/SD of Dice, IoU, HD95; pooled detection precision/recall; counts.

    Over exactly the rows given: split manual from derived rows first (:func:`split_rows`)."""
    out: dict[int, dict[str, float]] = {}
    for v in sorted({int(r["structure"]) for r in rows}):
        rs = [r for r in rows if int(r["structure"]) == v]
        d = {}
        for m in ("dice", "iou", "hd95_mm"):
            d[m], d[m + "_sd"], d[m + "_n"] = _mean_sd(float(r[m]) for r in rs)
        tp, fp, fn = (sum(int(r[k]) for r in rs) for k in ("tp", "fp", "fn"))
        d["precision"] = tp / (tp + fp) if tp + fp else math.nan
        d["recall"] = tp / (tp + fn) if tp + fn else math.nan
        d["slices"] = len(rs)
        out[v] = d
    return out


def _mean_over_structures(rows: Sequence[dict[str, Any]]) -> float:
    vals = [d["dice"] for d in summarise(rows).values() if not math.isnan(d["dice"])]
    return float(np.mean(vals)) if vals else math.nan


def mean_dice(rows: Sequence[dict[str, Any]]) -> float:
    """The headline: mean over the MANUALLY labelled structures of each one's mean Dice (derived rows left out)."""
    return _mean_over_structures(split_rows(rows)[0])


def mean_dice_derived(rows: Sequence[dict[str, Any]]) -> float:
    """Mean over the structures scored against derived labels (NaN when there are none)."""
    return _mean_over_structures(split_rows(rows)[1])


def structures(rows: Sequence[dict[str, Any]]) -> list[int]:
    """Structure values scored in ``rows``, sorted."""
    return sorted({int(r["structure"]) for r in rows})


def structure_names(values: Iterable[int], derived: bool = False) -> list[str]:
    """Names as a report shows them; ``derived`` adds "(derived labels)"."""
    return [BY_VALUE[int(v)].name + (" (derived labels)" if derived else "") for v in values]


def headline(rows: Sequence[dict[str, Any]]) -> str:
    """One line for a terminal: the manual mean Dice and, where present, the derived-label figure."""
    manual, derived = split_rows(rows)
    if not derived:
        return f"mean Dice {100 * mean_dice(rows):.1f} %"
    return (f"mean Dice {100 * mean_dice(rows):.1f} % over the {len(structures(manual))} manually labelled structures; "
            f"{100 * mean_dice_derived(rows):.1f} % over {', '.join(structure_names(structures(derived), True))}")


def _fmt(m: float, sd: float, scale: float = 1.0, digits: int = 1) -> str:
    if math.isnan(m):
        return "–"
    return f"{m * scale:.{digits}f} ± {sd * scale:.{digits}f}"


def markdown_table(rows: Sequence[dict[str, Any]], title: Optional[str] = None) -> str:
    """Table 1 of the paper for one model: metrics as rows, structures as columns (+ mean).

    Structures scored against derived labels follow the manual ones, headed "(derived labels)", with
    their own mean column; the manual mean column is the headline's.
    """
    manual, derived = split_rows(rows)
    groups = [(summarise(manual), False)] + ([(summarise(derived), True)] if derived else [])
    groups = [(s, d) for s, d in groups if s]
    head = ["metric"]
    for s, d in groups:
        head += structure_names(s, d) + ["mean (derived labels)" if d else "mean (manual labels)" if derived else "mean"]
    lines = [f"**{title}**", ""] if title else []
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def row(label: str, cell, mean) -> str:
        cells = [label]
        for s, _ in groups:
            cells += [cell(s[v]) for v in s] + [mean(s)]
        return "| " + " | ".join(cells) + " |"

    for label, key, scale, digits in (("Dice (%)", "dice", 100, 1), ("detection IoU (%)", "iou", 100, 1), ("HD95 (mm)", "hd95_mm", 1, 2)):
        def mean(s, key=key, scale=scale, digits=digits):
            vals = [d[key] for d in s.values() if not math.isnan(d[key])]
            return f"{np.mean(vals) * scale:.{digits}f}" if vals else "–"
        lines.append(row(label, lambda d, key=key, scale=scale, digits=digits: _fmt(d[key], d[key + "_sd"], scale, digits), mean))
    for key, label in (("precision", "detection precision (%)"), ("recall", "detection recall (%)")):
        def mean(s, key=key):
            vals = [d[key] for d in s.values() if not math.isnan(d[key])]
            return f"{100 * np.mean(vals):.1f}" if vals else "–"
        lines.append(row(label, lambda d, key=key: "–" if math.isnan(d[key]) else f"{100 * d[key]:.1f}", mean))
    lines.append(row("slices", lambda d: str(d["slices"]), lambda s: ""))
    return "\n".join(lines) + "\n"


def summary_csv_rows(rows: Sequence[dict[str, Any]], fold: str = "pooled") -> list[dict[str, Any]]:
    """Flat summary rows (one per structure and kind of ground truth) for a CSV."""
    manual, derived = split_rows(rows)
    return [{"fold": fold, "structure": v, "key": BY_VALUE[v].key, "ground_truth": kind, **d}
            for part, kind in ((manual, MANUAL), (derived, DERIVED)) for v, d in summarise(part).items()]


def metrics_from_rows(rows: Sequence[dict[str, Any]], folds: Sequence[Any]) -> dict[str, Any]:
    """The row-derived part of ``cv_metrics.json``: ``mean_dice`` (manual structures, the headline),
    ``per_structure`` and ``per_fold_mean_dice`` (manual), and the same ``*_derived`` figures with the
    ``derived_structures`` they cover (empty / NaN when no label was derived)."""
    manual, derived = split_rows(rows)

    def fold_means(part: Sequence[dict[str, Any]]) -> dict[Any, float]:
        return {f: _mean_over_structures([r for r in part if r["fold"] == f]) for f in folds}

    return {
        "mean_dice": _mean_over_structures(manual),
        "manual_structures": structures(manual),
        "per_structure": {str(v): d for v, d in summarise(manual).items()},
        "per_fold_mean_dice": fold_means(manual),
        "mean_dice_derived": _mean_over_structures(derived),
        "derived_structures": structures(derived),
        "per_structure_derived": {str(v): d for v, d in summarise(derived).items()},
        "per_fold_mean_dice_derived": fold_means(derived) if derived else {},
        "derived_labels": DERIVED_NOTE if derived else "",
    }


def _fold_title(rows: Sequence[dict[str, Any]], fold: str) -> str:
    title = f"fold {fold}: mean Dice {100 * mean_dice(rows):.1f} %"
    if split_rows(rows)[1]:
        title += f" (manual labels); {100 * mean_dice_derived(rows):.1f} % (derived labels)"
    return title


def write_report(rows: Sequence[dict[str, Any]], out_dir: str | Path, title: str = "evaluation") -> dict[str, Path]:
    """Write ``per_slice.csv``, ``summary.csv`` (pooled + per fold) and ``report.md``; return their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"per_slice": out / "per_slice.csv", "summary": out / "summary.csv", "report": out / "report.md"}
    with open(paths["per_slice"], "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=SLICE_COLUMNS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({**r, "key": BY_VALUE[int(r["structure"])].key, "fold": r.get("fold", ""),
                        "ground_truth": DERIVED if is_derived(r) else MANUAL})
    folds = sorted({str(r.get("fold", "")) for r in rows if str(r.get("fold", "")) != ""})
    summary = summary_csv_rows(rows)
    for fold in folds:
        summary += summary_csv_rows([r for r in rows if str(r.get("fold")) == fold], fold=f"fold {fold}")
    with open(paths["summary"], "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(summary[0]) if summary else ["fold"])
        w.writeheader()
        w.writerows(summary)
    manual, derived = split_rows(rows)
    md = [f"# {title}", ""]
    if derived:
        md += [f"Mean Dice over the {len(structures(manual))} manually labelled structures (pooled): **{100 * mean_dice(rows):.1f} %**", "",
               f"Mean Dice over the {len(structures(derived))} structures scored against derived labels "
               f"({', '.join(structure_names(structures(derived)))}; pooled): {100 * mean_dice_derived(rows):.1f} %, "
               "not part of the headline.", "", DERIVED_NOTE, ""]
    else:
        md += [f"Mean Dice over structures (pooled): **{100 * mean_dice(rows):.1f} %**", ""]
    md.append(markdown_table(rows, "pooled over all slices" + (f" ({len(folds)} fold{'s' if len(folds) != 1 else ''})" if folds else "")))
    for fold in folds:
        sub = [r for r in rows if str(r.get("fold")) == fold]
        md += ["", markdown_table(sub, _fold_title(sub, fold))]
    md += ["", "Mean ± SD over slices. Dice and HD95 only over structures the slice's source annotates "
           "(255 ground-truth pixels count as 'not this structure'); detection: true positive when the "
           "structure is present and the detector box has IoU ≥ 0.5 with the ground-truth box."]
    paths["report"].write_text("\n".join(md) + "\n", encoding="utf-8")
    return paths


# ----------------------------------------------------------------------------------------------------
# Reading a per_slice.csv back (re-reporting, comparisons)


def _number(text: Any) -> float:
    return math.nan if text in (None, "", "nan", "NaN") else float(text)


def read_rows(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a ``per_slice.csv`` (or a report folder holding one), typed as the evaluator wrote them.

    A file without ``ground_truth`` (written before the column existed) reads as all manual."""
    p = Path(path)
    if p.is_dir():
        p = p / "per_slice.csv"
    if not p.is_file():
        raise FileNotFoundError(f"{p} not found: run python -m training.cv or training.evaluate first")
    rows = []
    with open(p, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            r: dict[str, Any] = dict(row)
            r["structure"] = int(row["structure"])
            r["fold"] = int(row["fold"]) if str(row.get("fold", "")).isdigit() else row.get("fold", "")
            for m in ("dice", "hd95_mm", "iou"):
                r[m] = _number(row.get(m))
            for k in ("tp", "fp", "fn"):
                r[k] = int(float(row.get(k) or 0))
            r["ground_truth"] = DERIVED if is_derived(row) else MANUAL
            rows.append(r)
    return rows


def mark_derived(rows: Sequence[dict[str, Any]], folders: Sequence[str | Path]) -> list[dict[str, Any]]:
    """``rows`` with ``ground_truth`` set from the data folders' manifests (``derived_classes``).

    Rows are matched by source (the folder's name) and case id (a Dixon in-phase copy, ``<case>_inphase``,
    by its case); rows of other sources keep their flag."""
    from .data import read_manifest_derived

    derived: dict[tuple[str, str], tuple[int, ...]] = {}
    for folder in map(Path, folders):
        for case, d in read_manifest_derived(folder).items():
            derived[(folder.name, case)] = derived[(folder.name, case + "_inphase")] = d
    out = []
    for r in rows:
        key = (str(r["source"]), str(r["case_id"]))
        kind = r.get("ground_truth", MANUAL)
        if key in derived:
            kind = DERIVED if int(r["structure"]) in derived[key] else MANUAL
        out.append({**r, "ground_truth": kind})
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command line: re-write a report (and its ``cv_metrics.json``) with derived labels marked."""
    ap = argparse.ArgumentParser(prog="python -m training.report", description=__doc__.split("\n\n")[-1].replace("``", ""))
    ap.add_argument("report", help="report folder (per_slice.csv, optionally cv_metrics.json) or a per_slice.csv")
    ap.add_argument("--data", nargs="+", default=[], metavar="DIR",
                    help="data folders whose manifest.csv says which labels are derived (derived_classes)")
    ap.add_argument("--out", required=True, help="folder for the new report (may be the report folder itself)")
    ap.add_argument("--title", default=None, help="report title (default: the old report's)")
    args = ap.parse_args(argv)
    src = Path(args.report) if Path(args.report).is_dir() else Path(args.report).parent
    try:
        rows = read_rows(args.report)
        rows = mark_derived(rows, args.data) if args.data else rows
    except (FileNotFoundError, ValueError, KeyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    title = args.title
    old = src / "report.md"
    if title is None and old.is_file():
        first = old.read_text(encoding="utf-8").splitlines()[:1]
        title = first[0].removeprefix("# ") if first and first[0].startswith("# ") else None
    metrics_path = src / "cv_metrics.json"
    metrics = json.loads(metrics_path.read_text(encoding="utf-8")) if metrics_path.is_file() else None
    out = Path(args.out)
    paths = write_report(rows, out, title=title or "evaluation")
    if metrics is not None:
        from ParaspinalSegLib.serialisation import json_ready

        folds = metrics.get("folds_run") or sorted({r["fold"] for r in rows if r["fold"] != ""})
        metrics.update(metrics_from_rows(rows, folds))
        (out / "cv_metrics.json").write_text(json.dumps(json_ready(metrics), indent=1), encoding="utf-8")
    from .splits import SPLITS_FILE

    if (src / SPLITS_FILE).is_file() and not (out / SPLITS_FILE).exists():
        shutil.copyfile(src / SPLITS_FILE, out / SPLITS_FILE)  # so training.compare still checks the folds
    print(f"{headline(rows)}; report: {paths['report']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
