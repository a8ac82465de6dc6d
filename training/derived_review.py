"""The review file of derived canal/lamina labels: one row per slice, decision, reason and parameter overrides.

CSV columns (``docs/derived-labels.csv``):

* ``case_id`` — the slice (``SY002_s0``);
* ``decision`` — ``accepted`` (rules as they are), ``corrected`` (accepted after a per-slice override) or
  ``rejected`` (canal and lamina stay untrusted on that slice);
* ``reason`` — why it was corrected or rejected (required for both);
* ``overrides`` — ``name=value`` pairs separated by ``;`` that replace fields of
  :class:`training.canal_lamina.DerivationParams` for that slice (e.g. ``seed_i=250;seed_j=301``).

The file holds pixel indices and decisions only, no image data, so it lives in the repository.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

DECISIONS = ("accepted", "corrected", "rejected")
#: Decision of a slice the review file does not list: its derived classes stay untrusted.
UNREVIEWED = "unreviewed"
#: Decisions whose derived canal and lamina enter ``trusted_classes``.
TRUSTED_DECISIONS = ("accepted", "corrected")


@dataclass(frozen=True)
class ReviewEntry:
    decision: str = UNREVIEWED
    reason: str = ""
    overrides: dict[str, str] = field(default_factory=dict)

    @property
    def trusted(self) -> bool:
        return self.decision in TRUSTED_DECISIONS


def parse_overrides(text: str) -> dict[str, str]:
    """``"a=1; b=2"`` → ``{"a": "1", "b": "2"}``; raises ValueError on a pair without ``=``."""
    out = {}
    for pair in (text or "").split(";"):
        if not pair.strip():
            continue
        if "=" not in pair:
            raise ValueError(f"override {pair.strip()!r} is not name=value")
        k, v = pair.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def read_review(path: str | Path) -> dict[str, ReviewEntry]:
    """Read a review CSV; raises ValueError naming the row on an unknown decision or a missing reason."""
    entries: dict[str, ReviewEntry] = {}
    with open(path, newline="", encoding="utf-8") as f:
        for n, row in enumerate(csv.DictReader(f), start=2):
            case = (row.get("case_id") or "").strip()
            decision = (row.get("decision") or "").strip().lower()
            reason = (row.get("reason") or "").strip()
            if not case:
                raise ValueError(f"{path}:{n}: no case_id")
            if decision not in DECISIONS:
                raise ValueError(f"{path}:{n}: decision {decision!r} is not one of {', '.join(DECISIONS)}")
            if decision != "accepted" and not reason:
                raise ValueError(f"{path}:{n}: a {decision} slice needs a reason")
            if case in entries:
                raise ValueError(f"{path}:{n}: {case} is listed twice")
            entries[case] = ReviewEntry(decision, reason, parse_overrides(row.get("overrides") or ""))
    return entries


def write_review(path: str | Path, entries: dict[str, ReviewEntry]) -> None:
    """Write a review CSV (sorted by case)."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["case_id", "decision", "reason", "overrides"])
        for case in sorted(entries):
            e = entries[case]
            w.writerow([case, e.decision, e.reason, ";".join(f"{k}={v}" for k, v in e.overrides.items())])
