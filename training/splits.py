"""The fold split of a cross-validation, saved once and read by everything that scores held-out slices.

``training.cv`` writes ``splits_final.json`` into its output folder (the name and layout nnU-Net uses: a
list with one ``{"train": [...], "val": [...]}`` per fold, entries are slice case ids) the first time it
runs and reads it back on every later run, so a resumed or re-scored CV keeps its folds. ``training.train
--splits FILE --fold K`` trains fold K of it; ``training.evaluate --splits FILE --fold K`` scores fold K's
held-out slices; ``training.sag_check`` reads the held-out case ids from the weights' training record (or
``--splits``); ``training.compare`` and ``training.agreement`` refuse two CVs whose splits differ. Nobody
rebuilds folds from data loaded with other options (which could put training slices in a held-out set).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from .data import subject_folds

SPLITS_FILE = "splits_final.json"


def splits_from_folds(records: Sequence[Any], folds: Sequence[Sequence[int]]) -> list[dict[str, list[str]]]:
    """nnU-Net-style splits (case ids) from fold index lists over ``records``."""
    ids = [r.case_id for r in records]
    if len(set(ids)) != len(ids):
        raise ValueError("case ids are not unique: a split by case id would be ambiguous")
    out = []
    for held in folds:
        held_set = set(held)
        out.append({"train": [ids[i] for i in range(len(ids)) if i not in held_set], "val": [ids[i] for i in held]})
    return out


def write_splits(path: str | Path, splits: Sequence[dict[str, list[str]]]) -> Path:
    """Write ``splits`` as JSON (atomically: a half-written split must never be read)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(list(splits), indent=1) + "\n", encoding="utf-8")
    tmp.replace(path)
    return path


def read_splits(path: str | Path) -> list[dict[str, list[str]]]:
    """The splits in ``path`` (a ``splits_final.json`` or the folder holding one)."""
    p = Path(path)
    if p.is_dir():
        p = p / SPLITS_FILE
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no fold split there (training.cv writes {SPLITS_FILE})")
    splits = json.loads(p.read_text(encoding="utf-8"))
    if not isinstance(splits, list) or not all(isinstance(s, dict) and {"train", "val"} <= set(s) for s in splits):
        raise ValueError(f"{p}: not a list of {{'train': [...], 'val': [...]}} folds")
    return splits


def fold_indices(records: Sequence[Any], splits: Sequence[dict[str, list[str]]]) -> list[list[int]]:
    """Held-out record indices of each fold; every case of the split must be among ``records`` and vice versa."""
    index = {r.case_id: i for i, r in enumerate(records)}
    in_split = {c for s in splits for c in s["val"]}
    missing = sorted(in_split - set(index))
    extra = sorted(set(index) - in_split)
    if missing or extra:
        raise ValueError(f"the split does not fit the data: {len(missing)} of its cases not in the data "
                         f"({missing[:3]}), {len(extra)} slices of the data in no fold ({extra[:3]})")
    return [sorted(index[c] for c in s["val"]) for s in splits]


def held_out(records: Sequence[Any], case_ids: Sequence[str]) -> list[Any]:
    """The records of ``case_ids`` (a fold's held-out slices), all of which must be present."""
    by_id = {r.case_id: r for r in records}
    missing = [c for c in case_ids if c not in by_id]
    if missing:
        raise ValueError(f"{len(missing)} held-out slices are not in the data given ({missing[:3]}): "
                         "load the same data (and the same options, e.g. Dixon in-phase) the split was made on")
    return [by_id[c] for c in case_ids]


def cv_folds(out_dir: str | Path, records: Sequence[Any], k: int, seed: int) -> list[list[int]]:
    """A CV's held-out indices: read from ``out_dir/splits_final.json`` when it exists, else made and saved."""
    path = Path(out_dir) / SPLITS_FILE
    if path.is_file():
        splits = read_splits(path)
        if len(splits) != k:
            raise ValueError(f"{path} holds {len(splits)} folds, not {k}")
        return fold_indices(records, splits)
    folds = subject_folds(records, k, seed)
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    write_splits(path, splits_from_folds(records, folds))
    return folds


def same_splits(a: str | Path, b: str | Path) -> bool:
    """Whether two CV folders (or split files) hold the same folds (order of cases within a fold ignored)."""
    def norm(splits):
        return [sorted(s["val"]) for s in splits]

    return norm(read_splits(a)) == norm(read_splits(b))
