"""RegMean (Jin et al., "Dataless Knowledge Fusion by Merging Weights of Language Models", arXiv:2212.09849).

* ``compute_gram_matrices(model, dataloader, num_examples)``: per ``nn.Linear`` module, the mean over input
  rows of ``X^T X`` (MergeLM: all token positions, padding included), from forward hooks.
* ``regmean_merging(base, deltas, gram_matrices, reduce_non_diagonal_ratio)``: for a Linear weight,
  ``W^T = (sum_i G'_i)^-1 sum_i G'_i W_i^T`` with ``G'_i`` = ``G_i`` with off-diagonal entries scaled by
  alpha; every other parameter (biases, norms, embeddings) is a plain average.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from model_merging_methods.average import average_merging


def gram_module_name(param_name: str) -> str | None:
    """The Linear module a weight belongs to (``"a.b.weight"`` -> ``"a.b"``); None for other names."""
    return param_name[: -len(".weight")] if param_name.endswith(".weight") else None


class _GramAccumulator:
    def __init__(self) -> None:
        self.gram: Tensor | None = None
        self.rows = 0

    def __call__(self, module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).float()
        product = x.T @ x
        if self.gram is None:
            self.gram = product / x.shape[0]
        else:  # running mean over rows, as MergeLM
            self.gram = (self.gram * self.rows + product) / (self.rows + x.shape[0])
        self.rows += x.shape[0]


def compute_gram_matrices(
    model: nn.Module,
    dataloader: Iterable[Mapping[str, Tensor]],
    *,
    num_examples: int,
    device: str | torch.device | None = None,
) -> dict[str, Tensor]:
    """Gram matrices ``mean over rows of X^T X`` of every ``nn.Linear`` input, as MergeLM computes them.

    Batches (dicts of tensors; ``labels`` is dropped) are run while fewer than ``num_examples`` examples were
    seen. Returns ``{linear module name: float32 (in_features, in_features) matrix}``.
    """
    if num_examples < 1:
        raise ValueError(f"num_examples must be >= 1, got {num_examples}")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    accumulators = {name: _GramAccumulator() for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    modules = dict(model.named_modules())
    handles = [modules[name].register_forward_hook(acc) for name, acc in accumulators.items()]
    was_training, seen = model.training, 0
    model.eval()
    try:
        with torch.no_grad():
            for batch in tqdm(dataloader, desc="regmean", leave=False):
                if seen >= num_examples:
                    break
                inputs = {k: v.to(device) for k, v in batch.items() if k != "labels" and isinstance(v, Tensor)}
                model(**inputs)
                seen += len(next(iter(inputs.values())))
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return {name: acc.gram for name, acc in accumulators.items() if acc.gram is not None}


def reduce_non_diagonal(gram: Tensor, reduce_non_diagonal_ratio: float) -> Tensor:
    """``G * alpha`` off the diagonal, ``G`` on it (MergeLM ``reduce_non_diagonal_ratio``)."""
    scaled = gram.float() * reduce_non_diagonal_ratio
    scaled.diagonal().copy_(gram.diagonal())
    return scaled


def regmean_merging(
    base: Tensor,
    deltas: Sequence[Tensor],
    *,
    gram_matrices: Sequence[Tensor] | None = None,
    reduce_non_diagonal_ratio: float = 1.0,
) -> Tensor:
    """RegMean for one parameter, in float32.

    Args:
        base: float32 parameter of the pre-trained model (``W_i = base + delta_i``).
        deltas: float32 task vectors (possibly DARE-processed), one per model.
        gram_matrices: each model's Gram matrix of this Linear weight's inputs, ``(in, in)``; None for
            parameters that are not Linear weights (then the result is the plain average).
        reduce_non_diagonal_ratio: alpha in [0, 1]; MergeLM flag ``--reduce_non_diagonal_ratio``.
    """
    if gram_matrices is None:
        return average_merging(base, deltas)
    grams = [reduce_non_diagonal(g, reduce_non_diagonal_ratio) for g in gram_matrices]
    gram_sum = torch.stack(grams).sum(dim=0)
    rhs = torch.stack([g @ (base + d).T for g, d in zip(grams, deltas, strict=True)]).sum(dim=0)
    # solve instead of MergeLM's explicit inverse: same value, better conditioned
    return torch.linalg.solve(gram_sum, rhs).T


def regmean_arguments(hyperparameters: Mapping[str, Any], *, name: str, num_models: int,
                      statistics: Sequence[Tensor] | None, global_state: Any) -> dict[str, Any]:
    """``regmean_merging``'s keyword arguments: this Linear weight's Gram matrices (None: plain average)."""
    return {"gram_matrices": statistics, "reduce_non_diagonal_ratio": hyperparameters["reduce_non_diagonal_ratio"]}
