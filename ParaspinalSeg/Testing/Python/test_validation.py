"""The library's one set of input checks: slice index, slice content, fat-threshold method — and that one
``paraspinalseg segment`` call checks the slice's content exactly once."""

from __future__ import annotations

import numpy as np
import pytest

from ParaspinalSegLib.errors import InputError
from ParaspinalSegLib.validation import check_slice_index, parse_threshold_method, validate_slice


def test_slice_index_whole_numbers_in_range_only():
    assert check_slice_index(np.int64(2), 3) == 2
    for bad, message in ((3, "out of range: volume 'T2' has slices 0..2"), (-1, "out of range"),
                         (1.0, "whole number"), (True, "whole number"), ("1", "whole number")):
        with pytest.raises(InputError, match=message):
            check_slice_index(bad, 3, "T2")


def test_slice_content_refusals_name_the_slice():
    good = np.arange(100, dtype=np.int16).reshape(10, 10)
    assert validate_slice(good) is not None
    nan = good.astype(float)
    nan[2, 2] = np.nan
    cases = [(np.zeros((10, 10)), "empty"), (nan, "1 NaN"), (np.ones((4, 40)), "too small"),
             (np.ones((2, 10, 10)), "2-D"), (good > 50, "real numbers")]
    for array, message in cases:
        with pytest.raises(InputError, match=f"slice 4 of 'T2': .*{message}"):
            validate_slice(array, "slice 4 of 'T2'")


def test_threshold_method_parsing():
    assert parse_threshold_method(" Otsu ") == "otsu"
    assert parse_threshold_method("otsu-region") == "otsu-region"
    assert parse_threshold_method("auto-gmm") == "auto"  # what tables record for auto
    assert parse_threshold_method("350") == 350.0 and isinstance(parse_threshold_method(350), float)
    for bad in ("median", "", None, True):
        with pytest.raises(InputError, match="auto, otsu, otsu-region or a number"):
            parse_threshold_method(bad)
    for bad in (float("nan"), "inf"):
        with pytest.raises(InputError, match="must be a finite number"):
            parse_threshold_method(bad)


def test_command_line_and_measurements_share_the_parser():
    import argparse

    from ParaspinalSegLib import cli
    from ParaspinalSegLib.measurements import fat_threshold

    assert cli._threshold_method("400") == 400.0
    with pytest.raises(argparse.ArgumentTypeError, match="auto, otsu, otsu-region or a number"):
        cli._threshold_method("median")
    image = np.arange(100, dtype=float).reshape(10, 10)
    with pytest.raises(InputError, match="auto, otsu, otsu-region or a number"):
        fat_threshold(image, np.zeros((10, 10), np.uint8), "median")
    assert fat_threshold(image, np.zeros((10, 10), np.uint8), " 42 ").value == 42.0


def test_one_segment_call_checks_the_slice_once(tmp_path, monkeypatch, save_tiny_weights):
    """``paraspinalseg segment`` checks the slice before the model loads, and nobody checks it again."""
    sitk = pytest.importorskip("SimpleITK")
    pytest.importorskip("slicer")
    from ParaspinalSegLib import batch, segmenter, slice_outputs, validation, workflow

    calls: list[tuple] = []
    real = validation.validate_slice

    def counting(a, where=""):
        calls.append(np.shape(a))
        return real(a, where)

    for module in (slice_outputs, segmenter, workflow):
        monkeypatch.setattr(module, "validate_slice", counting)
    rng = np.random.default_rng(0)
    image = sitk.GetImageFromArray(rng.normal(300, 50, (2, 40, 40)).astype(np.int16))
    image.SetSpacing((1.5, 1.5, 4.0))
    sitk.WriteImage(image, str(tmp_path / "v.nii.gz"))
    weights = save_tiny_weights(tmp_path / "tiny")
    batch.segment_file(tmp_path / "v.nii.gz", 1, tmp_path / "out", weights=str(weights), device="cpu", threads=1)
    assert calls == [(40, 40)]
    # The batch path (no pre-check) and the Slicer path check it once too: in the scene workflow.
    calls.clear()
    batch.run_batch([batch.BatchItem(1, str(tmp_path / "v.nii.gz"), 0)], tmp_path / "batch",
                    batch.load_segmenter(str(weights), "cpu", 1), progress=False)
    assert calls == [(40, 40)]
    # A stack (--slices): each slice checked once, before the model loads.
    from ParaspinalSegLib import cli

    calls.clear()
    assert cli.main(["segment", str(tmp_path / "v.nii.gz"), "--slices", "0-1", "--out", str(tmp_path / "stack"),
                     "--weights", str(weights), "--device", "cpu", "--threads", "1"]) == 0
    assert calls == [(40, 40), (40, 40)]
