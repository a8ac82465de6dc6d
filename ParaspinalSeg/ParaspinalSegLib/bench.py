"""Benchmark: latency, peak memory, parameters and FLOPs of BS-ESNet next to a plain U-Net of the same width.

Run ``python -m ParaspinalSegLib.bench`` (options: ``--size 512``, ``--runs 15``, ``--threads 2``,
``--device cpu|cuda``, ``--weights W`` to benchmark a weights file instead of a random-initialised default,
``--image FILE [--slice K]`` to segment a real slice instead of the synthetic one).
Both models are measured in the same process, interleaved, and reported as medians plus the ratio
BS-ESNet / U-Net, so a busy or slow machine shifts both alike. Peak memory is the growth of the resident set
size of a fresh child process that loads the model and segments one slice (so one model's allocations never
hide another's).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np


def _synthetic_slice(size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A body-like axial slice (ellipse with blobs and noise) on a 400 mm FOV in LPS (ITK identity) geometry."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size - 0.5
    body = ((xx / 0.42) ** 2 + (yy / 0.3) ** 2 < 1).astype(np.float32)
    blobs = sum(((xx - cx) ** 2 + (yy - 0.12) ** 2 < 0.003).astype(np.float32) for cx in (-0.12, -0.05, 0.05, 0.12))
    image = 400 * body + 300 * blobs + rng.normal(0, 20, (size, size))
    spacing = 400.0 / size
    # Slicer array order arr[k, j, i]: axis 0 = J (posterior in LPS), axis 1 = I (patient left in LPS).
    matrix = np.array([[0, -spacing, 0, 200], [-spacing, 0, 0, 200], [0, 0, 4.0, 0], [0, 0, 0, 1]], float)
    return image.astype(np.float32), matrix


def _image_slice(path: str, k: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Slice ``k`` of a volume file and its slice IJK-to-RAS matrix, as the CLI reads them.

    A trained spine-window model moves its window when the first look finds the structures off-centre; on
    the synthetic ellipse it finds spurious ones and moves, so trained weights are timed on a real slice.
    """
    from .preprocessing import slice_geometry_from_volume
    from .volume_io import read_volume

    volume = read_volume(path)
    return np.asarray(volume.array[k], np.float32), slice_geometry_from_volume(volume.ijk_to_ras, k)


def _median_ms(fn: Callable[[], object], runs: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def _gflops(model, size: int, device: str) -> float:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.zeros(1, 1, size, size, device=device)
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        model(x)
    return counter.get_total_flops() / 1e9


def _peak_rss_child(weights: Path, image_path: Path, matrix_path: Path, device: str, threads: int) -> float:
    """Peak RSS growth (MiB) of a fresh process that loads the model and segments the slice once."""
    code = f"""
import resource, numpy as np, torch
torch.set_num_threads({threads})
from ParaspinalSegLib.segmenter import SliceSegmenter
# Current (not peak) resident size after the imports: the import peak must not hide the model's growth.
base = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmRSS:"))
seg = SliceSegmenter({str(weights)!r}, device={device!r})
seg.segment(np.load({str(image_path)!r}), np.load({str(matrix_path)!r}))
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def run(size: int = 512, runs: int = 15, threads: int = 2, device: str = "cpu",
        weights: Optional[str] = None, base_width: Optional[int] = None,
        image_file: Optional[str] = None, slice_index: int = 0) -> dict:
    """Measure BS-ESNet and a plain U-Net of the same width; returns a dict of figures per model.

    ``image_file``: segment slice ``slice_index`` of this volume instead of a synthetic ``size`` × ``size`` one.
    """
    import torch

    from .network import NetworkConfig, build_network, count_parameters
    from .segmenter import SliceSegmenter
    from .weights import load_weights, save_weights

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    image, matrix = _image_slice(image_file, slice_index) if image_file else _synthetic_slice(size)
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmpdir = Path(tmp)
        if weights:
            bsesnet_path = Path(weights)
            _, cfg = load_weights(bsesnet_path)
            arch = NetworkConfig.from_dict(cfg.architecture)
            model_input, normalisation = cfg.model_input, cfg.normalisation
        else:
            arch = NetworkConfig.bsesnet() if base_width is None else NetworkConfig(base_width=base_width)
            bsesnet_path = None
            model_input, normalisation = None, None
        unet_arch = NetworkConfig.from_dict({**arch.to_dict(), "use_bsn": False, "use_sag": False,
                                             "deep_supervision": False})
        paths = {}
        for name, cfg_arch, given in (("BS-ESNet", arch, bsesnet_path), ("U-Net", unet_arch, None)):
            if given is not None:
                paths[name] = given
                continue
            model = build_network(cfg_arch)
            kwargs = {}
            if model_input is not None:
                kwargs = {"model_input": model_input, "normalisation": normalisation}
            paths[name] = save_weights(model, tmpdir / name.replace("-", "").lower(), structures_learned=list(range(1, 10)),
                                       **kwargs)
        segmenters = {name: SliceSegmenter(str(p), device=device) for name, p in paths.items()}
        input_size = {name: s.model_input.size for name, s in segmenters.items()}
        np.save(tmpdir / "image.npy", image)
        np.save(tmpdir / "matrix.npy", matrix)

        # The shipped default averages the slice with its mirror image; the same loaded model in one pass.
        single = {n: SliceSegmenter.from_model(s.model, s.config, mirror_tta=False) for n, s in segmenters.items()}
        forward, whole, whole_single = ({n: [] for n in segmenters} for _ in range(3))
        xs = {n: torch.randn(1, 1, input_size[n], input_size[n], device=segmenters[n].device) for n in segmenters}
        # Interleave the two models in rounds so drifts in machine load hit both equally.
        for _ in range(3):
            for name, seg in segmenters.items():
                with torch.inference_mode():
                    forward[name].append(_median_ms(lambda: seg.model(xs[name]), max(1, runs // 3)))
                whole[name].append(_median_ms(lambda: seg.segment(image, matrix), max(1, runs // 3), warmup=1))
                whole_single[name].append(_median_ms(lambda: single[name].segment(image, matrix), max(1, runs // 3), warmup=1))
        for name, seg in segmenters.items():
            # How many window placements a call took (1 = the first look kept its window): the network
            # cost is that many passes (twice with mirror averaging).
            placements = seg.segment(image, matrix).window_placements
            source = Path(image_file).name if image_file else "synthetic"
            results[name] = {
                "input": f"{image.shape[0]}x{image.shape[1]} slice ({source}) -> {input_size[name]}^2 network input",
                "window_placements": placements,
                "forward_ms": statistics.median(forward[name]),
                "segment_ms": statistics.median(whole[name]),
                "segment_single_pass_ms": statistics.median(whole_single[name]),
                "parameters_M": count_parameters(seg.model) / 1e6,
                "gflops": _gflops(seg.model, input_size[name], str(seg.device)),
                "peak_rss_mib": _peak_rss_child(paths[name], tmpdir / "image.npy", tmpdir / "matrix.npy", device, threads),
            }
    return results


def _print_table(results: dict, threads: int, device: str) -> None:
    import torch

    print(f"torch {torch.__version__}, device {device}, {threads} threads; medians")
    cols = ["forward_ms", "segment_ms", "segment_single_pass_ms", "parameters_M", "gflops", "peak_rss_mib"]
    w = {c: max(13, len(c)) for c in cols}
    print(f"{'model':10s} " + " ".join(f"{c:>{w[c]}s}" for c in cols))
    for name, r in results.items():
        print(f"{name:10s} " + " ".join(f"{r[c]:{w[c]}.1f}" for c in cols))
    a, b = results["BS-ESNet"], results["U-Net"]
    print(f"{'ratio':10s} " + " ".join(f"{a[c] / b[c]:{w[c]}.2f}" if b[c] else f"{'n/a':>{w[c]}s}" for c in cols))
    print(results["BS-ESNet"]["input"] + "; window placements per call: "
          + ", ".join(f"{n} {r['window_placements']}" for n, r in results.items()))


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ParaspinalSegLib.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512, help="slice matrix (size x size)")
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--weights", help="weights file to benchmark instead of a random-initialised default")
    parser.add_argument("--base-width", type=int, help="override the default width (random weights only)")
    parser.add_argument("--image", help="segment a slice of this volume file instead of a synthetic slice "
                        "(trained weights: their window placement depends on what they find)")
    parser.add_argument("--slice", type=int, default=0, help="slice index in --image (default 0)")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    results = run(args.size, args.runs, args.threads, args.device, args.weights, args.base_width, args.image, args.slice)
    _print_table(results, args.threads, args.device)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
