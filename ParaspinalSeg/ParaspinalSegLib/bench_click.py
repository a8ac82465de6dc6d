"""Benchmark: what one "Segment slice" click costs outside the network, on a large headless scene.

Run ``python -m ParaspinalSegLib.bench_click`` (options: ``--shape 200 512 512`` (K J I), ``--clicks 7``,
``--filled 5`` slices segmented before timing, ``--weights W``, ``--threads 2``). A real MRML scene
(slicer-core) holds a K x J x I int16 volume and its ParaspinalSeg segmentation; each click runs the
module's own path (:func:`workflow.segment_slice_into_scene`: check the slice, segment, measure, write
segments, table rows and boxes, undo snapshot) on a new slice. Printed per click, as medians: the
segmenter call (network with its pre/post-processing: the reference measured in the same run) and
everything else (the part this benchmark is about; goal ≤ 0.2 s), with its split.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Optional, Sequence

import numpy as np


def _volume_array(shape: Sequence[int]) -> np.ndarray:
    """A body-like slice (as in ParaspinalSegLib.bench) repeated along K, int16."""
    from .bench import _synthetic_slice

    k, j, i = shape
    if j != i:
        raise SystemExit("--shape J and I must be equal (square slices)")
    image, _matrix = _synthetic_slice(i)
    return np.repeat(np.clip(image, 0, 32767).astype(np.int16)[None], k, axis=0)


def run(shape: Sequence[int] = (200, 512, 512), clicks: int = 7, filled: int = 5, weights: Optional[str] = None,
        threads: int = 2) -> dict[str, float]:
    """Median seconds per click: ``network`` (segmenter call), ``outside`` (the rest) and its parts."""
    import torch
    import vtk
    from vtk.util import numpy_support

    from . import headless, workflow
    from .segmenter import SliceSegmenter

    torch.set_num_threads(threads)
    scene, app_logic = headless.create_headless_scene()
    restore = headless.install_slicer_shims(scene, app_logic)
    try:
        k_count, j, i = (int(v) for v in shape)
        volume = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "bench")
        image = vtk.vtkImageData()
        image.SetDimensions(i, j, k_count)
        image.AllocateScalars(vtk.VTK_SHORT, 1)
        numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())[:] = _volume_array(shape).ravel()
        volume.SetAndObserveImageData(image)
        spacing = 400.0 / i
        volume.SetSpacing(spacing, spacing, 4.0)
        m = vtk.vtkMatrix4x4()  # LPS as ITK reads DICOM: I -> patient left, J -> posterior
        m.SetElement(0, 0, -1.0)
        m.SetElement(1, 1, -1.0)
        volume.SetIJKToRASDirectionMatrix(m)
        volume.CreateDefaultDisplayNodes()

        segmenter = SliceSegmenter(weights=weights, device="cpu")
        middle = k_count // 2
        for k in range(middle - filled, middle):  # a segmentation that already has results
            workflow.segment_slice_into_scene(scene, volume, k, segmenter)
        rows = []
        for n in range(clicks):
            k = middle + n
            t0 = time.perf_counter()
            outcome = workflow.segment_slice_into_scene(scene, volume, k, segmenter)
            total = time.perf_counter() - t0
            s = outcome.seconds
            rows.append({"network": s["segment"], "outside": total - s["segment"], "measure": s["measure"],
                         "write": s["write"], "check": total - s["segment"] - s["measure"] - s["write"]})
        return {key: statistics.median(row[key] for row in rows) for key in rows[0]}
    finally:
        restore()
        scene.Clear(True)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ParaspinalSegLib.bench_click", description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=3, default=(200, 512, 512), metavar=("K", "J", "I"))
    parser.add_argument("--clicks", type=int, default=7)
    parser.add_argument("--filled", type=int, default=5, help="slices segmented before the timed clicks")
    parser.add_argument("--weights", help="weights file (default: the shipped model)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    result = run(args.shape, args.clicks, args.filled, args.weights, args.threads)
    k, j, i = args.shape
    print(f"one click on a {i} x {j} x {k} volume, median of {args.clicks} (after {args.filled} slices segmented):")
    print(f"  network (segmenter call, reference) {result['network']:.3f} s")
    print(f"  outside the network                 {result['outside']:.3f} s  "
          f"({result['outside'] / result['network']:.2f} x the network; goal <= 0.2 s)")
    print(f"    check + geometry {result['check']:.3f} s, measure {result['measure']:.3f} s, "
          f"write segments/table/boxes + undo snapshot {result['write']:.3f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
