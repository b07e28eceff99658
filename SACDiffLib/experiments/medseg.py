"""The MedSeg COVID-19 slices (``slices/medseg_covid``): from 8-bit pictures to scored one-slice volumes.

The images are 8-bit, lung-windowed, cropped to the chest, and carry neither HU nor orientation. Two facts, both
found from the anatomy and checked by ``Testing/test_medseg.py``:

- **Orientation.** As stored, the spine lies on the image's right, the heart on its left and the heart's apex at
  the bottom: the image is the *transpose* of the standard radiological axial view (anterior up, the patient's
  right on the image's left). A 90° rotation alone would mirror the patient left-right. ``to_axial`` transposes
  image and mask alike.
- **Intensity.** The window differs from image to image (fitted widths 980–2030 HU, median ≈ 1300; the soft
  tissue of 8 images is saturated). ``grey_to_hu`` fits a linear map per image to two populations that every chest
  slice has: the aerated-lung peak of the grey histogram ↦ −850 HU (the median lung HU of the shared CTs is −835 to
  −863) and the soft-tissue peak ↦ +40 HU. Where the soft tissue is saturated (peak ≥ 248) only the lung anchor
  is used, with the median slope of the unsaturated images (``FALLBACK_HU_PER_GREY``). No lesion label is read.

Scoring (``score_slices``): each slice is a one-slice volume with the fallback lung mask; metrics inside the lung.
Slices whose truth has no pixel inside the lung are reported apart (their Dice would be 1 for an empty prediction
and 0 otherwise: neither says anything about lesions). Beside the per-slice mean, the pooled figures treat all
scored slices' lung pixels as one set; beside each Dice stands the trivial baseline of flagging the whole lung.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from scipy import ndimage

from ..metrics import METRICS, auroc, oracle_dice, segmentation_metrics, summarise

LUNG_HU, SOFT_TISSUE_HU = -850.0, 40.0  # anchors of the per-image grey → HU fit
FALLBACK_HU_PER_GREY = 5.35  # median fitted slope of the 42 MedSeg images whose soft tissue is not saturated
SATURATED_GREY = 248
SPACING_MM = (0.7, 0.7, 5.0)  # assumed: the images carry no spacing (volumes in ml are indicative only)


def to_axial(image: np.ndarray) -> np.ndarray:
    """Stored MedSeg layout → standard radiological axial view (anterior up, patient's right on the left)."""
    return np.ascontiguousarray(np.asarray(image).T)


def histogram_peaks(grey: np.ndarray) -> tuple[int, int]:
    """(aerated-lung peak, soft-tissue peak) grey levels: the lowest local maximum below 160 of the smoothed
    histogram that reaches 25 % of the tallest there, and the tallest bin from 160 up."""
    counts = np.bincount(np.asarray(grey, dtype=np.uint8).ravel(), minlength=256).astype(np.float64)
    smooth = ndimage.gaussian_filter1d(counts, 3)
    low = smooth[:160]
    peaks = [g for g in range(1, 159) if low[g] >= low[g - 1] and low[g] >= low[g + 1] and low[g] >= 0.25 * low.max()]
    lung = peaks[0] if peaks else int(np.argmax(low))
    return int(lung), int(np.argmax(smooth[160:]) + 160)


def grey_to_hu(grey: np.ndarray) -> tuple[np.ndarray, dict]:
    """8-bit grey → HU (int16) by the per-image fit described above, and the fit (anchors, slope, window)."""
    g_lung, g_soft = histogram_peaks(grey)
    saturated = g_soft >= SATURATED_GREY or g_soft <= g_lung
    slope = FALLBACK_HU_PER_GREY if saturated else (SOFT_TISSUE_HU - LUNG_HU) / (g_soft - g_lung)
    offset = LUNG_HU - slope * g_lung  # HU of grey 0
    hu = np.clip(np.round(offset + slope * np.asarray(grey, np.float64)), -1024, 3071).astype(np.int16)
    fit = {"lung_peak_grey": g_lung, "soft_tissue_peak_grey": g_soft, "soft_tissue_saturated": bool(saturated),
           "hu_per_grey": float(slope), "window_hu": [float(offset), float(offset + 255 * slope)]}
    return hu, fit


def read_slice(image_path, mask_path) -> tuple[np.ndarray, np.ndarray, dict]:
    """(HU image (1, H, W) in the axial view, truth mask (1, H, W) bool, intensity fit) of one MedSeg slice."""
    from PIL import Image

    grey = to_axial(np.asarray(Image.open(image_path).convert("L")))
    truth = to_axial(np.asarray(Image.open(mask_path)) > 0)
    if truth.shape != grey.shape:
        raise ValueError(f"mask shape {truth.shape} differs from image {grey.shape}")
    hu, fit = grey_to_hu(grey)
    return hu[None], truth[None], fit


def list_slices(folder) -> list[Path]:
    folder = Path(folder)
    return sorted((folder / "image").glob("*.jpg"), key=lambda p: (len(p.stem), p.stem))


def score_slices(slices: list[dict]) -> dict:
    """Summary of scored slices, each {"pred", "truth", "lung", "error"} (arrays of one slice, bool/float).

    Returns {"per_slice": per-slice rows, "mean": mean (std) of METRICS over slices with truth in the lung,
    "pooled": METRICS over all their lung pixels together, "baseline": the same two for flagging the whole lung,
    "voxel_auroc", "oracle_dice", "oracle_threshold": E against truth over the pooled lung pixels,
    "no_truth_in_lung": slices left out, "truth_outside_lung_fraction": pooled}."""
    rows, preds, truths, errors = [], [], [], []
    truth_total = truth_inside = 0
    for s in slices:
        lung, truth = s["lung"] > 0, s["truth"] > 0
        truth_total += int(truth.sum())
        truth_inside += int((truth & lung).sum())
        row = {"slice": s["name"], "lung_fraction": float(lung.mean()), "alpha": s.get("alpha", float("nan")),
               "truth_outside_lung_fraction": float((truth & ~lung).sum() / max(int(truth.sum()), 1))}
        if not (truth & lung).any():
            rows.append(dict(row, status="no truth in lung"))
            continue
        metrics = segmentation_metrics(s["pred"], truth, lung)
        baseline = segmentation_metrics(lung, truth, lung)
        rows.append(dict(row, status="ok", **metrics, baseline_dice=baseline["dice"]))
        preds.append(s["pred"][lung] > 0)
        truths.append(truth[lung])
        errors.append(s["error"][lung])
    scored = [r for r in rows if r["status"] == "ok"]
    out = {"per_slice": rows, "n_scored": len(scored),
           "no_truth_in_lung": [r["slice"] for r in rows if r["status"] != "ok"],
           "truth_outside_lung_fraction": float(1 - truth_inside / truth_total) if truth_total else float("nan")}
    alphas = np.array([r["alpha"] for r in rows if np.isfinite(r["alpha"])])
    if alphas.size:  # α of each slice's own threshold: how much the background statistics move between images
        p5, median, p95 = np.percentile(alphas, [5, 50, 95])
        out["alpha_spread"] = {"p5": float(p5), "median": float(median), "p95": float(p95),
                               "p95_over_p5": float(p95 / p5) if p5 > 0 else float("inf")}
    if not scored:
        return out
    pred, truth, error = np.concatenate(preds), np.concatenate(truths), np.concatenate(errors)
    out["mean"] = {m: {"mean": st["mean"], "std": st["std"], "n": st["n"]}
                   for m, st in summarise(scored, METRICS + ("baseline_dice",)).items()}
    out["pooled"] = segmentation_metrics(pred, truth)
    out["baseline_pooled_dice"] = segmentation_metrics(np.ones_like(truth), truth)["dice"]  # every lung pixel
    out["voxel_auroc"] = auroc(error, truth)
    out["oracle_dice"], out["oracle_threshold"] = oracle_dice(error, truth)
    return out
