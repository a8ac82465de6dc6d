"""The paper's multi-task asynchronous training schedule (BS-ESNet Sect. 2.2).

Epochs ``[0, joint_epochs)``: BSN and ESNet together ("joint"). Then cycles of
``esnet_epochs_per_cycle`` ESNet epochs followed by ``bsn_epochs_per_cycle`` BSN epochs. The last
``final_bsn_epochs`` epochs train the BSN alone ("bsn"). In an ESNet epoch the ESNet parameters
(encoder, decoder, SAG, heads) train and the BSN is frozen; in a BSN epoch the BSN parameters
(preliminary mask generator + detectors) train and the encoder is frozen. A network without a BSN
(plain U-Net) trains "joint" every epoch.

Every function takes the config's ``schedule`` / ``optimizer`` section as it is; the defaults live in
``training.config.DEFAULTS`` only (a missing key is a ``KeyError``, never a second default).
"""

from __future__ import annotations

from typing import Any, Mapping

import torch

PHASES = ("joint", "esnet", "bsn")


def phase_for_epoch(epoch: int, epochs: int, schedule: Mapping[str, Any], has_bsn: bool = True) -> str:
    """Phase of 0-based ``epoch`` in a run of ``epochs`` epochs."""
    if not 0 <= epoch < epochs:
        raise ValueError(f"epoch {epoch} outside 0..{epochs - 1}")
    if not has_bsn:
        return "joint"
    joint = int(schedule["joint_epochs"])
    n_es = int(schedule["esnet_epochs_per_cycle"])
    n_bsn = int(schedule["bsn_epochs_per_cycle"])
    final = int(schedule["final_bsn_epochs"])
    if epoch < joint:
        return "joint"
    if epoch >= epochs - final:
        return "bsn"
    cycle = n_es + n_bsn
    if cycle <= 0:
        return "joint"
    return "esnet" if (epoch - joint) % cycle < n_es else "bsn"


def build_optimizer(model: torch.nn.Module, optimizer_cfg: Mapping[str, Any]) -> torch.optim.Optimizer:
    """AdamW with two named parameter groups, ``"esnet"`` and ``"bsn"`` (the latter may be empty)."""
    esnet = list(model.esnet_parameters())
    bsn = list(model.bsn_parameters())
    groups = [{"params": esnet, "name": "esnet", "base_lr": float(optimizer_cfg["lr_esnet"])}]
    if bsn:
        groups.append({"params": bsn, "name": "bsn", "base_lr": float(optimizer_cfg["lr_bsn"])})
    for g in groups:
        g["lr"] = g["base_lr"]
    return torch.optim.AdamW(groups, weight_decay=float(optimizer_cfg["weight_decay"]))


def trains_group(phase: str, group: str) -> bool:
    """Whether parameter group ``group`` ("esnet"/"bsn") is optimised in ``phase``."""
    return phase == "joint" or phase == group


def esnet_training_epochs(epochs: int, schedule: Mapping[str, Any], has_bsn: bool = True) -> int:
    """Epochs at the start of a run in which the ESNet still trains (all but the final BSN-only ones)."""
    return epochs - int(schedule["final_bsn_epochs"]) if has_bsn else epochs


def apply_phase(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    phase: str,
    epoch: int,
    epochs: int,
    poly_power: float = 0.9,
    esnet_epochs: int | None = None,
) -> None:
    """Set ``requires_grad`` and each optimizer group's learning rate for ``phase`` at ``epoch``.

    Frozen groups get ``requires_grad=False`` (no gradient is even computed) *and* ``lr = 0`` (so
    AdamW's momentum or weight decay cannot move them either). Trained groups follow a polynomial decay:
    the BSN's over the whole run, the ESNet's over its own ``esnet_epochs`` (default ``epochs``; see
    :func:`esnet_training_epochs`), so it has annealed when the final BSN-only epochs freeze it however
    many of those there are.
    """
    if phase not in PHASES:
        raise ValueError(f"unknown phase {phase!r}")
    span = {"esnet": esnet_epochs or epochs, "bsn": epochs}
    for group in optimizer.param_groups:
        on = trains_group(phase, group["name"])
        for p in group["params"]:
            p.requires_grad_(on)
        end = max(span.get(group["name"], epochs), 1)
        decay = max(0.0, 1.0 - epoch / end) ** poly_power
        group["lr"] = group["base_lr"] * decay if on else 0.0
