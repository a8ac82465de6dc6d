#!/usr/bin/env python
"""Render the Red slice view offscreen through MRML's own displayable managers (slicer-core, no Slicer app).

The extension's screenshot and the Sample Data thumbnail are made here, so they show what Slicer's
slice view draws, not a mock-up: a headless MRML scene, the shipped sample slice, the shipped model's
nine segments and boxes written by the same code as the module, a ``vtkMRMLSliceLogic`` for "Red"
(reslicing and window/level of the volume), and the slice-view displayable managers that Slicer's
``qMRMLSliceView`` instantiates (segmentations 2-D and markups for the boxes) drawing into an offscreen
VTK render window (EGL). What is missing is Slicer's Qt frame around the view (slice controller bar,
module panel): the picture is captioned as an offscreen rendering wherever it is used.

Usage::

    python tools/render_red_view.py                   # docs/screenshot-red-view.png + Resources/Icons/SampleTUM01.png
    python tools/render_red_view.py --out /tmp/red.png --size 800
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "ParaspinalSeg"))

SLICE_VIEW_DISPLAYABLE_MANAGERS = ("vtkMRMLSegmentationsDisplayableManager2D", "vtkMRMLMarkupsDisplayableManager")


class RedView:
    """An offscreen Red slice view of ``scene``: Slicer's slice logic plus its slice-view displayable managers."""

    def __init__(self, scene, app_logic, volume_node) -> None:
        import slicer
        import vtk

        slicer.vtkMRMLSliceNode.AddDefaultSliceOrientationPresets(scene)
        self.slice_logic = slicer.vtkMRMLSliceLogic()
        self.slice_logic.SetMRMLApplicationLogic(app_logic)
        self.slice_logic.SetMRMLScene(scene)
        self.slice_node = self.slice_logic.AddSliceNode("Red")
        app_logic.GetSliceLogics().AddItem(self.slice_logic)
        self.slice_node.SetOrientationToAxial()
        self.slice_logic.GetSliceCompositeNode().SetBackgroundVolumeID(volume_node.GetID())

        self.window = vtk.vtkRenderWindow()
        self.window.SetOffScreenRendering(1)
        self.renderer = vtk.vtkRenderer()
        self.window.AddRenderer(self.renderer)
        self.interactor = vtk.vtkRenderWindowInteractor()  # the markups widgets need one, as in a real view
        self.interactor.SetRenderWindow(self.window)

        # The resliced, window/levelled volume: what ctkVTKSliceView shows behind the displayable managers.
        image_mapper = vtk.vtkImageMapper()
        image_mapper.SetInputConnection(self.slice_logic.GetImageDataConnection())
        image_mapper.SetColorWindow(255)
        image_mapper.SetColorLevel(127.5)
        image_actor = vtk.vtkActor2D()
        image_actor.SetMapper(image_mapper)
        self.renderer.AddViewProp(image_actor)

        factory = slicer.vtkMRMLSliceViewDisplayableManagerFactory.GetInstance()
        factory.SetMRMLApplicationLogic(app_logic)
        for name in SLICE_VIEW_DISPLAYABLE_MANAGERS:
            if not factory.IsDisplayableManagerRegistered(name):
                factory.RegisterDisplayableManager(name)
        self.group = factory.InstantiateDisplayableManagers(self.renderer)
        self.group.SetMRMLDisplayableNode(self.slice_node)

    def capture(self, size: int, out: Path) -> None:
        """Fit the volume into a ``size`` x ``size`` view and write it as PNG."""
        import vtk

        self.slice_node.SetDimensions(size, size, 1)
        self.window.SetSize(size, size)
        self.slice_logic.FitSliceToBackground(size, size)
        self.slice_logic.SnapSliceOffsetToIJK()
        self.window.Render()
        self.window.Render()
        grab = vtk.vtkWindowToImageFilter()
        grab.SetInput(self.window)
        grab.Update()
        writer = vtk.vtkPNGWriter()
        writer.SetFileName(str(out))
        writer.SetInputConnection(grab.GetOutputPort())
        out.parent.mkdir(parents=True, exist_ok=True)
        writer.Write()
        print(f"wrote {out} ({size} x {size}; displayable managers: {', '.join(SLICE_VIEW_DISPLAYABLE_MANAGERS)})")


def load_sample(scene):
    import slicer

    from ParaspinalSegLib import sample_data

    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(str(sample_data.SAMPLE_FILE))
    volume = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", sample_data.NODE_NAME)
    if not storage.ReadData(volume):
        raise SystemExit(f"could not read {sample_data.SAMPLE_FILE}")
    volume.CreateDefaultDisplayNodes()
    display = volume.GetDisplayNode()
    display.AutoWindowLevelOn()
    return volume


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "screenshot-red-view.png")
    parser.add_argument("--thumbnail", type=Path, default=REPO / "ParaspinalSeg" / "Resources" / "Icons" / "SampleTUM01.png")
    parser.add_argument("--size", type=int, default=640)
    args = parser.parse_args(argv)

    from ParaspinalSegLib import headless, workflow
    from ParaspinalSegLib.segmenter import SliceSegmenter

    scene, app_logic = headless.create_headless_scene(terminology=True)
    restore = headless.install_slicer_shims(scene, app_logic)
    try:
        volume = load_sample(scene)
        view = RedView(scene, app_logic, volume)
        view.capture(128, args.thumbnail)  # Sample Data thumbnail: the bare sample slice, before segmenting
        outcome = workflow.segment_slice_into_scene(scene, volume, 0, SliceSegmenter(device="cpu"), level="L4/L5")
        print(workflow.describe_outcome(outcome))
        view.capture(args.size, args.out)
    finally:
        restore()
    return 0


if __name__ == "__main__":
    sys.exit(main())
