"""Clean-up of predicted label images: keep one connected island per structure.

Components are scikit-image's (``skimage.measure.label``), imported when first needed so the module
imports in a Slicer Python without scikit-image.

Connectivity is 8 in 2-D (full connectivity, ``connectivity=ndim``, in any dimension): thin structures such as the lamina, or a muscle boundary after nearest-neighbour
resampling, are often joined only through a diagonal step, and 4-connectivity would cut them into
"islands" and delete real tissue.
"""

from __future__ import annotations

from typing import Iterable, Optional

import numpy as np
from scipy import ndimage

from .anatomy import BACKGROUND, NOT_ANNOTATED
from .errors import import_skimage

__all__ = ["largest_component", "keep_largest_component"]


def largest_component(mask: np.ndarray) -> np.ndarray:
    """Boolean mask of the largest 8-connected component of ``mask`` (all False if ``mask`` is empty).

    Ties go to the component found first in row-major order, so the result is deterministic.
    """
    skimage = import_skimage()
    m = np.asarray(mask).astype(bool, copy=False)
    comp, n = skimage.measure.label(m, connectivity=m.ndim, return_num=True)
    if n <= 1:
        return m.copy()
    sizes = np.bincount(comp.ravel())
    sizes[0] = 0  # background
    return comp == int(np.argmax(sizes))


def keep_largest_component(labels: np.ndarray, values: Optional[Iterable[int]] = None) -> np.ndarray:
    """Keep only the largest connected island of each label value; removed pixels become background (0).

    ``values``: the label values to clean (default: every value present except background and
    ``NOT_ANNOTATED``). Other values are left untouched. Returns a new array of the same dtype.
    """
    lab = np.asarray(labels)
    out = lab.copy()
    if values is None:
        values = [int(v) for v in np.unique(lab) if v not in (BACKGROUND, NOT_ANNOTATED)]
    values = [int(v) for v in values]
    positive = [v for v in values if v >= 1]
    # Every pixel of a value lies in its bounding box, so cleaning inside the box equals cleaning the
    # whole image at a fraction of the cost on large slices.
    boxes = ndimage.find_objects(lab, max_label=max(positive)) if positive and lab.dtype.kind in "iu" else None
    whole = tuple(slice(None) for _ in lab.shape)
    for v in values:
        box = boxes[v - 1] if boxes is not None and v >= 1 else whole
        if box is None:
            continue  # value absent
        mask = lab[box] == v
        if not mask.any():
            continue
        out[box][mask & ~largest_component(mask)] = BACKGROUND
    return out
