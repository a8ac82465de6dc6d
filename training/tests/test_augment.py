"""Augmentation: the left-right flip swaps patient left/right labels, boxes and trusted classes."""

import numpy as np
import torch

from ParaspinalSegLib.anatomy import BY_KEY
from training.config import DEFAULTS
from training.augment import augment_batch, flip_left_right
from training.losses import boxes_from_labels_torch

L_PSOAS, R_PSOAS = BY_KEY["psoas_major_left"].value, BY_KEY["psoas_major_right"].value
L_MF, R_ES = BY_KEY["multifidus_left"].value, BY_KEY["erector_spinae_right"].value


def _batch():
    img = torch.zeros(1, 1, 16, 16)
    lab = torch.zeros(1, 16, 16, dtype=torch.uint8)
    # canonical columns run patient right → left: left psoas on the right half of the image
    lab[0, 4:8, 10:14] = L_PSOAS
    img[0, 0, 4:8, 10:14] = 1.0
    lab[0, 9:12, 1:3] = R_ES
    lab[0, 0:2, 7:9] = 1  # disc, midline value stays
    lab[0, 14:16, 0:4] = 255
    trusted = torch.zeros(1, 10, dtype=torch.bool)
    trusted[0, [0, 1, L_PSOAS, L_MF]] = True  # a source that annotates only some left structures
    return img, lab, trusted


def test_flip_swaps_left_right_labels_and_trusted():
    img, lab, trusted = _batch()
    fi, fl, ft = flip_left_right(img, lab, trusted)
    assert (fl[0, 4:8, 2:6] == R_PSOAS).all() and not (fl == L_PSOAS).any()
    assert (fl[0, 9:12, 13:15] == BY_KEY["erector_spinae_left"].value).all()
    assert (fl[0, 0:2, 7:9] == 1).all() and (fl[0, 14:16, 12:16] == 255).all()
    assert torch.equal(fi[0, 0], torch.flip(img[0, 0], dims=(-1,)))
    assert ft[0].nonzero().flatten().tolist() == [0, 1, R_PSOAS, BY_KEY["multifidus_right"].value]
    # boxes recomputed from the flipped labels are the mirrored boxes, moved to the other side's row
    b0, p0 = boxes_from_labels_torch(lab)
    b1, p1 = boxes_from_labels_torch(fl)
    assert p1[0, R_PSOAS - 1] and not p1[0, L_PSOAS - 1]
    assert torch.allclose(b1[0, R_PSOAS - 1], torch.tensor([1 - b0[0, L_PSOAS - 1, 0], *b0[0, L_PSOAS - 1, 1:]]))
    # flipping twice gives the original back
    bi, bl, bt = flip_left_right(fi, fl, ft)
    assert torch.equal(bl, lab) and torch.equal(bt, trusted) and torch.equal(bi, img)


def test_augment_batch_flip_only_and_spatial_keeps_label_values():
    img, lab, trusted = _batch()
    img, lab, trusted = img.repeat(8, 1, 1, 1), lab.repeat(8, 1, 1), trusted.repeat(8, 1)
    cfg = {**DEFAULTS["augmentation"], "p_flip": 1.0, "p_spatial": 0.0, "p_intensity": 0.0}
    _, fl, ft = augment_batch(img, lab, trusted, cfg, torch.Generator().manual_seed(0))
    assert torch.equal(fl, flip_left_right(img, lab)[1])
    full = {"enabled": True, "p_flip": 0.5, "p_spatial": 1.0, "rotation_deg": 15, "scale": [0.9, 1.1], "shift": 0.05, "shear": 0.05,
            "elastic_px": 2.0, "p_intensity": 1.0, "gamma": [0.7, 1.5], "contrast": [0.8, 1.2], "brightness": 0.1,
            "bias_field": 0.3, "noise_std": 0.03}
    a1 = augment_batch(img, lab, trusted, full, torch.Generator().manual_seed(1))
    a2 = augment_batch(img, lab, trusted, full, torch.Generator().manual_seed(1))
    assert torch.equal(a1[0], a2[0]) and torch.equal(a1[1], a2[1])  # deterministic with a seed
    assert set(a1[1].unique().tolist()) <= {0, 1, L_PSOAS, R_PSOAS, BY_KEY["erector_spinae_left"].value, R_ES, 255}
    assert not torch.equal(a1[0], img) and a1[0].shape == img.shape
    assert torch.isfinite(a1[0]).all()


def test_each_transform_on_its_own():
    from training import augment as A

    g = torch.Generator().manual_seed(0)
    cfg = dict(DEFAULTS["augmentation"])
    x = torch.rand(3, 1, 16, 16) + 0.1
    # Intensity steps with degenerate ranges are exact, so each step's own effect is visible.
    assert torch.allclose(A.gamma(x, {**cfg, "gamma": [2.0, 2.0]}, g), x ** 2)
    assert torch.equal(A.bias_field(x, {**cfg, "bias_field": 0.0}, g), x)
    doubled = A.contrast(x, {**cfg, "contrast": [2.0, 2.0]}, g)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    assert torch.allclose(doubled - mean, 2 * (x - mean), atol=1e-6)
    assert torch.equal(A.brightness(x, {**cfg, "brightness": 0.0}, g), x)
    assert torch.equal(A.noise(x, {**cfg, "noise_std": 0.0}, g), x)
    biased = A.bias_field(x, {**cfg, "bias_field": 0.3}, g)
    assert (biased > 0).all() and not torch.equal(biased, x)
    # Spatial: the identity parameters give the identity grid; no elastic offset when elastic_px is 0.
    still = {**cfg, "rotation_deg": 0.0, "scale": [1.0, 1.0], "shear": 0.0, "shift": 0.0, "elastic_px": 0.0}
    grid = A.affine_grid(2, 16, 16, still, g, x.device)
    identity = torch.nn.functional.affine_grid(torch.eye(2, 3).expand(2, 2, 3), (2, 1, 16, 16), align_corners=False)
    assert torch.allclose(grid, identity, atol=1e-6) and torch.equal(A.elastic(grid, still, g), grid)
    img, lab, trusted = _batch()
    moved = A.spatial((img, lab, trusted), {**still, "p_spatial": 1.0}, g)
    assert torch.equal(moved[1], lab) and torch.allclose(moved[0], img, atol=1e-5)
    assert A.spatial((img, lab, trusted), {**cfg, "p_spatial": 0.0}, g)[0] is img
    flipped = A.left_right_flip((img, lab, trusted), {**cfg, "p_flip": 1.0}, g)
    assert all(torch.equal(a, b) for a, b in zip(flipped, flip_left_right(img, lab, trusted)))
    assert A.AUGMENTATIONS == (A.spatial, A.left_right_flip, A.intensity)
