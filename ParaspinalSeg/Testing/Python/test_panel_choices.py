"""Panel choices as data (ParaspinalSegLib.panel_choices), checked against Slicer's real layout
descriptions and Tables logic from slicer-core; sample-data registration arguments; terminology."""

from __future__ import annotations

import hashlib
import urllib.request
from pathlib import Path

import pytest

from ParaspinalSegLib import anatomy, panel_choices, sample_data, terminology

slicer = pytest.importorskip("slicer", reason="slicer-core (PyPI) is not installed")


@pytest.fixture(scope="module")
def layouts():
    """(describe_layout, slicer_layout_with_table) from a real layout logic and Tables logic."""
    scene = slicer.vtkMRMLScene()
    layout_logic = slicer.vtkMRMLLayoutLogic()
    layout_logic.SetMRMLScene(scene)
    layout_node = layout_logic.GetLayoutNode()
    tables_logic = slicer.vtkSlicerTablesLogic()
    return layout_node.GetLayoutDescription, tables_logic.GetLayoutWithTable, (scene, layout_logic, tables_logic)


L = slicer.vtkMRMLLayoutNode


@pytest.mark.parametrize("current", [L.SlicerLayoutConventionalView, L.SlicerLayoutFourUpView,
                                     L.SlicerLayoutOneUpRedSliceView, L.SlicerLayoutConventionalWidescreenView,
                                     L.SlicerLayoutOneUp3DView, L.SlicerLayoutOneUpYellowSliceView])
def test_the_table_is_shown_in_a_layout_that_keeps_the_red_view(layouts, current):
    describe, with_table, _keep = layouts
    choice = panel_choices.table_presentation(current, "vtkMRMLTableNode1", describe, with_table)
    shown = describe(choice.layout)
    assert panel_choices.layout_shows(shown, "table") and panel_choices.layout_shows(shown, "Red")
    assert choice.change_layout and choice.use_column_titles_as_headers and choice.table_id == "vtkMRMLTableNode1"
    if current != L.SlicerLayoutOneUp3DView:
        assert choice.layout == with_table(current)  # Slicer's own choice (as Segment Statistics) where it has Red
    else:
        # Slicer would pick "3D + table", which has no Red view: the four-up table layout instead.
        assert not panel_choices.layout_shows(describe(with_table(current)), "Red")
        assert choice.layout == L.SlicerLayoutFourUpTableView == panel_choices.FOUR_UP_TABLE_VIEW


def test_a_layout_with_table_and_red_is_kept(layouts):
    describe, with_table, _keep = layouts
    for current in (L.SlicerLayoutFourUpTableView, L.SlicerLayoutFourUpPlotTableView):
        choice = panel_choices.table_presentation(current, "T", describe, with_table)
        assert choice.layout == current and not choice.change_layout


def test_default_input_is_the_first_volume_the_selector_lists(mrml_scene, make_volume):
    import vtk

    rgb = make_volume(mrml_scene, (2, 8, 8), components=3, name="photo")
    labelmap = mrml_scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "labels")
    dwi = mrml_scene.AddNewNodeByClass("vtkMRMLDiffusionWeightedVolumeNode", "dwi")
    # A plain scalar volume whose image has 3 components (e.g. loaded as scalar) is not usable either.
    odd = mrml_scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "odd")
    image = vtk.vtkImageData()
    image.SetDimensions(4, 4, 1)
    image.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 3)
    odd.SetAndObserveImageData(image)
    assert panel_choices.default_input_volume([rgb, labelmap, dwi, odd]) is None
    t2 = make_volume(mrml_scene, (2, 8, 8), name="T2")
    nodes = slicer.util.getNodesByClass("vtkMRMLScalarVolumeNode")
    assert nodes.index(rgb) < nodes.index(t2)  # the old code took nodes[0]: the RGB volume
    assert panel_choices.default_input_volume(nodes) is t2


@pytest.mark.parametrize("installed, ok", [("2.13.0+cpu", True), ("2.2.0", True), ("2.4.1+cu121", True),
                                           ("3.0.0a0", True), ("2.1.2", False), ("1.13.1+cu117", False),
                                           ("unknown", False)])
def test_an_installed_torch_is_version_checked(installed, ok):
    problem = panel_choices.torch_version_problem(installed, "2.2")
    assert (problem == "") == ok
    if not ok:
        assert "PyTorch" in problem


# ------------------------------------------------------------------------------------------------
# Sample Data


def test_sample_data_registration_arguments():
    """The arguments match SampleDataLogic.registerCustomSampleDataSource (Slicer 5.8–5.12) and point at
    the shipped file with its true checksum."""
    args = sample_data.registration_arguments()
    assert args["category"] == "ParaspinalSeg"
    accepted = {"category", "sampleName", "uris", "fileNames", "nodeNames", "customDownloader",
                "thumbnailFileName", "loadFileTypes", "loadFiles", "loadFileProperties", "checksums"}
    assert set(args) <= accepted
    assert len(args["uris"]) == len(args["fileNames"]) == len(args["nodeNames"]) == len(args["checksums"]) == 1
    algo, digest = args["checksums"][0].split(":")
    assert algo == "SHA256"
    assert digest == hashlib.sha256(sample_data.SAMPLE_FILE.read_bytes()).hexdigest()
    assert Path(args["thumbnailFileName"]).is_file()
    assert args["fileNames"][0] == sample_data.SAMPLE_FILE.name
    # Sample Data fetches the URI with urllib.request.urlretrieve: it must give the shipped bytes.
    with urllib.request.urlopen(args["uris"][0]) as f:
        assert f.read() == sample_data.SAMPLE_FILE.read_bytes()


def test_sample_data_loads_as_a_volume(mrml_scene):
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(str(sample_data.SAMPLE_FILE))
    volume = mrml_scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", sample_data.NODE_NAME)
    assert storage.ReadData(volume)
    assert panel_choices.is_listed_input_volume(volume)


# ------------------------------------------------------------------------------------------------
# Terminology


class Slicer58Segment:
    """A real vtkSegment seen through Slicer 5.8's API, which has no SetTerminology/GetTerminology."""

    def __init__(self, segment):
        self._segment = segment

    def __getattr__(self, name):
        if name in ("SetTerminology", "GetTerminology"):
            raise AttributeError(name)
        return getattr(self._segment, name)


def test_terminology_fallback_without_set_terminology_stores_what_set_terminology_stores():
    entry = anatomy.STRUCTURES[3].terminology
    new, old = slicer.vtkSegment(), slicer.vtkSegment()
    terminology.set_segment_terminology(new, entry)  # 5.10+: SetTerminology
    terminology.set_segment_terminology(Slicer58Segment(old), entry)  # 5.8: the tag
    assert not hasattr(Slicer58Segment(old), "SetTerminology")
    assert old.GetTerminology() == new.GetTerminology() == entry
    import vtk

    value = vtk.reference("")
    assert old.GetTag(slicer.vtkSegment.GetTerminologyEntryTagName(), value) and value.get() == entry


def test_terminology_load_result_is_checked(tmp_path):
    import json

    logic = slicer.vtkSlicerTerminologiesModuleLogic()
    logic.SetModuleShareDirectory(str(tmp_path))
    assert terminology.ensure_terminology_loaded(logic) is True  # first use: loaded
    assert anatomy.TERMINOLOGY_CONTEXT in terminology.loaded_terminology_names(logic)
    assert terminology.ensure_terminology_loaded(logic) is False  # loaded once only
    broken = tmp_path / "broken.term.json"
    broken.write_text("{ not json", encoding="utf-8")
    other = slicer.vtkSlicerTerminologiesModuleLogic()
    other.SetModuleShareDirectory(str(tmp_path))
    with pytest.raises(terminology.TerminologyError, match="could not load"):
        terminology.ensure_terminology_loaded(other, broken)
    with pytest.raises(terminology.TerminologyError, match="not found"):
        terminology.ensure_terminology_loaded(other, tmp_path / "missing.term.json")
    renamed = json.loads(terminology.TERMINOLOGY_FILE.read_text(encoding="utf-8"))
    renamed["SegmentationCategoryTypeContextName"] = "Something else"
    (tmp_path / "renamed.term.json").write_text(json.dumps(renamed), encoding="utf-8")
    with pytest.raises(terminology.TerminologyError, match="expected"):
        terminology.ensure_terminology_loaded(other, tmp_path / "renamed.term.json")


@pytest.mark.parametrize("major, minor, ok", [(5, 8, True), (5, 10, True), (5, 12, True), (6, 0, True),
                                              (5, 6, False), (4, 11, False)])
def test_oldest_supported_slicer_is_5_8(major, minor, ok):
    assert panel_choices.MINIMUM_SLICER_VERSION == (5, 8)
    assert (panel_choices.slicer_version_problem(major, minor) == "") == ok
