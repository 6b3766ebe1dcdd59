"""Fisher merging (Matena & Raffel, "Merging Models with Fisher-Weighted Averaging", arXiv:2111.09832).

Two separate steps:

* ``compute_fisher_weights(model, dataloader, num_examples, estimator=...)``: the diagonal Fisher of one model
  from data, either as MergeLM computes it (``"mergelm"``: the squared gradient of one batch objective, which
  mixes examples and classes) or exactly (``"exact"``: ``E_x sum_y p(y|x) (d log p(y|x) / d theta)**2``, per
  example).
* ``fisher_merging(base, deltas, fisher_weights, model_coefficients)``: the per-parameter combine
  ``theta = sum_i c_i (F_i + eps) theta_i / sum_i c_i (F_i + eps)``, with the per-model coefficients from
  ``fisher_model_coefficients`` (optionally normalised by each model's global Fisher norm).
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)


def _fisher_objective(logits: Tensor, labels: Tensor | None) -> Tensor:
    if logits.shape[-1] == 1:
        # regression (STS-B): MergeLM uses the model's MSE loss against the true labels (empirical Fisher)
        if labels is None:
            raise ValueError("a regression head needs 'labels' in every batch to compute its Fisher, got none")
        return F.mse_loss(logits.squeeze(-1), labels.to(logits.dtype).view(-1))
    # classification: MergeLM's sum over batch and classes of sqrt(p) * log p (p detached)
    probabilities = torch.softmax(logits, dim=-1).detach()
    return (torch.sqrt(probabilities) * torch.log_softmax(logits, dim=-1)).sum()


def _to_device(batch: Mapping[str, Tensor], device: torch.device) -> dict[str, Tensor]:
    return {key: value.to(device) if isinstance(value, Tensor) else value for key, value in batch.items()}


FISHER_ESTIMATORS = ("mergelm", "exact")


def _exact_example_fisher(model: nn.Module, example: Mapping[str, Tensor], params: Mapping[str, Tensor],
                          fisher: dict[str, Tensor]) -> None:
    """Add ``sum_y p(y|x) g_y**2`` (classification) or ``(d f / d theta)**2`` (regression) of one example.

    Embedding tables are switched to sparse gradients by the caller: their gradient is then the rows of the
    example's tokens only (summed per token id, then squared), not a dense table of zeros.
    """
    logits = model(**example).logits.squeeze(0)
    names = list(params)
    tensors = [params[n] for n in names]
    if logits.numel() == 1:  # regression head: Gaussian likelihood with unit variance -> (df/dtheta)^2
        targets = [(1.0, logits.reshape(()))]
    else:
        log_p = torch.log_softmax(logits, dim=-1)
        targets = [(float(w), log_p[y]) for y, w in enumerate(log_p.detach().exp())]
    for index, (weight, output) in enumerate(targets):
        grads = torch.autograd.grad(output, tensors, retain_graph=index + 1 < len(targets), allow_unused=True)
        for name, grad in zip(names, grads, strict=True):
            if grad is None:
                continue
            if grad.is_sparse:
                grad = grad.coalesce()  # one row per token id: the sum of its occurrences' gradients
                values = grad.values().float()
                fisher[name].index_add_(0, grad.indices()[0], values * values, alpha=weight)
            else:
                grad = grad.float()
                fisher[name].addcmul_(grad, grad, value=weight)


@contextlib.contextmanager
def _sparse_embedding_gradients(model: nn.Module) -> Iterator[None]:
    """``nn.Embedding`` layers give sparse gradients inside the block (restored afterwards)."""
    switched = [m for m in model.modules() if isinstance(m, nn.Embedding) and not m.sparse]
    for module in switched:
        module.sparse = True
    try:
        yield
    finally:
        for module in switched:
            module.sparse = False


def compute_fisher_weights(
    model: nn.Module,
    dataloader: Iterable[Mapping[str, Tensor]],
    *,
    num_examples: int,
    device: str | torch.device | None = None,
    batch_size: int | None = None,
    estimator: str = "mergelm",
) -> dict[str, Tensor]:
    """Diagonal Fisher of ``model`` over about ``num_examples`` training examples.

    Each batch is a dict of tensors with ``labels``; the model is called with the other keys and must return
    ``logits`` (one column = a regression head).

    ``estimator="mergelm"`` (MergeLM's): ``grad**2`` of the batch objective (classification: ``sum`` over batch
    and classes of ``sqrt(p) log p`` with ``p`` detached; regression: MSE with the labels), summed over batches
    and divided by the number of examples counted. Cross terms between examples and classes make this differ
    from the Fisher (at ``p = (0.5, 0.5)`` it can be 0 where the Fisher is 0.25). As in MergeLM, batches are
    taken while fewer than ``num_examples`` examples were counted, and each batch counts its nominal
    ``batch_size`` (default: the first batch's size).

    ``estimator="exact"``: ``(1/N) sum_x sum_y p(y|x) (d log p(y|x)/d theta)**2`` with one backward pass per
    example and class (labels unused); for a regression head the Fisher of a unit-variance Gaussian,
    ``(1/N) sum_x (d f(x)/d theta)**2``. Exactly ``num_examples`` examples are used (fewer if the loader ends).
    Gradients are cleared afterwards.

    Returns:
        ``{parameter name: float32 Fisher diagonal}`` for every parameter that requires grad.
    """
    if num_examples < 1:
        raise ValueError(f"num_examples must be >= 1, got {num_examples}")
    if estimator not in FISHER_ESTIMATORS:
        raise ValueError(f"estimator must be one of {FISHER_ESTIMATORS}, got {estimator!r}")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    fisher = {name: torch.zeros_like(p, dtype=torch.float32) for name, p in params.items()}
    was_training, counted = model.training, 0
    model.eval()
    for batch in tqdm(dataloader, desc=f"fisher ({estimator})", leave=False):
        if counted >= num_examples:
            break
        batch = _to_device(batch, device)
        labels = batch.pop("labels", None)
        model.zero_grad(set_to_none=True)
        if estimator == "exact":
            size = len(next(iter(batch.values())))
            with _sparse_embedding_gradients(model):
                for i in range(min(size, num_examples - counted)):
                    example = {k: v[i:i + 1] if isinstance(v, Tensor) else v for k, v in batch.items()}
                    _exact_example_fisher(model, example, params, fisher)
                    counted += 1
            continue
        _fisher_objective(model(**batch).logits, labels).backward()
        for name, p in params.items():
            if p.grad is not None:
                fisher[name] += p.grad.detach().float() ** 2
        counted += batch_size or len(next(iter(batch.values())))
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    if counted == 0:
        raise ValueError("the dataloader yielded no batches; Fisher weights need at least one example")
    if counted != num_examples:
        logger.warning("Fisher: num_examples=%d is not a multiple of the batch size or exceeds the data; used %d",
                       num_examples, counted)
    return {name: value / counted for name, value in fisher.items()}


def fisher_norm_squared(fisher_weight: Tensor) -> float:
    """``||F||_2**2`` of one parameter's Fisher, accumulated in float64."""
    return float(fisher_weight.double().pow(2).sum())


def fisher_model_coefficients(
    num_models: int,
    *,
    fisher_scaling_coefficients: Sequence[float] | None = None,
    normalize_fisher_weight: bool = True,
    minimal_fisher_weight: float = 1e-6,
    global_norms: Sequence[float] | None = None,
) -> list[float]:
    """Per-model coefficients ``c_i`` of the Fisher combine (MergeLM ``merging_with_fisher_weights``).

    ``c_i`` = ``fisher_scaling_coefficients[i]`` (default ``1/M``); with ``normalize_fisher_weight`` each is
    multiplied by ``w_i = (1/(g_i + eps)) / sum_j (1/(g_j + eps))`` where ``g_i`` is model i's global Fisher
    L2 norm over all merged parameters (``global_norms``) and ``eps = minimal_fisher_weight``.
    """
    coefficients = list(fisher_scaling_coefficients or [1.0 / num_models] * num_models)
    if not normalize_fisher_weight:
        return coefficients
    if global_norms is None or len(global_norms) != num_models:
        raise ValueError(f"normalize_fisher_weight needs one global Fisher norm per model, got {global_norms!r}")
    inverse = [1.0 / (norm + minimal_fisher_weight) for norm in global_norms]
    total = sum(inverse)
    return [c * w / total for c, w in zip(coefficients, inverse, strict=True)]


def global_fisher_norms(squared_norm_sums: Sequence[float]) -> list[float]:
    """Global L2 norms from per-model sums of squared per-parameter norms."""
    return [math.sqrt(total) for total in squared_norm_sums]


def fisher_merging(
    base: Tensor,
    deltas: Sequence[Tensor],
    *,
    fisher_weights: Sequence[Tensor],
    model_coefficients: Sequence[float],
    minimal_fisher_weight: float = 1e-6,
) -> Tensor:
    """``theta = sum_i c_i (F_i + eps) theta_i / sum_i c_i (F_i + eps)`` for one parameter, in float32.

    Args:
        base: float32 parameter of the pre-trained model (``theta_i = base + delta_i``).
        deltas: float32 task vectors (possibly DARE-processed), one per model.
        fisher_weights: this parameter's Fisher diagonal of each model (same shape).
        model_coefficients: ``c_i`` from ``fisher_model_coefficients``.
        minimal_fisher_weight: eps added to every Fisher value; MergeLM flag ``--minimal_fisher_weight``.
    """
    numerator = torch.zeros_like(base)
    denominator = torch.zeros_like(base)
    for delta, fisher, coefficient in zip(deltas, fisher_weights, model_coefficients, strict=True):
        weight = coefficient * (fisher.float() + minimal_fisher_weight)
        numerator.add_(weight * (base + delta))
        denominator.add_(weight)
    return numerator / denominator


def _coefficient_settings(hyperparameters: Mapping[str, Any]) -> dict[str, Any]:
    keys = ("fisher_scaling_coefficients", "normalize_fisher_weight", "minimal_fisher_weight")
    return {key: hyperparameters[key] for key in keys}


class FisherNormState:
    """One pass over the Fisher statistics: each model's global Fisher L2 norm, then the coefficients."""

    num_passes = 1
    uses_model_tensors = False

    def __init__(self, num_models: int, settings: Mapping[str, Any]) -> None:
        self.num_models = num_models
        self.settings = settings
        self.squared = [0.0] * num_models
        self.coefficients: list[float] | None = None

    def update(self, pass_index: int, fisher_weights: Sequence[Tensor]) -> None:
        for i, fisher in enumerate(fisher_weights):
            self.squared[i] += fisher_norm_squared(fisher)

    def finish_pass(self, pass_index: int) -> None:
        self.coefficients = fisher_model_coefficients(
            self.num_models, global_norms=global_fisher_norms(self.squared), **self.settings
        )


def fisher_global_state(
    hyperparameters: Mapping[str, Any], num_models: int, total_numel: int
) -> FisherNormState | None:
    """The global-norm state for ``normalize_fisher_weight``; None without normalisation."""
    if not hyperparameters["normalize_fisher_weight"]:
        return None
    return FisherNormState(num_models, _coefficient_settings(hyperparameters))


def fisher_arguments(hyperparameters: Mapping[str, Any], *, name: str, num_models: int,
                     statistics: Sequence[Tensor] | None, global_state: FisherNormState | None) -> dict[str, Any]:
    """``fisher_merging``'s keyword arguments: this parameter's Fisher diagonals and the per-model coefficients."""
    if statistics is None:
        raise ValueError(f"fisher_merging needs a Fisher weight for {name!r} in every model, got none")
    coefficients = global_state.coefficients if global_state is not None else None
    if coefficients is None:
        coefficients = fisher_model_coefficients(num_models, **_coefficient_settings(hyperparameters))
    return {"fisher_weights": statistics, "model_coefficients": coefficients,
            "minimal_fisher_weight": hyperparameters["minimal_fisher_weight"]}
