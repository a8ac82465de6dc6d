"""Score a model on labelled slices, on each slice's ORIGINAL grid, the way users will run it.

``python -m training.evaluate --weights W.json --data DIR [DIR ...] [--pair VOL SEG [K ...]] --out REPORT_DIR``

Each slice goes through :class:`ParaspinalSegLib.segmenter.SliceSegmenter` (same preprocessing, same
mapping back, same post-processing as the Slicer module and the CLI); the prediction is compared with
the slice's own labels (see :mod:`training.metrics`). HD95 uses the slice's pixel spacing in mm;
detection uses the BSN detector boxes (the final masks' boxes for a network without BSN).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch

from ParaspinalSegLib.preprocessing import pixel_spacing

from .data import PreparedData, SliceRecord, load_sources
from .metrics import score_slice
from .report import headline, write_report
from .splits import held_out, read_splits


def evaluate_segmenter(
    segmenter: Any, records: Sequence[SliceRecord], fold: Any = "", iou_threshold: float = 0.5, progress: bool = False
) -> list[dict[str, Any]]:
    """Per-slice, per-structure rows for ``records`` segmented by ``segmenter`` (a ``SliceSegmenter``).

    Structures scored: those the slice's source annotates and the model learned. Each row's
    ``ground_truth`` says whether that label was outlined by hand (``manual``) or derived by rule
    (``derived``, see ``SliceRecord.derived``); reports keep the two apart.
    """
    learned = set(segmenter.structures_learned)
    rows = []
    it = records
    if progress:
        from tqdm import tqdm

        it = tqdm(records, desc="evaluate", unit="slice", leave=False)
    for r in it:
        res = segmenter.segment(r.image, r.slice_ijk_to_ras)
        boxes = {v: b.pixel for v, b in res.detector_boxes.items()} if res.detector_boxes else None
        structures = [v for v in r.trusted_structures if v in learned]
        for row in score_slice(res.labels, r.labels, structures, pixel_spacing(r.slice_ijk_to_ras), boxes, iou_threshold):
            rows.append({"fold": fold, "source": r.source, "case_id": r.case_id, "subject_id": r.subject_id,
                         "ground_truth": r.ground_truth(row["structure"]), **row})
    return rows


def evaluate_weights(weights: str | Path, records: Sequence[SliceRecord], device: str = "cpu", mirror_tta: bool = True,
                     **kw: Any) -> list[dict[str, Any]]:
    """Load a weights file with ``SliceSegmenter`` and score it on ``records``.

    ``mirror_tta``: as the shipped segmenter does by default (slice and mirror image averaged); ``False``
    scores one network pass.
    """
    from ParaspinalSegLib.segmenter import SliceSegmenter

    return evaluate_segmenter(SliceSegmenter(weights, device=device, mirror_tta=mirror_tta), records, **kw)


@torch.no_grad()
def canonical_dice(model: torch.nn.Module, data: PreparedData, batch_size: int = 8, sag_boxes: Optional[torch.Tensor] = None) -> float:
    """Fast validation Dice on the model grid (mean over slices × trusted structures present in either).

    Used for the progress bar and the best-checkpoint choice; the reported numbers come from
    :func:`evaluate_segmenter` on the original grid. ``sag_boxes`` (N, 9, 4): the SAG query to use
    instead of the detected boxes (``training.sag_check``).
    """
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(data), batch_size):
        x = data.images[i : i + batch_size]
        y = data.labels[i : i + batch_size].long()
        t = data.trusted[i : i + batch_size]
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=x.device.type == "cuda"):
            kw = {} if sag_boxes is None else {"sag_boxes": sag_boxes[i : i + batch_size].to(x.device)}
            pred = model(x.float(), **kw)["logits"].argmax(1)
        for v in range(1, t.shape[1]):
            p, g = pred == v, y == v
            inter = (p & g).flatten(1).sum(1).float()
            s = (p.flatten(1).sum(1) + g.flatten(1).sum(1)).float()
            ok = t[:, v] & (s > 0)
            total += float((2 * inter / s.clamp_min(1))[ok].sum())
            count += int(ok.sum())
    model.train(was_training)
    return total / count if count else float("nan")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command line: evaluate one weights file on data folders / Slicer pairs and write a report."""
    ap = argparse.ArgumentParser(prog="python -m training.evaluate", description=__doc__.split("\n\n")[0])
    ap.add_argument("--weights", required=True, help="weights .json (or .safetensors) written by training")
    ap.add_argument("--data", nargs="*", default=[], help="data folders with manifest.csv")
    ap.add_argument("--pair", nargs="+", action="append", default=[], metavar="VOL SEG [K]", help="a volume and its .seg.nrrd, optional slice indices")
    ap.add_argument("--out", default=None, help="report folder (default: next to the weights, eval_<data>)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--iou-threshold", type=float, default=0.5)
    ap.add_argument("--limit", type=int, default=None, help="only the first N slices of each folder")
    ap.add_argument("--dixon-in-phase", action="store_true", help="also score the in-phase (water + fat) image of Dixon slices")
    ap.add_argument("--no-mirror-tta", dest="mirror_tta", action="store_false",
                    help="score one network pass per slice instead of the shipped default (slice and mirror image averaged)")
    ap.add_argument("--splits", default=None, metavar="FILE", help="a CV's splits_final.json: score only --fold's held-out slices")
    ap.add_argument("--fold", type=int, default=None, help="with --splits: the fold whose held-out slices to score")
    args = ap.parse_args(argv)
    if (args.splits is None) != (args.fold is None):
        ap.error("--splits and --fold go together")
    records = load_sources(args.data, args.pair, limit=args.limit, dixon_in_phase=args.dixon_in_phase)
    if args.splits is not None:
        records = held_out(records, read_splits(args.splits)[args.fold]["val"])
    rows = evaluate_weights(args.weights, records, device=args.device, mirror_tta=args.mirror_tta, iou_threshold=args.iou_threshold,
                            progress=True)
    out = Path(args.out) if args.out else Path(args.weights).parent / ("eval_" + "_".join(Path(d).name for d in args.data or ["pairs"]))
    paths = write_report(rows, out, title=f"{Path(args.weights).name} on {', '.join(args.data) or 'Slicer pairs'}")
    print(f"{headline(rows)} over {len(records)} slices; report: {paths['report']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
