"""Paired comparison of two cross-validations on the same folds (e.g. BS-ESNet against the plain U-Net).

``python -m training.compare runs/cv_bsesnet runs/cv_unet [--out runs/compare.md] [--boot 2000]``

Both folders hold the ``per_slice.csv`` written by :mod:`training.cv`. Rows are paired by slice and structure,
so every difference is the same slice scored by both models. Per structure: mean Dice of each model, the mean
difference A − B with a bootstrap 95 % interval over slices, the Wilcoxon signed-rank p value and how many
slices each model wins. The headline is the difference of the mean Dice over structures, bootstrapped by
resampling whole slices (all structures of a slice move together, since they share the image). Slices of the
same source are treated as independent: where a subject contributes several slices, the interval is too narrow.
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from ParaspinalSegLib.anatomy import BY_VALUE


def read_per_slice(path: str | Path) -> dict[tuple[str, int], float]:
    """``{(case_id, structure): dice}`` from a CV folder or its ``per_slice.csv`` (NaN Dice rows dropped)."""
    p = Path(path)
    if p.is_dir():
        p = p / "per_slice.csv"
    if not p.exists():
        raise FileNotFoundError(f"{p} not found: run python -m training.cv first")
    out: dict[tuple[str, int], float] = {}
    with open(p, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            d = float(row["dice"]) if row["dice"] not in ("", "nan") else math.nan
            if not math.isnan(d):
                out[(row["case_id"], int(row["structure"]))] = d
    return out


def check_same_splits(a: str | Path, b: str | Path) -> None:
    """Refuse two CV folders whose saved splits (``splits_final.json``) differ; folders without one pass."""
    from .splits import SPLITS_FILE, same_splits

    folders = [Path(p) if Path(p).is_dir() else Path(p).parent for p in (a, b)]
    if all((f / SPLITS_FILE).is_file() for f in folders) and not same_splits(*folders):
        raise ValueError(f"{folders[0]} and {folders[1]} were run on different fold splits: a paired comparison needs the same folds")


def _wilcoxon_p(diff: np.ndarray) -> float:
    from scipy.stats import wilcoxon

    if diff.size == 0 or not np.any(diff != 0):
        return 1.0
    return float(wilcoxon(diff, zero_method="wilcox").pvalue)


def compare(a: dict[tuple[str, int], float], b: dict[tuple[str, int], float], n_boot: int = 2000, seed: int = 0) -> dict[str, Any]:
    """Paired statistics of model A against model B on the (slice, structure) pairs both scored.

    Returns ``{"structures": {value: {...}}, "mean_dice_a", "mean_dice_b", "difference", "ci95", "slices"}``
    with Dice as fractions. Raises ``ValueError`` when the two share no pair (different folds or data).
    """
    keys = sorted(set(a) & set(b))
    if not keys:
        raise ValueError("the two cross-validations share no (slice, structure) pair: same data and folds?")
    cases = sorted({k[0] for k in keys})
    structures = sorted({k[1] for k in keys})
    # Matrices slice × structure (NaN where a structure was not scored on a slice).
    ci = {c: i for i, c in enumerate(cases)}
    si = {s: j for j, s in enumerate(structures)}
    ma = np.full((len(cases), len(structures)), np.nan)
    mb = ma.copy()
    for k in keys:
        ma[ci[k[0]], si[k[1]]] = a[k]
        mb[ci[k[0]], si[k[1]]] = b[k]
    rng = np.random.default_rng(seed)
    boot_idx = rng.integers(0, len(cases), size=(n_boot, len(cases)))

    per: dict[int, dict[str, float]] = {}
    for s, j in si.items():
        ok = ~np.isnan(ma[:, j])
        d = ma[ok, j] - mb[ok, j]
        boots = np.nanmean((ma[:, j] - mb[:, j])[boot_idx], axis=1)
        per[s] = {
            "dice_a": float(np.mean(ma[ok, j])),
            "dice_b": float(np.mean(mb[ok, j])),
            "difference": float(np.mean(d)),
            "ci95": (float(np.nanpercentile(boots, 2.5)), float(np.nanpercentile(boots, 97.5))),
            "p_wilcoxon": _wilcoxon_p(d),
            "wins_a": int(np.sum(d > 0)),
            "wins_b": int(np.sum(d < 0)),
            "slices": int(ok.sum()),
        }

    def headline(rows: np.ndarray) -> float:
        # Mean over structures of each structure's mean over the chosen slices (as training.report.mean_dice).
        return float(np.mean(np.nanmean(rows, axis=0)))

    diff = headline(ma) - headline(mb)
    boots = np.array([headline(ma[idx]) - headline(mb[idx]) for idx in boot_idx])
    return {
        "structures": per,
        "mean_dice_a": headline(ma),
        "mean_dice_b": headline(mb),
        "difference": diff,
        "ci95": (float(np.percentile(boots, 2.5)), float(np.percentile(boots, 97.5))),
        "slices": len(cases),
    }


def markdown(result: dict[str, Any], name_a: str = "A", name_b: str = "B") -> str:
    """The comparison as a markdown table (Dice in %)."""
    lo, hi = result["ci95"]
    lines = [
        f"Mean Dice over structures: {name_a} {100 * result['mean_dice_a']:.1f} %, {name_b} {100 * result['mean_dice_b']:.1f} %; "
        f"difference {100 * result['difference']:+.1f} points (95 % bootstrap interval {100 * lo:+.1f} … {100 * hi:+.1f}, "
        f"{result['slices']} slices).",
        "",
        f"| structure | {name_a} Dice (%) | {name_b} Dice (%) | difference (points) | 95 % interval | Wilcoxon p | slices {name_a} better / {name_b} better |",
        "|---|---|---|---|---|---|---|",
    ]
    for v, d in result["structures"].items():
        lo, hi = d["ci95"]
        lines.append(
            f"| {BY_VALUE[v].name} | {100 * d['dice_a']:.1f} | {100 * d['dice_b']:.1f} | {100 * d['difference']:+.1f} | "
            f"{100 * lo:+.1f} … {100 * hi:+.1f} | {d['p_wilcoxon']:.3g} | {d['wins_a']} / {d['wins_b']} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command line entry point (see the module docstring)."""
    ap = argparse.ArgumentParser(prog="python -m training.compare", description=__doc__.split("\n\n")[0])
    ap.add_argument("a", help="CV folder (or per_slice.csv) of model A")
    ap.add_argument("b", help="CV folder (or per_slice.csv) of model B, same data and folds")
    ap.add_argument("--out", help="also write the markdown here")
    ap.add_argument("--boot", type=int, default=2000, help="bootstrap resamples (default 2000)")
    args = ap.parse_args(argv)
    name_a, name_b = Path(args.a).name, Path(args.b).name
    check_same_splits(args.a, args.b)
    text = markdown(compare(read_per_slice(args.a), read_per_slice(args.b), n_boot=args.boot), name_a, name_b)
    if args.out:
        Path(args.out).write_text(text, encoding="utf-8")
    print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
