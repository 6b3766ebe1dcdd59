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
stream seeded by ``SeedSequence([seed, model_index, blake2b64(name), b])``, and element ``j`` is dropped when
its integer is below ``round(p * 2**32)`` (drop probability exact to 2**-33). Masks therefore do not depend on
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
_TWO_POW_32 = 1 << 32


def name_hash(name: str) -> int:
    """Stable 64-bit hash of a parameter name (independent of Python's per-process hash seed)."""
    return int.from_bytes(hashlib.blake2b(name.encode("utf-8"), digest_size=8).digest(), "little")


def drop_threshold(drop_rate: float) -> int:
    """The 32-bit threshold below which an element is dropped: ``round(p * 2**32)``, capped at 2**32 - 1."""
    return min(round(drop_rate * _TWO_POW_32), _TWO_POW_32 - 1)


def _block_uint32(seed: int, model_index: int, name_key: int, block: int, count: int) -> np.ndarray:
    sequence = np.random.SeedSequence([seed, model_index, name_key, block])
    return np.random.Generator(np.random.PCG64(sequence)).integers(0, _TWO_POW_32, size=count, dtype=np.uint32)


def random_keep_mask(
    numel: int, drop_rate: float, *, seed: int, model_index: int, name: str, element_offset: int = 0
) -> Tensor:
    """Boolean keep-mask (True = keep) for elements ``[element_offset, element_offset + numel)`` of a tensor.

    Each element is dropped with probability ``drop_rate``; the mask depends only on
    ``(seed, model_index, name, element position)`` (see the module docstring).
    """
    keep = np.ones(numel, dtype=bool)
    threshold = drop_threshold(drop_rate)
    if threshold == 0 or numel == 0:
        return torch.from_numpy(keep)
    name_key = name_hash(name)
    start, stop = element_offset, element_offset + numel
    for block in range(start // MASK_BLOCK_SIZE, (stop - 1) // MASK_BLOCK_SIZE + 1):
        block_start = block * MASK_BLOCK_SIZE
        lo, hi = max(start, block_start), min(stop, block_start + MASK_BLOCK_SIZE)
        draws = _block_uint32(seed, model_index, name_key, block, hi - block_start)
        np.greater_equal(draws[lo - block_start :], np.uint32(threshold), out=keep[lo - start : hi - start])
    return torch.from_numpy(keep)


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
        delta.div_(1.0 - drop_rate)
    return delta


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
        delta.div_(1.0 - drop_rate)
    return delta


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
    keep = random_keep_mask(
        tensor.numel(), drop_rate, seed=seed, model_index=model_index, name=name, element_offset=element_offset
    )
    return drop_and_rescale(tensor, keep, drop_rate=drop_rate, use_weight_rescale=use_weight_rescale)
