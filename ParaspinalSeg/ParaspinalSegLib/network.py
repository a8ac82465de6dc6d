"""BS-ESNet: boundary-sensitive detection + explicit saliency-aware segmentation in one ``torch.nn.Module``.

Layout (paper: "BS-ESNet", Sect. 2; the names below are the attribute names in the state dict):

``encoder``
    U-Net encoder shared by both networks: ``depth`` levels, level ``l`` has ``base_width * 2**l``
    channels at ``1/2**l`` of the input size; each level is two (3×3 conv, InstanceNorm(affine),
    LeakyReLU) and levels are joined by 2×2 max-pooling.
``bsn`` (boundary sensitive network, Sect. 2.1)
    ``bsn.prelim``: preliminary mask generator at 1/4 resolution. The deepest encoder features are
    reduced by a 1×1 conv, upsampled (bilinear) to 1/4 and fused with the 1/4 encoder features
    (concatenate, 3×3 conv + IN + LeakyReLU, 1×1 conv) → ``prelim_mask`` (10-class logits).
    Boundary-sensitive allocation: ``softmax(prelim_mask)`` channels 1..9 are the nine per-structure
    maps; map ``k`` goes to ``bsn.detectors[k]`` only.
    ``bsn.detectors``: nine parallel lightweight detectors (``nn.ModuleList``). Each takes its map plus
    two normalised coordinate channels (CoordConv: x along columns, y along rows, pixel centres in
    [-1, 1]) → two stride-2 3×3 convs → adaptive average pool to ``detector_pool``² (keeps the FC layers
    small whatever the input size) → two FC layers → sigmoid → ``(cx, cy, w, h)`` in [0, 1].
``decoder``
    U-Net decoder with skip connections (2×2 transposed conv up, concatenate the encoder skip, two conv
    blocks). This plus the SAG and the heads is the ESNet (Sect. 2.2).
``sag`` (spatial attention gate, at the decoder's 1/4 level)
    Query ``Q``: the (detached) boxes rasterised into nine binary maps at H/4×W/4
    (:func:`rasterise_boxes_torch`). Key ``K``: ``softmax(sag_key)`` channels 1..9, where ``sag_key`` is
    a second, separately supervised preliminary mask predicted by a 1×1 conv from the decoder's 1/4
    features. Cascade of element-wise multiply and add ``S = Q ⊙ K + K`` (keeps the key's semantics
    everywhere and doubles them inside the detected box, so a wrong box cannot erase a structure and a
    wrong semantic outside every box is not boosted), 1×1 conv 9 → 1, sigmoid → ``attention``
    ``α`` (B, 1, H/4, W/4); the decoder features at that level become ``F · α``.
``ds_heads``, ``head``
    1×1 deep-supervision heads on the decoder levels below full resolution (at their own resolution,
    coarse → fine) and the final 1×1 head at input size.

Forward output (dict): ``"logits"`` (B,10,H,W); ``"deep_supervision"`` list (coarse → fine) of
(B,10,H/2**l,W/2**l) for decoder levels l = depth-2 … 1 (empty list when off); ``"prelim_mask"``
(B,10,H/4,W/4) and ``"boxes"`` (B,9,4) when the BSN is on; ``"sag_key"`` (B,10,H/4,W/4) and
``"attention"`` (B,1,H/4,W/4) when the SAG is on. Box convention is the contract's: ``cx, w`` along
columns divided by W, ``cy, h`` along rows divided by H.

Parameter groups for the paper's asynchronous schedule: :meth:`BSESNet.bsn_parameters` (everything
under ``bsn``) and :meth:`BSESNet.esnet_parameters` (everything else). The box loss back-propagates
into the preliminary mask generator and, through it, into the encoder (the paper trains detection end
to end); the SAG uses detached boxes, since rasterisation has no useful gradient.
"""

from __future__ import annotations

from typing import Any, Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import nn

# The architecture's hyper-parameters live without torch (the weights check reads their defaults).
from .network_config import NetworkConfig

__all__ = [
    "NetworkConfig",
    "BSESNet",
    "build_network",
    "rasterise_boxes_torch",
    "count_parameters",
    "SAG_WEIGHT_INIT",
    "SAG_BIAS_INIT",
]

#: Initial weight of every key channel in the SAG's 1×1 conv and its bias. With K = softmax channels
#: 1..9 (summing to at most 1) and S = Q⊙K + K ∈ [0, 2·ΣK], α = sigmoid(1·ΣS + 1) starts in
#: [sigmoid(1), sigmoid(3)] ≈ [0.73, 0.95]: features are never zeroed at the start (the InstanceNorm of
#: the next decoder block removes most of a uniform scale anyway), and from the first step α is already
#: larger on predicted structures and larger still inside their boxes — the gate's intended direction.
SAG_WEIGHT_INIT = 1.0
SAG_BIAS_INIT = 1.0


def _conv_block(c_in: int, c_out: int, slope: float) -> nn.Sequential:
    """Two (3×3 conv, InstanceNorm(affine), LeakyReLU); conv bias is dropped because the norm removes it."""
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
        nn.InstanceNorm2d(c_out, affine=True),
        nn.LeakyReLU(slope, inplace=True),
        nn.Conv2d(c_out, c_out, 3, padding=1, bias=False),
        nn.InstanceNorm2d(c_out, affine=True),
        nn.LeakyReLU(slope, inplace=True),
    )


def coordinate_channels(batch: int, height: int, width: int, *, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """CoordConv channels (B, 2, H, W): x (columns) then y (rows), pixel centres mapped to [-1, 1]."""
    xs = (torch.arange(width, device=device, dtype=dtype) + 0.5) * (2.0 / width) - 1.0
    ys = (torch.arange(height, device=device, dtype=dtype) + 0.5) * (2.0 / height) - 1.0
    grid = torch.stack((xs.view(1, width).expand(height, width), ys.view(height, 1).expand(height, width)))
    return grid.unsqueeze(0).expand(batch, 2, height, width)


def rasterise_boxes_torch(boxes: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Rasterise normalised boxes (B, N, 4) ``(cx, cy, w, h)`` into binary maps (B, N, H, W) of 0./1.

    Same convention and arithmetic as ``boxes.rasterise_boxes`` (numpy): ``cx, w`` along columns (× W),
    ``cy, h`` along rows (× H); pixel (r, c) is inside when its centre (r + 0.5, c + 0.5) lies in the
    half-open box ``[y0, y1) × [x0, x1)`` in pixel units, edges computed in float64 and rounded to 1e-9
    pixel (so float noise cannot drop an edge pixel and both functions agree pixel for pixel).
    Output dtype is the boxes' floating dtype (float32 for integer boxes). Not differentiable (a step
    function): callers detach.
    """
    if boxes.dim() != 3 or boxes.shape[-1] != 4:
        raise ValueError(f"boxes must have shape (B, N, 4), got {tuple(boxes.shape)}")
    if height < 1 or width < 1:
        raise ValueError(f"height and width must be positive, got {height}×{width}")
    out_dtype = boxes.dtype if boxes.is_floating_point() else torch.float32
    b = boxes.detach().to(torch.float64)
    cx, cy, w, h = b.unbind(-1)
    x0, x1 = ((cx - w / 2.0) * width).round(decimals=9), ((cx + w / 2.0) * width).round(decimals=9)
    y0, y1 = ((cy - h / 2.0) * height).round(decimals=9), ((cy + h / 2.0) * height).round(decimals=9)
    cols = torch.arange(width, device=b.device, dtype=torch.float64) + 0.5
    rows = torch.arange(height, device=b.device, dtype=torch.float64) + 0.5
    in_x = (cols >= x0.unsqueeze(-1)) & (cols < x1.unsqueeze(-1))  # (B, N, W)
    in_y = (rows >= y0.unsqueeze(-1)) & (rows < y1.unsqueeze(-1))  # (B, N, H)
    return (in_y.unsqueeze(-1) & in_x.unsqueeze(-2)).to(out_dtype)


class PreliminaryMaskGenerator(nn.Module):
    """BSN's preliminary mask at 1/4 resolution from the 1/4 and deepest encoder features."""

    def __init__(self, quarter_channels: int, deepest_channels: int, width: int, num_classes: int, slope: float):
        super().__init__()
        # 1×1 at the bottom (cheap: 1/16² of the pixels) before upsampling, so the fusion conv stays narrow.
        self.reduce = nn.Conv2d(deepest_channels, width, 1)
        self.fuse = nn.Sequential(
            nn.Conv2d(quarter_channels + width, width, 3, padding=1, bias=False),
            nn.InstanceNorm2d(width, affine=True),
            nn.LeakyReLU(slope, inplace=True),
        )
        self.classify = nn.Conv2d(width, num_classes, 1)

    def forward(self, quarter: torch.Tensor, deepest: torch.Tensor) -> torch.Tensor:
        deep = self.reduce(deepest)
        if deep.shape[-2:] != quarter.shape[-2:]:
            deep = F.interpolate(deep, size=quarter.shape[-2:], mode="bilinear", align_corners=False)
        return self.classify(self.fuse(torch.cat((quarter, deep), dim=1)))


class StructureDetector(nn.Module):
    """One lightweight boundary-sensitive detector: (map + x/y coordinates) → 2 conv → pool → 2 FC → box."""

    def __init__(self, width: int, hidden: int, pool: int, slope: float):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(width, width, 3, stride=2, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(pool)
        self.fc1 = nn.Linear(width * pool * pool, hidden)
        self.fc2 = nn.Linear(hidden, 4)
        self.slope = slope

    def forward(self, structure_map: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
        """``structure_map`` (B,1,h,w), ``coords`` (B,2,h,w) → box (B,4) ``(cx, cy, w, h)`` in [0, 1]."""
        h = F.leaky_relu(self.conv1(torch.cat((structure_map, coords), dim=1)), self.slope)
        h = F.leaky_relu(self.conv2(h), self.slope)
        h = self.pool(h).flatten(1)
        h = F.leaky_relu(self.fc1(h), self.slope)
        return torch.sigmoid(self.fc2(h))


class BoundarySensitiveNetwork(nn.Module):
    """Preliminary mask generator + allocation of each structure's map to its own detector."""

    def __init__(self, config: NetworkConfig):
        super().__init__()
        c = config
        self.prelim = PreliminaryMaskGenerator(
            c.base_width * 4, c.base_width * 2 ** (c.depth - 1), c.prelim_width, c.num_classes, c.negative_slope
        )
        self.detectors = nn.ModuleList(
            StructureDetector(c.detector_width, c.detector_hidden, c.detector_pool, c.negative_slope)
            for _ in range(c.num_structures)
        )

    def forward(self, quarter: torch.Tensor, deepest: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(prelim_mask logits (B,C,h,w), boxes (B,N,4))``."""
        prelim = self.prelim(quarter, deepest)
        # Allocation: one foreground probability map per structure (background channel 0 dropped).
        maps = torch.softmax(prelim, dim=1)[:, 1:]
        b, _, h, w = maps.shape
        coords = coordinate_channels(b, h, w, device=maps.device, dtype=maps.dtype)
        boxes = torch.stack([det(maps[:, k : k + 1], coords) for k, det in enumerate(self.detectors)], dim=1)
        return prelim, boxes


class SpatialAttentionGate(nn.Module):
    """SAG: query = rasterised boxes, key = second preliminary mask; α = σ(conv1×1(Q⊙K + K))."""

    def __init__(self, channels: int, num_classes: int):
        super().__init__()
        self.key_head = nn.Conv2d(channels, num_classes, 1)
        self.gate = nn.Conv2d(num_classes - 1, 1, 1)
        nn.init.constant_(self.gate.weight, SAG_WEIGHT_INIT)
        nn.init.constant_(self.gate.bias, SAG_BIAS_INIT)

    def forward(self, features: torch.Tensor, boxes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return ``(gated features F·α, sag_key logits, α)``."""
        key_logits = self.key_head(features)
        key = torch.softmax(key_logits, dim=1)[:, 1:]
        query = rasterise_boxes_torch(boxes.detach(), features.shape[-2], features.shape[-1]).to(key.dtype)
        saliency = query * key + key
        alpha = torch.sigmoid(self.gate(saliency))
        return features * alpha, key_logits, alpha


class BSESNet(nn.Module):
    """BS-ESNet (or one of its ablations, per :class:`NetworkConfig`); see the module docstring."""

    def __init__(self, config: NetworkConfig | None = None):
        super().__init__()
        config = NetworkConfig() if config is None else config
        config.validate()
        self.config = config
        c = config
        widths = [c.base_width * 2**level for level in range(c.depth)]
        slope = c.negative_slope
        self.encoder = nn.ModuleList(
            _conv_block(c.in_channels if level == 0 else widths[level - 1], widths[level], slope)
            for level in range(c.depth)
        )
        # decoder index l = output level l (0 = full resolution … depth-2).
        self.upsample = nn.ModuleList(
            nn.ConvTranspose2d(widths[level + 1], widths[level], 2, stride=2) for level in range(c.depth - 1)
        )
        self.decoder = nn.ModuleList(_conv_block(2 * widths[level], widths[level], slope) for level in range(c.depth - 1))
        self.bsn = BoundarySensitiveNetwork(c) if c.use_bsn else None
        self.sag = SpatialAttentionGate(widths[2], c.num_classes) if c.use_sag else None
        # ds_heads[i] supervises decoder level i + 1 (levels 1 … depth-2).
        self.ds_heads = (
            nn.ModuleList(nn.Conv2d(widths[level], c.num_classes, 1) for level in range(1, c.depth - 1))
            if c.deep_supervision
            else None
        )
        self.head = nn.Conv2d(widths[0], c.num_classes, 1)

    # --- parameter groups for the asynchronous schedule ------------------------------------------
    def bsn_parameters(self) -> Iterator[nn.Parameter]:
        """Preliminary mask generator + the detectors (empty when the BSN is off)."""
        return iter(()) if self.bsn is None else self.bsn.parameters()

    def esnet_parameters(self) -> Iterator[nn.Parameter]:
        """Encoder + decoder + SAG + segmentation heads: every parameter not in :meth:`bsn_parameters`."""
        bsn_ids = {id(p) for p in self.bsn_parameters()}
        return (p for p in self.parameters() if id(p) not in bsn_ids)

    def check_input(self, x: torch.Tensor) -> None:
        """Raise ``ValueError`` unless ``x`` is (B, in_channels, H, W) with H, W usable by this depth."""
        c = self.config
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"input must be a tensor of shape (B, {c.in_channels}, H, W), got {shape}")
        if x.shape[1] != c.in_channels:
            raise ValueError(f"input has {x.shape[1]} channel(s); this network expects {c.in_channels}: shape {tuple(x.shape)}")
        if x.shape[0] < 1:
            raise ValueError("input batch is empty")
        m = c.size_multiple
        height, width = x.shape[-2:]
        if height % m or width % m:
            raise ValueError(
                f"input H×W = {height}×{width} must be multiples of 2**(depth-1) = {m} (depth {c.depth}); "
                "resample or pad the slice first"
            )
        # InstanceNorm needs more than one pixel at the bottom level.
        if height < 2 * m or width < 2 * m:
            raise ValueError(f"input H×W = {height}×{width} is too small for depth {c.depth}: need at least {2 * m}×{2 * m}")

    def forward(self, x: torch.Tensor, bsn_only: bool = False, sag_boxes: torch.Tensor | None = None) -> dict[str, Any]:
        """Run the network; see the module docstring for the keys and shapes of the returned dict.

        ``bsn_only=True`` stops after the BSN and returns only ``"prelim_mask"`` and ``"boxes"`` (the
        trainer's BSN epochs: the decoder's outputs would be computed and thrown away).
        ``sag_boxes`` (B, N, 4): boxes to rasterise as the SAG's query instead of the detected ones (a
        diagnostic: how much does the segmentation depend on the boxes? see ``training.sag_check``).
        """
        self.check_input(x)
        if bsn_only and self.bsn is None:
            raise ValueError("bsn_only=True needs a network with a BSN (this one is a plain U-Net)")
        c = self.config
        skips: list[torch.Tensor] = []
        h = x
        for level, block in enumerate(self.encoder):
            if level:
                h = F.max_pool2d(h, 2)
            h = block(h)
            skips.append(h)

        out: dict[str, Any] = {}
        boxes = None
        if self.bsn is not None:
            prelim, boxes = self.bsn(skips[2], skips[-1])
            out["prelim_mask"] = prelim
            out["boxes"] = boxes
            if bsn_only:
                return out
            if sag_boxes is not None:
                boxes = sag_boxes

        deep: list[torch.Tensor] = []
        h = skips[-1]
        alpha = None
        for level in range(c.depth - 2, -1, -1):
            h = self.decoder[level](torch.cat((self.upsample[level](h), skips[level]), dim=1))
            if level == 2 and self.sag is not None:
                assert boxes is not None  # config validation guarantees the BSN is on
                h, key_logits, alpha = self.sag(h, boxes)
                out["sag_key"] = key_logits
                out["attention"] = alpha
            elif level < 2 and alpha is not None and c.sag_apply == "all":
                h = h * F.interpolate(alpha, size=h.shape[-2:], mode="bilinear", align_corners=False)
            # At 1/4 the deep-supervision head sees the gated features, so α also gets segmentation gradient.
            if level >= 1 and self.ds_heads is not None:
                deep.append(self.ds_heads[level - 1](h))
        out["deep_supervision"] = deep
        out["logits"] = self.head(h)
        return out


def build_network(config: NetworkConfig | Mapping[str, Any] | None = None) -> BSESNet:
    """Build BS-ESNet from a :class:`NetworkConfig` (or its dict form; ``None`` = the default bsesnet)."""
    if config is None:
        config = NetworkConfig.bsesnet()
    elif isinstance(config, Mapping):
        config = NetworkConfig.from_dict(config)
    elif not isinstance(config, NetworkConfig):
        raise TypeError(f"config must be a NetworkConfig or a dict, got {type(config).__name__}")
    return BSESNet(config)


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of scalar parameters in ``model`` (only those with ``requires_grad`` if asked)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
