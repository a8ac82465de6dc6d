"""Batch augmentation on the model window, in torch (runs on the GPU next to the data, or cheaply on CPU).

The window already shows every slice in the patient's axes at one spacing, centred on the labelled structures
(``data.prepare_records``), so the spatial transforms act in patient space: the rotation stands for a patient
lying or a spine turning a little (±12°), the scale for body size (0.85–1.15), the shift (±0.1 of the window,
10 mm at 0.8 mm × 256) for where inference's first look places the window (within 10 mm of the structures'
centre, ``preprocessing.RECENTRE_TOLERANCE_MM``).

Spatial (one resampling per sample): small rotation, isotropic scaling with a little anisotropy, shear,
shift and a smooth elastic displacement (random offsets on a 4×4 grid, bicubically upsampled); images are
resampled bilinearly, labels by nearest neighbour (255 stays 255). Left-right flip: an exact column flip
that also swaps the patient-left/right labels (``anatomy.LEFT_RIGHT_SWAP``) and the trusted mask, since a
flipped left psoas is a right psoas. Intensity: gamma, contrast, brightness, a smooth multiplicative bias
field and Gaussian noise. Boxes are not transformed here: the loss recomputes them from the augmented
labels (``losses.boxes_from_labels_torch``), so they always match.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Optional

import torch
import torch.nn.functional as F

from ParaspinalSegLib.anatomy import LEFT_RIGHT_SWAP, NUM_CLASSES


def _lut(device: torch.device) -> torch.Tensor:
    """256-entry label lookup table that swaps left and right (0..3 and 255 unchanged)."""
    lut = torch.arange(256, dtype=torch.long, device=device)
    lut[:NUM_CLASSES] = torch.tensor(LEFT_RIGHT_SWAP, dtype=torch.long, device=device)
    return lut


def flip_left_right(
    images: torch.Tensor, labels: torch.Tensor, trusted: Optional[torch.Tensor] = None
) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Mirror canonical slices across the midline: flip columns and swap left/right label values.

    ``images`` (B,C,H,W), ``labels`` (B,H,W) uint8/long, ``trusted`` (B,10) bool (permuted the same way).
    """
    lut = _lut(labels.device)
    images = torch.flip(images, dims=(-1,))
    labels = lut[torch.flip(labels, dims=(-1,)).long()].to(labels.dtype)
    if trusted is not None:
        trusted = trusted[:, lut[:NUM_CLASSES]]
    return images, labels, trusted


def _uniform(n: int, low: float, high: float, g: torch.Generator, device: torch.device) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=g, device=device)


def augment_batch(
    images: torch.Tensor,
    labels: torch.Tensor,
    trusted: torch.Tensor,
    cfg: Mapping[str, Any],
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Randomly augment a batch; returns new ``(images, labels, trusted)`` (inputs are not modified).

    ``cfg`` is the config's ``augmentation`` section, every key present (``training.config.DEFAULTS``); ``generator`` lives on the data's device, so a run
    with a fixed seed augments identically.
    """
    if not cfg["enabled"]:
        return images, labels, trusted
    B, _, H, W = images.shape
    dev = images.device
    g = generator
    images = images.float()

    # --- spatial -----------------------------------------------------------------------------------
    spatial = torch.rand(B, generator=g, device=dev) < cfg["p_spatial"]
    if bool(spatial.any()):
        idx = spatial.nonzero().squeeze(1)
        n = idx.numel()
        ang = _uniform(n, -1, 1, g, dev) * math.radians(cfg["rotation_deg"])
        lo, hi = cfg["scale"]
        scale = _uniform(n, lo, hi, g, dev)
        aniso = _uniform(n, -1, 1, g, dev) * 0.05 * (hi > lo)
        sx, sy = scale * (1 + aniso), scale * (1 - aniso)
        shear = _uniform(n, -1, 1, g, dev) * cfg["shear"]
        shift = (torch.rand(n, 2, generator=g, device=dev) * 2 - 1) * 2 * cfg["shift"]
        cos, sin = torch.cos(ang), torch.sin(ang)
        # theta maps output → input normalised coordinates; 1/scale so scale > 1 enlarges the anatomy.
        a11, a12 = cos / sx, (-sin + shear * cos) / sx
        a21, a22 = sin / sy, (cos + shear * sin) / sy
        theta = torch.stack(
            (torch.stack((a11, a12, shift[:, 0]), 1), torch.stack((a21, a22, shift[:, 1]), 1)), 1
        )
        grid = F.affine_grid(theta, (n, 1, H, W), align_corners=False)
        px = cfg["elastic_px"]
        if px > 0:
            coarse = torch.randn(n, 2, 4, 4, generator=g, device=dev) * (2.0 * px / max(H, W))
            grid = grid + F.interpolate(coarse, size=(H, W), mode="bicubic", align_corners=False).permute(0, 2, 3, 1)
        images = images.clone()
        labels = labels.clone()
        images[idx] = F.grid_sample(images[idx], grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        lab = F.grid_sample(labels[idx].unsqueeze(1).float(), grid, mode="nearest", padding_mode="zeros", align_corners=False)
        labels[idx] = lab.squeeze(1).round().to(labels.dtype)

    # --- left-right flip ------------------------------------------------------------------------------
    flip = torch.rand(B, generator=g, device=dev) < cfg["p_flip"]
    if bool(flip.any()):
        idx = flip.nonzero().squeeze(1)
        fi, fl, ft = flip_left_right(images[idx], labels[idx], trusted[idx])
        images, labels, trusted = images.clone(), labels.clone(), trusted.clone()
        images[idx], labels[idx], trusted[idx] = fi, fl, ft

    # --- intensity --------------------------------------------------------------------------------------
    inten = torch.rand(B, generator=g, device=dev) < cfg["p_intensity"]
    if bool(inten.any()):
        idx = inten.nonzero().squeeze(1)
        n = idx.numel()
        x = images[idx].clamp_min(0)
        glo, ghi = cfg["gamma"]
        gamma = torch.exp(_uniform(n, math.log(glo), math.log(ghi), g, dev)).view(n, 1, 1, 1)
        x = x.pow(gamma)
        bf = cfg["bias_field"]
        if bf > 0:
            coarse = torch.randn(n, 1, 3, 3, generator=g, device=dev) * bf
            x = x * torch.exp(F.interpolate(coarse, size=(H, W), mode="bicubic", align_corners=False))
        clo, chi = cfg["contrast"]
        contrast = _uniform(n, clo, chi, g, dev).view(n, 1, 1, 1)
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        x = (x - mean) * contrast + mean
        x = x + _uniform(n, -1, 1, g, dev).view(n, 1, 1, 1) * cfg["brightness"]
        sigma = torch.rand(n, 1, 1, 1, generator=g, device=dev) * cfg["noise_std"]
        x = x + sigma * torch.randn(x.shape, generator=g, device=dev)
        images = images.clone()
        images[idx] = x
    return images, labels, trusted
