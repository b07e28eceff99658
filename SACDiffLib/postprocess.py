"""From the error map to the anomaly mask (Section 2.4), and its quantification.

    α_a = loc(E[c < 1]) + λ · scale(E[c < 1])      (background-adaptive threshold, over the processed slices,
                                                   on the body's voxels: not the air around the patient —
                                                   all of them, or those within SHELL_MM of the lung
                                                   (``DetectConfig.background``); loc = median, scale =
                                                   1.4826·MAD: the paper's mean and std, estimated robustly —
                                                   see ``background_threshold``)
    → dense CRF (unary from E, Gaussian pairwise; Krähenbühl & Koltun 2012) slice by slice
    → erosion then dilation (in-plane) → restricted to the lung.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import numpy as np
from scipy import ndimage

from .errors import SACDiffError
from .lung import LEFT, RIGHT, body_mask
from .result import DetectionResult


ROBUST = "median + 1.4826·MAD"
# "lung-shell" background: the body outside the lung within this in-plane distance of it (chest wall, pleura,
# mediastinum). A picture cut to the lungs' bounding box plus ≥ SHELL_MM keeps all of it (round 14 of
# Resources/results/map-candidates.md: the whole body's α rose 2× on such pictures).
SHELL_MM = 5.0


@dataclass
class Threshold:
    alpha: float  # α used to binarise E
    background_location: float  # the background's "mean" (median)
    background_scale: float  # the background's "std" (1.4826 × median absolute deviation; = std for Gaussian data)
    lam: float
    mode: str  # "adaptive" or "fixed"
    statistic: str = ROBUST
    region: str = "body"  # the background's region (``DetectConfig.background``); reports before it: the body

    @classmethod
    def from_report(cls, values: dict) -> "Threshold":
        """From report.json; runs written before the robust statistics hold background_mean / background_std."""
        values = dict(values)
        if "background_mean" in values:
            values["background_location"] = values.pop("background_mean")
            values["background_scale"] = values.pop("background_std")
            values.setdefault("statistic", "mean + std")
        return cls(**values)


def _background(error: np.ndarray, lung: np.ndarray, processed: np.ndarray, body=None, box=None,
                region: str = "body", spacing_yx=None) -> np.ndarray:
    """E outside the lung (c < 1) on the processed slices, inside the patient's ``body`` (``lung.body_mask``): the
    air around the patient and the table are reconstructed trivially, and how much of them a field of view holds
    would otherwise move α several-fold between scans. Without a body mask (a run folder with no CT), within the
    in-plane analysis ``box`` (y0, y1, x0, x1). ``region`` "lung-shell": only within SHELL_MM (in-plane, the
    pixel size ``spacing_yx`` in mm) of the lung; "lung": E inside the lung itself (round 24 of
    Resources/results/map-candidates.md; the robust statistics hold while less than half of it is abnormal)."""
    lung_slices = lung[processed] > 0
    if region == "lung":
        return error[processed][lung_slices]
    outside = ~lung_slices
    if body is not None:
        outside &= body[processed]
    elif box is not None:
        y0, y1, x0, x1 = box
        inside_box = np.zeros(outside.shape[1:], bool)
        inside_box[y0:y1, x0:x1] = True
        outside &= inside_box
    if region == "lung-shell":
        if spacing_yx is None:
            raise SACDiffError("the lung-shell background needs the pixel size; this run holds no CT geometry")
        outside &= np.stack([ndimage.distance_transform_edt(~plane, sampling=spacing_yx) <= SHELL_MM
                             if plane.any() else np.zeros_like(plane) for plane in lung_slices])
    elif region != "body":
        raise SACDiffError(f"unknown background region {region!r}; choose body, lung-shell or lung")
    return error[processed][outside]


def ball(diameter_mm: float, spacing_zyx) -> np.ndarray:
    """A solid ellipsoid footprint of ``diameter_mm`` in voxels of ``spacing_zyx`` (mm), at least one voxel."""
    radius = [max(0, int(diameter_mm / 2 / s)) for s in spacing_zyx]
    grids = np.ogrid[tuple(slice(-r, r + 1) for r in radius)]
    inside = sum((g * s / (diameter_mm / 2)) ** 2 for g, s in zip(grids, spacing_zyx))
    return inside <= 1.0


def opened(error: np.ndarray, diameter_mm: float, spacing_zyx) -> np.ndarray:
    """The grey-level opening of ``error`` (z, y, x) by ``ball(diameter_mm)`` (float32): a value survives where a
    ball of that size fits inside the region at or above it — a mass's error, not a thin vessel's."""
    return ndimage.grey_opening(error, footprint=ball(diameter_mm, spacing_zyx), mode="nearest").astype(np.float32)


def robust_location_scale(values: np.ndarray) -> tuple[float, float]:
    """(median, 1.4826 × median absolute deviation): the mean and std of Gaussian data, unmoved by a heavy tail."""
    location = float(np.median(values))
    return location, float(1.4826 * np.median(np.abs(values - location)))


def background_threshold(error: np.ndarray, lung: np.ndarray, processed: np.ndarray, lam: float, body=None,
                         box=None, region: str = "body", spacing_yx=None) -> Threshold:
    """α_a = mean + λ·std of E outside the lung (c < 1) on the processed slices (Section 2.4), over the body's
    voxels (``_background``), with the mean and std estimated robustly (median, 1.4826·MAD).

    Why robust: E outside the lung is heavy-tailed, and its tail is not about the lung — the body cut by the edge of
    the field of view (the network paints air there), bone edges, dense lesions the lung mask left out. Measured on
    the shared cases: the tail's 1 % of voxels made the plain std 4–13× the MAD scale and moved α 8× between two
    scans (0.045 on ctmd_P001, 0.37 on nsclc_lung1, whose spine touches the image edge), while median and MAD
    differed by < 1.8×."""
    background = _background(error, lung, processed, body, box, region, spacing_yx)
    if background.size == 0:
        raise SACDiffError("no voxels outside the lung on the processed slices; the lung mask covers whole slices")
    location, scale = robust_location_scale(background)
    return Threshold(location + lam * scale, location, scale, float(lam), "adaptive", region=region)


def fixed_threshold(error: np.ndarray, lung: np.ndarray, processed: np.ndarray, alpha: float, body=None,
                    box=None, region: str = "body", spacing_yx=None) -> Threshold:
    background = _background(error, lung, processed, body, box, region, spacing_yx)
    location, scale = robust_location_scale(background) if background.size else (0.0, 0.0)
    return Threshold(float(alpha), location, scale, float("nan"), "fixed", region=region)


CRF_SXY, CRF_COMPAT = 3.0, 3.0  # Gaussian pairwise kernel: spatial std (pixels) and Potts weight


def crf_refine(error: np.ndarray, alpha: float, scale: float, iterations: int = 5) -> np.ndarray:
    """Dense CRF on one (y, x) slice, by mean-field inference (Krähenbühl & Koltun 2011). Unary: −log p with
    p = sigmoid((E − α) / scale) the foreground probability; pairwise: a Gaussian kernel (σ = 3 px) with Potts
    weight 3, the only pairwise term the paper's CRF uses. With a Gaussian kernel the mean-field message is
    exactly a Gaussian filter of the label probabilities, so no permutohedral lattice is needed:

        Q ← softmax(−U + w · D^{−1/2} G_σ(D^{−1/2} Q)),  D = G_σ(1)

    (``pydensecrf``'s symmetric normalisation, which at the slice's edges keeps the message a weighted average).
    numpy + scipy only, no compiler; ``pydensecrf`` (optional) is the reference it is tested against. Returns a
    boolean mask."""
    from scipy.ndimage import gaussian_filter

    p = 1.0 / (1.0 + np.exp(-np.clip((error.astype(np.float64) - alpha) / max(scale, 1e-12), -30, 30)))
    p = np.clip(p, 1e-5, 1 - 1e-5)
    unary = -np.log(np.stack([1.0 - p, p]))  # U (2, h, w)
    norm = 1.0 / np.sqrt(gaussian_filter(np.ones(error.shape), CRF_SXY, mode="constant", cval=0.0))
    q = _softmax(-unary)
    for _ in range(iterations):
        message = np.stack([norm * gaussian_filter(norm * q[k], CRF_SXY, mode="constant", cval=0.0) for k in (0, 1)])
        q = _softmax(-unary + CRF_COMPAT * message)
    return q[1] > q[0]


def _softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(axis=0, keepdims=True))
    return e / e.sum(axis=0, keepdims=True)


def binarise(
    error: np.ndarray,
    lung: np.ndarray,
    processed: np.ndarray,
    threshold: Threshold,
    crf: bool = True,
    crf_iterations: int = 5,
    morphology_radius: int = 1,
) -> np.ndarray:
    """Anomaly mask (uint8, z y x) from the error map: threshold, optional CRF, opening, restricted to the lung.

    Works on the lung's bounding box (processed slices × in-plane lung box + 2r + 1 pixels): the opening of a
    pixel depends only on pixels within 2r of it, so the result inside the lung equals the whole-volume result
    (a test compares both) at a fraction of the cost — this is the λ slider's path."""
    out = np.zeros(error.shape, np.uint8)
    inside_all = lung > 0
    if processed.size == 0 or not inside_all[processed].any():
        return out
    r = max(int(morphology_radius), 0)
    margin = 2 * r + 1 + (8 if crf else 0)  # + the CRF's own 8-pixel margin around each slice's lung
    z0, z1 = int(processed.min()), int(processed.max()) + 1
    footprint = inside_all[z0:z1].any(axis=0)  # (a superset box is still exact)
    ys, xs = np.nonzero(footprint.any(axis=1))[0], np.nonzero(footprint.any(axis=0))[0]
    y0, y1 = max(ys[0] - margin, 0), min(ys[-1] + 1 + margin, error.shape[1])
    x0, x1 = max(xs[0] - margin, 0), min(xs[-1] + 1 + margin, error.shape[2])
    err = error[z0:z1, y0:y1, x0:x1]
    inside = inside_all[z0:z1, y0:y1, x0:x1]
    mask = np.zeros(err.shape, bool)
    candidates = err > threshold.alpha
    for z in processed - z0:
        if not (candidates[z] & inside[z]).any():
            continue  # with Potts pairwise terms the CRF cannot create foreground where no unary favours it
        if crf:
            ys, xs = np.nonzero(inside[z])  # the CRF runs on the slice's lung bounding box (+ 8 px) only
            a0, a1 = max(ys.min() - 8, 0), min(ys.max() + 9, err.shape[1])
            b0, b1 = max(xs.min() - 8, 0), min(xs.max() + 9, err.shape[2])
            scale = threshold.background_scale if threshold.background_scale > 0 else 1.0
            mask[z, a0:a1, b0:b1] = crf_refine(err[z, a0:a1, b0:b1], threshold.alpha, scale, crf_iterations)
        else:
            mask[z] = candidates[z]
    if r > 0:  # erosion then dilation, in-plane (slices are thick)
        mask = opening_in_plane(mask, r)
    out[z0:z1, y0:y1, x0:x1] = mask & inside
    return out


def _shifted(a: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """b[:, y, x] = a[:, y + dy, x + dx], False outside the array."""
    h, w = a.shape[-2:]
    b = np.zeros_like(a)
    b[:, max(-dy, 0) : h - max(dy, 0), max(-dx, 0) : w - max(dx, 0)] = a[:, max(dy, 0) : h - max(-dy, 0),
                                                                         max(dx, 0) : w - max(-dx, 0)]
    return b


def opening_in_plane(mask: np.ndarray, radius: int) -> np.ndarray:
    """Binary opening of every slice with a disk of ``radius`` pixels: the same result as
    ``scipy.ndimage.binary_opening(mask, disk[None])`` (tested), as AND/OR over shifted views (several times
    faster on the λ slider's path)."""
    offsets = [(dy, dx) for dy in range(-radius, radius + 1) for dx in range(-radius, radius + 1)
               if dy * dy + dx * dx <= radius * radius]
    eroded = mask.copy()
    for dy, dx in offsets:
        if dy or dx:
            eroded &= _shifted(mask, dy, dx)
    opened = eroded.copy()
    for dy, dx in offsets:
        if dy or dx:
            opened |= _shifted(eroded, dy, dx)
    return opened


def quantify(mask: np.ndarray, lung_labels: np.ndarray, spacing_xyz, lung_counts=None) -> dict:
    """Anomaly volume in ml, overall and per lung (% of that lung), and the per-slice anomaly volume (ml).
    ``lung_counts`` (voxels per label, ``np.bincount(lung_labels.ravel())``) may be passed to skip that count."""
    voxel_ml = float(np.prod(spacing_xyz)) / 1000.0
    anomaly = mask > 0
    if lung_counts is None:
        lung_counts = np.bincount(lung_labels.ravel(), minlength=3)
    hits = np.bincount(lung_labels[anomaly], minlength=3)
    out = {
        "anomaly_ml": float(anomaly.sum() * voxel_ml),
        "lung_ml": float(lung_counts[1:].sum() * voxel_ml),
    }
    for name, label in (("right", RIGHT), ("left", LEFT)):
        lung_voxels = int(lung_counts[label])
        hit = int(hits[label])
        out[f"{name}_lung_ml"] = lung_voxels * voxel_ml
        out[f"{name}_anomaly_ml"] = hit * voxel_ml
        out[f"{name}_anomaly_percent"] = 100.0 * hit / lung_voxels if lung_voxels else 0.0
    out["anomaly_percent_of_lung"] = 100.0 * out["anomaly_ml"] / out["lung_ml"] if out["lung_ml"] else 0.0
    out["slice_anomaly_ml"] = (anomaly.reshape(anomaly.shape[0], -1).sum(1) * voxel_ml).round(4).tolist()
    return out


def _lung_counts(result: DetectionResult) -> np.ndarray:
    if result.lung_voxels is None:
        result.lung_voxels = np.bincount(result.lung.ravel(), minlength=3)  # once: the λ slider re-uses it
    return result.lung_voxels


def _body(result: DetectionResult) -> Optional[np.ndarray]:
    if result.body is None and result.anatomy_hu() is not None:
        result.body = body_mask(result.anatomy_hu())
    return result.body


def rethreshold(result: DetectionResult, lam: float, crf: Optional[bool] = None) -> DetectionResult:
    """Binarise the cached error map again with λ (no diffusion). Updates mask, threshold, detect (λ, CRF) and
    quantification (``result.report_document`` composes the report from them)."""
    if not np.isfinite(lam):
        raise SACDiffError(f"λ = {lam} is not a finite number; give e.g. --lambda 1")
    det = dataclasses.replace(result.detect, lam=float(lam), crf=result.detect.crf if crf is None else crf)
    previous = result.threshold
    spacing_yx = tuple(result.reference.GetSpacing()[1::-1])
    if (det.threshold == "adaptive" and previous is not None and previous.mode == "adaptive"
            and previous.region == det.background):
        # the background's statistics do not depend on λ: α = location + λ·scale from the cached ones
        threshold = dataclasses.replace(previous, alpha=previous.background_location + det.lam * previous.background_scale,
                                        lam=det.lam)
    elif det.threshold == "adaptive":
        threshold = background_threshold(result.error, result.lung, result.processed, det.lam, _body(result),
                                         result.box, det.background, spacing_yx)
    else:
        threshold = fixed_threshold(result.error, result.lung, result.processed, det.fixed_threshold, _body(result),
                                    result.box, det.background, spacing_yx)
    result.mask = binarise(
        result.error, result.lung, result.processed, threshold, det.crf, det.crf_iterations, det.morphology_radius
    )
    result.threshold = threshold
    result.detect = det
    result.quantification = quantify(result.mask, result.lung, result.reference.GetSpacing(), _lung_counts(result))
    return result
