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
see ``_block_draws`` for how the integer is drawn a byte first). Masks therefore do not depend on
the order tensors are visited, on thread counts, on the device, on which other tensors exist, or on
whether a tensor is processed whole or in row chunks (``element_offset``). They differ from MergeLM's
masks, which come from one global ``torch.bernoulli`` stream and change with any of those.

On the CPU, masking and rescaling (fused with the subtraction of the base) run as compiled loops
(``dare_kernels``, Numba); on other devices as torch operations with the same mask (``drop_and_rescale``).
"""

from __future__ import annotations

import hashlib
import importlib
from typing import Literal

import numpy as np
import torch
from torch import Tensor

MaskStrategy = Literal["random", "magnitude"]
WeightFormat = Literal["delta_weight", "finetuned_weight"]

MASK_BLOCK_SIZE = 1 << 20
_TWO_POW_32 = 1 << 32


def name_hash(name: str) -> int:
    """Stable 64-bit hash of a parameter name (independent of Python's per-process hash seed)."""
    return int.from_bytes(hashlib.blake2b(name.encode("utf-8"), digest_size=8).digest(), "little")


def drop_threshold(drop_rate: float) -> int:
    """The 32-bit threshold below which an element is dropped: ``round(p * 2**32)``, capped at 2**32 - 1."""
    return min(round(drop_rate * _TWO_POW_32), _TWO_POW_32 - 1)


def _kernels():
    """The compiled DARE loops (``dare_kernels``), imported on first use: loading Numba takes about 0.45 s."""
    try:
        dare_kernels = importlib.import_module("model_merging_methods.dare_kernels")
    except ModuleNotFoundError as error:
        if error.name != "numba" and not (error.name or "").startswith("numba."):
            raise
        raise ModuleNotFoundError(
            "DARE's random masks need numba (compiled mask and rescale loops), which is not installed; "
            "install the project's requirements: pip install -r requirements.txt", name="numba"
        ) from error
    return dare_kernels


def _block_bit_generator(seed: int, model_index: int, name_key: int, block: int, stream: int) -> np.random.PCG64:
    return np.random.PCG64(np.random.SeedSequence([seed, model_index, name_key, block, stream]))


def _block_draws(seed: int, model_index: int, name_key: int, block: int, count: int, threshold: int):
    """``(top, fix)`` for the first ``count`` elements of a block; keep flags are ``top > threshold >> 24``
    except at the positions ``fix``, which are kept too.

    An element is kept when a uniform 32-bit integer ``u32`` drawn for it is ``>= threshold``. Bytes are four
    times cheaper to draw than 32-bit integers, so ``u32``'s top byte is drawn first (stream 0) and decides 255
    of 256 elements; only where it equals the threshold's top byte are the low 24 bits drawn (stream 1, in
    element order), and ``fix`` lists those whose low bits are ``>= threshold & 0xFFFFFF``. The result is exactly
    ``P(drop) = threshold / 2**32`` and each element's flag does not depend on ``count``.

    The bytes of stream 0 are the generator's raw 64-bit outputs read little-endian, which is exactly what
    ``Generator.integers(0, 256, dtype=np.uint8)`` returns (tested), three times faster.
    """
    dare_kernels = _kernels()
    bit_generator = _block_bit_generator(seed, model_index, name_key, block, 0)
    raw = bit_generator.random_raw((count + 7) // 8).astype("<u8", copy=False)
    undecided = dare_kernels.equal_byte_positions(raw, threshold >> 24, count)
    fix = undecided[:0]
    if undecided.size:
        low = np.random.Generator(_block_bit_generator(seed, model_index, name_key, block, 1)).integers(
            0, 1 << 24, size=undecided.size, dtype=np.uint32
        )
        fix = undecided[low >= (threshold & 0xFFFFFF)]
    return raw.view(np.uint8)[:count], fix


def _mask_blocks(numel: int, drop_rate: float, seed: int, model_index: int, name: str, element_offset: int):
    """Yield ``(lo, hi, top, fix)`` for consecutive slices ``[lo, hi)`` of ``[0, numel)`` (one per 2**20-element
    block), with ``top`` and ``fix`` (see ``_block_draws``) relative to ``lo``."""
    threshold = drop_threshold(drop_rate)
    name_key = name_hash(name)
    start, stop = element_offset, element_offset + numel
    for block in range(start // MASK_BLOCK_SIZE, (stop - 1) // MASK_BLOCK_SIZE + 1):
        block_start = block * MASK_BLOCK_SIZE
        lo, hi = max(start, block_start), min(stop, block_start + MASK_BLOCK_SIZE)
        top, fix = _block_draws(seed, model_index, name_key, block, hi - block_start, threshold)
        skip = lo - block_start
        yield lo - start, hi - start, top[skip:], fix[np.searchsorted(fix, skip):] - skip


def _random_keep_flags(numel: int, drop_rate: float, seed: int, model_index: int, name: str, element_offset: int):
    keep = np.ones(numel, dtype=bool)
    threshold = drop_threshold(drop_rate)
    if threshold == 0 or numel == 0:
        return keep
    for lo, hi, top, fix in _mask_blocks(numel, drop_rate, seed, model_index, name, element_offset):
        flags = keep[lo:hi]
        np.greater(top, np.uint8(threshold >> 24), out=flags)
        flags[fix] = True
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
    rescale_factor: float | None = None,
) -> Tensor:
    """DARE on one tensor: ``delta * keep / (1 - p)`` (or without the division for DropOnly), in place.

    Args:
        delta: float32 tensor to mask; modified in place and returned.
        keep_mask: boolean mask of ``delta.numel()`` elements (True = keep), e.g. from ``random_keep_mask``.
        drop_rate: p in [0, 1); MergeLM flag ``--weight_mask_rate``.
        use_weight_rescale: divide the survivors by ``1 - p`` (DARE); False gives DropOnly.
        rescale_factor: multiply the survivors by this instead of ``1 / (1 - p)`` (DAREx's ``1 / q``; divided by
            ``float32(1 / rescale_factor)``, so ``1 / (1 - p)`` gives exactly DARE).
    """
    delta.mul_(keep_mask.to(delta.device).view(delta.shape))
    if use_weight_rescale and (drop_rate != 0.0 or rescale_factor is not None):
        _divide_by_keep_rate_(delta, keep_rate(drop_rate, rescale_factor))
    return delta


def keep_rate(drop_rate: float, rescale_factor: float | None = None) -> float:
    """The divisor ``q`` of the survivors: ``1 - p`` (DARE), or ``1 / rescale_factor`` (DAREx's ``q``)."""
    return 1.0 - drop_rate if rescale_factor is None else 1.0 / rescale_factor


def _divide_by_keep_rate_(delta: Tensor, q: float) -> None:
    """``delta /= q`` as a true division by the tensor-dtype value of ``q``, on every device.

    CUDA turns a Python-number divisor into a multiplication by its reciprocal (1 ulp off for some values); a
    0-dim tensor divisor keeps the CPU's and the GPU's results identical.
    """
    delta.div_(torch.tensor(q, dtype=delta.dtype, device=delta.device))


def magnitude_drop(delta: Tensor, *, drop_rate: float, use_weight_rescale: bool = False,
                   rescale_factor: float | None = None) -> Tensor:
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
        _divide_by_keep_rate_(delta, keep_rate(drop_rate, rescale_factor))
    return delta


def _apply_dare_blocks(out: np.ndarray, drop_rate: float, use_weight_rescale: bool, seed: int, model_index: int,
                       name: str, element_offset: int, finetuned: np.ndarray | None = None,
                       base: np.ndarray | None = None, rescale_factor: float | None = None) -> None:
    """Random DARE on the CPU, one compiled pass per mask block (see ``dare_kernels``).

    ``out[i] = DARE(out[i])`` in place, or ``DARE(float32(finetuned[i]) - base[i])`` when ``finetuned`` (bfloat16
    as uint16 bits) and ``base`` (float32) are given; all flat arrays of ``out.size`` elements.
    """
    dare_kernels = _kernels()
    q, threshold_top = np.float32(keep_rate(drop_rate, rescale_factor)), np.uint8(drop_threshold(drop_rate) >> 24)
    for lo, hi, top, fix in _mask_blocks(out.size, drop_rate, seed, model_index, name, element_offset):
        if finetuned is None:
            dare_kernels.dare_in_place(out[lo:hi], top, threshold_top, fix, q, use_weight_rescale)
        else:
            dare_kernels.dare_subtract_bf16(out[lo:hi], finetuned[lo:hi], base[lo:hi], top, threshold_top, fix, q,
                                            use_weight_rescale)


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
    rescale_factor: float | None = None,
) -> Tensor:
    """``DARE(float32(finetuned) - base)`` with the random strategy, as a new float32 tensor.

    Same values as ``mask_tensor(finetuned.float() - base, ...)``; on the CPU the upcast and subtraction of a
    bfloat16 fine-tuned tensor (the usual LLM checkpoint) are fused into DARE's compiled pass; other dtypes are
    subtracted first, then masked in place by the same compiled step.
    """
    fused = (finetuned.device.type == "cpu" and finetuned.is_contiguous() and base.is_contiguous()
             and finetuned.dtype == torch.bfloat16 and base.dtype == torch.float32)
    if not fused or drop_threshold(drop_rate) == 0:
        return mask_tensor(torch.sub(finetuned, base).float(), drop_rate=drop_rate,
                           use_weight_rescale=use_weight_rescale, mask_strategy="random", seed=seed,
                           model_index=model_index, name=name, element_offset=element_offset,
                           rescale_factor=rescale_factor)
    out = torch.empty(base.shape, dtype=torch.float32)
    flat_ft = finetuned.detach().reshape(-1).view(torch.int16).numpy().view(np.uint16)  # bf16 bits; values only
    _apply_dare_blocks(out.view(-1).numpy(), drop_rate, use_weight_rescale, seed, model_index, name, element_offset,
                       finetuned=flat_ft, base=base.detach().reshape(-1).numpy(), rescale_factor=rescale_factor)
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
    rescale_factor: float | None = None,
) -> Tensor:
    """Apply the chosen DARE variant to one float32 tensor (delta or fine-tuned weight), in place.

    ``element_offset`` locates a row chunk inside its full tensor (random strategy only; magnitude pruning
    needs the whole tensor).
    """
    if drop_rate == 0.0 and rescale_factor is None:
        return tensor
    if mask_strategy == "magnitude":
        if element_offset:
            raise RuntimeError("magnitude masking needs the whole tensor, not a chunk")
        return magnitude_drop(tensor, drop_rate=drop_rate, use_weight_rescale=use_weight_rescale,
                              rescale_factor=rescale_factor)
    if tensor.device.type != "cpu" or not tensor.is_contiguous() or tensor.dtype != torch.float32:
        keep = random_keep_mask(tensor.numel(), drop_rate, seed=seed, model_index=model_index, name=name,
                                element_offset=element_offset)
        return drop_and_rescale(tensor, keep, drop_rate=drop_rate, use_weight_rescale=use_weight_rescale,
                                rescale_factor=rescale_factor)
    _apply_dare_blocks(tensor.detach().view(-1).numpy(), drop_rate, use_weight_rescale, seed, model_index, name,
                       element_offset, rescale_factor=rescale_factor)
    return tensor
