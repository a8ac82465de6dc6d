"""Paired comparison of two cross-validations on the same folds (e.g. BS-ESNet against the plain U-Net).

``python -m training.compare runs/cv_bsesnet runs/cv_unet [--out runs/compare.md] [--boot 2000]``

Both folders hold the ``per_slice.csv`` written by :mod:`training.cv`. Rows are paired by slice and structure,
so every difference is the same slice scored by both models. Per structure: mean Dice of each model, the mean
difference A − B with a bootstrap 95 % interval over slices, the Wilcoxon signed-rank p value and how many
slices each model wins. The headline is the difference of the mean Dice over structures, bootstrapped by
resampling whole slices (all structures of a slice move together, since they share the image). Slices of the
same source are treated as independent: where a subject contributes several slices, the interval is too narrow.
The headline is over the manually labelled structures; pairs whose ground truth is derived (``ground_truth`` in
either ``per_slice.csv``, see ``training.report``) are compared apart and marked "(derived labels)".
"""

from __future__ import annotations

import argparse
import math
import sys
import warnings
from pathlib import Path
from typing import Any, Collection, Optional, Sequence

import numpy as np

from .report import DERIVED_NOTE, is_derived, read_rows, structure_names


def read_per_slice(path: str | Path) -> dict[tuple[str, int], float]:
    """``{(case_id, structure): dice}`` from a CV folder or its ``per_slice.csv`` (NaN Dice rows dropped)."""
    return {(r["case_id"], r["structure"]): r["dice"] for r in read_rows(path) if not math.isnan(r["dice"])}


def read_derived_pairs(path: str | Path) -> set[tuple[str, int]]:
    """The ``(case_id, structure)`` pairs whose ground truth is derived (none in a file without the flag)."""
    return {(r["case_id"], r["structure"]) for r in read_rows(path) if is_derived(r)}


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


def _paired(ma: np.ndarray, mb: np.ndarray, structures: Sequence[int], boot_idx: np.ndarray) -> dict[str, Any]:
    """Per-structure and headline statistics of two slice × structure Dice matrices (NaN = not scored)."""
    per: dict[int, dict[str, Any]] = {}
    for j, s in enumerate(structures):
        ok = ~np.isnan(ma[:, j])
        d = ma[ok, j] - mb[ok, j]
        with warnings.catch_warnings():  # a resample may miss every slice of a rare structure
            warnings.simplefilter("ignore", RuntimeWarning)
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
        with warnings.catch_warnings():  # NaN where no structure is left (e.g. no manual pair)
            warnings.simplefilter("ignore", RuntimeWarning)
            return float(np.nanmean(np.nanmean(rows, axis=0)))

    boots = np.array([headline(ma[idx]) - headline(mb[idx]) for idx in boot_idx])
    return {"structures": per, "mean_dice_a": headline(ma), "mean_dice_b": headline(mb),
            "difference": headline(ma) - headline(mb),
            "ci95": (float(np.nanpercentile(boots, 2.5)), float(np.nanpercentile(boots, 97.5)))}


def compare(a: dict[tuple[str, int], float], b: dict[tuple[str, int], float], n_boot: int = 2000, seed: int = 0,
            derived: Collection[tuple[str, int]] = ()) -> dict[str, Any]:
    """Paired statistics of model A against model B on the (slice, structure) pairs both scored.

    Returns ``{"structures": {value: {...}}, "mean_dice_a", "mean_dice_b", "difference", "ci95", "slices"}``
    with Dice as fractions, over the pairs scored against manual labels. ``derived``: the pairs whose
    ground truth is derived; their statistics go to ``"derived"`` (same keys, same bootstrap resamples),
    never into the headline. Raises ``ValueError`` when the two share no pair (different folds or data).
    """
    keys = sorted(set(a) & set(b))
    if not keys:
        raise ValueError("the two cross-validations share no (slice, structure) pair: same data and folds?")
    cases = sorted({k[0] for k in keys})
    ci = {c: i for i, c in enumerate(cases)}
    rng = np.random.default_rng(seed)
    boot_idx = rng.integers(0, len(cases), size=(n_boot, len(cases)))
    derived = set(derived)
    result: dict[str, Any] = {"slices": len(cases)}
    for name, part in (("manual", [k for k in keys if k not in derived]), ("derived", [k for k in keys if k in derived])):
        if not part and name == "derived":
            continue
        structures = sorted({k[1] for k in part})
        si = {s: j for j, s in enumerate(structures)}
        # Matrices slice × structure (NaN where a structure was not scored on a slice).
        ma = np.full((len(cases), len(structures)), np.nan)
        mb = ma.copy()
        for k in part:
            ma[ci[k[0]], si[k[1]]] = a[k]
            mb[ci[k[0]], si[k[1]]] = b[k]
        stats = _paired(ma, mb, structures, boot_idx)
        if name == "manual":
            result.update(stats)
        else:
            result["derived"] = stats
    return result


def _difference_sentence(r: dict[str, Any], name_a: str, name_b: str) -> str:
    lo, hi = r["ci95"]
    return (f"{name_a} {100 * r['mean_dice_a']:.1f} %, {name_b} {100 * r['mean_dice_b']:.1f} %; difference "
            f"{100 * r['difference']:+.1f} points (95 % bootstrap interval {100 * lo:+.1f} … {100 * hi:+.1f}")


def markdown(result: dict[str, Any], name_a: str = "A", name_b: str = "B") -> str:
    """The comparison as a markdown table (Dice in %); derived-label rows follow, marked, with their own line."""
    derived = result.get("derived")
    over = f"the {len(result['structures'])} manually labelled structures" if derived else "structures"
    lines = [f"Mean Dice over {over}: {_difference_sentence(result, name_a, name_b)}, {result['slices']} slices).", ""]
    if derived:
        names = ", ".join(structure_names(derived["structures"]))
        lines += [f"Structures scored against derived labels ({names}), not in the headline: "
                  f"{_difference_sentence(derived, name_a, name_b)}).", "", DERIVED_NOTE, ""]
    lines += [
        f"| structure | {name_a} Dice (%) | {name_b} Dice (%) | difference (points) | 95 % interval | Wilcoxon p | slices {name_a} better / {name_b} better |",
        "|---|---|---|---|---|---|---|",
    ]
    for part, is_der in ((result, False), (derived or {"structures": {}}, True)):
        for v, d in part["structures"].items():
            lo, hi = d["ci95"]
            lines.append(
                f"| {structure_names([v], is_der)[0]} | {100 * d['dice_a']:.1f} | {100 * d['dice_b']:.1f} | {100 * d['difference']:+.1f} | "
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
    # A pair is derived when either report says so (a report written before the flag says nothing).
    derived = read_derived_pairs(args.a) | read_derived_pairs(args.b)
    text = markdown(compare(read_per_slice(args.a), read_per_slice(args.b), n_boot=args.boot, derived=derived), name_a, name_b)
    if args.out:
        Path(args.out).write_text(text, encoding="utf-8")
    print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
