"""Reading a Slicer segmentation file (``.seg.nrrd``) or a label image as ParaspinalSeg label values.

The one reader of segmentation files, used by ``paraspinalseg measure`` and by the trainer's
``load_slicer_pair``, with one rule for which structure a segment is (:func:`structure_of_segment`):
its ID or its name, case-insensitively, against the anatomy table's keys (``multifidus_left``, the
segment IDs the scene writer uses) and names (``left multifidus``).

Slicer writes a segment's metadata as NRRD header keys ``Segment<N>_ID``, ``_Name``, ``_Layer`` and
``_LabelValue``; a file may hold several layers (a multi-component image). SimpleITK and numpy only.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

from . import anatomy
from .errors import InputError

__all__ = [
    "SegmentEntry", "SegmentationLabels", "segment_entries", "structure_of_segment", "check_inside", "read_segmentation",
]


@dataclass(frozen=True)
class SegmentEntry:
    """One segment as the file's header describes it."""

    index: int
    id: str
    name: str
    layer: int
    label_value: int


@dataclass
class SegmentationLabels:
    """A segmentation file as label values of the anatomy table on the reference grid."""

    #: Label values ``(k, j, i)`` (or ``(j, i)`` for a 2-D file), int32; 0 where no known segment is.
    labels: np.ndarray
    #: The file's segments that are one of the nine structures, by label value (empty for a label image).
    matched: dict[int, SegmentEntry] = field(default_factory=dict)
    #: The file's segments that are not (their pixels are ``unknown_value`` in ``labels``).
    unmatched: list[SegmentEntry] = field(default_factory=list)
    #: True when the file carried Slicer segment metadata (a ``.seg.nrrd``), False for a plain label image.
    has_segments: bool = False


def segment_entries(metadata: Mapping[str, str]) -> list[SegmentEntry]:
    """The segments of a ``.seg.nrrd`` header (``{key: value}``), in the file's order."""
    fields: dict[int, dict[str, str]] = {}
    for key, value in metadata.items():
        head, _, name = key.partition("_")
        number = head[len("Segment"):]
        if head.startswith("Segment") and name and number.isdigit():
            fields.setdefault(int(number), {})[name] = value
    return [
        SegmentEntry(
            index=i,
            id=f.get("ID", "").strip(),
            name=f.get("Name", "").strip(),
            layer=int(f.get("Layer", "0") or 0),
            label_value=int(f.get("LabelValue", "1") or 1),
        )
        for i, f in sorted(fields.items())
        if "ID" in f or "Name" in f
    ]


_BY_WORD: dict[str, anatomy.Structure] = {
    **{s.name.lower(): s for s in anatomy.STRUCTURES},
    **{s.key.lower(): s for s in anatomy.STRUCTURES},
}


def structure_of_segment(segment: SegmentEntry) -> Optional[anatomy.Structure]:
    """The anatomy entry a segment stands for: its ID, else its name, as a structure key or name; else None."""
    for word in (segment.id, segment.name):
        structure = _BY_WORD.get(word.strip().lower())
        if structure is not None:
            return structure
    return None


def _same_grid(a: Any, b: Any, tol: float = 1e-4) -> bool:
    return (
        a.GetSize() == b.GetSize()
        and np.allclose(a.GetSpacing(), b.GetSpacing(), atol=tol)
        and np.allclose(a.GetOrigin(), b.GetOrigin(), atol=tol)
        and np.allclose(a.GetDirection(), b.GetDirection(), atol=tol)
    )


def _onto(image: Any, reference: Any) -> Any:
    """``image`` on the reference grid (nearest neighbour; outside the segmentation = 0)."""
    import SimpleITK as sitk

    if reference is None or _same_grid(image, reference):
        return image
    if image.GetDimension() != reference.GetDimension():
        raise InputError(f"segmentation is {image.GetDimension()}-D but the volume is {reference.GetDimension()}-D")
    return sitk.Resample(image, reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0, image.GetPixelID())


#: How far (in the volume's voxels) beyond the outermost voxel centres a labelled voxel's centre may lie and
#: still count as inside. Nearest-neighbour resampling keeps a labelled voxel whose centre falls within the
#: volume's voxels (up to half a voxel past the edge centres) and has nowhere to put one beyond: those are
#: the voxels lost. The 1e-3 absorbs the round-off of origins and spacings stored as decimal text or float32.
OUTSIDE_TOLERANCE_VOXELS = 0.5 + 1e-3


def check_inside(image: Any, reference: Any, name: str) -> None:
    """Refuse (:class:`InputError`) a label image on another grid whose labelled (non-zero) voxels reach
    beyond ``reference``'s grid within its slices: resampling onto the volume would drop them without a word
    (half the muscles gone, a CSV of empty rows). The message gives how many and what share lie outside.

    Labelled voxels on slices the volume does not have (a whole-stack segmentation measured on a sub-stack or
    an extracted slice) are not lost from any slice measured, so only the in-plane directions count for them:
    they are left out, and only a map with nothing on the volume's slices is refused as not overlapping.
    """
    import SimpleITK as sitk

    if image.GetDimension() != reference.GetDimension():
        return  # refused with its own message when resampled
    values = sitk.GetArrayViewFromImage(image)
    labelled = values != 0
    if image.GetNumberOfComponentsPerPixel() > 1:
        labelled = labelled.any(axis=-1)
    if not labelled.any():
        return
    dim = image.GetDimension()

    def index_to_physical(im: Any) -> np.ndarray:
        return np.asarray(im.GetDirection(), float).reshape(dim, dim) * np.asarray(im.GetSpacing(), float)[None, :]

    to_ref = np.linalg.solve(index_to_physical(reference), index_to_physical(image))
    shift = np.linalg.solve(index_to_physical(reference), np.asarray(image.GetOrigin(), float) - np.asarray(reference.GetOrigin(), float))
    size = np.asarray(reference.GetSize(), float)
    lo, hi = -OUTSIDE_TOLERANCE_VOXELS, size - 1 + OUTSIDE_TOLERANCE_VOXELS

    # The map is affine: when the labelled bounding box's corners all land inside, so does every voxel, and no
    # per-voxel array (hundreds of MB for a whole-stack segmentation) is needed.
    nonzero = [np.flatnonzero(labelled.any(axis=tuple(a for a in range(labelled.ndim) if a != ax))) for ax in range(labelled.ndim)]
    box = [(nz[0], nz[-1]) for nz in nonzero][::-1]  # (i, j, k) ranges
    corners = np.array(np.meshgrid(*box, indexing="ij"), float).reshape(dim, -1).T @ to_ref.T + shift
    if np.all((corners >= lo) & (corners <= hi)):
        return

    continuous = np.argwhere(labelled)[:, ::-1].astype(np.float64) @ to_ref.T + shift
    if dim == 3:  # only the volume's own slices count
        on_slices = (continuous[:, 2] >= lo) & (continuous[:, 2] <= hi[2])
        continuous = continuous[on_slices]
    n = len(continuous)
    outside = np.any((continuous < lo) | (continuous > hi), axis=1)
    n_out = int(outside.sum())
    if n == 0 or n_out == n:
        raise InputError(
            f"{name} does not overlap the volume: none of its labelled voxels lies on the volume's grid (the "
            "segmentation of another volume, or a wrong origin or orientation?)"
        )
    if n_out:
        share = 100.0 * n_out / n
        share_text = f"{share:.1f} %" if share >= 0.05 else "under 0.1 %"
        raise InputError(
            f"{name} reaches outside the volume: {n_out} of its {n} labelled voxels on the volume's slices "
            f"({share_text}) lie outside the volume's grid and would be lost (the segmentation of another volume, "
            "or a shifted origin?)"
        )


def check_label_values(values: np.ndarray, name: str) -> None:
    """Refuse an array that cannot be a label map (e.g. the image given as its own segmentation):
    NaN/Inf, non-integer values, or values outside 0..255 (label maps hold the table's small integers)."""
    if values.dtype.kind == "f":
        finite = np.isfinite(values)
        if not finite.all():
            raise InputError(f"{name} is not a label map: it holds {int((~finite).sum())} NaN or infinite values")
        fractional = values[values != np.round(values)]
        if fractional.size:
            raise InputError(
                f"{name} is not a label map: it holds non-integer values (e.g. {float(fractional.flat[0]):g}); "
                "is it the image rather than its segmentation?"
            )
    elif values.dtype.kind not in "iub":
        raise InputError(f"{name} is not a label map: its pixels are {values.dtype}")
    if values.size and (values.min() < 0 or values.max() > 255):
        raise InputError(
            f"{name} is not a label map: its values run from {values.min():g} to {values.max():g}, label values "
            "lie in 0..255 (is it the image rather than its segmentation?)"
        )


def read_segmentation(path: str | Path, reference: Any = None, unknown_value: int = 0) -> SegmentationLabels:
    """Read a ``.seg.nrrd`` (any number of layers) or a label image onto ``reference``'s grid.

    ``reference``: a SimpleITK image whose grid the labels should have (``volume_io.itk_image_like``), or
    None for the file's own grid (resampled with nearest neighbour when the grids differ, e.g. a
    ``.seg.nrrd`` cropped to its extent). Segments that are not one of the nine structures get
    ``unknown_value`` (0: dropped; the trainer uses 255, "not annotated"). A file without segment
    metadata is a label image whose values already follow the label table.
    """
    import SimpleITK as sitk

    from .volume_io import read_image

    # Missing paths, folders, truncated files (they would read as zeros) and unreadable ones: one line each.
    image = read_image(path, "a label image")
    if reference is not None and not _same_grid(image, reference):
        check_inside(image, reference, Path(path).name)
    metadata = {key: image.GetMetaData(key) for key in image.GetMetaDataKeys()}
    entries = segment_entries(metadata)
    components = image.GetNumberOfComponentsPerPixel()
    if not entries:
        if components != 1:
            raise InputError(f"{path}: a multi-component image without Slicer segment metadata")
        values = sitk.GetArrayFromImage(_onto(image, reference))
        check_label_values(values, Path(path).name)
        return SegmentationLabels(values.astype(np.int32))

    layers = [image] if components == 1 else [sitk.VectorIndexSelectionCast(image, c) for c in range(components)]
    arrays = [sitk.GetArrayFromImage(_onto(layer, reference)) for layer in layers]
    out = np.zeros(arrays[0].shape, dtype=np.int32)
    result = SegmentationLabels(out, has_segments=True)
    if unknown_value:
        # Any non-zero pixel of a segment not recognised: it may be one of ours under another name.
        for a in arrays:
            out[a != 0] = unknown_value
    for entry in entries:
        if entry.layer >= len(arrays):
            raise InputError(f"{path}: segment {entry.id!r} is on layer {entry.layer} but the file has {len(arrays)}")
        structure = structure_of_segment(entry)
        if structure is None:
            result.unmatched.append(entry)
            continue
        result.matched[structure.value] = entry
        out[arrays[entry.layer] == entry.label_value] = structure.value
    return result
