"""ParaspinalSeg: the 3D Slicer glue of the ParaspinalSeg extension.

Segments the paraspinal muscles, disc, spinal canal and lamina on the axial slice shown in the Red
view with BS-ESNet, and measures cross-sectional area and fat percentage. Everything that is not
Slicer GUI glue (network, pre/post-processing, measurements, scene writers) lives in
ParaspinalSegLib; this file reads the panel into a parameter node, calls the library and shows
progress and errors.

PyTorch is never imported at module import: the library is imported inside the functions that need
it, and torch is installed on the first "Segment slice" after one confirmation.
"""

import importlib
import logging
import math
import os
import pathlib
import time
from typing import Annotated, Optional

import numpy as np
import vtk

import slicer
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

#: Folder of this file; the library package and Resources/ sit next to it (source tree and install tree).
MODULE_DIR = pathlib.Path(__file__).resolve().parent
#: The model shipped with the extension (same file as ParaspinalSegLib.weights.DEFAULT_WEIGHTS).
DEFAULT_WEIGHTS_PATH = MODULE_DIR / "Resources" / "Models" / "bsesnet_default.json"
TERMINOLOGY_FILE = MODULE_DIR / "Resources" / "SegmentationCategoryTypeModifier-ParaspinalSeg.term.json"
REQUIREMENTS_FILE = MODULE_DIR / "Resources" / "requirements.txt"

#: Disc levels offered in the panel ("" = not recorded).
SPINAL_LEVELS = ("", "L1/L2", "L2/L3", "L3/L4", "L4/L5", "L5/S1")
FAT_THRESHOLD_METHODS = ("auto", "otsu", "manual")
DEVICES = ("auto", "cpu", "cuda")
TORCH_VERSION_REQUIREMENT = ">=2.2"
#: The Red view counts as aligned with the volume's slices when its normal is within this angle of the K axis.
ALIGNMENT_TOLERANCE_DEG = 0.5

#: Library submodules reloaded by "Reload" in developer mode (order: dependencies first).
LIBRARY_MODULES = (
    "ParaspinalSegLib.errors",
    "ParaspinalSegLib.anatomy",
    "ParaspinalSegLib.boxes",
    "ParaspinalSegLib.preprocessing",
    "ParaspinalSegLib.postprocessing",
    "ParaspinalSegLib.measurements",
    "ParaspinalSegLib.weights",
    "ParaspinalSegLib.network",
    "ParaspinalSegLib.segmenter",
    "ParaspinalSegLib.scene",
)


#
# ParaspinalSeg
#


class ParaspinalSeg(ScriptedLoadableModule):
    """Uses ScriptedLoadableModule base class, available at:
    https://github.com/Slicer/Slicer/blob/main/Base/Python/slicer/ScriptedLoadableModule.py
    """

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("ParaspinalSeg")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = []
        self.parent.contributors = ["ParaspinalSeg contributors"]
        self.parent.helpText = _("""
Segments the paraspinal muscles (left and right psoas major, multifidus and erector spinae), the
intervertebral disc, the spinal canal and the lamina on one axial lumbar MRI slice with the BS-ESNet
network, and measures cross-sectional area (CSA), functional CSA and fat percentage.
<ol>
<li>Select the <b>input volume</b> and scroll the <b>Red view</b> to the slice to measure
(if the panel says the view is not aligned with the volume's slices, click <b>Align view</b>).</li>
<li>Optionally pick the <b>spinal level</b> of the slice and the fat-threshold method.</li>
<li>Click <b>Segment slice</b>: nine segments, one box per structure and the measurement table appear.
Segmenting another slice adds to the same segmentation and table.</li>
<li>Correct segments in Segment Editor if needed, then click <b>Update measurements</b>.</li>
<li><b>Export table to CSV</b> writes the measurements with their units.</li>
</ol>
Left and right are the patient's, taken from the volume's orientation.
The first run installs PyTorch (after asking).
See the <a href="https://github.com/ParaspinalSeg/SlicerParaspinalSeg#readme">documentation</a>.
""")
        self.parent.acknowledgementText = _("""
The network is BS-ESNet, described in "Segmentation of Paraspinal Muscles at Varied Lumbar Spinal Levels
by Explicit Saliency-Aware Learning", Medical Image Computing and Computer Assisted Intervention - MICCAI 2020,
Lecture Notes in Computer Science vol. 12266, chapter 63, Springer, 2020,
<a href="https://doi.org/10.1007/978-3-030-59725-2_63">doi:10.1007/978-3-030-59725-2_63</a>.
The module follows the 3D Slicer scripted module template by Jean-Christophe Fillion-Robin (Kitware),
Andras Lasso (PerkLab) and Steve Pieper (Isomics).
""")

        # Additional initialization step after application startup is complete
        slicer.app.connect("startupCompleted()", registerTerminology)


#
# Register the module's terminology (segment category/type codes) with Slicer
#


def registerTerminology():
    """Load ParaspinalSeg's .term.json so the nine segments show their standard names and codes."""
    if not TERMINOLOGY_FILE.is_file():
        logging.warning(f"ParaspinalSeg: terminology file not found: {TERMINOLOGY_FILE}")
        return
    try:
        terminologiesLogic = slicer.modules.terminologies.logic()
        terminologiesLogic.LoadTerminologyFromFile(str(TERMINOLOGY_FILE))
    except Exception as exc:  # a broken install must not stop Slicer's startup
        logging.warning(f"ParaspinalSeg: could not load terminology {TERMINOLOGY_FILE}: {exc}")


#
# Red view geometry (plain numpy, no Slicer calls: Testing/Python/test_module_static.py runs it)
#


def redViewSliceIndex(volumeIJKToRAS, sliceToRAS, dimensions, toleranceDeg: float = ALIGNMENT_TOLERANCE_DEG) -> dict:
    """Which volume slice K the Red view shows, and whether the view lies in the volume's slices.

    ``volumeIJKToRAS`` and ``sliceToRAS`` are 4x4 arrays (the volume's IJK-to-RAS matrix and the
    slice node's SliceToRAS); ``dimensions`` is the volume's (I, J, K) size. The view is *aligned*
    when its normal is parallel to the volume's K axis (within ``toleranceDeg``); then every pixel of
    the view lies in voxel slice K = round(K coordinate of the view centre) and that slice can be
    used as it is, without interpolation. Returns a dict with ``k`` (int), ``aligned`` (bool),
    ``inside`` (0 <= k < number of slices), ``angleDeg`` (normal vs K axis) and ``offset`` (distance
    of the view centre from the slice centre, in slices).
    """
    m = np.asarray(volumeIJKToRAS, dtype=float).reshape(4, 4)
    s = np.asarray(sliceToRAS, dtype=float).reshape(4, 4)
    kAxis = m[:3, 2] / np.linalg.norm(m[:3, 2])
    normal = s[:3, 2] / np.linalg.norm(s[:3, 2])
    cosine = min(1.0, abs(float(np.dot(kAxis, normal))))
    angleDeg = math.degrees(math.acos(cosine))
    centreIJK = np.linalg.solve(m, np.append(s[:3, 3], 1.0))
    k = int(np.floor(centreIJK[2] + 0.5))  # round half up, the same on both sides of zero
    numSlices = int(dimensions[2])
    return {
        "k": k,
        "aligned": angleDeg <= toleranceDeg,
        "inside": 0 <= k < numSlices,
        "angleDeg": angleDeg,
        "offset": float(centreIJK[2] - k),
    }


def alignedSliceToRAS(volumeIJKToRAS, sliceToRAS, dimensions) -> np.ndarray:
    """SliceToRAS that puts a slice view exactly onto one of the volume's slices, keeping its look.

    The view normal becomes the volume's K axis (same sense as the current normal), the view's
    horizontal axis the volume's I or J axis closest to the current horizontal axis, and the vertical
    axis completes a right-handed frame (so the view is never mirrored). The view centre keeps its
    in-plane position and moves to the nearest voxel slice centre K (clamped into the volume).
    Arguments as for :func:`redViewSliceIndex`; returns a 4x4 array.
    """
    m = np.asarray(volumeIJKToRAS, dtype=float).reshape(4, 4)
    s = np.asarray(sliceToRAS, dtype=float).reshape(4, 4)
    axes = m[:3, :3] / np.linalg.norm(m[:3, :3], axis=0)
    current = s[:3, :3] / np.linalg.norm(s[:3, :3], axis=0)
    normal = axes[:, 2] * (1.0 if np.dot(axes[:, 2], current[:, 2]) >= 0 else -1.0)
    scores = [np.dot(axes[:, a], current[:, 0]) for a in (0, 1)]
    best = int(np.argmax(np.abs(scores)))
    horizontal = axes[:, best] * (1.0 if scores[best] >= 0 else -1.0)
    horizontal = horizontal - np.dot(horizontal, normal) * normal  # orthogonal even for sheared volumes
    horizontal /= np.linalg.norm(horizontal)
    vertical = np.cross(normal, horizontal)
    centreIJK = np.linalg.solve(m, np.append(s[:3, 3], 1.0))
    centreIJK[2] = min(max(np.floor(centreIJK[2] + 0.5), 0), int(dimensions[2]) - 1)
    aligned = np.eye(4)
    aligned[:3, 0] = horizontal
    aligned[:3, 1] = vertical
    aligned[:3, 2] = normal
    aligned[:3, 3] = (m @ centreIJK)[:3]
    return aligned


#
# ParaspinalSegParameterNode
#


@parameterNodeWrapper
class ParaspinalSegParameterNode:
    """
    The parameters needed by module.

    inputVolume - Axial lumbar MRI; the slice shown in the Red view is segmented.
    outputSegmentation - Segmentation receiving the nine segments (None: create one on Segment).
    spinalLevel - Disc level of the slice, written into the table ("" = not recorded).
    fatThresholdMethod - How the fat/lean threshold is chosen ("auto", "otsu" or "manual").
    manualThreshold - Intensity above which muscle pixels count as fat (method "manual").
    showBoxes - Show the box around each structure.
    device - Where the network runs ("auto": GPU if PyTorch can use one).
    weightsPath - Model config (.json) or weights (.safetensors); the shipped model by default.
    """

    inputVolume: vtkMRMLScalarVolumeNode
    outputSegmentation: vtkMRMLSegmentationNode
    spinalLevel: Annotated[str, Choice(list(SPINAL_LEVELS))] = ""
    fatThresholdMethod: Annotated[str, Choice(list(FAT_THRESHOLD_METHODS))] = "auto"
    manualThreshold: Annotated[float, WithinRange(-1.0e6, 1.0e6)] = 0.0
    showBoxes: bool = True
    device: Annotated[str, Choice(list(DEVICES))] = "auto"
    weightsPath: pathlib.Path = DEFAULT_WEIGHTS_PATH


#
# ParaspinalSegWidget
#


class ParaspinalSegWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Uses ScriptedLoadableModuleWidget base class, available at:
    https://github.com/Slicer/Slicer/blob/main/Base/Python/slicer/ScriptedLoadableModule.py
    """

    def __init__(self, parent=None) -> None:
        """Called when the user opens the module the first time and the widget is initialized."""
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)  # needed for parameter node observation
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._redSliceNode = None
        self._redView = None  # last result of redViewSliceIndex (None: no volume/view)
        self._shownWeightsPath = None
        self._boxesShown = None

    def setup(self) -> None:
        """Called when the user opens the module the first time and the widget is initialized."""
        ScriptedLoadableModuleWidget.setup(self)

        # Load widget from .ui file (created by Qt Designer).
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/ParaspinalSeg.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)

        # Set scene in MRML widgets. The top-level qMRMLWidget's "mrmlSceneChanged(vtkMRMLScene*)" signal
        # is connected to each MRML widget's "setMRMLScene(vtkMRMLScene*)" slot in the .ui file.
        uiWidget.setMRMLScene(slicer.mrmlScene)

        # Create logic class. Logic implements all computations that should be possible to run
        # in batch mode, without a graphical user interface.
        self.logic = ParaspinalSegLogic()

        # Connections

        # These connections ensure that we update parameter node when scene is closed
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        # Buttons
        self.ui.segmentButton.connect("clicked(bool)", self.onSegmentButton)
        self.ui.updateMeasurementsButton.connect("clicked(bool)", self.onUpdateMeasurementsButton)
        self.ui.exportCsvButton.connect("clicked(bool)", self.onExportCsvButton)
        self.ui.alignViewButton.connect("clicked(bool)", self.onAlignViewButton)

        # Make sure parameter node is initialized (needed for module reload)
        self.initializeParameterNode()

    def cleanup(self) -> None:
        """Called when the application closes and the module widget is destroyed."""
        self.removeObservers()

    def enter(self) -> None:
        """Called each time the user opens this module."""
        # Make sure parameter node exists and observed
        self.initializeParameterNode()
        self._observeRedSliceNode(True)
        self._updateSliceInfo()

    def exit(self) -> None:
        """Called each time the user opens a different module."""
        # Do not react to parameter node changes (GUI will be updated when the user enters into the module)
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)
        self._observeRedSliceNode(False)

    def onSceneStartClose(self, caller, event) -> None:
        """Called just before the scene is closed."""
        # Parameter node will be reset, do not use it anymore
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        """Called just after the scene is closed."""
        # If this module is shown while the scene is closed then recreate a new parameter node immediately
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        """Ensure parameter node exists and observed."""
        # Parameter node stores all user choices in parameter values, node selections, etc.
        # so that when the scene is saved and reloaded, these settings are restored.

        self.setParameterNode(self.logic.getParameterNode())

        # Select default input nodes if nothing is selected yet to save a few clicks for the user
        if not self._parameterNode.inputVolume:
            firstVolumeNode = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if firstVolumeNode and not firstVolumeNode.IsA("vtkMRMLLabelMapVolumeNode"):
                self._parameterNode.inputVolume = firstVolumeNode

        # A scene saved with another installation of the extension points at that installation's
        # shipped model: use this installation's copy instead.
        weightsPath = self._parameterNode.weightsPath
        if weightsPath.name == DEFAULT_WEIGHTS_PATH.name and weightsPath != DEFAULT_WEIGHTS_PATH and not weightsPath.exists():
            self._parameterNode.weightsPath = DEFAULT_WEIGHTS_PATH

    def setParameterNode(self, inputParameterNode: Optional[ParaspinalSegParameterNode]) -> None:
        """
        Set and observe parameter node.
        Observation is needed because when the parameter node is changed then the GUI must be updated immediately.
        """

        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            # Note: in the .ui file, a Qt dynamic property called "SlicerParameterName" is set on each
            # ui element that needs connection.
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            # The combo box connector fills the items from the Choice annotation; label the blank level.
            self.ui.spinalLevelComboBox.setItemText(0, _("(not recorded)"))
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)
            self._checkCanApply()

    def _checkCanApply(self, caller=None, event=None) -> None:
        """Enable buttons and widgets that make sense for the current parameters and Red view."""
        self._updateSliceInfo()
        self._updateModelInfo()
        node = self._parameterNode
        self.ui.manualThresholdSpinBox.enabled = bool(node) and node.fatThresholdMethod == "manual"

        view = self._redView
        if not node or not node.inputVolume:
            self.ui.segmentButton.toolTip = _("Select an input volume")
            self.ui.segmentButton.enabled = False
        elif view is None:
            self.ui.segmentButton.toolTip = _("The Red view is not available")
            self.ui.segmentButton.enabled = False
        elif not view["aligned"]:
            self.ui.segmentButton.toolTip = _("The Red view is not aligned with the volume's slices: click 'Align view'")
            self.ui.segmentButton.enabled = False
        elif not view["inside"]:
            self.ui.segmentButton.toolTip = _("The Red view is outside the volume: scroll to a slice of the volume")
            self.ui.segmentButton.enabled = False
        else:
            self.ui.segmentButton.toolTip = _("Segment slice {k} of {volume}").format(
                k=view["k"], volume=node.inputVolume.GetName())
            self.ui.segmentButton.enabled = True

        self.ui.updateMeasurementsButton.enabled = bool(node and node.inputVolume and view and view["inside"])
        tableNode = self.logic.measurementTable()
        self.ui.exportCsvButton.enabled = tableNode is not None and tableNode.GetNumberOfRows() > 0

        # The checkbox shows/hides existing boxes at once, not only at the next segmentation.
        boxesState = (node.inputVolume.GetID(), node.showBoxes) if node and node.inputVolume else None
        if boxesState is not None and boxesState != self._boxesShown:
            self._boxesShown = boxesState
            self.logic.setBoxesVisible(node.inputVolume, node.showBoxes)

    #
    # Red view
    #

    def _observeRedSliceNode(self, observe: bool) -> None:
        if self._redSliceNode is not None:
            self.removeObserver(self._redSliceNode, vtk.vtkCommand.ModifiedEvent, self._onRedSliceModified)
            self._redSliceNode = None
        if observe:
            self._redSliceNode = self.logic.redSliceNode()
            if self._redSliceNode is not None:
                self.addObserver(self._redSliceNode, vtk.vtkCommand.ModifiedEvent, self._onRedSliceModified)

    def _onRedSliceModified(self, caller=None, event=None) -> None:
        self._checkCanApply()

    def _updateSliceInfo(self) -> None:
        """Show which slice the Red view shows, or why it cannot be segmented."""
        node = self._parameterNode
        volumeNode = node.inputVolume if node else None
        self._redView = self.logic.redViewSlice(volumeNode) if volumeNode else None
        view = self._redView
        warning = ""
        alignVisible = False
        if volumeNode is None:
            text = "–"
        elif view is None:
            text = "–"
            warning = _("No Red view in this layout: choose a layout with the Red slice view.")
        else:
            numSlices = volumeNode.GetImageData().GetDimensions()[2] if volumeNode.GetImageData() else 0
            text = _("{k} of 0…{last}").format(k=view["k"], last=numSlices - 1)
            if math.isnan(view["angleDeg"]):
                warning = _("The volume is under a non-linear transform: harden the transform first.")
            elif not view["aligned"]:
                alignVisible = True
                warning = _("The Red view is not aligned with the volume's slices (tilted by {angle:.1f}°), "
                            "so it shows an interpolated plane. Click 'Align view' to segment the volume's own slice.").format(
                    angle=view["angleDeg"])
            elif not view["inside"]:
                alignVisible = True
                warning = _("The Red view is outside the volume.")
        self.ui.sliceIndexLabel.text = text
        self.ui.sliceWarningLabel.text = warning
        self.ui.sliceWarningLabel.visible = bool(warning)
        self.ui.alignViewButton.visible = alignVisible

    def _updateModelInfo(self) -> None:
        """Describe the selected model (read from its JSON config; needs no torch)."""
        node = self._parameterNode
        if not node or node.weightsPath == self._shownWeightsPath:
            return
        self._shownWeightsPath = node.weightsPath
        self.ui.modelInfoLabel.text = self.logic.modelInfo(node.weightsPath)

    def onAlignViewButton(self) -> None:
        """Rotate the Red view onto the volume's slices and show the volume in it."""
        with slicer.util.tryWithErrorDisplay(_("Failed to align the Red view."), waitCursor=True):
            self.logic.alignRedView(self._parameterNode.inputVolume)
        self._checkCanApply()

    #
    # Buttons
    #

    def onSegmentButton(self) -> None:
        """Run BS-ESNet on the Red view's slice and write segments, boxes and table rows."""
        node = self._parameterNode
        self.ui.statusLabel.text = ""
        dependenciesReady = False
        with slicer.util.tryWithErrorDisplay(_("Failed to install the Python packages ParaspinalSeg needs."),
                                             waitCursor=False):
            dependenciesReady = self._ensureDependencies()
        if not dependenciesReady:
            self.ui.statusLabel.text = _("Not segmented: PyTorch is needed to run the network.")
            return
        succeeded = False
        with slicer.util.tryWithErrorDisplay(_("Failed to segment the slice."), waitCursor=True):
            k = self._currentSliceIndex()
            self.ui.statusLabel.text = _("Segmenting slice {k}…").format(k=k)
            slicer.app.processEvents()  # show the status before the (short) blocking run
            outcome = self.logic.segmentSlice(
                node.inputVolume,
                k,
                segmentationNode=node.outputSegmentation,
                level=node.spinalLevel,
                method=self._method(),
                device=node.device,
                weightsPath=node.weightsPath,
                showBoxes=node.showBoxes,
            )
            node.outputSegmentation = outcome["segmentationNode"]
            self.logic.showResults(outcome["segmentationNode"], outcome["tableNode"])
            self.ui.statusLabel.text = self.logic.describeOutcome(outcome)
            succeeded = True
        if not succeeded:
            self.ui.statusLabel.text = _("Segmentation failed; nothing was written.")
        self._checkCanApply()

    def onUpdateMeasurementsButton(self) -> None:
        """Recompute the Red view slice's rows from the segments as they are now."""
        node = self._parameterNode
        with slicer.util.tryWithErrorDisplay(_("Failed to update the measurements."), waitCursor=True):
            k = self._currentSliceIndex(requireAligned=False)
            tableNode = self.logic.updateMeasurements(
                node.inputVolume, k, node.outputSegmentation, level=node.spinalLevel, method=self._method())
            self.logic.showResults(None, tableNode)
            self.ui.statusLabel.text = _("Measurements of slice {k} updated from the current segments.").format(k=k)
        self._checkCanApply()

    def onExportCsvButton(self) -> None:
        """Ask for a file name and write the input volume's measurement table as CSV."""
        import qt

        node = self._parameterNode
        with slicer.util.tryWithErrorDisplay(_("Failed to export the table."), waitCursor=False):
            tableNode = self.logic.measurementTable()
            if tableNode is None or tableNode.GetNumberOfRows() == 0:
                raise ValueError(_("There are no measurements yet: segment a slice first."))
            baseName = node.inputVolume.GetName() if node and node.inputVolume else "ParaspinalSeg"
            suggested = os.path.join(qt.QDir.homePath(), f"{baseName}_measurements.csv")
            path = qt.QFileDialog.getSaveFileName(
                slicer.util.mainWindow(), _("Export measurements"), suggested, _("CSV files (*.csv)"))
            if not path:
                return
            written = self.logic.exportTableToCsv(tableNode, path)
            self.ui.statusLabel.text = _("Table written to {path}").format(path=written)

    #
    # Helpers
    #

    def _method(self):
        """The fat-threshold method as measurements.measure_slice takes it (a number for 'manual')."""
        node = self._parameterNode
        return float(node.manualThreshold) if node.fatThresholdMethod == "manual" else node.fatThresholdMethod

    def _currentSliceIndex(self, requireAligned: bool = True) -> int:
        """K of the Red view's slice, or an error saying why it cannot be used."""
        view = self.logic.redViewSlice(self._parameterNode.inputVolume)
        if view is None:
            raise ValueError(_("There is no Red slice view in the current layout."))
        if requireAligned and not view["aligned"]:
            raise ValueError(_("The Red view is not aligned with the volume's slices: click 'Align view' first."))
        if not view["inside"]:
            raise ValueError(_("The Red view is outside the volume: scroll to one of its slices."))
        return view["k"]

    def _ensureDependencies(self) -> bool:
        """Install PyTorch (and the other requirements) after one confirmation; False if the user declined."""
        missing = self.logic.missingPackages()
        if not missing:
            return True
        if not slicer.util.confirmOkCancelDisplay(
            _("ParaspinalSeg needs these Python packages, which are not installed yet: {packages}.\n\n"
              "PyTorch is installed with the PyTorch extension's installer, which picks the CPU or GPU (CUDA) build "
              "for this computer. The download can be large (up to a few GB) and take several minutes.\n\n"
              "Install now?").format(packages=", ".join(missing)),
            windowTitle=_("Install Python packages"),
        ):
            return False
        self.ui.statusLabel.text = _("Installing {packages}…").format(packages=", ".join(missing))
        slicer.app.processEvents()
        self.logic.installPackages(missing)
        self.ui.statusLabel.text = ""
        return True

    def onReload(self) -> None:
        """Reload the library's submodules too (developer mode), so edits to them take effect."""
        import sys

        for name in LIBRARY_MODULES:
            if name in sys.modules:
                importlib.reload(sys.modules[name])
        if "ParaspinalSegLib" in sys.modules:
            importlib.reload(sys.modules["ParaspinalSegLib"])
        ScriptedLoadableModuleWidget.onReload(self)


#
# ParaspinalSegLogic
#


class ParaspinalSegLogic(ScriptedLoadableModuleLogic):
    """Thin layer between the panel and ParaspinalSegLib; usable from scripts and tests without the widget.

    The segmenter (model loaded on a device) is created once per (weights file, device) and reused.
    """

    def __init__(self) -> None:
        """Called when the logic class is instantiated. Can be used for initializing member variables."""
        ScriptedLoadableModuleLogic.__init__(self)
        self._segmenter = None
        self._segmenterKey = None

    def getParameterNode(self):
        return ParaspinalSegParameterNode(super().getParameterNode())

    #
    # Dependencies
    #

    @staticmethod
    def missingPackages() -> list:
        """Names of the Python packages the network needs that cannot be imported (no import happens)."""
        import importlib.util

        return [name for name in ("torch", "safetensors") if importlib.util.find_spec(name) is None]

    @staticmethod
    def installPackages(missing) -> None:
        """Install ``missing`` packages without asking again (the caller asked once).

        PyTorch goes through the PyTorch extension (PyTorchUtils), which chooses the CPU or CUDA build;
        the other requirements (Resources/requirements.txt) through slicer.packaging.pip_ensure, or
        slicer.util.pip_install on Slicer versions without it.
        """
        if "torch" in missing:
            try:
                import PyTorchUtils
            except ImportError:
                PyTorchUtils = None
            if PyTorchUtils is not None:
                torchLogic = PyTorchUtils.PyTorchUtilsLogic()
                if not torchLogic.torchInstalled():
                    torch = torchLogic.installTorch(askConfirmation=False, torchVersionRequirement=TORCH_VERSION_REQUIREMENT)
                    if torch is None:
                        raise RuntimeError(_("PyTorch could not be installed. Install it from the PyTorch Utils module, "
                                             "restart Slicer and try again."))
            else:
                # The extension declares PyTorch as a dependency; this path is for development builds.
                logging.warning("ParaspinalSeg: PyTorch extension not found; installing torch from PyPI")
                slicer.util.pip_install(f"torch{TORCH_VERSION_REQUIREMENT}")
        packaging = None
        for moduleName in ("slicer.packaging", "slicer.pydeps"):
            try:
                packaging = importlib.import_module(moduleName)
                break
            except ImportError:
                continue
        if packaging is not None and hasattr(packaging, "pip_ensure"):
            packaging.pip_ensure(packaging.load_requirements(str(REQUIREMENTS_FILE)),
                                 prompt_install=False, requester="ParaspinalSeg")
        else:
            requirements = [line.strip() for line in REQUIREMENTS_FILE.read_text().splitlines()
                            if line.strip() and not line.strip().startswith("#")]
            if requirements:
                slicer.util.pip_install(" ".join(requirements))
        importlib.invalidate_caches()
        try:
            import torch  # noqa: F401  (check that the fresh install works)
        except Exception as exc:
            raise RuntimeError(_("PyTorch was installed but cannot be imported ({error}). Restart Slicer and try again.").format(
                error=exc)) from exc

    #
    # Model
    #

    @staticmethod
    def resolveWeightsPath(weightsPath=None) -> pathlib.Path:
        """The weights file to use: ``weightsPath`` if given, else the model shipped with the extension."""
        if weightsPath is None or str(weightsPath).strip() in ("", "."):
            return DEFAULT_WEIGHTS_PATH
        return pathlib.Path(weightsPath)

    def modelInfo(self, weightsPath=None) -> str:
        """A few lines about the model (from its JSON config), or what is wrong with it."""
        from ParaspinalSegLib.errors import ParaspinalSegError
        from ParaspinalSegLib.weights import read_weights_config

        try:
            return read_weights_config(self.resolveWeightsPath(weightsPath)).summary()
        except (ParaspinalSegError, OSError, ValueError) as exc:
            return _("Model not usable: {error}").format(error=exc)

    def getSegmenter(self, weightsPath=None, device: str = "auto"):
        """The SliceSegmenter for (weights, device), loading the model only when either changed."""
        from ParaspinalSegLib.segmenter import SliceSegmenter

        path = self.resolveWeightsPath(weightsPath)
        key = (str(path.resolve()), path.stat().st_mtime if path.exists() else None, device)
        if self._segmenter is None or self._segmenterKey != key:
            self._segmenter = None  # free the previous model before loading another
            self._segmenter = SliceSegmenter(weights=path, device=device)
            self._segmenterKey = key
        return self._segmenter

    #
    # Input checks and geometry
    #

    @staticmethod
    def checkVolume(volumeNode) -> np.ndarray:
        """The volume's voxels as an array ``arr[k, j, i]``, or an InputError saying why it cannot be used."""
        from ParaspinalSegLib.errors import InputError

        if volumeNode is None:
            raise InputError(_("No input volume selected."))
        if not volumeNode.IsA("vtkMRMLScalarVolumeNode") or volumeNode.IsA("vtkMRMLLabelMapVolumeNode"):
            raise InputError(_("{volume} is not a grey-value image (it is a {kind}).").format(
                volume=volumeNode.GetName(), kind=volumeNode.GetClassName()))
        imageData = volumeNode.GetImageData()
        if imageData is None:
            raise InputError(_("{volume} has no image data.").format(volume=volumeNode.GetName()))
        if imageData.GetNumberOfScalarComponents() != 1 or volumeNode.IsA("vtkMRMLVectorVolumeNode"):
            raise InputError(_("{volume} has {n} components per voxel (RGB or vector image); "
                               "ParaspinalSeg needs a single-component MRI.").format(
                volume=volumeNode.GetName(), n=imageData.GetNumberOfScalarComponents()))
        return slicer.util.arrayFromVolume(volumeNode)

    @staticmethod
    def volumeIJKToRAS(volumeNode) -> np.ndarray:
        """IJK-to-RAS of the volume in its own (local) coordinates, as the library expects."""
        matrix = vtk.vtkMatrix4x4()
        volumeNode.GetIJKToRASMatrix(matrix)
        return slicer.util.arrayFromVTKMatrix(matrix)

    def volumeIJKToWorld(self, volumeNode) -> np.ndarray:
        """IJK to world RAS, parent transform included (views live in world coordinates)."""
        ijkToRAS = self.volumeIJKToRAS(volumeNode)
        parent = volumeNode.GetParentTransformNode()
        if parent is None:
            return ijkToRAS
        from ParaspinalSegLib.errors import InputError

        if not parent.IsTransformToWorldLinear():
            raise InputError(_("{volume} is under a non-linear transform; harden the transform first "
                               "(Data module: right-click the volume, 'Harden transform').").format(
                volume=volumeNode.GetName()))
        localToWorld = vtk.vtkMatrix4x4()
        parent.GetMatrixTransformToWorld(localToWorld)
        return slicer.util.arrayFromVTKMatrix(localToWorld) @ ijkToRAS

    @staticmethod
    def redSliceNode():
        """The Red slice view's slice node (None without a layout manager or Red view)."""
        layoutManager = slicer.app.layoutManager()
        sliceWidget = layoutManager.sliceWidget("Red") if layoutManager else None
        if sliceWidget is not None:
            return sliceWidget.mrmlSliceNode()
        return slicer.mrmlScene.GetNodeByID("vtkMRMLSliceNodeRed")

    def redViewSlice(self, volumeNode) -> Optional[dict]:
        """:func:`redViewSliceIndex` for the Red view and ``volumeNode`` (None if either is missing).

        A volume under a non-linear transform counts as not aligned (its slices are curved in the view).
        """
        sliceNode = self.redSliceNode()
        if sliceNode is None or volumeNode is None or volumeNode.GetImageData() is None:
            return None
        parent = volumeNode.GetParentTransformNode()
        if parent is not None and not parent.IsTransformToWorldLinear():
            return {"k": 0, "aligned": False, "inside": False, "angleDeg": float("nan"), "offset": 0.0}
        sliceToRAS = slicer.util.arrayFromVTKMatrix(sliceNode.GetSliceToRAS())
        return redViewSliceIndex(self.volumeIJKToWorld(volumeNode), sliceToRAS, volumeNode.GetImageData().GetDimensions())

    def alignRedView(self, volumeNode) -> None:
        """Show ``volumeNode`` in the Red view, rotated onto its slices and moved to the nearest one."""
        self.checkVolume(volumeNode)
        layoutManager = slicer.app.layoutManager()
        sliceWidget = layoutManager.sliceWidget("Red") if layoutManager else None
        if sliceWidget is None:
            raise ValueError(_("There is no Red slice view in the current layout."))
        sliceLogic = sliceWidget.sliceLogic()
        compositeNode = sliceLogic.GetSliceCompositeNode()
        if compositeNode.GetBackgroundVolumeID() != volumeNode.GetID():
            compositeNode.SetBackgroundVolumeID(volumeNode.GetID())
        sliceNode = sliceLogic.GetSliceNode()
        aligned = alignedSliceToRAS(self.volumeIJKToWorld(volumeNode),
                                    slicer.util.arrayFromVTKMatrix(sliceNode.GetSliceToRAS()),
                                    volumeNode.GetImageData().GetDimensions())
        sliceNode.GetSliceToRAS().DeepCopy(slicer.util.vtkMatrixFromArray(aligned))
        sliceNode.UpdateMatrices()

    #
    # Segment, measure, export
    #

    @staticmethod
    def _sliceSpacing(ijkToRAS, k: int) -> tuple:
        """Pixel size (mm) of ``arr[k]`` along its axis 0 (J) and axis 1 (I)."""
        from ParaspinalSegLib.preprocessing import slice_geometry_from_volume

        geometry = slice_geometry_from_volume(ijkToRAS, k)
        return (float(np.linalg.norm(geometry[:3, 0])), float(np.linalg.norm(geometry[:3, 1])))

    def segmentSlice(self, volumeNode, k: int, segmentationNode=None, level: str = "", method="auto",
                     device: str = "auto", weightsPath=None, showBoxes: bool = True) -> dict:
        """Segment slice ``k`` (of ``arr[k, j, i]``) of ``volumeNode``; write segments, boxes and table rows.

        ``segmentationNode`` None reuses the segmentation made before for this volume or creates one.
        ``method`` is "auto", "otsu" or a number (manual fat threshold). Everything that can fail (input,
        model, network, measurements) runs before the first node is written, and a failure while
        writing undoes what this call wrote, so no half-written node is left behind. Returns a dict
        with segmentationNode, tableNode, result (SliceResult), measurements, k and seconds.
        """
        from ParaspinalSegLib import scene
        from ParaspinalSegLib.errors import InputError
        from ParaspinalSegLib.measurements import measure_slice

        start = time.perf_counter()
        array = self.checkVolume(volumeNode)
        k = int(k)
        if not 0 <= k < array.shape[0]:
            raise InputError(_("Slice {k} is outside {volume} (slices 0…{last}).").format(
                k=k, volume=volumeNode.GetName(), last=array.shape[0] - 1))
        ijkToRAS = self.volumeIJKToRAS(volumeNode)
        segmenter = self.getSegmenter(weightsPath, device)
        result = segmenter.segment_volume_slice(array, ijkToRAS, k)
        records = measure_slice(array[k], result.labels, self._sliceSpacing(ijkToRAS, k), method)

        # Only now touch the scene; remember what to undo if a writer fails half-way.
        mrmlScene = slicer.mrmlScene
        existingSegmentation = segmentationNode or scene.find_segmentation(mrmlScene, volumeNode)
        previousLabels = (scene.read_slice_labels(existingSegmentation, volumeNode, k)
                          if existingSegmentation is not None else None)
        tableNode = scene.find_measurement_table(mrmlScene)
        tableExisted = tableNode is not None
        previousRows = [row for row in scene.rows_from_table(tableNode)
                        if row["volume"] == volumeNode.GetName() and row["slice"] == k] if tableExisted else []
        outputSegmentation = None
        try:
            outputSegmentation = scene.get_or_create_segmentation(mrmlScene, volumeNode, segmentationNode)
            scene.write_slice_labels(outputSegmentation, volumeNode, k, result.labels)
            tableNode = scene.get_or_create_measurement_table(mrmlScene)
            scene.write_measurement_rows(tableNode, records, volume=volumeNode, slice_index=k, level=level,
                                         model_version=result.model_version)
            # clear_others: the boxes shown are always those of the slice segmented last.
            scene.write_boxes(mrmlScene, volumeNode, k, result.boxes, clear_others=True)
            scene.set_boxes_visible(mrmlScene, volumeNode, showBoxes)
        except Exception:
            self._undoSliceWrite(volumeNode, k, outputSegmentation, existingSegmentation, previousLabels,
                                 tableExisted, previousRows)
            raise
        return {
            "segmentationNode": outputSegmentation,
            "tableNode": tableNode,
            "result": result,
            "measurements": records,
            "k": k,
            "seconds": time.perf_counter() - start,
        }

    @staticmethod
    def _undoSliceWrite(volumeNode, k, outputSegmentation, existingSegmentation, previousLabels,
                        tableExisted, previousRows) -> None:
        """Put back what segmentSlice wrote before a writer failed (best effort; the first error is re-raised)."""
        from ParaspinalSegLib import scene

        mrmlScene = slicer.mrmlScene
        try:
            tableNode = scene.find_measurement_table(mrmlScene)
            if tableNode is not None and not tableExisted:
                scene.remove_node(mrmlScene, tableNode)
            elif tableNode is not None:
                level = previousRows[0]["level"] if previousRows else ""
                scene.write_measurement_rows(tableNode, previousRows, volume=volumeNode, slice_index=k, level=level)
            if outputSegmentation is not None and existingSegmentation is None:
                scene.remove_node(mrmlScene, outputSegmentation)
            elif existingSegmentation is not None and previousLabels is not None:
                scene.write_slice_labels(existingSegmentation, volumeNode, k, previousLabels)
        except Exception:
            logging.exception("ParaspinalSeg: could not undo a partial write")

    @staticmethod
    def describeOutcome(outcome: dict) -> str:
        """Status line: what ran where, how long it took, and which structures were not found."""
        from ParaspinalSegLib.anatomy import BY_VALUE

        result = outcome["result"]
        deviceName = "GPU" if str(result.device).startswith("cuda") else "CPU"
        text = _("Segmented slice {k} on {device} in {seconds:.2f} s.").format(
            k=outcome["k"], device=deviceName, seconds=result.seconds)
        if result.missing:
            text += " " + _("Not found: {names}.").format(names=", ".join(BY_VALUE[v].name for v in result.missing))
        return text

    def updateMeasurements(self, volumeNode, k: int, segmentationNode=None, level: str = "", method="auto"):
        """Recompute slice ``k``'s table rows from the segments as they are now (after manual edits).

        Replaces exactly that slice's rows; the model version recorded when it was segmented is kept.
        Returns the table node.
        """
        from ParaspinalSegLib import scene
        from ParaspinalSegLib.errors import InputError
        from ParaspinalSegLib.measurements import measure_slice

        array = self.checkVolume(volumeNode)
        segmentationNode = segmentationNode or scene.find_segmentation(slicer.mrmlScene, volumeNode)
        if segmentationNode is None:
            raise InputError(_("{volume} has no ParaspinalSeg segmentation yet: segment a slice first.").format(
                volume=volumeNode.GetName()))
        k = int(k)
        if not 0 <= k < array.shape[0]:
            raise InputError(_("Slice {k} is outside {volume} (slices 0…{last}).").format(
                k=k, volume=volumeNode.GetName(), last=array.shape[0] - 1))
        labels = scene.read_slice_labels(segmentationNode, volumeNode, k)
        records = measure_slice(array[k], labels, self._sliceSpacing(self.volumeIJKToRAS(volumeNode), k), method)
        tableNode = scene.get_or_create_measurement_table(slicer.mrmlScene)
        previousVersions = {row["model_version"] for row in scene.rows_from_table(tableNode)
                            if row["volume"] == volumeNode.GetName() and row["slice"] == k}
        modelVersion = previousVersions.pop() if len(previousVersions) == 1 else ""
        scene.write_measurement_rows(tableNode, records, volume=volumeNode, slice_index=k, level=level,
                                     model_version=modelVersion)
        return tableNode

    @staticmethod
    def measurementTable():
        """ParaspinalSeg's measurement table in the scene (None before the first measurement)."""
        from ParaspinalSegLib import scene

        return scene.find_measurement_table(slicer.mrmlScene)

    @staticmethod
    def setBoxesVisible(volumeNode, visible: bool) -> int:
        """Show or hide the boxes of ``volumeNode``; returns how many boxes there are."""
        from ParaspinalSegLib import scene

        return scene.set_boxes_visible(slicer.mrmlScene, volumeNode, visible)

    @staticmethod
    def exportTableToCsv(tableNode, path) -> pathlib.Path:
        """Write ``tableNode`` to ``path`` as CSV (units in the header); returns the path written."""
        from ParaspinalSegLib import scene

        if tableNode is None or tableNode.GetNumberOfRows() == 0:
            raise ValueError(_("There are no measurements yet: segment a slice first."))
        path = pathlib.Path(path)
        if path.suffix.lower() != ".csv":
            path = path.with_name(path.name + ".csv")
        scene.table_to_csv(tableNode, path)
        return path

    @staticmethod
    def showResults(segmentationNode=None, tableNode=None) -> None:
        """Show the segmentation in the views and the table in the layout's table view."""
        if segmentationNode is not None:
            segmentationNode.CreateDefaultDisplayNodes()
            segmentationNode.SetDisplayVisibility(True)
        if tableNode is not None and slicer.app.layoutManager() is not None:
            slicer.app.applicationLogic().GetSelectionNode().SetActiveTableID(tableNode.GetID())
            slicer.app.applicationLogic().PropagateTableSelection()


#
# ParaspinalSegTest
#


class ParaspinalSegTest(ScriptedLoadableModuleTest):
    """
    Exercises the logic inside Slicer on a small synthetic volume the test makes itself.
    The network part runs only where PyTorch is installed (with a tiny random-weight model),
    so the test passes on Slicer's factory machines without PyTorch.
    """

    def setUp(self):
        """Do whatever is needed to reset the state - typically a scene clear will be enough."""
        slicer.mrmlScene.Clear()

    def runTest(self):
        """Run as few or as many tests as needed here."""
        self.setUp()
        self.test_RedViewSliceIndex()
        self.setUp()
        self.test_MeasurementsAndExport()
        self.setUp()
        self.test_BadInput()
        self.setUp()
        self.test_SegmentSlice()

    # Helpers

    @staticmethod
    def _syntheticVolume(name="ParaspinalSegTestVolume"):
        """A 3-slice LPS-like axial volume (64 x 64, 0.8 mm pixels) with bright ellipses on a dark body."""
        numSlices, rows, cols = 3, 64, 64
        jj, ii = np.mgrid[0:rows, 0:cols]
        array = np.zeros((numSlices, rows, cols), dtype=np.int16)
        for k in range(numSlices):
            body = ((ii - 32) / 28.0) ** 2 + ((jj - 32) / 22.0) ** 2 <= 1.0
            array[k][body] = 300
            for ci in (20, 44):  # two "muscles" either side of the midline
                muscle = ((ii - ci) / 7.0) ** 2 + ((jj - 40) / 6.0) ** 2 <= 1.0
                array[k][muscle] = 150
                fat = ((ii - ci) / 2.0) ** 2 + ((jj - 40) / 2.0) ** 2 <= 1.0
                array[k][fat] = 600
        ijkToRAS = np.diag([-0.8, -0.8, 4.0, 1.0])  # I -> patient left, J -> posterior, K -> superior
        ijkToRAS[:3, 3] = (25.0, 25.0, -4.0)
        volumeNode = slicer.util.addVolumeFromArray(array, ijkToRAS, name)
        return volumeNode, array

    @staticmethod
    def _syntheticLabels(array2d):
        """Labels for one synthetic slice: the left/right ellipses as left/right multifidus (values 6/7)."""
        labels = np.zeros(array2d.shape, dtype=np.uint8)
        jj, ii = np.mgrid[0:array2d.shape[0], 0:array2d.shape[1]]
        # Column 20 is patient RIGHT (I points to patient left), column 44 patient LEFT.
        labels[((ii - 44) / 7.0) ** 2 + ((jj - 40) / 6.0) ** 2 <= 1.0] = 6
        labels[((ii - 20) / 7.0) ** 2 + ((jj - 40) / 6.0) ** 2 <= 1.0] = 7
        return labels

    # Tests

    def test_RedViewSliceIndex(self):
        self.delayDisplay("Red view slice index")
        ijkToRAS = np.diag([-0.8, -0.8, 4.0, 1.0])
        ijkToRAS[:3, 3] = (25.0, 25.0, -4.0)
        sliceToRAS = np.eye(4)
        sliceToRAS[:3, 3] = (0.0, 0.0, 4.0)  # z = 4 mm is slice k = 2
        view = redViewSliceIndex(ijkToRAS, sliceToRAS, (64, 64, 3))
        self.assertEqual(view["k"], 2)
        self.assertTrue(view["aligned"])
        self.assertTrue(view["inside"])
        tilted = sliceToRAS.copy()
        tilted[:3, :3] = np.array([[1, 0, 0], [0, math.cos(0.2), -math.sin(0.2)], [0, math.sin(0.2), math.cos(0.2)]])
        self.assertFalse(redViewSliceIndex(ijkToRAS, tilted, (64, 64, 3))["aligned"])
        realigned = alignedSliceToRAS(ijkToRAS, tilted, (64, 64, 3))
        self.assertTrue(redViewSliceIndex(ijkToRAS, realigned, (64, 64, 3))["aligned"])
        self.delayDisplay("Test passed")

    def test_MeasurementsAndExport(self):
        """Scene and measurement path without the network: write labels, edit, re-measure, export CSV."""
        import tempfile

        from ParaspinalSegLib import scene

        self.delayDisplay("Measurements and CSV export")
        volumeNode, array = self._syntheticVolume()
        logic = ParaspinalSegLogic()
        segmentationNode = scene.get_or_create_segmentation(slicer.mrmlScene, volumeNode)
        labels = self._syntheticLabels(array[1])
        scene.write_slice_labels(segmentationNode, volumeNode, 1, labels)
        self.assertEqual(segmentationNode.GetSegmentation().GetNumberOfSegments(), 9)
        np.testing.assert_array_equal(scene.read_slice_labels(segmentationNode, volumeNode, 1), labels)

        tableNode = logic.updateMeasurements(volumeNode, 1, segmentationNode, level="L4/L5", method=400.0)
        rows = [row for row in scene.rows_from_table(tableNode) if row["segment_id"] == "multifidus_left"]
        self.assertEqual(len(rows), 1)
        areaBefore = rows[0]["csa_mm2"]
        self.assertGreater(areaBefore, 0.0)
        numRows = tableNode.GetNumberOfRows()

        # An "edit": remove the left multifidus from one row of pixels, then update the measurements.
        edited = labels.copy()
        edited[40][edited[40] == 6] = 0
        scene.write_slice_labels(segmentationNode, volumeNode, 1, edited)
        logic.updateMeasurements(volumeNode, 1, segmentationNode, level="L4/L5", method=400.0)
        self.assertEqual(tableNode.GetNumberOfRows(), numRows)  # replaced, not added
        rows = [row for row in scene.rows_from_table(tableNode) if row["segment_id"] == "multifidus_left"]
        self.assertLess(rows[0]["csa_mm2"], areaBefore)

        with tempfile.TemporaryDirectory() as folder:
            path = logic.exportTableToCsv(tableNode, os.path.join(folder, "measurements.csv"))
            text = pathlib.Path(path).read_text(encoding="utf-8")
            self.assertIn("left multifidus", text)
            self.assertIn("L4/L5", text)
            self.assertIn("(mm2)", text)
        self.delayDisplay("Test passed")

    def test_BadInput(self):
        """Bad input gives an error and writes no node."""
        from ParaspinalSegLib.errors import InputError

        self.delayDisplay("Bad input")
        logic = ParaspinalSegLogic()
        with self.assertRaises(InputError):
            logic.checkVolume(None)
        volumeNode, _array = self._syntheticVolume()
        numNodes = slicer.mrmlScene.GetNumberOfNodes()
        with self.assertRaises(InputError):
            logic.segmentSlice(volumeNode, 7)  # only slices 0..2 exist; refused before the model loads
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodes(), numNodes)
        self.delayDisplay("Test passed")

    def test_SegmentSlice(self):
        """The whole Segment path with a tiny random-weight model (only where PyTorch is installed)."""
        import importlib.util
        import tempfile

        if importlib.util.find_spec("torch") is None or importlib.util.find_spec("safetensors") is None:
            self.delayDisplay("PyTorch not installed: network test skipped")
            return
        from ParaspinalSegLib.errors import InputError
        from ParaspinalSegLib.network import NetworkConfig, build_network
        from ParaspinalSegLib.preprocessing import ModelInput
        from ParaspinalSegLib.weights import save_weights

        self.delayDisplay("Segment slice with a tiny random model")
        volumeNode, array = self._syntheticVolume()
        logic = ParaspinalSegLogic()
        with tempfile.TemporaryDirectory() as folder:
            model = build_network(NetworkConfig(base_width=4, depth=4, prelim_width=4, detector_width=4, detector_hidden=8))
            weightsPath = save_weights(model, os.path.join(folder, "tiny"), structures_learned=list(range(1, 10)),
                                       model_input=ModelInput(spacing_mm=1.6, size=64))
            outcome = logic.segmentSlice(volumeNode, 1, level="L4/L5", device="cpu", weightsPath=weightsPath)
            segmentationNode = outcome["segmentationNode"]
            self.assertEqual(segmentationNode.GetSegmentation().GetNumberOfSegments(), 9)
            self.assertEqual(outcome["result"].labels.shape, array[1].shape)
            self.assertIn("CPU", logic.describeOutcome(outcome))
            # The cached segmenter is reused for the same weights and device, and a second slice
            # goes into the same segmentation.
            segmenter = logic.getSegmenter(weightsPath, "cpu")
            again = logic.segmentSlice(volumeNode, 0, device="cpu", weightsPath=weightsPath)
            self.assertIs(again["segmentationNode"], segmentationNode)
            self.assertIs(logic.getSegmenter(weightsPath, "cpu"), segmenter)

            # An all-zero slice is refused and leaves the scene unchanged.
            slicer.util.arrayFromVolume(volumeNode)[2] = 0
            slicer.util.arrayFromVolumeModified(volumeNode)
            numNodes = slicer.mrmlScene.GetNumberOfNodes()
            with self.assertRaises(InputError):
                logic.segmentSlice(volumeNode, 2, device="cpu", weightsPath=weightsPath)
            self.assertEqual(slicer.mrmlScene.GetNumberOfNodes(), numNodes)
        self.delayDisplay("Test passed")
