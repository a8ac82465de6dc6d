"""Training configuration: one JSON file per experiment (``training/configs/*.json``).

:data:`DEFAULTS` is the one place every default lives: the schedule, losses, augmentation and trainer read
the sections of a loaded config as they are. A config file may name a ``"base"`` config (the ablations
name ``bsesnet``) and hold only what differs from it.

A config names the network preset (``bsesnet``, ``unet``, ``without_sag``, ``without_deep_supervision``)
plus overrides, the model input grid, the loss weights, the augmentation strengths and the asynchronous
schedule. Unknown keys raise ``ValueError`` so a typo never silently trains with a default.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Mapping

from ParaspinalSegLib.preprocessing import ModelInput, NormalisationConfig

CONFIG_DIR = Path(__file__).resolve().parent / "configs"

#: Every key a config may hold, with its default. Nested dicts are merged key by key.
DEFAULTS: dict[str, Any] = {
    "name": "bsesnet",
    # Network preset (a NetworkConfig class method) and field overrides (e.g. base_width).
    "network": {"preset": "bsesnet"},
    # The model window (pixels of spacing_mm along the patient's axes, size × size) and the intensity
    # normalisation recorded with the weights: the library's own defaults (preprocessing.ModelInput /
    # NormalisationConfig), which inference uses too, so they are written once.
    "model_input": ModelInput().to_dict(),
    "normalisation": NormalisationConfig().to_dict(),
    # Dixon sources (a *_fat image next to the water image): also train on the in-phase image water + fat,
    # whose bright fat resembles T2 TSE (training.data.load_source_folder).
    "dixon_in_phase": True,
    "epochs": 200,
    "batch_size": 4,
    "seed": 0,
    "deterministic": True,
    "amp": True,
    "optimizer": {
        "lr_esnet": 1e-3,
        "lr_bsn": 1e-3,
        "weight_decay": 1e-4,
        # Polynomial decay of both learning rates over the run: lr * (1 - epoch/epochs) ** poly_power.
        "poly_power": 0.9,
        "grad_clip": 12.0,
    },
    # The paper's multi-task asynchronous schedule (Sect. 2.2).
    "schedule": {
        "joint_epochs": 10,
        "esnet_epochs_per_cycle": 9,
        "bsn_epochs_per_cycle": 1,
        "final_bsn_epochs": 10,
    },
    "loss": {
        # "marginal" (partial-label loss, default) or "ignore"; see training.losses.
        "partial_label": "marginal",
        "deep_supervision_weight": 0.5,
        "prelim_weight": 0.5,
        "sag_key_weight": 0.5,
        "box_weight": 5.0,
        # Soft Dice added to the cross-entropy of the final and deep-supervision outputs (0 = the paper's
        # plain cross-entropy; 1 gave +0.6 Dice points on a held-out fold, see training/README.md);
        # see training.losses.partial_label_dice_loss.
        "dice_weight": 1.0,
    },
    "augmentation": {
        "enabled": True,
        "p_spatial": 0.8,
        "rotation_deg": 12.0,
        "scale": [0.85, 1.15],
        # ±2·shift of the half-window: 0.1 → ±20.5 mm, the first look's placement tolerance (preprocessing).
        "shift": 0.1,
        "shear": 0.05,
        "elastic_px": 3.0,
        "p_flip": 0.5,
        "p_intensity": 0.8,
        "gamma": [0.7, 1.5],
        "contrast": [0.75, 1.25],
        "brightness": 0.1,
        "bias_field": 0.3,
        "noise_std": 0.03,
    },
    # Validation every N epochs (0 = never); the best checkpoint is chosen by validation Dice.
    "val_every": 5,
    "checkpoint_every": 1,
}


def _merge(base: dict[str, Any], update: Mapping[str, Any], where: str) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in update.items():
        if key not in base:
            raise ValueError(f"unknown config key {where}{key!r}; known: {sorted(base)}")
        if isinstance(base[key], dict) and key != "network":
            if not isinstance(value, Mapping):
                raise ValueError(f"config key {where}{key!r} must be an object")
            out[key] = _merge(base[key], value, f"{where}{key}.")
        elif key == "network":
            if not isinstance(value, Mapping):
                raise ValueError("config key 'network' must be an object")
            out[key] = {**base[key], **dict(value)}
        else:
            out[key] = copy.deepcopy(value)
    return out


def _resolve_base(data: Mapping[str, Any], seen: tuple[str, ...] = ()) -> dict[str, Any]:
    """A config file's keys with its ``"base"`` config's underneath (ablations share the main recipe).

    The derived file's keys win, nested sections key by key, except ``network``: a derived ``network``
    that names a ``preset`` replaces the base's whole network (another architecture's options do not
    carry over).
    """
    data = dict(data)
    base_name = data.pop("base", None)
    if base_name is None:
        return data
    if base_name in seen:
        raise ValueError(f"config base cycle: {' -> '.join(seen + (base_name,))}")
    path = CONFIG_DIR / f"{base_name}.json"
    if not path.is_file():
        raise FileNotFoundError(f"base config {base_name!r} not found in {CONFIG_DIR}")
    out = _resolve_base(json.loads(path.read_text(encoding="utf-8")), seen + (base_name,))
    for key, value in data.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping) and not (key == "network" and "preset" in value):
            out[key] = {**out[key], **value}
        else:
            out[key] = value
    return out


def load_config(path_or_name: str | Path | Mapping[str, Any] | None = None, **overrides: Any) -> dict[str, Any]:
    """Load a config (a path, a name in ``training/configs``, a dict, or ``None`` = defaults).

    ``overrides`` are merged on top (top-level keys, nested dicts merged), e.g. ``epochs=2``.
    """
    data: Mapping[str, Any]
    if path_or_name is None:
        data = {}
    elif isinstance(path_or_name, Mapping):
        data = path_or_name
    else:
        path = Path(path_or_name)
        if not path.exists() and (CONFIG_DIR / f"{path_or_name}.json").exists():
            path = CONFIG_DIR / f"{path_or_name}.json"
        if not path.exists():
            raise FileNotFoundError(f"config {path_or_name!r} not found (looked in {path} and {CONFIG_DIR})")
        data = json.loads(path.read_text(encoding="utf-8"))
    config = _merge(DEFAULTS, _resolve_base(data), "")
    config = _merge(config, overrides, "")
    if config["loss"]["partial_label"] not in ("marginal", "ignore"):
        raise ValueError("loss.partial_label must be 'marginal' or 'ignore'")
    return config


def network_config(config: Mapping[str, Any]):
    """Build the library's ``NetworkConfig`` from ``config["network"]`` (preset + overrides)."""
    from ParaspinalSegLib.network import NetworkConfig

    net = dict(config["network"])
    preset = net.pop("preset", "bsesnet")
    factory = getattr(NetworkConfig, preset, None)
    if preset.startswith("_") or factory is None or not callable(factory):
        raise ValueError(f"unknown network preset {preset!r}; use bsesnet, unet, without_sag, without_deep_supervision")
    return factory(**net)
