"""Training data: read labelled axial slices, split them by subject and cache them on the model's grid.

Two kinds of source, freely mixed in one run:

* a ``../shared/data``-style folder: NIfTI pairs ``<case>_img.nii.gz`` / ``<case>_lbl.nii.gz`` (shape
  (X, Y, 1)) and a ``manifest.csv`` with ``subject_id`` and ``trusted_classes`` per slice; label 255 =
  not annotated (:func:`load_source_folder`). A derived source (``training.derive_labels``) adds
  ``derived_classes``: the trusted structures whose labels were derived by rule, not outlined by hand;
  the record keeps them (``SliceRecord.derived``) so reports never mix them with manual ones;
* a Slicer-style pair: a volume plus its ``.seg.nrrd`` from Segment Editor, one chosen slice or every
  labelled slice (:func:`load_slicer_pair`). Segments map to label values by ID (``anatomy.BY_KEY``) or
  name; structures without a segment are untrusted, so an unlabelled pixel of such a slice means
  "background or one of the missing structures" (``trusted[0] = False``, see ``losses``).

Each slice is prepared ONCE with the library's own :func:`ParaspinalSegLib.preprocessing.prepare_slice`
(the patient's axes, one spacing, normalisation: exactly what inference does), on a window centred on
the labelled structures (:func:`~ParaspinalSegLib.preprocessing.anatomy_centre_ras`, the same definition
of "the spine's centre" that inference applies to its first look), and labels are brought onto the same
grid with ``grid.to_model(order=0)``; :class:`PreparedData` holds the results as tensors. The spatial
augmentation (``augment``) then rotates, scales and shifts in patient space around that centre.
"""

from __future__ import annotations

import csv
import dataclasses
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence

import numpy as np

from ParaspinalSegLib.anatomy import BY_KEY, NOT_ANNOTATED, NUM_CLASSES, STRUCTURES
from ParaspinalSegLib.preprocessing import (
    ModelInput,
    WINDOW_SPINE,
    NormalisationConfig,
    ResampleGrid,
    anatomy_centre_ras,
    prepare_slice,
    slice_geometry_from_nifti_affine,
    slice_geometry_from_volume,
)


@dataclass(eq=False)
class SliceRecord:
    """One labelled slice on its own (input) grid."""

    source: str
    case_id: str
    subject_id: str
    #: 2-D image ``a[p, q]`` as stored.
    image: np.ndarray
    #: uint8, same shape; 0 background, 1..9 structures, 255 not annotated.
    labels: np.ndarray
    #: 4×4 IJK-to-RAS of the slice (contract convention).
    slice_ijk_to_ras: np.ndarray
    #: (10,) bool: entry c ≥ 1 = the source annotates structure c; entry 0 = label 0 is certain background.
    trusted: np.ndarray
    info: dict[str, Any] = field(default_factory=dict)
    #: Trusted structures whose labels are DERIVED (rule-based, reviewed by eye; ``training.derive_labels``),
    #: not an annotator's outline; the rest of ``trusted_structures`` are manual. Sorted values.
    derived: tuple[int, ...] = ()

    @property
    def group(self) -> str:
        """Split key: subjects of different sources never share a fold by accident of equal IDs."""
        return f"{self.source}/{self.subject_id}"

    @property
    def trusted_structures(self) -> list[int]:
        return [int(v) for v in np.flatnonzero(self.trusted[1:]) + 1]

    def ground_truth(self, structure: int) -> str:
        """``"derived"`` when this slice's label of ``structure`` was derived by rule, else ``"manual"``."""
        return "derived" if int(structure) in self.derived else "manual"


def trusted_mask(classes: Iterable[int], zero_is_background: bool = True) -> np.ndarray:
    """(10,) bool from a list of annotated structure values."""
    m = np.zeros(NUM_CLASSES, dtype=bool)
    m[0] = zero_is_background
    for v in classes:
        v = int(v)
        if not 1 <= v < NUM_CLASSES:
            raise ValueError(f"trusted class {v} is not a structure value 1..{NUM_CLASSES - 1}")
        m[v] = True
    return m


def _parse_classes(text: str) -> list[int]:
    return [int(t) for t in str(text).replace(",", ";").split(";") if t.strip()]


def manifest_derived(row: Mapping[str, str], trusted: np.ndarray) -> tuple[int, ...]:
    """The derived structures of one manifest row (``derived_classes``; none without the column).

    A derived class must be trusted: an untrusted one is never scored, so naming it means the manifest
    is inconsistent and the report could not say what its figures rest on.
    """
    derived = tuple(sorted(set(_parse_classes(row.get("derived_classes") or ""))))
    untrusted = [v for v in derived if not (1 <= v < NUM_CLASSES and trusted[v])]
    if untrusted:
        raise ValueError(f"{row.get('case_id', '?')}: derived_classes {untrusted} are not in trusted_classes")
    return derived


def read_manifest_derived(folder: str | Path) -> dict[str, tuple[int, ...]]:
    """``{case_id: derived structures}`` from a source folder's ``manifest.csv`` alone (no images read)."""
    manifest = Path(folder) / "manifest.csv"
    if not manifest.is_file():
        raise FileNotFoundError(f"{folder} has no manifest.csv (not a ParaspinalSeg data folder)")
    with open(manifest, newline="", encoding="utf-8") as f:
        return {row["case_id"]: manifest_derived(row, trusted_mask(_parse_classes(row["trusted_classes"])))
                for row in csv.DictReader(f)}


def load_source_folder(folder: str | Path, limit: Optional[int] = None, dixon_in_phase: bool = False) -> list[SliceRecord]:
    """Read a ``../shared/data``-style source folder (``manifest.csv`` + NIfTI pairs).

    ``limit``: read only the first ``limit`` manifest rows (tests).
    ``dixon_in_phase``: for slices that come with a Dixon fat image (``*_fat.nii.gz`` in ``extra_files``), also
    add the in-phase image water + fat as a second record of the same subject. The Dixon water image has
    dark fat; T2 TSE, the contrast users bring, has bright fat. Seeing both teaches the network that the
    muscles, not the brightness of the fat around them, define the structures.
    """
    import nibabel as nib

    folder = Path(folder)
    manifest = folder / "manifest.csv"
    if not manifest.exists():
        raise FileNotFoundError(f"{folder} has no manifest.csv (not a ParaspinalSeg data folder)")
    with open(manifest, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    if limit is not None:
        rows = rows[:limit]
    records = []
    for row in rows:
        img = nib.load(str(folder / row["img_file"]))
        lbl = nib.load(str(folder / row["lbl_file"]))
        a = np.asanyarray(img.dataobj)
        lab = np.asanyarray(lbl.dataobj)
        if a.ndim == 3:
            a, lab = a[:, :, 0], lab[:, :, 0]
        if a.shape != lab.shape:
            raise ValueError(f"{row['case_id']}: image {a.shape} and labels {lab.shape} differ")
        trusted = trusted_mask(_parse_classes(row["trusted_classes"]), zero_is_background=True)
        lab = lab.astype(np.uint8)
        # A label of an untrusted class (should not occur) is treated as not annotated.
        bad = (lab != NOT_ANNOTATED) & (lab != 0) & ~trusted[np.minimum(lab, NUM_CLASSES - 1)]
        lab = np.where(bad | (lab >= NUM_CLASSES) & (lab != NOT_ANNOTATED), NOT_ANNOTATED, lab).astype(np.uint8)
        record = SliceRecord(
            source=folder.name,
            case_id=row["case_id"],
            subject_id=row.get("subject_id") or row["case_id"],
            image=np.asarray(a),
            labels=lab,
            slice_ijk_to_ras=slice_geometry_from_nifti_affine(img.affine, 0),
            trusted=trusted,
            info={"file": row["img_file"]},
            derived=manifest_derived(row, trusted),
        )
        records.append(record)
        fat_files = [f for f in (row.get("extra_files") or "").split(";") if f.strip().endswith("_fat.nii.gz")]
        if dixon_in_phase and fat_files:
            fat = np.asanyarray(nib.load(str(folder / fat_files[0].strip())).dataobj)
            fat = fat[:, :, 0] if fat.ndim == 3 else fat
            if fat.shape != a.shape:
                raise ValueError(f"{row['case_id']}: fat image {fat.shape} and water image {a.shape} differ")
            in_phase = np.asarray(a, np.float32) + np.asarray(fat, np.float32)
            records.append(dataclasses.replace(
                record, case_id=record.case_id + "_inphase", image=in_phase,
                info={**record.info, "contrast": "in-phase (Dixon water + fat)"}))
    return records


def load_slicer_pair(
    volume_path: str | Path,
    segmentation_path: str | Path,
    slices: Optional[Sequence[int]] = None,
    subject_id: Optional[str] = None,
) -> list[SliceRecord]:
    """Read a volume and its Segment Editor ``.seg.nrrd`` as training slices.

    ``slices``: volume slice indices k (array order ``arr[k, j, i]``); ``None`` = every slice with at
    least one recognised segment pixel. The segmentation is resampled (nearest) onto the volume grid.
    Pixels of unrecognised segments become 255 (they may be one of our structures under another name).
    """
    from ParaspinalSegLib.segfile import read_segmentation
    from ParaspinalSegLib.validation import check_slice_index
    from ParaspinalSegLib.volume_io import itk_image_like, read_volume

    vol = read_volume(volume_path)
    # Segments the table does not know are "not annotated" (255): they may be one of ours under another name.
    read = read_segmentation(segmentation_path, itk_image_like(vol.array, vol), unknown_value=NOT_ANNOTATED)
    mapping = read.matched
    if not mapping:
        raise ValueError(f"{segmentation_path}: no segment named or with an ID of a ParaspinalSeg structure")
    shape = vol.array.shape
    labels = read.labels.reshape(shape).astype(np.uint8)
    trusted = trusted_mask(mapping, zero_is_background=len(mapping) == NUM_CLASSES - 1)
    if slices is None:
        structure_pixels = (labels > 0) & (labels != NOT_ANNOTATED)
        slices = [int(k) for k in np.flatnonzero(structure_pixels.reshape(shape[0], -1).any(1))]
    records = []
    for k in slices:
        k = check_slice_index(k, shape[0], vol.name)
        records.append(
            SliceRecord(
                source=vol.name,
                case_id=f"{vol.name}_k{k:03d}",
                subject_id=subject_id or vol.name,
                image=vol.array[k],
                labels=labels[k].copy(),
                slice_ijk_to_ras=slice_geometry_from_volume(vol.ijk_to_ras, k),
                trusted=trusted.copy(),
                info={"k": int(k), "segmentation": str(segmentation_path)},
            )
        )
    return records


def load_sources(folders: Sequence[str | Path] = (), pairs: Sequence[Sequence[str]] = (), limit: Optional[int] = None,
                 dixon_in_phase: bool = False) -> list[SliceRecord]:
    """Read several sources into one list. ``pairs``: ``(volume, seg.nrrd, [k, ...])`` tuples.
    ``dixon_in_phase``: see :func:`load_source_folder`."""
    records: list[SliceRecord] = []
    for folder in folders:
        records += load_source_folder(folder, limit=limit, dixon_in_phase=dixon_in_phase)
    for pair in pairs:
        if len(pair) < 2:
            raise ValueError(f"a Slicer pair needs VOLUME SEGMENTATION [K ...], got {list(pair)}")
        ks = [int(k) for k in pair[2:]] or None
        records += load_slicer_pair(pair[0], pair[1], ks)
    if not records:
        raise ValueError("no training slices: give --data folders and/or --pair VOLUME SEG")
    return records


def subject_folds(records: Sequence[SliceRecord], k: int = 5, seed: int = 0) -> list[list[int]]:
    """Split record indices into ``k`` folds by subject (``source/subject_id``), balancing slice counts.

    Subjects are shuffled with ``seed`` and each goes (largest first) to the fold with fewest slices,
    so one subject's slices are always in a single fold.
    """
    groups: dict[str, list[int]] = {}
    for i, r in enumerate(records):
        groups.setdefault(r.group, []).append(i)
    if len(groups) < k:
        raise ValueError(f"{len(groups)} subjects cannot make {k} subject-wise folds")
    names = sorted(groups)
    random.Random(seed).shuffle(names)
    names.sort(key=lambda g: -len(groups[g]))  # stable: ties keep the shuffled order
    folds: list[list[int]] = [[] for _ in range(k)]
    for g in names:
        min(folds, key=len).extend(groups[g])
    return [sorted(f) for f in folds]


@dataclass(eq=False)
class PreparedData:
    """Slices on the model grid as tensors (kept on one device for the whole run)."""

    #: (N, 1, S, S) float32, normalised like inference.
    images: Any
    #: (N, S, S) uint8 with 255 = not annotated.
    labels: Any
    #: (N, 10) bool.
    trusted: Any
    records: list[SliceRecord]
    grids: list[ResampleGrid]

    def __len__(self) -> int:
        return len(self.records)

    def to(self, device: Any) -> "PreparedData":
        return PreparedData(self.images.to(device), self.labels.to(device), self.trusted.to(device), self.records, self.grids)

    def subset(self, indices: Sequence[int]) -> "PreparedData":
        import torch

        idx = torch.as_tensor(list(indices), dtype=torch.long, device=self.images.device)
        return PreparedData(
            self.images[idx], self.labels[idx], self.trusted[idx],
            [self.records[i] for i in indices], [self.grids[i] for i in indices],
        )


def prepare_records(
    records: Sequence[SliceRecord],
    model_input: ModelInput | Mapping[str, Any],
    normalisation: NormalisationConfig | Mapping[str, Any],
) -> PreparedData:
    """Preprocess every slice once, exactly as inference does, and stack the results as CPU tensors."""
    import torch

    mi = model_input if isinstance(model_input, ModelInput) else ModelInput.from_dict(model_input)
    norm = normalisation if isinstance(normalisation, NormalisationConfig) else NormalisationConfig.from_dict(normalisation)
    n, s = len(records), mi.size
    images = np.zeros((n, 1, s, s), dtype=np.float32)
    labels = np.zeros((n, s, s), dtype=np.uint8)
    grids = []
    for i, r in enumerate(records):
        # Only the structures the slice trusts place the window (an untrusted value never comes here).
        centre = (anatomy_centre_ras(r.labels, r.slice_ijk_to_ras, r.trusted_structures)
                  if mi.window == WINDOW_SPINE else None)
        prepared = prepare_slice(r.image, r.slice_ijk_to_ras, mi, norm, centre_ras=centre)
        images[i, 0] = prepared.image
        # Same grid, nearest neighbour: a label lands where its pixel lands in the image. Outside the
        # field of view (padding) is background, as the model sees nothing there.
        labels[i] = prepared.grid.to_model(r.labels, order=0, cval=0)
        grids.append(prepared.grid)
    trusted = np.stack([r.trusted for r in records]) if records else np.zeros((0, NUM_CLASSES), bool)
    return PreparedData(torch.from_numpy(images), torch.from_numpy(labels), torch.from_numpy(trusted), list(records), grids)


def structures_learned(records: Sequence[SliceRecord]) -> list[int]:
    """Structures annotated by at least one training slice (recorded with the weights)."""
    m = np.zeros(NUM_CLASSES, dtype=bool)
    for r in records:
        m |= r.trusted
    return [int(v) for v in np.flatnonzero(m[1:]) + 1]
