"""The area ranges the QC compares against: only trusted, present labels count; qc.py holds what the
command computes on the training data."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from ParaspinalSegLib import qc
from training.area_ranges import format_ranges, main, training_area_ranges
from training.data import load_sources
from training.tests.synthetic import synthetic_slice

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"


def test_ranges_count_trusted_present_structures_in_mm2():
    a = synthetic_slice(64, seed=0, spacing=0.5)
    b = synthetic_slice(64, seed=1, spacing=1.0, trusted=(1, 6, 7, 8, 9))  # psoas untrusted on b
    b = dataclasses.replace(b, labels=b.labels.copy(), trusted=b.trusted.copy())
    b.labels[b.labels == 1] = 0  # disc trusted but absent: says nothing about its size
    ranges = training_area_ranges([a, b])
    assert 2 not in ranges and 3 not in ranges  # never trusted anywhere
    disc_a = np.count_nonzero(a.labels == 1) * 0.25
    assert ranges[1] == (disc_a, disc_a)
    psoas_a = np.count_nonzero(a.labels == 4) * 0.25
    assert ranges[4] == (psoas_a, psoas_a)
    mf = [np.count_nonzero(a.labels == 6) * 0.25, float(np.count_nonzero(b.labels == 6))]
    assert ranges[6] == (min(mf), max(mf))
    assert "    6: (" in format_ranges(ranges) and "# left multifidus" in format_ranges(ranges)


@pytest.mark.skipif(not (DATA / "sy_lumbar_muscle" / "manifest.csv").exists() or not (DATA / "myosegmentum_lpm").is_dir(),
                    reason="../shared/data (sy_lumbar_muscle, myosegmentum_lpm) is not here (license: not in the repo)")
def test_qc_ranges_of_the_manual_structures_are_those_of_the_training_labels(capsys):
    """Disc, psoas and back muscles: manual labels (the derived sy source leaves them unchanged)."""
    ranges = training_area_ranges(load_sources([DATA / "sy_lumbar_muscle", DATA / "myosegmentum_lpm"]))
    for v in (1, 4, 5, 6, 7, 8, 9):
        assert qc.TRAINING_AREA_RANGE_MM2[v] == tuple(float(round(x)) for x in ranges[v]), v
    assert main(["--data", str(DATA / "myosegmentum_lpm")]) == 0
    assert "# left multifidus, 29 slices" in capsys.readouterr().out
