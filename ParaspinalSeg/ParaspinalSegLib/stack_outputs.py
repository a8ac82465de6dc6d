"""``paraspinalseg segment VOLUME --slices all|A-B|K1,K2,…``: many slices of one volume, one set of files.

Writes into the output folder, named after the volume:

- ``<name>.seg.nrrd``: one segmentation holding every segmented slice (as the Slicer panel's node would);
- ``<name>_labels.nii.gz``: label values on the volume's grid (the segmented slices non-zero);
- ``<name>_boxes.mrk.json``: one ROI per found structure and slice, named ``<structure> (slice K)``;
- ``<name>_measurements.csv``: one row per slice × structure, slice index and position (mm) in every row;
- ``<name>_slice<K>_overlay.png``: one picture per slice.

The slices go through :func:`stack.segment_slices_into_scene` (the panel's "Segment all slices" code path)
on one headless scene; ``batch_size`` slices share a network pass (worth it on CUDA). Everything is staged
on the output folder's file system and appears together (:class:`outputs.StagedOutputs`), so a failure (or
Ctrl-C) leaves the output folder as it was; existing outputs are replaced only with ``overwrite``.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np

from . import anatomy
from .outputs import StagedOutputs, check_no_existing, safe_output_name
from .volume_io import Volume, write_label_volume

STACK_SUFFIXES: dict[str, str] = {
    "segmentation": ".seg.nrrd",
    "labels": "_labels.nii.gz",
    "boxes": "_boxes.mrk.json",
    "measurements": "_measurements.csv",
}


def overlay_name(name: str, k: int) -> str:
    """File name of slice ``k``'s overlay picture."""
    return f"{name}_slice{k}_overlay.png"


@dataclass
class StackOutputs:
    """Where a stack's outputs went and what happened."""

    volume_name: str
    slices: list[int]
    level: str
    out_dir: Path
    files: dict[str, Path]
    overlays: list[Path]
    #: Structures found per slice.
    found: dict[int, list[int]]
    device: str
    model_version: str
    seconds: dict[str, float] = field(default_factory=dict)
    #: Slices that quality control flagged for a second look.
    qc_flagged: list[int] = field(default_factory=list)

    def describe(self) -> str:
        n = len(self.slices)
        counts = [len(v) for v in self.found.values()]
        lines = [f"{n} slices of {self.volume_name} segmented ({self.slices[0]}..{self.slices[-1]}); "
                 f"structures found per slice: {min(counts)}-{max(counts)}",
                 f"QC: {len(self.qc_flagged)} of {n} slices flagged"
                 + (f" (slices {', '.join(map(str, self.qc_flagged))}; QC column of the table)" if self.qc_flagged else ""),
                 f"outputs in {self.out_dir}:"]
        lines += [f"  {p.name}" for p in self.files.values()]
        lines.append(f"  {len(self.overlays)} overlay pictures ({self.overlays[0].name} ...)")
        s = self.seconds
        lines.append(f"device {self.device}; {s.get('total', 0.0):.2f} s (model load {s.get('model_load', 0.0):.2f} s, "
                     f"{s.get('per_slice', 0.0):.2f} s per slice); model {self.model_version}")
        return "\n".join(lines)


def stack_output_paths(folder: str | os.PathLike, name: str, slices: Sequence[int]) -> list[Path]:
    """Every path a stack of ``slices`` of volume ``name`` writes into ``folder``."""
    return [Path(folder) / f"{name}{suffix}" for suffix in STACK_SUFFIXES.values()] + [
        Path(folder) / overlay_name(name, int(k)) for k in slices]


def check_stack_outputs(volume: Volume, slices: Sequence[int], out_dir: str | os.PathLike) -> None:
    """Refuse (``OutputExistsError``) when any output of this stack exists already (before a model loads)."""
    check_no_existing(stack_output_paths(out_dir, safe_output_name(volume.name), slices))


def _merged_boxes(parts: Sequence[Path], path: Path) -> None:
    """Join per-slice markups files into one (entries keep their names)."""
    merged: Optional[dict] = None
    for p in parts:
        content = json.loads(p.read_text(encoding="utf-8"))
        if merged is None:
            merged = content
        else:
            merged["markups"].extend(content["markups"])
    assert merged is not None
    path.write_text(json.dumps(merged, indent=2), encoding="utf-8")


def segment_stack_to_folder(
    volume: Volume,
    slices: Sequence[int],
    out_dir: str | os.PathLike,
    segmenter: Any,
    *,
    level: str = "",
    threshold_method: Any = "auto",
    dixon: Any = None,
    batch_size: int = 1,
    name: Optional[str] = None,
    progress: Optional[Callable[[int, int, Any], None]] = None,
    overwrite: bool = False,
    validated: bool = False,
) -> StackOutputs:
    """Segment ``slices`` of ``volume`` with a loaded segmenter and write the stack's outputs (see module doc).

    ``validated``: the caller already checked every slice (``slice_outputs.check_slice``) before loading the model.
    """
    from . import scene as writers
    from .headless import SceneSession
    from .overlay import save_overlay
    from .preprocessing import slice_geometry_from_volume
    from .slice_outputs import _add_volume_node, write_boxes_file
    from .stack import segment_slices_into_scene

    t0 = time.perf_counter()
    level = (level or "").strip()
    name = safe_output_name(name or volume.name)
    out = Path(out_dir)
    ks = [int(k) for k in slices]
    if not overwrite:
        check_no_existing(stack_output_paths(out, name, ks))
    found: dict[int, list[int]] = {}
    qc_flagged: list[int] = []
    with StagedOutputs(out, overwrite=overwrite) as staged, SceneSession() as session:
        stage = staged.staging
        assert stage is not None
        scratch = staged.path(".scratch")
        scratch.mkdir()
        paths = {key: stage / f"{name}{suffix}" for key, suffix in STACK_SUFFIXES.items()}
        overlays: list[Path] = []
        box_parts: list[Path] = []
        labels = np.zeros(volume.array.shape, np.uint8)
        mrml = session.scene()
        try:
            volume_node = _add_volume_node(mrml, volume)
            outcome = None
            for outcome in segment_slices_into_scene(
                mrml, volume_node, ks, segmenter, batch_size=batch_size, level=level, method=threshold_method,
                dixon=dixon, volume_ijk_to_ras=volume.ijk_to_ras, progress=progress, validated=validated,
            ):
                k, result = outcome.k, outcome.result
                found[k] = list(result.found)
                labels[k] = result.labels
                rois = outcome.box_nodes
                for v, roi in rois.items():
                    roi.SetName(f"{anatomy.BY_VALUE[v].name} (slice {k})")
                part = scratch / f"boxes_{k}.mrk.json"
                write_boxes_file([rois[v] for v in sorted(rois)], part, scratch)
                box_parts.append(part)
                overlays.append(save_overlay(
                    stage / overlay_name(name, k), volume.array[k], result.labels,
                    slice_geometry_from_volume(volume.ijk_to_ras, k), result.boxes,
                    title=f"{name}\nslice {k}" + (f", {level}" if level else ""),
                    flagged=outcome.qc.flagged_values if outcome.qc is not None else (),
                ))
                if outcome.qc is not None and not outcome.qc.ok:
                    qc_flagged.append(k)
            assert outcome is not None
            segmentation = outcome.segmentation_node
            storage = segmentation.CreateDefaultStorageNode()
            mrml.AddNode(storage)
            storage.SetFileName(str(paths["segmentation"]))
            if not storage.WriteData(segmentation):
                raise OSError(f"could not write {paths['segmentation'].name}")
            writers.table_to_csv(outcome.table_node, paths["measurements"])
            device, version = str(outcome.result.device), str(outcome.result.model_version)
        finally:
            session.close()
        _merged_boxes(box_parts, paths["boxes"])
        write_label_volume(labels, volume, paths["labels"])
        staged.commit()  # every output exists: only now do they appear in the output folder
    total = time.perf_counter() - t0
    return StackOutputs(
        volume_name=name, slices=ks, level=level, out_dir=out.resolve(),
        files={key: out / p.name for key, p in paths.items()}, overlays=[out / p.name for p in overlays],
        found=found, device=device, model_version=version,
        seconds={"total": total, "per_slice": total / len(ks)}, qc_flagged=qc_flagged,
    )
