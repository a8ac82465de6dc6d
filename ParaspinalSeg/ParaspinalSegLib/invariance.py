"""Does a result depend on how the slice was acquired? CSA on re-gridded copies of the same anatomy.

The same patient-space anatomy is presented on other pixel grids — the field of view zero-padded to
1.5× (centred, or with the slice in a corner), and the pixel axes rotated in-plane by ±10° / ±20° with
the IJK-to-RAS matrix rotated to match (the image resampled, so every structure stays where it is in
patient space) — and each structure's cross-sectional area is compared with the original slice's.
A model that sees every slice in the patient's axes at one spacing gives the same areas.

Run ``python -m ParaspinalSegLib.invariance --weights W --data FOLDER [--cases N]`` on a
``../shared/data``-style folder; prints the largest relative CSA change per variant and structure.
The builders are plain numpy/scipy functions (the tests use them too).
"""

from __future__ import annotations

import argparse
import math
import sys
from typing import Any, Callable, Optional, Sequence

import numpy as np
from scipy import ndimage

from .anatomy import BY_VALUE

#: Variant name → builder(image, matrix) → (image, matrix).
Builder = Callable[[np.ndarray, np.ndarray], "tuple[np.ndarray, np.ndarray]"]


def pad_slice(image: np.ndarray, matrix: np.ndarray, factor: float = 1.5, where: str = "centre") -> tuple[np.ndarray, np.ndarray]:
    """Zero-pad the field of view to ``factor``× along both axes; ``where``: ``"centre"`` or ``"corner"``.

    The matrix's origin moves so every original pixel keeps its RAS position.
    """
    n0, n1 = image.shape
    m0, m1 = int(round(n0 * factor)), int(round(n1 * factor))
    p0, q0 = ((m0 - n0) // 2, (m1 - n1) // 2) if where == "centre" else (0, 0)
    out = np.zeros((m0, m1), dtype=image.dtype)
    out[p0:p0 + n0, q0:q0 + n1] = image
    m = np.array(matrix, dtype=np.float64)
    m[:3, 3] = (m @ np.array([-p0, -q0, 0.0, 1.0]))[:3]
    return out, m


def rotate_slice(image: np.ndarray, matrix: np.ndarray, degrees: float, order: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """Rotate the pixel axes by ``degrees`` about the slice normal through the field of view's centre.

    The new grid has the same pixel spacing and is large enough to hold the whole original field of
    view; the image is resampled (cubic spline by default, zero outside), so the anatomy in patient
    space is unchanged: as when the same patient lies rotated in the scanner.
    """
    m = np.array(matrix, dtype=np.float64)
    n0, n1 = image.shape
    t = math.radians(degrees)
    c, s = math.cos(t), math.sin(t)
    # Rotation within the plane, in pixel-axis units of the original grid (spacings may differ).
    s0, s1 = np.linalg.norm(m[:3, 0]), np.linalg.norm(m[:3, 1])
    d0, d1 = m[:3, 0] / s0, m[:3, 1] / s1
    new_d0, new_d1 = c * d0 + s * d1, -s * d0 + c * d1
    k0 = int(math.ceil(abs(c) * n0 + abs(s) * n1 * s1 / s0)) | 1
    k1 = int(math.ceil(abs(s) * n0 * s0 / s1 + abs(c) * n1)) | 1
    centre = m @ np.array([(n0 - 1) / 2, (n1 - 1) / 2, 0.0, 1.0])
    new = np.eye(4)
    new[:3, 0], new[:3, 1], new[:3, 2] = new_d0 * s0, new_d1 * s1, m[:3, 2]
    new[:3, 3] = centre[:3] - new[:3, 0] * (k0 - 1) / 2 - new[:3, 1] * (k1 - 1) / 2
    # New pixel (p', q') → RAS → old pixel (p, q): an affine map, resampled in one pass.
    to_old = np.linalg.pinv(m[:3, :2])
    lin = to_old @ new[:3, :2]
    off = to_old @ (new[:3, 3] - m[:3, 3])
    out = ndimage.affine_transform(image.astype(np.float64), lin, offset=off, output_shape=(k0, k1),
                                   order=order, mode="constant", cval=0.0)
    if np.issubdtype(image.dtype, np.integer):
        info = np.iinfo(image.dtype)
        out = np.clip(np.round(out), info.min, info.max)
    return out.astype(image.dtype), new


VARIANTS: dict[str, Builder] = {
    "padded 1.5x": lambda a, m: pad_slice(a, m, 1.5, "centre"),
    "padded 1.5x, slice in a corner": lambda a, m: pad_slice(a, m, 1.5, "corner"),
    "rotated +10": lambda a, m: rotate_slice(a, m, 10.0),
    "rotated -10": lambda a, m: rotate_slice(a, m, -10.0),
    "rotated +20": lambda a, m: rotate_slice(a, m, 20.0),
    "rotated -20": lambda a, m: rotate_slice(a, m, -20.0),
}


def csa_mm2(labels: np.ndarray, matrix: np.ndarray, values: Sequence[int]) -> dict[int, float]:
    """Area (mm²) of each label value on a slice grid (pixel area from the matrix)."""
    m = np.asarray(matrix, dtype=np.float64)
    area = float(np.linalg.norm(np.cross(m[:3, 0], m[:3, 1])))
    counts = np.bincount(np.asarray(labels).ravel(), minlength=256)
    return {int(v): float(counts[v]) * area for v in values}


def relative_changes(segment: Callable[[np.ndarray, np.ndarray], np.ndarray], image: np.ndarray, matrix: np.ndarray,
                     values: Sequence[int], variants: Optional[dict[str, Builder]] = None) -> dict[str, dict[int, float]]:
    """``{variant: {value: CSA(variant) / CSA(original) - 1}}``; ``segment(image, matrix)`` → labels.

    A structure absent from the original is left out; absent from a variant only, it counts as −100 %.
    """
    ref = csa_mm2(segment(image, matrix), matrix, values)
    out: dict[str, dict[int, float]] = {}
    for name, build in (variants or VARIANTS).items():
        a, m = build(image, matrix)
        got = csa_mm2(segment(a, m), m, values)
        out[name] = {v: got[v] / ref[v] - 1.0 for v in values if ref[v] > 0}
    return out


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ParaspinalSegLib.invariance", description=__doc__.splitlines()[0])
    parser.add_argument("--weights", help="weights .json (default: the shipped model)")
    parser.add_argument("--data", required=True, help="a ../shared/data-style folder (manifest.csv + NIfTI pairs)")
    parser.add_argument("--cases", type=int, default=6, help="number of slices, evenly spread over the manifest")
    parser.add_argument("--no-mirror-tta", action="store_true")
    parser.add_argument("--window", choices=("spine", "field_of_view"),
                        help="lay the model window this way instead of as the weights say")
    args = parser.parse_args(argv)

    import csv
    from pathlib import Path

    import nibabel as nib

    from .preprocessing import slice_geometry_from_nifti_affine
    from .segmenter import SliceSegmenter

    seg = SliceSegmenter(args.weights, mirror_tta=not args.no_mirror_tta, window=args.window)
    folder = Path(args.data)
    rows = list(csv.DictReader(open(folder / "manifest.csv", newline="", encoding="utf-8")))
    step = max(1, len(rows) // max(1, args.cases))
    worst: dict[str, dict[int, float]] = {}
    for row in rows[::step][: args.cases]:
        img = nib.load(str(folder / row["img_file"]))
        a = np.asanyarray(img.dataobj)
        a = a[:, :, 0] if a.ndim == 3 else a
        m = slice_geometry_from_nifti_affine(img.affine, 0)
        changes = relative_changes(lambda x, y: seg.segment(x, y).labels, a, m, seg.structures_learned)
        for name, per in changes.items():
            line = " ".join(f"{BY_VALUE[v].key}={100 * d:+.1f}%" for v, d in per.items())
            print(f"{row['case_id']:>12s} {name:32s} {line}")
            w = worst.setdefault(name, {})
            for v, d in per.items():
                w[v] = d if abs(d) > abs(w.get(v, 0.0)) else w.get(v, 0.0)
    print("\nlargest change per variant and structure:")
    for name, per in worst.items():
        print(f"{name:32s} " + " ".join(f"{BY_VALUE[v].key}={100 * d:+.1f}%" for v, d in per.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
