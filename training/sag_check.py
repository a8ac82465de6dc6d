"""Does BS-ESNet's segmentation use its boxes? Held-out Dice with the SAG query from three sources.

``python -m training.sag_check --weights runs/cv_bsesnet/fold_0/final.json --data ../shared/data/sy_lumbar_muscle``

The spatial attention gate's query is the BSN's detected boxes. This scores the same weights on the
model grid (as :func:`training.evaluate.canonical_dice`) with the query built from (1) the detected boxes,
(2) the ground-truth boxes of each slice's labels and (3) no boxes at all (an empty query: the gate then
sees only its key). If (1)–(3) agree, the trained network does not rely on the boxes, however good they
are. Weights trained on one fold of a cross-validation are scored on that fold's held-out slices (listed
in the weights' training record, or ``--splits FILE --fold K``); other weights on every slice given.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Optional, Sequence

import torch

from ParaspinalSegLib.weights import load_weights

from .data import load_sources, prepare_records
from .evaluate import canonical_dice
from .losses import boxes_from_labels_torch
from .splits import held_out, read_splits


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
    ap.add_argument("--splits", default=None, metavar="FILE", help="a CV's splits_final.json (with --fold)")
    ap.add_argument("--fold", type=int, default=None, help="the fold of --splits whose held-out slices to score")
    args = ap.parse_args(argv)
    model, config = load_weights(args.weights, device=args.device)
    model.eval()
    training = config.training or {}
    # The data as the weights were trained on it (Dixon in-phase slices included or not), so held-out ids match.
    records = load_sources(args.data, [], dixon_in_phase=bool((training.get("config") or {}).get("dixon_in_phase")))
    folds = training.get("folds") or {}
    scope = "all slices given"
    if args.splits is not None:
        if args.fold is None:
            ap.error("--splits needs --fold")
        records = held_out(records, read_splits(args.splits)[args.fold]["val"])
        scope = f"held-out fold {args.fold} of {args.splits}"
    elif folds.get("fold") is not None:
        # The held-out slices as the weights' training record lists them: never folds rebuilt here.
        cases = folds.get("held_out_cases")
        if not cases:
            ap.error("these fold weights do not record their held-out slices: pass the CV's --splits and --fold")
        records = held_out(records, cases)
        scope = f"held-out fold {folds['fold']} of {folds['k']}"
    data = prepare_records(records, config.model_input, config.normalisation).to(model.head.weight.device)
    result = {"weights": args.weights, "slices": len(records), "scope": scope, **sag_dependence(model, data)}
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
