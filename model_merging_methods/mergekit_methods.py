"""mergekit 0.1.5's merge methods as pure functions on one tensor (the maths behind ``--config merge.yml``).

Each function merges one parameter, given the tensors of every input model in config order, and computes as
mergekit 0.1.5 does so that outputs can equal mergekit's bit for bit (same torch version and device) or within
one ulp. No I/O, no YAML: parameter resolution (gradients, filters, precedence) is the caller's.

Compute dtype (``compute_dtype``): mergekit casts every input to the config's ``dtype`` on load, or, without one,
to the promotion of the inputs' dtypes; the group methods (the task-arithmetic family, ``nuslerp``,
``model_stock``, ``passthrough``) compute in it, the batched kernels ``linear`` and ``slerp`` in float32 (float64
for float64 inputs). Every function returns the compute dtype; the cast to ``out_dtype`` happens at save time and
is the caller's.

The generalized task arithmetic family (``GTA_METHODS``, ``generalized_task_arithmetic``) mirrors
``merge_methods/generalized_task_arithmetic.py`` and ``registry.py``; the sparsifiers live in
``mergekit_sparsify`` (re-exported here). Random masks are this project's keyed masks, not mergekit's
``torch.bernoulli`` stream (see ``mergekit_sparsify``).
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Literal

import torch
from torch import Tensor

from model_merging_methods.mergekit_fused import fused_gta, random_l1_sums
from model_merging_methods.mergekit_sparsify import (
    RESCALES,
    Rescale,
    Sparsification,
    bernoulli,
    della_keep_probabilities,
    della_magprune,
    keyed_uniforms,
    magnitude,
    magnitude_outliers,
    rescale_masked,
    sparsify,
)

__all__ = [
    "GTA_METHODS", "GtaMethod", "Rescale", "Sparsification", "bernoulli", "compute_dtype", "consensus_mask",
    "della_keep_probabilities", "della_magprune", "generalized_task_arithmetic", "gta_merge", "keyed_uniforms",
    "linear", "magnitude", "magnitude_outliers", "model_stock", "nuslerp", "passthrough", "rescale_masked", "slerp",
    "sparsify",
]

Consensus = Literal["sum", "count"]
#: ``linear``/``slerp`` process weights in slices of this many elements (mergekit's ``_CHUNK_ELEMENTS``).
CHUNK_ELEMENTS = 1024 * 1024


@dataclass(frozen=True)
class GtaMethod:
    """One ``GeneralizedTaskArithmeticMerge`` of mergekit 0.1.5's registry.

    Shared parameters: ``int8_mask`` (False; no numerical effect), ``normalize`` (``default_normalize``),
    ``rescale`` (``default_rescale``; True means L1-norm matching), ``lambda`` (1.0). Per model (non-base):
    ``weight`` (required) and ``per_model_defaults``.
    """

    sparsification: Sparsification | None
    consensus: Consensus | None
    default_normalize: bool
    default_rescale: bool
    per_model_defaults: Mapping[str, float]
    pretty_name: str
    reference_url: str

    @property
    def shared_defaults(self) -> Mapping[str, bool | float]:
        return MappingProxyType({"int8_mask": False, "normalize": self.default_normalize,
                                 "rescale": self.default_rescale, "lambda": 1.0})


def _gta(sparsification: Sparsification | None, consensus: Consensus | None, normalize: bool, rescale: bool,
         extra: Mapping[str, float], pretty_name: str, url: str) -> GtaMethod:
    return GtaMethod(sparsification, consensus, normalize, rescale, MappingProxyType({"density": 1.0, **extra}),
                     pretty_name, url)


_ARXIV = "https://arxiv.org/abs/"
_TA, _TIES, _DARE = _ARXIV + "2212.04089", _ARXIV + "2306.01708", _ARXIV + "2311.03099"
_BREADCRUMBS, _DELLA = _ARXIV + "2312.06795", _ARXIV + "2406.11617"
#: mergekit 0.1.5 ``registry.py``: method -> (sparsifier, consensus, default normalize, default rescale, ...).
GTA_METHODS: Mapping[str, GtaMethod] = MappingProxyType({
    "task_arithmetic": _gta(None, None, False, False, {}, "Task Arithmetic", _TA),
    "ties": _gta("magnitude", "sum", True, False, {}, "TIES", _TIES),
    "dare_ties": _gta("random", "sum", False, True, {}, "DARE TIES", _DARE),
    "dare_linear": _gta("random", None, False, True, {}, "Linear DARE", _DARE),
    "breadcrumbs": _gta("magnitude_outliers", None, False, False, {"gamma": 0.01}, "Model Breadcrumbs", _BREADCRUMBS),
    "breadcrumbs_ties": _gta("magnitude_outliers", "sum", False, False, {"gamma": 0.01},
                             "Model Breadcrumbs with TIES", _BREADCRUMBS),
    "della": _gta("della_magprune", "sum", True, True, {"epsilon": 0.15}, "DELLA", _DELLA),
    "della_linear": _gta("della_magprune", None, False, True, {"epsilon": 0.15}, "Linear DELLA", _DELLA),
})


def compute_dtype(tensors: Sequence[Tensor], dtype: torch.dtype | None = None) -> torch.dtype:
    """The dtype mergekit computes in: the config's ``dtype``, else the promotion of the inputs' dtypes."""
    result = dtype if dtype is not None else functools.reduce(torch.promote_types, (t.dtype for t in tensors))
    if not result.is_floating_point:
        raise TypeError(f"merging needs a floating-point dtype, got {result}")
    return result


def _aligned(tensors: Sequence[Tensor], dtype: torch.dtype | None) -> list[Tensor]:
    if not tensors:
        raise ValueError("no input tensors")
    target = compute_dtype(tensors, dtype)
    if any(t.shape != tensors[0].shape for t in tensors):
        raise ValueError(f"tensor shapes differ: {[tuple(t.shape) for t in tensors]}")
    return [t.to(target) for t in tensors]


def _rescale_name(rescale: bool | Rescale) -> Rescale:
    """mergekit's boolean ``rescale`` (True = L1-norm matching) or one of ``RESCALES`` by name."""
    if isinstance(rescale, bool):
        return "l1" if rescale else "none"
    if rescale not in RESCALES:
        raise ValueError(f"unknown rescale {rescale!r}; choose true, false or one of {', '.join(RESCALES)}")
    return rescale


def consensus_mask(weighted_deltas: Tensor, method: Consensus = "sum") -> Tensor:
    """mergekit's ``get_mask``: True where ``sign(D_i)`` equals the elected sign, for ``D`` stacked on dim 0.

    ``"sum"`` (TIES): elected = +1 where ``sum_i D_i >= 0`` (a zero sum elects +), else -1. ``"count"``: the
    same on ``sum_i sign(D_i)`` (in mergekit's code, used by no registered method). Zeros never agree, and a
    negative weight flips its model's vote because ``D_i = w_i * delta_i``.
    """
    sign = weighted_deltas.sign()
    if method == "sum":
        majority_sign = (weighted_deltas.sum(dim=0) >= 0).to(sign.dtype) * 2 - 1
    elif method == "count":
        majority_sign = (sign.sum(dim=0) >= 0).to(sign.dtype) * 2 - 1
    else:
        raise ValueError(f"unknown consensus {method!r}; choose 'sum', 'count' or None")
    return sign == majority_sign


def generalized_task_arithmetic(
    base: Tensor,
    models: Sequence[Tensor],
    *,
    weights: Sequence[float],
    densities: Sequence[float] | None = None,
    sparsification: Sparsification | None = None,
    consensus: Consensus | None = None,
    normalize: bool = False,
    rescale: bool | Rescale = False,
    lambda_: float = 1.0,
    dtype: torch.dtype | None = None,
    gammas: Sequence[float | None] | None = None,
    epsilons: Sequence[float | None] | None = None,
    seed: int | None = None,
    model_indices: Sequence[int] | None = None,
    name: str | None = None,
    element_offset: int = 0,
    l1_norms: Sequence[tuple[Tensor, Tensor]] | None = None,
    keep_masks: Sequence[Tensor] | None = None,
) -> Tensor:
    """mergekit 0.1.5's ``GeneralizedTaskArithmeticMerge.merge_group`` on one parameter.

    In the compute dtype ``c``: ``delta_i = c(x_i) - c(base)``; ``delta_i`` sparsified (``sparsify`` with its
    density, gamma, epsilon and rescale); ``D_i = w_i * delta_i`` with the weights a tensor in ``c`` (bfloat16:
    0.3 -> 0.30078125). With consensus: ``m_i = consensus_mask(D)_i``, ``mixed = sum_i m_i D_i`` and ``divisor =
    sum_i m_i w_i`` with 0 replaced by 1; without: ``mixed = sum_i D_i``, ``divisor = sum_i w_i`` with
    ``|divisor| < 1e-8`` replaced by 1. Then ``mixed /= divisor`` if ``normalize``, then ``mixed *= lambda_`` if
    ``lambda_ != 1`` (that order), and the result is ``base + mixed`` in ``c``. No models: ``c(base)``.

    Args:
        base: the base model's parameter (mergekit requires a base for these methods).
        models: the same parameter of each non-base model, in config order.
        weights: ``weight`` per model (required by mergekit).
        densities: ``density`` per model (default 1.0 each: no sparsification).
        sparsification: ``"magnitude"``, ``"magnitude_outliers"``, ``"random"``, ``"della_magprune"`` or None.
        consensus: ``"sum"``, ``"count"`` or None.
        normalize: divide by the (masked) weight sum.
        rescale: True/``"l1"`` (mergekit), ``"inverse_keep"`` (the papers' 1/p), False/``"none"``.
        lambda_: mergekit's ``lambda``.
        dtype: the config's ``dtype``; None promotes the inputs' dtypes.
        gammas: per-model ``gamma`` of ``magnitude_outliers``; None (or a None entry) is mergekit's parameter
            default 0.01.
        epsilons: per-model ``epsilon`` of ``della_magprune``; None (or a None entry) is 0.15.
        seed, model_indices, name: key the random masks (``random``, ``della_magprune``); ``model_indices``
            defaults to the position in ``models``.
        element_offset, l1_norms: for a chunk of whole rows of the parameter (``random`` and ``della_magprune``
            only): its first element's flat position, and each model's L1 norms of the whole parameter
            (``l1_norms``) when ``rescale`` is ``"l1"``.
        keep_masks: for a chunk of the magnitude methods: each model's part of its whole-tensor keep mask
            (``chunk_keep_mask``).
    """
    base, *models = _aligned([base, *models], dtype)
    if not models:
        return base
    count = len(models)
    densities = [1.0] * count if densities is None else list(densities)
    gammas = [0.01 if g is None else g for g in (gammas or [None] * count)]
    epsilons = [0.15 if e is None else e for e in (epsilons or [None] * count)]
    model_indices = list(range(count)) if model_indices is None else list(model_indices)
    for label, values in (("weights", weights), ("densities", densities), ("gammas", gammas),
                          ("epsilons", epsilons), ("model_indices", model_indices)):
        if len(values) != count:
            raise ValueError(f"{label} has {len(values)} values for {count} models")
    rescale_name = _rescale_name(rescale)
    if keep_masks is None:  # task_arithmetic / dare_linear / dare_ties on the CPU: one compiled pass, same bits
        fused = fused_gta(base, models, weights=weights, densities=densities, sparsification=sparsification,
                          consensus=consensus, normalize=normalize, rescale=rescale_name, lambda_=lambda_, seed=seed,
                          model_indices=model_indices, name=name, element_offset=element_offset, l1_norms=l1_norms)
        if fused is not None:
            return fused

    deltas = base.new_empty((count, *base.shape))
    for index, model in enumerate(models):
        delta = model - base
        if sparsification is not None:
            delta = sparsify(delta, densities[index], sparsification, gamma=gammas[index], epsilon=epsilons[index],
                             rescale=rescale_name, seed=seed, model_index=model_indices[index], name=name,
                             element_offset=element_offset, norms=l1_norms[index] if l1_norms else None,
                             keep=keep_masks[index] if keep_masks else None)
        deltas[index] = delta

    weight_tensor = torch.tensor(list(weights), dtype=deltas.dtype, device=deltas.device)
    while deltas.dim() > weight_tensor.dim():
        weight_tensor.unsqueeze_(-1)
    deltas.mul_(weight_tensor)

    if consensus is not None:
        mask = consensus_mask(deltas, consensus)
        mixed_delta = (deltas * mask).sum(dim=0)
        divisor = (weight_tensor * mask).sum(dim=0)
        divisor[divisor == 0] = 1
    else:
        mixed_delta = deltas.sum(dim=0)
        divisor = weight_tensor.sum(dim=0)
        divisor[divisor.abs() < 1e-8] = 1

    if normalize:
        mixed_delta /= divisor
    if lambda_ != 1:
        mixed_delta *= lambda_
    return (base + mixed_delta).to(base.dtype)


def l1_norms(
    chunks: Iterable[tuple[Tensor, int]], density: float, sparsification: Sparsification, *, epsilon: float = 0.0,
    seed: int, model_index: int, name: str,
) -> tuple[Tensor, Tensor]:
    """``(||delta||_1, ||masked delta||_1)`` of a whole parameter from its chunks of whole rows, for ``"l1"``.

    ``chunks`` yields ``(delta chunk in the compute dtype, its first element's flat position)``. mergekit sums the
    whole tensor in the sparsifier's work dtype; here each chunk's sum is taken in float64 and the total rounded
    once to that dtype, so the norms (and the rescale) can differ from mergekit's in the last bit (in bfloat16
    they almost never do: torch sums bfloat16 in float32 and rounds once too).
    """
    if sparsification not in ("random", "della_magprune"):
        raise ValueError(f"{sparsification} ranks the whole tensor: its norms are not taken from chunks")
    before = after = 0.0
    work = None
    for delta, offset in chunks:
        work = torch.float32 if delta.device.type == "cpu" and delta.dtype != torch.bfloat16 else delta.dtype
        sums = random_l1_sums(delta, density, seed=seed, model_index=model_index, name=name,
                              element_offset=offset) if sparsification == "random" else None
        if sums is None:
            masked = sparsify(delta, density, sparsification, epsilon=epsilon, rescale="none", seed=seed,
                              model_index=model_index, name=name, element_offset=offset)
            sums = (delta.to(work).abs().sum(dtype=torch.float64).item(),
                    masked.to(work).abs().sum(dtype=torch.float64).item())
        before += sums[0]
        after += sums[1]
    return torch.tensor(before, dtype=work), torch.tensor(after, dtype=work)


def gta_merge(
    method: str,
    base: Tensor,
    models: Sequence[Tensor],
    *,
    weights: Sequence[float],
    normalize: bool | None = None,
    rescale: bool | Rescale | None = None,
    lambda_: float = 1.0,
    **options: Any,
) -> Tensor:
    """``generalized_task_arithmetic`` with ``method``'s row of ``GTA_METHODS`` (None = the method's default).

    ``options`` are ``generalized_task_arithmetic``'s other keywords; ``gammas``/``epsilons`` with values only for
    the methods that have them (mergekit rejects unknown parameters; lists of None are accepted).
    """
    if method not in GTA_METHODS:
        raise ValueError(f"unknown task-arithmetic method {method!r}; choose one of {', '.join(GTA_METHODS)}")
    spec = GTA_METHODS[method]
    for option, parameter in (("gammas", "gamma"), ("epsilons", "epsilon")):
        if any(v is not None for v in options.get(option) or ()) and parameter not in spec.per_model_defaults:
            raise ValueError(f"{method} has no parameter {parameter!r}")
    return generalized_task_arithmetic(
        base, models, weights=weights, sparsification=spec.sparsification, consensus=spec.consensus,
        normalize=spec.default_normalize if normalize is None else normalize,
        rescale=spec.default_rescale if rescale is None else rescale, lambda_=lambda_, **options,
    )


def linear(
    tensors: Sequence[Tensor], weights: Sequence[float], *, normalize: bool = True, dtype: torch.dtype | None = None
) -> Tensor:
    """mergekit's ``linear``: ``sum_i w_i x_i``, divided by ``sum_i w_i`` if ``normalize`` (no zero guard: a zero
    weight sum gives inf/NaN, as in 0.1.5).

    Accumulated left to right with ``addcmul_`` in float32 (float64 for float64 inputs) whatever the compute
    dtype, as 0.1.5's batch kernel, then cast to the compute dtype.
    """
    tensors = _aligned(tensors, dtype)
    if len(weights) != len(tensors):
        raise ValueError(f"{len(weights)} weights for {len(tensors)} tensors")
    # the kernel's layout: a leading output-batch axis of 1, coefficients shaped (1, 1, ...)
    first = tensors[0].unsqueeze(0)
    work_dtype = torch.float64 if first.dtype == torch.float64 else torch.float32
    weight = torch.tensor([list(weights)], dtype=work_dtype, device=first.device)
    coefficient_shape = (1,) + (1,) * (first.ndim - 1)
    result = torch.zeros_like(first, dtype=work_dtype)
    for tensor, coefficient in zip(tensors, weight.unbind(1), strict=True):
        result.addcmul_(tensor.unsqueeze(0), coefficient.reshape(coefficient_shape))
    if normalize:
        result.div_(weight.sum(dim=1).reshape(coefficient_shape))
    return result.to(first.dtype).reshape(tensors[0].shape)


def slerp(
    t: float,
    a: Tensor,
    b: Tensor,
    *,
    dtype: torch.dtype | None = None,
    dot_threshold: float = 0.9995,
    eps: float = 1e-8,
) -> Tensor:
    """mergekit's ``slerp`` of the whole tensor as one vector: ``a`` (the base, t = 0) towards ``b`` (t = 1).

    In float32 (float64 inputs: float64): ``cos = <a/|a|, b/|b|>`` clamped to [-1, 1] (a norm ``<= eps`` counts
    as 1); if ``|cos| > dot_threshold`` (colinear or antipodal) ``(1 - t) a + t b``, else
    ``sin((1 - t) theta) / sin(theta) * a + sin(t theta) / sin(theta) * b`` with ``theta = acos(cos)``. The
    magnitudes are interpolated too (the inputs are not normalised). Norms and the dot product are accumulated
    over slices of ``CHUNK_ELEMENTS`` as 0.1.5 does; the result is cast to the compute dtype.
    """
    a, b = _aligned([a, b], dtype)
    if not a.is_floating_point():
        raise TypeError("SLERP requires floating-point tensors")
    out_shape = a.shape
    work_dtype = torch.float64 if a.dtype == torch.float64 else torch.float32
    a, b = a.reshape(1, -1), b.reshape(1, -1)
    t_tensor = torch.tensor([t], dtype=work_dtype, device=a.device).reshape(-1, 1)
    if not a.shape[1]:
        return ((1 - t_tensor) * a + t_tensor * b).reshape(out_shape).to(a.dtype)
    starts = range(0, a.shape[1], CHUNK_ELEMENTS)

    def chunk(x: Tensor, start: int) -> Tensor:
        return x[:, start : start + CHUNK_ELEMENTS].to(work_dtype)

    # the norm of the per-slice norms, then the dot product of the normalised slices (mergekit's order)
    norm_a = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(chunk(a, s), dim=1, keepdim=True)
                                                   for s in starts]), dim=0)
    norm_b = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(chunk(b, s), dim=1, keepdim=True)
                                                   for s in starts]), dim=0)
    norm_a = torch.where(norm_a > eps, norm_a, 1)
    norm_b = torch.where(norm_b > eps, norm_b, 1)
    dot_parts = [((chunk(a, s) / norm_a) * (chunk(b, s) / norm_b)).sum(dim=1, keepdim=True) for s in starts]
    dot = torch.stack(dot_parts).sum(dim=0).clamp(-1, 1)
    is_linear = dot.abs() > dot_threshold
    theta = torch.acos(torch.where(is_linear, 0, dot))  # finite on the unselected branch too
    sin_theta = torch.sin(theta)
    coef_a = torch.where(is_linear, 1 - t_tensor, torch.sin((1 - t_tensor) * theta) / sin_theta)
    coef_b = torch.where(is_linear, t_tensor, torch.sin(t_tensor * theta) / sin_theta)
    result = torch.empty_like(a)
    for s in starts:
        result[:, s : s + CHUNK_ELEMENTS] = coef_a * chunk(a, s) + coef_b * chunk(b, s)
    return result.reshape(out_shape)


def _nuslerp_vectors(t: float, v0: Tensor, v1: Tensor, dim: int, flatten: bool, eps: float = 1e-8) -> Tensor:
    """0.1.5's ``nuslerp``: slerp of unit-direction rows (norm clamped at 1e-7), colinear when
    ``1 - cos^2 <= eps^2``, along the last dim after moving ``dim`` there (or of the flattened tensor)."""
    out_shape = v0.shape
    if flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif dim != -1:
        v0, v1 = v0.transpose(dim, -1), v1.transpose(dim, -1)
    v0_u = v0 / torch.norm(v0, dim=-1, keepdim=True).clamp(min=1e-7)
    v1_u = v1 / torch.norm(v1, dim=-1, keepdim=True).clamp(min=1e-7)
    cos_theta = torch.sum(v0_u * v1_u, dim=-1, keepdim=True).clamp(-1, 1)
    colinear = (1 - cos_theta.square()) <= eps**2
    theta = torch.acos(torch.where(colinear, 0, cos_theta))
    sin_theta = torch.sin(theta)
    result = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / sin_theta
    result = torch.where(colinear, (1 - t) * v0 + t * v1, result)
    if dim != -1 and not flatten:
        result = result.transpose(dim, -1)
    return result.reshape(out_shape)


def nuslerp(
    a: Tensor,
    b: Tensor,
    *,
    weights: Sequence[float],
    base: Tensor | None = None,
    nuslerp_row_wise: bool = False,
    nuslerp_flatten: bool = True,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """mergekit's ``nuslerp`` of two models, in the compute dtype.

    ``t = w_b / (w_a + w_b)`` (0.5 when ``|w_a + w_b| < 1e-6``). With ``base``: ``base + slerp(t, a - base,
    b - base)`` (task vectors), else ``slerp(t, a, b)``. ``nuslerp_flatten`` (default True): the tensor is one
    vector; otherwise each vector along the last dim (``nuslerp_row_wise``: along dim 0) is interpolated
    separately. Unlike ``slerp``, the angle uses unit vectors but the result combines the raw inputs.
    """
    if len(weights) != 2:
        raise ValueError(f"nuslerp merges exactly 2 models, got {len(weights)} weights")
    aligned = _aligned([a, b] if base is None else [a, b, base], dtype)
    total = sum(weights)
    t = 0.5 if abs(total) < 1e-6 else weights[1] / total
    dim = 0 if nuslerp_row_wise else -1
    if base is None:
        return _nuslerp_vectors(t, aligned[0], aligned[1], dim, nuslerp_flatten)
    a, b, base = aligned
    return base + _nuslerp_vectors(t, a - base, b - base, dim, nuslerp_flatten)


def model_stock(
    base: Tensor, models: Sequence[Tensor], *, filter_wise: bool = False, dtype: torch.dtype | None = None
) -> Tensor:
    """Model Stock (Jang et al., arXiv:2403.19522) as mergekit 0.1.5 computes it, in the compute dtype.

    ``cos`` = the mean over model pairs of the cosine between their offsets ``x_i - base`` (each clamped to
    [-1, 1], norm product clamped at 1e-6); ``t = N cos / (1 + (N - 1) cos)``, or 0 where ``|1 + (N - 1) cos| <
    1e-6``; result ``t * mean_i x_i + (1 - t) * base``. ``filter_wise``: one ``t`` per vector along the last dim
    (a 1-D tensor is one vector) instead of one for the flattened tensor. Needs at least 2 models.
    """
    if len(models) < 2:
        raise ValueError(f"model_stock needs a base and at least 2 models, got {len(models)}")
    w_0, *ws = _aligned([base, *models], dtype)
    out_shape = w_0.shape
    if filter_wise:
        if w_0.dim() == 1:
            w_0, ws = w_0.unsqueeze(0), [w.unsqueeze(0) for w in ws]
    else:
        w_0, ws = w_0.reshape(-1), [w.reshape(-1) for w in ws]
    offsets = [w - w_0 for w in ws]
    cos_thetas = []
    for index, offset_a in enumerate(offsets):
        for offset_b in offsets[index + 1 :]:
            norm_product = torch.norm(offset_a, dim=-1) * torch.norm(offset_b, dim=-1)
            cos_thetas.append(((offset_a * offset_b).sum(dim=-1) / norm_product.clamp(min=1e-6)).clamp(-1, 1))
    cos_theta = torch.stack(cos_thetas).mean(dim=0).unsqueeze(-1)
    count = len(ws)
    denominator = 1 + (count - 1) * cos_theta
    singular = denominator.abs() < 1e-6
    safe_denominator = torch.where(singular, torch.ones_like(denominator), denominator)
    t = torch.where(singular, torch.zeros_like(cos_theta), (count * cos_theta) / safe_denominator)
    average = sum(ws) / count
    return (t * average + (1 - t) * w_0).reshape(out_shape)


def passthrough(tensor: Tensor, scale: float | None = None, *, dtype: torch.dtype | None = None) -> Tensor:
    """mergekit's ``passthrough``: the single input in the compute dtype, times its ``scale`` when one is set."""
    (tensor,) = _aligned([tensor], dtype)
    return tensor if scale is None else tensor * scale
