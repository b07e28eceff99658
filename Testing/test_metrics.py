"""Metrics against hand-computed cases."""

import math

import numpy as np
import pytest

from SACDiffLib.metrics import auroc, confusion, segmentation_metrics, summarise


def test_confusion_and_metrics_hand_computed():
    pred = np.array([1, 1, 1, 0, 0, 0, 1, 0])
    truth = np.array([1, 1, 0, 1, 0, 0, 0, 0])
    # TP=2 (idx 0,1), FP=2 (idx 2,6), FN=1 (idx 3), TN=3
    assert confusion(pred, truth) == {"tp": 2, "fp": 2, "fn": 1, "tn": 3}
    m = segmentation_metrics(pred, truth)
    assert m["iou"] == pytest.approx(2 / 5)
    assert m["dice"] == pytest.approx(4 / 7)
    assert m["precision"] == pytest.approx(2 / 4)
    assert m["recall"] == pytest.approx(2 / 3)
    assert m["fpr"] == pytest.approx(2 / 5)


def test_region_restriction():
    pred = np.array([1, 1, 0, 1])
    truth = np.array([1, 0, 0, 1])
    region = np.array([1, 1, 1, 0])  # the last voxel (a TP outside the lung) does not count
    assert confusion(pred, truth, region) == {"tp": 1, "fp": 1, "fn": 0, "tn": 1}


def test_empty_cases():
    z = np.zeros(5)
    m = segmentation_metrics(z, z)
    assert m["iou"] == 1 and m["dice"] == 1 and math.isnan(m["precision"]) and math.isnan(m["recall"])
    assert m["fpr"] == 0
    m = segmentation_metrics(np.ones(5), z)
    assert m["dice"] == 0 and m["fpr"] == 1 and m["precision"] == 0


def test_auroc_hand_computed_with_ties():
    # positives: 0.8, 0.4 ; negatives: 0.4, 0.1, 0.3
    # pairs: (0.8 > all 3) = 3 ; (0.4 vs 0.4 tie = 0.5, > 0.1, > 0.3) = 2.5 → 5.5 / 6
    assert auroc([0.8, 0.4, 0.4, 0.1, 0.3], [1, 1, 0, 0, 0]) == pytest.approx(5.5 / 6)
    assert auroc([0.1, 0.9], [0, 1]) == 1.0
    assert auroc([0.9, 0.1], [0, 1]) == 0.0
    assert math.isnan(auroc([0.1, 0.2], [1, 1]))


def test_auroc_equals_pairwise_count_on_random_data():
    rng = np.random.default_rng(0)
    s = rng.integers(0, 5, 60).astype(float)
    y = rng.integers(0, 2, 60)
    pos, neg = s[y == 1], s[y == 0]
    pairs = [(p > n) + 0.5 * (p == n) for p in pos for n in neg]
    assert auroc(s, y) == pytest.approx(np.mean(pairs))


def test_summarise_mean_std_skip_nan():
    rows = [{"dice": 0.2}, {"dice": 0.4}, {"dice": float("nan")}]
    s = summarise(rows, ["dice"])
    assert s["dice"]["mean"] == pytest.approx(0.3)
    assert s["dice"]["std"] == pytest.approx(0.1)
    assert s["dice"]["n"] == 2


def test_auroc_equals_the_pairwise_definition_with_ties():
    rng = np.random.default_rng(3)
    scores = rng.integers(0, 6, 300).astype(float)  # many ties
    labels = rng.random(300) < 0.3
    pos, neg = scores[labels], scores[~labels]
    pairwise = ((pos[:, None] > neg[None]).sum() + 0.5 * (pos[:, None] == neg[None]).sum()) / (pos.size * neg.size)
    assert auroc(scores, labels) == pytest.approx(pairwise)


def test_auroc_refuses_non_finite_scores():
    with pytest.raises(ValueError, match="NaN"):
        auroc([0.1, float("nan")], [0, 1])


def test_oracle_dice_equals_brute_force_over_every_threshold():
    from SACDiffLib.metrics import oracle_dice

    rng = np.random.default_rng(4)
    scores = np.round(rng.random(200), 2)  # ties
    truth = rng.random(200) < 0.2
    brute = max(2 * (truth & (scores >= t)).sum() / ((scores >= t).sum() + truth.sum()) for t in np.unique(scores))
    best, threshold = oracle_dice(scores, truth)
    assert best == pytest.approx(brute)
    assert 2 * (truth & (scores >= threshold)).sum() / ((scores >= threshold).sum() + truth.sum()) == pytest.approx(best)
    assert np.isnan(oracle_dice(scores, np.zeros(200, bool))[0])
