"""Partial-label losses, mode downsampling and torch box targets."""

import numpy as np
import torch
import torch.nn.functional as F

from ParaspinalSegLib.boxes import boxes_from_labels
from training.config import DEFAULTS
from training.losses import (
    box_loss,
    boxes_from_labels_torch,
    downsample_labels,
    partial_label_cross_entropy,
    partial_label_dice_loss,
    training_loss,
)

TRUST_SY = torch.tensor([[True, True, False, False, True, True, True, True, True, True]])


def _case(seed=0, H=8, W=8):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(1, 10, H, W, generator=g)
    labels = torch.randint(0, 10, (1, H, W), generator=g)
    labels[labels == 2] = 0  # untrusted classes never appear as labels
    labels[labels == 3] = 0
    labels[:, :3, :] = 255
    return logits, labels


def test_trusted_pixels_are_ordinary_cross_entropy():
    logits, labels = _case()
    labels[labels == 255] = 0
    for mode in ("marginal", "ignore"):
        ours = partial_label_cross_entropy(logits, labels, TRUST_SY, mode)
        assert torch.allclose(ours, F.cross_entropy(logits, labels), atol=1e-6)


def test_255_pixels_contribute_zero_loss_with_ignore():
    logits, labels = _case()
    base = partial_label_cross_entropy(logits, labels, TRUST_SY, "ignore")
    changed = logits.clone()
    changed[:, :, :3, :] = torch.randn(1, 10, 3, 8) * 50  # anything at the 255 pixels
    changed.requires_grad_(True)
    loss = partial_label_cross_entropy(changed, labels, TRUST_SY, "ignore")
    assert torch.allclose(loss, base)
    loss.backward()
    assert torch.count_nonzero(changed.grad[:, :, :3, :]) == 0
    assert torch.count_nonzero(changed.grad[:, :, 3:, :]) > 0


def test_255_pixels_zero_loss_when_mass_is_background_or_untrusted_marginal():
    """Marginal loss: a 255 pixel costs exactly 0 however its mass is split among background and untrusted classes."""
    labels = torch.full((1, 4, 4), 255)
    for split in ([0.0, 0.0, 0.0], [0.0, 40.0, 0.0], [0.0, 0.0, 40.0], [30.0, 30.0, 30.0]):
        logits = torch.full((1, 10, 4, 4), -60.0)
        logits[:, 0], logits[:, 2], logits[:, 3] = split[0], split[1], split[2]
        assert float(partial_label_cross_entropy(logits, labels, TRUST_SY, "marginal")) < 1e-12
    # ... but it is a negative for trusted classes (a 255 pixel is never one of them).
    logits = torch.zeros(1, 10, 4, 4)
    logits[:, 6] = 5.0
    expected = -np.log(3 / (np.exp(5.0) + 9))  # bucket {0, 2, 3} of 10 classes, class 6 at logit 5
    assert abs(float(partial_label_cross_entropy(logits, labels, TRUST_SY, "marginal")) - expected) < 1e-5


def test_255_pixels_never_push_untrusted_classes_down():
    logits, labels = _case(seed=3)
    logits.requires_grad_(True)
    partial_label_cross_entropy(logits, labels, TRUST_SY, "marginal").backward()
    g = logits.grad[0, :, :3, :]  # 255 rows
    assert (g[2] <= 0).all() and (g[3] <= 0).all() and (g[0] <= 0).all()
    assert (g[6] >= 0).all()  # trusted class: pushed down where not annotated


def test_zero_label_is_ambiguous_when_background_untrusted():
    trusted = torch.tensor([[False, False, False, False, False, False, True, True, True, True]])
    labels = torch.zeros(1, 2, 2, dtype=torch.long)
    logits = torch.full((1, 10, 2, 2), -50.0)
    logits[:, 4] = 10.0  # psoas: not annotated by this source, so a label-0 pixel may be psoas
    assert float(partial_label_cross_entropy(logits, labels, trusted)) < 1e-9
    trusted[0, 0] = True  # now 0 means certain background
    assert float(partial_label_cross_entropy(logits, labels, trusted)) > 50


def test_downsample_labels_mode_keeps_255():
    labels = torch.zeros(1, 8, 8, dtype=torch.uint8)
    labels[0, :4, :4] = 255
    labels[0, 4:, 4:] = 7
    labels[0, 4, 4] = 0
    out = downsample_labels(labels, (2, 2))
    assert out.tolist() == [[[255, 0], [0, 7]]]


def test_torch_boxes_match_library():
    rng = np.random.default_rng(0)
    labels = np.zeros((3, 20, 24), np.uint8)
    labels[0, 2:7, 3:11] = 4
    labels[1, 10:19, 0:5] = 9
    labels[1, 0:1, 23:24] = 1
    labels[2] = rng.integers(0, 10, (20, 24))
    labels[2, :5] = 255
    boxes, present = boxes_from_labels_torch(torch.from_numpy(labels))
    for b in range(3):
        ref_b, ref_p = boxes_from_labels(labels[b])
        assert np.array_equal(present[b].numpy(), ref_p)
        assert np.allclose(boxes[b].numpy(), ref_b, atol=1e-6)


def test_box_loss_only_over_valid_and_phase_terms():
    pred = torch.rand(2, 9, 4)
    target = pred.clone()
    target[0, 3] += 0.5
    valid = torch.zeros(2, 9, dtype=torch.bool)
    valid[1] = True
    assert float(box_loss(pred, target, valid)) == 0.0
    valid[0, 3] = True
    assert float(box_loss(pred, target, valid)) > 0.0
    out = {"logits": torch.randn(1, 10, 8, 8), "deep_supervision": [torch.randn(1, 10, 4, 4)],
           "prelim_mask": torch.randn(1, 10, 2, 2), "sag_key": torch.randn(1, 10, 2, 2), "boxes": torch.rand(1, 9, 4)}
    labels = torch.zeros(1, 8, 8, dtype=torch.long)
    labels[0, 2:5, 2:5] = 6
    _, parts = training_loss(out, labels, TRUST_SY, "esnet")
    assert set(parts) == {"seg", "deep_supervision", "sag_key"}
    _, parts = training_loss(out, labels, TRUST_SY, "bsn")
    assert set(parts) == {"prelim", "boxes"}
    _, parts = training_loss(out, labels, TRUST_SY, "joint")
    assert set(parts) == {"seg", "deep_supervision", "sag_key", "prelim", "boxes"}


def _confident(labels, value=20.0):
    logits = torch.full((labels.shape[0], 10, *labels.shape[-2:]), -value)
    return logits.scatter_(1, torch.where(labels == 255, 0, labels).long().unsqueeze(1), value)


def test_dice_loss_zero_for_perfect_and_known_value_for_half_overlap():
    labels = torch.zeros(1, 8, 8, dtype=torch.long)
    labels[0, 0:4, 0:4] = 6  # 16 pixels
    assert float(partial_label_dice_loss(_confident(labels), labels, TRUST_SY, smooth=1e-3)) < 1e-6
    pred = torch.zeros_like(labels)
    pred[0, 0:4, 2:6] = 6  # 8 of 16 overlap → Dice 0.5 for class 6; the other trusted classes are absent
    loss = partial_label_dice_loss(_confident(pred), labels, TRUST_SY, smooth=1.0)
    n_trusted = 7  # 1, 4..9; absent classes with no prediction score (0 + 1) / (0 + 1) = 1
    assert abs(float(loss) - (1 - (6 + (2 * 8 + 1) / (32 + 1)) / n_trusted)) < 1e-4


def test_dice_loss_untrusted_classes_and_255_pixels():
    labels = torch.zeros(1, 8, 8, dtype=torch.long)
    labels[0, 0:4, 0:4] = 6
    labels[0, 6:, :] = 255
    logits = _confident(labels)
    logits[0, 2, 6:, :] = 40.0  # canal (untrusted) where not annotated: allowed
    assert float(partial_label_dice_loss(logits, labels, TRUST_SY, "marginal", smooth=1e-3)) < 1e-6
    logits[0, 6, 6:, :] = 80.0  # left multifidus (trusted) where not annotated: a false positive ...
    # class 6: 16 true + 16 false-positive pixels → (2·16 + 1) / (32 + 16 + 1); six absent classes score 1
    expected = (1 - 33 / 49) / 7
    assert abs(float(partial_label_dice_loss(logits, labels, TRUST_SY, "marginal")) - expected) < 1e-4
    # ... unless 255 pixels are ignored altogether.
    assert float(partial_label_dice_loss(logits, labels, TRUST_SY, "ignore", smooth=1e-3)) < 1e-6


def test_dice_weight_adds_to_segmentation_terms_only():
    g = torch.Generator().manual_seed(1)
    out = {"logits": torch.randn(1, 10, 8, 8, generator=g), "deep_supervision": [torch.randn(1, 10, 4, 4, generator=g)],
           "prelim_mask": torch.randn(1, 10, 2, 2, generator=g)}
    labels = torch.zeros(1, 8, 8, dtype=torch.long)
    labels[0, 2:6, 2:6] = 6
    _, plain = training_loss(out, labels, TRUST_SY, "joint", {"dice_weight": 0.0})
    _, dice = training_loss(out, labels, TRUST_SY, "joint", {"dice_weight": 1.0})
    # No second default: leaving the weights out means the config's defaults (dice_weight 1.0 there).
    _, default = training_loss(out, labels, TRUST_SY, "joint")
    assert default == training_loss(out, labels, TRUST_SY, "joint", DEFAULTS["loss"])[1] == dice
    assert dice["seg"] > plain["seg"] and dice["deep_supervision"] > plain["deep_supervision"]
    assert dice["prelim"] == plain["prelim"]
