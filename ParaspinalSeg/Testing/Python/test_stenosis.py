"""Central stenosis grade from the dural-sac CSA: at, just below and just above the published cut-offs."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ParaspinalSegLib.measurements import measure_slice
from ParaspinalSegLib.stenosis import (
    ABSOLUTE_STENOSIS_BELOW_MM2,
    RELATIVE_STENOSIS_BELOW_MM2,
    stenosis_grade,
)


def test_cutoffs_are_the_published_ones():
    assert (RELATIVE_STENOSIS_BELOW_MM2, ABSOLUTE_STENOSIS_BELOW_MM2) == (100.0, 75.0)


@pytest.mark.parametrize(
    "area, grade",
    [
        (0.0, "absolute"),
        (74.999, "absolute"),
        (75.0, "relative"),  # at a cut-off: the milder grade ("less than 75" is absolute)
        (75.001, "relative"),
        (99.999, "relative"),
        (100.0, "normal"),
        (100.001, "normal"),
        (180.0, "normal"),
    ],
)
def test_grade_at_and_around_cutoffs(area, grade):
    assert stenosis_grade(area) == grade


def test_no_area_no_grade():
    assert stenosis_grade(None) is None


@pytest.mark.parametrize("bad", [-1.0, math.nan, math.inf])
def test_impossible_area_refused(bad):
    with pytest.raises(ValueError, match="dural-sac CSA"):
        stenosis_grade(bad)


@pytest.mark.parametrize("side_px, grade", [(8, "absolute"), (9, "relative"), (10, "normal")])
def test_measure_slice_grades_the_canal_row_only(side_px, grade):
    # 1 mm pixels: an 8×8 canal is 64 mm² (absolute), 9×9 81 mm² (relative), 10×10 100 mm² (normal).
    labels = np.zeros((64, 64), np.uint8)
    labels[10 : 10 + side_px, 10 : 10 + side_px] = 2
    labels[40:50, 40:50] = 3
    labels[30:50, 5:25] = 6  # a left multifidus, so the slice has a fat threshold
    # Fat-bright everywhere (canal and lamina included) but a lean muscle with a fatty band: a fat %
    # exists on this slice, and the canal and lamina would get 100 % if they were measured for it.
    image = np.full(labels.shape, 400.0) + np.random.default_rng(0).normal(0, 10, labels.shape)
    image[35:50, 5:25] -= 300
    rows = {r.key: r for r in measure_slice(image, labels, (1.0, 1.0))}
    assert rows["multifidus_left"].fat_percent == pytest.approx(25.0)
    assert rows["spinal_canal"].csa_mm2 == pytest.approx(side_px**2)
    assert rows["spinal_canal"].stenosis_grade == grade
    assert rows["spinal_canal"].fat_percent is None and rows["spinal_canal"].functional_csa_mm2 is None
    assert rows["lamina"].csa_mm2 == pytest.approx(100.0)
    assert rows["lamina"].stenosis_grade is None and rows["lamina"].fat_percent is None
    assert rows["multifidus_left"].stenosis_grade is None
    assert rows["intervertebral_disc"].stenosis_grade is None  # not found: no grade either


def test_grade_follows_pixel_spacing():
    # The same 10×10 pixel canal is 100 mm² at 1 mm but 81 mm² at 0.9 mm pixels.
    labels = np.zeros((32, 32), np.uint8)
    labels[5:15, 5:15] = 2
    image = np.ones(labels.shape)
    row = {r.key: r for r in measure_slice(image, labels, (0.9, 0.9))}["spinal_canal"]
    assert row.stenosis_grade == "relative"
