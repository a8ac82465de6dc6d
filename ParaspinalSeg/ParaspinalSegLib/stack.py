"""Whole-stack mode: segment many slices of one volume into one scene, slice by slice, with progress and cancel.

The Slicer panel's "Segment all slices" and ``paraspinalseg segment VOLUME --slices …`` both call
:func:`segment_slices_into_scene`. It is a generator: each step segments (and measures and writes) one
slice through the "Segment slice" button's own code path (:func:`workflow.segment_slice_into_scene`) and
yields its :class:`~ParaspinalSegLib.workflow.SliceOutcome`, so the caller can show progress, keep the
GUI responsive and stop between slices. Every slice is all-or-nothing as with one slice; slices already
written stay when the run is cancelled or a slice fails. One segmentation node holds all slices (other
slices and the user's edits are kept), the table gets one row per slice × structure with the slice
index and position in every row.

``batch_size`` slices go through the network together (:meth:`SliceSegmenter.segment_many`): on CUDA
this is faster; on a CPU one at a time is as fast. MRML + numpy only; torch is reached only through the
segmenter the caller passes in.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np

from . import scene
from .errors import InputError
from .preprocessing import slice_geometry_from_volume
from .workflow import SliceOutcome, check_slice, check_volume, segment_slice_into_scene, volume_array

#: What ``--slices`` accepts (besides "all"): comma-separated indices and inclusive ranges A-B.
SLICES_HELP = "all, a range A-B (inclusive) or a list K1,K2,... (ranges allowed in the list, e.g. 0,4-7)"


def parse_slices(text: str, num_slices: int) -> list[int]:
    """Slice indices from ``--slices`` text: ``all``, ``A-B`` (inclusive), ``K1,K2,…`` or a mix (``0,4-7``).

    Returned sorted, without repeats. Out-of-range indices, empty or reversed ranges and other text are an
    :class:`InputError` naming the volume's slice range.
    """
    t = str(text or "").strip().lower()
    if num_slices < 1:
        raise InputError("the volume has no slices")
    if t == "all":
        return list(range(num_slices))
    if not t:
        raise InputError(f"--slices is empty: use {SLICES_HELP}")
    out: set[int] = set()
    for part in t.split(","):
        part = part.strip()
        m = re.fullmatch(r"(\d+)\s*-\s*(\d+)", part)
        if m:
            a, b = int(m.group(1)), int(m.group(2))
            if b < a:
                raise InputError(f"--slices range {part!r} runs backwards (use {b}-{a})")
            chosen = range(a, b + 1)
        elif re.fullmatch(r"\d+", part):
            chosen = range(int(part), int(part) + 1)
        else:
            raise InputError(f"--slices {text!r}: {part!r} is not a slice index or range; use {SLICES_HELP}")
        bad = [k for k in (chosen[0], chosen[-1]) if not 0 <= k < num_slices]
        if bad:
            raise InputError(f"--slices {text!r}: slice {bad[-1]} is outside the volume (slices 0..{num_slices - 1})")
        out.update(chosen)
    return sorted(out)


def segment_slices_into_scene(
    mrml_scene: Any,
    volume_node: Any,
    slices: Sequence[int],
    segmenter: Any,
    *,
    batch_size: int = 1,
    level: str = "",
    method: Any = "auto",
    dixon: Any = None,
    volume_ijk_to_ras: Optional[np.ndarray] = None,
    segmentation_node: Any = None,
    show_boxes: bool = True,
    progress: Optional[Callable[[int, int, SliceOutcome], None]] = None,
    cancel: Optional[Callable[[], bool]] = None,
    validated: bool = False,
) -> Iterator[SliceOutcome]:
    """Segment ``slices`` of ``volume_node`` one after another into the scene; yield each slice's outcome.

    ``progress(done, total, outcome)`` is called after each slice; ``cancel()`` is asked before each slice
    (and before each network batch) and, when it returns True, the generator stops (slices done stay).
    Every slice is checked before any network pass, so a bad slice (all one value, NaN, out of range) is an
    :class:`InputError` before the scene changes. The other arguments are those of
    :func:`workflow.segment_slice_into_scene`; ``batch_size`` slices share a network pass. ``validated``:
    the caller already ran ``check_slice`` on every slice (before loading the model), so they are not
    checked again.
    """
    check_volume(volume_node)
    ks = [int(k) for k in slices]
    if not ks:
        raise InputError("no slices to segment")
    for k in ([] if validated else ks):  # every slice checked before the first network pass (copies dropped)
        check_slice(volume_node, k)
    ijk_to_ras = scene.volume_ijk_to_ras(volume_node) if volume_ijk_to_ras is None else np.asarray(volume_ijk_to_ras, float)
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise InputError(f"batch size must be a whole number >= 1, got {batch_size!r}")
    done = 0
    for start in range(0, len(ks), int(batch_size)):
        if cancel is not None and cancel():
            return
        chunk = ks[start:start + int(batch_size)]
        voxels = volume_array(volume_node)
        results = segmenter.segment_many([np.array(voxels[k]) for k in chunk],
                                         [slice_geometry_from_volume(ijk_to_ras, k) for k in chunk],
                                         batch_size=len(chunk), validated=True)
        for k, result in zip(chunk, results):
            if done and cancel is not None and k != chunk[0] and cancel():
                return
            outcome = segment_slice_into_scene(
                mrml_scene, volume_node, k, segmenter, segmentation_node=segmentation_node, level=level,
                method=method, show_boxes=show_boxes, volume_ijk_to_ras=ijk_to_ras, validated=True,
                dixon=dixon, result=result,
            )
            segmentation_node = outcome.segmentation_node  # every slice into the same node
            done += 1
            if progress is not None:
                progress(done, len(ks), outcome)
            yield outcome
