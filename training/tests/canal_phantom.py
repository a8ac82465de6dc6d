"""A synthetic axial T2 slice with a known dural sac and posterior arch, for the derivation's tests.

Drawn in mm on the shared-data grid (i → patient left, j → posterior), T2-like: CSF and fat bright, the
arch intermediate, muscles and disc dark. The labels are what a sy-style source has: disc, psoas,
multifidus and erector drawn, 255 in the hull of them, 0 outside. Known truths: the canal (CSF ellipse with
its roots) and the arch (laminae + articular processes + spinous process), as boolean masks.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SPACING = 0.4  # mm
SIZE = 256


@dataclass
class Phantom:
    image: np.ndarray
    labels: np.ndarray
    canal: np.ndarray
    lamina: np.ndarray
    spacing: tuple[float, float] = (SPACING, SPACING)


def _ellipse(x, y, cx, cy, ax, ay):
    return ((x - cx) / ax) ** 2 + ((y - cy) / ay) ** 2 <= 1


def canal_phantom(seed: int = 0, angle_deg: float = 0.0, canal_axes: tuple[float, float] = (9.0, 6.0),
                  fat_triangle: bool = False, root_layer_mm: float = 0.0) -> Phantom:
    """The phantom, optionally rotated in-plane by ``angle_deg`` about the disc's posterior midline point.

    ``fat_triangle``: posterior epidural fat (brighter than CSF) joined to the back of the sac with no root
    row between them, as on many real slices; it is neither canal nor arch.
    ``root_layer_mm``: roots settled in a grey layer this thick on the back wall of the sac (part of the
    canal), with the fat triangle behind it.
    """
    fat_triangle = fat_triangle or root_layer_mm > 0
    rng = np.random.default_rng(seed)
    ii, jj = np.meshgrid(np.arange(SIZE) * SPACING, np.arange(SIZE) * SPACING, indexing="ij")
    cx, cy = SIZE * SPACING / 2, 40.0  # disc's posterior border on the midline
    t = np.deg2rad(angle_deg)
    # Body coordinates: x lateral (+ patient left), y posterior from the disc's posterior border.
    x = (ii - cx) * np.cos(t) + (jj - cy) * np.sin(t)
    y = -(ii - cx) * np.sin(t) + (jj - cy) * np.cos(t)
    labels = np.zeros((SIZE, SIZE), np.uint8)
    image = np.full((SIZE, SIZE), 20.0)
    ax, ay = canal_axes
    canal = _ellipse(x, y, 0, ay + 0.5, ax, ay)
    roots = np.zeros_like(canal)
    for u0 in (-4.5, -1.5, 1.5, 4.5):
        roots |= _ellipse(x, y, u0, 2 * ay - 1.2, 0.8, 0.8)
    if fat_triangle:  # the roots then lie in the middle of the sac, not on its back wall
        roots = np.zeros_like(canal)
        for u0 in (-3.0, 0.0, 3.0):
            roots |= _ellipse(x, y, u0, ay + 0.5, 0.8, 0.8)
    roots &= canal
    centre = ay + 0.5
    ring = _ellipse(x, y, 0, centre, ax + 1.0, ay + 1.0) & ~canal & (y < centre)
    arch = ((np.abs(x) < 18) & (y >= centre) & (y < centre + 15) & ~canal) | ((np.abs(x) < 3) & (y >= centre + 15) & (y < 52))
    # Fatty marrow in the laminae: bright pockets inside the arch, part of it.
    marrow = (_ellipse(x, y, 10, centre + 8, 2.5, 1.8) | _ellipse(x, y, -10, centre + 8, 2.5, 1.8)) & arch
    back = 2 * ay + 0.5
    triangle = (y >= back - 1.5) & (y < back + 6) & (np.abs(x) < 0.7 * (back + 6 - y)) & ~canal if fat_triangle else np.zeros_like(canal)
    arch &= ~triangle
    structures = (
        (1, _ellipse(x, y, 0, -14, 22, 14), 60),
        (4, _ellipse(x, y, 28, -2, 7, 8), 70),
        (5, _ellipse(x, y, -28, -2, 7, 8), 70),
        (6, _ellipse(x, y, 11.5, 32, 8, 10), 50),
        (7, _ellipse(x, y, -11.5, 32, 8, 10), 50),
        (8, _ellipse(x, y, 30, 30, 10, 12), 55),
        (9, _ellipse(x, y, -30, 30, 10, 12), 55),
    )
    from skimage.morphology import convex_hull_image

    drawn = np.zeros_like(canal)
    for _, m, _ in structures:
        drawn |= m
    hull = convex_hull_image(drawn)
    labels[hull] = 255
    image[hull] = 230.0  # fat
    for value, m, grey in structures:
        labels[m] = value
        image[m] = grey
    free = labels == 255
    image[free & arch] = 90.0
    image[free & marrow] = 215.0
    image[free & ring] = 40.0
    image[free & canal] = 200.0  # CSF: a little darker than fat on fast spin echo
    image[free & triangle] = 250.0
    image[free & roots] = 40.0
    if root_layer_mm > 0:
        image[free & canal & (y > 2 * ay + 0.5 - root_layer_mm)] = 90.0
    image += rng.normal(0, 3, image.shape)
    return Phantom(image=image.astype(np.float32), labels=labels, canal=canal & free, lamina=arch & free & ~drawn)
