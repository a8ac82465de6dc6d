"""Slice orientation, resampling to the model grid and the exact way back (numpy/scipy only).

Synthetic slices are drawn from a phantom defined in patient RAS millimetres, so every check has
a known answer: the marker on the patient's LEFT (RAS x < 0) must end up in the right half of the
canonical columns (radiological view), anterior structures in the top rows.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage

from ParaspinalSegLib.errors import InputError
from ParaspinalSegLib.preprocessing import (
    CanonicalOrientation,
    ModelInput,
    anatomy_centre_ras,
    canonical_ijk_to_ras,
    patient_axes,
    place_window,
    NonAxialSliceError,
    NormalisationConfig,
    from_canonical,
    canonical_orientation,
    normalise_intensity,
    pixel_spacing,
    prepare_slice,
    resample_grid,
    slice_geometry_from_nifti_affine,
    slice_geometry_from_volume,
    to_canonical,
)
from ParaspinalSegLib.boxes import box_from_mask, normalised_box

# Phantom label values.
BODY, LEFT_MARKER, ANTERIOR, POST_RIGHT = 1, 2, 3, 4


def phantom_labels(x: np.ndarray, y: np.ndarray, half: float) -> np.ndarray:
    """Labels at RAS (x, y) mm; ``half`` = half the smaller field of view, positions scale with it."""
    lab = np.zeros(x.shape, dtype=np.uint8)
    lab[(x / (0.85 * half)) ** 2 + (y / (0.7 * half)) ** 2 <= 1] = BODY
    lab[(x + 0.45 * half) ** 2 + y**2 <= (0.15 * half) ** 2] = LEFT_MARKER  # patient left: x < 0
    lab[x**2 + (y - 0.4 * half) ** 2 <= (0.12 * half) ** 2] = ANTERIOR  # anterior: y > 0
    lab[(x > 0.15 * half) & (x < 0.45 * half) & (y > -0.6 * half) & (y < -0.3 * half)] = POST_RIGHT
    return lab


def centred_slice_matrix(d0, d1, shape, z: float = 12.0) -> np.ndarray:
    """Slice matrix with step vectors d0, d1 (mm) whose field of view is centred on (0, 0, z)."""
    d0, d1 = np.asarray(d0, float), np.asarray(d1, float)
    m = np.eye(4)
    m[:3, 0], m[:3, 1] = d0, d1
    n = np.cross(d0, d1)
    m[:3, 2] = n / np.linalg.norm(n) * 3.0
    m[:3, 3] = np.array([0.0, 0.0, z]) - d0 * (shape[0] - 1) / 2 - d1 * (shape[1] - 1) / 2
    return m


def pixel_ras(m: np.ndarray, shape) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    p, q = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij")
    ras = m[:3, 0, None, None] * p + m[:3, 1, None, None] * q + m[:3, 3, None, None]
    return ras[0], ras[1], ras[2]


def synthetic_slice(m: np.ndarray, shape) -> tuple[np.ndarray, np.ndarray]:
    """(intensity image, label image) of the phantom on the slice grid."""
    x, y, _ = pixel_ras(m, shape)
    ext0 = np.linalg.norm(m[:3, 0]) * shape[0]
    ext1 = np.linalg.norm(m[:3, 1]) * shape[1]
    lab = phantom_labels(x, y, min(ext0, ext1) / 2)
    img = np.array([0.0, 300.0, 900.0, 600.0, 450.0])[lab] + 20.0 * np.sin(x / 9.0)
    return img, lab


def centroid(mask: np.ndarray) -> tuple[float, float]:
    r, c = np.nonzero(mask)
    return float(r.mean()), float(c.mean())


# ---- matrix variants: (name, slice matrix builder) ------------------------------------------------

S = 1.5  # mm, small images keep the tests fast
SHAPE = (96, 96)


def _lps_identity():
    # SimpleITK/ITK image with identity direction: i → L, j → P (LPS), so IJK-to-RAS = diag(-s, -s, s).
    vol = np.diag([-S, -S, 3.0, 1.0])
    return slice_geometry_from_volume(vol, 0)


def _ras_identity():
    # Volume whose IJK-to-RAS is the identity direction (i → R, j → A), array order arr[k, j, i].
    vol = np.diag([S, S, 3.0, 1.0])
    return slice_geometry_from_volume(vol, 0)


def _flipped():
    # i → L but j → A (one axis flipped with respect to LPS).
    vol = np.diag([-S, S, 3.0, 1.0])
    return slice_geometry_from_volume(vol, 0)


def _transposed():
    # NIfTI (nibabel) order arr[:, :, k] of an RAS+ affine: axis 0 = i → R, axis 1 = j → A.
    aff = np.diag([S, S, 3.0, 1.0])
    return slice_geometry_from_nifti_affine(aff, 0)


def _transposed_lps():
    # Axis 0 → patient left, axis 1 → posterior: transpose only.
    return slice_geometry_from_nifti_affine(np.diag([-S, -S, 3.0, 1.0]), 0)


VARIANTS = {
    "lps_identity": (_lps_identity, CanonicalOrientation(False, False, False)),
    "ras_identity": (_ras_identity, CanonicalOrientation(False, True, True)),
    "flipped": (_flipped, CanonicalOrientation(False, True, False)),
    "transposed_ras": (_transposed, CanonicalOrientation(True, True, True)),
    "transposed_lps": (_transposed_lps, CanonicalOrientation(True, False, False)),
}


def _centred(m: np.ndarray, shape) -> np.ndarray:
    return centred_slice_matrix(m[:3, 0], m[:3, 1], shape)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_canonical_orientation_puts_patient_left_on_viewer_right(name):
    build, expected = VARIANTS[name]
    m = _centred(build(), SHAPE)
    img, lab = synthetic_slice(m, SHAPE)
    ori = canonical_orientation(m)
    assert ori == expected
    can = to_canonical(lab, ori)
    H, W = can.shape
    r, c = centroid(can == LEFT_MARKER)
    assert c > W / 2 + 10, "patient-left marker must be in the right half of the columns"
    r, c = centroid(can == ANTERIOR)
    assert r < H / 2 - 10, "anterior structure must be in the top rows"
    r, c = centroid(can == POST_RIGHT)
    assert r > H / 2 and c < W / 2, "posterior-right structure must be bottom-left"
    # from_canonical is the exact inverse, and the canonical matrix points rows → P, columns → L.
    assert np.array_equal(from_canonical(can, ori), lab)
    cm = canonical_ijk_to_ras(m, ori, lab.shape)
    assert np.allclose(cm[:3, 0], [0, -S, 0]) and np.allclose(cm[:3, 1], [-S, 0, 0])
    # The model grid's rows step posterior and its columns to patient left, at the model spacing.
    mm = resample_grid(lab.shape, m, ModelInput(spacing_mm=2.0, size=64)).model_ijk_to_ras()
    assert np.allclose(mm[:3, 0], [0, -2.0, 0]) and np.allclose(mm[:3, 1], [-2.0, 0, 0])
    # The canonical matrix maps canonical pixels to the same RAS as the input pixels they came from.
    x_in, y_in, _ = pixel_ras(m, lab.shape)
    x_can, y_can, _ = pixel_ras(cm, can.shape)
    assert np.allclose(to_canonical(x_in, ori), x_can) and np.allclose(to_canonical(y_in, ori), y_can)


def test_prepared_image_matches_phantom_in_ras_for_every_variant():
    """The model image's own geometry (model_ijk_to_ras) places the phantom where it really is."""
    for name, (build, _) in VARIANTS.items():
        m = _centred(build(), SHAPE)
        _, lab = synthetic_slice(m, SHAPE)
        grid = resample_grid(lab.shape, m, ModelInput(spacing_mm=2.0, size=64))
        model_lab = grid.to_model(lab, order=0)
        x, y, _ = pixel_ras(grid.model_ijk_to_ras(), (64, 64))
        truth = phantom_labels(x, y, S * SHAPE[0] / 2)
        assert np.mean(model_lab == truth) > 0.97, name
        # canonical on the model grid too: patient-left marker in the right half.
        assert centroid(model_lab == LEFT_MARKER)[1] > 32, name


def _tilted(deg: float, axis: str) -> np.ndarray:
    """LPS-identity slice axes rotated by ``deg`` about the R (x) or S (z) axis."""
    t = math.radians(deg)
    if axis == "x":
        rot = np.array([[1, 0, 0], [0, math.cos(t), -math.sin(t)], [0, math.sin(t), math.cos(t)]])
    else:
        rot = np.array([[math.cos(t), -math.sin(t), 0], [math.sin(t), math.cos(t), 0], [0, 0, 1]])
    return centred_slice_matrix(rot @ [0, -S, 0], rot @ [-S, 0, 0], SHAPE)


@pytest.mark.parametrize(
    "m, word",
    [
        (centred_slice_matrix([0, -S, 0], [0, 0, -S], SHAPE), "sagittal"),
        (centred_slice_matrix([0, 0, -S], [-S, 0, 0], SHAPE), "coronal"),
        (_tilted(45, "x"), "45.0 degrees"),
    ],
)
def test_non_axial_slices_raise(m, word):
    with pytest.raises(NonAxialSliceError, match=word) as info:
        canonical_orientation(m)
    assert isinstance(info.value, ValueError)
    img, _ = synthetic_slice(m, SHAPE)
    with pytest.raises(NonAxialSliceError):
        prepare_slice(img, m)


def test_slightly_oblique_slices_are_accepted_and_oriented():
    for m in (_tilted(10, "x"), _tilted(-10, "x"), _tilted(20, "z")):
        ori = canonical_orientation(m)
        assert ori.is_identity
        _, lab = synthetic_slice(m, SHAPE)
        can = to_canonical(lab, ori)
        assert centroid(can == LEFT_MARKER)[1] > SHAPE[1] / 2 + 10
        assert centroid(can == ANTERIOR)[0] < SHAPE[0] / 2 - 10
    # The tolerance is configurable.
    with pytest.raises(NonAxialSliceError):
        canonical_orientation(_tilted(10, "x"), max_obliquity_deg=5.0)


def test_slice_geometry_from_volume_matches_voxel_mapping():
    rng = np.random.default_rng(0)
    vol = np.eye(4)
    vol[:3, :3] = rng.normal(size=(3, 3))
    vol[:3, 3] = rng.normal(size=3) * 50
    k = 7
    m = slice_geometry_from_volume(vol, k)
    for j, i in [(0, 0), (3, 5), (11, 2)]:
        # Slicer/SimpleITK array order arr[k, j, i]: slice arr[k] has axis 0 = j, axis 1 = i.
        assert np.allclose(m @ [j, i, 0, 1], vol @ [i, j, k, 1])
    m = slice_geometry_from_nifti_affine(vol, k)
    for i, j in [(0, 0), (3, 5), (11, 2)]:
        # nibabel order arr[i, j, k]: slice arr[:, :, k] has axis 0 = i, axis 1 = j.
        assert np.allclose(m @ [i, j, 0, 1], vol @ [i, j, k, 1])


def test_simpleitk_slice_is_already_canonical():
    sitk = pytest.importorskip("SimpleITK")
    arr = np.zeros((3, 40, 50), dtype=np.float32)
    arr[1, 20, 40] = 1.0  # large i = patient left in LPS, so it must stay in the right columns
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((0.7, 0.9, 4.0))
    d = np.array(img.GetDirection()).reshape(3, 3)
    vol = np.eye(4)
    lps_to_ras = np.diag([-1.0, -1.0, 1.0])
    vol[:3, :3] = lps_to_ras @ d @ np.diag(img.GetSpacing())
    vol[:3, 3] = lps_to_ras @ np.array(img.GetOrigin())
    m = slice_geometry_from_volume(vol, 1)
    assert canonical_orientation(m).is_identity
    assert pixel_spacing(m) == pytest.approx((0.9, 0.7))


def test_pixel_spacing_non_square():
    m = centred_slice_matrix([0, -0.6, 0], [-0.9, 0, 0], (320, 448))
    assert pixel_spacing(m) == pytest.approx((0.6, 0.9))


# ---- intensity normalisation -------------------------------------------------------------------

def test_normalisation_is_invariant_to_scale_and_offset():
    img, _ = synthetic_slice(_centred(_lps_identity(), SHAPE), SHAPE)
    ref = normalise_intensity(img)
    assert ref.dtype == np.float32 and ref.min() == 0.0 and ref.max() == 1.0
    for a, b in [(0.01, -3.0), (37.5, 1000.0), (1.0, -250.0)]:
        assert np.allclose(normalise_intensity(a * img + b), ref, atol=1e-5)
    assert not np.all(normalise_intensity(img, 0.0, 50.0) == ref)  # percentiles matter
    assert np.all(normalise_intensity(np.full((8, 8), 5.0)) == 0)
    with pytest.raises(InputError):
        normalise_intensity(np.array([[1.0, np.nan]]))


def test_prepare_slice_invariant_to_scale_and_offset_and_configs_round_trip():
    m = _centred(_ras_identity(), SHAPE)
    img, _ = synthetic_slice(m, SHAPE)
    mi = ModelInput(spacing_mm=2.0, size=64)
    a = prepare_slice(img, m, mi)
    b = prepare_slice(3.0 * img + 77.0, m, mi.to_dict(), {"method": "percentile", "low": 0.5, "high": 99.5})
    assert a.image.shape == (64, 64) and a.image.dtype == np.float32
    assert np.allclose(a.image, b.image, atol=1e-5)
    cfg = NormalisationConfig(low=1.0, high=99.0)
    assert NormalisationConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.to_dict() == {"method": "percentile", "low": 1.0, "high": 99.0}
    assert ModelInput.from_dict(mi.to_dict()) == mi
    with pytest.raises(ValueError):
        NormalisationConfig(method="zscore")


def test_prepare_slice_rejects_bad_input():
    m = _centred(_lps_identity(), SHAPE)
    with pytest.raises(InputError):
        prepare_slice(np.zeros((2, 3, 4)), m)
    with pytest.raises(InputError):
        prepare_slice(np.full(SHAPE, np.nan), m)
    with pytest.raises(InputError):
        prepare_slice(np.zeros(SHAPE), np.eye(3))


# ---- resampling and the way back --------------------------------------------------------------


def test_identity_round_trip_is_bit_exact():
    size = 128
    m = centred_slice_matrix([0, -0.8, 0], [-0.8, 0, 0], (size, size))
    img, lab = synthetic_slice(m, (size, size))
    prep = prepare_slice(img, m, ModelInput(spacing_mm=0.8, size=size))
    grid = prep.grid
    # Centred on the RAS origin, a lattice point: the window is the slice itself.
    assert grid.is_identity and grid.spacing_mm == 0.8
    assert np.array_equal(prep.image, normalise_intensity(img))
    assert np.array_equal(grid.to_input(prep.image), prep.image)
    assert np.array_equal(grid.to_input(grid.to_model(lab, order=0), order=0), lab)
    logits = np.random.default_rng(1).normal(size=(3, size, size)).astype(np.float32)
    assert np.array_equal(grid.to_input(logits, order=1), logits)
    assert grid.box_to_input(*normalised_box(10, 20, 30, 50, size, size)) == pytest.approx((10, 20, 30, 50), abs=1e-9)


@pytest.mark.parametrize("shape", [(255, 255), (254, 254), (253, 200), (201, 256), (256, 256), (301, 300)])
@pytest.mark.parametrize("storage", ["lps", "ras_transposed"])
def test_slice_at_model_spacing_is_copied_exactly_at_odd_and_even_sizes(shape, storage):
    """Issue 16 5(c): a slice at the model spacing, an odd or even number of pixels off the model grid, is
    neither shifted by half a pixel nor blurred: one-pixel stripes come through both ways intact."""
    d0, d1 = ([0, -0.8, 0], [-0.8, 0, 0]) if storage == "lps" else ([0.8, 0, 0], [0, 0.8, 0])
    m = centred_slice_matrix(d0, d1, shape)
    m[:3, 3] += [3.3, -7.1, 0.0]  # the field of view off the lattice: the window still lands on its pixels
    img = np.zeros(shape, np.float32)
    r0, c0 = shape[0] // 2 - 7, shape[1] // 2 + 5
    img[r0, :] = 1.0
    img[:, c0] = 2.0
    grid = resample_grid(shape, m, ModelInput(spacing_mm=0.8, size=256))
    model = grid.to_model(img, order=1)
    assert set(np.unique(model)) <= {0.0, 1.0, 2.0}  # no blur (before the fix: 0.5 at odd sizes)
    assert grid.is_exact
    # Each stripe is one model row / column, at the RAS position of the input stripe (no half-pixel shift).
    rows = np.nonzero((model == 1.0).sum(axis=1) + (model == 1.0).sum(axis=0))[0]
    ras_model = pixel_ras(grid.model_ijk_to_ras(), (256, 256))
    ras_input = pixel_ras(m, shape)
    for value in (1.0, 2.0):
        sel_in, sel_model = img == value, model == value
        for k in range(2):
            got = np.unique(np.round(ras_model[k][sel_model], 6))
            want = np.unique(np.round(ras_input[k][sel_in], 6))
            assert np.all(np.isin(got, want))
    assert rows.size >= 1
    back = grid.to_input(model, order=1)
    covered = grid.to_input(np.ones((256, 256), np.float32), order=1, cval=0.0) == 1.0
    assert np.array_equal(back[covered], img[covered])
    assert np.array_equal(grid.to_input(grid.to_model(img, order=0), order=0)[covered], img[covered])
    assert img[covered].sum() > 0.5 * img.sum() or shape[0] > 256


def _rotated_matrix(deg: float, spacing: float, shape, centre=(4.0, -6.0)) -> np.ndarray:
    """LPS slice axes rotated in-plane by ``deg`` about S, field of view centred on ``centre`` (RAS x, y)."""
    t = math.radians(deg)
    rot = np.array([[math.cos(t), -math.sin(t), 0], [math.sin(t), math.cos(t), 0], [0, 0, 1]])
    m = centred_slice_matrix(rot @ [0, -spacing, 0], rot @ [-spacing, 0, 0], shape)
    m[:3, 3] += [centre[0], centre[1], 0.0]
    return m


def _phantom_on(m: np.ndarray, shape) -> tuple[np.ndarray, np.ndarray]:
    """The phantom at fixed RAS positions (half-width 80 mm), whatever the grid."""
    x, y, _ = pixel_ras(m, shape)
    lab = phantom_labels(x - 4.0, y + 6.0, 80.0)
    return np.array([0.0, 300.0, 900.0, 600.0, 450.0])[lab] + 20.0 * np.sin(x / 9.0), lab


@pytest.mark.parametrize("deg", [-20.0, -10.0, 0.0, 10.0, 20.0, 37.0, 180.0])
def test_rotated_slice_is_seen_in_the_patient_axes(deg):
    """In-plane rotation of the pixel axes against the patient is undone: the model sees the phantom exactly as
    drawn on its own grid (patient axes), and the way back returns the input's labels."""
    shape = (300, 300)
    m = _rotated_matrix(deg, 0.7, shape)
    img, lab = _phantom_on(m, shape)
    grid = resample_grid(shape, m, ModelInput(spacing_mm=0.8, size=256), centre_ras=[4.0, -6.0, 12.0])
    mm = grid.model_ijk_to_ras()
    assert np.allclose(mm[:3, 0], [0, -0.8, 0]) and np.allclose(mm[:3, 1], [-0.8, 0, 0])
    x, y, _ = pixel_ras(mm, (256, 256))
    truth = phantom_labels(x - 4.0, y + 6.0, 80.0)
    model_lab = grid.to_model(lab, order=0)
    assert np.mean(model_lab == truth) > 0.99
    onehot = (lab[None] == np.arange(5)[:, None, None]).astype(np.float32)
    back = grid.to_input(grid.to_model(onehot, order=1), order=1, cval=[1, 0, 0, 0, 0]).argmax(axis=0)
    assert np.mean(back == lab) > 0.99
    # Boxes found on the model grid land on the input structure (within a model pixel and a half).
    for v in (LEFT_MARKER, ANTERIOR):
        p0, q0, p1, q1 = grid.box_to_input(*normalised_box(*box_from_mask(model_lab == v), 256, 256))
        t0, u0, t1, u1 = box_from_mask(lab == v)
        # The input-aligned box of a rotated box is larger; its centre is the structure's.
        assert abs((p0 + p1) / 2 - (t0 + t1) / 2) < 1.5 and abs((q0 + q1) / 2 - (u0 + u1) / 2) < 1.5


CASES = [
    # (name, axis-0 step, axis-1 step, shape): FOV 150 / 450 mm, 192² / 1024², non-square pixels, oblique
    ("fov150_192_lps", [0, -150 / 192, 0], [-150 / 192, 0, 0], (192, 192)),
    ("fov450_192_ras", [0, 450 / 192, 0], [450 / 192, 0, 0], (192, 192)),
    ("fov450_1024_nifti", [450 / 1024, 0, 0], [0, 450 / 1024, 0], (1024, 1024)),
    ("nonsquare_320x448", [0, -0.6, 0], [0.9, 0, 0], (320, 448)),
    # (axes perpendicular, as a scanner writes them: 0.01 · -0.6 + 0.1 · 0.06 = 0; sheared axes are refused)
    ("nonsquare_transposed_oblique", [-0.9, 0.01, 0.1], [0.0, -0.6, 0.06], (448, 320)),
]


@pytest.mark.parametrize("name, d0, d1, shape", CASES, ids=[c[0] for c in CASES])
def test_round_trip_returns_the_input_grid(name, d0, d1, shape):
    m = centred_slice_matrix(d0, d1, shape)
    x, y, _ = pixel_ras(m, shape)
    lab = phantom_labels(x, y, 75.0)  # the anatomy has one size, whatever the field of view
    img = np.array([0.0, 300.0, 900.0, 600.0, 450.0])[lab] + 20.0 * np.sin(x / 9.0)
    prep = prepare_slice(img, m, ModelInput(spacing_mm=0.8, size=256))
    grid = prep.grid
    assert prep.image.shape == (256, 256) and grid.spacing_mm == 0.8
    # One spacing, the patient's axes, centred on the field of view (the RAS origin here; an oblique plane
    # meets the lattice elsewhere, within half a lattice step along each axis).
    mm = grid.model_ijk_to_ras()
    assert np.allclose(np.linalg.norm(mm[:3, :2], axis=0), 0.8)
    assert mm[1, 0] < -0.75 and mm[0, 1] < -0.75
    assert np.all(np.abs(grid.centre_ras[:2]) <= 0.8 * 16 / 2 + 0.5 * max(pixel_spacing(m)))
    model_lab = grid.to_model(lab, order=0)
    assert set(np.unique(model_lab)) == set(np.unique(lab))

    inside = grid.to_input(np.ones((256, 256), np.float32), cval=0.0) == 1.0
    window_mm = 256 * 0.8
    assert inside.sum() * np.prod(pixel_spacing(m)) == pytest.approx(
        min(window_mm, shape[0] * pixel_spacing(m)[0]) * min(window_mm, shape[1] * pixel_spacing(m)[1]), rel=0.03)
    # Labels: nearest both ways; outside the window cval.
    back = grid.to_input(model_lab, order=0, cval=0)
    assert back.shape == lab.shape and back.dtype == lab.dtype
    assert np.all(back[~inside] == 0)
    assert np.mean(back[inside] == lab[inside]) >= 0.99 and np.all(lab[~inside] == 0)
    # Probabilities: linear both ways, argmax on the input grid.
    onehot = (lab[None] == np.arange(5)[:, None, None]).astype(np.float32)
    back = grid.to_input(grid.to_model(onehot, order=1), order=1, cval=[1, 0, 0, 0, 0]).argmax(axis=0)
    assert back.shape == lab.shape and np.mean(back == lab) >= 0.99

    # A smooth field comes back (away from the window's and the FOV's border, where edge clamping acts).
    smooth = (np.sin(x / 40.0) + np.cos(y / 55.0)).astype(np.float32)
    back = grid.to_input(grid.to_model(smooth, order=1), order=1)
    inner = ndimage.binary_erosion(inside, iterations=8, border_value=0)
    assert np.abs(back - smooth)[inner].max() < 0.01

    # Padding: model pixels outside the FOV are 0.
    p, q = grid.model_to_input(np.arange(256)[:, None], np.arange(256)[None, :])
    outside = (p < -0.5) | (p > shape[0] - 0.5) | (q < -0.5) | (q > shape[1] - 0.5)
    assert np.all(prep.image[outside] == 0)

    # Boxes found on the model image map back onto the input structure, RAS centre within a voxel.
    half_voxel = 0.5 * max(grid.spacing_mm, max(pixel_spacing(m))) + 1e-6
    s0, s1 = pixel_spacing(m)
    for v in (LEFT_MARKER, ANTERIOR, POST_RIGHT):
        nbox = normalised_box(*box_from_mask(model_lab == v), 256, 256)
        p0, q0, p1, q1 = grid.box_to_input(*nbox)
        t0, u0, t1, u1 = box_from_mask(lab == v)
        tol0, tol1 = max(1.0, 0.5 * 0.8 / s0) + 0.2, max(1.0, 0.5 * 0.8 / s1) + 0.2
        assert abs(p0 - t0) <= tol0 and abs(p1 - t1) <= tol0, (v, p0, t0, p1, t1)
        assert abs(q0 - u0) <= tol1 and abs(q1 - u1) <= tol1, (v, q0, u0, q1, u1)
        rb = grid.box_to_ras(*nbox)
        true_centre = (m @ [(t0 + t1) / 2 - 0.5, (u0 + u1) / 2 - 0.5, 0, 1])[:3]
        assert np.linalg.norm(rb.center_ras - true_centre) <= 2 * half_voxel * math.sqrt(2)
        assert rb.size_mm == pytest.approx([(p1 - p0) * s0, (q1 - q0) * s1])
        assert np.allclose(rb.axes_ras[:, 0], m[:3, 0] / s0) and np.allclose(rb.axes_ras[:, 1], m[:3, 1] / s1)


def test_window_snaps_to_a_patient_space_lattice():
    """Two placements differ by whole network strides, and the same RAS point gives the same model pixels
    whatever the input grid (padded, rotated)."""
    shape = (300, 300)
    mi = ModelInput(spacing_mm=0.8, size=256)
    lattice = 0.8 * 16
    centres = []
    for deg in (0.0, 13.0, -20.0):
        m = _rotated_matrix(deg, 0.7, shape)
        grid = resample_grid(shape, m, mi, centre_ras=[9.0, -20.0, 0.0])
        mm = grid.model_ijk_to_ras()
        centres.append(grid.centre_ras)
        # Window centre on the lattice through the RAS origin (the patient axes are −x / −y here).
        assert np.allclose(np.round(grid.centre_ras[:2] / lattice) * lattice, grid.centre_ras[:2], atol=1e-6)
        assert np.linalg.norm(grid.centre_ras[:2] - [9.0, -20.0]) <= lattice / math.sqrt(2) + 1e-6
        assert np.allclose(mm[:3, 0], [0, -0.8, 0]) and np.allclose(mm[:3, 1], [-0.8, 0, 0])
    assert np.allclose(centres[0], centres[1]) and np.allclose(centres[0], centres[2])


def test_anatomy_centre_and_window_placement():
    shape = (256, 256)
    mi = ModelInput(spacing_mm=0.8, size=256)
    for deg in (0.0, 15.0):
        m = _rotated_matrix(deg, 0.8, shape, centre=(0.0, 0.0))
        x, y, _ = pixel_ras(m, shape)
        lab = np.zeros(shape, np.uint8)
        lab[(np.abs(x - 20.0) < 30) & (np.abs(y + 10.0) < 15)] = 6
        lab[(np.abs(x - 20.0) < 5) & (np.abs(y - 30.0) < 5)] = 255  # not a structure: ignored
        c = anatomy_centre_ras(lab, m)
        assert np.allclose(c[:2], [20.0, -10.0], atol=0.8)
        assert anatomy_centre_ras(np.zeros(shape, np.uint8), m) is None
    # On the model grid: a centred structure keeps the window; 32 mm off centre, or at an edge beyond which the
    # slice goes on, moves it; at the edge of the slice's own field of view there is nothing more to see.
    big = (320, 320)
    grid = resample_grid(big, centred_slice_matrix([0, -0.8, 0], [-0.8, 0, 0], big), mi)
    assert grid.is_exact
    lab = np.zeros((256, 256), np.uint8)
    lab[100:156, 90:166] = 1
    assert place_window(lab, grid) is None
    assert place_window(np.roll(lab, 25, axis=1), grid) is None  # 20 mm: within the tolerance
    lab2 = np.roll(lab, 40, axis=1)  # 32 mm towards patient left
    moved = place_window(lab2, grid)
    assert moved is not None and np.isclose(moved[0] - grid.centre_ras[0], -32.0, atol=0.8)
    edge = np.zeros_like(lab)
    edge[120:130, 2:250] = 8  # centred but touching the window's edge: may continue outside
    assert place_window(edge, grid) is not None
    small = resample_grid((240, 240), centred_slice_matrix([0, -0.8, 0], [-0.8, 0, 0], (240, 240)), mi)
    assert place_window(edge, small) is None  # the window reaches past the slice: nothing beyond
    assert place_window(np.zeros_like(lab), grid) is None
    rows, cols, n = patient_axes(_rotated_matrix(25.0, 0.8, shape))
    assert np.allclose(rows, [0, -1, 0]) and np.allclose(cols, [-1, 0, 0]) and np.allclose(n, [0, 0, 1])


def test_downsampling_is_antialiased():
    """Stripes finer than the model grid average out instead of aliasing into false structure."""
    shape = (512, 512)
    m = centred_slice_matrix([0, -0.5, 0], [-0.5, 0, 0], shape)
    stripes = np.tile((np.arange(shape[1]) % 3 == 0).astype(np.float32), (shape[0], 1))
    grid = resample_grid(shape, m, ModelInput(spacing_mm=2.0, size=128))
    assert grid.input_steps == (4.0, 4.0)
    smooth = grid.to_model(stripes, order=1)[8:-8, 8:-8]
    aliased = grid.to_model(stripes, order=1, antialias=False)[8:-8, 8:-8]
    assert abs(smooth.mean() - 1 / 3) < 0.02 and smooth.std() < 0.03
    assert aliased.std() > 0.2  # without the Gaussian pre-filter the stripes alias


def test_to_input_rejects_wrong_shapes():
    m = _centred(_lps_identity(), SHAPE)
    grid = resample_grid(SHAPE, m, ModelInput(spacing_mm=2.0, size=64))
    with pytest.raises(InputError):
        grid.to_input(np.zeros((3, 32, 32)))
    with pytest.raises(InputError):
        grid.to_model(np.zeros((10, 10)))
    with pytest.raises(InputError):
        resample_grid(SHAPE, m, ModelInput(spacing_mm=2.0, size=64), centre_ras=[np.nan, 0, 0])


def test_resampling_onto_the_model_grid_warns_nothing():
    """Slicer 5.8/5.10 ship scipy 1.13, whose affine_transform warns on every 1-D matrix: a user would see
    the warning on each segmentation. (Checked with scipy 1.13.1; newer scipy never warns here.)"""
    import warnings

    shape = (300, 260)
    m = centred_slice_matrix([0, -0.7, 0], [-0.9, 0, 0], shape)
    grid = resample_grid(shape, m, ModelInput(spacing_mm=1.6, size=128))
    assert not grid.is_identity
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        grid.to_model(np.random.default_rng(0).random(shape, dtype=np.float32), order=1)


def test_window_is_recorded_and_weights_without_it_keep_the_field_of_view_window():
    from ParaspinalSegLib.preprocessing import WINDOW_FIELD_OF_VIEW, WINDOW_SPINE

    assert ModelInput().window == WINDOW_SPINE  # what the trainer writes from now on
    assert ModelInput.from_dict(ModelInput().to_dict()) == ModelInput()
    # A weights file written before the key existed was trained on the field-of-view window.
    assert ModelInput.from_dict({"spacing_mm": 0.8, "size": 256}).window == WINDOW_FIELD_OF_VIEW
    with pytest.raises(ValueError, match="window must be one of"):
        ModelInput(window="whole")


@pytest.mark.parametrize("shape, spacing", [((400, 400), 1.0185), ((237, 256), 0.8), ((512, 512), 0.37)])
def test_field_of_view_window_holds_the_whole_slice_centred(shape, spacing):
    m = np.array([[0.0, -spacing, 0.0, 10.0], [-spacing, 0.0, 0.0, 20.0], [0.0, 0.0, 4.0, 0.0], [0, 0, 0, 1.0]])
    mi = ModelInput(spacing_mm=0.8, size=256, window="field_of_view")
    grid = resample_grid(shape, m, mi)
    fov = max(shape) * spacing
    assert grid.spacing_mm == pytest.approx(max(0.8, fov / 256))
    # Every input pixel centre lies inside the window, and the window is centred on the field of view.
    u, v = grid.input_to_model(np.array([0, shape[0] - 1]), np.array([0, shape[1] - 1]))
    assert np.all((u >= -0.5) & (u <= 255.5)) and np.all((v >= -0.5) & (v <= 255.5))
    centre = (m @ np.array([(shape[0] - 1) / 2, (shape[1] - 1) / 2, 0.0, 1.0]))[:3]
    # (within half a model pixel: at the model's own spacing the window snaps onto the input's pixel centres)
    np.testing.assert_allclose(grid.centre_ras, centre, atol=grid.spacing_mm / 2 + 1e-9)
    # The spine window of the same slice keeps its one scale whatever the field of view.
    assert resample_grid(shape, m, ModelInput(spacing_mm=0.8, size=256)).spacing_mm == 0.8


def _rotation(degrees: float, axis) -> np.ndarray:
    """Rodrigues rotation matrix about ``axis``."""
    a = np.asarray(axis, float) / np.linalg.norm(axis)
    t = math.radians(degrees)
    k = np.array([[0, -a[2], a[1]], [a[2], 0, -a[0]], [-a[1], a[0], 0]])
    return np.eye(3) + math.sin(t) * k + (1 - math.cos(t)) * k @ k


@pytest.mark.parametrize("shear_deg, refused", [(13.0, True), (0.1, True), (-0.1, True), (0.05, False), (0.0, False)])
def test_sheared_in_plane_axes_are_refused_beyond_round_off(shear_deg, refused):
    """Every segmentation and measurement takes its pixel geometry from here: a slice whose axes are not
    perpendicular (pixel area |a × b|, not |a|·|b|) is refused, naming the angle; 0.05° (|cos| 8.7e-4, an
    area error of 4e-7) is taken as perpendicular."""
    from ParaspinalSegLib.preprocessing import check_perpendicular_axes, slice_normal

    t = math.radians(shear_deg)
    m = np.eye(4)
    m[:3, 0] = [0.0, -0.8, 0.0]
    m[:3, 1] = [-0.9 * math.cos(t), -0.9 * math.sin(t), 0.0]  # axis 1 leaning towards axis 0
    m[:3, 2] = [0.0, 0.0, 4.0]
    calls = (lambda: pixel_spacing(m), lambda: canonical_orientation(m), lambda: slice_normal(m),
             lambda: check_perpendicular_axes(m, "the slice"))
    for call in calls:
        if refused:
            with pytest.raises(InputError, match=rf"implausible geometry: its row and column axes are "
                                                 rf"{90 - shear_deg:.2f} degrees apart, not perpendicular"):
                call()
        else:
            call()


def test_float32_rounded_oblique_directions_pass():
    """What scanners and NIfTI write: an oblique rotation rounded to float32 (sform) or to 6 decimals
    (DICOM direction cosines) is perpendicular within round-off, far inside the tolerance."""
    from ParaspinalSegLib.preprocessing import MAX_AXIS_COSINE, check_perpendicular_axes

    r = _rotation(17.0, [0.3, -0.2, 1.0]) @ np.diag([-1.0, -1.0, 1.0])
    for rounded in (r.astype(np.float32).astype(float), np.round(r, 6)):
        m = np.eye(4)
        m[:3, :3] = rounded * np.array([0.6, 0.6, 3.5])
        check_perpendicular_axes(m, "v", columns=(0, 1, 2), names=("i", "j", "k"))
        cos = abs(rounded[:, 0] @ rounded[:, 1]) / np.prod(np.linalg.norm(rounded[:, :2], axis=0))
        assert cos < 1e-5 < MAX_AXIS_COSINE
