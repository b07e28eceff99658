"""From the error map to the anomaly mask (Section 2.4), and its quantification.

    α_a = mean(E[c < 1]) + λ · std(E[c < 1])      (background-adaptive threshold, over the processed slices)
    → dense CRF (unary from E, Gaussian pairwise; Krähenbühl & Koltun 2012) slice by slice
    → erosion then dilation (in-plane) → restricted to the lung.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from .errors import SACDiffError
from .lung import LEFT, RIGHT


@dataclass
class Threshold:
    alpha: float  # α used to binarise E
    background_mean: float
    background_std: float
    lam: float
    mode: str  # "adaptive" or "fixed"


def _background(error: np.ndarray, lung: np.ndarray, processed: np.ndarray, box=None) -> np.ndarray:
    """E outside the lung (c < 1) on the processed slices, within the in-plane ``box`` (y0, y1, x0, x1) when given."""
    if box is not None:
        y0, y1, x0, x1 = box
        error, lung = error[:, y0:y1, x0:x1], lung[:, y0:y1, x0:x1]
    return error[processed][lung[processed] == 0]


def background_threshold(error: np.ndarray, lung: np.ndarray, processed: np.ndarray, lam: float, box=None) -> Threshold:
    """α_a = mean + λ·std of E outside the lung (c < 1) on the processed slices (Section 2.4), within ``box``
    (detection passes the lung's bounding box + margin, so that air outside the body does not dilute the
    statistics and the cropped and uncropped paths share one definition)."""
    background = _background(error, lung, processed, box)
    if background.size == 0:
        raise SACDiffError("no voxels outside the lung on the processed slices; the lung mask covers whole slices")
    mean, std = float(background.mean()), float(background.std())
    return Threshold(mean + lam * std, mean, std, float(lam), "adaptive")


def fixed_threshold(error: np.ndarray, lung: np.ndarray, processed: np.ndarray, alpha: float, box=None) -> Threshold:
    background = _background(error, lung, processed, box)
    mean = float(background.mean()) if background.size else 0.0
    std = float(background.std()) if background.size else 0.0
    return Threshold(float(alpha), mean, std, float("nan"), "fixed")


def crf_refine(error: np.ndarray, alpha: float, scale: float, iterations: int = 5) -> np.ndarray:
    """Dense CRF on one (y, x) slice. Unary: −log p with p = sigmoid((E − α) / scale) the foreground probability;
    pairwise: Gaussian kernel (sxy = 3 px, compat = 3). Returns a boolean mask."""
    import pydensecrf.densecrf as dcrf  # imported lazily: the CRF is optional

    h, w = error.shape
    p = 1.0 / (1.0 + np.exp(-np.clip((error - alpha) / max(scale, 1e-12), -30, 30)))
    p = np.clip(p, 1e-5, 1 - 1e-5)
    unary = -np.log(np.stack([1.0 - p, p]).reshape(2, -1)).astype(np.float32)
    crf = dcrf.DenseCRF2D(w, h, 2)
    crf.setUnaryEnergy(np.ascontiguousarray(unary))
    crf.addPairwiseGaussian(sxy=3, compat=3)
    q = np.array(crf.inference(iterations)).reshape(2, h, w)
    return q[1] > q[0]


def binarise(
    error: np.ndarray,
    lung: np.ndarray,
    processed: np.ndarray,
    threshold: Threshold,
    crf: bool = True,
    crf_iterations: int = 5,
    morphology_radius: int = 1,
) -> np.ndarray:
    """Anomaly mask (uint8, z y x) from the error map: threshold, optional CRF, opening, restricted to the lung."""
    mask = np.zeros(error.shape, bool)
    candidates = error > threshold.alpha
    inside = lung > 0
    for z in processed:
        if not (candidates[z] & inside[z]).any():
            continue  # with Potts pairwise terms the CRF cannot create foreground where no unary favours it
        if crf:
            ys, xs = np.nonzero(inside[z])  # the CRF runs on the lung's bounding box (+ margin) only
            y0, y1 = max(ys.min() - 8, 0), min(ys.max() + 9, error.shape[1])
            x0, x1 = max(xs.min() - 8, 0), min(xs.max() + 9, error.shape[2])
            scale = threshold.background_std if threshold.background_std > 0 else 1.0
            mask[z, y0:y1, x0:x1] = crf_refine(error[z, y0:y1, x0:x1], threshold.alpha, scale, crf_iterations)
        else:
            mask[z] = candidates[z]
    if morphology_radius > 0:  # erosion then dilation, in-plane (slices are thick)
        r = morphology_radius
        yy, xx = np.mgrid[-r : r + 1, -r : r + 1]
        disk = (yy**2 + xx**2 <= r * r)[None]
        mask = ndimage.binary_opening(mask, structure=disk)
    return (mask & inside).astype(np.uint8)


def quantify(mask: np.ndarray, lung_labels: np.ndarray, spacing_xyz) -> dict:
    """Anomaly volume in ml, overall and per lung (% of that lung), and the per-slice anomaly volume (ml)."""
    voxel_ml = float(np.prod(spacing_xyz)) / 1000.0
    anomaly = mask > 0
    out = {
        "anomaly_ml": float(anomaly.sum() * voxel_ml),
        "lung_ml": float((lung_labels > 0).sum() * voxel_ml),
    }
    for name, label in (("right", RIGHT), ("left", LEFT)):
        lung_voxels = int((lung_labels == label).sum())
        hit = int((anomaly & (lung_labels == label)).sum())
        out[f"{name}_lung_ml"] = lung_voxels * voxel_ml
        out[f"{name}_anomaly_ml"] = hit * voxel_ml
        out[f"{name}_anomaly_percent"] = 100.0 * hit / lung_voxels if lung_voxels else 0.0
    out["anomaly_percent_of_lung"] = 100.0 * out["anomaly_ml"] / out["lung_ml"] if out["lung_ml"] else 0.0
    out["slice_anomaly_ml"] = (anomaly.reshape(anomaly.shape[0], -1).sum(1) * voxel_ml).round(4).tolist()
    return out
