"""Small synthetic axial slices with known anatomy for the trainer's tests (no files needed)."""

from __future__ import annotations

import numpy as np

from training.data import SliceRecord, trusted_mask

#: Structures drawn: (value, centre along i (toward patient left), centre along j (toward posterior), radii).
_BLOBS = (
    (1, 0.50, 0.38, 0.12, 0.06),  # disc
    (4, 0.66, 0.45, 0.06, 0.06),  # psoas left (i grows toward patient left)
    (5, 0.34, 0.45, 0.06, 0.06),  # psoas right
    (6, 0.56, 0.70, 0.05, 0.06),  # multifidus left
    (7, 0.44, 0.70, 0.05, 0.06),  # multifidus right
    (8, 0.68, 0.68, 0.07, 0.08),  # erector left
    (9, 0.32, 0.68, 0.07, 0.08),  # erector right
)


def nifti_like_matrix(spacing: float = 1.0) -> np.ndarray:
    """Slice IJK-to-RAS of the shared-data grid: axis 0 → patient left (−x), axis 1 → posterior (−y)."""
    return np.array([[-spacing, 0, 0, 0], [0, -spacing, 0, 0], [0, 0, 1.0, 0], [0, 0, 0, 1]], dtype=float)


def synthetic_slice(n: int = 64, seed: int = 0, spacing: float = 1.0, trusted=(1, 4, 5, 6, 7, 8, 9), source: str = "synth", subject: str | None = None) -> SliceRecord:
    """A body ellipse with seven labelled blobs; each structure has its own brightness; 255 ring around the disc."""
    rng = np.random.default_rng(seed)
    ii, jj = np.meshgrid(np.arange(n) / n, np.arange(n) / n, indexing="ij")
    labels = np.zeros((n, n), np.uint8)
    body = ((ii - 0.5) / 0.45) ** 2 + ((jj - 0.55) / 0.38) ** 2 < 1
    image = 100.0 * body
    jitter = rng.uniform(-0.02, 0.02, size=(len(_BLOBS), 2))
    for (v, ci, cj, ri, rj), (di, dj) in zip(_BLOBS, jitter):
        m = ((ii - ci - di) / ri) ** 2 + ((jj - cj - dj) / rj) ** 2 < 1
        labels[m] = v
        image[m] = 150 + 25 * v
    # Not-annotated strip between disc and muscles (like the public sources' 255 regions).
    strip = body & (labels == 0) & (np.abs(jj - 0.55) < 0.04) & (np.abs(ii - 0.5) < 0.2)
    labels[strip] = 255
    keep = trusted_mask(trusted)
    labels[(labels != 255) & (labels != 0) & ~keep[np.minimum(labels, 9)]] = 255
    image = image + rng.normal(0, 5, image.shape)
    return SliceRecord(source, f"{source}{seed:03d}", subject or f"S{seed:03d}", image.astype(np.float32), labels, nifti_like_matrix(spacing), keep)


def tiny_config(**over):
    """A tiny CPU config (64² input, base width 4)."""
    from training.config import load_config

    cfg = {
        "name": "tiny_test",
        "network": {"preset": "bsesnet", "base_width": 4, "depth": 4, "prelim_width": 8, "detector_width": 4, "detector_hidden": 16},
        "model_input": {"spacing_mm": 1.0, "size": 64},
        "epochs": 2,
        "batch_size": 2,
        "amp": False,
        "optimizer": {"lr_esnet": 3e-3, "lr_bsn": 3e-3},
        "augmentation": {"enabled": False},
        "val_every": 1,
    }
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(cfg.get(k), dict):
            cfg[k] = {**cfg[k], **v}
        else:
            cfg[k] = v
    return load_config(cfg)
