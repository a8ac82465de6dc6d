"""Derive spinal-canal (2) and lamina (3) labels for a source folder and write a derived source folder.

    python -m training.derive_labels --data ../shared/data/sy_lumbar_muscle \\
        --out runs/derived/sy_lumbar_muscle_derived --review docs/derived-labels.csv

The output has the ``../shared/data`` layout: images copied (or linked with ``--link``), label files
with 2 and 3 burnt into the not-annotated band **only on slices the review accepted or corrected**
(255 everywhere else as before), ``<case>_derived.nii.gz`` with the raw derivation of every slice (0/2/3,
for the contact sheets and for re-review), a ``manifest.csv`` whose ``trusted_classes`` gains 2 and 3
only on reviewed-accepted slices, with ``derived`` = 1 on every row (a derived source) and
``derived_classes`` (``2;3`` where trusted) / ``derived_review`` (the decision) saying which,
``derived_metrics.csv`` (per-slice areas and plausibility figures) and a ``README.md``. The images and
labels stay under the source's license: never commit them.

Exit codes: 0 done; 2 bad input (missing folder, manifest or file, a slice not on the L,P,S grid, a bad
review file); nothing is written to ``--out`` before the input has been checked.
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import sys
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from ParaspinalSegLib.anatomy import NOT_ANNOTATED
from training.canal_lamina import CANAL, LAMINA, DerivationParams, burn_in, derive_slice
from training.derived_review import UNREVIEWED, ReviewEntry, read_review
from training.spine_frame import FrameError

EXIT_BAD_INPUT = 2
#: Extra manifest columns of a derived source.
DERIVED_COLUMNS = ("derived", "derived_classes", "derived_review", "derived_file", "canal_mm2", "lamina_mm2")


class DeriveInputError(ValueError):
    """The source folder or the review file cannot be used (message says which file and why)."""


def _classes(text: str) -> list[int]:
    return sorted({int(t) for t in str(text).replace(",", ";").split(";") if t.strip()})


def _join(values: Sequence[int]) -> str:
    return ";".join(str(v) for v in values)


def read_manifest(folder: Path) -> list[dict[str, str]]:
    """Manifest rows of a source folder, each file checked to exist."""
    manifest = folder / "manifest.csv"
    if not manifest.is_file():
        raise DeriveInputError(f"{folder} has no manifest.csv (not a ParaspinalSeg data folder)")
    with open(manifest, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        for key in ("img_file", "lbl_file"):
            if not (folder / row[key]).is_file():
                raise DeriveInputError(f"{row['case_id']}: {row[key]} is missing in {folder}")
    return rows


def check_grid(folder: Path, row: dict[str, str]) -> None:
    """Refuse a slice that is not on the shared-data L,P,S grid (the frame's left/right would be wrong)."""
    import nibabel as nib

    codes = nib.aff2axcodes(nib.load(str(folder / row["img_file"])).affine)
    if tuple(codes[:2]) != ("L", "P"):
        raise DeriveInputError(f"{row['case_id']}: image axes {codes}, expected ('L', 'P', 'S') (the shared-data grid)")


def load_pair(folder: Path, row: dict[str, str]):
    """(image, labels, affine, header spacing) of one manifest row."""
    import nibabel as nib

    img, lbl = nib.load(str(folder / row["img_file"])), nib.load(str(folder / row["lbl_file"]))
    a, lab = np.asanyarray(img.dataobj), np.asanyarray(lbl.dataobj)
    a, lab = (a[:, :, 0], lab[:, :, 0]) if a.ndim == 3 else (a, lab)
    if a.shape != lab.shape:
        raise DeriveInputError(f"{row['case_id']}: image {a.shape} and labels {lab.shape} differ")
    sx, sy = (float(z) for z in img.header.get_zooms()[:2])
    return np.asarray(a), np.asarray(lab, np.uint8), img.affine, (sx, sy)


def _save_like(array2d: np.ndarray, affine: np.ndarray, path: Path) -> None:
    import nibabel as nib

    img = nib.Nifti1Image(array2d.astype(np.uint8)[:, :, None], affine)
    img.set_data_dtype(np.uint8)
    nib.save(img, str(path))


def derive_folder(data: Path, out: Path, review: dict[str, ReviewEntry], link: bool = False,
                  limit: Optional[int] = None, params: DerivationParams = DerivationParams()) -> list[dict[str, str]]:
    """Derive every slice of ``data`` into ``out``; returns the per-slice metrics rows."""
    rows = read_manifest(data)[:limit]
    for row in rows:  # every slice checked before anything is written
        check_grid(data, row)
    out.mkdir(parents=True, exist_ok=True)
    manifest_rows, metrics = [], []
    for row in rows:
        case = row["case_id"]
        image, labels, affine, spacing = load_pair(data, row)
        spacing = (float(row.get("spacing_x_mm") or spacing[0]), float(row.get("spacing_y_mm") or spacing[1]))
        entry = review.get(case, ReviewEntry())
        try:
            d = derive_slice(image, labels, spacing, params.with_overrides(entry.overrides))
            figures, failure = d.figures(), ""
            raw = np.where(d.canal, CANAL, np.where(d.lamina, LAMINA, 0)).astype(np.uint8)
        except FrameError as exc:
            d, figures, failure = None, {}, str(exc)
            raw = np.zeros_like(labels)
        trusted = entry.trusted and d is not None and bool(d.canal.any())
        new_labels = burn_in(labels, d) if trusted else labels
        img_dst = out / row["img_file"]
        if img_dst.exists() or img_dst.is_symlink():
            img_dst.unlink()
        if link:
            os.symlink(os.path.abspath(data / row["img_file"]), img_dst)
        else:
            shutil.copyfile(data / row["img_file"], img_dst)
        for extra in filter(None, (e.strip() for e in (row.get("extra_files") or "").split(";"))):
            shutil.copyfile(data / extra, out / extra)
        _save_like(new_labels, affine, out / row["lbl_file"])
        derived_file = f"{case}_derived.nii.gz"
        _save_like(raw, affine, out / derived_file)
        new = dict(row)
        if trusted:
            new["trusted_classes"] = _join(sorted(set(_classes(row["trusted_classes"])) | {CANAL, LAMINA}))
        present = sorted(set(int(x) for x in np.unique(new_labels)) - {0, NOT_ANNOTATED})
        new.update(derived="1", classes_present=_join(present), n_pixels_255=str(int((new_labels == NOT_ANNOTATED).sum())),
                   derived_classes=_join([CANAL, LAMINA]) if trusted else "",
                   derived_review=entry.decision if d is not None else "failed", derived_file=derived_file,
                   canal_mm2=f"{figures.get('canal_mm2', 0.0):.1f}", lamina_mm2=f"{figures.get('lamina_mm2', 0.0):.1f}")
        manifest_rows.append(new)
        metrics.append({"case_id": case, "decision": entry.decision, "reason": entry.reason or failure,
                        "overrides": ";".join(f"{k}={v}" for k, v in entry.overrides.items()), "trusted": int(trusted),
                        **{k: f"{v:.2f}" for k, v in figures.items()}})
    _write_csv(out / "manifest.csv", manifest_rows, list(rows[0].keys()) + [c for c in DERIVED_COLUMNS if c not in rows[0]])
    keys = ["case_id", "decision", "reason", "overrides", "trusted"]
    keys += sorted({k for m in metrics for k in m} - set(keys))
    _write_csv(out / "derived_metrics.csv", metrics, keys)
    _write_readme(out, data, manifest_rows)
    return metrics


def _write_csv(path: Path, rows: list[dict], columns: list[str]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)


def _write_readme(out: Path, data: Path, rows: list[dict[str, str]]) -> None:
    counts = {}
    for r in rows:
        counts[r["derived_review"]] = counts.get(r["derived_review"], 0) + 1
    n_trusted = sum(1 for r in rows if r["derived_classes"])
    text = f"""# {out.name} — {data.name} with DERIVED spinal-canal (2) and lamina (3) labels

**Derived source.** Labels 2 and 3 were not drawn by an annotator: `python -m training.derive_labels`
(ParaspinalSeg, `training/canal_lamina.py`) derived them from each slice's image and its manual disc and
multifidus labels, and a person reviewed every slice on contact sheets (`docs/derived-labels.md` in the
repository: definitions, method, review table, plausibility figures). Classes 1, 4–9 are the source's
manual labels, unchanged.

* 2 and 3 are in `trusted_classes` (and burnt into the `_lbl` file) on {n_trusted} of {len(rows)} slices,
  those whose review decision was `accepted` or `corrected` (`derived_classes` = `2;3`). On all other
  slices the band stays 255 and 2/3 untrusted. Review decisions here: {counts}.
* `<case>_derived.nii.gz`: the raw derivation of every slice (0 / 2 canal / 3 lamina), trusted or not,
  for the contact sheets (`python -m training.derived_sheets`).
* `derived_metrics.csv`: canal CSA, width, depth, lamina area, position and left/right balance per slice.
  Areas use the source's spacing; for sy_lumbar_muscle that is an **estimate (0.37 mm, ±15 %)**.

Same license and provenance as `{data.name}` (its README): do not redistribute or commit these files.
"""
    (out / "README.md").write_text(text, encoding="utf-8")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command line (see the module docstring)."""
    ap = argparse.ArgumentParser(prog="python -m training.derive_labels", description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, help="source folder with manifest.csv (e.g. ../shared/data/sy_lumbar_muscle)")
    ap.add_argument("--out", required=True, help="derived source folder to write (under runs/; never commit it)")
    ap.add_argument("--review", default=None, help="review CSV (docs/derived-labels.csv); without it no slice trusts 2/3")
    ap.add_argument("--link", action="store_true", help="symlink the images instead of copying them")
    ap.add_argument("--limit", type=int, default=None, help="only the first N slices (tests)")
    args = ap.parse_args(argv)
    data, out = Path(args.data), Path(args.out)
    try:
        if data.resolve() == out.resolve():
            raise DeriveInputError("--out must not be the source folder")
        review = read_review(args.review) if args.review else {}
        rows = read_manifest(data)
        unknown = sorted(set(review) - {r["case_id"] for r in rows})
        if unknown:
            raise DeriveInputError(f"{args.review} lists slices not in {data}: {', '.join(unknown[:5])}")
        metrics = derive_folder(data, out, review, link=args.link, limit=args.limit)
    except (DeriveInputError, ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    areas = np.array([float(m["canal_mm2"]) for m in metrics if "canal_mm2" in m and float(m["canal_mm2"]) > 0])
    n_trusted = sum(int(m["trusted"]) for m in metrics)
    if areas.size:
        print(f"{len(metrics)} slices: canal found on {areas.size}, CSA median {np.median(areas):.0f} mm² "
              f"(IQR {np.percentile(areas, 25):.0f}–{np.percentile(areas, 75):.0f}); 2/3 trusted on {n_trusted}; wrote {out}")
    else:
        print(f"{len(metrics)} slices: no canal found; wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
