"""Vesselness of the lung, for an error map that does not flag healthy vessels (issue 20, item 2).

At the depth that keeps healthy lung quiet the model redraws a vessel a little blurred or moved, so healthy vessels
carry as much E as a solid nodule or a tumour does (Resources/results/map-candidates.md: the tumour ranks above 97 %
of the lung, not above the vessels). Frangi's vesselness (Frangi et al. 1998, eq. 13) tells the two apart by shape
in 3D: high on a bright tube (a vessel, end-on or along the slice), low on a blob (R_B of eq. 10: a nodule, a mass),
a plate (a fissure, the pleura: R_A of eq. 11) and on flat regions (ground glass, consolidation: S of eq. 12).

    E'(v) = E(v) · (1 − w(v)) inside the lung,   w = clip(V / q₉₉(V over the lung), 0, 1)

V is scikit-image's implementation of the filter (``skimage.filters.frangi``: the reference one, with its eigenvalue
ordering and the paper's α = β = 0.5, γ = half the largest Hessian norm) on the lung's bounding box resampled to
ISO_MM isotropic voxels, because the filter's scales and ratios are isotropic while CT slices lie 1–5 mm apart
under < 1 mm pixels; it is resampled back to the CT grid. A single slice (or slices too far apart to see a vessel
continue) would look like tubes along z to the filter — an end-on vessel and a small nodule alike — so a lung
spanning less than MIN_EXTENT_MM along z is left as it is (``suppress_vessels`` says so).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

ISO_MM = 1.0  # isotropic grid of the filter
SIGMAS_MM = (1.0, 1.5, 2.0, 3.0)  # scales: lung vessels of about 2–6 mm across (the hilum's larger ones stay E)
WINDOW_HU = (-1000.0, 0.0)  # vessels against aerated lung; soft tissue, bone and contrast clipped alike
REFERENCE_PERCENTILE = 99.0  # w = 1 from this percentile of V over the lung: the clearest vessels carry no E
MIN_EXTENT_MM = 6 * max(SIGMAS_MM)  # the lung's z-extent the largest scale needs on both sides of a voxel


def vesselness(hu: np.ndarray, lung: np.ndarray, spacing_xyz) -> np.ndarray:
    """Frangi vesselness V (Z, Y, X) of the CT ``hu`` for bright tubes of SIGMAS_MM, on the lung's bounding box
    (plus a margin of the largest scale's reach); 0 elsewhere and where there is no lung."""
    from skimage.filters import frangi

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
    v = frangi(iso, sigmas=[s / ISO_MM for s in SIGMAS_MM], alpha=0.5, beta=0.5, black_ridges=False,
               mode="nearest")
    back = ndimage.zoom(v.astype(np.float32), np.array(crop.shape) / np.array(v.shape), order=1, mode="nearest")
    out[box] = _fit(back, crop.shape)
    out[~(lung > 0)] = 0.0
    return np.nan_to_num(out, nan=0.0, posinf=0.0, neginf=0.0)


def _fit(a: np.ndarray, shape) -> np.ndarray:
    """``a`` cut or edge-padded to ``shape`` (zoom's rounding may miss the target by one voxel per axis)."""
    a = a[tuple(slice(0, n) for n in shape)]
    return np.pad(a, [(0, n - m) for n, m in zip(shape, a.shape)], mode="edge")


def suppress_vessels(error: np.ndarray, hu: np.ndarray, lung: np.ndarray, spacing_xyz) -> tuple[np.ndarray, str]:
    """(E' = E · (1 − w) inside the lung, what was done): see the module docstring. E is returned unchanged, and
    the reason given, when the lung spans less than MIN_EXTENT_MM along z or the filter finds no vessel."""
    inside = lung > 0
    rows = np.nonzero(inside.any((1, 2)))[0]
    extent = (rows[-1] - rows[0] + 1) * float(spacing_xyz[2]) if rows.size else 0.0
    if extent < MIN_EXTENT_MM:
        return error, f"skipped: the lung spans {extent:.0f} mm along z, < {MIN_EXTENT_MM:.0f} mm (single slices)"
    v = vesselness(hu, inside, spacing_xyz)
    reference = float(np.percentile(v[inside], REFERENCE_PERCENTILE))
    if not np.isfinite(reference) or reference <= 1e-6:
        return error, "skipped: no vessel found"
    weight = np.clip(v / reference, 0.0, 1.0)
    return np.where(inside, error * (1.0 - weight), error).astype(error.dtype), "applied"
