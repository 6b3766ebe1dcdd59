"""TIES-Merging (Yadav et al., "Resolving Interference When Merging Models", arXiv:2306.01708).

Three steps on the task vectors: trim (keep the largest ``1 - param_value_mask_rate`` fraction of each
model's |delta|), elect a sign per coordinate, and average only the entries agreeing with it (disjoint mean);
then ``merged = base + scaling_coefficient * disjoint_mean``.

MergeLM details kept here: the trim keeps ``|delta| >= `` the k-th smallest value (ties kept, so fewer than k
entries may be zeroed), ``k = int(N * rate)``; the elected sign is ``sign(sum_i trimmed_i)`` and coordinates
where that sum is exactly 0 get the *majority sign* ``sign(sum of all elected signs)``. With
``ties_trim_scope="global"`` (MergeLM, the paper) k and the majority sign are computed over the whole model
(all merged tensors), with ``"per_tensor"`` (mergekit, peft) over each tensor.

The global statistics are found without holding the model: ``KthSmallestAbs`` is an exact two-pass radix
selection over float32 bit patterns (65,536-bin histograms), ``TiesGlobalState`` runs it for every model and
then sums the elected signs in a third pass. The in-memory and streaming paths both use it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor

TrimScope = Literal["global", "per_tensor"]
_HALF_BITS = 16
_BINS = 1 << _HALF_BITS


def trim(deltas: Tensor, thresholds: Sequence[float]) -> Tensor:
    """Zero the entries of each model's deltas (``deltas[i]``) whose ``|x|`` is below ``thresholds[i]``."""
    shape = (-1,) + (1,) * (deltas.dim() - 1)
    limits = torch.tensor(list(thresholds), dtype=deltas.dtype, device=deltas.device).view(shape)
    return deltas * (deltas.abs() >= limits)


def elect_sign(trimmed: Tensor, majority_sign: float | None = None) -> Tensor:
    """``sign(sum_i trimmed_i)``; zero sums get ``majority_sign`` (default: the sign of this tensor's sign sum)."""
    signs = torch.sign(trimmed.sum(dim=0))
    if majority_sign is None:
        majority_sign = _sign_of_sum(signs)
    return torch.where(signs == 0, torch.full_like(signs, majority_sign), signs)


def disjoint_mean(trimmed: Tensor, signs: Tensor) -> Tensor:
    """Mean over models of the entries whose sign equals the elected sign (zeros never count)."""
    agree = ((signs > 0) & (trimmed > 0)) | ((signs < 0) & (trimmed < 0))
    kept = trimmed * agree
    counts = (kept != 0).sum(dim=0).to(trimmed.dtype)
    return kept.sum(dim=0) / torch.clamp(counts, min=1.0)


def per_tensor_thresholds(deltas: Tensor, param_value_mask_rate: float) -> list[float]:
    """Each model's k-th smallest ``|delta|`` within this tensor, ``k = int(numel * rate)`` (0.0 when k = 0)."""
    flat = deltas.reshape(deltas.shape[0], -1).abs()
    k = int(flat.shape[1] * param_value_mask_rate)
    if k == 0:
        return [0.0] * flat.shape[0]
    return flat.kthvalue(k, dim=1).values.tolist()


def ties_merging(
    base: Tensor,
    deltas: Sequence[Tensor],
    *,
    param_value_mask_rate: float = 0.8,
    scaling_coefficient: float = 1.0,
    thresholds: Sequence[float] | None = None,
    majority_sign: float | None = None,
) -> Tensor:
    """TIES-Merging of one parameter, in float32.

    Args:
        base: float32 parameter of the pre-trained model.
        deltas: float32 task vectors (possibly DARE-processed), one per model.
        param_value_mask_rate: fraction of smallest |delta| trimmed; MergeLM flag ``--param_value_mask_rate``.
        scaling_coefficient: lambda applied to the merged delta; MergeLM flag ``--scaling_coefficient``.
        thresholds: per-model trim thresholds from the whole model (``ties_trim_scope="global"``); None trims
            within this tensor.
        majority_sign: the whole model's majority sign for zero-sum coordinates (global scope); None uses
            this tensor's.
    """
    stacked = torch.stack(list(deltas))
    if thresholds is None:
        thresholds = per_tensor_thresholds(stacked, param_value_mask_rate)
    trimmed = trim(stacked, thresholds)
    merged = disjoint_mean(trimmed, elect_sign(trimmed, majority_sign))
    return base + scaling_coefficient * merged


def _abs_bits(x: Tensor) -> Tensor:
    # |x| of a float32 is non-negative, so its int32 bit pattern orders like the value itself
    return x.detach().float().abs().reshape(-1).view(torch.int32)


class KthSmallestAbs:
    """Exact k-th smallest ``|x|`` (1-based k) over a stream of float32 tensors, in two passes.

    Pass 0 histograms the upper 16 bits of each ``|x|`` bit pattern, pass 1 the lower 16 bits inside the bin
    holding the k-th value; memory is two 65,536-bin histograms whatever the data size. Equals
    ``torch.cat(all).abs().kthvalue(k)`` exactly.
    """

    num_passes = 2

    def __init__(self, k: int) -> None:
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        self.k = k
        self._histogram = torch.zeros(_BINS, dtype=torch.int64)
        self._high_bin: int | None = None
        self._pending: list[Tensor] = []
        self._pending_numel = 0
        self._rank_in_bin = 0
        self.value: float | None = None

    def update(self, pass_index: int, x: Tensor) -> None:
        bits = _abs_bits(x).cpu()
        if pass_index == 0:
            keys = bits >> _HALF_BITS
        else:
            keys = bits[(bits >> _HALF_BITS) == self._high_bin] & (_BINS - 1)
        # small tensors are buffered: one 65,536-bin bincount per tiny LayerNorm would dominate
        self._pending.append(keys)
        self._pending_numel += keys.numel()
        if self._pending_numel >= _BINS * 16:
            self._flush()

    def _flush(self) -> None:
        if self._pending:
            keys = torch.cat(self._pending).long()
            self._histogram += torch.bincount(keys, minlength=_BINS)
        self._pending, self._pending_numel = [], 0

    def finish_pass(self, pass_index: int) -> None:
        self._flush()
        cumulative = torch.cumsum(self._histogram, dim=0)
        if int(cumulative[-1]) < (self.k if pass_index == 0 else self._rank_in_bin):
            raise RuntimeError(f"k={self.k} exceeds the {int(cumulative[-1])} values seen")
        rank = self.k if pass_index == 0 else self._rank_in_bin
        index = int(torch.searchsorted(cumulative, torch.tensor(rank), right=False))
        if pass_index == 0:
            self._high_bin = index
            self._rank_in_bin = rank - (int(cumulative[index - 1]) if index > 0 else 0)
            self._histogram.zero_()
        else:
            bits = torch.tensor([(self._high_bin << _HALF_BITS) | index], dtype=torch.int32)
            self.value = float(bits.view(torch.float32))


class TiesGlobalState:
    """Whole-model TIES statistics (MergeLM's global trim): per-model thresholds and the majority sign.

    Feed every merged tensor's stacked deltas ``(num_models, ...)`` once per pass, in any order:
    passes 0-1 find each model's k-th smallest |delta| over the whole model (``k = int(N * rate)``),
    pass 2 sums the elected signs. Then ``thresholds`` and ``majority_sign`` are set.
    """

    num_passes = 3
    uses_model_tensors = True

    def __init__(self, num_models: int, total_numel: int, param_value_mask_rate: float) -> None:
        self.k = int(total_numel * param_value_mask_rate)
        self.selectors = [KthSmallestAbs(self.k) for _ in range(num_models)] if self.k > 0 else []
        self.thresholds: list[float] = [0.0] * num_models
        self._sign_sum = 0
        self.majority_sign: float | None = None

    def update(self, pass_index: int, stacked_deltas: Tensor) -> None:
        if pass_index < 2:
            for selector, delta in zip(self.selectors, stacked_deltas, strict=False):  # no selectors when k = 0
                selector.update(pass_index, delta)
        else:
            signs = torch.sign(trim(stacked_deltas, self.thresholds).sum(dim=0))
            self._sign_sum += int(signs.to(torch.int32).sum())

    def finish_pass(self, pass_index: int) -> None:
        if pass_index < 2:
            for selector in self.selectors:
                selector.finish_pass(pass_index)
            if pass_index == 1 and self.selectors:
                self.thresholds = [float(s.value) for s in self.selectors]
        else:
            self.majority_sign = float((self._sign_sum > 0) - (self._sign_sum < 0))


def ties_global_state(hyperparameters: Mapping[str, Any], num_models: int, total_numel: int) -> TiesGlobalState | None:
    """The whole-model trim and sign state for ``ties_trim_scope="global"``; None for ``"per_tensor"``."""
    if hyperparameters["ties_trim_scope"] != "global":
        return None
    return TiesGlobalState(num_models, total_numel, hyperparameters["param_value_mask_rate"])


def ties_chunkable(hyperparameters: Mapping[str, Any]) -> bool:
    """Row chunks are exact with the global thresholds and sign; a per-tensor trim needs the whole tensor."""
    return hyperparameters["ties_trim_scope"] == "global"


def ties_arguments(hyperparameters: Mapping[str, Any], *, name: str, num_models: int, statistics: Any,
                   global_state: TiesGlobalState | None) -> dict[str, Any]:
    """``ties_merging``'s keyword arguments: the hyperparameters, plus the whole model's thresholds and sign."""
    is_global = hyperparameters["ties_trim_scope"] == "global"
    return {
        "param_value_mask_rate": hyperparameters["param_value_mask_rate"],
        "scaling_coefficient": hyperparameters["scaling_coefficient"],
        "thresholds": global_state.thresholds if is_global else None,
        "majority_sign": global_state.majority_sign if is_global else None,
    }


def _sign_of_sum(signs: Tensor) -> float:
    # integer sum: a float32 sum of +-1 is inexact beyond 2**24 elements (large embeddings)
    total = int(signs.to(torch.int32).sum())
    return float((total > 0) - (total < 0))
