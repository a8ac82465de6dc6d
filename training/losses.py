"""Losses of BS-ESNet training with partially labelled sources.

Which partial-label loss, and why
---------------------------------
Our sources annotate different subsets of the nine structures (``sy_lumbar_muscle``: 1, 4–9;
``myosegmentum_lpm``: 6–9; a Slicer segmentation: whatever segments it has). Each slice carries a
*trusted* mask (10,) bool: entry ``c ≥ 1`` says the source annotates structure ``c``; entry 0 says a pixel
labelled 0 is certainly background (true for ``../shared/data``, whose README guarantees it; false for a
Slicer segmentation that lacks some segments, where an unlabelled pixel may be one of the missing ones).

The default, ``partial_label="marginal"``, is the **marginal loss** of Shi et al. 2021 ("Marginal loss and
exclusion loss for partially supervised multi-organ segmentation", Med. Image Anal. 70:101979): the
softmax probabilities of the classes the slice's source does not annotate are merged with background into
one "untrusted bucket" ``B = {0} ∪ {c : not trusted[c]}``.

* pixel labelled with a trusted structure ``c``: ordinary cross-entropy ``−log p_c``;
* pixel labelled 0 when ``trusted[0]``: ordinary cross-entropy to background (``−log p_0``): it is a true
  negative for every class;
* pixel labelled 255 (not annotated), or 0 when ``not trusted[0]``: ``−log Σ_{k∈B} p_k``.

So a 255 pixel is **never a negative for an untrusted class** (∂L/∂z_u = p_u (1 − 1/Σ_B p) ≤ 0: gradient
descent can only raise an untrusted logit there) and it costs **exactly zero for every prediction that
puts its mass on background or on untrusted classes, however split**. It only says what the data README
guarantees: "a 255 pixel is never one of the trusted classes". We keep that information because in both
public sources the 255 region is the strip between the labelled muscles and the canal/lamina/psoas:
ignoring it would leave the muscles' inner borders without any negative and let them bleed into the
posterior elements, which the evaluator counts as false positives.

``partial_label="ignore"`` is the plain alternative: pixels labelled 255 contribute exactly zero loss and
zero gradient (``ignore_index``); pixels labelled 0 with ``not trusted[0]`` still use the bucket, since
dropping them would drop every background pixel of such a slice.

All other outputs follow the paper: pixel-wise cross-entropy (the same partial-label form) for the final
logits, each deep-supervision level and both 1/4-resolution preliminary masks (BSN ``prelim_mask`` and SAG
``sag_key``), with labels reduced by the block *mode*; smooth-L1 + MSE for the boxes, only for structures
that are trusted and present in the slice.

Optional soft Dice (``loss.dice_weight`` > 0, a departure from the paper's plain cross-entropy, as in
nnU-Net's CE + Dice): added to the final logits and each deep-supervision level, per structure over the
whole batch, only over the slices whose source annotates that structure. A 255 pixel is a negative for a
trusted structure (the data guarantee it is none of them) in ``marginal`` mode and is left out in
``ignore`` mode; untrusted structures and background take no part. See :func:`partial_label_dice_loss`.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import torch
import torch.nn.functional as F

from ParaspinalSegLib.anatomy import NOT_ANNOTATED, NUM_CLASSES, NUM_STRUCTURES

from .config import DEFAULTS

#: Index used for 255 inside the mode computation (one-hot needs a dense index).
_NA_INDEX = NUM_CLASSES

#: Which loss terms each phase of the asynchronous schedule optimises.
PHASE_TERMS: dict[str, tuple[str, ...]] = {
    "joint": ("seg", "deep_supervision", "sag_key", "prelim", "boxes"),
    "esnet": ("seg", "deep_supervision", "sag_key"),
    "bsn": ("prelim", "boxes"),
}


def downsample_labels(labels: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Reduce labels (B, H, W) to ``size`` by the most frequent value in each block (255 counts as a value).

    Integer factors only (the network's levels are powers of two); ties go to the lowest value
    (background first). Returns int64.
    """
    labels = labels.long()
    h, w = size
    H, W = labels.shape[-2:]
    if (H, W) == (h, w):
        return labels
    if H % h or W % w:
        raise ValueError(f"cannot reduce labels {H}×{W} to {h}×{w}: not an integer factor")
    dense = torch.where(labels == NOT_ANNOTATED, torch.full_like(labels, _NA_INDEX), labels)
    onehot = F.one_hot(dense, _NA_INDEX + 1).permute(0, 3, 1, 2).float()
    counts = F.avg_pool2d(onehot, kernel_size=(H // h, W // w))
    mode = counts.argmax(1)
    return torch.where(mode == _NA_INDEX, torch.full_like(mode, NOT_ANNOTATED), mode)


def partial_label_cross_entropy(
    logits: torch.Tensor, labels: torch.Tensor, trusted: torch.Tensor, mode: str = "marginal"
) -> torch.Tensor:
    """Mean partial-label cross-entropy (see the module docstring) of logits (B,C,H,W) vs labels (B,H,W).

    ``trusted`` (B, C) bool. Labels are reduced to the logits' size by block mode when they differ.
    The mean is over the pixels that take part (all pixels for ``marginal``; all but the 255 pixels for
    ``ignore``), so it never depends on the logits at ignored pixels.
    """
    if mode not in ("marginal", "ignore"):
        raise ValueError(f"mode must be 'marginal' or 'ignore', got {mode!r}")
    if labels.shape[-2:] != logits.shape[-2:]:
        labels = downsample_labels(labels, tuple(logits.shape[-2:]))
    labels = labels.long()
    trusted = trusted.bool()
    logp = torch.log_softmax(logits.float(), dim=1)
    is_na = labels == NOT_ANNOTATED
    safe = torch.where(is_na, torch.zeros_like(labels), labels)
    # certain[b,h,w]: the label is a trusted class (or 0 with trusted background) → ordinary CE.
    certain = ~is_na & torch.gather(trusted, 1, safe.flatten(1)).view_as(labels)
    ce = -torch.gather(logp, 1, safe.unsqueeze(1)).squeeze(1)
    bucket = ~trusted.clone()
    bucket[:, 0] = True  # background always belongs to the untrusted bucket
    bucket_logp = logp.masked_fill(~bucket[:, :, None, None], float("-inf"))
    marginal = -torch.logsumexp(bucket_logp, dim=1)
    loss = torch.where(certain, ce, marginal)
    if mode == "ignore":
        keep = ~is_na
        return (loss * keep).sum() / keep.sum().clamp_min(1)
    return loss.mean()


def partial_label_dice_loss(
    logits: torch.Tensor, labels: torch.Tensor, trusted: torch.Tensor, mode: str = "marginal", smooth: float = 1.0
) -> torch.Tensor:
    """1 − mean soft Dice over the structures (classes ≥ 1) that some slice of the batch annotates.

    Batch Dice: for structure ``c`` the intersection and the sums run over every pixel of every slice
    whose ``trusted[b, c]`` is set (softmax probability ``p_c`` against ``labels == c``). Labels are
    reduced to the logits' size by block mode when they differ. ``mode="ignore"`` leaves 255 pixels out;
    ``"marginal"`` counts them as "not this structure", which the data guarantee for trusted structures.
    ``smooth`` (in pixels, > 0) makes a structure absent from the whole batch and not predicted score 1.
    """
    if mode not in ("marginal", "ignore"):
        raise ValueError(f"mode must be 'marginal' or 'ignore', got {mode!r}")
    if not smooth > 0:
        raise ValueError(f"smooth must be > 0, got {smooth!r}")
    if labels.shape[-2:] != logits.shape[-2:]:
        labels = downsample_labels(labels, tuple(logits.shape[-2:]))
    labels = labels.long()
    prob = torch.softmax(logits.float(), dim=1)[:, 1:]  # (B, N, H, W)
    n = prob.shape[1]
    target = (labels.unsqueeze(1) == torch.arange(1, n + 1, device=labels.device).view(1, -1, 1, 1)).float()
    weight = trusted[:, 1:].float()[:, :, None, None]
    if mode == "ignore":
        weight = weight * (labels != NOT_ANNOTATED).float().unsqueeze(1)
    inter = (prob * target * weight).sum((0, 2, 3))
    denom = ((prob + target) * weight).sum((0, 2, 3))
    used = trusted[:, 1:].bool().any(0)
    if not bool(used.any()):
        return logits.sum() * 0.0
    dice = (2.0 * inter + smooth) / (denom + smooth)
    return 1.0 - dice[used].mean()


def boxes_from_labels_torch(labels: torch.Tensor, num_structures: int = NUM_STRUCTURES) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch twin of ``ParaspinalSegLib.boxes.boxes_from_labels`` for a batch (B, H, W), on the labels' device.

    Returns ``boxes`` (B, N, 4) normalised ``(cx, cy, w, h)`` (contract convention: a mask filling columns
    c0..c1-1 has cx = (c0+c1)/2/W, w = (c1-c0)/W; zeros where absent) and ``present`` (B, N) bool. Kept on
    the GPU so recomputing boxes after augmentation costs no host round trip; a test checks it against
    the library function.
    """
    B, H, W = labels.shape
    values = torch.arange(1, num_structures + 1, device=labels.device).view(1, -1, 1, 1)
    masks = labels.long().unsqueeze(1) == values  # (B, N, H, W)
    rows = masks.any(3)  # (B, N, H)
    cols = masks.any(2)  # (B, N, W)
    present = rows.any(2)
    ar_h = torch.arange(H, device=labels.device)
    ar_w = torch.arange(W, device=labels.device)
    r0 = torch.where(rows, ar_h, H).amin(2)
    r1 = torch.where(rows, ar_h, -1).amax(2) + 1
    c0 = torch.where(cols, ar_w, W).amin(2)
    c1 = torch.where(cols, ar_w, -1).amax(2) + 1
    boxes = torch.stack(((c0 + c1) / 2 / W, (r0 + r1) / 2 / H, (c1 - c0) / W, (r1 - r0) / H), dim=-1).float()
    boxes = torch.where(present.unsqueeze(-1), boxes, torch.zeros_like(boxes))
    return boxes, present


def box_loss(pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor, beta: float = 0.05) -> torch.Tensor:
    """Smooth-L1 + MSE between boxes (B,N,4), averaged over the ``valid`` (B,N) entries (0 when none)."""
    valid = valid.bool()
    if not bool(valid.any()):
        return pred.sum() * 0.0
    p, t = pred.float()[valid], target.float()[valid]
    return F.smooth_l1_loss(p, t, beta=beta) + F.mse_loss(p, t)


def training_loss(
    out: Mapping[str, Any],
    labels: torch.Tensor,
    trusted: torch.Tensor,
    phase: str = "joint",
    weights: Optional[Mapping[str, Any]] = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Total loss of one batch for a schedule ``phase`` ("joint", "esnet", "bsn") and its parts (floats).

    ``out`` is the network's forward dict; ``labels`` (B,H,W) with 255; ``trusted`` (B,10) bool.
    ``weights``: the config's ``loss`` section (keys left out: ``training.config.DEFAULTS["loss"]``, the one
    place the defaults live). Terms whose output is absent (ablations) are skipped.
    """
    w = {**DEFAULTS["loss"], **(weights or {})}
    mode = w["partial_label"]
    dice_w = float(w["dice_weight"])

    def seg_loss(x: torch.Tensor) -> torch.Tensor:
        loss = partial_label_cross_entropy(x, labels, trusted, mode)
        if dice_w > 0:
            loss = loss + dice_w * partial_label_dice_loss(x, labels, trusted, mode)
        return loss

    terms = PHASE_TERMS[phase]
    parts: dict[str, torch.Tensor] = {}
    if "seg" in terms:
        parts["seg"] = seg_loss(out["logits"])
    ds = out.get("deep_supervision") or []
    if "deep_supervision" in terms and ds:
        n = len(ds)
        # coarse → fine: the finest level weighs deep_supervision_weight, each coarser one half as much.
        parts["deep_supervision"] = sum(
            w["deep_supervision_weight"] * 0.5 ** (n - 1 - i) * seg_loss(x) for i, x in enumerate(ds)
        )
    if "sag_key" in terms and "sag_key" in out:
        parts["sag_key"] = w["sag_key_weight"] * partial_label_cross_entropy(out["sag_key"], labels, trusted, mode)
    if "prelim" in terms and "prelim_mask" in out:
        parts["prelim"] = w["prelim_weight"] * partial_label_cross_entropy(out["prelim_mask"], labels, trusted, mode)
    if "boxes" in terms and "boxes" in out:
        target, present = boxes_from_labels_torch(labels)
        valid = present & trusted[:, 1:].bool()
        parts["boxes"] = w["box_weight"] * box_loss(out["boxes"], target, valid)
    if not parts:
        raise ValueError(f"phase {phase!r} has no loss term for this network's outputs {sorted(out)}")
    total = sum(parts.values())
    return total, {k: float(v.detach()) for k, v in parts.items()}
