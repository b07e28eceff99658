"""Segmentation and detection metrics of Tables 1–2, from counts you can check by hand.

For a prediction P and truth G (booleans, optionally restricted to a region such as the lung):
TP = |P ∧ G|, FP = |P ∧ ¬G|, FN = |¬P ∧ G|, TN = |¬P ∧ ¬G|;
IoU = TP/(TP+FP+FN), Dice = 2TP/(2TP+FP+FN), precision = TP/(TP+FP), recall = TP/(TP+FN), FPR = FP/(FP+TN).
A ratio whose denominator is 0 is NaN (undefined), except IoU and Dice of an empty prediction on an empty
truth, which are 1 (perfect agreement). Means and stds across subjects skip NaNs.
"""

from __future__ import annotations

from typing import Iterable, Optional

import numpy as np

METRICS = ("iou", "dice", "precision", "recall", "fpr")


def confusion(pred: np.ndarray, truth: np.ndarray, region: Optional[np.ndarray] = None) -> dict:
    pred, truth = np.asarray(pred) > 0, np.asarray(truth) > 0
    if pred.shape != truth.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from truth shape {truth.shape}")
    if region is not None:
        region = np.asarray(region) > 0
        pred, truth = pred[region], truth[region]
    tp = int(np.count_nonzero(pred & truth))
    fp = int(np.count_nonzero(pred & ~truth))
    fn = int(np.count_nonzero(~pred & truth))
    tn = int(pred.size - tp - fp - fn)
    return {"tp": tp, "fp": fp, "fn": fn, "tn": tn}


def _ratio(num: float, den: float) -> float:
    return float(num) / den if den else float("nan")


def segmentation_metrics(pred, truth, region=None) -> dict:
    c = confusion(pred, truth, region)
    tp, fp, fn, tn = c["tp"], c["fp"], c["fn"], c["tn"]
    empty = tp + fp + fn == 0
    return {
        "iou": 1.0 if empty else tp / (tp + fp + fn),
        "dice": 1.0 if empty else 2 * tp / (2 * tp + fp + fn),
        "precision": _ratio(tp, tp + fp),
        "recall": _ratio(tp, tp + fn),
        "fpr": _ratio(fp, fp + tn),
    }


def auroc(scores: Iterable[float], labels: Iterable[int]) -> float:
    """Area under the ROC curve = P(score of a positive > score of a negative) + ½ P(tie) (Mann–Whitney U with
    mid-ranks for ties). NaN when one class is absent. Works on millions of voxels (one sort)."""
    from scipy.stats import rankdata

    scores = np.asarray(scores if isinstance(scores, np.ndarray) else list(scores), dtype=np.float64).ravel()
    labels = np.asarray(labels if isinstance(labels, np.ndarray) else list(labels)).ravel() > 0
    if scores.shape != labels.shape:
        raise ValueError(f"{scores.size} scores for {labels.size} labels")
    if not np.isfinite(scores).all():
        raise ValueError("scores hold NaN or infinity; an AUROC of them would be meaningless")
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(scores)  # mid-ranks over ties
    u = ranks[labels].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def oracle_dice(scores, truth) -> tuple[float, float]:
    """(best Dice any single threshold on ``scores`` reaches against ``truth``, that threshold): the prediction
    ``scores >= threshold`` for every distinct score value. It separates "the map is bad" (low oracle Dice) from
    "the threshold is bad" (oracle high, the method's Dice low). Uses the labels, so it is a diagnostic, never a
    way to choose a setting. (NaN, NaN) when the truth is empty."""
    scores = np.asarray(scores, dtype=np.float64).ravel()
    truth = np.asarray(truth).ravel() > 0
    if scores.shape != truth.shape:
        raise ValueError(f"{scores.size} scores for {truth.size} truth values")
    positives = int(truth.sum())
    if positives == 0 or scores.size == 0:
        return float("nan"), float("nan")
    order = np.argsort(-scores, kind="stable")
    s, tp = scores[order], np.cumsum(truth[order])
    last = np.r_[s[1:] != s[:-1], True]  # flagging the top k: only k at the end of a run of equal scores
    k = np.arange(1, s.size + 1)[last]
    dice = 2.0 * tp[last] / (k + positives)  # Dice = 2TP / (|P| + |G|)
    best = int(np.argmax(dice))
    return float(dice[best]), float(s[last][best])


def summarise(per_subject: list[dict], names=METRICS) -> dict:
    """{metric: {"mean": m, "std": s, "n": count}} across subjects (population std, NaNs skipped), as Tables 1–2
    report mean (std)."""
    out = {}
    for name in names:
        values = np.array([s[name] for s in per_subject if name in s], dtype=np.float64)
        values = values[np.isfinite(values)]
        out[name] = {
            "mean": float(values.mean()) if values.size else float("nan"),
            "std": float(values.std()) if values.size else float("nan"),
            "n": int(values.size),
        }
    return out
