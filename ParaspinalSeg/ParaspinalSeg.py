"""ParaspinalSeg: the 3D Slicer glue of the ParaspinalSeg extension.

Segments the paraspinal muscles, disc, spinal canal and lamina on the axial slice shown in the Red
view with BS-ESNet, and measures cross-sectional area and fat percentage. Everything that is not
Slicer GUI glue lives in ParaspinalSegLib (what the buttons do: ``workflow``; Red view geometry:
``slice_view``), where it is tested headless; this file reads the panel into a parameter node, calls
the library and shows progress and errors.

PyTorch is never imported at module import: the library is imported inside the functions that need
it, and torch is installed on the first "Segment slice" after one confirmation.

One room (past 500 lines) because Slicer's scripted-module loader takes the module, widget, logic and
self-test classes from this one file; it holds no algorithm (checked by test_module_static.py).
"""

import contextlib
import importlib
import logging
import math
import os
import pathlib
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
TORCH_VERSION_REQUIREMENT = ">=2.2"  # the same minimum as ParaspinalSegLib.panel_choices.MINIMUM_TORCH_VERSION

#: Library submodules reloaded by "Reload" in developer mode (order: dependencies first).
LIBRARY_MODULES = (
    "ParaspinalSegLib.errors",
    "ParaspinalSegLib.panel_state",
    "ParaspinalSegLib.panel_choices",
    "ParaspinalSegLib.sample_data",
    "ParaspinalSegLib.anatomy",
    "ParaspinalSegLib.terminology",
    "ParaspinalSegLib.boxes",
    "ParaspinalSegLib.preprocessing",
    "ParaspinalSegLib.postprocessing",
    "ParaspinalSegLib.measurements",
    "ParaspinalSegLib.slice_view",
    "ParaspinalSegLib.weights",
    "ParaspinalSegLib.network",
    "ParaspinalSegLib.segmenter",
    "ParaspinalSegLib.scene_nodes",
    "ParaspinalSegLib.scene_segmentation",
    "ParaspinalSegLib.scene_boxes",
    "ParaspinalSegLib.scene_table",
    "ParaspinalSegLib.scene",
    "ParaspinalSegLib.workflow",
    "ParaspinalSegLib.dixon",
    "ParaspinalSegLib.stack",
)


#
# ParaspinalSeg
#



@contextlib.contextmanager
def _errorDisplay(message: str, waitCursor: bool = False):
    """``slicer.util.tryWithErrorDisplay``, except that Cancel shows no error dialog: it is the user's own
    choice, and the panel's run (outside this block) turns it into the status line."""
    from ParaspinalSegLib.panel_state import Cancelled

    cancelled = None
    with slicer.util.tryWithErrorDisplay(message, waitCursor=waitCursor):
        try:
            yield
        except Cancelled as exc:
            cancelled = exc
    if cancelled is not None:
        raise cancelled

class ParaspinalSeg(ScriptedLoadableModule):
    """Uses ScriptedLoadableModule base class, available at:
    https://github.com/Slicer/Slicer/blob/main/Base/Python/slicer/ScriptedLoadableModule.py
    """

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("ParaspinalSeg")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = []
        self.parent.contributors = ["ParaspinalSeg developers (ParaspinalSeg project)"]
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
<b>Segment slices</b> segments several slices ("all", "10-20" or "3,5,8") with a progress dialog; Cancel keeps
the slices already finished. Optional Dixon water and fat images add a Dixon fat fraction column.
No data at hand? Sample Data → ParaspinalSeg loads the shipped sample slice. Needs Slicer 5.8 or newer.
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

        # Additional initialization step after application startup is complete (an extension installed
        # without restarting Slicer misses this signal: the widget registers both on first use).
        slicer.app.connect("startupCompleted()", registerTerminology)
        slicer.app.connect("startupCompleted()", registerSampleData)
        problem = versionProblem()
        if problem:  # one clear message at load; the panel refuses to run (see ParaspinalSegWidget._viewProblem)
            logging.error(f"ParaspinalSeg: {problem}")


#
# Register the module's terminology (segment category/type codes) with Slicer
#


def versionProblem() -> str:
    """Why this Slicer is too old for the module ("" on Slicer 5.8 and newer)."""
    from ParaspinalSegLib.panel_choices import slicer_version_problem

    return slicer_version_problem(slicer.app.majorVersion, slicer.app.minorVersion)


def registerTerminology() -> bool:
    """Load ParaspinalSeg's .term.json (once) so the nine segments show their standard names and codes.

    Slicer's loader returns an empty name instead of raising on failure; the library checks it.
    Returns False (and logs why) if the terminology is not available.
    """
    from ParaspinalSegLib.terminology import TerminologyError, ensure_terminology_loaded

    try:
        ensure_terminology_loaded(slicer.modules.terminologies.logic(), TERMINOLOGY_FILE)
        return True
    except (TerminologyError, AttributeError) as exc:  # a broken install must not stop Slicer's startup
        logging.warning(f"ParaspinalSeg: {exc}")
        return False


_sampleDataRegistered = False


def registerSampleData() -> None:
    """Offer the shipped sample slice in the Sample Data module (category ParaspinalSeg), once."""
    global _sampleDataRegistered
    if _sampleDataRegistered:
        return
    try:
        import SampleData
    except ImportError:  # Sample Data module disabled
        return
    from ParaspinalSegLib import sample_data

    SampleData.SampleDataLogic.registerCustomSampleDataSource(**sample_data.registration_arguments())
    _sampleDataRegistered = True


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
    mirrorAveraging - Average the network's output for the slice and its mirror image (left-right consistent).
    weightsPath - Model config (.json) or weights (.safetensors); the shipped model by default.
    waterVolume, fatVolume - Optional Dixon water and fat images: add the "Dixon fat fraction (%)" column.
    """

    inputVolume: vtkMRMLScalarVolumeNode
    outputSegmentation: vtkMRMLSegmentationNode
    spinalLevel: Annotated[str, Choice(list(SPINAL_LEVELS))] = ""
    fatThresholdMethod: Annotated[str, Choice(list(FAT_THRESHOLD_METHODS))] = "auto"
    manualThreshold: Annotated[float, WithinRange(-1.0e6, 1.0e6)] = 0.0
    showBoxes: bool = True
    device: Annotated[str, Choice(list(DEVICES))] = "auto"
    mirrorAveraging: bool = True
    weightsPath: pathlib.Path = DEFAULT_WEIGHTS_PATH
    waterVolume: vtkMRMLScalarVolumeNode
    fatVolume: vtkMRMLScalarVolumeNode


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
        self._redView = None  # last slice_view.ViewSlice of the Red view (None: no volume/view)
        self._volumeProblem = ""  # why the input volume cannot be used (e.g. an RGB volume), "" if it can
        self._shownWeightsPath = None
        self._boxesShown = None
        self._state = None  # ParaspinalSegLib.panel_state.PanelState: one task at a time
        self._progressDialog = None

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

        self.logic = ParaspinalSegLogic()
        from ParaspinalSegLib.panel_state import PanelState

        self._state = PanelState(self._applyPanelView)
        # Installed without a restart, the module missed startupCompleted(): register now.
        registerTerminology()
        registerSampleData()

        # These connections ensure that we update parameter node when scene is closed
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        # Buttons
        self.ui.segmentButton.connect("clicked(bool)", self.onSegmentButton)
        self.ui.segmentSlicesButton.connect("clicked(bool)", self.onSegmentSlicesButton)
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
        """Ensure parameter node exists and observed (it keeps the panel's choices in the saved scene)."""
        self.setParameterNode(self.logic.getParameterNode())

        # Select default input nodes if nothing is selected yet to save a few clicks for the user
        if not self._parameterNode.inputVolume:
            from ParaspinalSegLib.panel_choices import default_input_volume

            # Only a volume the selector lists (not an RGB, vector, DWI volume or labelmap).
            firstVolumeNode = default_input_volume(slicer.util.getNodesByClass("vtkMRMLScalarVolumeNode"))
            if firstVolumeNode:
                self._parameterNode.inputVolume = firstVolumeNode

        # A scene saved with another installation of the extension points at that installation's
        # shipped model: use this installation's copy instead.
        weightsPath = self._parameterNode.weightsPath
        if weightsPath.name == DEFAULT_WEIGHTS_PATH.name and weightsPath != DEFAULT_WEIGHTS_PATH and not weightsPath.exists():
            self._parameterNode.weightsPath = DEFAULT_WEIGHTS_PATH

    def setParameterNode(self, inputParameterNode: Optional[ParaspinalSegParameterNode]) -> None:
        """Set and observe parameter node (the GUI follows its changes at once)."""
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
        node = self._parameterNode
        if node and node.inputVolume and node.outputSegmentation:
            # The output still points at another volume's results (the input was switched): use this
            # volume's own segmentation, or a new one, instead of writing into the other volume's.
            owner = self.logic.segmentationVolume(node.outputSegmentation)
            if owner is not None and owner is not node.inputVolume:
                node.outputSegmentation = self.logic.findSegmentation(node.inputVolume)
                return  # the parameter change calls this method again
        self._updateSliceInfo()
        self._updateModelInfo()
        from ParaspinalSegLib.panel_state import refuse_reason

        node = self._parameterNode
        view = self._state.view
        # While a task runs nothing may start another or change its inputs (processEvents delivers clicks).
        for widget in (self.ui.inputsCollapsibleButton, self.ui.outputsCollapsibleButton,
                       self.ui.settingsCollapsibleButton, self.ui.advancedCollapsibleButton):
            widget.enabled = view.actions_enabled
        self.ui.manualThresholdSpinBox.enabled = bool(node) and node.fatThresholdMethod == "manual"
        problem = refuse_reason(view, self._viewProblem())
        self.ui.segmentButton.enabled = not problem
        self.ui.segmentButton.toolTip = problem or _("Segment slice {k} of {volume}").format(
            k=self._redView.k, volume=node.inputVolume.GetName())
        stackProblem = refuse_reason(view, self._viewProblem(requireAligned=False, requireInside=False))
        self.ui.segmentSlicesButton.enabled = not stackProblem
        self.ui.segmentSlicesButton.toolTip = stackProblem or _(
            "Segment the slices given on the right, one after the other (progress dialog with Cancel).")
        self.ui.updateMeasurementsButton.enabled = not refuse_reason(view, self._viewProblem(requireAligned=False))
        tableNode = self.logic.measurementTable()
        self.ui.exportCsvButton.enabled = (view.actions_enabled and tableNode is not None
                                           and tableNode.GetNumberOfRows() > 0)

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
        from ParaspinalSegLib.errors import InputError

        try:
            self._redView = view = self.logic.redViewSlice(volumeNode) if volumeNode else None
            self._volumeProblem = ""
        except InputError as exc:  # e.g. an RGB or 4-D volume picked as input
            self._redView = view = None
            self._volumeProblem = str(exc)
        numSlices = view and volumeNode.GetImageData().GetDimensions()[2]
        self.ui.sliceIndexLabel.text = _("{k} of 0…{last}").format(k=view.k, last=numSlices - 1) if view else "–"
        warning = self._viewProblem() if volumeNode else ""
        self.ui.sliceWarningLabel.text = warning
        self.ui.sliceWarningLabel.visible = bool(warning)
        self.ui.alignViewButton.visible = bool(view) and not math.isnan(view.angle_deg) and not (view.aligned and view.inside)

    def _viewProblem(self, requireAligned: bool = True, requireInside: bool = True) -> str:
        """Why the Red view's slice cannot be segmented (or measured: ``requireAligned=False``); "" if it can.

        ``requireInside=False``: only the volume matters (multi-slice runs do not use the Red view's slice).
        """
        node, view = self._parameterNode, self._redView
        tooOld = versionProblem()
        if tooOld:
            return tooOld
        if not node or not node.inputVolume:
            return _("Select an input volume.")
        if self._volumeProblem:
            return self._volumeProblem
        if not requireInside:
            return ""
        if view is None:
            return _("There is no Red slice view in the current layout: choose a layout with the Red view.")
        if math.isnan(view.angle_deg):
            return _("The volume is under a non-linear transform: harden the transform first.")
        if requireAligned and not view.aligned:
            return _("The Red view is not aligned with the volume's slices (tilted by {angle:.1f}°), so it shows an "
                     "interpolated plane. Click 'Align view' to segment the volume's own slice.").format(angle=view.angle_deg)
        if not view.inside:
            return _("The Red view is outside the volume: scroll to one of its slices.")
        return ""

    def _updateModelInfo(self) -> None:
        """Describe the selected model (read from its JSON config; needs no torch)."""
        node = self._parameterNode
        if not node or node.weightsPath == self._shownWeightsPath:
            return
        self._shownWeightsPath = node.weightsPath
        self.ui.modelInfoLabel.text = self.logic.modelInfo(node.weightsPath)

    #
    # Panel state (ParaspinalSegLib.panel_state): one task at a time, status, progress dialog
    #

    def _applyPanelView(self, view) -> None:
        """Show what the state machine says: status line, enabled buttons, progress dialog with Cancel."""
        self.ui.statusLabel.text = view.status
        if view.show_progress_dialog:
            if self._progressDialog is None:
                self._progressDialog = slicer.util.createProgressDialog(
                    parent=slicer.util.mainWindow(), windowTitle=_("ParaspinalSeg"), labelText=view.status, maximum=0)
                self._progressDialog.connect("canceled()", self._state.cancel)
            done, total, label = view.progress or (0, 0, view.status)
            self._progressDialog.maximum = total
            self._progressDialog.value = done
            self._progressDialog.labelText = label if not view.cancel_requested else _("Cancelling after this step…")
        elif self._progressDialog is not None:
            self._progressDialog.close()
            self._progressDialog = None
        self._checkCanApply()

    #
    # Buttons: each asks the state machine for a run (None: another task runs) and works inside it, so
    # a failure resets the panel; tryWithErrorDisplay inside shows the message before the run ends.
    #

    def onAlignViewButton(self) -> None:
        """Rotate the Red view onto the volume's slices and show the volume in it."""
        from ParaspinalSegLib.panel_state import Task

        run = self._state.start(Task.ALIGN_VIEW, _("Aligning the Red view…"), failed=_("The Red view was not aligned."))
        if run is None:
            return
        with run, _errorDisplay(_("Failed to align the Red view."), waitCursor=True):
            self.logic.alignRedView(self._parameterNode.inputVolume)
            run.succeed("")

    def onSegmentButton(self) -> None:
        """Run BS-ESNet on the Red view's slice and write segments, boxes and table rows."""
        from ParaspinalSegLib.panel_state import Task

        if self._state.busy or not self._ensureDependencies():
            return
        registerTerminology()  # first use after the extension was installed without a restart
        node = self._parameterNode
        run = self._state.start(Task.SEGMENT_SLICE, _("Segmenting…"), failed=_("Segmentation failed; nothing was written."))
        if run is None:
            return
        with run, _errorDisplay(_("Failed to segment the slice."), waitCursor=True):
            k = self._currentSliceIndex()
            run.step(_("Segmenting slice {k}…").format(k=k))
            slicer.app.processEvents()  # show the status before the blocking run (clicks meanwhile are refused)
            outcome = self.logic.segmentSlice(
                node.inputVolume, k, segmentationNode=node.outputSegmentation, level=node.spinalLevel,
                method=self._method(), device=node.device, weightsPath=node.weightsPath, showBoxes=node.showBoxes,
                mirrorAveraging=node.mirrorAveraging, waterVolume=node.waterVolume, fatVolume=node.fatVolume)
            node.outputSegmentation = outcome.segmentation_node
            self.logic.showResults(outcome.segmentation_node, outcome.table_node)
            self._rememberWeightsPath()
            run.succeed(self.logic.describeOutcome(outcome))

    def onSegmentSlicesButton(self) -> None:
        """Segment the chosen slices one after the other; Cancel keeps the slices already finished."""
        from ParaspinalSegLib.panel_state import Task, follow

        if self._state.busy or not self._ensureDependencies():
            return
        registerTerminology()
        node = self._parameterNode
        run = self._state.start(
            Task.SEGMENT_SLICES, _("Segmenting slices…"),
            failed=_("Stopped at a slice that failed; the slices finished before it are kept."),
            cancelled=_("Cancelled after {done} of {total} slices; the finished slices are kept."))
        if run is None:
            return
        with run, _errorDisplay(_("Failed to segment the slices."), waitCursor=False):
            volumeNode = node.inputVolume
            slices = self.logic.parseSlices(self.ui.sliceRangeLineEdit.text, volumeNode)
            shown = []

            def showFirst(done, total, outcome):  # the results appear as soon as the first slice is in
                if not shown:
                    shown.append(outcome)
                    node.outputSegmentation = outcome.segmentation_node
                    self.logic.showResults(outcome.segmentation_node, outcome.table_node)

            outcomes = self.logic.segmentSlices(
                volumeNode, slices, segmentationNode=node.outputSegmentation, level=node.spinalLevel,
                method=self._method(), device=node.device, weightsPath=node.weightsPath, showBoxes=node.showBoxes,
                mirrorAveraging=node.mirrorAveraging, waterVolume=node.waterVolume, fatVolume=node.fatVolume,
                progress=showFirst, cancel=lambda: run.cancel_requested)
            done = follow(run, outcomes, len(slices),
                          lambda n, total: _("Segmenting slice {k} ({n} of {total})…").format(
                              k=slices[min(n, total - 1)], n=min(n + 1, total), total=total),
                          keep_events=slicer.app.processEvents)
            self._rememberWeightsPath()
            run.succeed(self.logic.describeOutcomes(done))

    def onUpdateMeasurementsButton(self) -> None:
        """Recompute the Red view slice's rows from the segments as they are now."""
        from ParaspinalSegLib.panel_state import Task

        node = self._parameterNode
        # Measuring needs scikit-image (fat threshold, components) like segmenting: the same one confirmation.
        if self._state.busy or not self._ensureDependencies():
            return
        run = self._state.start(Task.UPDATE_MEASUREMENTS, _("Updating the measurements…"),
                                failed=_("The measurements were not updated."))
        if run is None:
            return
        with run, _errorDisplay(_("Failed to update the measurements."), waitCursor=True):
            k = self._currentSliceIndex(requireAligned=False)
            # "(not recorded)" keeps the level recorded when the slice was segmented.
            tableNode = self.logic.updateMeasurements(
                node.inputVolume, k, node.outputSegmentation, level=node.spinalLevel or None, method=self._method(),
                waterVolume=node.waterVolume, fatVolume=node.fatVolume)
            self.logic.showResults(None, tableNode)
            run.succeed(_("Measurements of slice {k} updated from the current segments.").format(k=k))

    def onExportCsvButton(self) -> None:
        """Ask for a file name and write the input volume's measurement table as CSV."""
        import qt

        from ParaspinalSegLib.panel_state import Task

        node = self._parameterNode
        run = self._state.start(Task.EXPORT_CSV, _("Exporting the table…"), failed=_("The table was not exported."))
        if run is None:
            return
        with run, _errorDisplay(_("Failed to export the table."), waitCursor=False):
            tableNode = self.logic.measurementTable()
            if tableNode is None or tableNode.GetNumberOfRows() == 0:
                raise ValueError(_("There are no measurements yet: segment a slice first."))
            baseName = node.inputVolume.GetName() if node and node.inputVolume else "ParaspinalSeg"
            suggested = os.path.join(qt.QDir.homePath(), f"{baseName}_measurements.csv")
            path = qt.QFileDialog.getSaveFileName(
                slicer.util.mainWindow(), _("Export measurements"), suggested, _("CSV files (*.csv)"))
            if not path:
                run.succeed("")
                return
            written = self.logic.exportTableToCsv(tableNode, path)
            run.succeed(_("Table written to {path}").format(path=written))

    #
    # Helpers
    #

    def _method(self):
        """The fat-threshold method as measurements.measure_slice takes it (a number for 'manual')."""
        node = self._parameterNode
        return float(node.manualThreshold) if node.fatThresholdMethod == "manual" else node.fatThresholdMethod

    def _currentSliceIndex(self, requireAligned: bool = True) -> int:
        """K of the Red view's slice, or an error saying why it cannot be used."""
        self._updateSliceInfo()
        problem = self._viewProblem(requireAligned)
        if problem:
            raise ValueError(problem)
        return self._redView.k

    def _rememberWeightsPath(self) -> None:
        """Add a weights file the user chose to the path field's history (its settingKey stores it)."""
        path = self._parameterNode.weightsPath
        if path and path != DEFAULT_WEIGHTS_PATH:
            self.ui.weightsPathLineEdit.addCurrentPathToHistory()

    def _ensureDependencies(self) -> bool:
        """Install PyTorch (and the other requirements) after one confirmation; False if they are not usable."""
        from ParaspinalSegLib.panel_state import Task, run_steps

        problem = self.logic.torchVersionProblem()
        if problem:  # an installed but too old PyTorch: say how to replace it (never replaced silently)
            slicer.util.errorDisplay(problem, windowTitle=_("PyTorch too old"))
            self._state.set_status(_("Not segmented: {problem}").format(problem=problem))
            return False
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
            self._state.set_status(_("Not segmented: PyTorch is needed to run the network."))
            return False
        run = self._state.start(
            Task.INSTALL, _("Installing {packages}…").format(packages=", ".join(missing)),
            failed=_("Installation failed; nothing was segmented."),
            cancelled=_("Installation cancelled after {done} of {total} steps; nothing was segmented."))
        if run is None:
            return False
        with run, _errorDisplay(_("Failed to install the Python packages ParaspinalSeg needs."),
                                                  waitCursor=True):
            run_steps(run, self.logic.installSteps(missing), lambda step: step[1](),
                      lambda step, n, total: _("Installing: {what} (step {n} of {total})…").format(
                          what=step[0], n=n + 1, total=total),
                      keep_events=slicer.app.processEvents)
            run.succeed("")
        return self._state.last_error is None

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
        """Names of the Python packages segmentation and measurement need that cannot be imported (no import
        happens). scikit-image (fat threshold, clean-up, overlay) comes from Resources/requirements.txt."""
        import importlib.util

        packages = (("torch", "torch"), ("safetensors", "safetensors"), ("skimage", "scikit-image"))
        return [name for module, name in packages if importlib.util.find_spec(module) is None]

    @staticmethod
    def torchVersionProblem() -> str:
        """Why the installed PyTorch cannot be used ("" if it can, or if none is installed).

        Reads the version from the package metadata, so nothing is imported (TotalSegmentator checks the
        version the same way before use).
        """
        import importlib.metadata

        from ParaspinalSegLib.panel_choices import torch_version_problem

        try:
            version = importlib.metadata.version("torch")
        except importlib.metadata.PackageNotFoundError:
            return ""
        return torch_version_problem(version, TORCH_VERSION_REQUIREMENT.lstrip(">="))

    def installSteps(self, missing) -> list:
        """The install as (what, callable) steps, run in order without asking again (the caller asked once).

        PyTorch goes through the PyTorch extension (PyTorchUtils), which chooses the CPU or CUDA build;
        the other requirements (Resources/requirements.txt) through slicer.packaging.pip_ensure (Slicer
        5.12+), or slicer.util.pip_install on older versions. Never ``pip install`` this project into
        Slicer's Python: its ``slicer-core`` dependency would install a second, top-level ``slicer``.
        """
        steps = []
        if "torch" in missing:
            steps.append(("PyTorch", self._installTorch))
        steps.append((_("other requirements"), self._installRequirements))
        steps.append((_("checking the installation"), self._checkTorchImport))
        return steps

    @staticmethod
    def _installTorch() -> None:
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

    @staticmethod
    def _installRequirements() -> None:
        try:
            packaging = importlib.import_module("slicer.packaging")  # Slicer 5.12+
        except ImportError:
            packaging = None
        if packaging is not None and hasattr(packaging, "pip_ensure"):
            packaging.pip_ensure(packaging.load_requirements(str(REQUIREMENTS_FILE)),
                                 prompt_install=False, requester="ParaspinalSeg")
        else:
            requirements = [line.strip() for line in REQUIREMENTS_FILE.read_text(encoding="utf-8").splitlines()
                            if line.strip() and not line.strip().startswith("#")]
            if requirements:
                slicer.util.pip_install(" ".join(requirements))

    @classmethod
    def _checkTorchImport(cls) -> None:
        importlib.invalidate_caches()
        try:
            import torch  # noqa: F401  (check that the fresh install works)
        except Exception as exc:
            raise RuntimeError(_("PyTorch was installed but cannot be imported ({error}). Restart Slicer and try again.").format(
                error=exc)) from exc
        problem = cls.torchVersionProblem()
        if problem:
            raise RuntimeError(problem)

    def installPackages(self, missing) -> None:
        """Install ``missing`` packages in one go (scripts; the panel runs :meth:`installSteps` with progress)."""
        for _what, step in self.installSteps(missing):
            step()

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

    def getSegmenter(self, weightsPath=None, device: str = "auto", mirrorAveraging: bool = True):
        """The SliceSegmenter for (weights, device), loading the model only when either changed."""
        from ParaspinalSegLib.segmenter import SliceSegmenter

        path = self.resolveWeightsPath(weightsPath)
        key = (str(path.resolve()), path.stat().st_mtime if path.exists() else None, device)
        if self._segmenter is None or self._segmenterKey != key:
            self._segmenter = None  # free the previous model before loading another
            self._segmenter = SliceSegmenter(weights=path, device=device, mirror_tta=mirrorAveraging)
            self._segmenterKey = key
        elif self._segmenter.mirror_tta != bool(mirrorAveraging):
            # Same model, other inference mode: no reload.
            self._segmenter = SliceSegmenter.from_model(self._segmenter.model, self._segmenter.config, mirror_tta=mirrorAveraging)
        return self._segmenter

    #
    # Red view
    #

    @staticmethod
    def redSliceNode():
        """The Red slice view's slice node (None without a layout manager or Red view)."""
        layoutManager = slicer.app.layoutManager()
        sliceWidget = layoutManager.sliceWidget("Red") if layoutManager else None
        if sliceWidget is not None:
            return sliceWidget.mrmlSliceNode()
        return slicer.mrmlScene.GetNodeByID("vtkMRMLSliceNodeRed")

    def redViewSlice(self, volumeNode):
        """Which slice of ``volumeNode`` the Red view shows (a slice_view.ViewSlice; None without view or volume)."""
        from ParaspinalSegLib import workflow

        return workflow.view_slice(volumeNode, self.redSliceNode())

    @staticmethod
    def alignRedView(volumeNode) -> None:
        """Show ``volumeNode`` in the Red view, rotated onto its slices and moved to the nearest one."""
        from ParaspinalSegLib import workflow

        workflow.check_volume(volumeNode)
        layoutManager = slicer.app.layoutManager()
        sliceWidget = layoutManager.sliceWidget("Red") if layoutManager else None
        if sliceWidget is None:
            raise ValueError(_("There is no Red slice view in the current layout."))
        compositeNode = sliceWidget.sliceLogic().GetSliceCompositeNode()
        if compositeNode.GetBackgroundVolumeID() != volumeNode.GetID():
            compositeNode.SetBackgroundVolumeID(volumeNode.GetID())
        workflow.align_view(volumeNode, sliceWidget.mrmlSliceNode())

    #
    # Segment, measure, export (ParaspinalSegLib.workflow, on Slicer's scene)
    #

    def segmentSlice(self, volumeNode, k: int, segmentationNode=None, level: str = "", method="auto",
                     device: str = "auto", weightsPath=None, showBoxes: bool = True, mirrorAveraging: bool = True,
                     waterVolume=None, fatVolume=None):
        """Segment slice ``k`` (of ``arr[k, j, i]``); write segments, boxes and table rows (all or nothing).

        ``method`` is "auto", "otsu" or a number (manual fat threshold); ``mirrorAveraging`` averages the
        slice with its mirror image (SliceSegmenter's mirror_tta). Bad input is refused before the model
        loads. Returns a workflow.SliceOutcome.
        """
        from ParaspinalSegLib import workflow

        workflow.check_slice(volumeNode, k)
        ijkToWorld = workflow.volume_ijk_to_world(volumeNode)  # the patient frame, parent transform included
        dixon = self.dixonSource(waterVolume, fatVolume)
        return workflow.segment_slice_into_scene(
            slicer.mrmlScene, volumeNode, k, self.getSegmenter(weightsPath, device, mirrorAveraging),
            segmentation_node=segmentationNode,
            level=level, method=method, show_boxes=showBoxes, volume_ijk_to_ras=ijkToWorld, validated=True,
            dixon=dixon)

    @staticmethod
    def parseSlices(text: str, volumeNode) -> list:
        """Slice indices of the "Segment slices" field ("" = all) for ``volumeNode``."""
        from ParaspinalSegLib import stack, workflow

        numSlices = workflow.check_volume(volumeNode)[0]
        return stack.parse_slices(text.strip() or "all", numSlices)

    def segmentSlices(self, volumeNode, slices, segmentationNode=None, level: str = "", method="auto",
                      device: str = "auto", weightsPath=None, showBoxes: bool = True, mirrorAveraging: bool = True,
                      waterVolume=None, fatVolume=None, progress=None, cancel=None):
        """Segment ``slices`` one after another (a generator of workflow.SliceOutcome; see
        stack.segment_slices_into_scene): ``cancel()`` is asked between slices, finished slices stay."""
        from ParaspinalSegLib import stack, workflow

        for k in slices:  # bad input refused before the model loads
            workflow.check_slice(volumeNode, k)
        return stack.segment_slices_into_scene(
            slicer.mrmlScene, volumeNode, slices, self.getSegmenter(weightsPath, device, mirrorAveraging),
            segmentation_node=segmentationNode, level=level, method=method, show_boxes=showBoxes,
            volume_ijk_to_ras=workflow.volume_ijk_to_world(volumeNode), dixon=self.dixonSource(waterVolume, fatVolume),
            progress=progress, cancel=cancel, validated=True)

    @staticmethod
    def dixonSource(waterVolume=None, fatVolume=None):
        """The Dixon water/fat pair for the "Dixon fat fraction (%)" column (None when neither is chosen)."""
        from ParaspinalSegLib.dixon import dixon_source_from_nodes

        return dixon_source_from_nodes(waterVolume, fatVolume)

    @staticmethod
    def describeOutcome(outcome) -> str:
        """Status line: what ran where, how long it took, and which structures were not found."""
        from ParaspinalSegLib import workflow

        return workflow.describe_outcome(outcome)

    @staticmethod
    def describeOutcomes(outcomes) -> str:
        """Status line after a multi-slice run."""
        from ParaspinalSegLib import workflow

        if not outcomes:
            return _("No slice was segmented.")
        if len(outcomes) == 1:
            return workflow.describe_outcome(outcomes[0])
        seconds = sum(o.seconds.get("total", 0.0) for o in outcomes)
        text = _("Segmented {n} slices ({first}…{last}) of {volume} in {seconds:.1f} s; one table row per slice and "
                 "structure.").format(n=len(outcomes), first=outcomes[0].k, last=outcomes[-1].k,
                                      volume=outcomes[0].volume_name, seconds=seconds)
        flagged = [o.k for o in outcomes if o.qc is not None and not o.qc.ok]
        if flagged:
            text += " " + _("QC: check slices {slices} (see the QC column).").format(slices=", ".join(map(str, flagged)))
        return text

    @staticmethod
    def updateMeasurements(volumeNode, k: int, segmentationNode=None, level: Optional[str] = None, method="auto",
                           waterVolume=None, fatVolume=None):
        """Recompute slice ``k``'s rows from the segments as edited (level None: keep it); returns the table."""
        from ParaspinalSegLib import workflow

        return workflow.update_measurements(
            slicer.mrmlScene, volumeNode, k, segmentation_node=segmentationNode, level=level, method=method,
            volume_ijk_to_ras=workflow.volume_ijk_to_world(volumeNode),
            dixon=ParaspinalSegLogic.dixonSource(waterVolume, fatVolume))

    @staticmethod
    def findSegmentation(volumeNode):
        """The segmentation ParaspinalSeg wrote for ``volumeNode`` (None: a new one will be created)."""
        from ParaspinalSegLib import scene

        return scene.find_segmentation(slicer.mrmlScene, volumeNode)

    @staticmethod
    def segmentationVolume(segmentationNode):
        """The volume whose results ``segmentationNode`` holds (None for a segmentation not made by ParaspinalSeg)."""
        from ParaspinalSegLib import scene

        return segmentationNode.GetNodeReference(scene.VOLUME_REFERENCE_ROLE)

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
        from ParaspinalSegLib import workflow

        return workflow.export_measurements_csv(tableNode, path)

    @staticmethod
    def showResults(segmentationNode=None, tableNode=None) -> None:
        """Show the segmentation in the views and the table in a layout that has a table view and keeps the Red
        view (ParaspinalSegLib.panel_choices.table_presentation: Slicer's own choice, as Segment Statistics
        makes it, unless that would hide the Red view), with column titles (units) as headers."""
        from ParaspinalSegLib.panel_choices import table_presentation

        if segmentationNode is not None:
            segmentationNode.CreateDefaultDisplayNodes()
            segmentationNode.SetDisplayVisibility(True)
        layoutManager = slicer.app.layoutManager()
        if tableNode is None or layoutManager is None:
            return
        layoutNode = layoutManager.layoutLogic().GetLayoutNode()
        choice = table_presentation(layoutManager.layout, tableNode.GetID(), layoutNode.GetLayoutDescription,
                                    slicer.modules.tables.logic().GetLayoutWithTable)
        if choice.change_layout:
            layoutManager.setLayout(choice.layout)
        tableNode.SetUseColumnTitleAsColumnHeader(choice.use_column_titles_as_headers)
        slicer.app.applicationLogic().GetSelectionNode().SetActiveTableID(choice.table_id)
        slicer.app.applicationLogic().PropagateTableSelection()


#
# ParaspinalSegTest
#


class ParaspinalSegTest(ScriptedLoadableModuleTest):
    """
    Exercises the module's logic inside Slicer, on Slicer's own scene, with a small synthetic volume.
    The library (workflow, scene writers, Red view geometry) is tested headless in Testing/Python; this
    checks the glue. The network part runs only where PyTorch is installed (with a tiny random-weight
    model), so the test passes on Slicer's factory machines without PyTorch.
    """

    def setUp(self):
        """Do whatever is needed to reset the state - typically a scene clear will be enough."""
        slicer.mrmlScene.Clear()

    def runTest(self):
        """Run as few or as many tests as needed here."""
        for test in (self.test_RedView, self.test_MeasurementsAndExport, self.test_BadInput, self.test_SampleData,
                     self.test_SegmentSlice):
            self.setUp()
            test()

    @staticmethod
    def _syntheticVolume(name="ParaspinalSegTestVolume"):
        """A 3-slice LPS-like axial volume (64 x 64, 0.8 mm pixels) with bright ellipses on a dark body."""
        jj, ii = np.mgrid[0:64, 0:64]
        array = np.zeros((3, 64, 64), dtype=np.int16)
        for k in range(3):
            array[k][((ii - 32) / 28.0) ** 2 + ((jj - 32) / 22.0) ** 2 <= 1.0] = 300
            for ci in (20, 44):  # two "muscles" either side of the midline, with a fat spot each
                array[k][((ii - ci) / 7.0) ** 2 + ((jj - 40) / 6.0) ** 2 <= 1.0] = 150
                array[k][((ii - ci) / 2.0) ** 2 + ((jj - 40) / 2.0) ** 2 <= 1.0] = 600
        ijkToRAS = np.diag([-0.8, -0.8, 4.0, 1.0])  # I -> patient left, J -> posterior, K -> superior
        ijkToRAS[:3, 3] = (25.0, 25.0, -4.0)
        return slicer.util.addVolumeFromArray(array, ijkToRAS, name), array

    def test_RedView(self):
        self.delayDisplay("Red view alignment")
        volumeNode, _array = self._syntheticVolume()
        logic = ParaspinalSegLogic()
        layoutManager = slicer.app.layoutManager()
        if layoutManager is None or layoutManager.sliceWidget("Red") is None:
            self.delayDisplay("No Red view in this session: skipped")
            return
        sliceNode = logic.redSliceNode()
        sliceNode.SetOrientationToAxial()
        tilt = vtk.vtkTransform()
        tilt.RotateX(10.0)
        tilted = vtk.vtkMatrix4x4()
        vtk.vtkMatrix4x4.Multiply4x4(tilt.GetMatrix(), sliceNode.GetSliceToRAS(), tilted)
        sliceNode.GetSliceToRAS().DeepCopy(tilted)
        sliceNode.UpdateMatrices()
        self.assertFalse(logic.redViewSlice(volumeNode).aligned)
        logic.alignRedView(volumeNode)
        view = logic.redViewSlice(volumeNode)
        self.assertTrue(view.aligned and view.inside)
        self.assertGreater(sliceNode.GetSliceToRAS().GetElement(1, 1), 0.99)  # anterior still up
        self.delayDisplay("Test passed")

    def test_MeasurementsAndExport(self):
        """Measure, edit with Slicer's own API, re-measure, export CSV (no network needed)."""
        import tempfile

        from ParaspinalSegLib import scene

        self.delayDisplay("Measurements and CSV export")
        volumeNode, _array = self._syntheticVolume()
        logic = ParaspinalSegLogic()
        segmentationNode = scene.get_or_create_segmentation(slicer.mrmlScene, volumeNode)
        labels = np.zeros((64, 64), dtype=np.uint8)
        labels[34:47, 37:52] = 6  # left multifidus: columns > 32 are patient left (I points to the left)
        scene.write_slice_labels(segmentationNode, volumeNode, 1, labels)
        tableNode = logic.updateMeasurements(volumeNode, 1, segmentationNode, level="L4/L5", method=400.0)
        self.assertEqual(tableNode.GetNumberOfRows(), 9)
        mask = slicer.util.arrayFromSegmentBinaryLabelmap(segmentationNode, "multifidus_left", volumeNode)
        mask[1, 40:, :] = 0
        slicer.util.updateSegmentBinaryLabelmapFromArray(mask, segmentationNode, "multifidus_left", volumeNode)
        logic.updateMeasurements(volumeNode, 1, segmentationNode, method=400.0)  # level None: kept
        rows = {row["segment_id"]: row for row in scene.rows_from_table(tableNode)}
        self.assertEqual(len(rows), 9)
        self.assertAlmostEqual(rows["multifidus_left"]["csa_mm2"], 6 * 15 * 0.8 * 0.8, places=6)
        self.assertEqual(rows["multifidus_left"]["level"], "L4/L5")
        with tempfile.TemporaryDirectory() as folder:
            text = logic.exportTableToCsv(tableNode, os.path.join(folder, "measurements")).read_text(encoding="utf-8")
        for expected in ("left multifidus", "L4/L5", "(mm2)"):
            self.assertIn(expected, text)
        self.delayDisplay("Test passed")

    def test_SampleData(self):
        """The shipped slice is offered in Sample Data (category ParaspinalSeg) and loads, checksum checked."""
        self.delayDisplay("Sample Data and terminology")
        self.assertTrue(registerTerminology())
        registerSampleData()
        import SampleData

        from ParaspinalSegLib import sample_data

        volumeNode = SampleData.SampleDataLogic().downloadSample(sample_data.SAMPLE_NAME)
        self.assertIsNotNone(volumeNode)
        self.assertEqual(volumeNode.GetImageData().GetDimensions(), (377, 200, 1))
        self.delayDisplay("Test passed")

    def test_BadInput(self):
        """Bad input gives an error before the model loads (no PyTorch needed) and writes no node."""
        from ParaspinalSegLib.errors import InputError

        self.delayDisplay("Bad input")
        logic = ParaspinalSegLogic()
        volumeNode, _array = self._syntheticVolume()
        numNodes = slicer.mrmlScene.GetNumberOfNodes()
        for badVolume, k in ((None, 0), (volumeNode, 7)):  # only slices 0..2 exist
            with self.assertRaises(InputError):
                logic.segmentSlice(badVolume, k)
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
            segmentationNode = outcome.segmentation_node
            self.assertEqual(segmentationNode.GetSegmentation().GetNumberOfSegments(), 9)
            self.assertEqual(outcome.result.labels.shape, array[1].shape)
            self.assertIn("CPU", logic.describeOutcome(outcome))
            # The cached segmenter is reused for the same weights and device, and a second slice
            # goes into the same segmentation.
            segmenter = logic.getSegmenter(weightsPath, "cpu")
            again = logic.segmentSlice(volumeNode, 0, device="cpu", weightsPath=weightsPath)
            self.assertIs(again.segmentation_node, segmentationNode)
            self.assertIs(logic.getSegmenter(weightsPath, "cpu"), segmenter)
            self.assertTrue(segmenter.mirror_tta)
            # Turning mirror averaging off keeps the loaded model (no reload).
            single = logic.getSegmenter(weightsPath, "cpu", mirrorAveraging=False)
            self.assertFalse(single.mirror_tta)
            self.assertIs(single.model, segmenter.model)

            # An all-zero slice is refused and leaves the scene unchanged.
            slicer.util.arrayFromVolume(volumeNode)[2] = 0
            slicer.util.arrayFromVolumeModified(volumeNode)
            numNodes = slicer.mrmlScene.GetNumberOfNodes()
            with self.assertRaises(InputError):
                logic.segmentSlice(volumeNode, 2, device="cpu", weightsPath=weightsPath)
            self.assertEqual(slicer.mrmlScene.GetNumberOfNodes(), numNodes)
        self.delayDisplay("Test passed")
