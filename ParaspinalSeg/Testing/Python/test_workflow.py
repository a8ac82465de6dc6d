"""The Segment / Update measurements workflow on a real headless MRML scene with a real SliceSegmenter.

A tiny randomly initialised BS-ESNet (base width 4, depth 4) stands in for trained weights: these tests
check what lands in the scene (kept slices, kept edits, exact row updates, all-or-nothing writes), not
segmentation quality. Edits are made with Slicer's own ``slicer.util`` helpers, as a user's Segment
Editor strokes would be.
"""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("slicer", reason="slicer-core (PyPI) is not installed")

import slicer  # noqa: E402
import vtk  # noqa: E402

from ParaspinalSegLib import anatomy, workflow  # noqa: E402
from ParaspinalSegLib import scene as writers  # noqa: E402
from ParaspinalSegLib import scene_segmentation  # noqa: E402
from ParaspinalSegLib.errors import InputError  # noqa: E402
from ParaspinalSegLib.segmenter import SliceSegmenter, StructureBox  # noqa: E402

SHAPE = (3, 64, 64)  # K, J, I
SPACING = (0.8, 0.8, 4.0)  # I, J, K
#: Manual fat threshold: with it each muscle's fat % depends on that muscle alone (the automatic
#: threshold is fitted to all muscles of the slice, so one edit would move every muscle's fat %).
THRESHOLD = 450.0


@pytest.fixture(scope="module")
def segmenter(tmp_path_factory, save_tiny_weights) -> SliceSegmenter:
    path = save_tiny_weights(tmp_path_factory.mktemp("weights") / "tiny", spacing_mm=0.8)
    return SliceSegmenter(path, device="cpu")


def anatomy_like(shape=SHAPE, seed: int = 0) -> np.ndarray:
    """Noise on a body with bright (fat) and darker (muscle) blobs, different on every slice."""
    rng = np.random.default_rng(seed)
    k, j, i = shape
    a = rng.normal(200.0, 20.0, size=shape)
    jj, ii = np.mgrid[:j, :i]
    for kk in range(k):
        a[kk][((jj - 32) / 24.0) ** 2 + ((ii - 32) / 28.0) ** 2 > 1.0] = 5.0
        for ci in (20 + kk, 44 - kk):
            a[kk][((jj - 42) / 7.0) ** 2 + ((ii - ci) / 8.0) ** 2 <= 1.0] = 120.0
            a[kk][((jj - 42) / 2.0) ** 2 + ((ii - ci) / 2.0) ** 2 <= 1.0] = 600.0
        a[kk][((jj - 22) / 6.0) ** 2 + ((ii - 32) / 9.0) ** 2 <= 1.0] = 800.0
    return a.astype(np.int16)


@pytest.fixture
def volume(mrml_scene, make_volume):
    return make_volume(mrml_scene, SHAPE, spacing=SPACING, array=anatomy_like(), name="T2")


def float_volume(scene, array: np.ndarray, name: str = "float"):
    """A float32 scalar volume (the fixture makes int16 ones, which cannot hold NaN)."""
    from vtk.util import numpy_support

    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    image = vtk.vtkImageData()
    k, j, i = array.shape
    image.SetDimensions(i, j, k)
    image.GetPointData().SetScalars(numpy_support.numpy_to_vtk(np.ascontiguousarray(array, np.float32).ravel(), deep=True))
    node.SetAndObserveImageData(image)
    node.SetSpacing(*SPACING)
    return node


# ------------------------------------------------------------------------------------------------
# What the scene holds


def node_counts(scene) -> Counter:
    nodes = scene.GetNodes()
    return Counter(nodes.GetItemAsObject(n).GetClassName() for n in range(nodes.GetNumberOfItems()))


def segment_arrays(seg, vol) -> dict[str, np.ndarray]:
    # The writers' reader, not slicer.util's: that one leaves a display node behind on a headless scene,
    # which would change the node counts this file compares.
    return {s.key: scene_segmentation._segment_array(seg, s.key, vol) for s in anatomy.STRUCTURES}


def table_rows(scene) -> list[dict]:
    table = writers.find_measurement_table(scene)
    return [] if table is None else writers.rows_from_table(table)


def same_row(a: dict, b: dict, ignore: tuple[str, ...] = ()) -> bool:
    return a.keys() == b.keys() and all(
        (isinstance(a[f], float) and math.isnan(a[f]) and isinstance(b[f], float) and math.isnan(b[f])) or a[f] == b[f]
        for f in a if f not in ignore
    )


def state(scene, vol) -> dict:
    """Everything a failed call must leave exactly as it was."""
    seg = writers.find_segmentation(scene, vol)
    return {
        "counts": node_counts(scene),
        "segments": segment_arrays(seg, vol) if seg is not None else None,
        "rows": table_rows(scene),
        "boxes": sorted(writers.find_boxes(scene, vol)),
    }


def assert_same_state(before: dict, after: dict) -> None:
    assert after["counts"] == before["counts"]
    assert after["boxes"] == before["boxes"]
    assert len(after["rows"]) == len(before["rows"]) and all(map(same_row, before["rows"], after["rows"]))
    if before["segments"] is None:
        assert after["segments"] is None
    else:
        assert after["segments"].keys() == before["segments"].keys()
        for key, array in before["segments"].items():
            np.testing.assert_array_equal(after["segments"][key], array, err_msg=key)


def largest_muscle(labels: np.ndarray) -> int:
    counts = {v: int((labels == v).sum()) for v in anatomy.MUSCLE_VALUES}
    value = max(counts, key=counts.get)
    assert counts[value] >= 4, f"the random model found no muscle to edit: {counts}"
    return value


# ------------------------------------------------------------------------------------------------
# Segment slice


def test_segment_writes_segments_rows_and_boxes(mrml_scene, volume, segmenter):
    outcome = workflow.segment_slice_into_scene(mrml_scene, volume, 1, segmenter, level="L4/L5", method=THRESHOLD)
    seg = outcome.segmentation_node
    assert seg.GetSegmentation().GetNumberOfSegments() == 9
    labels = writers.read_slice_labels(seg, volume, 1)
    np.testing.assert_array_equal(labels, outcome.result.labels)
    assert outcome.result.labels.shape == SHAPE[1:] and outcome.result.found
    rows = writers.rows_from_table(outcome.table_node)
    assert len(rows) == 9 and {r["slice"] for r in rows} == {1} and {r["level"] for r in rows} == {"L4/L5"}
    assert {r["model_version"] for r in rows} == {segmenter.model_version}
    for r in rows:  # CSA from the segments on the volume's grid, in mm2 from the slice geometry
        n = int((labels == anatomy.BY_KEY[r["segment_id"]].value).sum())
        assert r["found"] == bool(n)
        if n:
            assert r["csa_mm2"] == pytest.approx(n * SPACING[0] * SPACING[1])
    assert sorted(outcome.box_nodes) == outcome.result.found
    assert set(writers.find_boxes(mrml_scene, volume)) == {anatomy.BY_VALUE[v].key for v in outcome.result.found}
    text = workflow.describe_outcome(outcome)
    assert "slice 1 of T2" in text and "CPU" in text and f"{len(outcome.result.found)} of 9" in text
    for v in outcome.result.missing:
        assert anatomy.BY_VALUE[v].name in text
    assert set(outcome.seconds) == {"segment", "measure", "write", "total"}

    # Boxes can be hidden at once and stay hidden for the next slice when asked.
    again = workflow.segment_slice_into_scene(mrml_scene, volume, np.int64(0), segmenter, show_boxes=False)
    assert all(not n.GetDisplayNode().GetVisibility() for n in writers.find_boxes(mrml_scene, volume).values())
    assert again.segmentation_node is seg


def test_two_slices_and_an_edit_are_all_kept(mrml_scene, volume, segmenter):
    first = workflow.segment_slice_into_scene(mrml_scene, volume, 0, segmenter, level="L3/L4", method=THRESHOLD)
    seg = first.segmentation_node
    # The user paints a stroke of the left erector spinae on slice 0 and erases part of another segment.
    mask = slicer.util.arrayFromSegmentBinaryLabelmap(seg, "erector_spinae_left", volume)
    mask[0, 5:9, 5:12] = 1
    slicer.util.updateSegmentBinaryLabelmapFromArray(mask, seg, "erector_spinae_left", volume)
    edited_a = writers.read_slice_labels(seg, volume, 0)
    assert (edited_a[5:9, 5:12] == anatomy.BY_KEY["erector_spinae_left"].value).all()
    arrays_a = {key: a[0].copy() for key, a in segment_arrays(seg, volume).items()}

    second = workflow.segment_slice_into_scene(mrml_scene, volume, 2, segmenter, level="L4/L5", method=THRESHOLD)
    assert second.segmentation_node is seg
    assert mrml_scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 1
    np.testing.assert_array_equal(writers.read_slice_labels(seg, volume, 0), edited_a)  # edit survived
    for key, a in segment_arrays(seg, volume).items():
        np.testing.assert_array_equal(a[0], arrays_a[key], err_msg=key)
        assert not a[1].any()  # never segmented
    np.testing.assert_array_equal(writers.read_slice_labels(seg, volume, 2), second.result.labels)
    rows = table_rows(mrml_scene)
    assert [(r["slice"], r["level"]) for r in rows[::9]] == [(0, "L3/L4"), (2, "L4/L5")] and len(rows) == 18
    # Only the boxes of the slice segmented last are shown.
    assert {n.GetAttribute(writers.SLICE_ATTRIBUTE) for n in writers.find_boxes(mrml_scene, volume).values()} == {"2"}


def test_update_measurements_changes_exactly_the_edited_rows(mrml_scene, volume, segmenter):
    a = workflow.segment_slice_into_scene(mrml_scene, volume, 1, segmenter, level="L4/L5", method=THRESHOLD)
    workflow.segment_slice_into_scene(mrml_scene, volume, 2, segmenter, level="L5/S1", method=THRESHOLD)
    seg = a.segmentation_node
    before = table_rows(mrml_scene)

    # Erase the anterior half (rows) of the largest muscle on slice 1.
    value = largest_muscle(a.result.labels)
    key = anatomy.BY_VALUE[value].key
    mask = slicer.util.arrayFromSegmentBinaryLabelmap(seg, key, volume)
    rows_hit = np.nonzero(mask[1].any(axis=1))[0]
    mask[1, : rows_hit[len(rows_hit) // 2]] = 0
    slicer.util.updateSegmentBinaryLabelmapFromArray(mask, seg, key, volume)
    remaining = int(mask[1].sum())

    table = workflow.update_measurements(mrml_scene, volume, 1, method=THRESHOLD)
    after = writers.rows_from_table(table)
    assert len(after) == len(before)
    # The QC column of the slice is re-checked on the edited segments (without the network's probabilities
    # and boxes), so only the measurements are compared row by row.
    assert all(c["qc"] == "ok" or c["qc"].startswith("check: ") for c in after if c["slice"] == 1)
    assert [b["qc"] for b in before if b["slice"] == 2] == [c["qc"] for c in after if c["slice"] == 2]
    changed = [(b, c) for b, c in zip(before, after) if not same_row(b, c, ignore=("qc",))]
    assert [(c["slice"], c["segment_id"]) for _, c in changed] == [(1, key)]
    old, new = changed[0]
    assert new["csa_mm2"] == pytest.approx(remaining * SPACING[0] * SPACING[1]) and new["csa_mm2"] < old["csa_mm2"]
    assert new["model_version"] == segmenter.model_version and new["level"] == "L4/L5"  # kept

    # A level given explicitly replaces the slice's level on all its rows, and nothing else.
    workflow.update_measurements(mrml_scene, volume, 1, level="L3/L4", method=THRESHOLD)
    relabelled = table_rows(mrml_scene)
    assert [r["level"] for r in relabelled if r["slice"] == 1] == ["L3/L4"] * 9
    assert all(same_row(b, c) for b, c in zip(after, relabelled) if b["slice"] == 2)


def test_update_measurements_refuses_what_it_cannot_measure(mrml_scene, volume, segmenter):
    with pytest.raises(InputError, match="segment a slice first"):
        workflow.update_measurements(mrml_scene, volume, 0)
    workflow.segment_slice_into_scene(mrml_scene, volume, 0, segmenter)
    before = state(mrml_scene, volume)
    with pytest.raises(InputError, match="no segments"):
        workflow.update_measurements(mrml_scene, volume, 2)  # never segmented, nothing painted
    with pytest.raises(InputError, match="out of range"):
        workflow.update_measurements(mrml_scene, volume, 3)
    with pytest.raises(InputError, match="threshold|method"):
        workflow.update_measurements(mrml_scene, volume, 0, method="median")
    assert_same_state(before, state(mrml_scene, volume))


# ------------------------------------------------------------------------------------------------
# Bad input and failures leave the scene as it was


def test_bad_input_raises_and_leaves_the_scene_unchanged(mrml_scene, volume, make_volume, segmenter):
    workflow.segment_slice_into_scene(mrml_scene, volume, 0, segmenter)  # something to keep intact
    rgb = make_volume(mrml_scene, (2, 16, 16), components=3, name="photo")
    labelmap = mrml_scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "labels")
    labelmap.SetAndObserveImageData(volume.GetImageData())
    zero = anatomy_like(seed=1)
    zero[1] = 0
    zero_volume = make_volume(mrml_scene, SHAPE, spacing=SPACING, array=zero, name="padded")
    nan = anatomy_like(seed=2).astype(np.float32)
    nan[1, 30, 30] = np.nan
    nan_volume = float_volume(mrml_scene, nan, "with NaN")
    cases = [
        (None, 0, "no input volume"),
        (rgb, 0, "components per voxel"),
        (labelmap, 0, "labelmap"),
        (volume, 3, "slice index 3 is out of range: volume 'T2' has slices 0..2"),
        (volume, -1, "out of range"),
        (volume, 1.0, "whole number"),
        (zero_volume, 1, "slice 1 of 'padded'.*empty"),
        (nan_volume, 1, "slice 1 of 'with NaN'.*NaN"),
    ]
    before = state(mrml_scene, volume)
    for node, k, message in cases:
        with pytest.raises(InputError, match=message):
            workflow.segment_slice_into_scene(mrml_scene, node, k, segmenter, level="L4/L5")
        assert_same_state(before, state(mrml_scene, volume))
    # The other slices of the padded volume are fine: the check is per slice.
    assert workflow.check_slice(zero_volume, 2).shape == SHAPE[1:]


def test_box_writer_failure_on_a_new_volume_leaves_nothing(mrml_scene, volume, segmenter, monkeypatch):
    def broken_write_boxes(*args, **kwargs):
        raise RuntimeError("injected box writer failure")

    before = state(mrml_scene, volume)
    monkeypatch.setattr(writers, "write_boxes", broken_write_boxes)
    with pytest.raises(RuntimeError, match="injected"):
        workflow.segment_slice_into_scene(mrml_scene, volume, 1, segmenter)
    assert_same_state(before, state(mrml_scene, volume))
    assert writers.find_segmentation(mrml_scene, volume) is None and writers.find_measurement_table(mrml_scene) is None


class BadBoxSegmenter:
    """The real segmenter, with one box moved off the slice: the real box writer then refuses it."""

    def __init__(self, segmenter: SliceSegmenter) -> None:
        self.segmenter = segmenter

    def segment(self, image, slice_ijk_to_ras, **kwargs):
        result = self.segmenter.segment(image, slice_ijk_to_ras, **kwargs)
        box = next(iter(result.boxes.values()))
        result.boxes[4] = StructureBox((0, 0, 10_000, 10_000), box.center_ras, box.size_mm, box.axes_ras)
        return result


def test_box_writer_failure_rolls_back_an_existing_segmentation_and_table(mrml_scene, volume, segmenter):
    first = workflow.segment_slice_into_scene(mrml_scene, volume, 0, segmenter, level="L3/L4", method=THRESHOLD)
    seg = first.segmentation_node
    mask = slicer.util.arrayFromSegmentBinaryLabelmap(seg, "lamina", volume)
    mask[0, 2:5, 2:9] = 1  # a user edit that must survive the failed call
    slicer.util.updateSegmentBinaryLabelmapFromArray(mask, seg, "lamina", volume)
    before = state(mrml_scene, volume)

    with pytest.raises(InputError, match="outside the slice"):
        workflow.segment_slice_into_scene(mrml_scene, volume, 1, BadBoxSegmenter(segmenter), level="L4/L5")
    assert_same_state(before, state(mrml_scene, volume))
    # Slice 0 again (its rows and labels replaced, then put back).
    with pytest.raises(InputError, match="outside the slice"):
        workflow.segment_slice_into_scene(mrml_scene, volume, 0, BadBoxSegmenter(segmenter))
    assert_same_state(before, state(mrml_scene, volume))
    assert writers.find_segmentation(mrml_scene, volume) is seg


# ------------------------------------------------------------------------------------------------
# Geometry: transforms and the Red view


def test_transformed_volume_is_segmented_in_world_geometry(mrml_scene, volume, segmenter):
    transform = mrml_scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    matrix = vtk.vtkMatrix4x4()
    matrix.SetElement(0, 0, 2.0)  # stretches I (patient left-right) twice
    matrix.SetElement(1, 3, 15.0)
    transform.SetMatrixTransformToParent(matrix)
    volume.SetAndObserveTransformNodeID(transform.GetID())
    world = workflow.volume_ijk_to_world(volume)
    np.testing.assert_allclose(world, np.array(
        [[-1.6, 0, 0, 2 * volume.GetOrigin()[0]], [0, -0.8, 0, volume.GetOrigin()[1] + 15], [0, 0, 4, volume.GetOrigin()[2]], [0, 0, 0, 1]]))
    outcome = workflow.segment_slice_into_scene(mrml_scene, volume, 1, segmenter, method=THRESHOLD, volume_ijk_to_ras=world)
    assert outcome.segmentation_node.GetTransformNodeID() == transform.GetID()
    labels = writers.read_slice_labels(outcome.segmentation_node, volume, 1)
    for r in writers.rows_from_table(outcome.table_node):
        n = int((labels == anatomy.BY_KEY[r["segment_id"]].value).sum())
        if n:
            assert r["csa_mm2"] == pytest.approx(n * 1.6 * 0.8)  # world pixel size


def test_red_view_index_and_alignment_on_a_slice_node(mrml_scene, volume):
    red = mrml_scene.AddNewNodeByClass("vtkMRMLSliceNode")
    # Slicer's axial view (the orientation presets are registered by the application, not headless):
    # x to patient left, y anterior, z superior.
    axial = vtk.vtkMatrix4x4()
    axial.SetElement(0, 0, -1.0)
    axial.SetElement(2, 3, volume.GetOrigin()[2] + 2 * SPACING[2] + 1.0)
    red.GetSliceToRAS().DeepCopy(axial)
    red.UpdateMatrices()
    view = workflow.view_slice(volume, red)
    assert (view.k, view.aligned, view.inside) == (2, True, True)
    assert workflow.view_slice(None, red) is None and workflow.view_slice(volume, None) is None

    tilt = vtk.vtkTransform()
    tilt.RotateX(8.0)
    axial.SetElement(2, 3, volume.GetOrigin()[2] + 1 * SPACING[2])
    slice_to_ras = vtk.vtkMatrix4x4()
    vtk.vtkMatrix4x4.Multiply4x4(tilt.GetMatrix(), axial, slice_to_ras)
    red.GetSliceToRAS().DeepCopy(slice_to_ras)
    red.UpdateMatrices()
    tilted = workflow.view_slice(volume, red)
    assert not tilted.aligned and tilted.angle_deg == pytest.approx(8.0, abs=1e-6)
    aligned = workflow.align_view(volume, red)
    assert aligned.aligned and aligned.inside and aligned.k == 1 and abs(aligned.offset) < 1e-9
    assert red.GetSliceToRAS().GetElement(1, 1) > 0.99  # anterior still up: the view was not flipped


def test_export_csv_adds_the_suffix_and_refuses_an_empty_table(mrml_scene, volume, segmenter, tmp_path):
    with pytest.raises(InputError, match="no measurements"):
        workflow.export_measurements_csv(None, tmp_path / "m.csv")
    outcome = workflow.segment_slice_into_scene(mrml_scene, volume, 1, segmenter, level="L4/L5")
    path = workflow.export_measurements_csv(outcome.table_node, tmp_path / "measurements")
    assert path.name == "measurements.csv"
    text = path.read_text(encoding="utf-8")
    assert "CSA (mm2)" in text and "L4/L5" in text and text.count("\n") == 10


def test_failure_leaves_a_user_chosen_segmentation_untouched(mrml_scene, volume, segmenter):
    mine = mrml_scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "mine")
    mine.GetSegmentation().AddEmptySegment("tumour")
    with pytest.raises(InputError, match="outside the slice"):
        workflow.segment_slice_into_scene(mrml_scene, volume, 1, BadBoxSegmenter(segmenter), segmentation_node=mine)
    assert list(mine.GetSegmentation().GetSegmentIDs()) == ["tumour"]
    assert mine.GetAttribute(writers.ROLE_ATTRIBUTE) is None
    assert mine.GetNodeReference(writers.VOLUME_REFERENCE_ROLE) is None
    assert mrml_scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 1
    # Without the failure the nine segments go into the chosen node, next to the user's own.
    outcome = workflow.segment_slice_into_scene(mrml_scene, volume, 1, segmenter, segmentation_node=mine)
    assert outcome.segmentation_node is mine and mine.GetSegmentation().GetNumberOfSegments() == 10
    assert writers.find_segmentation(mrml_scene, volume) is mine


def test_command_line_writes_what_the_button_writes(mrml_scene, volume, segmenter, tmp_path):
    """``paraspinalseg segment`` runs this same workflow on its own headless scene: same rows, same labels."""
    from ParaspinalSegLib import batch
    from ParaspinalSegLib.volume_io import Volume

    outcome = workflow.segment_slice_into_scene(mrml_scene, volume, 1, segmenter, level="L4/L5", method=THRESHOLD)
    button_csv = workflow.export_measurements_csv(outcome.table_node, tmp_path / "button.csv")
    on_disk = Volume(array=anatomy_like(), ijk_to_ras=writers.volume_ijk_to_ras(volume), path=tmp_path / "T2.nrrd",
                     name="T2")
    cli = batch.segment_volume_to_folder(on_disk, 1, tmp_path / "out", segmenter, level="L4/L5",
                                         threshold_method=THRESHOLD)
    assert cli.files["measurements"].read_text(encoding="utf-8") == button_csv.read_text(encoding="utf-8")
    assert cli.found == outcome.result.found
    assert {"network", "write", "total"} <= set(cli.seconds)


def test_segment_fills_the_qc_column_of_every_row_and_says_so(mrml_scene, volume, segmenter):
    outcome = workflow.segment_slice_into_scene(mrml_scene, volume, 1, segmenter, method=THRESHOLD)
    rows = {r["segment_id"]: r for r in writers.rows_from_table(outcome.table_node)}
    assert outcome.table_node.GetTable().GetColumnByName("QC") is not None
    for s in anatomy.STRUCTURES:
        assert rows[s.key]["qc"] == outcome.qc.cell(s.value)
    text = workflow.describe_outcome(outcome)
    assert ("QC:" in text) == (not outcome.qc.ok)


def test_sheared_volume_or_shearing_transform_is_refused_before_the_model_and_the_scene(
        mrml_scene, volume, make_volume, segmenter):
    """A sheared IJK-to-RAS (or a linear transform that shears the volume in world space) would be measured
    with the wrong pixel area: refused by check_slice (which the module runs before loading the model) and
    by the segmentation itself, with the angle, the scene unchanged."""
    workflow.segment_slice_into_scene(mrml_scene, volume, 0, segmenter)  # something to keep intact
    t = math.radians(13.0)
    sheared = make_volume(mrml_scene, SHAPE, directions=((-1, -math.sin(t), 0), (0, -math.cos(t), 0), (0, 0, 1)),
                          spacing=SPACING, array=anatomy_like(), name="sheared")
    before = state(mrml_scene, volume)
    message = r"volume 'sheared': implausible geometry: its i and j axes are 77.00 degrees apart"
    with pytest.raises(InputError, match=message):
        workflow.check_slice(sheared, 1)
    with pytest.raises(InputError, match=message):
        workflow.segment_slice_into_scene(mrml_scene, sheared, 1, segmenter)
    assert_same_state(before, state(mrml_scene, volume))
    # Only the slice plane matters to one slice: a volume whose k axis leans is segmented as before.
    leaning = make_volume(mrml_scene, SHAPE, directions=((-1, 0, 0.2), (0, -1, 0), (0, 0, 0.98)), spacing=SPACING,
                          array=anatomy_like(), name="leaning")
    assert workflow.check_slice(leaning, 1).shape == SHAPE[1:]

    transform = mrml_scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    matrix = vtk.vtkMatrix4x4()
    matrix.SetElement(0, 1, 0.3)  # world x gains 0.3 × y: the I and J axes are no longer perpendicular
    transform.SetMatrixTransformToParent(matrix)
    volume.SetAndObserveTransformNodeID(transform.GetID())
    with pytest.raises(InputError, match=r"volume 'T2': implausible geometry: its i and j axes are 73.3\d degrees"):
        workflow.check_slice(volume, 1)
