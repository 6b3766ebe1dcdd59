"""GLUE metrics computed locally with scikit-learn and SciPy (same names and values as the ``evaluate`` GLUE metric).

CoLA: ``matthews_correlation``; MRPC, QQP: ``accuracy``, ``f1`` and their mean ``averaged_scores``;
STS-B: ``pearson``, ``spearmanr`` and their mean ``averaged_scores``; every other task: ``accuracy``.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import f1_score, matthews_corrcoef

from glue.glue_data import get_glue_task


def compute_glue_metrics(task_name: str, predictions: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Metrics of one task from model outputs.

    Args:
        task_name: a GLUE task name.
        predictions: logits of shape (N, C) (argmax taken for classification; column 0 for regression), or
            already-final predictions of shape (N,).
        labels: gold labels of shape (N,).
    Returns:
        The metric dict; ``averaged_scores`` is added when the task has more than one metric.
    """
    task = get_glue_task(task_name)
    predictions, labels = np.asarray(predictions), np.asarray(labels)
    if predictions.ndim == 2:
        predictions = predictions[:, 0] if task.num_labels == 1 else predictions[:, : task.num_labels].argmax(-1)
    if len(predictions) != len(labels) or len(labels) == 0:
        raise ValueError(f"predictions and labels must be non-empty and equally long, got {len(predictions)} "
                         f"and {len(labels)}")
    if task.name == "cola":
        return {"matthews_correlation": float(matthews_corrcoef(labels, predictions))}
    if task.name == "stsb":
        result = {"pearson": float(pearsonr(predictions, labels)[0]),
                  "spearmanr": float(spearmanr(predictions, labels)[0])}
    elif task.name in ("mrpc", "qqp"):
        result = {"accuracy": float((predictions == labels).mean()), "f1": float(f1_score(labels, predictions))}
    else:
        return {"accuracy": float((predictions == labels).mean())}
    result["averaged_scores"] = float(np.mean(list(result.values())))
    return result


def primary_score(task_name: str, metrics: Mapping[str, float]) -> float:
    """The value MergeLM selects on (``matthews_correlation``, ``accuracy`` or ``averaged_scores``)."""
    return float(metrics[get_glue_task(task_name).primary_metric])
