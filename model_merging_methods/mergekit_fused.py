"""mergekit's generalized task arithmetic on the CPU in one compiled pass per element, for the common methods.

``mergekit_methods.generalized_task_arithmetic`` is written as mergekit writes it: one torch operation after the
other (subtract, mask, rescale, weight, elect signs, sum, normalise, add), each rounding to the compute dtype. In
bfloat16 on a CPU each of those ~20 operations is a pass over memory, about 45 ns per element for two models. This
module computes the same operations element by element in a Numba kernel: each step rounds to the compute dtype as
the torch operation does (float32 arithmetic on the exact values, then round-to-nearest-even to bfloat16), the sums
over models accumulate in float32 from +0 in model order, and the masks are the same ``random_keep_mask`` draws.
torch's CPU ``sum(dim=0)`` uses that order too, except on a vector tail (the last ``numel % 32`` elements with
AVX2) where it keeps four accumulators: with more than four models a float32 sum there can differ by an ulp (in
bfloat16 the rounding hides it). ``tests/test_mergekit_fused.py`` checks that both paths give the same bits
otherwise.

Covered (else ``fused_gta`` returns None and the torch path runs): CPU tensors in float32 or bfloat16; no
sparsification or ``random`` (DARE); consensus None or ``sum``; ``lambda_ == 1``. That is mergekit's
``task_arithmetic``, ``dare_linear`` and ``dare_ties``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from numba import types
from numba.extending import overload
from torch import Tensor

from model_merging_methods.dare import random_keep_mask
from model_merging_methods.dare_kernels import njit
from model_merging_methods.mergekit_sparsify import L1_RESCALE_EPS

_NONE, _MULTIPLY, _DIVIDE = 0, 1, 2
_FUSED_DTYPES = (torch.float32, torch.bfloat16)
#: elements per block: each step runs over a block of elements (vectorised) before the next step
BLOCK = 256


# bfloat16 tensors travel as their uint16 bits; the element type of an array picks the rounding at compile time


@njit(cache=True, inline="always")
def _round_bf16(x):
    """float32 ``x`` rounded to bfloat16 (round to nearest even; NaN becomes c10::BFloat16's 0x7FC0), branch-free."""
    bits = np.float32(x).view(np.uint32)
    rounded = np.uint32(np.uint32(bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1)))
                        & np.uint32(0xFFFF0000))
    nan = np.uint32(np.uint32(0) - np.uint32((bits & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)))
    return np.uint32(rounded ^ ((rounded ^ np.uint32(0x7FC00000)) & nan)).view(np.float32)


def _round(x, like):
    """``x`` rounded to the compute dtype of ``like`` (an array: uint16 = bfloat16 bits, float32)."""
    raise NotImplementedError


@overload(_round, inline="always")
def _round_overload(x, like):
    if like.dtype == types.uint16:
        return lambda x, like: _round_bf16(x)
    return lambda x, like: np.float32(x)


def _load(array, index):
    """float32 value of ``array[index]`` (uint16 = bfloat16 bits: exact)."""
    raise NotImplementedError


@overload(_load, inline="always")
def _load_overload(array, index):
    if array.dtype == types.uint16:
        return lambda array, index: np.uint32(np.uint32(array[index]) << np.uint32(16)).view(np.float32)
    return lambda array, index: np.float32(array[index])


def _store(array, index, value):
    """``array[index] = value`` (a value already rounded to the array's dtype)."""
    raise NotImplementedError


@overload(_store, inline="always")
def _store_overload(array, index, value):
    if array.dtype == types.uint16:
        def store_bits(array, index, value):
            array[index] = np.uint16(np.float32(value).view(np.uint32) >> np.uint32(16))
        return store_bits

    def store_value(array, index, value):
        array[index] = value
    return store_value


# The L1 passes may reassociate their float64 sums (``fastmath={"reassoc"}``), so the compiler vectorises them:
# the order of a float64 sum never shows once it is rounded to bfloat16 / float32. Nothing else is reassociated.


@njit(nogil=True, cache=True, fastmath={"reassoc"})
def l1_pass(base, model, keep):
    """``(sum |delta|, sum |delta * keep|)`` of one model in float64, ``delta`` rounded as the merge rounds it."""
    before = 0.0
    after = 0.0
    for j in range(base.size):
        d = abs(np.float64(_round(_load(model, j) - _load(base, j), base)))
        before += d
        after += d * np.float64(keep[j])
    return before, after


@njit(nogil=True, cache=True, fastmath={"reassoc"})
def abs_sums(delta, keep):
    """``(sum |delta|, sum |delta| * keep)`` in float64."""
    before = 0.0
    after = 0.0
    for j in range(delta.size):
        d = abs(np.float64(_load(delta, j)))
        before += d
        after += d * np.float64(keep[j])
    return before, after


def _bernoulli_keep(numel: int, density: float, dtype: torch.dtype, *, seed: int, model_index: int, name: str,
                    element_offset: int) -> np.ndarray:
    """``mergekit_sparsify.bernoulli``'s keep flags (uint8): all kept at density >= 1, none at a keep probability
    (``density`` rounded to ``dtype``) <= 0."""
    if density >= 1:
        return np.ones(numel, dtype=np.uint8)
    p = float(torch.tensor(density, dtype=dtype))
    if p <= 0:
        return np.zeros(numel, dtype=np.uint8)
    return random_keep_mask(numel, 1.0 - p, seed=seed, model_index=model_index, name=name,
                            element_offset=element_offset).numpy().view(np.uint8)


def random_l1_sums(delta: Tensor, density: float, *, seed: int, model_index: int, name: str,
                   element_offset: int = 0, base: Tensor | None = None) -> tuple[float, float] | None:
    """float64 ``(sum |delta|, sum |bernoulli(delta)|)`` of a row chunk for ``mergekit_methods.l1_norms``, with
    ``mergekit_sparsify.bernoulli``'s mask; None when not covered (another device or dtype).

    With ``base``, ``delta`` is the model's chunk and the delta ``model - base`` is formed inside the pass, rounded
    to the dtype as the torch subtraction rounds it.
    """
    if delta.device.type != "cpu" or delta.dtype not in _FUSED_DTYPES:
        return None
    if base is not None and base.dtype != delta.dtype:
        return None
    values = _array(delta.contiguous())
    keep = _bernoulli_keep(values.size, density, delta.dtype, seed=seed, model_index=model_index, name=name,
                           element_offset=element_offset)
    if base is not None:
        return l1_pass(_array(base.contiguous()), values, keep)
    return abs_sums(values, keep)


@njit(nogil=True, cache=True, error_model="numpy")
def gta_kernel(base, models, keep, kinds, factors, weights, consensus, normalize, divisor, out):
    """``out`` = mergekit's generalized task arithmetic (see the module docstring), block by block.

    ``base``, ``models`` (count x n) and ``out`` hold the compute dtype (uint16 bits for bfloat16); ``keep``
    (count x n) is 1 for a kept element (all 1 for a model that is not sparsified); ``kinds`` / ``factors``: the
    rescale per model (multiply by the factor, 1.0 for none, or divide by it); ``weights`` in the compute dtype.
    Every step is a loop over a block through 1-D slices, which the compiler vectorises.
    """
    count = models.shape[0]
    n = base.size
    weighted = np.empty((count, BLOCK), np.float32)
    values = np.empty(BLOCK, np.float32)
    elected = np.empty(BLOCK, np.float32)
    mixed = np.empty(BLOCK, np.float32)
    div = np.empty(BLOCK, np.float32)
    zero = np.float32(0.0)
    for start in range(0, n, BLOCK):
        size = min(BLOCK, n - start)
        block = base[start:start + size]
        for t in range(size):
            values[t] = _load(block, t)
        for i in range(count):
            row = models[i, start:start + size]
            mask = keep[i, start:start + size]
            result = weighted[i]
            factor = factors[i]
            weight = weights[i]
            # delta, masked by a product with 1.0 or 0.0 (a signed zero, as torch's), rescaled, weighted
            if kinds[i] == _DIVIDE:
                for t in range(size):
                    d = _round(_load(row, t) - values[t], out)
                    d = _round(d * np.float32(mask[t]), out)
                    result[t] = _round(_round(d / factor, out) * weight, out)
            else:  # multiplying by 1.0 (no rescale) leaves every value as it is
                for t in range(size):
                    d = _round(_load(row, t) - values[t], out)
                    d = _round(d * np.float32(mask[t]), out)
                    result[t] = _round(_round(d * factor, out) * weight, out)
        for t in range(size):
            mixed[t] = zero
        if consensus:
            for t in range(size):
                elected[t] = zero
                div[t] = zero
            for i in range(count):
                result = weighted[i]
                for t in range(size):
                    elected[t] = elected[t] + result[t]
            for t in range(size):  # the elected sign is +1 where the rounded sum is >= 0
                elected[t] = np.float32(_round(elected[t], out) >= zero)
            for i in range(count):
                result = weighted[i]
                weight = weights[i]
                for t in range(size):
                    w = result[t]
                    # sign(w) equals the elected sign: w > 0 when it is +1, w < 0 when -1 (zeros, NaN never agree)
                    flag = np.float32(((w > zero) == (elected[t] != zero)) & (w != zero) & (w == w))
                    mixed[t] = mixed[t] + _round(w * flag, out)
                    div[t] = div[t] + _round(weight * flag, out)
            for t in range(size):
                dv = _round(div[t], out)
                div[t] = np.float32(1.0) if dv == zero else dv
        else:
            for i in range(count):
                result = weighted[i]
                for t in range(size):
                    mixed[t] = mixed[t] + result[t]
            for t in range(size):
                div[t] = divisor
        target = out[start:start + size]
        for t in range(size):
            m = _round(mixed[t], out)
            if normalize:
                m = _round(m / div[t], out)
            _store(target, t, _round(values[t] + m, out))
    return 0


def _array(tensor: Tensor) -> np.ndarray:
    """A flat NumPy view of a float32 tensor, or of a bfloat16 tensor's bits as uint16."""
    flat = tensor.reshape(-1)
    if flat.dtype == torch.bfloat16:
        return flat.view(torch.int16).numpy().view(np.uint16)
    return flat.numpy()


def fused_gta(base: Tensor, models: Sequence[Tensor], *, weights: Sequence[float], densities: Sequence[float],
              sparsification: str | None, consensus: str | None, normalize: bool, rescale: str, lambda_: float,
              seed: int | None, model_indices: Sequence[int], name: str | None, element_offset: int,
              l1_norms: Sequence[tuple[Tensor, Tensor]] | None) -> Tensor | None:
    """``generalized_task_arithmetic`` of tensors already in the compute dtype, or None when not covered.

    Same arguments as ``mergekit_methods.generalized_task_arithmetic`` after its checks (``rescale`` by name).
    The L1 norms of a whole tensor are float64 sums rounded once to the compute dtype (as ``l1_norms`` does for
    row chunks and ``mergekit_sparsify.rescale_masked`` for whole tensors).
    """
    dtype = base.dtype
    if (dtype not in _FUSED_DTYPES or base.device.type != "cpu" or sparsification not in (None, "random")
            or consensus not in (None, "sum") or lambda_ != 1 or not models):
        return None
    if sparsification == "random" and (seed is None or name is None):
        raise ValueError("the random sparsification needs seed, model_index and name for its mask")
    count, numel = len(models), base.numel()
    base_values = _array(base.contiguous())
    model_values = np.empty((count, numel), dtype=base_values.dtype)
    for i, model in enumerate(models):
        model_values[i] = _array(model.contiguous())
    keep = np.ones((count, numel), dtype=np.uint8)
    kinds = np.zeros(count, dtype=np.int64)
    factors = np.ones(count, dtype=np.float32)
    for i in range(count):
        if sparsification is None or densities[i] >= 1:
            continue
        p = float(torch.tensor(densities[i], dtype=dtype))  # rounded to the work dtype, as mergekit's
        keep[i] = _bernoulli_keep(numel, densities[i], dtype, seed=seed, model_index=model_indices[i], name=name,
                                  element_offset=element_offset)
        if p <= 0:
            continue
        if rescale == "inverse_keep":
            kinds[i], factors[i] = _DIVIDE, p
        elif rescale == "l1":
            if l1_norms is not None:
                before, after = l1_norms[i]
            else:
                sums = l1_pass(base_values, model_values[i], keep[i])
                before, after = (torch.tensor(s, dtype=torch.float64).to(dtype) for s in sums)
            if not (before < L1_RESCALE_EPS or after < L1_RESCALE_EPS):
                kinds[i], factors[i] = _MULTIPLY, float(before / after)
    weight_tensor = torch.tensor(list(weights), dtype=dtype)
    divisor = weight_tensor.sum(dim=0)
    if divisor.abs() < 1e-8:
        divisor = torch.ones((), dtype=dtype)
    out = np.empty(numel, dtype=base_values.dtype)
    gta_kernel(base_values, model_values, keep, kinds, factors, weight_tensor.to(torch.float32).numpy(),
               consensus == "sum", normalize, np.float32(float(divisor)), out)
    result = torch.from_numpy(out.view(np.int16)).view(torch.bfloat16) if dtype == torch.bfloat16 else \
        torch.from_numpy(out)
    return result.reshape(base.shape)
