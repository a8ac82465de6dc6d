"""Contact sheets of derived canal and lamina labels, for reviewing every slice by eye.

    python -m training.derived_sheets --derived runs/derived/sy_lumbar_muscle_derived --out runs/derived/sheets

Each PNG holds up to ``--per-sheet`` tiles (default 24, 6 × 4). A tile is the slice in radiological view
(patient right on the viewer's left, anterior up), cropped around the spine (the disc's posterior border
on the midline at the upper third), with the derived canal outlined in cyan and the lamina in yellow, the
manual disc and multifidi faintly in red/blue, and the slice ID and review decision written on it.
Sheets are derived images of the source: keep them under ``runs/``, never commit them.

Exit codes: 0 written; 2 bad input (no derived folder or manifest).
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from scipy import ndimage as ndi

from training.canal_lamina import CANAL, LAMINA
from training.spine_frame import DISC, MULTIFIDUS_LEFT, MULTIFIDUS_RIGHT, FrameError, spine_frame

EXIT_BAD_INPUT = 2
_COLOURS = {CANAL: (0, 255, 255), LAMINA: (255, 230, 0)}
_FAINT = {DISC: (200, 60, 60), MULTIFIDUS_LEFT: (70, 110, 255), MULTIFIDUS_RIGHT: (70, 110, 255)}


def _outline(mask: np.ndarray) -> np.ndarray:
    return mask & ~ndi.binary_erosion(mask)


def render_tile(image: np.ndarray, labels: np.ndarray, derived: np.ndarray, spacing: tuple[float, float],
                crop_mm: float = 80.0, size: int = 256) -> np.ndarray:
    """RGB uint8 tile (size × size) of one slice in radiological view with the derived outlines.

    Arrays are on the shared-data grid ``a[i, j]`` (i → patient left, j → posterior); the view is ``a.T``.
    """
    a = np.asarray(image, np.float64)
    lo, hi = np.percentile(a, [1, 99.5])
    grey = np.clip((a - lo) / max(hi - lo, 1e-6), 0, 1) * 255
    rgb = np.repeat(grey[..., None], 3, axis=2)
    for value, colour in _FAINT.items():
        edge = _outline(labels == value)
        rgb[edge] = 0.5 * rgb[edge] + 0.5 * np.array(colour)
    for value, colour in _COLOURS.items():
        m = derived == value
        rgb[m] = 0.8 * rgb[m] + 0.2 * np.array(colour)
        rgb[_outline(m)] = colour
    try:
        i0, j0 = spine_frame(labels, spacing).to_pixel(0.0, 0.0)
    except FrameError:
        i0, j0 = a.shape[0] // 2, a.shape[1] // 2
    half_i, half_j = int(crop_mm / 2 / spacing[0]), int(crop_mm / 2 / spacing[1])
    # Anterior third above the disc's posterior border, two thirds behind it (canal, arch, multifidi).
    j_start = j0 - int(crop_mm / 3 / spacing[1])
    pad = max(half_i, 2 * half_j) + 1
    padded = np.pad(rgb, ((pad, pad), (pad, pad), (0, 0)))
    crop = padded[pad + i0 - half_i: pad + i0 + half_i, pad + j_start: pad + j_start + 2 * half_j]
    view = crop.transpose(1, 0, 2)  # rows = j (anterior up), columns = i (patient right on the left)
    rows = (np.arange(size) * view.shape[0] / size).astype(int)
    cols = (np.arange(size) * view.shape[1] / size).astype(int)
    return view[rows][:, cols].astype(np.uint8)


def _label_tile(tile: np.ndarray, text: str) -> np.ndarray:
    from PIL import Image, ImageDraw

    im = Image.fromarray(tile)
    draw = ImageDraw.Draw(im)
    draw.rectangle([0, 0, 7 * len(text) + 6, 14], fill=(0, 0, 0))
    draw.text((3, 2), text, fill=(255, 255, 255))
    return np.asarray(im)


def write_sheets(derived_folder: Path, out: Path, per_sheet: int = 24, columns: int = 6, size: int = 256,
                 crop_mm: float = 80.0, cases: Optional[Sequence[str]] = None) -> list[Path]:
    """Render every slice (or the ``cases`` listed) of a derived folder into contact sheets; returns the PNG paths."""
    import nibabel as nib
    from PIL import Image

    manifest = derived_folder / "manifest.csv"
    if not manifest.is_file():
        raise FileNotFoundError(f"{derived_folder} has no manifest.csv (run python -m training.derive_labels first)")
    with open(manifest, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    if cases:
        missing = sorted(set(cases) - {r["case_id"] for r in rows})
        if missing:
            raise FileNotFoundError(f"{derived_folder}/manifest.csv has no slice {', '.join(missing)}")
        rows = [r for r in rows if r["case_id"] in set(cases)]
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for start in range(0, len(rows), per_sheet):
        tiles = []
        for row in rows[start:start + per_sheet]:
            img = nib.load(str(derived_folder / row["img_file"]))
            image = np.asanyarray(img.dataobj)[:, :, 0]
            labels = np.asanyarray(nib.load(str(derived_folder / row["lbl_file"])).dataobj)[:, :, 0]
            derived = np.asanyarray(nib.load(str(derived_folder / row["derived_file"])).dataobj)[:, :, 0]
            spacing = (float(row.get("spacing_x_mm") or img.header.get_zooms()[0]),
                       float(row.get("spacing_y_mm") or img.header.get_zooms()[1]))
            tile = render_tile(image, labels, derived, spacing, crop_mm=crop_mm, size=size)
            tiles.append(_label_tile(tile, f"{row['case_id']} {row.get('derived_review', '')[:4]}"))
        columns = min(columns, len(tiles))
        while len(tiles) % columns:
            tiles.append(np.zeros_like(tiles[0]))
        grid = [np.concatenate(tiles[k:k + columns], axis=1) for k in range(0, len(tiles), columns)]
        sheet = np.concatenate([np.pad(g, ((0, 2), (0, 0), (0, 0)), constant_values=255) for g in grid], axis=0)
        path = out / f"sheet_{start // per_sheet + 1:02d}.png"
        Image.fromarray(sheet).save(path)
        paths.append(path)
    return paths


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command line (see the module docstring)."""
    ap = argparse.ArgumentParser(prog="python -m training.derived_sheets", description=__doc__.split("\n\n")[0])
    ap.add_argument("--derived", required=True, help="folder written by python -m training.derive_labels")
    ap.add_argument("--out", required=True, help="folder for the PNG sheets (under runs/; never commit)")
    ap.add_argument("--per-sheet", type=int, default=24)
    ap.add_argument("--columns", type=int, default=6)
    ap.add_argument("--tile", type=int, default=256, help="tile size in pixels")
    ap.add_argument("--crop-mm", type=float, default=80.0, help="field of view of a tile in mm (e.g. 45 to look at the canal)")
    ap.add_argument("--cases", nargs="+", default=None, help="only these slices (case_id), e.g. to look again at corrected ones")
    args = ap.parse_args(argv)
    try:
        paths = write_sheets(Path(args.derived), Path(args.out), args.per_sheet, args.columns, args.tile, args.crop_mm, args.cases)
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(f"wrote {len(paths)} sheets to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
