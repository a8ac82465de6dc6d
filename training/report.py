"""Table-1-style reports (mean ± SD per structure) and per-slice CSVs from evaluator rows."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import numpy as np

from ParaspinalSegLib.anatomy import BY_VALUE

#: Per-slice CSV columns, in order.
SLICE_COLUMNS = ["fold", "source", "case_id", "subject_id", "structure", "key", "dice", "hd95_mm", "iou", "gt_present", "pred_present", "tp", "fp", "fn"]


def _mean_sd(values: Iterable[float]) -> tuple[float, float, int]:
    v = np.array([x for x in values if x is not None and not math.isnan(x)], dtype=float)
    if v.size == 0:
        return math.nan, math.nan, 0
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0, int(v.size)


def summarise(rows: Sequence[dict[str, Any]]) -> dict[int, dict[str, float]]:
    """Per structure: mean/SD of Dice, IoU, HD95; pooled detection precision/recall; counts."""
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


def mean_dice(rows: Sequence[dict[str, Any]]) -> float:
    """Mean over structures of the per-structure mean Dice (the headline number)."""
    s = summarise(rows)
    vals = [d["dice"] for d in s.values() if not math.isnan(d["dice"])]
    return float(np.mean(vals)) if vals else math.nan


def _fmt(m: float, sd: float, scale: float = 1.0, digits: int = 1) -> str:
    if math.isnan(m):
        return "–"
    return f"{m * scale:.{digits}f} ± {sd * scale:.{digits}f}"


def markdown_table(rows: Sequence[dict[str, Any]], title: Optional[str] = None) -> str:
    """Table 1 of the paper for one model: metrics as rows, structures as columns (+ mean)."""
    s = summarise(rows)
    values = list(s)
    head = ["metric"] + [BY_VALUE[v].name for v in values] + ["mean"]
    lines = [f"**{title}**", ""] if title else []
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def row(label: str, key: str, scale: float, digits: int) -> str:
        cells = [_fmt(s[v][key], s[v][key + "_sd"], scale, digits) for v in values]
        means = [s[v][key] for v in values if not math.isnan(s[v][key])]
        mean = f"{np.mean(means) * scale:.{digits}f}" if means else "–"
        return "| " + " | ".join([label] + cells + [mean]) + " |"

    lines.append(row("Dice (%)", "dice", 100, 1))
    lines.append(row("detection IoU (%)", "iou", 100, 1))
    lines.append(row("HD95 (mm)", "hd95_mm", 1, 2))
    for key, label in (("precision", "detection precision (%)"), ("recall", "detection recall (%)")):
        cells = ["–" if math.isnan(s[v][key]) else f"{100 * s[v][key]:.1f}" for v in values]
        vals = [s[v][key] for v in values if not math.isnan(s[v][key])]
        lines.append("| " + " | ".join([label] + cells + [f"{100 * np.mean(vals):.1f}" if vals else "–"]) + " |")
    lines.append("| slices | " + " | ".join(str(s[v]["slices"]) for v in values) + " | |")
    return "\n".join(lines) + "\n"


def summary_csv_rows(rows: Sequence[dict[str, Any]], fold: str = "pooled") -> list[dict[str, Any]]:
    """Flat summary rows (one per structure) for a CSV."""
    return [{"fold": fold, "structure": v, "key": BY_VALUE[v].key, **d} for v, d in summarise(rows).items()]


def write_report(rows: Sequence[dict[str, Any]], out_dir: str | Path, title: str = "evaluation") -> dict[str, Path]:
    """Write ``per_slice.csv``, ``summary.csv`` (pooled + per fold) and ``report.md``; return their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"per_slice": out / "per_slice.csv", "summary": out / "summary.csv", "report": out / "report.md"}
    with open(paths["per_slice"], "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=SLICE_COLUMNS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({**r, "key": BY_VALUE[int(r["structure"])].key, "fold": r.get("fold", "")})
    folds = sorted({str(r.get("fold", "")) for r in rows if str(r.get("fold", "")) != ""})
    summary = summary_csv_rows(rows)
    for fold in folds:
        summary += summary_csv_rows([r for r in rows if str(r.get("fold")) == fold], fold=f"fold {fold}")
    with open(paths["summary"], "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(summary[0]) if summary else ["fold"])
        w.writeheader()
        w.writerows(summary)
    md = [f"# {title}", "", f"Mean Dice over structures (pooled): **{100 * mean_dice(rows):.1f} %**", ""]
    md.append(markdown_table(rows, "pooled over all slices" + (f" ({len(folds)} fold{'s' if len(folds) != 1 else ''})" if folds else "")))
    for fold in folds:
        sub = [r for r in rows if str(r.get("fold")) == fold]
        md += ["", markdown_table(sub, f"fold {fold}: mean Dice {100 * mean_dice(sub):.1f} %")]
    md += ["", "Mean ± SD over slices. Dice and HD95 only over structures the slice's source annotates "
           "(255 ground-truth pixels count as 'not this structure'); detection: true positive when the "
           "structure is present and the detector box has IoU ≥ 0.5 with the ground-truth box."]
    paths["report"].write_text("\n".join(md) + "\n", encoding="utf-8")
    return paths
