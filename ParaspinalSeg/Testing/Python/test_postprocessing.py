"""Keeping the largest island per structure (numpy + scipy)."""

from __future__ import annotations

import numpy as np

from ParaspinalSegLib.postprocessing import keep_largest_component, largest_component


def test_largest_component_uses_8_connectivity():
    m = np.zeros((10, 10), bool)
    m[1, 1] = m[2, 2] = m[3, 3] = True  # diagonal chain: one component with 8-connectivity
    m[6:8, 6:8] = True  # 4-pixel square: larger than the 3-pixel chain
    assert np.array_equal(largest_component(m), np.pad(np.ones((2, 2), bool), ((6, 2), (6, 2))))
    m[4, 4] = m[5, 5] = True  # chain now has 5 pixels and touches the square diagonally
    assert np.array_equal(largest_component(m), m)
    assert not largest_component(np.zeros((5, 5), bool)).any()


def test_keep_largest_component_per_value():
    lab = np.zeros((30, 30), np.uint8)
    lab[2:10, 2:10] = 4  # 64 px: kept
    lab[20:23, 20:23] = 4  # 9 px island of the same structure: removed
    lab[12:15, 2:5] = 7  # 9 px: kept (only island of 7)
    lab[25, 2] = 7  # 1 px: removed
    lab[0, 29] = 255  # not annotated: left alone by default
    out = keep_largest_component(lab)
    assert out.dtype == lab.dtype and out is not lab
    expected = lab.copy()
    expected[20:23, 20:23] = 0
    expected[25, 2] = 0
    assert np.array_equal(out, expected)
    # Only the requested values are cleaned.
    only7 = keep_largest_component(lab, values=[7])
    assert (only7[20:23, 20:23] == 4).all() and only7[25, 2] == 0
    assert np.array_equal(lab[20:23, 20:23], np.full((3, 3), 4))  # input not modified


def test_keep_largest_component_matches_whole_image_cleaning_on_random_labels() -> None:
    """Cleaning inside each value's bounding box gives exactly what whole-image cleaning gives."""

    rng = np.random.default_rng(3)
    labels = rng.choice(np.array([0, 0, 0, 4, 6, 9, 255], np.uint8), size=(60, 70))
    expected = labels.copy()
    for v in (4, 6, 9):
        mask = labels == v
        expected[mask & ~largest_component(mask)] = 0
    np.testing.assert_array_equal(keep_largest_component(labels), expected)
    np.testing.assert_array_equal(keep_largest_component(labels, [6])[labels != 6], labels[labels != 6])
