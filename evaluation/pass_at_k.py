"""Unbiased pass@k estimator (Chen et al., 2021, "Evaluating Large Language Models Trained on Code",
arXiv:2107.03374; same formula as openai/human-eval ``estimate_pass_at_k``)."""

from __future__ import annotations

from collections.abc import Sequence


def pass_at_k(num_samples: int, num_correct: int, k: int) -> float:
    """pass@k = 1 - C(n - c, k) / C(n, k), computed as a running product for numerical stability.

    Args:
        num_samples: n, samples generated for the problem (>= 1).
        num_correct: c, samples that passed (0 <= c <= n).
        k: the k of pass@k (1 <= k <= n).

    Returns:
        The unbiased estimate of the probability that at least one of k samples passes.
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    if not 0 <= num_correct <= num_samples:
        raise ValueError(f"num_correct must be in [0, num_samples={num_samples}], got {num_correct}")
    if not 1 <= k <= num_samples:
        raise ValueError(f"k must be in [1, num_samples={num_samples}], got {k}; generate at least k samples")
    if num_samples - num_correct < k:
        return 1.0
    prob_all_fail = 1.0
    for i in range(num_samples - num_correct + 1, num_samples + 1):
        prob_all_fail *= 1.0 - k / i
    return 1.0 - prob_all_fail


def mean_pass_at_k(num_samples: Sequence[int], num_correct: Sequence[int], k: int) -> float:
    """Mean of :func:`pass_at_k` over problems.

    Args:
        num_samples: samples per problem.
        num_correct: passing samples per problem, same length as ``num_samples``.
        k: the k of pass@k.

    Returns:
        The average pass@k (0.0 for an empty list).
    """
    if len(num_samples) != len(num_correct):
        raise ValueError(
            f"num_samples and num_correct must have the same length, got {len(num_samples)} and {len(num_correct)}"
        )
    if not num_samples:
        return 0.0
    return sum(pass_at_k(n, c, k) for n, c in zip(num_samples, num_correct, strict=True)) / len(num_samples)
