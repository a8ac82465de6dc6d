"""The one ``.seg.nrrd`` reader and segment-matching rule (``paraspinalseg measure`` and the trainer)."""

from __future__ import annotations

import numpy as np
import pytest

from ParaspinalSegLib import anatomy
from ParaspinalSegLib.segfile import SegmentEntry, read_segmentation, segment_entries, structure_of_segment
from ParaspinalSegLib.serialisation import json_ready

sitk = pytest.importorskip("SimpleITK")


def test_segments_match_by_id_or_name_in_any_case():
    def entry(sid, name):
        return SegmentEntry(0, sid, name, 0, 1)

    assert structure_of_segment(entry("multifidus_left", "")).value == anatomy.BY_KEY["multifidus_left"].value
    assert structure_of_segment(entry("Segment_1", "Left Multifidus")).key == "multifidus_left"
    assert structure_of_segment(entry("MULTIFIDUS_RIGHT", "")).key == "multifidus_right"
    assert structure_of_segment(entry("Segment_3", "tumour")) is None


def test_header_entries_allow_gaps_and_defaults():
    meta = {"Segment0_ID": "disc", "Segment0_Name": "intervertebral disc", "Segment2_ID": "x", "Segment2_Layer": "1",
            "Segment2_LabelValue": "3", "Segment_unrelated": "1", "NRRD_space": "left-posterior-superior"}
    entries = segment_entries(meta)
    assert [(e.index, e.id, e.layer, e.label_value) for e in entries] == [(0, "disc", 0, 1), (2, "x", 1, 3)]


def test_two_layer_file_unknown_segments(tmp_path):
    layer0 = np.zeros((2, 10, 12), np.uint8)
    layer1 = np.zeros_like(layer0)
    layer0[1, 2:4, 2:5] = 1
    layer1[1, 2:3, 2:5] = 2  # overlaps segment 0: a second layer
    layer1[0, 6:8, 6:8] = 5  # an unknown segment
    image = sitk.Compose(sitk.GetImageFromArray(layer0), sitk.GetImageFromArray(layer1))
    for key, value in {"Segment0_ID": "psoas_major_left", "Segment0_Layer": "0", "Segment0_LabelValue": "1",
                       "Segment1_ID": "Segment_7", "Segment1_Name": "Right psoas major", "Segment1_Layer": "1",
                       "Segment1_LabelValue": "2", "Segment2_ID": "tumour", "Segment2_Layer": "1",
                       "Segment2_LabelValue": "5"}.items():
        image.SetMetaData(key, value)
    path = tmp_path / "s.seg.nrrd"
    sitk.WriteImage(image, str(path))
    dropped = read_segmentation(path)
    assert dropped.has_segments and [e.id for e in dropped.unmatched] == ["tumour"]
    left, right = anatomy.BY_KEY["psoas_major_left"].value, anatomy.BY_KEY["psoas_major_right"].value
    assert sorted(dropped.matched) == sorted([left, right])
    assert (dropped.labels[1, 2, 2:5] == right).all() and (dropped.labels[1, 3, 2:5] == left).all()
    assert not dropped.labels[0].any()
    kept = read_segmentation(path, unknown_value=255)
    assert (kept.labels[0, 6:8, 6:8] == 255).all() and (kept.labels[1] == dropped.labels[1]).all()


def test_json_ready_cleans_what_json_refuses():
    import json
    from pathlib import Path

    raw = {1: (np.float32(0.5), float("nan")), "p": Path("/a/b"), "n": [np.int64(3), float("inf")]}
    assert json.dumps(json_ready(raw), allow_nan=False) == '{"1": [0.5, null], "p": "/a/b", "n": [3, null]}'
