"""Vesselness of the lung, for an error map that does not flag healthy vessels (issue 20, item 2).

At the depth that keeps healthy lung quiet the model redraws a vessel a little blurred or moved, so healthy vessels
carry as much E as a solid nodule or a tumour does (Resources/results/map-candidates.md: the tumour ranks above 97 %
of the lung, not above the vessels). Frangi's vesselness (Frangi et al. 1998, eq. 13) tells the two apart by shape
in 3D: high on a bright tube (a vessel, end-on or along the slice), low on a blob (R_B of eq. 10: a nodule, a mass),
a plate (a fissure, the pleura: R_A of eq. 11) and on flat regions (ground glass, consolidation: S of eq. 12).

    E'(v) = E(v) · (1 − w(v)) inside the lung,   w = clip(V / FULL_WEIGHT_V, 0, 1)

V is Frangi's filter as scikit-image defines it (``skimage.filters.frangi``: α = β = 0.5, γ = half the largest
Hessian norm; ``frangi_bright`` says where it departs) on the lung's bounding box resampled to ISO_MM isotropic
voxels — the filter's scales and ratios are isotropic while CT slices lie 1–5 mm apart under < 1 mm pixels — and
resampled back to the CT grid. A single slice (or a few) would look like tubes along z to the filter — an end-on
vessel and a small nodule alike — so a lung spanning less than MIN_EXTENT_MM along z is left as it is
(``suppress_vessels`` says so). Cost: ≈ 40 s for a 154-slice scan on one busy core.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

ISO_MM = 1.0  # isotropic grid of the filter
SIGMAS_MM = (1.0, 1.5, 2.0, 3.0)  # scales: lung vessels of about 2–6 mm across (the hilum's larger ones stay E)
WINDOW_HU = (-1000.0, 0.0)  # vessels against aerated lung; soft tissue, bone and contrast clipped alike
STRUCTURE_FLOOR = 0.1  # eigenvalues only where the Hessian norm exceeds this share of γ (``frangi_bright``)
# w = V / FULL_WEIGHT_V, at most 1: about the 99th percentile of V over a healthy lung (ctmd_normal001, a training
# case: 0.090; its 98th 0.043, 99.5th 0.148) — the clearest vessels carry no E, a ball's centre keeps > 90 % of it
FULL_WEIGHT_V = 0.1
MIN_EXTENT_MM = 6 * max(SIGMAS_MM)  # the lung's z-extent the largest scale needs on both sides of a voxel


def frangi_bright(image: np.ndarray, sigmas) -> np.ndarray:
    """Frangi's vesselness of bright tubes in a 3D ``image`` (isotropic voxels), as ``skimage.filters.frangi(image,
    sigmas, alpha=0.5, beta=0.5, black_ridges=False, mode="nearest")`` defines it: Gaussian-derivative Hessians,
    eigenvalues ordered by magnitude, eqs. 10–13, γ = half the largest Hessian norm S at the first scale, the
    maximum over scales. Three departures: the Hessian is one second-derivative Gaussian (scikit-image composes two
    first derivatives at σ/√2 with longer kernels: equal up to the kernels' tails); eq. 13's condition λ2, λ3 > 0 is
    applied exactly (scikit-image relies on R_B underflowing, which fails where λ1 is exactly 0, just outside a
    tube's wall); and the eigenvalues are computed only where S > STRUCTURE_FLOOR·γ — elsewhere V would be below
    1 − exp(−STRUCTURE_FLOOR²/2) (0.5 %) and is 0. Aerated lung is most of a chest, the eigenvalues most of the
    time."""
    best = np.zeros(image.shape, np.float32)
    gamma = None
    for sigma in sigmas:
        hxx, hxy, hxz, hyy, hyz, hzz = (  # Gaussian second derivatives of −image (bright tubes become dark ridges)
            ndimage.gaussian_filter(-image, sigma, order=order, mode="nearest", truncate=4.0)
            for order in ((2, 0, 0), (1, 1, 0), (1, 0, 1), (0, 2, 0), (0, 1, 1), (0, 0, 2)))
        norm = np.sqrt(hxx ** 2 + hyy ** 2 + hzz ** 2 + 2 * (hxy ** 2 + hxz ** 2 + hyz ** 2))  # S, eq. 12
        if gamma is None:
            gamma = float(norm.max()) / 2 or 1.0
        where = np.nonzero(norm > STRUCTURE_FLOOR * gamma)
        h = np.stack([np.stack([hxx[where], hxy[where], hxz[where]], -1),
                      np.stack([hxy[where], hyy[where], hyz[where]], -1),
                      np.stack([hxz[where], hyz[where], hzz[where]], -1)], -2)
        eig = np.linalg.eigvalsh(h.astype(np.float64))
        eig = np.take_along_axis(eig, np.abs(eig).argsort(-1), -1)  # |λ1| ≤ |λ2| ≤ |λ3|
        l1 = eig[:, 0]
        tube = (eig[:, 1] > 0) & (eig[:, 2] > 0)  # eq. 13: V = 0 unless λ2, λ3 > 0 (a bright tube on −image)
        l2, l3 = np.maximum(eig[:, 1], 1e-10), np.maximum(eig[:, 2], 1e-10)
        r_a, r_b = l2 / l3, np.abs(l1) / np.sqrt(l2 * l3)  # eqs. 11, 10
        v = tube * (1 - np.exp(-r_a ** 2 / (2 * 0.5 ** 2))) * np.exp(-r_b ** 2 / (2 * 0.5 ** 2)) \
            * (1 - np.exp(-(norm[where].astype(np.float64) ** 2) / (2 * gamma ** 2)))  # eq. 13
        best[where] = np.maximum(best[where], v.astype(np.float32))
    return best


def vesselness(hu: np.ndarray, lung: np.ndarray, spacing_xyz) -> np.ndarray:
    """Frangi vesselness V (Z, Y, X) of the CT ``hu`` for bright tubes of SIGMAS_MM (``frangi_bright``), on the
    lung's bounding box (plus a margin of the largest scale's reach) resampled to ISO_MM; 0 outside the lung."""
    out = np.zeros(hu.shape, np.float32)
    if not lung.any():
        return out
    spacing_zyx = np.array(spacing_xyz, float)[::-1]
    reach = np.ceil(3 * max(SIGMAS_MM) / spacing_zyx).astype(int)
    box = tuple(slice(max(int(ix.min()) - r, 0), min(int(ix.max()) + r + 1, n))
                for ix, r, n in zip(np.nonzero(lung), reach, hu.shape))
    crop = np.clip(hu[box].astype(np.float32), *WINDOW_HU)
    iso_shape = np.maximum(np.round(np.array(crop.shape) * spacing_zyx / ISO_MM).astype(int), 1)
    iso = ndimage.zoom(crop, iso_shape / np.array(crop.shape), order=1, mode="nearest")
    v = frangi_bright(iso, [s / ISO_MM for s in SIGMAS_MM])
    back = ndimage.zoom(v, np.array(crop.shape) / np.array(v.shape), order=1, mode="nearest")
    out[box] = _fit(back, crop.shape)
    out[~(lung > 0)] = 0.0
    return np.nan_to_num(out, nan=0.0, posinf=0.0, neginf=0.0)


def _fit(a: np.ndarray, shape) -> np.ndarray:
    """``a`` cut or edge-padded to ``shape`` (zoom's rounding may miss the target by one voxel per axis)."""
    a = a[tuple(slice(0, n) for n in shape)]
    return np.pad(a, [(0, n - m) for n, m in zip(shape, a.shape)], mode="edge")


def suppress_vessels(error: np.ndarray, hu: np.ndarray, lung: np.ndarray, spacing_xyz) -> tuple[np.ndarray, str]:
    """(E' = E · (1 − w) inside the lung, what was done): see the module docstring. E is returned unchanged, and
    the reason given, when the lung spans less than MIN_EXTENT_MM along z."""
    inside = lung > 0
    rows = np.nonzero(inside.any((1, 2)))[0]
    extent = (rows[-1] - rows[0] + 1) * float(spacing_xyz[2]) if rows.size else 0.0
    if extent < MIN_EXTENT_MM:
        return error, f"skipped: the lung spans {extent:.0f} mm along z, < {MIN_EXTENT_MM:.0f} mm (single slices)"
    weight = np.clip(vesselness(hu, inside, spacing_xyz) / FULL_WEIGHT_V, 0.0, 1.0)
    return np.where(inside, error * (1.0 - weight), error).astype(error.dtype), "applied"
