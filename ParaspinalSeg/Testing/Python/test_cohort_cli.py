"""Cohort use from the command line: ``segment --slices`` (whole-stack mode) equals one call per slice, batch
rows share one scene and give what ``segment`` gives, Dixon images per batch row, the batch benchmark's
figures; and the real TUM01 stack (29 Dixon slices, shipped weights; skipped without ../shared/data)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

sitk = pytest.importorskip("SimpleITK")
torch = pytest.importorskip("torch")
slicer = pytest.importorskip("slicer")

from ParaspinalSegLib import anatomy, cli  # noqa: E402

DATA = Path(__file__).resolve().parents[3].parent / "shared" / "data" / "myosegmentum_lpm"
SPACING = (1.5, 1.5, 4.0)


@pytest.fixture(scope="module")
def weights(tmp_path_factory, save_tiny_weights) -> Path:
    return save_tiny_weights(tmp_path_factory.mktemp("weights") / "tiny")


def _array(shape=(4, 48, 40), seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    k, j, i = shape
    a = rng.normal(200.0, 20.0, size=shape)
    jj, ii = np.mgrid[:j, :i]
    for kk in range(k):
        a[kk][(jj - j * 0.6) ** 2 + (ii - i * 0.3) ** 2 < 40 + 4 * kk] = 600.0
        a[kk][(jj - j * 0.3) ** 2 + (ii - i * 0.5) ** 2 < 25] = 900.0
    return a.astype(np.float32)


def _write(path: Path, arr: np.ndarray, origin=(10.0, -20.0, 30.0)) -> Path:
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(SPACING)
    img.SetOrigin(origin)
    sitk.WriteImage(img, str(path))
    return path


def _labels(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def _rows(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_stack_mode_equals_one_call_per_slice(tmp_path, weights, capsys):
    vol = _write(tmp_path / "stack.nii.gz", _array())
    out = tmp_path / "stack_out"
    assert cli.main(["segment", str(vol), "--slices", "1-3", "--batch-size", "2", "--weights", str(weights),
                     "--out", str(out)]) == 0
    stack_stdout = capsys.readouterr().out
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(["stack.seg.nrrd", "stack_labels.nii.gz", "stack_boxes.mrk.json", "stack_measurements.csv"]
                           + [f"stack_slice{k}_overlay.png" for k in (1, 2, 3)])
    stack_labels = _labels(out / "stack_labels.nii.gz")
    assert not stack_labels[0].any()
    rows = _rows(out / "stack_measurements.csv")
    assert len(rows) == 3 * len(anatomy.STRUCTURES) and {r["Slice"] for r in rows} == {"1", "2", "3"}
    for r in rows:  # slice index and position (origin S + 4 mm per slice; LPS origin z = S) in every row
        assert float(r["Position (mm)"]) == pytest.approx(30.0 + 4.0 * int(r["Slice"]))
    boxes = json.loads((out / "stack_boxes.mrk.json").read_text())["markups"]
    found_rows = [r for r in rows if r["Found"] == "yes"]
    assert len(boxes) == len(found_rows)
    assert {b["name"] for b in boxes} == {f"{r['Structure']} (slice {r['Slice']})" for r in found_rows}

    # ... the same slices segmented one call at a time
    for k in (1, 2, 3):
        single = tmp_path / f"single{k}"
        assert cli.main(["segment", str(vol), "--slice", str(k), "--weights", str(weights), "--out", str(single)]) == 0
        np.testing.assert_array_equal(_labels(single / "stack_labels.nii.gz")[k], stack_labels[k])
        one = _rows(single / "stack_measurements.csv")
        mine = [r for r in rows if r["Slice"] == str(k)]
        assert [(r["Segment ID"], r["CSA (mm2)"], r["Fat (%)"], r["Position (mm)"], r["QC"]) for r in one] == \
               [(r["Segment ID"], r["CSA (mm2)"], r["Fat (%)"], r["Position (mm)"], r["QC"]) for r in mine]
    assert all(r["QC"] == "ok" or r["QC"].startswith("check: ") for r in rows)
    flagged = {r["Slice"] for r in rows if r["QC"] != "ok"}
    assert f"QC: {len(flagged)} of 3 slices flagged" in stack_stdout
    capsys.readouterr()


@pytest.mark.parametrize("argv, message", [
    (["--slices", "2-9"], "outside the volume"),
    (["--slices", "x"], "not a slice index"),
    (["--slices", "all", "--slice", "1"], "not both"),
    (["--batch-size", "4"], "needs --slices"),
    (["--slices", "all", "--batch-size", "0"], "at least 1"),
])
def test_stack_mode_bad_options_are_one_error_line_and_nothing_written(tmp_path, weights, capsys, argv, message):
    vol = _write(tmp_path / "v.nii.gz", _array())
    out = tmp_path / "out"
    assert cli.main(["segment", str(vol), *argv, "--weights", str(weights), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


@pytest.mark.parametrize("mode", [["--slice", "1"], ["--slices", "all"]])
def test_dixon_images_that_miss_the_slices_are_refused_before_the_model_loads(tmp_path, capsys, mode):
    vol = _write(tmp_path / "v.nii.gz", _array())
    far = (10.0, -20.0, 530.0)  # 500 mm above the volume
    water = _write(tmp_path / "w.nii.gz", _array() * 0.8, origin=far)
    fat = _write(tmp_path / "f.nii.gz", _array() * 0.2, origin=far)
    out = tmp_path / "out"
    # weights that do not exist: had the model been loaded first, the error would be about them
    assert cli.main(["segment", str(vol), *mode, "--water-image", str(water), "--fat-image", str(fat),
                     "--weights", str(tmp_path / "missing.json"), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "does not overlap the segmented slice" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_batch_rows_share_one_scene_and_give_what_segment_gives(tmp_path, weights, capsys):
    vol = _write(tmp_path / "case.nii.gz", _array(seed=3))
    water = _write(tmp_path / "w.nii.gz", _array(seed=3) * 0.8)
    fat = _write(tmp_path / "f.nii.gz", _array(seed=3) * 0.2 + 5.0)
    listing = tmp_path / "list.csv"
    listing.write_text("volume,slice,level,water,fat\ncase.nii.gz,0,L3/L4,w.nii.gz,f.nii.gz\n"
                       "case.nii.gz,2,L4/L5,,\ncase.nii.gz,3,L5/S1,w.nii.gz,f.nii.gz\n", encoding="utf-8")
    from ParaspinalSegLib import headless

    created = []

    original_init = headless.SceneSession.__init__

    def counting_init(self):
        created.append(self)
        original_init(self)

    headless.SceneSession.__init__ = counting_init
    try:
        assert cli.main(["batch", str(listing), "--weights", str(weights), "--out", str(tmp_path / "b"), "--no-progress"]) == 0
    finally:
        headless.SceneSession.__init__ = original_init
    assert len(created) == 1  # one scene session for the whole batch ...
    assert created[0]._scene is None and created[0]._cache is None  # ... closed, its cache folder removed
    rows = _rows(tmp_path / "b" / "measurements.csv")
    assert len(rows) == 3 * len(anatomy.STRUCTURES)
    for k in (0, 2, 3):
        single = tmp_path / f"s{k}"
        argv = ["segment", str(vol), "--slice", str(k), "--weights", str(weights), "--out", str(single)]
        if k != 2:
            argv += ["--water-image", str(water), "--fat-image", str(fat)]
        assert cli.main(argv) == 0
        np.testing.assert_array_equal(_labels(single / "case_labels.nii.gz")[k],
                                      _labels(tmp_path / "b" / f"case_slice{k}" / "case_labels.nii.gz")[k])
        key = ("Segment ID", "CSA (mm2)", "Fat (%)", "Dixon fat fraction (%)", "Position (mm)")
        assert [tuple(r[c] for c in key) for r in _rows(single / "case_measurements.csv")] == \
               [tuple(r[c] for c in key) for r in rows if r["Slice"] == str(k)]
    dixon = {r["Slice"]: r["Dixon fat fraction (%)"] for r in rows if r["Found"] == "yes" and
             anatomy.BY_KEY[r["Segment ID"]].is_muscle}
    if dixon:  # rows with Dixon images have the column filled; the row without has it empty
        assert all(v != "" for s, v in dixon.items() if s != "2") and all(v == "" for s, v in dixon.items() if s == "2")
    capsys.readouterr()


def test_batch_benchmark_reports_ratio_and_breakdown(tmp_path, weights):
    from ParaspinalSegLib import bench_batch

    f = bench_batch.run(n=3, size=64, threads=1, weights=str(weights))
    assert f["per_extra_slice_ms"] > 0 and f["unet16_512_ms"] > 0
    assert f["ratio"] == pytest.approx(f["per_extra_slice_ms"] / f["unet16_512_ms"])
    parts = f["breakdown_ms"]
    assert set(parts) == {"network", "fit", "scene", "files"} and all(v > 0 for v in parts.values())
    assert sum(parts.values()) <= f["per_extra_slice_ms"] * 1.05


@pytest.mark.slow
@pytest.mark.skipif(not DATA.is_dir(), reason="needs ../shared/data/myosegmentum_lpm (the TUM01 Dixon slices)")
def test_tum01_stack_equals_each_slice_alone_with_dixon_column(tmp_path, capsys):
    """The 29 TUM01 slices as one 3-D volume (4 mm), shipped weights: ``--slices all`` gives per slice the
    labels of segmenting that slice's own file alone; the Dixon column equals mean F/(W+F) computed here on
    the predicted muscles within 0.1 points."""
    from ParaspinalSegLib import batch
    from ParaspinalSegLib.bench_batch import write_dixon_stack
    from ParaspinalSegLib.dixon import NOISE_FLOOR_FRACTION

    paths = write_dixon_stack(DATA, tmp_path / "stack")
    out = tmp_path / "out"
    assert cli.main(["segment", str(paths["inphase"]), "--slices", "all", "--water-image", str(paths["water"]),
                     "--fat-image", str(paths["fat"]), "--out", str(out), "--threads", "1"]) == 0
    stack_labels = _labels(out / "TUM01_stack_inphase_labels.nii.gz")
    rows = _rows(out / "TUM01_stack_inphase_measurements.csv")
    assert stack_labels.shape[0] == 29 and {int(r["Slice"]) for r in rows} == set(range(29))
    water, fat = (sitk.GetArrayFromImage(sitk.ReadImage(str(paths[k]))).astype(float) for k in ("water", "fat"))
    segmenter = batch.load_segmenter(None, "cpu", 1)
    worst = 0.0
    for k in range(29):
        # the slice alone: its own in-phase 2-D file (same voxels, its own origin)
        w2 = sitk.ReadImage(str(DATA / f"TUM01_z{k:02d}_img.nii.gz"), sitk.sitkFloat32)
        f2 = sitk.ReadImage(str(DATA / f"TUM01_z{k:02d}_fat.nii.gz"), sitk.sitkFloat32)
        one = tmp_path / f"z{k:02d}.nii.gz"
        sitk.WriteImage(w2 + f2, str(one))
        alone = batch.segment_file(one, None, tmp_path / f"alone{k}", segmenter=segmenter)
        np.testing.assert_array_equal(_labels(alone.files["labels"])[0], stack_labels[k])
        total = water[k] + fat[k]
        floor = NOISE_FLOOR_FRACTION * np.percentile(total, 99)
        for r in rows:
            v = anatomy.BY_KEY[r["Segment ID"]].value
            if int(r["Slice"]) != k or v not in anatomy.MUSCLE_VALUES or r["Found"] != "yes":
                continue
            keep = (stack_labels[k] == v) & (total >= floor)
            expected = 100 * float(np.mean(fat[k][keep] / total[keep]))
            worst = max(worst, abs(float(r["Dixon fat fraction (%)"]) - expected))
    assert worst < 0.1, worst
    capsys.readouterr()
