"""GLUE metrics against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest

from glue.glue_metrics import compute_glue_metrics, primary_score


def test_cola_matthews_hand_computed():
    labels = np.array([1, 1, 0, 0])
    predictions = np.array([1, 0, 0, 0])
    # TP=1 TN=2 FP=0 FN=1: (1*2 - 0*1) / sqrt((1+0)(1+1)(2+0)(2+1)) = 2 / sqrt(12)
    result = compute_glue_metrics("cola", predictions, labels)
    assert result == {"matthews_correlation": pytest.approx(2 / math.sqrt(12))}


def test_mrpc_accuracy_f1_and_average_from_logits():
    logits = np.array([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4]])  # argmax -> [1, 0, 1, 0]
    labels = np.array([1, 1, 0, 0])
    # accuracy 2/4; TP=1 FP=1 FN=1 -> precision 1/2, recall 1/2, F1 1/2; average (0.5 + 0.5) / 2
    result = compute_glue_metrics("mrpc", logits, labels)
    assert result == {"accuracy": 0.5, "f1": 0.5, "averaged_scores": 0.5}
    assert primary_score("mrpc", result) == 0.5


def test_stsb_pearson_spearman_from_regression_column():
    logits = np.array([[1.0], [2.0], [3.0], [5.0]])
    labels = np.array([1.0, 2.0, 3.0, 4.0])
    # Spearman: ranks identical -> 1.0; Pearson of x=[1,2,3,5], y=[1,2,3,4]:
    # dx=[-1.75,-0.75,0.25,2.25], dy=[-1.5,-0.5,0.5,1.5]; sum dxdy=6.5; sum dx^2=8.75; sum dy^2=5
    pearson = 6.5 / math.sqrt(8.75 * 5)
    result = compute_glue_metrics("stsb", logits, labels)
    assert result["spearmanr"] == pytest.approx(1.0)
    assert result["pearson"] == pytest.approx(pearson)
    assert result["averaged_scores"] == pytest.approx((pearson + 1.0) / 2)


def test_mnli_uses_only_three_logit_columns():
    # a 4th padded column (-1000 in the multitask model, here +9) must be ignored for a 3-class task
    logits = np.array([[0.0, 1.0, 0.0, 9.0], [2.0, 0.0, 0.0, 9.0], [0.0, 0.0, 3.0, 9.0]])
    assert compute_glue_metrics("mnli", logits, np.array([1, 0, 1])) == {"accuracy": pytest.approx(2 / 3)}


def test_length_mismatch_is_an_error():
    with pytest.raises(ValueError, match="equally long"):
        compute_glue_metrics("rte", np.array([0, 1]), np.array([0]))
