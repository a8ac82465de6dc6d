"""SliceSegmenter: input checks, output on the input grid, orientation, boxes, reuse and threads.

A small randomly initialised BS-ESNet saved with ``save_weights`` stands in for trained weights: the
tests check the plumbing (shapes, geometry, orientation, errors), not segmentation quality.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from scipy import ndimage  # noqa: E402

from ParaspinalSegLib.errors import InputError, NonAxialSliceError, ParaspinalSegError  # noqa: E402
from ParaspinalSegLib.preprocessing import slice_geometry_from_volume  # noqa: E402
from ParaspinalSegLib.segmenter import SliceResult, SliceSegmenter  # noqa: E402
from ParaspinalSegLib.weights import load_weights  # noqa: E402

REPO = Path(__file__).resolve().parents[3]
PUBLIC_DATA_STRUCTURES = [1, 4, 5, 6, 7, 8, 9]  # no spinal canal (2), no lamina (3)


@pytest.fixture(scope="module")
def weights_dir(tmp_path_factory, save_tiny_weights) -> Path:
    d = tmp_path_factory.mktemp("weights")
    save_tiny_weights(d / "all")
    save_tiny_weights(d / "public", structures_learned=PUBLIC_DATA_STRUCTURES)
    save_tiny_weights(d / "unet", preset="unet")
    return d


@pytest.fixture(scope="module")
def segmenter(weights_dir) -> SliceSegmenter:
    return SliceSegmenter(weights_dir / "all.json")


def canonical_matrix(s0: float = 1.0, s1: float = 1.0, origin=(90.0, 120.0, -30.0)) -> np.ndarray:
    """Rows step to posterior (−y), columns to patient left (−x): the model's own view."""
    m = np.eye(4)
    m[:3, 0] = (0.0, -s0, 0.0)
    m[:3, 1] = (-s1, 0.0, 0.0)
    m[:3, 2] = (0.0, 0.0, -4.0)
    m[:3, 3] = origin
    return m


def phantom(n0: int = 192, n1: int = 192, seed: int = 0) -> np.ndarray:
    """A body-like ellipse with a few brighter and darker blobs plus noise (uint16, like MRI)."""
    rng = np.random.default_rng(seed)
    p, q = np.mgrid[0:n0, 0:n1]
    p, q = (p - n0 / 2) / (n0 / 2), (q - n1 / 2) / (n1 / 2)
    img = 300.0 * ((p / 0.8) ** 2 + (q / 0.9) ** 2 < 1)
    for cp, cq, r, v in ((0.1, 0.0, 0.15, 600), (0.4, -0.3, 0.2, 500), (0.4, 0.3, 0.2, 200), (-0.3, 0.0, 0.12, 800)):
        img += v * (((p - cp) ** 2 + (q - cq) ** 2) < r**2)
    img += rng.normal(0.0, 20.0, img.shape)
    return np.clip(img, 0, None).astype(np.uint16)


def flipped_geometry(a: np.ndarray, m: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """The same anatomy stored with ``axis`` reversed: flip the array and the matrix with it."""
    n = a.shape[axis]
    f = m.copy()
    f[:3, 3] = m[:3, 3] + (n - 1) * m[:3, axis]
    f[:3, axis] = -m[:3, axis]
    return np.flip(a, axis=axis).copy(), f


def check_result(res: SliceResult, a: np.ndarray, m: np.ndarray, learned) -> None:
    n0, n1 = a.shape
    assert res.labels.shape == a.shape and res.labels.dtype == np.uint8
    assert set(np.unique(res.labels)) <= {0, *learned}
    assert res.found, "a random network labels something"
    assert sorted(res.found + res.missing) == sorted(learned)
    assert res.found == [v for v in learned if (res.labels == v).any()]
    assert set(res.boxes) == set(res.found) == set(res.confidence)
    for v, box in res.boxes.items():
        p0, q0, p1, q1 = box.pixel
        assert 0 <= p0 < p1 <= n0 and 0 <= q0 < q1 <= n1
        mask = res.labels == v
        # The mask box is tight: it holds every pixel of the structure and touches it on all sides.
        assert mask[p0:p1, q0:q1].sum() == mask.sum()
        assert mask[p0].any() and mask[p1 - 1].any() and mask[:, q0].any() and mask[:, q1 - 1].any()
        # Its RAS form holds every pixel centre of the structure, each at least half a pixel inside
        # the edges, and the outermost ones exactly half a pixel inside.
        pp, qq = np.nonzero(mask)
        ras = (m @ np.stack([pp, qq, np.zeros_like(pp), np.ones_like(pp)]).astype(float))[:3].T
        local = (ras - box.center_ras) @ box.axes_ras
        spacing = np.linalg.norm(m[:3, :2], axis=0)
        np.testing.assert_allclose(np.abs(local[:, :2]).max(axis=0), box.size_mm / 2 - spacing / 2, atol=1e-6)
        np.testing.assert_allclose(box.size_mm, [(p1 - p0) * spacing[0], (q1 - q0) * spacing[1]])
        assert np.allclose(np.abs(local[:, 2]), 0.0)
        assert 1.0 / (len(learned) + 1) - 1e-6 <= res.confidence[v] <= 1.0
    for v, box in res.detector_boxes.items():
        p0, q0, p1, q1 = box.pixel
        assert 0 <= p0 <= p1 <= n0 and 0 <= q0 <= q1 <= n1
        assert np.all(box.size_mm >= 0) and np.allclose(np.linalg.norm(box.axes_ras, axis=0), 1.0)
        assert 0.0 <= res.box_agreement[v] <= 1.0
    assert res.seconds > 0 and res.seconds >= sum(res.timings.values()) - 1e-6
    assert res.device == "cpu" and res.model_version.startswith("all (") or res.model_version


# ---------------------------------------------------------------------------------------------------


def test_square_slice(segmenter):
    a, m = phantom(), canonical_matrix()
    res = segmenter.segment(a, m)
    check_result(res, a, m, list(range(1, 10)))
    assert set(res.detector_boxes) == set(res.found)


def test_non_square_slice_with_non_square_pixels(segmenter):
    a, m = phantom(160, 224, seed=1), canonical_matrix(1.0, 0.8)
    res = segmenter.segment(a.astype(np.float32) * 0.01 + 5.0, m)
    check_result(res, a, m, list(range(1, 10)))


def test_keep_largest_leaves_one_component_per_structure(weights_dir):
    a, m = phantom(seed=2), canonical_matrix()
    raw = SliceSegmenter(weights_dir / "all.json", keep_largest=False).segment(a, m)
    kept = SliceSegmenter(weights_dir / "all.json", keep_largest=True).segment(a, m)
    eight = np.ones((3, 3))
    for v in kept.found:
        assert ndimage.label(kept.labels == v, structure=eight)[1] == 1
    # Only whole islands were removed (to background); nothing was relabelled.
    changed = kept.labels != raw.labels
    assert np.all(kept.labels[changed] == 0)
    assert sum(ndimage.label(raw.labels == v, structure=eight)[1] for v in raw.found) > len(raw.found)


def test_structures_not_learned_are_never_segmented(weights_dir):
    seg = SliceSegmenter(weights_dir / "public.json")
    a, m = phantom(seed=3), canonical_matrix()
    res = seg.segment(a, m)
    check_result(res, a, m, PUBLIC_DATA_STRUCTURES)
    assert not np.isin(res.labels, [2, 3]).any()
    assert 2 not in res.found + res.missing and 3 not in res.found + res.missing
    assert res.structures_learned == PUBLIC_DATA_STRUCTURES


def test_plain_unet_weights_have_mask_boxes_only(weights_dir):
    res = SliceSegmenter(weights_dir / "unet.json").segment(phantom(), canonical_matrix())
    assert res.boxes and res.detector_boxes == {} and res.box_agreement == {}


# ---------------------------------------------------------------------------------------------------
# Orientation: the same anatomy stored differently gives the same labels, stored the same way


@pytest.mark.parametrize("axes", [(1,), (0,), (0, 1)], ids=["flip-columns", "flip-rows", "LPS-style"])
def test_flipped_storage_gives_flipped_labels(weights_dir, axes):
    seg = SliceSegmenter(weights_dir / "all.json", keep_largest=False)  # no tie-breaking by scan order
    a, m = phantom(176, 192, seed=4), canonical_matrix(1.0, 0.9)
    b, f = a, m
    for axis in axes:
        b, f = flipped_geometry(b, f, axis)
    ref, res = seg.segment(a, m), seg.segment(b, f)
    expect = ref.labels
    for axis in axes:
        expect = np.flip(expect, axis=axis)
    np.testing.assert_array_equal(res.labels, expect)
    # Patient-space boxes do not depend on how the array is stored.
    for v in ref.found:
        np.testing.assert_allclose(res.boxes[v].center_ras, ref.boxes[v].center_ras, atol=1e-9)
        np.testing.assert_allclose(res.detector_boxes[v].center_ras, ref.detector_boxes[v].center_ras, atol=1e-6)
        np.testing.assert_allclose(res.boxes[v].size_mm, ref.boxes[v].size_mm, atol=1e-9)


def test_mirror_tta_is_mirror_consistent(weights_dir):
    """With mirror TTA (the default), the patient mirrored across the midline gets the mirrored, left/right-swapped
    labels (for any weights: the two passes swap roles); in a single pass a random model has no such symmetry.
    The mirror plane is x = 0, a plane of the window lattice, so the mirrored slice gets the mirrored window."""
    from ParaspinalSegLib.anatomy import LEFT_RIGHT_SWAP

    swap = np.asarray(LEFT_RIGHT_SWAP, dtype=np.uint8)
    a, m = phantom(192, 192, seed=7), canonical_matrix(origin=(95.5, 120.0, -30.0))
    mirrored = a[:, ::-1].copy()  # columns run toward patient left: flipping them mirrors the patient

    def agreement(seg):
        ref, res = seg.segment(a, m), seg.segment(mirrored, m)
        return float(np.mean(res.labels == swap[ref.labels[:, ::-1]])), ref

    tta = SliceSegmenter(weights_dir / "all.json", keep_largest=False)
    assert tta.mirror_tta
    plain = SliceSegmenter(weights_dir / "all.json", keep_largest=False, mirror_tta=False)
    with_tta, ref = agreement(tta)
    without, _ = agreement(plain)
    assert with_tta > 0.999 and without < 0.9
    assert set(ref.found) == set(tta.segment(a, m).found)


def test_transposed_storage_gives_transposed_labels(weights_dir):
    seg = SliceSegmenter(weights_dir / "all.json", keep_largest=False)
    a, m = phantom(176, 192, seed=5), canonical_matrix(1.0, 0.9)
    t = m.copy()
    t[:, [0, 1]] = m[:, [1, 0]]
    ref, res = seg.segment(a, m), seg.segment(a.T.copy(), t)
    np.testing.assert_array_equal(res.labels, ref.labels.T)
    for v in ref.found:
        np.testing.assert_allclose(res.boxes[v].center_ras, ref.boxes[v].center_ras, atol=1e-9)
        np.testing.assert_allclose(res.boxes[v].size_mm, ref.boxes[v].size_mm[::-1], atol=1e-9)


# ---------------------------------------------------------------------------------------------------
# Bad input


def test_nan_pixels_are_refused(segmenter):
    a = phantom().astype(np.float32)
    a[10, 20] = np.nan
    with pytest.raises(InputError, match="1 NaN or infinite"):
        segmenter.segment(a, canonical_matrix())


@pytest.mark.parametrize("value", [0, 7.5])
def test_empty_slice_is_refused(segmenter, value):
    with pytest.raises(InputError, match="slice is empty"):
        segmenter.segment(np.full((64, 64), value), canonical_matrix())


@pytest.mark.parametrize("shape", [(2, 64, 64), (64,), (4, 64)])
def test_wrong_shape_is_refused(segmenter, shape):
    with pytest.raises(InputError, match="2-D slice|too small"):
        segmenter.segment(np.random.default_rng(0).random(shape), canonical_matrix())


def test_non_numeric_is_refused(segmenter):
    with pytest.raises(InputError, match="real numbers"):
        segmenter.segment(np.ones((64, 64), dtype=bool), canonical_matrix())


def test_sagittal_slice_is_refused(segmenter):
    m = np.eye(4)
    m[:3, 0] = (0.0, 0.0, -1.0)  # rows run inferior
    m[:3, 1] = (0.0, -1.0, 0.0)  # columns run posterior: the normal is along x (sagittal)
    with pytest.raises(NonAxialSliceError, match="not axial") as info:
        segmenter.segment(phantom(), m)
    assert isinstance(info.value, InputError) and "sagittal" in str(info.value)


def test_bad_matrix_is_refused(segmenter):
    with pytest.raises(InputError, match="4x4"):
        segmenter.segment(phantom(), np.eye(3))


# ---------------------------------------------------------------------------------------------------
# Volume convenience, devices, reuse, threads


def test_segment_volume_slice_matches_segment(segmenter):
    vol = np.stack([phantom(seed=s) for s in range(3)])  # arr[k, j, i]
    ijk = np.array([[-0.9, 0, 0, 80], [0, -0.9, 0, 100], [0, 0, 4.0, -20], [0, 0, 0, 1]])
    res = segmenter.segment_volume_slice(vol, ijk, 1)
    ref = segmenter.segment(vol[1], slice_geometry_from_volume(ijk, 1))
    np.testing.assert_array_equal(res.labels, ref.labels)
    with pytest.raises(InputError, match="out of range"):
        segmenter.segment_volume_slice(vol, ijk, 3)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_devices(weights_dir):
    with pytest.raises(ParaspinalSegError, match="CUDA is not available"):
        SliceSegmenter(weights_dir / "all.json", device="cuda")
    with pytest.raises(ParaspinalSegError, match="unknown device"):
        SliceSegmenter(weights_dir / "all.json", device="tpu")
    assert SliceSegmenter(weights_dir / "all.json", device="auto").device.type == "cpu"


def test_repeated_calls_reuse_the_loaded_model(tmp_path, save_tiny_weights):
    d = tmp_path / "w"
    path = save_tiny_weights(d / "copy")
    seg = SliceSegmenter(path)
    model = seg.model
    a, m = phantom(seed=6), canonical_matrix()
    first = seg.segment(a, m)
    # The files are gone: any reload would fail.
    for p in d.iterdir():
        p.unlink()
    second = seg.segment(a, m)
    assert seg.model is model and not model.training
    np.testing.assert_array_equal(first.labels, second.labels)
    assert first.confidence == second.confidence


def test_from_model_wraps_a_loaded_model(weights_dir, segmenter):
    model, config = load_weights(weights_dir / "all.json")
    model.train()
    seg = SliceSegmenter.from_model(model, config)
    assert not seg.model.training
    a, m = phantom(seed=9), canonical_matrix()
    np.testing.assert_array_equal(seg.segment(a, m).labels, segmenter.segment(a, m).labels)


def test_two_threads_get_correct_results(segmenter):
    inputs = [(phantom(seed=7), canonical_matrix()), (phantom(160, 208, seed=8), canonical_matrix(1.1, 0.8))]
    expected = [segmenter.segment(a, m).labels for a, m in inputs]
    results: dict[int, list[np.ndarray]] = {0: [], 1: []}
    errors: list[BaseException] = []
    start = threading.Barrier(2)

    def work(i: int) -> None:
        try:
            start.wait()
            for _ in range(3):
                results[i].append(segmenter.segment(*inputs[i]).labels)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors
    for i in (0, 1):
        assert len(results[i]) == 3
        for labels in results[i]:
            np.testing.assert_array_equal(labels, expected[i])


def test_without_torch_the_error_says_how_to_install_it(weights_dir):
    code = (
        "import sys\n"
        "sys.modules['torch'] = None  # any 'import torch' now fails, as in a Slicer without PyTorch\n"
        "from ParaspinalSegLib.errors import TorchMissingError\n"
        "from ParaspinalSegLib.segmenter import SliceSegmenter\n"
        "try:\n"
        f"    SliceSegmenter({str(weights_dir / 'all.json')!r})\n"
        "except TorchMissingError as exc:\n"
        "    assert isinstance(exc, ImportError)\n"
        "    print(exc)\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "ParaspinalSeg"), str(REPO)])}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "pip install torch==" in out.stdout and "PyTorch" in out.stdout
