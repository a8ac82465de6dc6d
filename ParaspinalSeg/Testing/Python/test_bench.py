"""The benchmark script runs end to end and reports every figure for both models (no timing asserted)."""

import pytest

pytest.importorskip("torch")

from ParaspinalSegLib import bench


def test_bench_reports_both_models(capsys) -> None:
    results = bench.run(size=96, runs=3, threads=1, base_width=4)
    assert set(results) == {"BS-ESNet", "U-Net"}
    for figures in results.values():
        assert figures["forward_ms"] > 0 and figures["segment_ms"] >= figures["forward_ms"] * 0.5
        assert figures["segment_single_pass_ms"] > 0
        assert figures["parameters_M"] > 0 and figures["gflops"] > 0 and figures["peak_rss_mib"] >= 0
    # BS-ESNet = U-Net + BSN + SAG: strictly more parameters and FLOPs at the same width.
    assert results["BS-ESNet"]["parameters_M"] > results["U-Net"]["parameters_M"]
    assert results["BS-ESNet"]["gflops"] > results["U-Net"]["gflops"]
    assert all(r["window_placements"] >= 1 for r in results.values())
    bench._print_table(results, 1, "cpu")
    assert "ratio" in capsys.readouterr().out


def test_bench_times_a_real_slice_file(tmp_path, capsys) -> None:
    """``--image`` segments the file's slice (its own matrix and geometry), not the synthetic ellipse."""
    import SimpleITK as sitk
    import numpy as np

    rng = np.random.default_rng(1)
    image = sitk.GetImageFromArray(rng.normal(300, 40, (1, 80, 72)).astype(np.float32))
    image.SetSpacing((2.5, 2.5, 4.0))
    sitk.WriteImage(image, str(tmp_path / "slice.nrrd"))
    results = bench.run(runs=3, threads=1, base_width=4, image_file=str(tmp_path / "slice.nrrd"))
    assert results["BS-ESNet"]["input"].startswith("80x72 slice (slice.nrrd)")
    assert bench.main(["--runs", "1", "--threads", "1", "--base-width", "4", "--image", str(tmp_path / "slice.nrrd")]) == 0
    assert "window placements per call" in capsys.readouterr().out


def test_click_benchmark_reports_network_and_outside_time(save_tiny_weights, tmp_path, capsys) -> None:
    pytest.importorskip("slicer", reason="slicer-core (PyPI) is not installed")
    from ParaspinalSegLib import bench_click

    weights = save_tiny_weights(tmp_path / "tiny", spacing_mm=6.0, size=64)
    result = bench_click.run(shape=(6, 64, 64), clicks=2, filled=1, weights=str(weights), threads=1)
    assert set(result) == {"network", "outside", "measure", "write", "check"}
    assert result["network"] > 0 and result["outside"] > 0
    assert abs(result["outside"] - (result["check"] + result["measure"] + result["write"])) < 1e-6
    assert bench_click.main(["--shape", "4", "64", "64", "--clicks", "1", "--filled", "1", "--weights", str(weights),
                             "--threads", "1"]) == 0
    assert "outside the network" in capsys.readouterr().out
