"""Average merging (model soup; Wortsman et al., arXiv:2203.05482)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def average_merging(base: Tensor, deltas: Sequence[Tensor]) -> Tensor:
    """``merged = mean_i (base + delta_i)`` element-wise, in float32.

    MergeLM averages the fine-tuned parameters directly (``mean_i theta_i``); with ``theta_i = base + delta_i``
    this is the same value up to float32 rounding. With DARE first this is ``base + mean_i DARE(delta_i)``.

    Args:
        base: float32 parameter of the pre-trained model.
        deltas: float32 task vectors (fine-tuned minus base, possibly DARE-processed), one per model.
    """
    return torch.stack([base + delta for delta in deltas]).mean(dim=0)
