"""Batch augmentation on the model window, in torch (runs on the GPU next to the data, or cheaply on CPU).

The window already shows every slice in the patient's axes at one spacing, centred on the labelled structures
(``data.prepare_records``), so the spatial transforms act in patient space: the rotation stands for a patient
lying or a spine turning a little (±12°), the scale for body size (0.85–1.15), the shift (±0.2 of the half-window,
20.5 mm at 0.8 mm × 256, on top of the lattice's ±6.4 mm) for where inference's first look leaves the window
(within 25 mm of the structures' centre, ``preprocessing.RECENTRE_TOLERANCE_MM``).

Spatial (one resampling per sample): small rotation, isotropic scaling with a little anisotropy, shear,
shift and a smooth elastic displacement (random offsets on a 4×4 grid, bicubically upsampled); images are
resampled bilinearly, labels by nearest neighbour (255 stays 255). Left-right flip: an exact column flip
that also swaps the patient-left/right labels (``anatomy.LEFT_RIGHT_SWAP``) and the trusted mask, since a
flipped left psoas is a right psoas. Intensity: gamma, contrast, brightness, a smooth multiplicative bias
field and Gaussian noise. Boxes are not transformed here: the loss recomputes them from the augmented
labels (``losses.boxes_from_labels_torch``), so they always match.

:func:`augment_batch` applies :data:`AUGMENTATIONS` in order — :func:`spatial`, :func:`left_right_flip`,
:func:`intensity` — each a small function of ``(batch, cfg, generator)``; :func:`intensity` is itself the
steps of :data:`INTENSITY_STEPS`. Each is tested on its own; the order of random draws is fixed, so a seed
gives the same augmentation as before the split.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Optional

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


#: (images (B,1,H,W) float, labels (B,H,W), trusted (B,10) bool)
Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def _uniform(n: int, low: float, high: float, g: torch.Generator, device: torch.device) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=g, device=device)


def _chosen(batch_size: int, p: float, g: torch.Generator, device: torch.device) -> torch.Tensor:
    """Indices of the samples a transform applies to (each with probability ``p``)."""
    return (torch.rand(batch_size, generator=g, device=device) < p).nonzero().squeeze(1)


# --- spatial ------------------------------------------------------------------------------------------

def affine_grid(n: int, H: int, W: int, cfg: Mapping[str, Any], g: torch.Generator, device: torch.device) -> torch.Tensor:
    """Sampling grids (n,H,W,2) of random rotation, scale (slightly anisotropic), shear and shift."""
    ang = _uniform(n, -1, 1, g, device) * math.radians(cfg["rotation_deg"])
    lo, hi = cfg["scale"]
    scale = _uniform(n, lo, hi, g, device)
    aniso = _uniform(n, -1, 1, g, device) * 0.05 * (hi > lo)
    sx, sy = scale * (1 + aniso), scale * (1 - aniso)
    shear = _uniform(n, -1, 1, g, device) * cfg["shear"]
    shift = (torch.rand(n, 2, generator=g, device=device) * 2 - 1) * 2 * cfg["shift"]
    cos, sin = torch.cos(ang), torch.sin(ang)
    # theta maps output → input normalised coordinates; 1/scale so scale > 1 enlarges the anatomy.
    a11, a12 = cos / sx, (-sin + shear * cos) / sx
    a21, a22 = sin / sy, (cos + shear * sin) / sy
    theta = torch.stack((torch.stack((a11, a12, shift[:, 0]), 1), torch.stack((a21, a22, shift[:, 1]), 1)), 1)
    return F.affine_grid(theta, (n, 1, H, W), align_corners=False)


def elastic(grid: torch.Tensor, cfg: Mapping[str, Any], g: torch.Generator) -> torch.Tensor:
    """``grid`` plus a smooth random displacement of about ``elastic_px`` pixels (4×4 offsets, bicubic)."""
    px = cfg["elastic_px"]
    if px <= 0:
        return grid
    n, H, W, _ = grid.shape
    coarse = torch.randn(n, 2, 4, 4, generator=g, device=grid.device) * (2.0 * px / max(H, W))
    return grid + F.interpolate(coarse, size=(H, W), mode="bicubic", align_corners=False).permute(0, 2, 3, 1)


def spatial(batch: Batch, cfg: Mapping[str, Any], g: torch.Generator) -> Batch:
    """Resample a ``p_spatial`` share of the samples on an affine + elastic grid (labels: nearest, 255 kept)."""
    images, labels, trusted = batch
    B, _, H, W = images.shape
    idx = _chosen(B, cfg["p_spatial"], g, images.device)
    if idx.numel() == 0:
        return batch
    grid = elastic(affine_grid(idx.numel(), H, W, cfg, g, images.device), cfg, g)
    images, labels = images.clone(), labels.clone()
    images[idx] = F.grid_sample(images[idx], grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    lab = F.grid_sample(labels[idx].unsqueeze(1).float(), grid, mode="nearest", padding_mode="zeros", align_corners=False)
    labels[idx] = lab.squeeze(1).round().to(labels.dtype)
    return images, labels, trusted


# --- left-right flip ----------------------------------------------------------------------------------

def left_right_flip(batch: Batch, cfg: Mapping[str, Any], g: torch.Generator) -> Batch:
    """Mirror a ``p_flip`` share of the samples (:func:`flip_left_right`: left and right labels swapped)."""
    images, labels, trusted = batch
    idx = _chosen(images.shape[0], cfg["p_flip"], g, images.device)
    if idx.numel() == 0:
        return batch
    fi, fl, ft = flip_left_right(images[idx], labels[idx], trusted[idx])
    images, labels, trusted = images.clone(), labels.clone(), trusted.clone()
    images[idx], labels[idx], trusted[idx] = fi, fl, ft
    return images, labels, trusted


# --- intensity ----------------------------------------------------------------------------------------

def gamma(x: torch.Tensor, cfg: Mapping[str, Any], g: torch.Generator) -> torch.Tensor:
    """``x ** γ`` per sample, γ log-uniform in ``cfg["gamma"]`` (x ≥ 0)."""
    lo, hi = cfg["gamma"]
    n = x.shape[0]
    return x.pow(torch.exp(_uniform(n, math.log(lo), math.log(hi), g, x.device)).view(n, 1, 1, 1))


def bias_field(x: torch.Tensor, cfg: Mapping[str, Any], g: torch.Generator) -> torch.Tensor:
    """A smooth multiplicative field ``exp(bicubic 3×3 noise · bias_field)``."""
    strength = cfg["bias_field"]
    if strength <= 0:
        return x
    n, _, H, W = x.shape
    coarse = torch.randn(n, 1, 3, 3, generator=g, device=x.device) * strength
    return x * torch.exp(F.interpolate(coarse, size=(H, W), mode="bicubic", align_corners=False))


def contrast(x: torch.Tensor, cfg: Mapping[str, Any], g: torch.Generator) -> torch.Tensor:
    """Scale each sample about its mean by a factor uniform in ``cfg["contrast"]``."""
    lo, hi = cfg["contrast"]
    factor = _uniform(x.shape[0], lo, hi, g, x.device).view(-1, 1, 1, 1)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * factor + mean


def brightness(x: torch.Tensor, cfg: Mapping[str, Any], g: torch.Generator) -> torch.Tensor:
    """Add an offset uniform in ``±brightness`` per sample."""
    return x + _uniform(x.shape[0], -1, 1, g, x.device).view(-1, 1, 1, 1) * cfg["brightness"]


def noise(x: torch.Tensor, cfg: Mapping[str, Any], g: torch.Generator) -> torch.Tensor:
    """Gaussian noise with a per-sample SD uniform in ``[0, noise_std]``."""
    sigma = torch.rand(x.shape[0], 1, 1, 1, generator=g, device=x.device) * cfg["noise_std"]
    return x + sigma * torch.randn(x.shape, generator=g, device=x.device)


#: The intensity steps, in the order they are applied (and draw their random numbers).
INTENSITY_STEPS: tuple[Callable[[torch.Tensor, Mapping[str, Any], torch.Generator], torch.Tensor], ...] = (
    gamma, bias_field, contrast, brightness, noise,
)


def intensity(batch: Batch, cfg: Mapping[str, Any], g: torch.Generator) -> Batch:
    """Apply :data:`INTENSITY_STEPS` to a ``p_intensity`` share of the samples (negative values clamped first)."""
    images, labels, trusted = batch
    idx = _chosen(images.shape[0], cfg["p_intensity"], g, images.device)
    if idx.numel() == 0:
        return batch
    x = images[idx].clamp_min(0)
    for step in INTENSITY_STEPS:
        x = step(x, cfg, g)
    images = images.clone()
    images[idx] = x
    return images, labels, trusted


#: The batch transforms of :func:`augment_batch`, in order.
AUGMENTATIONS: tuple[Callable[[Batch, Mapping[str, Any], torch.Generator], Batch], ...] = (spatial, left_right_flip, intensity)


def augment_batch(
    images: torch.Tensor,
    labels: torch.Tensor,
    trusted: torch.Tensor,
    cfg: Mapping[str, Any],
    generator: torch.Generator,
) -> Batch:
    """Randomly augment a batch; returns new ``(images, labels, trusted)`` (inputs are not modified).

    ``cfg`` is the config's ``augmentation`` section, every key present (``training.config.DEFAULTS``);
    ``generator`` lives on the data's device, so a run with a fixed seed augments identically.
    """
    if not cfg["enabled"]:
        return images, labels, trusted
    batch: Batch = (images.float(), labels, trusted)
    for transform in AUGMENTATIONS:
        batch = transform(batch, cfg, generator)
    return batch
