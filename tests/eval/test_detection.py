"""ROC/AUC and the threshold for a target false-positive rate, against hand-computed cases."""

from __future__ import annotations

import numpy as np
import pytest

from purifier import detection


def test_roc_and_auc_hand_computed():
    neg = [0.1, 0.2, 0.3, 0.4]
    pos = [0.35, 0.5, 0.6]
    fpr, tpr, thr = detection.roc_curve(neg, pos)
    np.testing.assert_allclose(fpr, [0, 0, 0, 1 / 4, 1 / 4, 2 / 4, 3 / 4, 1])
    np.testing.assert_allclose(tpr, [0, 1 / 3, 2 / 3, 2 / 3, 1, 1, 1, 1])
    assert thr[0] == np.inf and thr[1] == 0.6
    # 11 of the 12 (adversarial, clean) pairs are ordered right.
    assert detection.auc(fpr, tpr) == pytest.approx(11 / 12)


@pytest.mark.parametrize("neg,pos,expected", [
    ([0.5], [0.5], 0.5),                      # a tie counts one half
    ([0.1, 0.2], [0.3, 0.4], 1.0),
    ([0.3, 0.4], [0.1, 0.2], 0.0),
    ([0.1, 0.5, 0.5], [0.5, 0.9], (1 + 0.5 + 0.5 + 1 + 1 + 1) / 6),
])
def test_auc_is_the_mann_whitney_statistic(neg, pos, expected):
    assert detection.roc_auc(neg, pos) == pytest.approx(expected)


def test_auc_matches_scikit_learn():
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    neg, pos = rng.normal(0, 1, 300).round(1), rng.normal(0.7, 1, 200).round(1)  # with ties
    labels = np.r_[np.zeros(300), np.ones(200)]
    assert detection.roc_auc(neg, pos) == pytest.approx(metrics.roc_auc_score(labels, np.r_[neg, pos]))


def test_threshold_for_a_target_fpr():
    neg = np.arange(1, 101) / 100            # 0.01 .. 1.00
    t = detection.threshold_for_fpr(neg, 0.05)
    assert t == pytest.approx(0.95)          # 1.00, 0.99, 0.98, 0.97, 0.96 lie above it
    assert detection.rates_at(t, neg)["fpr"] == pytest.approx(0.05)
    assert detection.rates_at(detection.threshold_for_fpr(neg, 0.0), neg)["fpr"] == 0.0
    rates = detection.rates_at(0.5, neg, positives=[0.4, 0.6, 0.7, 0.8])
    assert rates == {"fpr": 0.5, "tpr": 0.75}
    with pytest.raises(ValueError):
        detection.threshold_for_fpr(neg, 1.5)
