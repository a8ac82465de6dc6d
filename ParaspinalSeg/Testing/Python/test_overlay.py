"""overlay: radiological display from the matrix, contours and boxes in anatomy colours, PNG writing."""

from __future__ import annotations

import numpy as np
import pytest

from ParaspinalSegLib import anatomy, overlay

N = 40


def _anatomy_lps():
    """A slice stored like an ITK identity volume: rows → posterior, columns → patient left.

    Right psoas (5) sits at patient right (small column index), anterior (small row index);
    left erector spinae (8) at patient left, posterior.
    """
    image = np.full((N, N), 100.0)
    labels = np.zeros((N, N), np.uint8)
    labels[5:12, 4:12] = 5
    labels[28:36, 26:34] = 8
    image[labels > 0] = 300.0
    m = np.eye(4)
    m[:3, 0] = (0.0, -1.0, 0.0)  # axis 0 (rows) → posterior
    m[:3, 1] = (-1.0, 0.0, 0.0)  # axis 1 (cols) → patient left
    m[:3, 2] = (0.0, 0.0, 1.0)
    return image, labels, m


def _colour(value: int) -> np.ndarray:
    return overlay._rgb255(anatomy.BY_VALUE[value].color)


def _where(picture: np.ndarray, value: int) -> np.ndarray:
    """Display pixels carrying exactly the structure's contour colour."""
    return np.all(picture == _colour(value), axis=-1)


def test_patient_right_is_on_the_viewers_left_and_anterior_up():
    image, labels, m = _anatomy_lps()
    pic = overlay.render_overlay(image, labels, m, legend=False)
    assert pic.dtype == np.uint8 and pic.shape[2] == 3
    h, w = pic.shape[:2]
    rows5, cols5 = np.nonzero(_where(pic, 5))
    rows8, cols8 = np.nonzero(_where(pic, 8))
    assert rows5.size and rows8.size
    assert cols5.max() < w / 2 < cols8.min()  # right psoas on the viewer's left
    assert rows5.max() < h / 2 < rows8.min()  # anterior at the top


@pytest.mark.parametrize("layout", ["ras_flipped", "transposed", "both"])
def test_picture_does_not_depend_on_storage_layout(layout):
    image, labels, m = _anatomy_lps()
    reference = overlay.render_overlay(image, labels, m, legend=False)
    img2, lab2, m2 = image.copy(), labels.copy(), m.copy()
    if layout in ("ras_flipped", "both"):
        # Same anatomy stored with both axes reversed: steps point anterior / patient right.
        img2, lab2 = img2[::-1, ::-1], lab2[::-1, ::-1]
        m2[:3, 0], m2[:3, 1] = -m2[:3, 0], -m2[:3, 1]
        m2[:3, 3] = m[:3, :3] @ [N - 1, N - 1, 0] + m[:3, 3]
    if layout in ("transposed", "both"):
        img2, lab2 = img2.T, lab2.T
        m2[:3, [0, 1]] = m2[:3, [1, 0]]
        m2[:3, 2] = -m2[:3, 2]  # keep a right-handed frame; the normal flips sign
    np.testing.assert_array_equal(overlay.render_overlay(img2, lab2, m2, legend=False), reference)


def test_anisotropic_pixels_are_drawn_square_in_mm():
    image, labels, m = _anatomy_lps()
    m[:3, 0] *= 2.0  # rows are 2 mm, columns 1 mm
    pic = overlay.render_overlay(image, labels, m, legend=False, min_size=80)
    assert pic.shape[:2] == (80, 40)  # 40 rows × 2 mm, 40 columns × 1 mm, at 1 display px per mm


def test_boxes_are_drawn_in_structure_colour():
    image, labels, m = _anatomy_lps()
    labels[:] = 0  # no contours: only the box may carry the colour
    pic = overlay.render_overlay(image, labels, m, {7: (10.0, 20.0, 20.0, 30.0)}, legend=False, min_size=N)
    assert pic.shape[:2] == (N, N)
    box = _where(pic, 7)
    assert box[10, 20:30].all() and box[19, 20:30].all() and box[10:20, 20].all() and box[10:20, 29].all()
    assert not box[11:19, 21:29].any()  # outline only
    assert box.sum() == 2 * 10 + 2 * 8


def test_legend_panel_and_structures_marked_found():
    image, labels, m = _anatomy_lps()
    plain = overlay.render_overlay(image, labels, m, legend=False)
    full = overlay.render_overlay(image, labels, m, title="case 1")
    assert full.shape[1] == plain.shape[1] + overlay.LEGEND_WIDTH
    h, w = plain.shape[:2]
    # Away from the side letters (R, L, A, P at the edges) the picture is the plain one.
    np.testing.assert_array_equal(full[30 : h // 2 - 20, 30 : w - 30], plain[30 : h // 2 - 20, 30 : w - 30])
    assert not np.array_equal(full[:h, :w], plain)  # ... and the letters were drawn
    panel = full[:, plain.shape[1]:]
    # Found structures' swatches are in full colour, absent ones dimmed.
    assert np.all(panel == _colour(5), axis=-1).any()
    assert not np.all(panel == _colour(1), axis=-1).any()


def test_png_writer_round_trips(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, size=(13, 17, 3), dtype=np.uint8)
    path = overlay.write_png(rgb, tmp_path / "x.png")
    assert path.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    np.testing.assert_array_equal(np.asarray(Image.open(path).convert("RGB")), rgb)


def test_save_overlay_writes_png(tmp_path):
    image, labels, m = _anatomy_lps()
    out = overlay.save_overlay(tmp_path / "case_overlay.png", image, labels, m, title="case")
    assert out.read_bytes()[:4] == b"\x89PNG"


def test_rejects_mismatched_arrays():
    image, labels, m = _anatomy_lps()
    with pytest.raises(ValueError):
        overlay.render_overlay(image, labels[:-1], m)


def test_flagged_structures_get_a_red_frame_and_others_do_not():
    image, labels, m = _anatomy_lps()
    red = np.all(overlay.render_overlay(image, labels, m, legend=False, flagged=[8]) == overlay.FLAG_RGB, axis=-1)
    assert red.any()
    rows, cols = np.nonzero(red)
    # The frame surrounds the left erector spinae, which is drawn at the bottom right (posterior, patient left).
    assert rows.min() > red.shape[0] // 2 and cols.min() > red.shape[1] // 2
    plain = overlay.render_overlay(image, labels, m, legend=False)
    assert not np.all(plain == overlay.FLAG_RGB, axis=-1).any()
    # A flag for a structure that is not on the slice draws nothing.
    assert not np.all(overlay.render_overlay(image, labels, m, legend=False, flagged=[1]) == overlay.FLAG_RGB, axis=-1).any()
