"""Scene writers on a real headless MRML scene (slicer-core): segments, boxes, table, files, bad input."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest

pytest.importorskip("slicer", reason="slicer-core (PyPI) is not installed")

import slicer  # noqa: E402
import vtk  # noqa: E402

from ParaspinalSegLib.geometry import array_from_vtk_matrix  # noqa: E402
from ParaspinalSegLib import anatomy, headless  # noqa: E402
from ParaspinalSegLib import scene as writers  # noqa: E402
from ParaspinalSegLib import scene_segmentation  # noqa: E402
from ParaspinalSegLib import scene_boxes  # noqa: E402

SHAPE = (4, 24, 28)  # K, J, I
TERM_FILE = headless.TERMINOLOGY_FILE


def labels_a() -> np.ndarray:
    """A slice result with every structure present, values 1..9 in separate blocks."""
    lab = np.zeros(SHAPE[1:], np.uint8)
    for v in range(1, 10):
        lab[2 * v: 2 * v + 2, 2 + v: 8 + v] = v
    return lab


def labels_b() -> np.ndarray:
    """Another result where only three structures were found."""
    lab = np.zeros(SHAPE[1:], np.uint8)
    lab[3:9, 4:10] = 4
    lab[12:16, 15:25] = 8
    lab[18:22, 2:6] = 1
    return lab


def all_segment_arrays(seg, vol) -> dict[str, np.ndarray]:
    return {s.key: scene_segmentation._segment_array(seg, s.key, vol) for s in anatomy.STRUCTURES}


def node_counts(scene) -> dict[str, int]:
    return {
        c: scene.GetNumberOfNodesByClass(c)
        for c in ("vtkMRMLSegmentationNode", "vtkMRMLMarkupsROINode", "vtkMRMLTableNode", "vtkMRMLNode")
    }


def paint(seg, vol, key: str, k: int, rows: slice, cols: slice) -> None:
    """A manual edit made with Slicer's own scripting API (not the writers): add a stroke to one segment.

    Uses ``slicer.util`` helpers, which need the ``slicer.mrmlScene``/``slicer.modules`` shims that the
    ``mrml_scene`` fixture installs.
    """
    mask = slicer.util.arrayFromSegmentBinaryLabelmap(seg, key, vol)
    mask[k, rows, cols] = 1
    slicer.util.updateSegmentBinaryLabelmapFromArray(mask, seg, key, vol)


# ------------------------------------------------------------------------------------------------
# Segmentation


def test_segmentation_has_nine_segments_next_to_volume(mrml_scene, make_volume):
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(mrml_scene)
    study = sh.CreateStudyItem(sh.CreateSubjectItem(sh.GetSceneItemID(), "patient"), "lumbar MRI")
    vol = make_volume(mrml_scene, SHAPE)
    sh.CreateItem(study, vol)

    seg = writers.get_or_create_segmentation(mrml_scene, vol)
    assert writers.get_or_create_segmentation(mrml_scene, vol) is seg  # reused, not duplicated
    assert mrml_scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 1
    assert seg.GetNodeReference(seg.GetReferenceImageGeometryReferenceRole()) is vol
    assert sh.GetItemParent(sh.GetItemByDataNode(seg)) == study
    segmentation = seg.GetSegmentation()
    assert [segmentation.GetNthSegmentID(i) for i in range(segmentation.GetNumberOfSegments())] == [
        s.key for s in anatomy.STRUCTURES
    ]
    for s in anatomy.STRUCTURES:
        segment = segmentation.GetSegment(s.key)
        assert segment.GetName() == s.name
        assert np.allclose(segment.GetColor(), s.color)
        assert segment.GetTerminology().rstrip("|") == s.terminology
        assert scene_segmentation._segment_array(seg, s.key, vol).sum() == 0  # created empty


def test_segmentation_of_another_volume_is_refused(mrml_scene, make_volume):
    vol_a = make_volume(mrml_scene, SHAPE, name="A")
    vol_b = make_volume(mrml_scene, (3, 10, 12), name="B")
    seg_a = writers.get_or_create_segmentation(mrml_scene, vol_a)
    labels = np.zeros(SHAPE[1:], np.uint8)
    labels[2:8, 3:9] = 6
    writers.write_slice_labels(seg_a, vol_a, 1, labels)
    # E.g. the panel still points at A's segmentation after the input volume was switched to B.
    with pytest.raises(writers.SceneWriteError, match="holds the results for volume 'A'"):
        writers.get_or_create_segmentation(mrml_scene, vol_b, seg_a)
    assert writers.find_segmentation(mrml_scene, vol_a) is seg_a
    assert scene_segmentation._segment_array(seg_a, "multifidus_left", vol_a)[1].sum() == 36  # A's result intact


def test_two_slices_are_both_kept_and_edits_survive(mrml_scene, make_volume):
    vol = make_volume(mrml_scene, SHAPE)
    seg = writers.get_or_create_segmentation(mrml_scene, vol)
    lab_a, lab_b = labels_a(), labels_b()

    report = writers.write_slice_labels(seg, vol, 1, lab_a)
    assert report.written == [s.key for s in anatomy.STRUCTURES] and report.missing == []
    # The user extends the left psoas on slice A (rows 20..23 are background in labels_a there).
    paint(seg, vol, "psoas_major_left", 1, slice(20, 24), slice(20, 26))
    edited_a = writers.read_slice_labels(seg, vol, 1)
    assert (edited_a[20:24, 20:26] == 4).all()

    report = writers.write_slice_labels(seg, vol, 3, lab_b)
    assert report.written == ["intervertebral_disc", "psoas_major_left", "erector_spinae_left"]
    assert set(report.missing) == {s.key for s in anatomy.STRUCTURES} - set(report.written)
    assert "not found" in report.message() and "spinal canal" in report.message()

    np.testing.assert_array_equal(writers.read_slice_labels(seg, vol, 1), edited_a)  # A and the edit survive
    np.testing.assert_array_equal(writers.read_slice_labels(seg, vol, 3), lab_b)
    for k in (0, 2):
        assert writers.read_slice_labels(seg, vol, k).sum() == 0

    # Rewriting slice A replaces slice A only (the edit on A goes, B stays).
    before = all_segment_arrays(seg, vol)
    new_a = np.zeros_like(lab_a)
    new_a[5:10, 5:10] = 7
    writers.write_slice_labels(seg, vol, 1, new_a)
    np.testing.assert_array_equal(writers.read_slice_labels(seg, vol, 1), new_a)
    after = all_segment_arrays(seg, vol)
    for key in before:
        np.testing.assert_array_equal(np.delete(after[key], 1, axis=0), np.delete(before[key], 1, axis=0))


def test_seg_nrrd_round_trip_keeps_ids_names_colours_terminology(mrml_scene, make_volume, tmp_path):
    vol = make_volume(mrml_scene, SHAPE)
    seg = writers.get_or_create_segmentation(mrml_scene, vol)
    writers.write_slice_labels(seg, vol, 2, labels_a())
    path = tmp_path / "result.seg.nrrd"
    storage = mrml_scene.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
    storage.SetFileName(str(path))
    assert storage.WriteData(seg)

    scene2, _ = headless.create_headless_scene(cache_dir=tmp_path / "cache2")
    seg2 = scene2.AddNewNodeByClass("vtkMRMLSegmentationNode", "reread")
    storage2 = scene2.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
    storage2.SetFileName(str(path))
    assert storage2.ReadData(seg2)
    segmentation = seg2.GetSegmentation()
    assert sorted(segmentation.GetNthSegmentID(i) for i in range(segmentation.GetNumberOfSegments())) == sorted(
        s.key for s in anatomy.STRUCTURES
    )
    for s in anatomy.STRUCTURES:
        segment = segmentation.GetSegment(s.key)
        assert segment.GetName() == s.name
        assert np.allclose(segment.GetColor(), s.color, atol=1e-4)
        assert segment.GetTerminology().rstrip("|") == s.terminology
    np.testing.assert_array_equal(writers.read_slice_labels(seg2, vol, 2), labels_a())


# ------------------------------------------------------------------------------------------------
# Boxes

ROT = np.deg2rad(12.0)
OBLIQUE = np.array([[np.cos(ROT), -np.sin(ROT), 0], [np.sin(ROT), np.cos(ROT), 0], [0, 0, 1]]) @ np.diag([-1, -1, 1])


@pytest.mark.parametrize(
    "directions",
    [np.diag([-1.0, -1.0, 1.0]), np.eye(3), OBLIQUE, np.diag([-1.0, 1.0, 1.0])],
    ids=["LPS", "RAS", "oblique", "left-handed"],
)
def test_boxes_land_on_patient_side_and_slice(mrml_scene, make_volume, directions):
    vol = make_volume(mrml_scene, SHAPE, directions=directions)
    m = writers.volume_ijk_to_ras(vol)
    k = 2
    # A blob around the point 8 mm to the patient's left of the centre, on slice k.
    target = np.linalg.inv(m) @ np.array([-8.0, 0.0, (m @ [0, 0, k, 1])[2], 1.0])
    ci, cj = int(round(target[0])), int(round(target[1]))
    mask = np.zeros(SHAPE[1:], bool)
    mask[cj - 2: cj + 3, ci - 3: ci + 1] = True
    rows, cols = np.nonzero(mask)
    pixel = (rows.min(), cols.min(), rows.max() + 1, cols.max() + 1)

    rois = writers.write_boxes(mrml_scene, vol, k, {4: {"pixel": pixel}})
    roi = rois[4]
    centre = np.array(roi.GetCenterWorld())
    expected = m @ [(cols.min() + cols.max()) / 2, (rows.min() + rows.max()) / 2, k, 1]
    np.testing.assert_allclose(centre, expected[:3], atol=1e-6)
    assert centre[0] < -5.0  # patient left
    centre_ijk = np.linalg.inv(m) @ np.append(centre, 1.0)
    assert abs(centre_ijk[2] - k) < 1e-6  # on slice k's plane
    spacing = np.linalg.norm(m[:3, :3], axis=0)
    np.testing.assert_allclose(roi.GetSize(), [4 * spacing[0], 5 * spacing[1], spacing[2]], atol=1e-6)
    # Box axes follow the volume's I and J axes (oblique volumes too) and form a rotation.
    o2n = array_from_vtk_matrix(roi.GetObjectToNodeMatrix())[:3, :3]
    np.testing.assert_allclose(np.abs(o2n[:, :2].T @ (m[:3, :2] / spacing[:2])), np.eye(2), atol=1e-6)
    assert np.linalg.det(o2n) == pytest.approx(1.0)
    assert roi.GetLocked()
    assert np.allclose(roi.GetDisplayNode().GetSelectedColor(), anatomy.BY_VALUE[4].color)
    assert roi.GetAttribute(writers.STRUCTURE_ATTRIBUTE) == "psoas_major_left"


def test_boxes_replace_previous_and_hide_together(mrml_scene, make_volume):
    vol = make_volume(mrml_scene, SHAPE)
    other = make_volume(mrml_scene, SHAPE, name="other")
    writers.write_boxes(mrml_scene, other, 0, {4: (1, 1, 3, 3)})
    first = writers.write_boxes(mrml_scene, vol, 1, {4: (1, 1, 5, 5), 8: (10, 10, 12, 14)})
    second = writers.write_boxes(mrml_scene, vol, 3, {4: (2, 2, 6, 6)})
    boxes = writers.find_boxes(mrml_scene, vol)
    assert set(boxes) == {"psoas_major_left", "erector_spinae_left"}
    assert boxes["psoas_major_left"] is second[4]
    assert mrml_scene.GetNodeByID(first[4].GetID()) is None  # replaced, removed from the scene
    assert boxes["erector_spinae_left"] is first[8]
    assert len(writers.find_boxes(mrml_scene, other)) == 1  # other volume untouched

    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(mrml_scene)
    folders = {sh.GetItemParent(sh.GetItemByDataNode(n)) for n in boxes.values()}
    assert len(folders) == 1 and sh.GetItemAttribute(folders.pop(), writers.ROLE_ATTRIBUTE) == "boxes"

    assert writers.set_boxes_visible(mrml_scene, vol, False) == 2
    assert not any(n.GetDisplayNode().GetVisibility() for n in boxes.values())
    assert writers.find_boxes(mrml_scene, other)["psoas_major_left"].GetDisplayNode().GetVisibility()
    writers.write_boxes(mrml_scene, vol, 3, {5: (2, 2, 6, 6)}, clear_others=True)
    assert set(writers.find_boxes(mrml_scene, vol)) == {"psoas_major_right"}
    # Replaced boxes take their display nodes with them: no orphans pile up slice after slice.
    rois = mrml_scene.GetNodesByClass("vtkMRMLMarkupsROINode")
    displays = mrml_scene.GetNodesByClass("vtkMRMLMarkupsROIDisplayNode")
    assert displays.GetNumberOfItems() == rois.GetNumberOfItems() == 2


# ------------------------------------------------------------------------------------------------
# Table


def measurement(key: str, csa: float, fat: float | None = 12.5, found: bool = True) -> dict:
    return dict(key=key, found=found, csa_mm2=csa, functional_csa_mm2=csa * 0.9 if found else 0.0,
                fat_percent=fat, threshold=310.0, method="otsu")


def test_table_columns_have_units_and_rows_are_replaced(mrml_scene, make_volume, tmp_path):
    vol = make_volume(mrml_scene, SHAPE)
    table = writers.get_or_create_measurement_table(mrml_scene)
    assert writers.get_or_create_measurement_table(mrml_scene) is table
    assert table.GetColumnUnitLabel("CSA") == "mm2"
    assert table.GetColumnUnitLabel("Functional CSA") == "mm2"
    assert table.GetColumnUnitLabel("Fat") == "%"
    for c in writers.COLUMNS:
        assert table.GetColumnTitle(c.name) == c.title and table.GetColumnDescription(c.name)
        if c.kind == "double":
            assert table.GetTable().GetColumnByName(c.name).IsA("vtkDoubleArray")

    rows = [measurement(s.key, 100.0 + s.value) for s in anatomy.STRUCTURES]
    assert writers.write_measurement_rows(table, rows, volume=vol, slice_index=1, level="L4/L5", model_version="m1") == 9
    rows_b = [measurement("psoas_major_left", 55.0), measurement("lamina", 0.0, None, found=False)]
    writers.write_measurement_rows(table, rows_b, volume=vol, slice_index=3, level="L5/S1", model_version="m1")
    assert table.GetNumberOfRows() == 11

    # Re-measuring slice 1 replaces exactly its nine rows.
    rows_new = [measurement(s.key, 200.0 + s.value, 30.0) for s in anatomy.STRUCTURES]
    writers.write_measurement_rows(table, rows_new, volume=vol, slice_index=1, level="L4/L5", model_version="m2")
    got = writers.rows_from_table(table)
    assert len(got) == 11
    slice1 = [r for r in got if r["slice"] == 1]
    assert [r["csa_mm2"] for r in slice1] == [200.0 + s.value for s in anatomy.STRUCTURES]
    assert {r["model_version"] for r in slice1} == {"m2"}
    slice3 = [r for r in got if r["slice"] == 3]
    assert [(r["segment_id"], r["csa_mm2"], r["found"]) for r in slice3] == [
        ("lamina", 0.0, False), ("psoas_major_left", 55.0, True)]
    assert math.isnan(slice3[0]["fat_percent"]) and slice3[0]["level"] == "L5/S1"

    # A second volume with the same name (two series described alike) keeps its own rows.
    twin = make_volume(mrml_scene, SHAPE, name=vol.GetName())
    writers.write_measurement_rows(table, [measurement("psoas_major_left", 77.0)], volume=twin, slice_index=1)
    got = writers.rows_from_table(table)
    assert len(got) == 12
    assert [r["csa_mm2"] for r in got if r["volume_id"] == vol.GetID() and r["slice"] == 1] == [
        200.0 + s.value for s in anatomy.STRUCTURES]
    writers.write_measurement_rows(table, [measurement("psoas_major_left", 78.0)], volume=twin, slice_index=1)
    assert len(writers.rows_from_table(table)) == 12  # the twin's row replaced, nothing else
    writers.write_measurement_rows(table, [], volume=twin, slice_index=1)

    path = tmp_path / "m.csv"
    writers.table_to_csv(table, path)
    with open(path, newline="") as f:
        records = list(csv.reader(f))
    assert records[0][:9] == ["Volume", "Slice", "Position (mm)", "Level", "Structure", "Segment ID", "Found",
                              "CSA (mm2)", "Functional CSA (mm2)"]
    assert "Fat (%)" in records[0] and "Dixon fat fraction (%)" in records[0] and len(records) == 12
    lamina = next(r for r in records if r[5] == "lamina" and r[1] == "3")
    assert lamina[records[0].index("Fat (%)")] == "" and lamina[6] == "no"
    # no position given and no Dixon images: empty cells, not zeros
    assert lamina[2] == "" and lamina[records[0].index("Dixon fat fraction (%)")] == ""


# ------------------------------------------------------------------------------------------------
# Whole scene through .mrb


def test_mrb_round_trip_restores_everything(mrml_scene, make_volume, tmp_path):
    vol = make_volume(mrml_scene, SHAPE)
    seg = writers.get_or_create_segmentation(mrml_scene, vol)
    writers.write_slice_labels(seg, vol, 1, labels_a())
    writers.write_slice_labels(seg, vol, 2, labels_b())
    writers.write_boxes(mrml_scene, vol, 1, {4: (4, 7, 8, 11), 9: (16, 11, 18, 17)})
    table = writers.get_or_create_measurement_table(mrml_scene)
    writers.write_measurement_rows(table, [measurement("psoas_major_left", 42.0)], volume=vol, slice_index=1,
                                   level="L4/L5", model_version="m1")
    param = mrml_scene.AddNewNodeByClass("vtkMRMLScriptedModuleNode", "ParaspinalSeg")
    param.SetAttribute("ModuleName", "ParaspinalSeg")
    param.SetParameter("SliceIndex", "1")
    param.SetParameter("Level", "L4/L5")
    param.SetParameter("Device", "cpu")
    param.SetNodeReferenceID("InputVolume", vol.GetID())
    param.SetNodeReferenceID("OutputSegmentation", seg.GetID())
    boxes_before = {k: (np.array(n.GetCenterWorld()), np.array(n.GetSize()),
                        array_from_vtk_matrix(n.GetObjectToNodeMatrix()))
                    for k, n in writers.find_boxes(mrml_scene, vol).items()}
    arrays_before = all_segment_arrays(seg, vol)
    rows_before = writers.rows_from_table(table)

    mrb = tmp_path / "result.mrb"
    assert mrml_scene.WriteToMRB(str(mrb))
    scene2, _ = headless.create_headless_scene(cache_dir=tmp_path / "cache2")
    assert scene2.ReadFromMRB(str(mrb), True)

    vol2 = scene2.GetFirstNodeByName("T2")
    seg2 = writers.find_segmentation(scene2, vol2)
    assert seg2 is not None
    for s in anatomy.STRUCTURES:
        segment = seg2.GetSegmentation().GetSegment(s.key)
        assert segment.GetName() == s.name and segment.GetTerminology().rstrip("|") == s.terminology
        np.testing.assert_array_equal(scene_segmentation._segment_array(seg2, s.key, vol2), arrays_before[s.key])
    boxes_after = writers.find_boxes(scene2, vol2)
    assert set(boxes_after) == set(boxes_before)
    for key, (centre, size, o2n) in boxes_before.items():
        node = boxes_after[key]
        np.testing.assert_allclose(node.GetCenterWorld(), centre, atol=1e-5)
        np.testing.assert_allclose(node.GetSize(), size, atol=1e-5)
        np.testing.assert_allclose(array_from_vtk_matrix(node.GetObjectToNodeMatrix()), o2n, atol=1e-6)
        assert node.GetLocked()
    table2 = writers.find_measurement_table(scene2)
    rows_after = writers.rows_from_table(table2)
    assert len(rows_after) == len(rows_before)
    for after, before in zip(rows_after, rows_before):
        # Slicer's table storage writes doubles with ~15 significant digits.
        assert after.keys() == before.keys()
        for name, value in before.items():
            if isinstance(value, float):
                assert after[name] == pytest.approx(value, rel=1e-12, nan_ok=True), name
            else:
                assert after[name] == value, name
    assert table2.GetColumnUnitLabel("CSA") == "mm2"
    params = [scene2.GetNthNodeByClass(i, "vtkMRMLScriptedModuleNode")
              for i in range(scene2.GetNumberOfNodesByClass("vtkMRMLScriptedModuleNode"))]
    param2 = next(p for p in params if p.GetAttribute("ModuleName") == "ParaspinalSeg")
    assert [param2.GetParameter(n) for n in ("SliceIndex", "Level", "Device")] == ["1", "L4/L5", "cpu"]
    assert param2.GetNodeReference("InputVolume") is vol2
    assert param2.GetNodeReference("OutputSegmentation") is seg2


# ------------------------------------------------------------------------------------------------
# Bad input changes nothing


def test_bad_input_raises_and_leaves_scene_unchanged(mrml_scene, make_volume):
    vol = make_volume(mrml_scene, SHAPE)
    seg = writers.get_or_create_segmentation(mrml_scene, vol)
    writers.write_slice_labels(seg, vol, 1, labels_a())
    writers.write_boxes(mrml_scene, vol, 1, {4: (1, 1, 4, 4)})
    table = writers.get_or_create_measurement_table(mrml_scene)
    writers.write_measurement_rows(table, [measurement("lamina", 9.0)], volume=vol, slice_index=1)
    counts, arrays, rows = node_counts(mrml_scene), all_segment_arrays(seg, vol), writers.rows_from_table(table)
    box = writers.find_boxes(mrml_scene, vol)["psoas_major_left"]

    nan_labels = labels_b().astype(float)
    nan_labels[0, 0] = np.nan
    bad_calls = [
        lambda: writers.write_slice_labels(seg, vol, 2, labels_a()[:, :-1]),  # wrong shape
        lambda: writers.write_slice_labels(seg, vol, 2, labels_a().T),
        lambda: writers.write_slice_labels(seg, vol, 2, np.stack([labels_a()] * 2)),  # 3-D
        lambda: writers.write_slice_labels(seg, vol, SHAPE[0], labels_a()),  # k out of range
        lambda: writers.write_slice_labels(seg, vol, -1, labels_a()),
        lambda: writers.write_slice_labels(seg, vol, 2, np.full(SHAPE[1:], 255, np.uint8)),  # unknown value
        lambda: writers.write_slice_labels(seg, vol, 2, nan_labels),
        lambda: writers.write_slice_labels(seg, None, 2, labels_a()),  # no volume
        lambda: writers.read_slice_labels(seg, vol, 7),
        lambda: writers.write_boxes(mrml_scene, vol, 2, {4: (0, 0, 3, 3), 6: (0, 0, 99, 3)}),  # outside
        lambda: writers.write_boxes(mrml_scene, vol, 2, {4: (0, 0, 3, 3), 42: (0, 0, 3, 3)}),  # bad value
        lambda: writers.write_boxes(mrml_scene, vol, 9, {4: (0, 0, 3, 3)}),
        lambda: writers.write_measurement_rows(table, [measurement("lamina", 1.0), measurement("psoas", 1.0)],
                                               volume=vol, slice_index=1),
        lambda: writers.write_measurement_rows(table, [measurement("lamina", 1.0, fat=150.0)], volume=vol,
                                               slice_index=1),
        lambda: writers.write_measurement_rows(table, [measurement("lamina", -1.0)], volume=vol, slice_index=1),
    ]
    for call in bad_calls:
        with pytest.raises(writers.SceneWriteError):
            call()
        assert node_counts(mrml_scene) == counts
    after = all_segment_arrays(seg, vol)
    for key in arrays:
        np.testing.assert_array_equal(after[key], arrays[key])
    # NaN (no position, no Dixon value) compares unequal to itself: compare with NaN as None
    def plain(rs):
        return [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()} for r in rs]

    assert plain(writers.rows_from_table(table)) == plain(rows)
    assert writers.find_boxes(mrml_scene, vol)["psoas_major_left"] is box


def test_rgb_volume_is_refused_before_anything_is_created(mrml_scene, make_volume):
    rgb = make_volume(mrml_scene, SHAPE, components=3, name="photo")
    counts = node_counts(mrml_scene)
    with pytest.raises(writers.SceneWriteError, match="components"):
        writers.get_or_create_segmentation(mrml_scene, rgb)
    with pytest.raises(writers.SceneWriteError, match="components"):
        writers.write_boxes(mrml_scene, rgb, 0, {4: (0, 0, 2, 2)})
    assert node_counts(mrml_scene) == counts


# ------------------------------------------------------------------------------------------------
# Terminology file


def test_terminology_file_loads_and_matches_anatomy_colours(tmp_path):
    doc = json.loads(TERM_FILE.read_text())
    assert doc["SegmentationCategoryTypeContextName"] == anatomy.TERMINOLOGY_CONTEXT
    scene, app_logic = headless.create_headless_scene(terminology=True, cache_dir=tmp_path / "c")
    logic = headless.module_logics(app_logic)["Terminologies"]
    names = vtk.vtkStringArray()
    logic.GetLoadedTerminologyNames(names)
    assert anatomy.TERMINOLOGY_CONTEXT in [names.GetValue(i) for i in range(names.GetNumberOfValues())]
    category = doc["SegmentationCodes"]["Category"][0]
    assert (category["CodingSchemeDesignator"], category["CodeValue"]) == anatomy.ANATOMICAL_STRUCTURE[:2]
    types = {t["CodeMeaning"]: t for t in category["Type"]}
    assert len(types) == 6
    labels = {}
    for t in types.values():
        for entry in t.get("Modifier", [t]):
            labels[entry["3dSlicerLabel"]] = (t, entry)
    assert set(labels) == {s.name for s in anatomy.STRUCTURES}
    for s in anatomy.STRUCTURES:
        t, entry = labels[s.name]
        assert entry["recommendedDisplayRGBValue"] == [round(c * 255) for c in s.color]
        if s.side:
            assert (entry["CodingSchemeDesignator"], entry["CodeValue"]) == s.modifier_code[:2]
        else:
            assert "Modifier" not in t


def test_anatomy_terminology_strings_resolve_in_the_term_file(tmp_path):
    scene, app_logic = headless.create_headless_scene(terminology=True, cache_dir=tmp_path / "c")
    logic = headless.module_logics(app_logic)["Terminologies"]
    doc = json.loads(TERM_FILE.read_text())
    codes = {t["CodeValue"]: t["CodeMeaning"] for t in doc["SegmentationCodes"]["Category"][0]["Type"]}
    for s in anatomy.STRUCTURES:
        assert codes.get(s.type_code[1]) == s.type_code[2], s.key
        entry = slicer.vtkSlicerTerminologyEntry()
        assert logic.DeserializeTerminologyEntry(s.terminology, entry)
        assert entry.GetTypeObject().GetCodeValue() == s.type_code[1]


def test_failed_first_box_write_leaves_no_empty_folder(mrml_scene, make_volume, monkeypatch):
    vol = make_volume(mrml_scene, SHAPE)
    real_geometry, calls = writers.box_geometry, []

    def geometry_failing_on_second_box(*args, **kwargs):
        calls.append(args)
        if len(calls) > 1:
            raise RuntimeError("injected failure half-way through the boxes")
        return real_geometry(*args, **kwargs)

    monkeypatch.setattr(scene_boxes, "box_geometry", geometry_failing_on_second_box)
    with pytest.raises(RuntimeError, match="injected"):
        writers.write_boxes(mrml_scene, vol, 1, {4: (1, 1, 4, 4), 6: (2, 2, 5, 5)})
    assert scene_boxes._box_folder(mrml_scene, vol, None, create=False) == 0  # no empty folder left behind
    assert mrml_scene.GetNodesByClass("vtkMRMLMarkupsROINode").GetNumberOfItems() == 0


def test_canal_row_carries_its_stenosis_grade_into_table_and_csv(mrml_scene, make_volume, tmp_path):
    from ParaspinalSegLib.measurements import measure_slice

    vol = make_volume(mrml_scene, SHAPE)
    labels = np.zeros((40, 40), np.uint8)
    labels[5:14, 5:14] = 2  # 81 px of 1 mm²: relative stenosis (75 ≤ CSA < 100)
    labels[20:30, 20:30] = 3
    labels[15:35, 32:40] = 6  # a multifidus with a fatty band, so the slice has a fat threshold
    image = np.full(labels.shape, 400.0) + np.random.default_rng(0).normal(0, 10, labels.shape)
    image[20:35, 32:40] -= 300
    rows = measure_slice(image, labels, (1.0, 1.0))
    table = writers.get_or_create_measurement_table(mrml_scene)
    writers.write_measurement_rows(table, rows, volume=vol, slice_index=1, level="L4/L5")
    got = {r["segment_id"]: r for r in writers.rows_from_table(table)}
    assert got["spinal_canal"]["stenosis_grade"] == "relative"
    assert got["lamina"]["stenosis_grade"] == "" and got["psoas_major_left"]["stenosis_grade"] == ""
    # Canal and lamina get a CSA only: no fat % even on a slice where the muscle has one.
    assert got["multifidus_left"]["fat_percent"] == pytest.approx(25.0)
    assert all(math.isnan(got[k]["fat_percent"]) for k in ("spinal_canal", "lamina"))  # empty double cell

    path = tmp_path / "m.csv"
    writers.table_to_csv(table, path)
    with open(path, newline="") as f:
        records = list(csv.reader(f))
    col = records[0].index("Stenosis grade")
    canal = next(r for r in records[1:] if r[records[0].index("Segment ID")] == "spinal_canal")
    assert canal[col] == "relative" and canal[records[0].index("CSA (mm2)")] == "81"
    assert canal[records[0].index("Fat (%)")] == ""
