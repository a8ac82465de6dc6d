"""Benchmark of the cohort engine: ``batch`` per extra slice against a bare U-Net, and batch memory over 100 slices.

Run::

    python -m ParaspinalSegLib.bench_batch [--slices 21] [--size 512] [--threads 2] [--weights W] [--no-mirror-tta]
    python -m ParaspinalSegLib.bench_batch --memory [--slices 100]
    python -m ParaspinalSegLib.bench_batch --dixon-stack [--data ../shared/data/myosegmentum_lpm]

The first form writes ``--slices`` synthetic body-like slices (one file each, as in a cohort), runs
:func:`batch.run_batch` on them with the shipped (or given) model, default settings (mirror averaging on),
and prints the median time per extra slice (every slice after the first, which also pays for loading
VTK/MRML) with its breakdown: network (the segmenter call), fit (fat threshold and measurements), scene
(MRML nodes: segmentation, table, boxes, clearing) and files (the five outputs). The reference is the
forward pass of a bare U-Net of width 16 on a 512² input, timed in the same process before and after the
batch (median of both), so a busy machine slows both alike; the figure to read is the ratio.

``--memory`` runs the batch in a fresh process and prints the peak resident set size after the first 10
slices and after all ``--slices`` (default 100); the goal is that the second is within 10 % of the first.

``--dixon-stack`` writes the 29 contiguous TUM01 Dixon slices as one 3-D in-phase volume (4 mm spacing)
with matching water and fat volumes (under a temporary folder; the data's license keeps them out of the
repository) and times one ``paraspinalseg segment STACK --slices all`` call against 29 calls
``paraspinalseg segment STACK --slice K``, each a fresh process as a user would run them.
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
from typing import Optional

import numpy as np

#: Breakdown keys of :attr:`SegmentOutputs.seconds`, in print order.
PARTS = ("network", "fit", "scene", "files")


def write_synthetic_slices(folder: Path, n: int, size: int = 512) -> Path:
    """``n`` single-slice NIfTI files (different noise each) and a batch list naming them; returns the list."""
    from .bench import _synthetic_slice
    from .volume_io import volume_from_array, write_scalar_volume

    folder.mkdir(parents=True, exist_ok=True)
    rows = ["volume,slice,level"]
    for i in range(n):
        image, matrix = _synthetic_slice(size, seed=i)
        # _synthetic_slice gives a slice matrix (axis 0 = J, axis 1 = I); the volume matrix swaps them back.
        m = matrix.copy()
        m[:3, 0], m[:3, 1] = matrix[:3, 1], matrix[:3, 0]
        path = folder / f"slice{i:03d}.nii.gz"
        write_scalar_volume(image[None].astype(np.float32), volume_from_array(image[None], m, name=path.name), path)
        rows.append(f"{path.name},,L4/L5")
    listing = folder / "list.csv"
    listing.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return listing


def write_dixon_stack(data_dir: Path, out_dir: Path, case: str = "TUM01") -> dict[str, Path]:
    """The contiguous slices ``<case>_zKK`` of ``data_dir`` (myosegmentum_lpm layout) as 3-D volumes:
    ``inphase`` (water + fat, what the shipped model was trained on), ``water``, ``fat`` and ``labels``, on
    one grid with the slices' own spacing (4 mm apart). Returns the paths."""
    import SimpleITK as sitk

    files = sorted(Path(data_dir).glob(f"{case}_z[0-9][0-9]_img.nii.gz"))
    if not files:
        raise FileNotFoundError(f"no {case}_zKK_img.nii.gz slices in {data_dir}")
    stacks: dict[str, list[np.ndarray]] = {"water": [], "fat": [], "labels": []}
    first = sitk.ReadImage(str(files[0]))
    for f in files:
        stacks["water"].append(sitk.GetArrayFromImage(sitk.ReadImage(str(f)))[0].astype(np.float32))
        stacks["fat"].append(sitk.GetArrayFromImage(sitk.ReadImage(str(f).replace("_img.", "_fat.")))[0].astype(np.float32))
        stacks["labels"].append(sitk.GetArrayFromImage(sitk.ReadImage(str(f).replace("_img.", "_lbl.")))[0])
    arrays = {k: np.stack(v) for k, v in stacks.items()}
    arrays["inphase"] = arrays["water"] + arrays["fat"]
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for key, arr in arrays.items():
        img = sitk.GetImageFromArray(arr)
        img.SetSpacing(first.GetSpacing())
        img.SetOrigin(first.GetOrigin())
        img.SetDirection(first.GetDirection())
        paths[key] = out_dir / f"{case}_stack_{key}.nii.gz"
        sitk.WriteImage(img, str(paths[key]), True)
    return paths


def dixon_stack_timing(data_dir: Path, threads: int = 2, weights: Optional[str] = None) -> dict:
    """Seconds for one ``segment --slices all`` call vs 29 ``segment --slice K`` calls on the TUM01 stack."""
    with tempfile.TemporaryDirectory(prefix="paraspinalseg-bench-") as tmp:
        root = Path(tmp)
        paths = write_dixon_stack(data_dir, root / "in")
        base = [sys.executable, "-m", "ParaspinalSegLib.cli", "segment", str(paths["inphase"]), "--threads", str(threads)]
        if weights:
            base += ["--weights", weights]
        n = int(__import__("SimpleITK").ReadImage(str(paths["inphase"])).GetSize()[2])
        t0 = time.perf_counter()
        subprocess.run(base + ["--slices", "all", "--out", str(root / "stack")], check=True, capture_output=True)
        stack_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        for k in range(n):
            subprocess.run(base + ["--slice", str(k), "--out", str(root / f"single{k}")], check=True, capture_output=True)
        single_s = time.perf_counter() - t0
    return {"slices": n, "stack_s": stack_s, "single_calls_s": single_s, "ratio": stack_s / single_s}


def reference_unet_ms(runs: int = 9, size: int = 512, device: str = "cpu") -> float:
    """Median forward time (ms) of a bare U-Net of width 16 on one ``size``² slice."""
    import torch

    from .bench import _median_ms
    from .network import NetworkConfig, build_network

    torch.manual_seed(0)
    model = build_network(NetworkConfig(base_width=16, use_bsn=False, use_sag=False, deep_supervision=False)).to(device).eval()
    x = torch.zeros(1, 1, size, size, device=device)
    with torch.inference_mode():
        return _median_ms(lambda: model(x), runs, warmup=2)


def run(n: int = 21, size: int = 512, threads: int = 2, weights: Optional[str] = None, mirror_tta: bool = True,
        device: str = "cpu", keep: Optional[Path] = None, listing: Optional[Path] = None) -> dict:
    """Run the batch benchmark; returns the figures (ms per extra slice, breakdown, reference, ratio).

    ``listing``: a batch list of real slices to run instead of ``n`` synthetic ones (its first ``n`` rows)."""
    from .batch import load_segmenter, read_batch_list, run_batch

    if n < 3:
        raise ValueError("the batch benchmark needs at least 3 slices")
    with tempfile.TemporaryDirectory(prefix="paraspinalseg-bench-") as tmp:
        root = Path(keep) if keep else Path(tmp)
        items = read_batch_list(listing)[:n] if listing else read_batch_list(write_synthetic_slices(root / "in", n, size))
        segmenter = load_segmenter(weights, device, threads, mirror_tta)
        before = reference_unet_ms(size=512, device=str(segmenter.device))
        t0 = time.perf_counter()
        summary = run_batch(items, root / "out", segmenter, progress=False)
        wall = time.perf_counter() - t0
        after = reference_unet_ms(size=512, device=str(segmenter.device))
    if summary.failed:
        raise RuntimeError(f"benchmark rows failed: {summary.failed[:3]}")
    per = [o.seconds for o in summary.succeeded]
    extra = per[1:]
    total_ms = 1000 * statistics.median(s["total"] for s in extra)
    unet_ms = statistics.median([before, after])
    figures = {
        "input": str(listing) if listing else "synthetic",
        "slices": len(per),
        "slice_size": size,
        "threads": threads,
        "mirror_tta": mirror_tta,
        "device": str(segmenter.device),
        "per_extra_slice_ms": total_ms,
        "first_slice_ms": 1000 * per[0]["total"],
        "wall_s": wall,
        "unet16_512_ms": unet_ms,
        "unet16_512_ms_before_after": [before, after],
        "ratio": total_ms / unet_ms,
        "breakdown_ms": {p: 1000 * statistics.median(s.get(p, 0.0) for s in extra) for p in PARTS},
    }
    return figures


def print_figures(f: dict) -> None:
    what = f"synthetic {f['slice_size']}² slices" if f["input"] == "synthetic" else f"slices of {f['input']}"
    print(f"batch of {f['slices']} {what}, device {f['device']}, {f['threads']} threads, "
          f"mirror averaging {'on' if f['mirror_tta'] else 'off'}; medians over the slices after the first")
    print(f"  per extra slice      {f['per_extra_slice_ms']:8.1f} ms   (first slice {f['first_slice_ms']:.0f} ms)")
    for part, ms in f["breakdown_ms"].items():
        print(f"    {part:<18s} {ms:8.1f} ms")
    b, a = f["unet16_512_ms_before_after"]
    print(f"  bare U-Net w16 512²  {f['unet16_512_ms']:8.1f} ms   (before {b:.0f}, after {a:.0f})")
    print(f"  ratio                {f['ratio']:8.2f} x   (goal <= 1.0)")


_MEMORY_CHILD = r"""
import json, resource, sys
from pathlib import Path
from ParaspinalSegLib.batch import load_segmenter, read_batch_list, run_batch
from ParaspinalSegLib.bench_batch import write_synthetic_slices
root, n, first, size, threads, weights = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), sys.argv[6] or None
items = read_batch_list(write_synthetic_slices(root / "in", n, size))
seg = load_segmenter(weights, "cpu", threads, True)
peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
run_batch(items[:first], root / "out_a", seg, progress=False)
after_first = peak()
run_batch(items[first:], root / "out_b", seg, progress=False)
print(json.dumps({"after_first_mib": after_first, "after_all_mib": peak()}))
"""


def memory(n: int = 100, first: int = 10, size: int = 512, threads: int = 2, weights: Optional[str] = None) -> dict:
    """Peak RSS (MiB) of a fresh process after ``first`` batch slices and after all ``n`` (same model, same
    process: the second part continues where the first stopped)."""
    with tempfile.TemporaryDirectory(prefix="paraspinalseg-bench-") as tmp:
        out = subprocess.run([sys.executable, "-c", _MEMORY_CHILD, tmp, str(n), str(first), str(size), str(threads),
                              weights or ""], capture_output=True, text=True, check=True)
    figures = json.loads(out.stdout.strip().splitlines()[-1])
    figures.update(slices=n, first=first, growth_percent=100 * (figures["after_all_mib"] / figures["after_first_mib"] - 1))
    return figures


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ParaspinalSegLib.bench_batch", description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=None, help="slices in the batch (default 21; 100 with --memory)")
    parser.add_argument("--size", type=int, default=512, help="slice matrix (size x size)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: as the command line, half the cores)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"))
    parser.add_argument("--weights", help="weights file (default: the shipped model)")
    parser.add_argument("--no-mirror-tta", dest="mirror_tta", action="store_false")
    parser.add_argument("--list", type=Path, help="run the first --slices rows of this batch list (real slices) "
                        "instead of synthetic ones")
    parser.add_argument("--memory", action="store_true", help="peak RSS after 10 and after all slices, in a fresh process")
    parser.add_argument("--dixon-stack", action="store_true",
                        help="time --slices all against one call per slice on the TUM01 stack (needs --data)")
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[3] / "shared" / "data" / "myosegmentum_lpm"),
                        help="myosegmentum_lpm folder for --dixon-stack")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    if args.threads is None:
        from .slice_outputs import default_threads

        args.threads = default_threads()
    if args.dixon_stack:
        f = dixon_stack_timing(Path(args.data), args.threads, args.weights)
        print(f"TUM01 stack of {f['slices']} slices: one 'segment --slices all' call {f['stack_s']:.1f} s, "
              f"{f['slices']} 'segment --slice K' calls {f['single_calls_s']:.1f} s (ratio {f['ratio']:.2f})")
    elif args.memory:
        f = memory(args.slices or 100, 10, args.size, args.threads, args.weights)
        print(f"batch of {f['slices']} synthetic {args.size}² slices: peak RSS {f['after_first_mib']:.0f} MiB after "
              f"{f['first']}, {f['after_all_mib']:.0f} MiB after {f['slices']} ({f['growth_percent']:+.1f} %, goal within 10 %)")
    else:
        f = run(args.slices or 21, args.size, args.threads, args.weights, args.mirror_tta, args.device,
                listing=args.list)
        print_figures(f)
    if args.json:
        Path(args.json).write_text(json.dumps(f, indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
