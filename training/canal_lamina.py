"""Derive spinal-canal (dural sac) and lamina (posterior arch) masks inside the not-annotated band of a slice.

Rules on the anatomical frame of ``training.spine_frame`` (all lengths in mm) and on T2 intensity:

* **canal** — the dural sac: CSF-bright with dark roots, just posterior to the disc on the midline.
  Bright = above ``bright_fraction`` of the way from the band's dark level to the CSF level sampled
  behind the disc. Region growing from the bright component that fills most of the space behind the
  disc on the midline (seeded at its pixel nearest the disc's posterior midline point);
  an opening of radius ``opening_mm`` cuts the thin bright strips that join it (anterior and foraminal
  epidural fat) and keeps the sac; columns of the frame whose depth is under ``column_depth_fraction``
  of the deepest are trimmed (the same strips where they are thick); the sac is the convex hull of what
  remains plus the dark roots inside it (the dura is a smooth convex-ish tube at disc level), cut
  posterior to the last roots when bright posterior epidural fat hangs on behind them, and in front of
  the first posterior row clearly brighter than the sac's CSF (that fat is brighter than CSF on FSE); a
  grey layer of roots (≤ ``root_layer_mm``) between the CSF and posterior epidural fat is taken in.
* **lamina** — the posterior arch (laminae, spinous process, articular processes) as one segment: the
  band pixels that are not bright (bone cortex is dark, marrow intermediate; fat, CSF and joint fluid
  bright), posterior to the canal's centre, medial to the multifidi on the rows they occupy and within
  their lateral reach in front of them; bright pockets it encloses (fatty marrow, facet-joint fluid) are
  filled unless they touch the canal (epidural fat), and crumbs are removed.

Everything is a plain function of arrays on the shared-data grid ``a[i, j]`` (i → patient left, j →
posterior). The review in ``docs/derived-labels.md`` says where these rules hold.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Mapping, Optional

import numpy as np
from scipy import ndimage as ndi

from ParaspinalSegLib.anatomy import BY_KEY, NOT_ANNOTATED
from training.spine_frame import SpineFrame, spine_frame

CANAL = BY_KEY["spinal_canal"].value
LAMINA = BY_KEY["lamina"].value


@dataclass(frozen=True)
class DerivationParams:
    """Tunable rules; a per-slice override (``docs/derived-labels.csv``) replaces any of them."""

    #: Bright threshold between the band's dark level (30th percentile) and the CSF level (95th percentile behind the disc).
    bright_fraction: float = 0.5
    #: Radius of the opening that detaches thin bright strips from the sac.
    opening_mm: float = 3.5
    #: Frame columns (1 mm wide) shallower than this fraction of the deepest are not sac.
    column_depth_fraction: float = 0.25
    #: A dural sac is 15–20 mm wide at disc level; wider than this means epidural fat is still attached.
    max_width_mm: float = 24.0
    #: A posterior canal row brighter than its CSF by this fraction of (CSF − dark) is epidural fat.
    fat_margin: float = 0.3
    #: Grey root layer up to this thick between the CSF and posterior epidural fat is taken into the sac (0 = off).
    root_layer_mm: float = 3.0
    #: Canal search region: |u| below this, v from -2 mm to min(multifidus front + 5 mm, this).
    canal_halfwidth_mm: float = 14.0
    canal_depth_mm: float = 30.0
    #: Canal seed as a pixel (i, j); None = the bright pixel nearest the disc's posterior midline point.
    seed_i: Optional[int] = None
    seed_j: Optional[int] = None
    #: Lamina components smaller than this (mm²) are dropped; bright holes smaller than ``lamina_hole_mm2`` filled.
    lamina_min_mm2: float = 4.0
    #: Opening radius that removes thin dark strands (fascia, vessel walls) from the arch.
    lamina_opening_mm: float = 0.8
    lamina_hole_mm2: float = 40.0

    def with_overrides(self, overrides: Mapping[str, str]) -> "DerivationParams":
        """Copy with ``{name: text}`` overrides; unknown names raise ValueError."""
        kinds = {f.name: f.type for f in fields(self)}
        values = {}
        for name, text in overrides.items():
            if name not in kinds:
                raise ValueError(f"unknown derivation parameter {name!r}; known: {sorted(kinds)}")
            values[name] = int(text) if name.startswith("seed_") else float(text)
        return replace(self, **values)


@dataclass
class Derivation:
    """Result for one slice: the masks and the figures the review and plausibility checks use."""

    canal: np.ndarray
    lamina: np.ndarray
    frame: SpineFrame
    threshold: float
    seed: tuple[int, int]

    def canal_area_mm2(self) -> float:
        return float(self.canal.sum() * self.frame.pixel_area_mm2)

    def lamina_area_mm2(self) -> float:
        return float(self.lamina.sum() * self.frame.pixel_area_mm2)

    def figures(self) -> dict[str, float]:
        """Canal CSA, width and depth, lamina area, its position relative to the canal and its left/right balance."""
        f, px = self.frame, self.frame.pixel_area_mm2
        out = {"canal_mm2": self.canal_area_mm2(), "lamina_mm2": self.lamina_area_mm2()}
        if self.canal.any():
            u, v = f.u[self.canal], f.v[self.canal]
            out.update(canal_width_mm=float(u.max() - u.min()), canal_depth_mm=float(v.max() - v.min()),
                       canal_u_mm=float(u.mean()), canal_v_mm=float(v.mean()))
        if self.lamina.any():
            u, v = f.u[self.lamina], f.v[self.lamina]
            left, right = float((u > 0).sum() * px), float((u < 0).sum() * px)
            out.update(lamina_v_mm=float(v.mean()), lamina_left_mm2=left, lamina_right_mm2=right,
                       lamina_symmetry=min(left, right) / max(left, right) if max(left, right) > 0 else 0.0)
            if self.canal.any():
                out["lamina_behind_canal_mm"] = float(v.mean() - f.v[self.canal].mean())
        return out


def _disk(radius_px: int) -> np.ndarray:
    r = max(int(radius_px), 1)
    y, x = np.ogrid[-r:r + 1, -r:r + 1]
    return x * x + y * y <= r * r


def _convex_hull(mask: np.ndarray) -> np.ndarray:
    from skimage.morphology import convex_hull_image

    return convex_hull_image(mask) if mask.any() else mask


def _keep_run(ok: np.ndarray, start: int) -> tuple[int, int]:
    lo = hi = start
    while lo > 0 and ok[lo - 1]:
        lo -= 1
    while hi < len(ok) - 1 and ok[hi + 1]:
        hi += 1
    return lo, hi


def derive_canal(image: np.ndarray, band: np.ndarray, frame: SpineFrame, p: DerivationParams) -> tuple[np.ndarray, float, tuple[int, int]]:
    """Dural-sac mask, the bright threshold used and the seed pixel (see the module docstring)."""
    u, v = frame.u, frame.v
    mm = float(np.sqrt(frame.pixel_area_mm2))
    s = ndi.gaussian_filter(np.asarray(image, np.float64), 0.7)
    roi = band & (v > -2.0) & (v < min(frame.multifidus_front_mm + 5.0, p.canal_depth_mm)) & (np.abs(u) < p.canal_halfwidth_mm)
    core = roi & (v > 0) & (v < 12.0) & (np.abs(u) < 5.0)
    if core.sum() < 10:
        return np.zeros_like(band), float("nan"), (-1, -1)
    csf, dark = np.percentile(s[core], 95), np.percentile(s[roi], 30)
    threshold = float(dark + p.bright_fraction * (csf - dark))
    bright = roi & (s > threshold)
    lab, _ = ndi.label(bright)
    if p.seed_i is not None and p.seed_j is not None:
        seed = (int(p.seed_i), int(p.seed_j))
    else:
        # The bright component that fills most of the space just behind the disc (not a speck on its border),
        # seeded at its pixel nearest the disc's posterior midline point.
        overlap = np.bincount(lab[core & bright], minlength=lab.max() + 1)
        overlap[0] = 0
        if overlap.max() == 0:
            return np.zeros_like(band), threshold, (-1, -1)
        best = lab == int(np.argmax(overlap))
        seed = np.unravel_index(int(np.argmin(np.where(best, u ** 2 + v ** 2, np.inf))), u.shape)
    if lab[seed] == 0:
        return np.zeros_like(band), threshold, tuple(int(x) for x in seed)
    filled = ndi.binary_fill_holes(lab == lab[seed])
    radius = max(int(round(p.opening_mm / mm)), 1)
    opened = ndi.binary_opening(filled, _disk(radius))
    parts, n = ndi.label(opened)
    if n == 0:
        parts, n = ndi.label(filled)
    nearest = ndi.distance_transform_edt(parts == 0, return_indices=True)[1]
    kept = parts == parts[nearest[0][seed], nearest[1][seed]]
    sac = ndi.binary_dilation(kept, _disk(1), iterations=radius, mask=filled)
    # Trim frame columns much shallower than the deepest (thick epidural fat strips along the disc); a sac
    # wider than ``max_width_mm`` still carries such strips, so the trim tightens step by step.
    col = np.round(u).astype(int)
    c0 = int(col[sac].min())
    depth = np.bincount(col[sac] - c0) * frame.pixel_area_mm2
    fraction = p.column_depth_fraction
    while True:
        lo, hi = _keep_run(depth >= fraction * depth.max(), int(np.argmax(depth)))
        if hi - lo + 1 <= p.max_width_mm or fraction >= 0.6:
            break
        fraction += 0.05
    sac &= (col - c0 >= lo) & (col - c0 <= hi)
    hull = _convex_hull(sac) & band
    # Roots: dark blobs mostly inside the hull, in its posterior half (they settle dependently).
    near = ndi.binary_dilation(hull, _disk(round(2.0 / mm))) & band & ~bright
    blobs, nb = ndi.label(near & ~sac)
    v_centre = float(v[sac].mean())
    roots = np.zeros_like(hull)
    for k in range(1, nb + 1):
        m = blobs == k
        if m.sum() * frame.pixel_area_mm2 < 10.0 and (m & hull).sum() > 0.5 * m.sum() and v[m].mean() > v_centre:
            roots |= m
    canal = _convex_hull(sac | roots) & band
    v_roots = v[roots & (np.abs(u) < 8.0)]
    if v_roots.size and v[canal].max() > v_roots.max() + 3.0:
        canal &= v <= v_roots.max() + 1.0  # bright posterior epidural fat behind the roots
    canal = _cut_posterior_fat(canal, s, v, dark, p.fat_margin)
    canal = _extend_to_posterior_fat(canal, s, u, v, band, threshold, p.root_layer_mm)
    return canal, threshold, tuple(int(x) for x in seed)


def _extend_to_posterior_fat(canal: np.ndarray, s: np.ndarray, u: np.ndarray, v: np.ndarray, band: np.ndarray,
                             threshold: float, max_gap_mm: float) -> np.ndarray:
    """Take in the grey root layer between the CSF and the posterior epidural fat.

    In the midline nothing but the dura lies between the sac and the posterior epidural fat, so a
    not-bright layer up to ``max_gap_mm`` thick between the bright CSF and that fat is roots settled on the
    back wall (inside the sac). Only frame columns (1 mm) within 5 mm of the midline (where that fat
    triangle's base lies) with fat within that distance behind the canal are extended; laterally the
    ligamentum flavum lies on the sac and bright lamina marrow must not be mistaken for that fat.
    """
    if not canal.any() or max_gap_mm <= 0:
        return canal
    col = np.round(u).astype(int)
    bright = band & (s > threshold)
    add = np.zeros_like(canal)
    for c in np.unique(col[canal & (np.abs(u) <= 5.0)]):
        in_col = col == c
        back = float(v[canal & in_col].max())
        behind = band & in_col & (v > back) & (v <= back + max_gap_mm)
        fat = behind & bright
        if fat.any():
            v_fat = float(v[fat].min())
            if v_fat - back >= 0.5:
                add |= behind & (v < v_fat) & ~bright
    if not add.any():
        return canal
    return _convex_hull(canal | add) & band


def _cut_posterior_fat(canal: np.ndarray, s: np.ndarray, v: np.ndarray, dark: float, margin: float) -> np.ndarray:
    """Cut the canal in front of the first 1-mm row, in its posterior half, clearly brighter than its CSF.

    Posterior epidural fat (the triangle between the ligamenta flava) is brighter than CSF on these fast
    spin-echo images; where no dark root row separates the two, it hangs on the back of the sac.
    """
    if not canal.any():
        return canal
    v_lo, v_hi = float(v[canal].min()), float(v[canal].max())
    v_mid = (v_lo + v_hi) / 2
    csf = float(np.median(s[canal & (v < v_mid)]))
    limit = csf + margin * max(csf - dark, 1.0)
    for v0 in np.arange(v_mid, v_hi, 1.0):
        row = canal & (v >= v0) & (v < v0 + 1.0)
        if row.sum() >= 3 and np.median(s[row]) > limit:
            return canal & (v < v0)
    return canal


def derive_lamina(image: np.ndarray, labels: np.ndarray, canal: np.ndarray, frame: SpineFrame, threshold: float, p: DerivationParams) -> np.ndarray:
    """Posterior-arch mask (see the module docstring)."""
    from training.spine_frame import MULTIFIDUS_LEFT, MULTIFIDUS_RIGHT

    u, v = frame.u, frame.v
    band = labels == NOT_ANNOTATED
    s = ndi.gaussian_filter(np.asarray(image, np.float64), 0.7)
    v_front = float(v[canal].mean()) if canal.any() else 5.0
    region = band & ~canal & (v > v_front) & (v < frame.multifidus_back_mm)
    # Medial to the multifidi on their rows (1 mm bins of v, from 3 mm behind each one's front); in front of them, within the lateral reach of
    # each multifidus's anterior 10 mm (the facet joints lie on the multifidi's front ends).
    mf_l, mf_r = labels == MULTIFIDUS_LEFT, labels == MULTIFIDUS_RIGHT
    vb = np.floor(v).astype(int)
    b0 = int(vb.min())
    limits = []
    for mf, side in ((mf_l, 1.0), (mf_r, -1.0)):
        front = mf & (v < float(v[mf].min()) + 10.0)
        lim = np.full(vb.max() - b0 + 1, float((side * u[front]).max()))
        behind = mf & (v >= float(v[mf].min()) + 3.0)  # the arch's back may bulge into the muscle's curved front
        np.minimum.at(lim, vb[behind] - b0, side * u[behind])
        limits.append(lim[vb - b0])
    region &= (u < limits[0]) & (-u < limits[1])
    arch = region & (s <= threshold)
    # Bright pockets enclosed by the arch are its marrow (fatty, bright on T2) or facet-joint fluid; a pocket
    # touching the canal is epidural fat and stays out.
    holes = ndi.binary_fill_holes(arch) & ~arch
    lab, n = ndi.label(holes)
    if n:
        sizes = ndi.sum(np.ones_like(lab), lab, index=np.arange(1, n + 1)) * frame.pixel_area_mm2
        at_canal = np.unique(lab[ndi.binary_dilation(canal, iterations=2) & holes])
        keep = np.flatnonzero(sizes < p.lamina_hole_mm2) + 1
        arch |= np.isin(lab, np.setdiff1d(keep, at_canal)) & region
    arch = ndi.binary_opening(arch, _disk(max(int(round(p.lamina_opening_mm / np.sqrt(frame.pixel_area_mm2))), 1)))
    lab, n = ndi.label(arch)
    if n:
        sizes = ndi.sum(np.ones_like(lab), lab, index=np.arange(1, n + 1)) * frame.pixel_area_mm2
        keep = (sizes >= p.lamina_min_mm2) & (sizes >= 0.1 * sizes.max())
        arch = np.isin(lab, np.flatnonzero(keep) + 1)
    return arch


def derive_slice(image: np.ndarray, labels: np.ndarray, spacing: tuple[float, float], params: DerivationParams = DerivationParams()) -> Derivation:
    """Canal and lamina of one slice on its own grid (raises ``FrameError`` without disc and multifidi)."""
    frame = spine_frame(labels, spacing)
    band = labels == NOT_ANNOTATED
    canal, threshold, seed = derive_canal(image, band, frame, params)
    lamina = derive_lamina(image, labels, canal, frame, threshold, params) if np.isfinite(threshold) else np.zeros_like(band)
    return Derivation(canal=canal, lamina=lamina & ~canal, frame=frame, threshold=threshold, seed=seed)


def burn_in(labels: np.ndarray, derivation: Derivation) -> np.ndarray:
    """Labels with canal (2) and lamina (3) written over the band; every other pixel as before."""
    out = labels.copy()
    band = labels == NOT_ANNOTATED
    out[band & derivation.lamina] = LAMINA
    out[band & derivation.canal] = CANAL
    return out
