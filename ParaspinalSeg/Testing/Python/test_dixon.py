"""Dixon fat fraction: per-muscle mean F/(W+F) against a direct computation on synthetic water/fat images,
the noise floor, images on other grids (sampled or refused), fat-fraction maps, the ``measure`` command's
column, and the TUM01 water/fat pairs (skipped without ../shared/data)."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from ParaspinalSegLib import anatomy
from ParaspinalSegLib.dixon import (
    NOISE_FLOOR_FRACTION,
    DixonImage,
    DixonSource,
    dixon_source_from_volumes,
    sample_onto_slice,
)
from ParaspinalSegLib.errors import InputError
from ParaspinalSegLib.measurements import measure_slice
from ParaspinalSegLib.preprocessing import slice_geometry_from_volume

DATA = Path(__file__).resolve().parents[3].parent / "shared" / "data" / "myosegmentum_lpm"
MUSCLES = anatomy.MUSCLE_VALUES


def lps_matrix(spacing=(0.8, 0.8, 4.0), origin=(100.0, 120.0, -30.0)) -> np.ndarray:
    """IJK-to-RAS of an ITK-identity (LPS) volume: i → patient left, j → posterior, k → superior."""
    m = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])
    m[:3, 3] = origin
    return m


def synthetic(seed=0, shape=(3, 64, 80)):
    """Body of fat-free tissue with six muscle blocks of known fat fraction, air around it (noise only)."""
    rng = np.random.default_rng(seed)
    k, n0, n1 = shape
    labels = np.zeros(shape, np.uint8)
    truth = {}
    for idx, v in enumerate(MUSCLES):
        r, c = 8 + 18 * (idx // 3), 6 + 24 * (idx % 3)
        labels[:, r:r + 14, c:c + 20] = v
        truth[v] = 0.05 + 0.08 * idx
    ff = np.zeros(shape)
    for v, f in truth.items():
        ff[labels == v] = f
    body = np.zeros(shape, bool)
    body[:, 4:n0 - 4, 2:n1 - 2] = True
    signal = np.where(body, 1000.0, 0.0)
    water = signal * (1 - ff) + np.abs(rng.normal(0, 15, shape))
    fat = signal * ff + np.abs(rng.normal(0, 15, shape))
    return water, fat, labels, truth


def direct_percent(water, fat, labels, value, floor):
    """The definition itself: mean of F/(W+F) over the structure's pixels with W+F >= floor, in %."""
    total = water + fat
    keep = (labels == value) & (total >= floor)
    return 100.0 * float(np.mean(fat[keep] / total[keep]))


def test_dixon_fat_fraction_equals_direct_computation():
    water, fat, labels, truth = synthetic()
    m = lps_matrix()
    src = DixonSource(DixonImage(water, m, "W"), DixonImage(fat, m, "F"))
    for k in range(labels.shape[0]):
        geom = slice_geometry_from_volume(m, k)
        sff = src.fraction_map(labels[k].shape, geom)
        assert not sff.resampled
        floor = NOISE_FLOOR_FRACTION * np.percentile(water[k] + fat[k], 99)
        assert sff.noise_floor == pytest.approx(floor)
        rows = {r.value: r for r in measure_slice(water[k] + fat[k], labels[k], (0.8, 0.8), fat_fraction=sff.fraction)}
        for v in MUSCLES:
            expected = direct_percent(water[k], fat[k], labels[k], v, floor)
            assert rows[v].dixon_fat_fraction_percent == pytest.approx(expected, abs=1e-9)
            assert rows[v].dixon_fat_fraction_percent == pytest.approx(100 * truth[v], abs=1.5)
        assert all(rows[v].dixon_fat_fraction_percent is None for v in rows if v not in MUSCLES)


def test_noise_floor_leaves_out_pixels_at_noise_level():
    water, fat, labels, truth = synthetic(seed=1)
    m = lps_matrix()
    # a signal void inside the left multifidus: its ratio is pure noise (about 0.5)
    void = (labels[0] == 6) & (np.arange(labels.shape[2])[None, :] % 2 == 0)
    water[0][void] = np.abs(np.random.default_rng(2).normal(0, 15, void.sum()))
    fat[0][void] = np.abs(np.random.default_rng(3).normal(0, 15, void.sum()))
    geom = slice_geometry_from_volume(m, 0)
    with_floor = DixonSource(DixonImage(water, m), DixonImage(fat, m)).fraction_map(labels[0].shape, geom)
    no_floor = DixonSource(DixonImage(water, m), DixonImage(fat, m), noise_floor=0.0).fraction_map(labels[0].shape, geom)
    assert np.isnan(with_floor.fraction[void]).mean() > 0.95  # noise W+F rarely reaches 5 % of the bright end
    mf = labels[0] == 6
    tissue = mf & ~void
    tissue_mean = float(np.mean(fat[0][tissue] / (water[0] + fat[0])[tissue]))
    assert tissue_mean == pytest.approx(truth[6], abs=0.02)
    assert np.nanmean(with_floor.fraction[mf]) == pytest.approx(tissue_mean, abs=0.02)
    assert np.nanmean(no_floor.fraction[mf]) > tissue_mean + 0.1  # the void's noise drags the mean toward 0.5
    with pytest.raises(InputError, match="noise floor"):
        DixonSource(DixonImage(water, m), DixonImage(fat, m), noise_floor=-1.0)


def test_images_stored_another_way_on_the_same_grid_give_the_same_values():
    """A Dixon image stored with flipped/transposed axes (same voxels in space) samples exactly."""
    water, fat, labels, _ = synthetic(seed=4)
    m = lps_matrix()
    geom = slice_geometry_from_volume(m, 1)
    direct = DixonSource(DixonImage(water, m), DixonImage(fat, m)).fraction_map(labels[1].shape, geom)
    # flip i and j in storage: voxel (i, j) moves to (n-1-i, n-1-j), the matrix compensates
    n_i, n_j = water.shape[2], water.shape[1]
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    flip[0, 3], flip[1, 3] = n_i - 1, n_j - 1
    m_flipped = m @ flip
    flipped = DixonSource(DixonImage(water[:, ::-1, ::-1].copy(), m_flipped), DixonImage(fat[:, ::-1, ::-1].copy(), m_flipped))
    res = flipped.fraction_map(labels[1].shape, geom)
    assert res.resampled
    np.testing.assert_allclose(res.fraction, direct.fraction, atol=1e-9, equal_nan=True)


def test_images_on_a_coarser_grid_are_interpolated_and_disjoint_images_refused():
    water, fat, labels, truth = synthetic(seed=5)
    m = lps_matrix()
    # the same anatomy sampled on a grid of twice the pixel size (every other voxel)
    m2 = m.copy()
    m2[:3, 0] *= 2
    m2[:3, 1] *= 2
    src = DixonSource(DixonImage(water[:, ::2, ::2].copy(), m2), DixonImage(fat[:, ::2, ::2].copy(), m2))
    geom = slice_geometry_from_volume(m, 0)
    res = src.fraction_map(labels[0].shape, geom)
    assert res.resampled
    pct = res.percent_per_structure(labels[0], MUSCLES)
    for v in MUSCLES:
        assert pct[v] == pytest.approx(100 * truth[v], abs=3.0)  # edges blur a little
    far = m.copy()
    far[:3, 3] += (0, 0, 500.0)  # 500 mm above: no overlap
    with pytest.raises(InputError, match="does not overlap"):
        DixonSource(DixonImage(water, far), DixonImage(fat, far)).fraction_map(labels[0].shape, geom)


def test_fat_fraction_map_in_fraction_or_percent():
    water, fat, labels, _ = synthetic(seed=6)
    m = lps_matrix()
    geom = slice_geometry_from_volume(m, 2)
    src = DixonSource(DixonImage(water, m), DixonImage(fat, m))
    pair = src.fraction_map(labels[2].shape, geom)
    ff = np.stack([src.fraction_map(labels[k].shape, slice_geometry_from_volume(m, k)).fraction for k in range(3)])
    as_fraction = DixonSource(fat_fraction_map=DixonImage(ff, m)).fraction_map(labels[2].shape, geom)
    as_percent = DixonSource(fat_fraction_map=DixonImage(100 * ff, m)).fraction_map(labels[2].shape, geom)
    assert as_percent.source == "map in percent" and as_fraction.source == "map"
    a = as_fraction.percent_per_structure(labels[2], MUSCLES)
    b = as_percent.percent_per_structure(labels[2], MUSCLES)
    c = pair.percent_per_structure(labels[2], MUSCLES)
    for v in MUSCLES:
        assert a[v] == pytest.approx(c[v]) and b[v] == pytest.approx(c[v])
    with pytest.raises(InputError, match="a Dixon water image without a fat image: the fat fraction needs both"):
        DixonSource(water=DixonImage(water, m))
    with pytest.raises(InputError, match="not both"):
        DixonSource(DixonImage(water, m), DixonImage(fat, m), DixonImage(ff, m))


def _write_nifti(array_kji: np.ndarray, matrix: np.ndarray, path: Path) -> None:
    from ParaspinalSegLib.volume_io import volume_from_array, write_scalar_volume

    write_scalar_volume(array_kji, volume_from_array(array_kji, matrix, name=path.name), path)


def test_measure_command_writes_the_dixon_column(tmp_path):
    from ParaspinalSegLib.cli import main
    from ParaspinalSegLib.volume_io import volume_from_array, write_label_volume

    water, fat, labels, _ = synthetic(seed=7)
    m = lps_matrix()
    _write_nifti((water + fat).astype(np.float32), m, tmp_path / "ip.nii.gz")
    _write_nifti(water.astype(np.float32), m, tmp_path / "w.nii.gz")
    _write_nifti(fat.astype(np.float32), m, tmp_path / "f.nii.gz")
    write_label_volume(labels, volume_from_array(labels, m), tmp_path / "lab.nii.gz")
    out = tmp_path / "m.csv"
    rc = main(["measure", str(tmp_path / "ip.nii.gz"), str(tmp_path / "lab.nii.gz"), "--water-image",
               str(tmp_path / "w.nii.gz"), "--fat-image", str(tmp_path / "f.nii.gz"), "--out", str(out)])
    assert rc == 0
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3 * len(anatomy.STRUCTURES)
    w32, f32 = water.astype(np.float32).astype(float), fat.astype(np.float32).astype(float)
    for row in rows:
        k, value = int(row["Slice"]), anatomy.BY_KEY[row["Segment ID"]].value
        assert float(row["Position (mm)"]) == pytest.approx(m[2, 3] + 4.0 * k)
        if value in MUSCLES:
            floor = NOISE_FLOOR_FRACTION * np.percentile(w32[k] + f32[k], 99)
            assert float(row["Dixon fat fraction (%)"]) == pytest.approx(direct_percent(w32[k], f32[k], labels[k], value, floor), abs=1e-6)
        else:
            assert row["Dixon fat fraction (%)"] == ""
    # a fat image alone is refused with one line, exit status 2, nothing written
    out2 = tmp_path / "m2.csv"
    assert main(["measure", str(tmp_path / "ip.nii.gz"), str(tmp_path / "lab.nii.gz"), "--fat-image",
                 str(tmp_path / "f.nii.gz"), "--out", str(out2)]) == 2
    assert not out2.exists()


@pytest.mark.skipif(not DATA.is_dir(), reason="needs ../shared/data/myosegmentum_lpm (TUM01 water/fat pairs)")
def test_tum01_dixon_fat_fraction_within_a_tenth_of_a_point(tmp_path):
    """TUM01 slices, labelled muscles: ``measure --water-image --fat-image`` equals mean F/(W+F) computed here
    from the files read with nibabel (an independent reader), within 0.1 points."""
    nib = pytest.importorskip("nibabel")
    from ParaspinalSegLib.cli import main

    worst, n = 0.0, 0
    for k in range(0, 29, 7):
        img, fat_path, lbl = (DATA / f"TUM01_z{k:02d}_{s}.nii.gz" for s in ("img", "fat", "lbl"))
        out = tmp_path / f"z{k}.csv"
        assert main(["measure", str(img), str(lbl), "--water-image", str(img), "--fat-image", str(fat_path),
                     "--out", str(out)]) == 0
        with open(out, newline="") as f:
            rows = {anatomy.BY_KEY[r["Segment ID"]].value: r for r in csv.DictReader(f)}
        w = np.asarray(nib.load(img).dataobj, dtype=float)[:, :, 0]
        fat = np.asarray(nib.load(fat_path).dataobj, dtype=float)[:, :, 0]
        labels = np.asarray(nib.load(lbl).dataobj)[:, :, 0]
        floor = NOISE_FLOOR_FRACTION * np.percentile(w + fat, 99)
        for v in (6, 7, 8, 9):
            expected = direct_percent(w, fat, labels, v, floor)
            assert 0.0 < expected < 60.0
            worst = max(worst, abs(float(rows[v]["Dixon fat fraction (%)"]) - expected))
            n += 1
    assert n == 20 and worst < 0.1, worst


@pytest.mark.skipif(not DATA.is_dir(), reason="needs ../shared/data/myosegmentum_lpm (TUM01 water/fat pairs)")
def test_segment_refuses_dixon_images_that_meet_the_slice_beside_the_muscles(tmp_path, capsys):
    """``segment`` with water/fat images that overlap the slice only in a 20-row strip at its anterior edge
    (the muscles lie 170 rows further back): one line, exit 2, no output folder, rather than an empty
    Dixon column. The shipped model finds the muscles; the check is the one ``measure`` runs."""
    pytest.importorskip("torch")
    sitk = pytest.importorskip("SimpleITK")
    from ParaspinalSegLib.cli import main

    img = DATA / "TUM01_z10_img.nii.gz"
    strips = []
    for name, path in (("w", img), ("f", DATA / "TUM01_z10_fat.nii.gz")):
        strip = tmp_path / f"strip_{name}.nii.gz"
        sitk.WriteImage(sitk.ReadImage(str(path))[:, :20, :], str(strip))  # rows j 0-19, origin kept
        strips.append(strip)
    out = tmp_path / "out"
    code = main(["segment", str(img), "--water-image", str(strips[0]), "--fat-image", str(strips[1]),
                 "--device", "cpu", "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("paraspinalseg: error: none of the ") and (
        "muscle pixels of the segmented slice lie inside the water and fat images ('strip_w', 'strip_f')") in err[0], err
    assert not out.exists()
