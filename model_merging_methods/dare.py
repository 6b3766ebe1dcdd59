"""DARE (Drop And REscale) and its variants, as pre-processors of one delta tensor.

Yu et al., "Language Models are Super Mario" (arXiv:2311.03099): every delta parameter is dropped with
probability ``p`` and the survivors are rescaled by ``1 / (1 - p)``. Variants (MergeLM flags):

* ``use_weight_rescale=False``: "DropOnly" (drop without rescale);
* ``mask_strategy="magnitude"``: magnitude pruning, per tensor drop every ``|x| <= k``-th smallest ``|x|``
  with ``k = int(numel * p)`` (MergeLM drops ties too);
* ``weight_format="finetuned_weight"``: mask the fine-tuned weights themselves instead of the deltas.

Reproducible randomness by construction
---------------------------------------
The random mask of a tensor is a pure function of ``(seed, model_index, parameter name)`` and the element
position: elements are grouped in blocks of 2**20, block ``b`` draws 32-bit integers from a NumPy PCG64
stream seeded by ``SeedSequence([seed, model_index, blake2b64(name), b, stream])``, and element ``j`` is dropped when
a uniform 32-bit integer drawn for it is below ``round(p * 2**32)`` (drop probability exact to 2**-33;
see ``_block_keep_flags`` for how the integer is drawn a byte first). Masks therefore do not depend on
the order tensors are visited, on thread counts, on the device, on which other tensors exist, or on
whether a tensor is processed whole or in row chunks (``element_offset``). They differ from MergeLM's
masks, which come from one global ``torch.bernoulli`` stream and change with any of those.
"""

from __future__ import annotations

import hashlib
from typing import Literal

import numpy as np
import torch
from torch import Tensor

MaskStrategy = Literal["random", "magnitude"]
WeightFormat = Literal["delta_weight", "finetuned_weight"]

MASK_BLOCK_SIZE = 1 << 20
CACHE_SLICE = 1 << 18  # elements per step of the fused DARE loop (1 MiB of float32)
_TWO_POW_32 = 1 << 32


def name_hash(name: str) -> int:
    """Stable 64-bit hash of a parameter name (independent of Python's per-process hash seed)."""
    return int.from_bytes(hashlib.blake2b(name.encode("utf-8"), digest_size=8).digest(), "little")


def drop_threshold(drop_rate: float) -> int:
    """The 32-bit threshold below which an element is dropped: ``round(p * 2**32)``, capped at 2**32 - 1."""
    return min(round(drop_rate * _TWO_POW_32), _TWO_POW_32 - 1)


def _block_bit_generator(seed: int, model_index: int, name_key: int, block: int, stream: int) -> np.random.PCG64:
    return np.random.PCG64(np.random.SeedSequence([seed, model_index, name_key, block, stream]))


def _block_keep_flags(seed: int, model_index: int, name_key: int, block: int, count: int, threshold: int):
    """Keep flags of the first ``count`` elements of a block: ``u32 >= threshold`` for uniform 32-bit ``u32``.

    Bytes are four times cheaper to draw than 32-bit integers, so ``u32``'s top byte is drawn first (stream 0)
    and decides 255 of 256 elements; only where it equals the threshold's top byte are the low 24 bits drawn
    (stream 1, in element order). The result is exactly ``P(drop) = threshold / 2**32`` and each element's flag
    does not depend on ``count``.

    The bytes of stream 0 are the generator's raw 64-bit outputs read little-endian, which is exactly what
    ``Generator.integers(0, 256, dtype=np.uint8)`` returns (tested), three times faster.
    """
    raw = _block_bit_generator(seed, model_index, name_key, block, 0).random_raw((count + 7) // 8)
    top = raw.astype("<u8", copy=False).view(np.uint8)[:count]
    threshold_top = np.uint8(threshold >> 24)
    keep = top > threshold_top
    undecided = np.flatnonzero(top == threshold_top)
    if undecided.size:
        low = np.random.Generator(_block_bit_generator(seed, model_index, name_key, block, 1)).integers(
            0, 1 << 24, size=undecided.size, dtype=np.uint32
        )
        keep[undecided] = low >= (threshold & 0xFFFFFF)
    return keep


def _keep_flag_blocks(numel: int, drop_rate: float, seed: int, model_index: int, name: str, element_offset: int):
    """Yield ``(lo, hi, keep flags)`` for consecutive slices of ``[0, numel)`` (one per 2**20-element block)."""
    threshold = drop_threshold(drop_rate)
    name_key = name_hash(name)
    start, stop = element_offset, element_offset + numel
    for block in range(start // MASK_BLOCK_SIZE, (stop - 1) // MASK_BLOCK_SIZE + 1):
        block_start = block * MASK_BLOCK_SIZE
        lo, hi = max(start, block_start), min(stop, block_start + MASK_BLOCK_SIZE)
        flags = _block_keep_flags(seed, model_index, name_key, block, hi - block_start, threshold)
        yield lo - start, hi - start, flags[lo - block_start :]


def _random_keep_flags(numel: int, drop_rate: float, seed: int, model_index: int, name: str, element_offset: int):
    keep = np.ones(numel, dtype=bool)
    if drop_threshold(drop_rate) == 0 or numel == 0:
        return keep
    for lo, hi, flags in _keep_flag_blocks(numel, drop_rate, seed, model_index, name, element_offset):
        keep[lo:hi] = flags
    return keep


def random_keep_mask(
    numel: int, drop_rate: float, *, seed: int, model_index: int, name: str, element_offset: int = 0
) -> Tensor:
    """Boolean keep-mask (True = keep) for elements ``[element_offset, element_offset + numel)`` of a tensor.

    Each element is dropped with probability ``drop_rate``; the mask depends only on
    ``(seed, model_index, name, element position)`` (see the module docstring).
    """
    return torch.from_numpy(_random_keep_flags(numel, drop_rate, seed, model_index, name, element_offset))


def drop_and_rescale(
    delta: Tensor,
    keep_mask: Tensor,
    *,
    drop_rate: float,
    use_weight_rescale: bool = True,
) -> Tensor:
    """DARE on one tensor: ``delta * keep / (1 - p)`` (or without the division for DropOnly), in place.

    Args:
        delta: float32 tensor to mask; modified in place and returned.
        keep_mask: boolean mask of ``delta.numel()`` elements (True = keep), e.g. from ``random_keep_mask``.
        drop_rate: p in [0, 1); MergeLM flag ``--weight_mask_rate``.
        use_weight_rescale: divide the survivors by ``1 - p`` (DARE); False gives DropOnly.
    """
    delta.mul_(keep_mask.to(delta.device).view(delta.shape))
    if use_weight_rescale and drop_rate != 0.0:
        _divide_by_keep_rate_(delta, drop_rate)
    return delta


def _divide_by_keep_rate_(delta: Tensor, drop_rate: float) -> None:
    """``delta /= (1 - p)`` as a true division by the tensor-dtype value of ``1 - p``, on every device.

    CUDA turns a Python-number divisor into a multiplication by its reciprocal (1 ulp off for some values); a
    0-dim tensor divisor keeps the CPU's and the GPU's results identical.
    """
    delta.div_(torch.tensor(1.0 - drop_rate, dtype=delta.dtype, device=delta.device))


def magnitude_drop(delta: Tensor, *, drop_rate: float, use_weight_rescale: bool = False) -> Tensor:
    """Magnitude pruning of one tensor, in place: drop every entry with ``|x| <= `` the k-th smallest ``|x|``.

    ``k = int(numel * p)`` as in MergeLM (ties at the threshold are dropped too, so at least k entries go).
    MergeLM crashes when ``k == 0``; here such a tensor is left unchanged. With ``use_weight_rescale`` the
    survivors are divided by ``1 - p`` as in MergeLM.
    """
    k = int(delta.numel() * drop_rate)
    if k == 0:
        return delta
    magnitudes = delta.abs().flatten()
    kth_value = magnitudes.kthvalue(k).values
    delta.mul_((magnitudes > kth_value).view(delta.shape))
    if use_weight_rescale:
        _divide_by_keep_rate_(delta, drop_rate)
    return delta


def _masked_rescale_(part: np.ndarray, keep: np.ndarray, drop_rate: float, use_weight_rescale: bool) -> np.ndarray:
    """DARE's element step in place on a float32 array: ``x * keep / (1 - p)`` (DropOnly: ``x * keep``).

    ``x * keep`` as MergeLM's ``x * (1 - mask)``; the division is a true division by ``float32(1 - p)``. Every
    CPU path of the random strategy (whole tensors, row chunks, fused with the subtraction) goes through it;
    tensors on other devices use ``drop_and_rescale`` (same values, tested on CUDA).
    """
    np.multiply(part, keep, out=part)
    if use_weight_rescale:
        np.divide(part, np.float32(1.0 - drop_rate), out=part)
    return part


def _apply_keep_blocks(flat: np.ndarray, drop_rate: float, use_weight_rescale: bool, seed: int, model_index: int,
                       name: str, element_offset: int, source=None) -> None:
    """In place on a float32 array: (optionally ``flat[lo:hi] = source(lo, hi)`` first) then ``x * keep / (1 - p)``."""
    # slices of CACHE_SLICE elements: the data mostly stays in cache between the steps, with few enough calls
    # per block that parallel workers rarely wait for the interpreter lock (measured on 2 cores, 1.1B merge:
    # 2**16-element slices 8.0 s, 2**18 6.7-7.0 s, whole 2**20 blocks 6.9-7.6 s)
    for lo, hi, flags in _keep_flag_blocks(flat.size, drop_rate, seed, model_index, name, element_offset):
        for start in range(lo, hi, CACHE_SLICE):
            stop = min(start + CACHE_SLICE, hi)
            if source is not None:
                source(start, stop)
            _masked_rescale_(flat[start:stop], flags[start - lo:stop - lo], drop_rate, use_weight_rescale)


def dare_delta(
    finetuned: Tensor,
    base: Tensor,
    *,
    drop_rate: float,
    use_weight_rescale: bool,
    seed: int,
    model_index: int,
    name: str,
    element_offset: int = 0,
) -> Tensor:
    """``DARE(float32(finetuned) - base)`` with the random strategy, as a new float32 tensor.

    Same values as ``mask_tensor(finetuned.float() - base, ...)``; on the CPU the subtraction is fused into the
    block loop so every element is touched while in cache.
    """
    fused = finetuned.device.type == "cpu" and finetuned.is_contiguous() and base.is_contiguous()
    if not fused or drop_threshold(drop_rate) == 0 or base.dtype != torch.float32:
        delta = torch.sub(finetuned, base) if finetuned.dtype != base.dtype else finetuned - base
        return mask_tensor(delta.float(), drop_rate=drop_rate, use_weight_rescale=use_weight_rescale,
                           mask_strategy="random", seed=seed, model_index=model_index, name=name,
                           element_offset=element_offset)
    out = torch.empty(base.shape, dtype=torch.float32)
    flat_out, flat_ft, flat_base = out.view(-1), finetuned.reshape(-1), base.reshape(-1)

    def subtract(lo: int, hi: int) -> None:
        # copy (exact upcast) then subtract in float32: faster than a mixed-dtype subtraction, same values
        flat_out[lo:hi].copy_(flat_ft[lo:hi]).sub_(flat_base[lo:hi])

    _apply_keep_blocks(out.view(-1).numpy(), drop_rate, use_weight_rescale, seed, model_index, name, element_offset,
                       source=subtract)
    return out


def mask_tensor(
    tensor: Tensor,
    *,
    drop_rate: float,
    use_weight_rescale: bool,
    mask_strategy: MaskStrategy,
    seed: int,
    model_index: int,
    name: str,
    element_offset: int = 0,
) -> Tensor:
    """Apply the chosen DARE variant to one float32 tensor (delta or fine-tuned weight), in place.

    ``element_offset`` locates a row chunk inside its full tensor (random strategy only; magnitude pruning
    needs the whole tensor).
    """
    if drop_rate == 0.0:
        return tensor
    if mask_strategy == "magnitude":
        if element_offset:
            raise RuntimeError("magnitude masking needs the whole tensor, not a chunk")
        return magnitude_drop(tensor, drop_rate=drop_rate, use_weight_rescale=use_weight_rescale)
    if tensor.device.type != "cpu" or not tensor.is_contiguous() or tensor.dtype != torch.float32:
        keep = random_keep_mask(tensor.numel(), drop_rate, seed=seed, model_index=model_index, name=name,
                                element_offset=element_offset)
        return drop_and_rescale(tensor, keep, drop_rate=drop_rate, use_weight_rescale=use_weight_rescale)
    _apply_keep_blocks(tensor.view(-1).numpy(), drop_rate, use_weight_rescale, seed, model_index, name, element_offset)
    return tensor
