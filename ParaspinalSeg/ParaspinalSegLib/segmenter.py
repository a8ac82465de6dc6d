"""Segment one axial slice with a loaded BS-ESNet: labels, boxes and confidence on the input's grid.

:class:`SliceSegmenter` loads a model once and can then be called repeatedly (and from several
threads) without reloading. One call runs::

    validate input → normalise → model window (patient axes, one spacing) on the field of view's centre
    → network → softmax over background + the structures the model learned
    → mirrored pass (optional) → probabilities averaged
    → first look: structures off the window's centre or at its edge? move the window onto them, run again
    → probabilities mapped back onto the input grid (linear) → argmax → uint8 labels
    → largest connected component per structure (optional)
    → boxes (of the final mask, and the BSN detector's) in pixels and RAS, confidence per structure

Torch is imported lazily (``TorchMissingError`` with an install hint if absent), so importing this
module is cheap and works in a Slicer without PyTorch.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np
from scipy import ndimage

from .anatomy import BY_VALUE, LEFT_RIGHT_SWAP, NUM_CLASSES
from .boxes import pixel_box_iou
from .errors import InputError, ParaspinalSegError, import_torch
from .geometry import pixel_box_to_ras
from .postprocessing import keep_largest_component
from .preprocessing import (
    MAX_RECENTRES,
    ModelInput,
    NormalisationConfig,
    ResampleGrid,
    from_canonical,
    normalise_intensity,
    place_window,
    WINDOW_SPINE,
    resample_grid,
    slice_geometry_from_volume,
    to_canonical,
)
from .validation import check_slice_index, validate_slice
from .weights import WeightsConfig, load_weights

@dataclass(eq=False)
class _Job:
    """One slice on its way through :meth:`SliceSegmenter.segment_many` (window placement state)."""

    shape: tuple[int, ...]
    geometry: Any
    #: The slice normalised and anti-aliased for the model spacing (reused by every window placement).
    filtered: np.ndarray
    grid: ResampleGrid
    image: np.ndarray
    prepare_s: float = 0.0
    network_s: float = 0.0
    placements: int = 1
    probs: Optional[np.ndarray] = None
    det: Optional[np.ndarray] = None


@dataclass(frozen=True, eq=False)
class StructureBox:
    """A structure's box on the input slice: pixel bounds and the same box in patient RAS (mm)."""

    #: Half-open pixel bounds ``(p0, q0, p1, q1)`` on the input array: rows ``p0..p1-1`` of axis 0,
    #: columns ``q0..q1-1`` of axis 1 (clipped to the image).
    pixel: tuple[int, int, int, int]
    #: RAS (mm) of the box centre, shape (3,).
    center_ras: np.ndarray
    #: Extent (mm) along the slice's axis 0 and axis 1, shape (2,).
    size_mm: np.ndarray
    #: Columns: unit RAS directions of slice axis 0, axis 1 and the normal, shape (3, 3).
    axes_ras: np.ndarray


@dataclass(eq=False)
class SliceResult:
    """Everything one :meth:`SliceSegmenter.segment` call produced (all on the input's pixel grid)."""

    #: uint8 label image, same shape as the input slice (values from ``anatomy``; 0 = background).
    labels: np.ndarray
    #: Box of each found structure's final mask (what scene writers and measurements use).
    boxes: dict[int, StructureBox]
    #: The BSN detector's box of each found structure, mapped back (empty for a plain U-Net).
    detector_boxes: dict[int, StructureBox]
    #: Pixel IoU of detector box and mask box per found structure (agreement check; empty without BSN).
    box_agreement: dict[int, float]
    #: Mean of the per-pixel maximum probability inside each found structure.
    confidence: dict[int, float]
    #: Learned structures present in ``labels`` / learned structures absent, ascending label values.
    found: list[int]
    missing: list[int]
    #: Label values the model was trained on (others are never segmented).
    structures_learned: list[int]
    device: str
    #: Wall time of the whole call, seconds.
    seconds: float
    model_version: str
    #: Seconds per step: ``prepare``, ``network``, ``map_back``, ``postprocess``.
    timings: dict[str, float] = field(default_factory=dict)
    #: Per-pixel maximum class probability on the input grid (quality checks: uncertain pixels).
    max_probability: Optional[np.ndarray] = None
    #: Labels before largest-component cleaning (quality checks: fragmentation); ``labels`` when not cleaned.
    raw_labels: Optional[np.ndarray] = None
    #: RAS (mm) of the model window's centre, and how many placements it took (1 = the first look was kept).
    window_centre_ras: Optional[np.ndarray] = None
    window_placements: int = 1

    @property
    def mask_boxes(self) -> dict[int, StructureBox]:
        """Alias of :attr:`boxes` (the boxes of the final label mask)."""
        return self.boxes


class SliceSegmenter:
    """Segments single axial slices with one loaded model (loaded once, reused, thread-safe).

    ``weights``: path of a weights ``.json``/``.safetensors`` (``None``: the shipped model).
    ``device``: ``"cpu"`` (default), ``"cuda"`` (error if unavailable) or ``"auto"``.
    ``keep_largest``: keep only the largest connected component of each structure.
    ``mirror_tta`` (default on): also segment the slice mirrored across the midline (patient left ↔
    right, with the left/right structures swapped back) and average the two probability maps. One more
    network pass treats left and right exactly alike within the model window (a slice mirrored about a
    plane of the window lattice gives exactly the mirrored segmentation, so left–right asymmetry
    measurements carry no bias of the network's own) and buys a few tenths of a Dice point in
    cross-validation (``MODEL.md``); ``False`` halves the network time.
    """

    def __init__(
        self,
        weights: Union[None, str, Path] = None,
        device: Any = "cpu",
        keep_largest: bool = True,
        mirror_tta: bool = True,
        window: Optional[str] = None,
    ) -> None:
        """``window``: lay the model window as the weights say (None) or force ``"spine"`` /
        ``"field_of_view"`` (for measurements of the pipeline itself; a model is only right on the window
        it was trained on)."""
        model, config = load_weights(weights, device=device)
        self._init(model, config, keep_largest, mirror_tta, window)

    @classmethod
    def from_model(cls, model: Any, config: WeightsConfig, keep_largest: bool = True, mirror_tta: bool = True) -> "SliceSegmenter":
        """Wrap an already built model (e.g. during training/evaluation) with its weights config."""
        self = cls.__new__(cls)
        model.eval()
        self._init(model, config, keep_largest, mirror_tta)
        return self

    def _init(self, model: Any, config: WeightsConfig, keep_largest: bool, mirror_tta: bool,
              window: Optional[str] = None) -> None:
        torch = import_torch()
        self.model = model
        self.config = config
        self.keep_largest = bool(keep_largest)
        self.mirror_tta = bool(mirror_tta)
        self.device = next(model.parameters()).device
        self.model_input = ModelInput.from_dict(config.model_input)
        if window is not None:
            self.model_input = dataclasses.replace(self.model_input, window=window)
        self.normalisation = NormalisationConfig.from_dict(config.normalisation)
        self.structures_learned = [v for v in config.structures_learned if v in BY_VALUE]
        num_classes = int(getattr(getattr(model, "config", None), "num_classes", NUM_CLASSES))
        if num_classes != NUM_CLASSES:
            raise ParaspinalSegError(f"model predicts {num_classes} classes; ParaspinalSeg's label table has {NUM_CLASSES}")
        # Output channels kept: background + learned structures. A structure the training data never
        # labelled has an untrained output channel, so it is left out of the softmax entirely.
        self._channels = [0] + self.structures_learned
        self._channel_index = torch.tensor(self._channels, dtype=torch.long, device=self.device)
        self._channel_values = np.asarray(self._channels, dtype=np.uint8)
        # Output channel of each model channel's mirror image (left ↔ right), for mirror_tta.
        self._mirror_index = torch.tensor(LEFT_RIGHT_SWAP, dtype=torch.long, device=self.device)
        self._lock = threading.Lock()

    @property
    def model_version(self) -> str:
        return self.config.model_version

    # ------------------------------------------------------------------------------------------------
    def segment(self, slice_array: Any, slice_ijk_to_ras: Any, *, validated: bool = False) -> SliceResult:
        """Segment one slice ``a[p, q]`` whose geometry is the 4×4 ``slice_ijk_to_ras`` matrix.

        Raises :class:`InputError` (a ``ValueError``) for unusable input and
        :class:`NonAxialSliceError` (an ``InputError``) for a slice that is not axial.
        ``validated=True``: the caller has already passed the array through
        :func:`validation.validate_slice` (the scene workflow does, before it loads anything), so it is
        not checked a second time.
        """
        return self.segment_many([slice_array], [slice_ijk_to_ras], validated=validated)[0]

    def segment_many(self, slice_arrays: Sequence[Any], slice_ijk_to_ras: Sequence[Any], *, batch_size: int = 1,
                     validated: bool = False) -> list[SliceResult]:
        """Segment several slices, ``batch_size`` of them through the network at once; one result per slice.

        Each result equals what :meth:`segment` gives for that slice alone (``batch_size=1`` runs exactly the
        same computation; larger batches differ only by floating-point rounding). Every slice's network input
        is the same model window, so any slices share a batch. Batching pays on a GPU; on a CPU one slice at a
        time is as fast.
        """
        torch = import_torch()
        if len(slice_arrays) != len(slice_ijk_to_ras):
            raise InputError(f"{len(slice_arrays)} slices but {len(slice_ijk_to_ras)} geometries")
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise InputError(f"batch size must be a whole number >= 1, got {batch_size!r}")
        results: list[SliceResult] = []
        # batch_size slices at a time from input to result: only they hold a normalised copy in memory.
        for start in range(0, len(slice_arrays), batch_size):
            jobs = [self._start(a, g, validated) for a, g in
                    zip(slice_arrays[start:start + batch_size], slice_ijk_to_ras[start:start + batch_size])]
            self._place_and_run(torch, jobs)
            results += [self._finish(torch, j) for j in jobs]
        return results

    def _start(self, arr: Any, geometry: Any, validated: bool) -> "_Job":
        """Validate and normalise one slice; its first window sits on the field of view's centre."""
        t0 = time.perf_counter()
        arr = np.asarray(arr) if validated else validate_slice(arr)
        grid = resample_grid(arr.shape, geometry, self.model_input)
        # Normalised and anti-aliased once: both depend on the slice, not on where the window sits.
        filtered = grid.antialias(normalise_intensity(arr, self.normalisation.low, self.normalisation.high))
        image = grid.to_model(filtered, antialias=False)
        return _Job(arr.shape, geometry, filtered, grid, image, prepare_s=time.perf_counter() - t0)

    def _place_and_run(self, torch: Any, jobs: list["_Job"]) -> None:
        """Network passes until every slice's window is placed: the first look.

        A window whose structures lie more than ``RECENTRE_TOLERANCE_MM`` off its centre or run into its
        edge moves onto them and is run again (at most ``MAX_RECENTRES`` times). The look uses the
        (mirror-averaged) answer itself, so a window that is kept costs nothing extra, and a mirrored
        slice gets the mirrored window.
        """
        active = list(jobs)
        while active:
            t1 = time.perf_counter()
            x = torch.from_numpy(np.stack([j.image for j in active]))[:, None].to(self.device)
            probs, det = self._forward(torch, x)
            share = (time.perf_counter() - t1) / len(active)
            moved_jobs = []
            for n, job in enumerate(active):
                job.network_s += share
                job.probs, job.det = probs[n], None if det is None else det[n]
                if job.placements > MAX_RECENTRES or self.model_input.window != WINDOW_SPINE:
                    continue  # a field-of-view window already holds the whole slice: nothing to place
                tp = time.perf_counter()
                centre = place_window(self._channel_values[job.probs.argmax(axis=0)], job.grid)
                if centre is not None:
                    moved = resample_grid(job.shape, job.geometry, self.model_input, centre_ras=centre)
                    # The lattice may keep the window where it is (e.g. when the anatomy fills it).
                    if not np.array_equal(moved.offset, job.grid.offset):
                        job.grid, job.image = moved, moved.to_model(job.filtered, antialias=False)
                        job.placements += 1
                        moved_jobs.append(job)
                job.prepare_s += time.perf_counter() - tp
            active = moved_jobs

    def _forward(self, torch: Any, x: Any) -> tuple[np.ndarray, Optional[np.ndarray]]:
        """Class probabilities (B, C, H, W) of the learned channels, mirror-averaged if set, and detector boxes."""
        with self._lock, torch.inference_mode():
            out = self.model(x)
            probs_t = torch.softmax(out["logits"].index_select(1, self._channel_index).float(), dim=1)
            if self.mirror_tta:
                # Model columns run patient right → left, so flipping them mirrors the patient; the mirrored
                # pass's left-structure channel is the original's right structure and vice versa.
                mirrored = self.model(torch.flip(x, dims=[-1]))["logits"]
                mirrored = torch.flip(mirrored.index_select(1, self._mirror_index), dims=[-1])
                probs_t = 0.5 * (probs_t + torch.softmax(mirrored.index_select(1, self._channel_index).float(), dim=1))
            probs = probs_t.cpu().numpy()
            det = out["boxes"].float().cpu().numpy() if "boxes" in out else None
        return probs, det

    def _finish(self, torch: Any, job: "_Job") -> SliceResult:
        """Probabilities of one slice → labels, boxes and confidence on its input grid."""
        t2 = time.perf_counter()
        probs, det, grid = job.probs, job.det, job.grid
        # Probabilities (not labels) go back to the input grid so the argmax is taken at full
        # resolution: edges follow the interpolated probabilities instead of the model's pixels.
        # Outside the window: background with certainty.
        probs_in = grid.to_input(probs, order=1, cval=np.eye(len(self._channels), 1)[:, 0])
        # torch's max gives value and index in one pass, several times faster than numpy's argmax
        # over the leading axis.
        max_t, index_t = torch.from_numpy(np.ascontiguousarray(probs_in)).max(dim=0)
        max_prob = max_t.numpy()
        labels = self._channel_values[index_t.numpy()]
        t3 = time.perf_counter()

        raw_labels = labels
        if self.keep_largest:
            # Cleaned in the canonical (patient-fixed) orientation so that a tie between equal islands
            # is broken the same way whether the file stores the slice as LPS, RAS or transposed.
            canonical = to_canonical(labels, grid.orientation)
            labels = from_canonical(keep_largest_component(canonical, self.structures_learned), grid.orientation)
        result = self._describe(labels, max_prob, det, grid)
        result.max_probability, result.raw_labels = max_prob, raw_labels  # for the quality checks
        t4 = time.perf_counter()
        result.timings = {"prepare": job.prepare_s, "network": job.network_s, "map_back": t3 - t2, "postprocess": t4 - t3}
        result.seconds = job.prepare_s + job.network_s + t4 - t2
        result.window_centre_ras = grid.centre_ras
        result.window_placements = job.placements
        return result

    def segment_volume_slice(self, volume_array_kji: Any, volume_ijk_to_ras: Any, k: int) -> SliceResult:
        """Segment slice ``k`` of a volume array in Slicer/SimpleITK order ``arr[k, j, i]``."""
        vol = np.asarray(volume_array_kji)
        if vol.ndim != 3:
            raise InputError(f"expected a 3-D volume array (k, j, i), got shape {vol.shape}")
        k = check_slice_index(k, vol.shape[0])
        return self.segment(vol[k], slice_geometry_from_volume(volume_ijk_to_ras, k))

    # ------------------------------------------------------------------------------------------------
    def _describe(self, labels: np.ndarray, max_prob: np.ndarray, det: Optional[np.ndarray], grid: ResampleGrid) -> SliceResult:
        m = grid.slice_ijk_to_ras
        n0, n1 = labels.shape
        # One pass over the image for all structures' bounding slices and mean confidence.
        objects = ndimage.find_objects(labels, max_label=NUM_CLASSES - 1)
        found = [v for v in self.structures_learned if objects[v - 1] is not None]
        means = ndimage.mean(max_prob, labels=labels, index=found) if found else []
        confidence = {v: float(c) for v, c in zip(found, np.atleast_1d(means))}

        boxes: dict[int, StructureBox] = {}
        detector_boxes: dict[int, StructureBox] = {}
        agreement: dict[int, float] = {}
        for v in found:
            sp, sq = objects[v - 1]
            pix = (int(sp.start), int(sq.start), int(sp.stop), int(sq.stop))
            boxes[v] = StructureBox(pix, *pixel_box_to_ras(pix, m))
            if det is not None:
                p0, q0, p1, q1 = grid.box_to_input(*(float(t) for t in det[v - 1]))
                # RAS from the unclipped box (what the detector said); pixels clipped to the image.
                rb = grid.box_to_ras(*(float(t) for t in det[v - 1]))
                dpix = (
                    int(np.clip(round(p0), 0, n0)),
                    int(np.clip(round(q0), 0, n1)),
                    int(np.clip(round(p1), 0, n0)),
                    int(np.clip(round(q1), 0, n1)),
                )
                detector_boxes[v] = StructureBox(dpix, rb.center_ras, rb.size_mm, rb.axes_ras)
                agreement[v] = pixel_box_iou((p0, q0, p1, q1), pix)
        return SliceResult(
            labels=labels,
            boxes=boxes,
            detector_boxes=detector_boxes,
            box_agreement=agreement,
            confidence=confidence,
            found=found,
            missing=[v for v in self.structures_learned if v not in found],
            structures_learned=list(self.structures_learned),
            device=str(self.device),
            seconds=0.0,
            model_version=self.model_version,
        )
