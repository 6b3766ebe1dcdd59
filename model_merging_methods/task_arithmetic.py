"""Task arithmetic (Ilharco et al., "Editing Models with Task Arithmetic", arXiv:2212.04089)."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor


def sum_deltas(deltas: Sequence[Tensor]) -> Tensor:
    """``delta_0 + delta_1 + ...`` summed left to right (MergeLM's order), as a new tensor."""
    total = deltas[0] + deltas[1] if len(deltas) > 1 else deltas[0].clone()
    for delta in deltas[2:]:
        total.add_(delta)
    return total


def task_arithmetic(base: Tensor, deltas: Sequence[Tensor], *, scaling_coefficient: float = 1.0) -> Tensor:
    """``merged = base + scaling_coefficient * sum_i delta_i``, in float32.

    MergeLM requires at least two models and a Python float; here one model and any real number work.

    Args:
        base: float32 parameter of the pre-trained model.
        deltas: float32 task vectors (possibly DARE-processed), one per model.
        scaling_coefficient: lambda; MergeLM flag ``--scaling_coefficient`` (GLUE grid 0.1 ... 1.0).
    """
    # (lambda * sum) + base in place on the fresh sum: same operations as base + lambda * sum, no temporaries
    total = sum_deltas(deltas)
    if scaling_coefficient != 1.0:  # x * 1.0 == x exactly: skip the pass
        total.mul_(scaling_coefficient)
    return total.add_(base)
