"""BS-ESNet's architecture hyper-parameters (:class:`NetworkConfig`), without torch.

Kept apart from ``network.py`` so that code which must not import torch (the weights-file check that runs
before anything is built, Slicer's Python before PyTorch is installed) reads the one set of defaults.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping

from .anatomy import NUM_CLASSES

__all__ = ["NetworkConfig", "SAG_APPLY"]

#: Allowed values of ``NetworkConfig.sag_apply``.
SAG_APPLY = ("quarter", "all")


@dataclass
class NetworkConfig:
    """Architecture hyper-parameters of BS-ESNet; stored with the weights (see ``weights.py``).

    The class methods give the paper's configurations: :meth:`bsesnet` (default, everything on),
    :meth:`unet` (baseline: no BSN, no SAG, no deep supervision), :meth:`without_sag` (BSN trained and
    detecting, decoder not gated) and :meth:`without_deep_supervision`.
    """

    in_channels: int = 1
    num_classes: int = NUM_CLASSES
    #: Channels of encoder level 0; level l has base_width * 2**l.
    base_width: int = 16
    #: Number of encoder levels (resolution 1/2**(depth-1) at the bottom); at least 3 (the BSN and SAG
    #: work at 1/4).
    depth: int = 5
    use_bsn: bool = True
    use_sag: bool = True
    deep_supervision: bool = True
    #: Channels of the preliminary mask generator's fusion conv.
    prelim_width: int = 32
    #: Channels of each detector's two convs.
    detector_width: int = 16
    #: Hidden units of each detector's first FC layer.
    detector_hidden: int = 64
    #: Each detector pools its conv features to detector_pool × detector_pool before the FC layers. 8 (the
    #: shipped configs): with 4 the boxes underfit (held-out box IoU 50–68 % against 74 % with 8).
    detector_pool: int = 8
    #: Slope of every LeakyReLU.
    negative_slope: float = 0.01
    #: Where the SAG's attention map α (computed at the decoder's 1/4 level) scales decoder features:
    #: ``"quarter"`` only the 1/4 level; ``"all"`` the 1/4 level and every finer decoder level (α
    #: upsampled bilinearly), so the ungated encoder skips cannot route around the gate.
    sag_apply: str = "quarter"

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first inconsistent setting."""
        positive = ("in_channels", "base_width", "prelim_width", "detector_width", "detector_hidden", "detector_pool")
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"NetworkConfig.{name} must be a positive integer, got {value!r}")
        if isinstance(self.num_classes, bool) or not isinstance(self.num_classes, int) or self.num_classes < 2:
            raise ValueError(f"NetworkConfig.num_classes must be an integer ≥ 2 (background + structures), got {self.num_classes!r}")
        if isinstance(self.depth, bool) or not isinstance(self.depth, int) or self.depth < 3:
            raise ValueError(
                f"NetworkConfig.depth must be an integer ≥ 3 (the BSN and SAG work at 1/4 resolution), got {self.depth!r}"
            )
        for name in ("use_bsn", "use_sag", "deep_supervision"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"NetworkConfig.{name} must be True or False, got {getattr(self, name)!r}")
        if self.use_sag and not self.use_bsn:
            raise ValueError(
                "NetworkConfig.use_sag=True requires use_bsn=True: the spatial attention gate's query is the "
                "BSN's detected boxes (use NetworkConfig.unet() for the plain U-Net)"
            )
        if self.use_sag and self.depth < 4:
            raise ValueError(
                "NetworkConfig.use_sag=True requires depth ≥ 4: the gate acts on the decoder's 1/4 level, which "
                f"a depth-{self.depth} network never decodes"
            )
        if self.sag_apply not in SAG_APPLY:
            raise ValueError(f"NetworkConfig.sag_apply must be one of {SAG_APPLY}, got {self.sag_apply!r}")
        if not isinstance(self.negative_slope, (int, float)) or isinstance(self.negative_slope, bool) or self.negative_slope < 0:
            raise ValueError(f"NetworkConfig.negative_slope must be a number ≥ 0, got {self.negative_slope!r}")

    @property
    def num_structures(self) -> int:
        """Foreground classes = number of BSN detectors = SAG query/key channels."""
        return self.num_classes - 1

    @property
    def size_multiple(self) -> int:
        """Input H and W must be multiples of this (2**(depth-1))."""
        return 2 ** (self.depth - 1)

    # --- the paper's configurations ---------------------------------------------------------------
    @classmethod
    def bsesnet(cls, **overrides: Any) -> "NetworkConfig":
        """Full BS-ESNet: BSN + SAG + deep supervision (the default)."""
        return cls(**{"use_bsn": True, "use_sag": True, "deep_supervision": True, **overrides})

    @classmethod
    def unet(cls, **overrides: Any) -> "NetworkConfig":
        """Baseline U-Net: the same encoder/decoder without BSN, SAG or deep supervision."""
        return cls(**{"use_bsn": False, "use_sag": False, "deep_supervision": False, **overrides})

    @classmethod
    def without_sag(cls, **overrides: Any) -> "NetworkConfig":
        """Ablation "without SAG" (BS-U-Net): the BSN is trained and detects, the decoder is not gated."""
        return cls(**{"use_bsn": True, "use_sag": False, "deep_supervision": True, **overrides})

    @classmethod
    def without_deep_supervision(cls, **overrides: Any) -> "NetworkConfig":
        """Ablation "without deep supervision": BSN + SAG, only the final head is supervised."""
        return cls(**{"use_bsn": True, "use_sag": True, "deep_supervision": False, **overrides})

    # --- serialisation ------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict of every field."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "NetworkConfig":
        """Inverse of :meth:`to_dict`; missing keys take defaults, unknown keys raise ``ValueError``.

        Rejecting unknown keys catches weights written by another architecture (or a newer version)
        instead of silently building a different network.
        """
        if not isinstance(data, Mapping):
            raise ValueError(f"network config must be a mapping, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(
                f"unknown network config key(s) {unknown}: not a BS-ESNet config of this version "
                f"(known keys: {sorted(known)})"
            )
        return cls(**dict(data))
