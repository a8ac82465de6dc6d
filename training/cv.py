"""Subject-wise k-fold cross-validation: train every fold, score each held-out fold on its original grid, report.

``python -m training.cv --config training/configs/bsesnet.json --data ../shared/data/sy_lumbar_muscle
--out runs/cv_bsesnet [--folds 5] [--epochs N] [--resume] [--final-model]``

Per fold ``k`` the run lives in ``OUT/fold_k`` (resumable) and its FINAL-epoch weights are scored on the
held-out subjects with :func:`training.evaluate.evaluate_weights` (the best-validation checkpoint is
not used for the report: it was chosen on the very fold it would be scored on), the way the shipped
segmenter runs (slice and mirror image averaged). ``OUT`` gets ``per_slice.csv``, ``summary.csv`` (pooled
and per fold), ``report.md`` (Table-1 style) and ``cv_metrics.json``; ``--no-mirror-tta`` scores one
network pass instead and writes them to ``OUT/single_pass``. The headline ``mean_dice`` is over the manually
labelled structures; structures a derived source (``training.derive_labels``) labels by rule are reported
apart, as ``mean_dice_derived`` / ``per_structure_derived`` and "(derived labels)" in the tables.
``--train-also DIR`` adds a source to every fold's training slices without scoring it (e.g. the shipped model's second source: score on sy folds,
train as shipped on sy + myosegmentum); its subjects must not appear among the folded ones. ``--final-model`` then trains on every slice and exports ``OUT/final_model/final.json``
with the folds and cross-validation metrics recorded in its config.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

from ParaspinalSegLib.serialisation import json_ready

from .data import SliceRecord, load_sources
from .evaluate import evaluate_weights
from .provenance import provenance
from .splits import SPLITS_FILE, cv_folds
from .report import headline, metrics_from_rows, write_report
from .train import _dist, add_data_arguments, config_from_args, train


def _scope(k: int, folds: Sequence[int], mirror_tta: bool) -> str:
    scope = f"{k}-fold" if len(folds) == k else f"fold(s) {list(folds)} of a {k}-fold"
    return scope + (" (mirror-averaged, as shipped)" if mirror_tta else " (single pass, no mirror averaging)")


def cross_validate(
    config: dict[str, Any],
    records: Sequence[SliceRecord],
    out_dir: str | Path,
    k: int = 5,
    *,
    resume: bool = False,
    device: str = "auto",
    final_model: bool = False,
    progress: bool = True,
    only_folds: Optional[Sequence[int]] = None,
    mirror_tta: bool = True,
    train_also: Sequence[SliceRecord] = (),
) -> dict[str, Any]:
    """Run all folds (or ``only_folds``), write the report and return ``{"rows", "folds", "metrics", "paths"}``.

    ``only_folds`` runs a subset of the same split (e.g. one fold when compute is short); the report and
    metrics then say which folds they cover, so a partial run is never mistaken for a full one.
    ``train_also``: slices added to every fold's training set and never scored (other subjects only).
    """
    out = Path(out_dir)
    shared = {r.group for r in train_also} & {r.group for r in records}
    if shared:
        # A subject in both would be trained on in the very fold that scores it.
        raise ValueError(f"train_also shares subjects with the cross-validated slices: {sorted(shared)[:5]}")
    # Saved on the first run and read back afterwards: the folds every later run and tool scores.
    folds = cv_folds(out, records, k, int(config["seed"]))
    run_folds = sorted(set(range(k) if only_folds is None else only_folds))
    if not run_folds or not all(0 <= f < k for f in run_folds):
        raise ValueError(f"only_folds must name folds in 0..{k - 1}, got {only_folds!r}")
    # Scores of the shipped inference (mirror-averaged) go in OUT; single-pass scores of the same folds in
    # OUT/single_pass, so re-scoring never overwrites the other report.
    report_dir = out if mirror_tta else out / "single_pass"
    also = sorted({r.source for r in train_also})
    also_note = f" (every fold also trained on {', '.join(also)}, which is not scored)" if also else ""
    rows: list[dict[str, Any]] = []
    done: list[int] = []
    fold_cases = []
    for f, held in enumerate(folds):
        if f not in run_folds:
            fold_cases.append([records[i].case_id for i in held])
            continue
        held_set = set(held)
        val = [records[i] for i in held]
        tr = [r for i, r in enumerate(records) if i not in held_set] + list(train_also)
        fold_cases.append([r.case_id for r in val])
        info = {"folds": {"k": k, "fold": f, "seed": int(config["seed"]), "by": "source/subject_id",
                          "splits": SPLITS_FILE, "held_out_cases": [r.case_id for r in val]}}
        res = train(config, tr, out / f"fold_{f}", val, resume=resume, device=device, progress=progress, training_info=info)
        if _dist()[0] == 0:
            rows += evaluate_weights(res.final_weights, val, device="cpu" if device == "auto" else device, mirror_tta=mirror_tta, fold=f)
            done.append(f)
            if len(done) < len(run_folds):
                # Interim report after every fold: a long CPU run shows where it stands (and what it has).
                write_report(rows, report_dir, title=f"{config['name']}: {_scope(k, done, mirror_tta)} subject-wise cross-validation{also_note} "
                             f"(interim: {len(done)} of {len(run_folds)} folds run so far)")
    if _dist()[0] != 0:
        return {"rows": [], "folds": fold_cases}
    metrics = {
        # mean_dice / per_structure: the manually labelled structures; *_derived: those scored against derived labels.
        **metrics_from_rows(rows, run_folds),
        "k": k,
        "folds_run": run_folds,
        "slices": len(records),
        "evaluated_on": "original input grid via SliceSegmenter (final-epoch weights of each fold)",
        "mirror_tta": bool(mirror_tta),
        "trained_also_on": also,
        # What a model this CV stands for is trained with (checked by training.train --cv-report).
        "provenance": provenance(config, list(records) + list(train_also)),
    }
    paths = write_report(rows, report_dir, title=f"{config['name']}: {_scope(k, run_folds, mirror_tta)} subject-wise cross-validation{also_note}")
    (report_dir / "cv_metrics.json").write_text(json.dumps(json_ready({**metrics, "folds": fold_cases}), indent=1), encoding="utf-8")
    result = {"rows": rows, "folds": fold_cases, "metrics": metrics, "paths": paths}
    if final_model:
        info = {"folds": {"k": k, "seed": int(config["seed"]), "held_out_cases": fold_cases},
                "cross_validation": {**metrics, "matches_model": True}}
        res = train(config, list(records) + list(train_also), out / "final_model", resume=resume, device=device, progress=progress, training_info=info)
        result["final_weights"] = res.final_weights
    return result


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command line entry point (see the module docstring)."""
    ap = argparse.ArgumentParser(prog="python -m training.cv", description=__doc__.split("\n\n")[0])
    add_data_arguments(ap)
    ap.add_argument("--final-model", action="store_true", help="after CV, train on all slices and export with the CV metrics")
    ap.add_argument("--only-folds", type=int, nargs="+", default=None, metavar="K",
                    help="run only these folds of the same split (the report says which)")
    ap.add_argument("--train-also", nargs="+", default=[], metavar="DIR",
                    help="data folders added to every fold's training slices, never scored")
    ap.add_argument("--no-mirror-tta", dest="mirror_tta", action="store_false",
                    help="score one network pass per slice instead of the shipped default (slice and mirror image averaged)")
    args = ap.parse_args(argv)
    config = config_from_args(args)
    records = load_sources(args.data, args.pair, limit=args.limit, dixon_in_phase=bool(config["dixon_in_phase"]))
    extra = load_sources(args.train_also, limit=args.limit, dixon_in_phase=bool(config["dixon_in_phase"])) if args.train_also else []
    res = cross_validate(config, records, args.out, args.folds, resume=args.resume, device=args.device, final_model=args.final_model,
                         only_folds=args.only_folds, mirror_tta=args.mirror_tta, train_also=extra)
    if "metrics" in res:
        print(f"{headline(res['rows'])}; report {res['paths']['report']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
