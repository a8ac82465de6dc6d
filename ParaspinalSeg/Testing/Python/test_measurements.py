"""Measurements (CSA, functional CSA, fat %, asymmetry) on synthetic slices with known answers, and the
fat-validation helpers on a synthetic water/fat pair (plus a smoke run on myosegmentum_lpm when present)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from ParaspinalSegLib import anatomy
from ParaspinalSegLib import fat_validation as fv
from ParaspinalSegLib.measurements import (
    asymmetry,
    fat_threshold,
    fit_gaussian_mixture2,
    measure_slice,
    otsu_threshold,
)

LEAN, FAT, DISC = 300.0, 900.0, 1000.0
#: Muscle rectangles in mm (row0, col0, height, width): edges fall on pixel boundaries for every spacing
#: used below, so the true CSA is exactly height × width.
RECTS_MM = {
    4: (12.0, 12.0, 18.0, 24.0),
    5: (12.0, 60.0, 18.0, 24.0),
    6: (42.0, 30.0, 18.0, 12.0),
    7: (42.0, 54.0, 18.0, 12.0),
    8: (66.0, 12.0, 18.0, 24.0),
    9: (66.0, 60.0, 18.0, 24.0),
}
SPACINGS = [(1.0, 1.0), (0.75, 1.2), (1.5, 0.6), (0.6, 1.5)]


def phantom(
    spacing: tuple[float, float],
    fat_percent: dict[int, float],
    noise_sd: float = 40.0,
    seed: int = 0,
    surrounding: float = FAT,
    fov_mm: float = 96.0,
) -> tuple[np.ndarray, np.ndarray, dict[int, float], dict[int, float]]:
    """Body of ``surrounding`` tissue (fat by default) in air, a bright disc, six rectangular muscles with
    exactly round(f·n) randomly placed fat pixels. Returns image, labels, true CSA (mm²), true fat %."""
    rng = np.random.default_rng(seed)
    s0, s1 = spacing
    n0, n1 = int(round(fov_mm / s0)), int(round(fov_mm / s1))
    r_mm = (np.arange(n0) + 0.5) * s0
    c_mm = (np.arange(n1) + 0.5) * s1
    rr, cc = np.meshgrid(r_mm, c_mm, indexing="ij")
    body = ((rr - 48) / 46) ** 2 + ((cc - 48) / 46) ** 2 <= 1
    image = np.where(body, surrounding, 0.0)
    labels = np.zeros((n0, n1), dtype=np.uint8)
    disc = ((rr - 36) / 4) ** 2 + ((cc - 48) / 8) ** 2 <= 1
    labels[disc] = 1
    image[disc] = DISC
    true_csa, true_fat = {}, {}
    for v, (r0, c0, h, w) in RECTS_MM.items():
        rows = slice(int(round(r0 / s0)), int(round((r0 + h) / s0)))
        cols = slice(int(round(c0 / s1)), int(round((c0 + w) / s1)))
        labels[rows, cols] = v
        idx = np.argwhere(labels == v)
        image[labels == v] = LEAN
        n_fat = int(round(fat_percent.get(v, 0.0) / 100 * len(idx)))
        pick = idx[rng.choice(len(idx), n_fat, replace=False)]
        image[pick[:, 0], pick[:, 1]] = FAT
        true_csa[v] = h * w
        true_fat[v] = 100.0 * n_fat / len(idx)
    image = image + rng.normal(0.0, noise_sd, image.shape)
    return image, labels, true_csa, true_fat


FATS = {4: 0.0, 5: 3.0, 6: 8.0, 7: 15.0, 8: 25.0, 9: 40.0}


@pytest.mark.parametrize("spacing", SPACINGS)
def test_csa_and_auto_fat_percent_known_phantom(spacing):
    image, labels, true_csa, true_fat = phantom(spacing, FATS, noise_sd=60.0, seed=1)
    rows = {r.value: r for r in measure_slice(image, labels, spacing, "auto")}
    assert [r.value for r in measure_slice(image, labels, spacing)] == list(range(1, 10))
    for v in RECTS_MM:
        r = rows[v]
        assert r.found and r.method == "auto-gmm"
        assert r.csa_mm2 == pytest.approx(true_csa[v], rel=0.01)
        assert abs(r.fat_percent - true_fat[v]) <= 2.0, (v, r.fat_percent, true_fat[v])
        assert r.functional_csa_mm2 == pytest.approx(r.csa_mm2 * (1 - r.fat_percent / 100))
        assert LEAN < r.threshold < FAT
    # the disc is measured for area only; canal and lamina are absent → explicit not-found rows
    assert rows[1].found and rows[1].fat_percent is None and rows[1].functional_csa_mm2 is None
    assert rows[1].csa_mm2 == pytest.approx(labels.__eq__(1).sum() * spacing[0] * spacing[1])
    for v in (2, 3):
        assert not rows[v].found and rows[v].csa_mm2 is None and rows[v].fat_percent is None
        assert rows[v].pixel_count == 0 and rows[v].mean_intensity is None


def test_csa_of_ellipse_non_square_pixels_within_one_percent():
    s0, s1 = 0.45, 0.8
    n0, n1 = int(60 / s0), int(60 / s1)
    rr, cc = np.meshgrid((np.arange(n0) + 0.5) * s0, (np.arange(n1) + 0.5) * s1, indexing="ij")
    a, b = 20.0, 13.0  # semi-axes in mm
    labels = (((rr - 30) / a) ** 2 + ((cc - 30) / b) ** 2 <= 1).astype(np.uint8) * 6
    image = np.full(labels.shape, LEAN)
    row = measure_slice(image, labels, (s0, s1), 500.0, structures=[6])[0]
    assert row.csa_mm2 == pytest.approx(math.pi * a * b, rel=0.01)
    # swapping the spacing axes would be wrong by far more than 1 %
    assert labels.astype(bool).sum() * s0 * s0 != pytest.approx(math.pi * a * b, rel=0.05)


@pytest.mark.parametrize("spacing", [(1.0, 1.0), (0.75, 1.2)])
def test_lean_muscle_gets_no_invented_fat_with_auto_but_does_with_otsu(spacing):
    image, labels, _, _ = phantom(spacing, {}, noise_sd=40.0, seed=2)
    auto = [r for r in measure_slice(image, labels, spacing, "auto") if r.value in anatomy.MUSCLE_VALUES]
    assert all(r.fat_percent <= 2.0 for r in auto), [r.fat_percent for r in auto]
    otsu = [r for r in measure_slice(image, labels, spacing, "otsu") if r.value in anatomy.MUSCLE_VALUES]
    # the known pitfall: Otsu inside one lean muscle always splits it into two classes
    assert all(r.fat_percent > 20.0 for r in otsu)
    assert all(r.method == "otsu" for r in otsu)
    assert len({round(r.threshold, 6) for r in otsu}) == 6  # one threshold per muscle


def test_auto_falls_back_without_a_fat_population():
    # body of lean tissue: nothing around the muscles is fat, so no fat class can be learnt
    image, labels, _, _ = phantom((1.0, 1.0), {}, noise_sd=30.0, seed=3, surrounding=LEAN)
    res = fat_threshold(image, labels, "auto", spacing_mm=(1.0, 1.0))
    assert res.method == "auto-lean+3sd" and "warning" in res.details
    rows = measure_slice(image, labels, (1.0, 1.0), "auto", structures=[6, 7, 8, 9])
    assert all(r.fat_percent <= 2.0 for r in rows)


def test_scaling_and_offset_leave_fat_percent_unchanged():
    spacing = (0.75, 1.2)
    image, labels, _, _ = phantom(spacing, FATS, noise_sd=80.0, seed=4)
    for method in ("auto", "otsu", "otsu-region"):
        base = measure_slice(image, labels, spacing, method)
        for scale, offset in ((3.7, 150.0), (0.01, -2.0), (1.0, 1e4)):
            other = measure_slice(image * scale + offset, labels, spacing, method)
            for a, b in zip(base, other):
                assert a.fat_percent == b.fat_percent, (method, a.key, a.fat_percent, b.fat_percent)
                assert a.csa_mm2 == b.csa_mm2 and a.method == b.method
                if a.threshold is not None:
                    assert b.threshold == pytest.approx(a.threshold * scale + offset, rel=1e-6, abs=1e-6 * scale)


SCALES = (1e-6, 1e-3, 3.7, 1e3, 1e6, 1e10, 1e15, 1e20, 1e30)
OFFSETS = (2e9, -2e9, 123456789.0)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("case", ["fat around the muscles", "lean body (fallback)"])
def test_auto_threshold_is_invariant_from_1e_minus_6_to_1e30_and_offsets_of_2e9(seed, case):
    """Scaled ×1e-6 … ×1e30 (float64) or offset by ±2e9 (int32, int64, float64): the same pixels are fat, the
    method is the same, and the threshold moves with the intensities to 1e-9. The mixture's boundary once had a
    scale-dependent test (×1e10 fell back to lean+3SD, fat % doubled) and lost digits at large offsets. Both an
    integer image (many pixels exactly on histogram edges and on the lower cutoff) and a continuous one."""
    spacing = SPACINGS[seed % len(SPACINGS)]
    surrounding = FAT if case.startswith("fat") else LEAN
    continuous, labels, _, _ = phantom(spacing, FATS if surrounding == FAT else {}, noise_sd=60.0, seed=20 + seed,
                                       surrounding=surrounding)
    integer = np.round(continuous - continuous.min()).astype(np.int64)
    expected = "auto-gmm" if surrounding == FAT else "auto-lean+3sd"

    def muscles(image):
        return [r for r in measure_slice(image, labels, spacing, "auto") if r.value in anatomy.MUSCLE_VALUES]

    def same(base, other, scale, offset, what):
        for a, b in zip(base, other):
            assert (b.method, b.fat_percent) == (a.method, a.fat_percent), (what, a.key)
            assert abs((b.threshold - offset) / scale - a.threshold) <= 1e-9 * abs(a.threshold), (what, a.key)

    for name, image in (("continuous", continuous), ("integer", integer.astype(np.float64))):
        base = muscles(image)
        assert {r.method for r in base} == {expected} and all(r.fat_percent is not None for r in base)
        for scale in SCALES:
            same(base, muscles(image * scale), scale, 0.0, f"{name} x{scale:g}")
    base = muscles(integer)
    for offset in OFFSETS:
        for dtype in (np.int32, np.int64, np.float64):
            same(base, muscles((integer + int(offset)).astype(dtype)), 1.0, offset, f"{dtype.__name__} {offset:+g}")


def test_manual_threshold_and_unknown_method():
    image, labels, _, true_fat = phantom((1.0, 1.0), FATS, noise_sd=10.0, seed=5)
    for value in (600.0, "600"):
        rows = measure_slice(image, labels, (1.0, 1.0), value, structures=[9])
        assert rows[0].method == "manual" and rows[0].threshold == 600.0
        assert rows[0].fat_percent == pytest.approx(true_fat[9])
    with pytest.raises(ValueError, match="unknown fat threshold method"):
        measure_slice(image, labels, (1.0, 1.0), "kmeans")


def test_empty_and_missing_structures_are_explicit_not_found_rows():
    image = np.random.default_rng(0).normal(300, 10, (32, 40))
    rows = measure_slice(image, np.zeros((32, 40), np.uint8), (1.0, 1.0), "auto")
    assert len(rows) == 9 and not any(r.found for r in rows)
    assert all(r.csa_mm2 is None and r.fat_percent is None and r.threshold is None for r in rows)
    labels = np.zeros((32, 40), np.uint8)
    labels[5:15, 5:15] = 6
    labels[20:25, 20:25] = 255  # not annotated: never measured
    rows = {r.key: r for r in measure_slice(image, labels, (1.0, 1.0), "auto", structures=["multifidus_left", "psoas_major_right"])}
    assert rows["multifidus_left"].found and rows["multifidus_left"].pixel_count == 100
    assert not rows["psoas_major_right"].found and rows["psoas_major_right"].fat_percent is None
    with pytest.raises(ValueError):
        measure_slice(image, labels[:-1], (1.0, 1.0))
    with pytest.raises(ValueError):
        measure_slice(image, labels, (0.0, 1.0))


def test_asymmetry_known_values():
    s = (0.5, 0.8)
    labels = np.zeros((80, 80), np.uint8)
    labels[0:20, 0:20] = 6  # 400 px
    labels[0:20, 40:50] = 7  # 200 px
    labels[40:60, 0:30] = 8  # 600 px
    labels[40:60, 40:70] = 9  # 600 px
    labels[70:75, 0:10] = 4  # psoas left only
    image = np.full(labels.shape, LEAN)
    image[0:10, 0:20] = FAT  # half of left multifidus is fat
    recs = measure_slice(image, labels, s, 600.0)
    by = {a.key: a for a in asymmetry(recs)}
    assert set(by) == {"psoas_major", "multifidus", "erector_spinae", "multifidus_erector_spinae"}
    mf = by["multifidus"]
    assert mf.found and mf.csa_asymmetry_percent == pytest.approx(100 * (400 - 200) / 300)
    assert mf.functional_csa_asymmetry_percent == pytest.approx(0.0)
    assert mf.fat_percent_difference == pytest.approx(50.0)
    assert by["erector_spinae"].csa_asymmetry_percent == pytest.approx(0.0)
    both = by["multifidus_erector_spinae"]
    assert both.left_csa_mm2 == pytest.approx(1000 * 0.4) and both.right_csa_mm2 == pytest.approx(800 * 0.4)
    assert both.csa_asymmetry_percent == pytest.approx(100 * 200 / 900)
    assert both.left_fat_percent == pytest.approx(20.0)
    ps = by["psoas_major"]
    assert not ps.found and ps.csa_asymmetry_percent is None and ps.left_csa_mm2 == pytest.approx(50 * 0.4)


def test_otsu_and_gmm_on_known_mixture():
    rng = np.random.default_rng(7)
    x = np.concatenate([rng.normal(100, 10, 7000), rng.normal(400, 30, 3000)])
    g = fit_gaussian_mixture2(x)
    assert g.means == pytest.approx([100, 400], rel=0.02)
    assert g.sds == pytest.approx([10, 30], rel=0.08)
    assert g.weights == pytest.approx([0.7, 0.3], abs=0.01)
    b = g.decision_boundary()
    assert 130 < b < 200
    t = otsu_threshold(x)  # anywhere in the empty gap maximises the between-class variance
    assert (x[:7000] > t).mean() < 0.01 and (x[7000:] > t).mean() > 0.99
    assert otsu_threshold(np.full(10, 5.0)) == 5.0


# ---------------------------------------------------------------------------------------------- validation


def test_agreement_known_r_and_bias():
    ref = np.array([5.0, 8.0, 12.0, 20.0, 30.0])
    ag = fv.agreement(ref + 2.0, ref)
    assert ag.n == 5 and ag.r == pytest.approx(1.0) and ag.bias == pytest.approx(2.0) and ag.sd == pytest.approx(0.0)
    d = np.array([1.0, -1.0, 1.0, -1.0, 0.0])
    ag = fv.agreement(ref + d, ref)
    assert ag.bias == pytest.approx(0.0) and ag.sd == pytest.approx(d.std(ddof=1))
    assert ag.loa_high == pytest.approx(1.96 * d.std(ddof=1))
    assert ag.r == pytest.approx(np.corrcoef(ref + d, ref)[0, 1])
    assert fv.agreement([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]).r is None


def _water_fat_slice(fracs: dict[int, float], seed: int) -> fv.SliceData:
    """Water/fat pair whose muscle pixels are pure lean (water 300) or pure fat (fat 900), in fat."""
    image, labels, _, true_fat = phantom((1.0, 1.0), fracs, noise_sd=0.0, seed=seed)
    labels = np.where(np.isin(labels, (6, 7, 8, 9)), labels, 0).astype(np.uint8)
    fat_px = image >= FAT - 1
    water = np.where(fat_px | (image == 0), 0.0, image)
    fat = np.where(fat_px, image, 0.0)
    return fv.SliceData("synthetic", water, fat, labels, (1.0, 1.0))


def test_validation_on_synthetic_water_fat_pair():
    sl = _water_fat_slice({6: 10.0, 7: 20.0, 8: 30.0, 9: 5.0}, seed=8)
    assert np.allclose(fv.in_phase(sl.water, sl.fat), sl.water + sl.fat)
    m = sl.labels == 7
    assert fv.reference_fat_fraction(sl.water, sl.fat, m) == pytest.approx(20.0, abs=0.5)
    assert fv.reference_fat_fraction(sl.water, sl.fat, np.zeros_like(m)) is None
    assert fv.reference_fat_fraction(np.array([[90.0]]), np.array([[10.0]]), np.array([[True]])) == pytest.approx(10.0)
    slices = [sl, _water_fat_slice({6: 2.0, 7: 35.0, 8: 12.0, 9: 25.0}, seed=9)]
    rows = fv.measure_all(slices, methods=("auto", "manual-midpoint"))
    assert len(rows) == 16
    summary = {(s["method"], s["structure"]): s for s in fv.summarise(rows)}
    # pixels are pure fat or pure lean: threshold fat % equals the mean fat fraction exactly
    for method in ("auto", "manual-midpoint", "dixon-fat-pixels (ideal classifier)"):
        pooled = summary[(method, "pooled")]
        assert pooled["n"] == 8 and pooled["r"] == pytest.approx(1.0) and pooled["bias"] == pytest.approx(0.0, abs=1e-9)


def test_validation_writes_table_csv_and_png(tmp_path):
    data = Path(__file__).resolve().parents[3].parent / "shared" / "data" / "myosegmentum_lpm"
    if not (data / "manifest.csv").is_file():
        pytest.skip(f"shared data not found at {data} (needs <repo>/../shared/data/myosegmentum_lpm)")
    assert fv.main(["--data", str(data), "--out", str(tmp_path)]) == 0
    for name in ("fat_validation_rows.csv", "fat_validation_summary.csv", "fat_validation.md", "bland_altman.png"):
        assert (tmp_path / name).stat().st_size > 100
    assert (tmp_path / "bland_altman.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (tmp_path / "fat_validation.md").read_text()
    for method in fv.METHODS:
        assert f"| {method} | pooled | 116 |" in md


# ---------------------------------------------------------------------------------------------- histogram fit


def _pixel_em_threshold(values: np.ndarray, max_iter: int = 300, tol: float = 1e-9) -> float:
    """Reference: the former per-pixel EM (every pixel in every iteration, standardised by median/IQR,
    started from an Otsu split), kept here to check the histogram fit against it."""
    x = np.asarray(values, dtype=np.float64).ravel()
    centre = float(np.median(x))
    q25, q75 = np.percentile(x, [25, 75])
    scale = float(q75 - q25) or float(x.max() - x.min())
    z = (x - centre) / scale
    low = z <= otsu_threshold(z)
    w = np.array([low.mean(), 1 - low.mean()])
    m = np.array([z[low].mean(), z[~low].mean()])
    v = np.maximum(np.array([z[low].var(), z[~low].var()]), 1e-6)
    prev = -np.inf
    for _ in range(max_iter):
        logp = np.log(w)[:, None] - 0.5 * np.log(2 * np.pi * v)[:, None] - (z[None] - m[:, None]) ** 2 / (2 * v[:, None])
        mx = logp.max(axis=0)
        logsum = mx + np.log(np.exp(logp - mx).sum(axis=0))
        r = np.exp(logp - logsum)
        ll = float(logsum.mean())
        nk = r.sum(axis=1)
        w, m = nk / z.size, (r @ z) / nk
        v = np.maximum((r * (z[None] - m[:, None]) ** 2).sum(axis=1) / nk, 1e-6)
        if abs(ll - prev) < tol:
            break
        prev = ll
    order = np.argsort(m)
    from ParaspinalSegLib.measurements import GaussianMixture2

    g = GaussianMixture2(w[order], m[order] * scale + centre, np.sqrt(v[order]) * scale, 0, True)
    return g.decision_boundary()


def _region_values(image, labels, spacing, radius=10.0):
    """The pixels the automatic threshold fits (region of the first radius, above the lean lower cutoff)."""
    from ParaspinalSegLib.measurements import _robust_lean, fat_region

    _, _, cutoff = _robust_lean(image[np.isin(labels, (6, 7, 8, 9))])
    return image[fat_region(labels, spacing, radius) & (image >= cutoff)]


@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("case", ["fats", "noisy", "lean-body"])
def test_histogram_fit_matches_per_pixel_em_within_one_percent(spacing, case):
    kwargs = {"fats": dict(fat_percent=FATS, noise_sd=60.0, seed=1),
              "noisy": dict(fat_percent=FATS, noise_sd=120.0, seed=4),
              "lean-body": dict(fat_percent={6: 30.0, 7: 30.0}, noise_sd=40.0, seed=5)}[case]
    image, labels, _, _ = phantom(spacing, **kwargs)
    values = _region_values(image, labels, spacing)
    reference = _pixel_em_threshold(values)
    fitted = fit_gaussian_mixture2(values).decision_boundary()
    assert reference is not None and fitted is not None
    assert fitted == pytest.approx(reference, rel=0.01)
    # ... and within 1 % of the lean-to-fat contrast, a measure that does not depend on the intensity offset
    assert abs(fitted - reference) < 0.01 * (FAT - LEAN)
    # the slice's threshold is the histogram fit's
    res = fat_threshold(image, labels, "auto", spacing_mm=spacing)
    if res.method == "auto-gmm" and res.details["radius_mm"] == 10.0:
        assert res.value == pytest.approx(fitted, rel=1e-12)


def test_histogram_fit_is_scale_and_offset_equivariant():
    rng = np.random.default_rng(11)
    x = np.concatenate([rng.normal(300, 40, 20000), rng.normal(900, 60, 6000)])
    base = fit_gaussian_mixture2(x)
    for scale, offset in ((3.7, 150.0), (0.01, -2.0), (1.0, 1e4), (250.0, -1e5)):
        g = fit_gaussian_mixture2(x * scale + offset)
        assert g.means == pytest.approx(base.means * scale + offset, rel=1e-9)
        assert g.sds == pytest.approx(base.sds * scale, rel=1e-9)
        assert g.weights == pytest.approx(base.weights, rel=1e-9)
        assert g.decision_boundary() == pytest.approx(base.decision_boundary() * scale + offset, rel=1e-9)


def test_otsu_is_scikit_image_threshold_otsu():
    from skimage.filters import threshold_otsu

    rng = np.random.default_rng(3)
    x = np.concatenate([rng.normal(100, 10, 700), rng.normal(250, 20, 300)])
    assert otsu_threshold(x) == threshold_otsu(x)
    assert otsu_threshold(np.r_[x, np.nan]) == threshold_otsu(x)  # non-finite values are left out


def test_measurements_module_imports_without_scikit_image(tmp_path):
    """The Slicer module imports measurements at load, before scikit-image can be installed: importing it
    (and workflow) must not import skimage; asking for a threshold then says how to install it."""
    import subprocess
    import sys

    code = (
        "import sys, builtins\n"
        "real = builtins.__import__\n"
        "def guard(name, *a, **k):\n"
        "    if name == 'skimage' or name.startswith('skimage.'):\n"
        "        raise ImportError('No module named skimage')\n"
        "    return real(name, *a, **k)\n"
        "builtins.__import__ = guard\n"
        "import numpy as np\n"
        "from ParaspinalSegLib import measurements, workflow, postprocessing, overlay, segmenter\n"
        "assert 'skimage' not in sys.modules\n"
        "try:\n"
        "    measurements.otsu_threshold(np.arange(10.0))\n"
        "except ImportError as exc:\n"
        "    print('MISSING', exc)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "MISSING" in out.stdout and "pip install" in out.stdout and "scikit-image" in out.stdout
