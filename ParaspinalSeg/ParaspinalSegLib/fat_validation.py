"""Validate threshold fat % against a Dixon water–fat reference (``myosegmentum_lpm``).

Run::

    python -m ParaspinalSegLib.fat_validation [--data DIR] [--out DIR]

For every slice: in-phase image = water + fat (fat bright, as on T2); fat % of each labelled muscle (6–9)
with every threshold method of :mod:`measurements`; reference = mean signal fat fraction
mean(fat / (water + fat)) inside the muscle. Agreement (Pearson r, bias = method − reference, 95 % limits of
agreement = bias ± 1.96 SD) per muscle and pooled; Bland–Altman plot as PNG; CSV of every value; a
markdown table. Two reference-side rows show what a *perfect* pixel classifier would report: the fraction of
muscle pixels whose Dixon fat fraction exceeds 50 % (the quantity a threshold estimates), and, in a sweep,
other cuts. numpy + SimpleITK (+ matplotlib for the plot, Pillow fallback).
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from . import anatomy
from .measurements import measure_slice

MUSCLES: tuple[int, ...] = (6, 7, 8, 9)
METHODS: tuple[str, ...] = ("auto", "otsu", "otsu-region", "manual-midpoint")
#: Dixon fat-fraction cut that defines a "fat pixel" for the ideal pixel classifier.
FAT_PIXEL_CUT = 0.5


def repo_root() -> Path:
    """Repository root (this file is ``<root>/ParaspinalSeg/ParaspinalSegLib/fat_validation.py``)."""
    return Path(__file__).resolve().parents[2]


def default_data_dir() -> Path:
    return repo_root().parent / "shared" / "data" / "myosegmentum_lpm"


def in_phase(water: np.ndarray, fat: np.ndarray) -> np.ndarray:
    """In-phase image = water + fat (magnitudes), where fat is bright as on T2."""
    return np.asarray(water, dtype=np.float64) + np.asarray(fat, dtype=np.float64)


def signal_fat_fraction(water: np.ndarray, fat: np.ndarray) -> np.ndarray:
    """Per-pixel signal fat fraction fat / (water + fat) in [0, 1]; 0 where both are 0."""
    w = np.asarray(water, dtype=np.float64)
    f = np.asarray(fat, dtype=np.float64)
    total = w + f
    out = np.zeros(total.shape, dtype=np.float64)
    np.divide(f, total, out=out, where=total > 0)
    return np.clip(out, 0.0, 1.0)


def reference_fat_fraction(water: np.ndarray, fat: np.ndarray, mask: np.ndarray) -> Optional[float]:
    """Reference fat fraction (%) of a muscle: mean of fat/(water+fat) over its pixels (None if empty)."""
    m = np.asarray(mask, dtype=bool)
    if not m.any():
        return None
    return float(100.0 * signal_fat_fraction(water, fat)[m].mean())


def fat_pixel_fraction(water: np.ndarray, fat: np.ndarray, mask: np.ndarray, cut: float = FAT_PIXEL_CUT) -> Optional[float]:
    """% of muscle pixels whose Dixon fat fraction exceeds ``cut``: what a perfect fat/lean threshold gives."""
    m = np.asarray(mask, dtype=bool)
    if not m.any():
        return None
    return float(100.0 * (signal_fat_fraction(water, fat)[m] > cut).mean())


@dataclass
class Agreement:
    """Agreement of a measurement with a reference: Pearson r and Bland–Altman statistics (method − ref)."""

    n: int
    r: Optional[float]
    bias: Optional[float]
    sd: Optional[float]
    loa_low: Optional[float]
    loa_high: Optional[float]


def agreement(measured: Sequence[float], reference: Sequence[float]) -> Agreement:
    """Pearson r, bias = mean(measured − reference), SD of the differences and 95 % limits of agreement
    (bias ± 1.96 SD, Bland & Altman, Lancet 1986). r is None when either side is constant or n < 3."""
    a = np.asarray(measured, dtype=np.float64)
    b = np.asarray(reference, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError("measured and reference must have the same length")
    keep = np.isfinite(a) & np.isfinite(b)
    a, b = a[keep], b[keep]
    n = int(a.size)
    if n == 0:
        return Agreement(0, None, None, None, None, None)
    d = a - b
    bias = float(d.mean())
    sd = float(d.std(ddof=1)) if n > 1 else 0.0
    r: Optional[float] = None
    if n >= 3 and a.std() > 0 and b.std() > 0:
        r = float(np.corrcoef(a, b)[0, 1])
    return Agreement(n, r, bias, sd, bias - 1.96 * sd, bias + 1.96 * sd)


@dataclass
class SliceData:
    case_id: str
    water: np.ndarray
    fat: np.ndarray
    labels: np.ndarray
    spacing_mm: tuple[float, float]


def _read_2d(path: Path) -> tuple[np.ndarray, tuple[float, float]]:
    import SimpleITK as sitk

    img = sitk.ReadImage(str(path))
    arr = sitk.GetArrayFromImage(img)  # (k, j, i)
    while arr.ndim > 2 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 2:
        raise ValueError(f"{path}: expected one 2-D slice, got array shape {arr.shape}")
    sx, sy = img.GetSpacing()[:2]
    return arr, (float(sy), float(sx))  # spacing along array axes 0 (j) and 1 (i)


def load_slices(data_dir: Path) -> list[SliceData]:
    """Read every slice listed in ``manifest.csv`` that has a ``_fat`` extra file."""
    manifest = Path(data_dir) / "manifest.csv"
    if not manifest.is_file():
        raise FileNotFoundError(f"no manifest.csv in {data_dir}")
    out: list[SliceData] = []
    with manifest.open(newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            extras = [e for e in (row.get("extra_files") or "").split(";") if e.endswith("_fat.nii.gz")]
            if not extras:
                continue
            water, spacing = _read_2d(Path(data_dir) / row["img_file"])
            fat, _ = _read_2d(Path(data_dir) / extras[0])
            labels, _ = _read_2d(Path(data_dir) / row["lbl_file"])
            out.append(SliceData(row["case_id"], water.astype(np.float64), fat.astype(np.float64), labels, spacing))
    return out


def midpoint_threshold(water: np.ndarray, fat: np.ndarray, labels: np.ndarray) -> float:
    """The value an ideal rater would enter by hand on this slice: midway between the in-phase median of
    clearly lean muscle pixels (Dixon FF < 20 %) and of clearly fat pixels in the body (FF > 80 %)."""
    ip = in_phase(water, fat)
    ff = signal_fat_fraction(water, fat)
    lean = np.isin(labels, MUSCLES) & (ff < 0.2)
    body_fat = (ff > 0.8) & (ip > np.percentile(ip, 50))  # leave out noise-only background
    return float(0.5 * (np.median(ip[lean]) + np.median(ip[body_fat])))


def measure_all(slices: Sequence[SliceData], methods: Sequence[str] = METHODS) -> list[dict]:
    """One row per (slice, muscle, method) with the method's fat % and the two Dixon references."""
    rows: list[dict] = []
    for sl in slices:
        ip = in_phase(sl.water, sl.fat)
        ref = {v: reference_fat_fraction(sl.water, sl.fat, sl.labels == v) for v in MUSCLES}
        pix = {v: fat_pixel_fraction(sl.water, sl.fat, sl.labels == v) for v in MUSCLES}
        for method in methods:
            arg: object = midpoint_threshold(sl.water, sl.fat, sl.labels) if method == "manual-midpoint" else method
            for rec in measure_slice(ip, sl.labels, sl.spacing_mm, arg, structures=MUSCLES):  # type: ignore[arg-type]
                if not rec.found:
                    continue
                rows.append(
                    {
                        "case_id": sl.case_id,
                        "structure": rec.key,
                        "value": rec.value,
                        "method": method,
                        "method_recorded": rec.method,
                        "threshold": rec.threshold,
                        "csa_mm2": rec.csa_mm2,
                        "fat_percent": rec.fat_percent,
                        "reference_ff_percent": ref[rec.value],
                        "dixon_fat_pixel_percent": pix[rec.value],
                    }
                )
    return rows


def summarise(rows: Sequence[dict]) -> list[dict]:
    """Agreement with the reference FF per (method, muscle) and pooled, plus the ideal classifier."""
    out: list[dict] = []
    methods = list(dict.fromkeys(r["method"] for r in rows))
    first = methods[0] if methods else None
    comparisons = [(m, "fat_percent", lambda r, m=m: r["method"] == m) for m in methods]
    # The ideal fat/lean classifier (Dixon FF > 50 %) is the same for every method: take one method's rows.
    comparisons.append(("dixon-fat-pixels (ideal classifier)", "dixon_fat_pixel_percent", lambda r: r["method"] == first))
    for label, col, sel in comparisons:
        sub = [r for r in rows if sel(r)]
        for key in [anatomy.BY_VALUE[v].key for v in MUSCLES] + ["pooled"]:
            part = sub if key == "pooled" else [r for r in sub if r["structure"] == key]
            ag = agreement([r[col] for r in part], [r["reference_ff_percent"] for r in part])
            out.append({"method": label, "structure": key, **asdict(ag)})
        if col == "fat_percent":  # how well the method finds the fat pixels themselves
            ag = agreement([r[col] for r in sub], [r["dixon_fat_pixel_percent"] for r in sub])
            out.append({"method": label, "structure": "pooled vs Dixon fat pixels", **asdict(ag)})
    return out


def cut_sweep(slices: Sequence[SliceData], cuts: Sequence[float] = (0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6)) -> list[dict]:
    """Ideal classifiers at other Dixon FF cuts: which cut a threshold would need to agree with mean FF."""
    out = []
    for c in cuts:
        meas, ref = [], []
        for sl in slices:
            for v in MUSCLES:
                m = sl.labels == v
                if m.any():
                    meas.append(fat_pixel_fraction(sl.water, sl.fat, m, c))
                    ref.append(reference_fat_fraction(sl.water, sl.fat, m))
        out.append({"cut": c, **asdict(agreement(meas, ref))})
    return out


def _fmt(x: Optional[float], nd: int = 2) -> str:
    return "–" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.{nd}f}"


def markdown_table(summary: Sequence[dict]) -> str:
    lines = ["| method | muscle | n | r | bias (points) | SD | 95 % LoA |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for s in summary:
        lines.append(
            f"| {s['method']} | {s['structure']} | {s['n']} | {_fmt(s['r'])} | {_fmt(s['bias'])} | {_fmt(s['sd'])} "
            f"| {_fmt(s['loa_low'])} to {_fmt(s['loa_high'])} |"
        )
    return "\n".join(lines) + "\n"


def sweep_table(sweep: Sequence[dict]) -> str:
    lines = ["| Dixon FF cut for 'fat pixel' | r vs mean FF | bias (points) | 95 % LoA |", "| --- | --- | --- | --- |"]
    for s in sweep:
        lines.append(f"| {s['cut']:.2f} | {_fmt(s['r'])} | {_fmt(s['bias'])} | {_fmt(s['loa_low'])} to {_fmt(s['loa_high'])} |")
    return "\n".join(lines) + "\n"


def bland_altman_png(rows: Sequence[dict], path: Path) -> None:
    """Bland–Altman plot (difference vs mean) per method, coloured by muscle; matplotlib if importable."""
    methods = list(dict.fromkeys(r["method"] for r in rows))
    panels = [(m, "fat_percent", [r for r in rows if r["method"] == m]) for m in methods]
    if methods:
        panels.append(("ideal classifier (Dixon FF > 50 %)", "dixon_fat_pixel_percent", [r for r in rows if r["method"] == methods[0]]))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover - matplotlib ships with the dev venv
        _bland_altman_pillow(panels, path)
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4.0), sharey=True, squeeze=False)
    for ax, (title, col, part) in zip(axes[0], panels):
        for v in MUSCLES:
            key = anatomy.BY_VALUE[v].key
            sel = [r for r in part if r["structure"] == key]
            a = np.array([r[col] for r in sel], dtype=float)
            b = np.array([r["reference_ff_percent"] for r in sel], dtype=float)
            ax.scatter((a + b) / 2, a - b, s=12, color=anatomy.BY_VALUE[v].color, edgecolors="k", linewidths=0.3,
                       label=anatomy.BY_VALUE[v].name)
        ag = agreement([r[col] for r in part], [r["reference_ff_percent"] for r in part])
        if ag.bias is not None:
            ax.axhline(ag.bias, color="k")
            ax.axhline(ag.loa_low, color="k", ls="--")
            ax.axhline(ag.loa_high, color="k", ls="--")
        ax.axhline(0, color="0.6", lw=0.8)
        ax.set_title(f"{title}\nr={_fmt(ag.r)} bias={_fmt(ag.bias, 1)}", fontsize=9)
        ax.set_xlabel("mean of method and reference (%)")
    axes[0][0].set_ylabel("method − reference FF (points)")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _bland_altman_pillow(panels, path: Path) -> None:  # pragma: no cover - fallback only
    from PIL import Image, ImageDraw

    w, h = 300, 260
    im = Image.new("RGB", (w * len(panels), h), "white")
    d = ImageDraw.Draw(im)
    for i, (title, col, part) in enumerate(panels):
        a = np.array([r[col] for r in part], float)
        b = np.array([r["reference_ff_percent"] for r in part], float)
        x, y = (a + b) / 2, a - b
        x0, x1, y0, y1 = 0, max(40.0, x.max() + 2), min(-30.0, y.min() - 2), max(30.0, y.max() + 2)
        px = lambda v: i * w + 20 + (v - x0) / (x1 - x0) * (w - 40)
        py = lambda v: h - 20 - (v - y0) / (y1 - y0) * (h - 50)
        d.text((i * w + 10, 5), title[:40], fill="black")
        d.line([px(x0), py(0), px(x1), py(0)], fill="gray")
        for xx, yy in zip(x, y):
            d.ellipse([px(xx) - 2, py(yy) - 2, px(xx) + 2, py(yy) + 2], fill="blue")
    im.save(path)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ParaspinalSegLib.fat_validation", description=__doc__.split("\n")[0])
    p.add_argument("--data", type=Path, default=default_data_dir(), help="folder with manifest.csv and _img/_fat/_lbl NIfTI")
    p.add_argument("--out", type=Path, default=repo_root() / "docs" / "fat-validation", help="output folder")
    args = p.parse_args(argv)
    if not (args.data / "manifest.csv").is_file():
        print(f"error: no data at {args.data} (expected manifest.csv)", file=sys.stderr)
        return 2
    slices = load_slices(args.data)
    rows = measure_all(slices)
    summary = summarise(rows)
    sweep = cut_sweep(slices)
    args.out.mkdir(parents=True, exist_ok=True)
    with (args.out / "fat_validation_rows.csv").open("w", newline="", encoding="utf-8") as fh:
        wr = csv.DictWriter(fh, fieldnames=list(rows[0]))
        wr.writeheader()
        wr.writerows(rows)
    with (args.out / "fat_validation_summary.csv").open("w", newline="", encoding="utf-8") as fh:
        wr = csv.DictWriter(fh, fieldnames=list(summary[0]))
        wr.writeheader()
        wr.writerows(summary)
    md = (
        f"Slices: {len(slices)} from {args.data.name}; muscle rows per method: "
        f"{sum(1 for r in rows if r['method'] == rows[0]['method'])}\n\n"
        + markdown_table(summary)
        + "\nIdeal classifiers at other cuts (fat % = pixels with Dixon FF > cut):\n\n"
        + sweep_table(sweep)
    )
    (args.out / "fat_validation.md").write_text(md, encoding="utf-8")
    bland_altman_png(rows, args.out / "bland_altman.png")
    print(md)
    print(f"wrote {args.out}/fat_validation_rows.csv, fat_validation_summary.csv, fat_validation.md, bland_altman.png")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
