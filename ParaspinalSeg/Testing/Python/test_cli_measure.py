"""``paraspinalseg measure`` on label images and .seg.nrrd files gives the library's numbers."""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np
import pytest

sitk = pytest.importorskip("SimpleITK")

from ParaspinalSegLib import anatomy, cli_measure, scene  # noqa: E402
from ParaspinalSegLib.measurements import asymmetry, measure_slice  # noqa: E402

SPACING_XYZ = (0.8, 1.1, 4.0)  # i, j, k


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="paraspinalseg")
    cli_measure.register(parser.add_subparsers(dest="command", required=True))
    return parser


def _volume_and_labels(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Arrays (k, j, i): 3 slices of 60 × 50, muscles with random fat pixels in a fat body; slice 2 empty."""
    rng = np.random.default_rng(seed)
    img = np.zeros((3, 60, 50))
    lab = np.zeros((3, 60, 50), np.uint8)
    for k in range(2):
        img[k, 3:57, 3:47] = 900.0
        boxes = {6: (20, 12, 35, 22), 7: (20, 28, 35, 38), 8: (38, 5, 52, 22), 9: (38, 28, 52, 45), 1: (5, 20, 12, 30)}
        for v, (r0, c0, r1, c1) in boxes.items():
            if k == 1 and v == 7:
                continue  # missing right multifidus on slice 1
            lab[k, r0:r1, c0:c1] = v
            img[k, r0:r1, c0:c1] = 300.0 if v != 1 else 1000.0
        if k == 0:  # a canal (48 px × 0.88 mm²: absolute stenosis) and a lamina between the muscles
            lab[k, 12:20, 22:28], img[k, 12:20, 22:28] = 2, 1000.0
            lab[k, 35:38, 22:28], img[k, 35:38, 22:28] = 3, 900.0
        muscle = np.argwhere(np.isin(lab[k], (6, 7, 8, 9)))
        pick = muscle[rng.choice(len(muscle), len(muscle) // 8, replace=False)]
        img[k, pick[:, 0], pick[:, 1]] = 900.0
    img += rng.normal(0, 30, img.shape)
    return img.astype(np.float32), lab


def _write(arr: np.ndarray, path: Path, origin=(10.0, -20.0, 5.0)) -> None:
    im = sitk.GetImageFromArray(arr)
    im.SetSpacing(SPACING_XYZ)
    im.SetOrigin(origin)
    sitk.WriteImage(im, str(path))


def _read_csv(path: Path) -> list[dict[str, str]]:
    """Rows keyed by field name (``csa_mm2``) where the header is a column's CSV header (``CSA (mm2)``)."""
    fields = {scene.csv_header(c): c.field for c in cli_measure.CSV_COLUMNS}
    with path.open(newline="") as fh:
        return [{fields.get(k, k): v for k, v in row.items()} for row in csv.DictReader(fh)]


def _expected(img: np.ndarray, lab: np.ndarray, k: int, method="auto", volume_path: Path | None = None):
    """The library's rows for slice k, with the spacing as stored in the file (NIfTI keeps float32)."""
    sx, sy = sitk.ReadImage(str(volume_path)).GetSpacing()[:2] if volume_path else SPACING_XYZ[:2]
    return measure_slice(img[k].astype(np.float64), lab[k], (sy, sx), method)


@pytest.mark.parametrize("ext", [".nii.gz", ".nrrd"])
@pytest.mark.parametrize("method", ["auto", "otsu", "650"])
def test_measure_label_image_matches_library(tmp_path, ext, method):
    img, lab = _volume_and_labels()
    vol_path, seg_path, out = tmp_path / f"vol{ext}", tmp_path / f"lab{ext}", tmp_path / "m.csv"
    _write(img, vol_path)
    _write(lab, seg_path)
    args = _parser().parse_args(["measure", str(vol_path), str(seg_path), "--method", method, "--out", str(out)])
    assert args.func(args) == 0
    rows = _read_csv(out)
    assert {r["slice"] for r in rows} == {"0", "1"}  # slice 2 has no labels
    assert len(rows) == 2 * anatomy.NUM_STRUCTURES
    for k in (0, 1):
        expected = _expected(img, lab, k, float(method) if method[0].isdigit() else method, vol_path)
        got = [r for r in rows if r["slice"] == str(k)]
        for e, g in zip(expected, got):
            assert g["segment_id"] == e.key and g["structure"] == e.name and g["found"] == ("yes" if e.found else "no")
            assert int(g["pixel_count"]) == e.pixel_count
            for col in ("csa_mm2", "functional_csa_mm2", "fat_percent", "threshold", "mean_intensity"):
                want = getattr(e, col)
                assert (g[col] == "") if want is None else (float(g[col]) == pytest.approx(want, rel=1e-9)), (col, g[col], want)
            assert g["method"] == e.method
            assert g["stenosis_grade"] == (e.stenosis_grade or "")
    # the missing right multifidus on slice 1 is an explicit not-found row with empty numbers
    miss = [r for r in rows if r["slice"] == "1" and r["segment_id"] == "multifidus_right"][0]
    assert miss["found"] == "no" and miss["csa_mm2"] == "" and miss["fat_percent"] == ""
    # the canal row carries its grade; canal and lamina get a CSA and no fat %
    canal, lamina = ([r for r in rows if r["slice"] == "0" and r["segment_id"] == key][0] for key in ("spinal_canal", "lamina"))
    assert canal["stenosis_grade"] == "absolute" and float(canal["csa_mm2"]) == pytest.approx(48 * 0.88, rel=1e-6)
    assert canal["fat_percent"] == lamina["fat_percent"] == lamina["stenosis_grade"] == "" and lamina["found"] == "yes"
    # non-square pixels: CSA of the left multifidus = 15 × 10 px × 0.8 × 1.1 mm²
    mf = [r for r in rows if r["slice"] == "0" and r["segment_id"] == "multifidus_left"][0]
    assert float(mf["csa_mm2"]) == pytest.approx(150 * 0.88, rel=1e-6)
    asym = _read_csv(cli_measure.asymmetry_path(out))
    exp_asym = asymmetry(_expected(img, lab, 0, float(method) if method[0].isdigit() else method, vol_path))
    got0 = [r for r in asym if r["slice"] == "0"]
    for e, g in zip(exp_asym, got0):
        assert g["key"] == e.key
        if e.csa_asymmetry_percent is not None:
            assert float(g["csa_asymmetry_percent"]) == pytest.approx(e.csa_asymmetry_percent)


def test_measure_csv_starts_with_the_segment_table_columns(tmp_path):
    """``measure`` output lines up with ``segment``'s ``<name>_measurements.csv``: same leading headers, names, yes/no."""
    img, lab = _volume_and_labels(4)
    _write(img, tmp_path / "scan.nii.gz")
    _write(lab, tmp_path / "scan_seg.nii.gz")
    out = tmp_path / "m.csv"
    args = _parser().parse_args(["measure", str(tmp_path / "scan.nii.gz"), str(tmp_path / "scan_seg.nii.gz"),
                                 "--slice", "0", "--level", "L4/L5", "--out", str(out)])
    assert args.func(args) == 0
    with out.open(newline="") as fh:
        header = next(csv.reader(fh))
    table = [scene.csv_header(c) for c in scene.CSV_COLUMNS]
    assert header[: len(table)] == table and header[len(table):] == ["Pixel count", "Mean intensity", "SD intensity", "Segmentation"]
    rows = _read_csv(out)
    assert {r["volume"] for r in rows} == {"scan"} and {r["level"] for r in rows} == {"L4/L5"}
    assert [r["segment_id"] for r in rows] == [st.key for st in anatomy.STRUCTURES]
    assert all(r["pixel_count"].isdigit() for r in rows)


def test_measure_single_slice_and_errors(tmp_path, capsys):
    img, lab = _volume_and_labels(1)
    _write(img, tmp_path / "v.nii.gz")
    _write(lab, tmp_path / "l.nii.gz")
    p = _parser()
    args = p.parse_args(["measure", str(tmp_path / "v.nii.gz"), str(tmp_path / "l.nii.gz"), "--slice", "1", "--out", str(tmp_path / "o.csv")])
    assert args.func(args) == 0
    assert {r["slice"] for r in _read_csv(tmp_path / "o.csv")} == {"1"}
    args = p.parse_args(["measure", str(tmp_path / "v.nii.gz"), str(tmp_path / "l.nii.gz"), "--slice", "7", "--out", str(tmp_path / "e.csv")])
    assert args.func(args) == 2 and "out of range" in capsys.readouterr().err
    args = p.parse_args(["measure", str(tmp_path / "v.nii.gz"), str(tmp_path / "l.nii.gz"), "--method", "kmeans", "--out", str(tmp_path / "e.csv")])
    assert args.func(args) == 2
    args = p.parse_args(["measure", str(tmp_path / "nope.nii.gz"), str(tmp_path / "l.nii.gz"), "--out", str(tmp_path / "e.csv")])
    assert args.func(args) == 2 and "no such file or folder: " in capsys.readouterr().err  # volume_io's message
    with pytest.raises(SystemExit):
        p.parse_args(["measure", "a", "b"])  # --out is required


def test_measure_seg_nrrd_layers_and_cropped_extent(tmp_path):
    """A Slicer-style .seg.nrrd: two layers, segment IDs = anatomy keys, cropped to the segments' extent."""
    img, lab = _volume_and_labels(2)
    _write(img, tmp_path / "v.nrrd")
    # crop: slices 0..1, rows 4..55, cols 2..47 → origin moves by the offset × spacing
    k0, j0, i0 = 0, 4, 2
    crop = lab[k0:2, j0:56, i0:48]
    layer0 = np.zeros_like(crop)
    layer1 = np.zeros_like(crop)
    segs = []
    for n, st in enumerate(s for s in anatomy.STRUCTURES if (crop == s.value).any()):
        layer = n % 2  # spread the segments over two layers with their own label values
        value = 10 + n
        (layer0 if layer == 0 else layer1)[crop == st.value] = value
        segs.append((st.key, st.name, layer, value))
    segs.append(("Segment_extra", "ruler", 0, 99))  # not one of the nine: skipped with a note
    stacked = np.stack([layer0, layer1], axis=-1)
    seg = sitk.GetImageFromArray(stacked, isVector=True)
    seg.SetSpacing(SPACING_XYZ)
    origin = (10.0, -20.0, 5.0)
    seg.SetOrigin((origin[0] + i0 * SPACING_XYZ[0], origin[1] + j0 * SPACING_XYZ[1], origin[2] + k0 * SPACING_XYZ[2]))
    for n, (sid, name, layer, value) in enumerate(segs):
        seg.SetMetaData(f"Segment{n}_ID", sid)
        seg.SetMetaData(f"Segment{n}_Name", name)
        seg.SetMetaData(f"Segment{n}_Layer", str(layer))
        seg.SetMetaData(f"Segment{n}_LabelValue", str(value))
    sitk.WriteImage(seg, str(tmp_path / "s.seg.nrrd"))

    volume = sitk.ReadImage(str(tmp_path / "v.nrrd"))
    labels, notes = cli_measure.read_segmentation(tmp_path / "s.seg.nrrd", volume)
    assert np.array_equal(labels, lab)
    assert any("Segment_extra" in n for n in notes)

    out = tmp_path / "seg.csv"
    args = _parser().parse_args(["measure", str(tmp_path / "v.nrrd"), str(tmp_path / "s.seg.nrrd"), "--out", str(out)])
    assert args.func(args) == 0
    rows = _read_csv(out)
    for k in (0, 1):
        for e, g in zip(_expected(img, lab, k, volume_path=tmp_path / "v.nrrd"), [r for r in rows if r["slice"] == str(k)]):
            assert g["segment_id"] == e.key
            if e.fat_percent is not None:
                assert float(g["fat_percent"]) == pytest.approx(e.fat_percent)


def test_measure_slicer_4d_seg_nrrd_header(tmp_path):
    """The layout Slicer's vtkMRMLSegmentationStorageNode writes (checked with slicer-core 5.13): a 4-D NRRD,
    ``kinds: list domain domain domain``, LPS space, ``SegmentN_ID/LabelValue/Layer`` keys, one layer per
    group of non-overlapping segments, extent cropped. Written by hand here so the test needs no Slicer."""
    img, lab = _volume_and_labels(3)
    _write(img, tmp_path / "v.nrrd", origin=(-10.0, -20.0, 5.0))
    k0, j0, i0 = 0, 4, 2
    crop = lab[k0:2, j0:56, i0:48]
    data = np.zeros((crop.shape[0], crop.shape[1], crop.shape[2], 2), np.uint8)  # (k, j, i, layer)
    data[..., 0][crop == 6] = 1
    data[..., 0][crop == 8] = 2
    data[..., 1][crop == 9] = 1
    data[..., 1][crop == 1] = 3
    segs = [("multifidus_left", 1, 0), ("erector_spinae_left", 2, 0), ("erector_spinae_right", 1, 1), ("intervertebral_disc", 3, 1)]
    ox, oy, oz = -10.0 + i0 * SPACING_XYZ[0], -20.0 + j0 * SPACING_XYZ[1], 5.0 + k0 * SPACING_XYZ[2]
    header = [
        "NRRD0004",
        "type: unsigned char",
        "dimension: 4",
        "space: left-posterior-superior",
        f"sizes: 2 {crop.shape[2]} {crop.shape[1]} {crop.shape[0]}",
        f"space directions: none ({SPACING_XYZ[0]},0,0) (0,{SPACING_XYZ[1]},0) (0,0,{SPACING_XYZ[2]})",
        "kinds: list domain domain domain",
        "encoding: raw",
        f"space origin: ({ox},{oy},{oz})",
    ]
    for n, (sid, value, layer) in enumerate(segs):
        header += [f"Segment{n}_ID:={sid}", f"Segment{n}_Name:={sid}", f"Segment{n}_LabelValue:={value}", f"Segment{n}_Layer:={layer}"]
    path = tmp_path / "hand.seg.nrrd"
    path.write_bytes(("\n".join(header) + "\n\n").encode() + data.tobytes())  # layer index fastest, as NRRD

    volume = sitk.ReadImage(str(tmp_path / "v.nrrd"))
    labels, notes = cli_measure.read_segmentation(path, volume)
    expected = np.where(np.isin(lab, (1, 6, 8, 9)), lab, 0)
    assert not notes and np.array_equal(labels, expected)


def test_measure_csv_has_the_qc_column_and_flags_a_swapped_muscle(tmp_path):
    from test_qc import image_for, phantom  # a plausible disc-level layout, rows posterior, columns patient left

    lab = phantom()
    img = image_for(lab)
    swapped = lab.copy()
    swapped[lab == 6], swapped[lab == 8] = 8, 6  # left multifidus and left erector spinae swapped
    for name, arr in (("v", img.astype(np.float32)), ("seg", lab), ("swapped", swapped)):
        im = sitk.GetImageFromArray(arr[None])  # identity direction: j → posterior, i → patient left
        sitk.WriteImage(im, str(tmp_path / f"{name}.nrrd"))
    for name in ("seg", "swapped"):
        args = _parser().parse_args(["measure", str(tmp_path / "v.nrrd"), str(tmp_path / f"{name}.nrrd"),
                                     "--slice", "0", "--out", str(tmp_path / f"{name}.csv")])
        assert args.func(args) == 0
    with (tmp_path / "seg.csv").open(newline="") as fh:
        assert "QC" in next(csv.reader(fh))
    ok = {r["segment_id"]: r["qc"] for r in _read_csv(tmp_path / "seg.csv")}
    bad = {r["segment_id"]: r["qc"] for r in _read_csv(tmp_path / "swapped.csv")}
    assert set(ok.values()) == {"ok"}
    assert "multifidus lateral to the erector spinae" in bad["multifidus_left"]
    assert bad["multifidus_right"] == "ok"
