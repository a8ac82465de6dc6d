"""Does BS-ESNet's segmentation use its boxes? Held-out Dice with the SAG query from three sources.

``python -m training.sag_check --weights runs/cv_bsesnet/fold_0/final.json --data ../shared/data/sy_lumbar_muscle``

The spatial attention gate's query is the BSN's detected boxes. This scores the same weights on the
model grid (as :func:`training.evaluate.canonical_dice`) with the query built from (1) the detected boxes,
(2) the ground-truth boxes of each slice's labels and (3) no boxes at all (an empty query: the gate then
sees only its key). If (1)–(3) agree, the trained network does not rely on the boxes, however good they
are. Weights trained on one fold of a cross-validation are scored on that fold's held-out slices (the
split is read from the weights' training record); other weights on every slice given.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Optional, Sequence

import torch

from ParaspinalSegLib.weights import load_weights

from .data import load_sources, prepare_records, subject_folds
from .evaluate import canonical_dice
from .losses import boxes_from_labels_torch


def sag_dependence(model: torch.nn.Module, data: Any, batch_size: int = 8) -> dict[str, float]:
    """Model-grid mean Dice of ``model`` on ``data`` (a ``PreparedData``) for each source of the SAG query."""
    if getattr(model, "sag", None) is None:
        raise ValueError("this network has no spatial attention gate (plain U-Net or 'without SAG')")
    truth, _ = boxes_from_labels_torch(data.labels)
    return {
        "detected_boxes": canonical_dice(model, data, batch_size),
        "ground_truth_boxes": canonical_dice(model, data, batch_size, sag_boxes=truth),
        "no_boxes": canonical_dice(model, data, batch_size, sag_boxes=torch.zeros_like(truth)),
    }


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command line (see the module docstring); prints one JSON object."""
    ap = argparse.ArgumentParser(prog="python -m training.sag_check", description=__doc__.split("\n\n")[0])
    ap.add_argument("--weights", required=True, help="BS-ESNet weights .json written by training")
    ap.add_argument("--data", nargs="+", required=True, help="data folders with manifest.csv")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    model, config = load_weights(args.weights, device=args.device)
    model.eval()
    records = load_sources(args.data, [], dixon_in_phase=False)
    folds = (config.training or {}).get("folds") or {}
    scope = "all slices given"
    if folds.get("fold") is not None:
        held = subject_folds(records, int(folds["k"]), int(folds["seed"]))[int(folds["fold"])]
        records = [records[i] for i in held]
        scope = f"held-out fold {folds['fold']} of {folds['k']}"
    data = prepare_records(records, config.model_input, config.normalisation).to(model.head.weight.device)
    result = {"weights": args.weights, "slices": len(records), "scope": scope, **sag_dependence(model, data)}
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
