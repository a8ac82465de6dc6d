"""A quick-look picture of one segmented slice: contours, boxes and a legend, written as PNG.

The slice is shown in radiological display (patient right on the viewer's left, anterior at the top),
decided from the slice's IJK-to-RAS matrix through :mod:`preprocessing` like everything else, so the
picture never depends on how the file stores its axes. Pixels are drawn square in millimetres.

Needs numpy, scipy, scikit-image (contours) and Pillow (text and the PNG encoder), imported when a
picture is drawn; Slicer bundles Pillow and the package depends on it, so there is no fallback path.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence

import numpy as np
from scipy import ndimage

from . import anatomy
from .errors import import_skimage
from .preprocessing import canonical_orientation, normalise_intensity, pixel_spacing, to_canonical

#: The picture's longer image side is scaled up to at least this many pixels (nearest neighbour).
MIN_DISPLAY_SIZE = 512
#: Opacity of the tint inside each structure (contours are opaque).
FILL_OPACITY = 0.18
#: Frame and legend colour of a structure that quality control flags.
FLAG_RGB = np.array([255, 40, 40], dtype=np.uint8)
LEGEND_WIDTH = 250
_BACKGROUND = (0, 0, 0)
_TEXT = (235, 235, 235)
_DIM_TEXT = (140, 140, 140)


def _rgb255(color: Sequence[float]) -> np.ndarray:
    return np.clip(np.round(np.asarray(color, dtype=float) * 255.0), 0, 255).astype(np.uint8)


def _pixel_bounds(box: Any) -> tuple[float, float, float, float]:
    """(p0, q0, p1, q1) edge coordinates from a ``StructureBox`` (``.pixel``) or a plain 4-tuple."""
    b = getattr(box, "pixel", box)
    p0, q0, p1, q1 = (float(x) for x in b)
    return p0, q0, p1, q1


def _box_to_canonical(bounds: tuple[float, float, float, float], orientation: Any,
                      input_shape: tuple[int, int]) -> tuple[float, float, float, float]:
    """Input edge-coordinate box → canonical edge-coordinate box (r0, c0, r1, c1).

    Same steps as ``to_canonical``: transpose, then reverse rows, then reverse columns; in edge
    coordinates reversing an axis of length n maps x to n − x.
    """
    p0, q0, p1, q1 = bounds
    n0, n1 = int(input_shape[0]), int(input_shape[1])
    if orientation.transpose:
        p0, q0, p1, q1, n0, n1 = q0, p0, q1, p1, n1, n0
    if orientation.flip_rows:
        p0, p1 = n0 - p1, n0 - p0
    if orientation.flip_cols:
        q0, q1 = n1 - q1, n1 - q0
    return p0, q0, p1, q1


def _display_scale(shape: tuple[int, int], spacing: tuple[float, float], min_size: int) -> tuple[float, float]:
    """Display pixels per canonical pixel along rows and columns: square millimetres, at least ``min_size``."""
    s = min(spacing)
    rel = (spacing[0] / s, spacing[1] / s)
    extent = max(shape[0] * rel[0], shape[1] * rel[1])
    f = max(1.0, math.ceil(min_size / extent)) if extent > 0 else 1.0
    return f * rel[0], f * rel[1]


def _resample_nearest(a: np.ndarray, scale: tuple[float, float]) -> np.ndarray:
    h = max(1, int(round(a.shape[0] * scale[0])))
    w = max(1, int(round(a.shape[1] * scale[1])))
    rows = np.minimum((np.arange(h) / scale[0]).astype(int), a.shape[0] - 1)
    cols = np.minimum((np.arange(w) / scale[1]).astype(int), a.shape[1] - 1)
    return a[rows[:, None], cols[None, :]]


def render_overlay(
    image: np.ndarray,
    labels: np.ndarray,
    slice_ijk_to_ras: Any,
    boxes: Optional[Mapping[int, Any]] = None,
    *,
    title: str = "",
    legend: bool = True,
    min_size: int = MIN_DISPLAY_SIZE,
    flagged: Iterable[int] = (),
) -> np.ndarray:
    """Draw the slice with each structure's contour (and box) in radiological display; returns RGB uint8.

    ``image`` and ``labels`` are the slice ``a[p, q]`` and its label values on the same grid,
    ``slice_ijk_to_ras`` the slice's 4×4 geometry (see ``docs/api-contract.md``), ``boxes`` maps a
    label value to a ``StructureBox`` (uses ``.pixel``) or to ``(p0, q0, p1, q1)`` edge coordinates on
    the input grid. With ``legend`` a panel on the right shows ``title`` (up to three lines) and names
    every structure (dimmed when absent). ``flagged`` structures (quality control asks for a second look)
    get a red frame around their mask and "check" in the legend.
    """
    img = np.asarray(image)
    lab = np.asarray(labels)
    if img.ndim != 2 or lab.shape != img.shape:
        raise ValueError(f"image {img.shape} and labels {lab.shape} must be 2-D arrays of one shape")
    orientation = canonical_orientation(slice_ijk_to_ras)
    s0, s1 = pixel_spacing(slice_ijk_to_ras)
    spacing = (s1, s0) if orientation.transpose else (s0, s1)
    img_c = to_canonical(np.nan_to_num(img.astype(np.float64)), orientation)
    lab_c = to_canonical(lab, orientation)
    scale = _display_scale(img_c.shape, spacing, min_size)

    grey = (normalise_intensity(img_c) * 255.0 + 0.5).astype(np.uint8)
    grey_d = _resample_nearest(grey, scale)
    lab_d = _resample_nearest(lab_c, scale)
    rgb = np.repeat(grey_d[:, :, None], 3, axis=2).astype(np.float32)

    # Contour width grows with the display scale so contours stay visible but thin on large pictures.
    width = max(1, int(round(min(scale) * 0.75)))
    skimage = import_skimage()
    diamond = skimage.morphology.diamond(width).astype(bool)
    objects = ndimage.find_objects(np.where(lab_d <= anatomy.NUM_STRUCTURES, lab_d, 0).astype(np.int32),
                                   max_label=anatomy.NUM_STRUCTURES)
    present = [st for st in anatomy.STRUCTURES if objects[st.value - 1] is not None]
    for st in present:
        # Work inside the structure's bounding box (plus a border for the erosion): much faster than
        # eroding the whole picture nine times.
        rows, cols = objects[st.value - 1]
        r0, r1 = max(rows.start - 1, 0), min(rows.stop + 1, lab_d.shape[0])
        c0, c1 = max(cols.start - 1, 0), min(cols.stop + 1, lab_d.shape[1])
        mask = lab_d[r0:r1, c0:c1] == st.value
        colour = _rgb255(st.color).astype(np.float32)
        patch = rgb[r0:r1, c0:c1]
        patch[mask] = (1.0 - FILL_OPACITY) * patch[mask] + FILL_OPACITY * colour
        # Contour = the mask minus its erosion by a diamond of radius `width` (outside the picture counts
        # as background, so a structure cut by the picture edge is outlined there too).
        edge = mask & ~skimage.morphology.erosion(mask, diamond, mode="constant", cval=0)
        patch[edge] = colour
    out = np.clip(np.round(rgb), 0, 255).astype(np.uint8)

    for value, box in (boxes or {}).items():
        if value not in anatomy.BY_VALUE:
            continue
        r0, c0, r1, c1 = _box_to_canonical(_pixel_bounds(box), orientation, lab.shape)
        _draw_rectangle(out, r0 * scale[0], c0 * scale[1], r1 * scale[0], c1 * scale[1],
                        _rgb255(anatomy.BY_VALUE[value].color))

    flagged_set = {int(v) for v in flagged}
    for st in present:
        if st.value not in flagged_set:
            continue
        rows, cols = objects[st.value - 1]
        for grow in (2, 3):  # a 2-pixel red frame just outside the mask's box
            _draw_rectangle(out, rows.start - grow, cols.start - grow, rows.stop + grow, cols.stop + grow, FLAG_RGB)

    if not legend:
        return out
    found = {st.value for st in present}
    return _add_legend(out, found, title, flagged_set)


def _draw_rectangle(rgb: np.ndarray, y0: float, x0: float, y1: float, x1: float, colour: np.ndarray) -> None:
    """1-pixel rectangle outline with edges at the given display coordinates (clipped to the picture)."""
    h, w = rgb.shape[:2]
    top, left = int(math.floor(y0)), int(math.floor(x0))
    bottom, right = int(math.ceil(y1)) - 1, int(math.ceil(x1)) - 1
    if bottom < top or right < left:
        return
    ys = slice(max(top, 0), min(bottom, h - 1) + 1)
    xs = slice(max(left, 0), min(right, w - 1) + 1)
    for y in (top, bottom):
        if 0 <= y < h:
            rgb[y, xs] = colour
    for x in (left, right):
        if 0 <= x < w:
            rgb[ys, x] = colour


def _load_font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)  # scalable font (Pillow ≥ 10.1 with FreeType)
    except (TypeError, OSError, ImportError):
        return ImageFont.load_default()


def _add_legend(picture: np.ndarray, found: set[int], title: str, flagged: set[int] = frozenset()) -> np.ndarray:
    """Append a legend panel on the right (swatches and names) and side letters."""
    h, w = picture.shape[:2]
    row_h = 20
    title_lines = [ln[:34] for ln in title.splitlines() if ln.strip()][:3]
    y_first = 14 + row_h * max(1, len(title_lines))
    panel_h = max(h, y_first + row_h * (anatomy.NUM_STRUCTURES + 3))
    canvas = np.zeros((panel_h, w + LEGEND_WIDTH, 3), dtype=np.uint8)
    canvas[:] = _BACKGROUND
    canvas[:h, :w] = picture
    for i, st in enumerate(anatomy.STRUCTURES):
        y = y_first + i * row_h
        colour = _rgb255(st.color) if st.value in found else (_rgb255(st.color) * 0.35).astype(np.uint8)
        canvas[y + 3:y + 15, w + 10:w + 22] = colour
    from PIL import Image, ImageDraw

    pil = Image.fromarray(canvas)
    draw = ImageDraw.Draw(pil)
    font = _load_font(13)
    big = _load_font(16)
    for n, line in enumerate(title_lines):
        draw.text((w + 10, 8 + n * row_h), line, fill=_TEXT, font=font)
    for i, st in enumerate(anatomy.STRUCTURES):
        y = y_first + i * row_h
        name = st.name if st.value in found else f"{st.name} (not found)"
        if st.value in flagged:
            name += " - check"
        fill = tuple(int(c) for c in FLAG_RGB) if st.value in flagged else (_TEXT if st.value in found else _DIM_TEXT)
        draw.text((w + 28, y + 1), name, fill=fill, font=font)
    y_note = y_first + anatomy.NUM_STRUCTURES * row_h + 10
    draw.text((w + 10, y_note), "patient right on the left", fill=_DIM_TEXT, font=font)
    draw.text((w + 10, y_note + row_h), "anterior at the top", fill=_DIM_TEXT, font=font)
    # Side letters inside the image so a screenshot alone still tells the sides.
    draw.text((6, h // 2 - 8), "R", fill=(255, 255, 0), font=big)
    draw.text((w - 16, h // 2 - 8), "L", fill=(255, 255, 0), font=big)
    draw.text((w // 2 - 5, 4), "A", fill=(255, 255, 0), font=big)
    draw.text((w // 2 - 5, h - 22), "P", fill=(255, 255, 0), font=big)
    return np.asarray(pil)


def write_png(rgb: np.ndarray, path: str | os.PathLike) -> Path:
    """Write an RGB (H, W, 3) or grey (H, W) uint8 array as PNG with Pillow (which Slicer and the package bring)."""
    from PIL import Image

    out = Path(path)
    # Level 3: a quick-look picture; level 6 (default) took several times longer for ~10 % less size.
    Image.fromarray(np.ascontiguousarray(rgb, dtype=np.uint8)).save(out, format="PNG", compress_level=3)
    return out


def save_overlay(
    path: str | os.PathLike,
    image: np.ndarray,
    labels: np.ndarray,
    slice_ijk_to_ras: Any,
    boxes: Optional[Mapping[int, Any]] = None,
    *,
    title: str = "",
    flagged: Iterable[int] = (),
) -> Path:
    """Render :func:`render_overlay` and write it as PNG at ``path``; returns the path."""
    return write_png(render_overlay(image, labels, slice_ijk_to_ras, boxes, title=title, flagged=flagged), path)
