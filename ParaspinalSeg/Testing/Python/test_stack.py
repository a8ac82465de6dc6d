"""Whole-stack mode: --slices parsing, network batches on CPU equal single slices, a stack segmented into one
scene equals slice-by-slice segmentation (labels, table rows with slice index and position), progress and cancel.

A tiny randomly initialised BS-ESNet stands in for trained weights (plumbing, not accuracy); the real stack
(TUM01, shipped weights) is in test_cohort_cli.py."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ParaspinalSegLib.errors import InputError
from ParaspinalSegLib.stack import parse_slices


@pytest.mark.parametrize("text, expected", [
    ("all", [0, 1, 2, 3, 4, 5]), ("ALL", [0, 1, 2, 3, 4, 5]), ("2-4", [2, 3, 4]), ("3", [3]),
    ("5,1,3", [1, 3, 5]), ("0, 2-3, 2", [0, 2, 3]), ("4-4", [4]),
])
def test_parse_slices(text, expected):
    assert parse_slices(text, 6) == expected


@pytest.mark.parametrize("text, message", [
    ("", "empty"), ("4-2", "backwards"), ("6", "outside the volume"), ("1-9", "outside"), ("a", "not a slice"),
    ("1;2", "not a slice"), ("-1", "not a slice"), ("1,,2", "not a slice"),
])
def test_parse_slices_refuses_bad_text(text, message):
    with pytest.raises(InputError, match=message):
        parse_slices(text, 6)


def _stack(shape=(5, 40, 44), seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    k, j, i = shape
    a = rng.normal(200.0, 20.0, size=shape)
    jj, ii = np.mgrid[:j, :i]
    for kk in range(k):
        a[kk][(jj - j * 0.6) ** 2 + (ii - i * (0.3 + 0.02 * kk)) ** 2 < 40] = 600.0
        a[kk][(jj - j * 0.3) ** 2 + (ii - i * 0.5) ** 2 < 25 + 5 * kk] = 900.0
    return a


@pytest.fixture(scope="module")
def segmenter(tmp_path_factory, save_tiny_weights):
    from ParaspinalSegLib.segmenter import SliceSegmenter

    return SliceSegmenter(save_tiny_weights(tmp_path_factory.mktemp("w") / "tiny", spacing_mm=1.5), device="cpu")


def test_network_batches_on_cpu_equal_single_slices(segmenter):
    from ParaspinalSegLib.preprocessing import slice_geometry_from_volume

    vol = _stack()
    m = np.diag([-0.9, -0.9, 4.0, 1.0])
    geoms = [slice_geometry_from_volume(m, k) for k in range(len(vol))]
    single = [segmenter.segment(vol[k], geoms[k]) for k in range(len(vol))]
    assert any(r.found for r in single)  # something to compare
    for batch_size in (1, 2, 5):
        many = segmenter.segment_many(list(vol), geoms, batch_size=batch_size)
        assert len(many) == len(vol)
        for a, b in zip(single, many):
            # batch_size=1 is the same computation; larger batches may differ by float rounding only
            same = (a.labels == b.labels).mean()
            assert same == 1.0 if batch_size == 1 else same > 0.999
            assert set(a.found) == set(b.found) or batch_size > 1
    with pytest.raises(InputError, match="batch size"):
        segmenter.segment_many(list(vol), geoms, batch_size=0)
    with pytest.raises(InputError, match="geometries"):
        segmenter.segment_many(list(vol), geoms[:2])


def test_stack_into_one_scene_equals_slice_by_slice(mrml_scene, make_volume, segmenter):
    from ParaspinalSegLib import scene, workflow
    from ParaspinalSegLib.headless import create_headless_scene
    from ParaspinalSegLib.stack import segment_slices_into_scene

    vol = _stack()
    node = make_volume(mrml_scene, shape=vol.shape, spacing=(0.9, 0.9, 4.0), array=vol)
    seen = []
    outcomes = list(segment_slices_into_scene(mrml_scene, node, [0, 2, 3, 4], segmenter, batch_size=2,
                                              progress=lambda done, total, o: seen.append((done, total, o.k))))
    assert [o.k for o in outcomes] == [0, 2, 3, 4] and seen == [(1, 4, 0), (2, 4, 2), (3, 4, 3), (4, 4, 4)]
    seg = outcomes[0].segmentation_node
    assert all(o.segmentation_node is seg for o in outcomes)  # one node holds every slice
    rows = scene.rows_from_table(outcomes[-1].table_node)
    assert sorted({r["slice"] for r in rows}) == [0, 2, 3, 4] and len(rows) == 4 * 9
    ijk = scene.volume_ijk_to_ras(node)
    for r in rows:  # slice index and position in every row
        assert r["position_mm"] == pytest.approx(ijk[2, 2] * r["slice"] + ijk[2, 3])

    # slice by slice, each into its own fresh scene
    other, logic = create_headless_scene()
    try:
        node2 = make_volume(other, shape=vol.shape, spacing=(0.9, 0.9, 4.0), array=vol)
        for k in (0, 2, 3, 4):
            alone = workflow.segment_slice_into_scene(other, node2, k, segmenter)
            np.testing.assert_array_equal(scene.read_slice_labels(seg, node, k), alone.result.labels)
            np.testing.assert_array_equal(scene.read_slice_labels(alone.segmentation_node, node2, k), alone.result.labels)
        rows2 = scene.rows_from_table(scene.find_measurement_table(other))

        def key(rs):
            return [(r["slice"], r["segment_id"], r["found"], r["csa_mm2"], r["fat_percent"], r["position_mm"])
                    for r in rs]

        assert [tuple("nan" if isinstance(v, float) and math.isnan(v) else v for v in t) for t in key(rows)] == \
               [tuple("nan" if isinstance(v, float) and math.isnan(v) else v for v in t) for t in key(rows2)]
    finally:
        other.Clear(1)
        del logic
    # slice 1 was not segmented
    assert not scene.read_slice_labels(seg, node, 1).any()


def test_cancel_stops_between_slices_and_keeps_the_slices_done(mrml_scene, make_volume, segmenter):
    from ParaspinalSegLib import scene
    from ParaspinalSegLib.stack import segment_slices_into_scene

    vol = _stack()
    node = make_volume(mrml_scene, shape=vol.shape, spacing=(0.9, 0.9, 4.0), array=vol)
    done = []
    gen = segment_slices_into_scene(mrml_scene, node, parse_slices("all", 5), segmenter,
                                    cancel=lambda: len(done) >= 2, progress=lambda d, t, o: done.append(o.k))
    assert [o.k for o in gen] == [0, 1]
    rows = scene.rows_from_table(scene.find_measurement_table(mrml_scene))
    assert sorted({r["slice"] for r in rows}) == [0, 1]


def test_a_bad_slice_is_refused_before_the_scene_changes(mrml_scene, make_volume, segmenter):
    from ParaspinalSegLib import scene
    from ParaspinalSegLib.stack import segment_slices_into_scene

    vol = _stack()
    vol[3] = 7.0  # an empty (constant) slice
    node = make_volume(mrml_scene, shape=vol.shape, spacing=(0.9, 0.9, 4.0), array=vol)
    n_nodes = mrml_scene.GetNumberOfNodes()
    with pytest.raises(InputError, match="slice 3"):
        list(segment_slices_into_scene(mrml_scene, node, [0, 1, 2, 3, 4], segmenter))
    assert mrml_scene.GetNumberOfNodes() == n_nodes and scene.find_measurement_table(mrml_scene) is None
