"""Metrics against hand-computed cases and a naive per-image implementation."""

from __future__ import annotations

import numpy as np
import pytest

from hashtag import metrics

# Two images, five tags. Image 0: true {0, 2}; image 1: true {1}.
Y_TRUE = np.array([[1, 0, 1, 0, 0], [0, 1, 0, 0, 0]], bool)
SCORES = np.array([[0.9, 0.8, 0.7, 0.1, 0.0], [0.5, 0.1, 0.4, 0.3, 0.2]], np.float32)


def test_micro_prf_hand_computed():
    y_pred = np.array([[1, 1, 0, 0, 0], [0, 1, 0, 0, 1]], bool)
    # TP = 2 (0,0), (1,1); FP = 2; FN = 1
    result = metrics.micro_prf(Y_TRUE, y_pred)
    assert result["precision"] == pytest.approx(2 / 4)
    assert result["recall"] == pytest.approx(2 / 3)
    assert result["f1"] == pytest.approx(2 / (2 + 0.5 * 3))


def test_micro_prf_empty_is_zero_not_nan():
    empty = np.zeros((2, 3), bool)
    assert metrics.micro_prf(empty, empty) == {"f1": 0.0, "precision": 0.0, "recall": 0.0}


def test_at_k_hand_computed():
    result = metrics.at_k(Y_TRUE, SCORES, ks=(1, 2, 3))
    # image 0 ranking: 0, 1, 2 -> hits 1, 1, 2; image 1 ranking: 0, 2, 3 -> hits 0, 0, 0.
    assert result["p@1"] == pytest.approx((1 + 0) / 2)
    assert result["r@1"] == pytest.approx((1 / 2 + 0) / 2)
    assert result["f1@1"] == pytest.approx((2 * 1 / (1 + 2) + 0) / 2)
    assert result["hit@1"] == pytest.approx(0.5)
    assert result["p@3"] == pytest.approx((2 / 3 + 0) / 2)
    assert result["r@3"] == pytest.approx((1 + 0) / 2)
    assert result["f1@3"] == pytest.approx((2 * 2 / (3 + 2) + 0) / 2)
    assert result["hit@2"] == pytest.approx(0.5)


def test_at_k_ignores_untagged_images_and_clips_k():
    y = np.vstack([Y_TRUE, np.zeros((1, 5), bool)])
    s = np.vstack([SCORES, np.ones((1, 5), np.float32)])
    assert metrics.at_k(y, s, ks=(1,)) == metrics.at_k(Y_TRUE, SCORES, ks=(1,))
    assert metrics.at_k(Y_TRUE, SCORES, ks=(50,))["r@50"] == pytest.approx(1.0)


def test_top_k_ties_go_to_the_lower_index():
    scores = np.array([[1.0, 2.0, 2.0, 2.0, 0.0]])
    assert metrics.top_k_indices(scores, 2).tolist() == [[1, 2]]
    assert metrics.top_k_mask(scores, 1).tolist() == [[False, True, False, False, False]]


def test_mean_average_precision_hand_computed():
    # image 0: hits at ranks 1 and 3 -> (1/1 + 2/3) / 2; image 1: tag 1 ranked 5th -> 1/5.
    expected = ((1 + 2 / 3) / 2 + 1 / 5) / 2
    assert metrics.mean_average_precision(Y_TRUE, SCORES) == pytest.approx(expected)


def test_evaluate_flattens_everything():
    result = metrics.evaluate(Y_TRUE, SCORES, SCORES >= 0.5)
    for key in ("f1", "precision", "recall", "p@5", "r@5", "f1@5", "hit@5", "map"):
        assert key in result
    assert "f1" not in metrics.evaluate(Y_TRUE, SCORES)


def test_shape_errors_are_clear():
    with pytest.raises(ValueError, match="one row per image"):
        metrics.micro_prf(Y_TRUE, Y_TRUE[:1])
    with pytest.raises(ValueError, match="positive"):
        metrics.at_k(Y_TRUE, SCORES, ks=(0,))


def naive_at_k(y_true, scores, k):
    """Per-image Python loop, the way the original scored."""
    values = {"p": [], "r": [], "f1": [], "hit": []}
    for truth, row in zip(y_true, scores, strict=True):
        if not truth.any():
            continue
        top = sorted(range(len(row)), key=lambda j: (-row[j], j))[:k]
        hits = sum(truth[j] for j in top)
        values["p"].append(hits / k)
        values["r"].append(hits / truth.sum())
        values["f1"].append(2 * hits / (k + truth.sum()))
        values["hit"].append(hits > 0)
    return {f"{m}@{k}": float(np.mean(v)) for m, v in values.items()}


def test_vectorised_matches_naive_on_random_data_with_ties():
    rng = np.random.default_rng(0)
    y = rng.random((300, 40)) < 0.1
    scores = np.round(rng.random((300, 40)), 1)  # many ties
    result = metrics.at_k(y, scores, ks=(1, 5, 10))
    for k in (1, 5, 10):
        for key, value in naive_at_k(y, scores, k).items():
            assert result[key] == pytest.approx(value)


def test_map_matches_stable_argsort_reference_with_ties():
    rng = np.random.default_rng(1)
    y = rng.random((500, 60)) < 0.1
    scores = np.round(rng.random((500, 60)) - 0.5 + 0.3 * y, 1).astype(
        np.float32
    )  # ties, negatives
    order = np.argsort(-scores, axis=1, kind="stable")
    hits = np.take_along_axis(y, order, axis=1)
    keep = y.sum(axis=1) > 0
    ap = (np.cumsum(hits, axis=1) / np.arange(1, 61) * hits).sum(axis=1)[keep] / y.sum(axis=1)[keep]
    assert metrics.mean_average_precision(y, scores) == pytest.approx(ap.mean())
