"""Slice-only scene writes: a click on slice k changes slice k of the nine segments and nothing else.

Checked byte for byte on the volume grid with real segmentation nodes (slicer-core), also for segments
that share one labelmap layer (Segment Editor's default) and for a segment the user added themself.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("slicer", reason="slicer-core (PyPI) is not installed")

import slicer  # noqa: E402

from ParaspinalSegLib import anatomy  # noqa: E402
from ParaspinalSegLib import scene as writers  # noqa: E402
from ParaspinalSegLib import scene_segmentation  # noqa: E402

SHAPE = (6, 30, 34)  # K, J, I


def blocks(seed: int) -> np.ndarray:
    """A random-ish label slice with all nine structures in disjoint blocks."""
    rng = np.random.default_rng(seed)
    lab = np.zeros(SHAPE[1:], np.uint8)
    for v in range(1, 10):
        r, c = 3 * (v - 1) + 1, int(rng.integers(0, 20))
        lab[r: r + 3, c: c + int(rng.integers(4, 12))] = v
    return lab


def arrays(seg, vol, keys) -> dict[str, np.ndarray]:
    return {key: scene_segmentation._segment_array(seg, key, vol) for key in keys}


@pytest.fixture
def filled(mrml_scene, make_volume):
    """A segmentation with results on slices 0, 2, 3, 5, a user segment on every slice, shared layers."""
    vol = make_volume(mrml_scene, SHAPE)
    seg = writers.get_or_create_segmentation(mrml_scene, vol)
    for k, seed in ((0, 1), (2, 2), (3, 3), (5, 4)):
        writers.write_slice_labels(seg, vol, k, blocks(seed))
    # A segment the user drew (not one of the nine), spanning all slices, under the nine's pixels too.
    segmentation = seg.GetSegmentation()
    segmentation.AddEmptySegment("user_tumour", "my tumour", [0.2, 0.3, 0.9])
    mask = np.zeros(SHAPE, np.uint8)
    mask[:, 20:28, 5:30] = 1
    slicer.util.updateSegmentBinaryLabelmapFromArray(mask, seg, "user_tumour", vol)
    segmentation.CollapseBinaryLabelmaps(False)  # as Segment Editor does: segments share layers
    return vol, seg


def test_writing_slice_k_leaves_every_other_voxel_byte_for_byte(filled):
    vol, seg = filled
    keys = [s.key for s in anatomy.STRUCTURES] + ["user_tumour"]
    segmentation = seg.GetSegmentation()
    assert segmentation.GetNumberOfLayers() < len(keys)  # layers really are shared
    before = arrays(seg, vol, keys)
    tags_before = {key: (segmentation.GetSegment(key).GetName(), segmentation.GetSegment(key).GetColor(),
                         segmentation.GetSegment(key).GetTerminology()) for key in keys}

    new = blocks(9)
    report = writers.write_slice_labels(seg, vol, 2, new)
    after = arrays(seg, vol, keys)
    for key in keys:
        others = [k for k in range(SHAPE[0]) if k != 2]
        assert after[key][others].tobytes() == before[key][others].tobytes(), key
    for s in anatomy.STRUCTURES:
        np.testing.assert_array_equal(after[s.key][2], (new == s.value).astype(np.uint8))
    # The user's own segment is not one of the nine: untouched on slice 2 as well, byte for byte.
    assert after["user_tumour"].tobytes() == before["user_tumour"].tobytes()
    assert {key: (segmentation.GetSegment(key).GetName(), segmentation.GetSegment(key).GetColor(),
                  segmentation.GetSegment(key).GetTerminology()) for key in keys} == tags_before
    assert set(report.previous) == {s.key for s in anatomy.STRUCTURES}  # all nine changed on slice 2


def test_a_slice_that_was_empty_and_an_unchanged_segment(filled):
    vol, seg = filled
    keys = [s.key for s in anatomy.STRUCTURES]
    before = arrays(seg, vol, keys)
    lab = np.zeros(SHAPE[1:], np.uint8)
    lab[4:9, 6:14] = 6
    report = writers.write_slice_labels(seg, vol, 4, lab)  # slice 4 had no results yet
    assert set(report.previous) == {"multifidus_left"}  # the eight others stay empty: not rewritten
    after = arrays(seg, vol, keys)
    for key in keys:
        expected = before[key].copy()
        expected[4] = (lab == anatomy.BY_KEY[key].value)
        assert after[key].tobytes() == expected.tobytes(), key


def test_undo_puts_back_exactly_what_was_there(filled):
    vol, seg = filled
    keys = [s.key for s in anatomy.STRUCTURES] + ["user_tumour"]
    before = arrays(seg, vol, keys)
    report = writers.write_slice_labels(seg, vol, 3, blocks(11))
    writers.undo_slice_write(seg, vol, report)
    after = arrays(seg, vol, keys)
    for key in keys:
        assert after[key].tobytes() == before[key].tobytes(), key


def test_a_failed_write_half_way_restores_the_slice(filled, monkeypatch):
    vol, seg = filled
    keys = [s.key for s in anatomy.STRUCTURES] + ["user_tumour"]
    before = arrays(seg, vol, keys)
    real = scene_segmentation._set_segment_slice
    calls = []

    def fail_on_fifth(*args, **kwargs):
        calls.append(args[1])
        if len(calls) == 14:  # after all nine were cleared and some painted
            raise RuntimeError("MRML failed")
        return real(*args, **kwargs)

    monkeypatch.setattr(scene_segmentation, "_set_segment_slice", fail_on_fifth)
    with pytest.raises(RuntimeError, match="MRML failed"):
        writers.write_slice_labels(seg, vol, 0, blocks(12))
    monkeypatch.setattr(scene_segmentation, "_set_segment_slice", real)
    after = arrays(seg, vol, keys)
    for key in keys:
        assert after[key].tobytes() == before[key].tobytes(), key
