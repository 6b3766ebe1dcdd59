"""mergekit 0.1.5's sparsifiers (``mergekit/sparsify.py``) on one delta tensor, with this project's masks.

Each function takes one model's task vector ``delta`` of one parameter and returns it sparsified, in ``delta``'s
dtype, with the arithmetic in the dtype mergekit 0.1.5 uses (the delta's dtype, which is the config's ``dtype``;
``random`` and ``della_magprune`` work in ``_work_dtype``: float32 on the CPU unless the delta is bfloat16).

* ``magnitude`` (TIES): keep the ``k = max(1, int(density * N))`` largest ``|delta|``.
* ``magnitude_outliers`` (Model Breadcrumbs): drop the ``int(gamma * N)`` largest, keep the next
  ``int(density * N)``, drop the rest (the outlier cut shrinks when the two do not fit).
* ``bernoulli`` (mergekit's ``random``, DARE): keep each element with probability ``density``.
* ``della_magprune`` (DELLA's MagPrune): keep each element with probability
  ``(density - epsilon) + 2 * epsilon * rank_norm``, ``rank_norm`` its magnitude rank along dim 1 scaled to [0, 1].

Ties at a magnitude threshold: mergekit's ``argsort`` is unstable, so which of equal ``|delta|`` survives is
unspecified there. Here one total order is used everywhere: by ``|delta|``, and among equal magnitudes the element
with the lower flat (or in-row) index ranks as the larger one. mergekit upcasts float64 magnitudes to float32 for
the ranking on the CPU; rounding never reorders values, it only creates ties, so ranking the exact values agrees
with mergekit wherever mergekit is deterministic.

Randomness: mergekit draws ``torch.bernoulli`` from the global generator, so its masks depend on the order
tensors are processed. Here a mask is a pure function of ``(seed, model_index, name, element position)``:
``random`` uses DARE's ``random_keep_mask`` and DELLA's uniforms come from ``keyed_uniforms``, the same PCG64 blocks
on a separate stream. The distributions equal mergekit's; the draws do not.

Rescaling (``Rescale``), recorded by name:

* ``"l1"``: mergekit's ``rescale: true``: ``masked * ||delta||_1 / ||masked||_1`` per tensor, skipped when
  either norm is below 1e-7 (``rescaled_masked_tensor``). It restores the L1 norm, 1/density only on average.
  The norms are float64 sums rounded once to the work dtype (mergekit sums in the work dtype's accumulator), so a
  whole tensor and its row chunks get the same norms; the rescale can differ from mergekit's in the last bit.
* ``"inverse_keep"``: the papers' rescale, each survivor divided by its keep probability: ``1 / (1 - p) =
  1 / density`` for DARE (Yu et al.), ``1 / (1 - P_i)`` per element for DELLA (Deep et al., arXiv:2406.11617,
  P_i = its drop probability), ``1 / density`` for the magnitude methods (MergeLM's rescale after pruning).
* ``"none"``: the masked delta.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from model_merging_methods.dare import MASK_BLOCK_SIZE, _block_bit_generator, name_hash, random_keep_mask

Sparsification = Literal["magnitude", "magnitude_outliers", "random", "della_magprune"]
Rescale = Literal["l1", "inverse_keep", "none"]
RESCALES: tuple[Rescale, ...] = ("l1", "inverse_keep", "none")
#: mergekit's ``eps`` in ``rescaled_masked_tensor``: below it an L1 norm counts as zero and nothing is rescaled.
L1_RESCALE_EPS = 1e-7
#: the PCG64 stream of DELLA's uniforms (DARE's masks use streams 0 and 1 of the same blocks).
DELLA_STREAM = 2


def _work_dtype(tensor: Tensor) -> torch.dtype:
    """mergekit's dtype for ``random`` and ``della_magprune``: the tensor's own on an accelerator or for bfloat16,
    else float32 (``torch.bernoulli`` has no CPU float16 kernel; note that CPU float64 is computed in float32)."""
    if tensor.device.type != "cpu" or tensor.dtype == torch.bfloat16:
        return tensor.dtype
    return torch.float32


def top_k_mask(magnitudes: Tensor, k: int) -> Tensor:
    """Boolean mask of the ``k`` largest of a flat ``magnitudes``, ties at the threshold to the lower index: the
    first ``k`` of ``_descending_order(magnitudes, 0)``, in linear time (a k-th value, then a running count of
    the entries equal to it) instead of a sort."""
    n = magnitudes.numel()
    if k <= 0:
        return torch.zeros(n, dtype=torch.bool, device=magnitudes.device)
    if k >= n:
        return torch.ones(n, dtype=torch.bool, device=magnitudes.device)
    values = magnitudes if magnitudes.dtype in (torch.float32, torch.float64) else magnitudes.float()  # exact
    threshold = values.kthvalue(n - k + 1).values
    keep = values > threshold
    equal = values == threshold
    need = k - int(keep.sum())
    keep |= equal & (equal.cumsum(0) <= need)
    return keep


def _order_keys(magnitudes: Tensor) -> Tensor:
    """int64 keys ordered as the non-negative float ``magnitudes`` (their bit patterns: monotonic for >= 0)."""
    if magnitudes.dtype in (torch.bfloat16, torch.float16):
        return magnitudes.reshape(-1).view(torch.int16).to(torch.int64)
    if magnitudes.dtype == torch.float32:
        return magnitudes.reshape(-1).view(torch.int32).to(torch.int64)
    return magnitudes.reshape(-1).view(torch.int64)


class TopKChunks:
    """``top_k_mask`` of a whole flat tensor, found and applied chunk by chunk (consecutive chunks, in order).

    The k-th largest value comes from histograms of the values' bit patterns (for non-negative floats they order
    as the values): one pass of 16-bit buckets for 16-bit dtypes, a second pass inside the threshold's bucket for
    float32 (and two more for float64), so no pass holds more than a chunk. ``mask(chunk)`` then keeps the values
    above the threshold and the first ``need`` equal to it, counting the equal entries seen so far.
    """

    def __init__(self, chunks: Callable[[], Iterable[Tensor]], k: int, n: int) -> None:
        self.all, self.none, self.seen = k >= n, k <= 0, 0
        if self.all or self.none:
            return
        first = next(iter(chunks()))
        bits = {torch.bfloat16: 16, torch.float16: 16, torch.float32: 32}.get(first.dtype, 64)
        prefix, above = 0, 0  # the threshold's high bits found so far; entries above its bucket
        for shift in range(bits - 16, -1, -16):
            counts = torch.zeros(1 << 16, dtype=torch.int64, device=first.device)
            for chunk in chunks():
                keys = _order_keys(chunk)
                if shift + 16 < bits:  # only the keys in the bucket found so far
                    keys = keys[(keys >> (shift + 16)) == prefix]
                counts += torch.bincount((keys >> shift) & 0xFFFF, minlength=1 << 16)
            from_top = counts.flip(0).cumsum(0)  # entries in this bucket or higher, by bucket from the top
            position = int(torch.searchsorted(from_top, k - above))  # the bucket holding the k-th largest
            bucket = (1 << 16) - 1 - position
            above += int(from_top[position - 1]) if position > 0 else 0
            prefix = (prefix << 16) | bucket
        self.threshold, self.need = prefix, k - above

    def mask(self, magnitudes: Tensor) -> Tensor:
        if self.all or self.none:
            return torch.full((magnitudes.numel(),), self.all, dtype=torch.bool, device=magnitudes.device)
        keys = _order_keys(magnitudes)
        equal = keys == self.threshold
        keep = (keys > self.threshold) | (equal & (equal.cumsum(0) + self.seen <= self.need))
        self.seen += int(equal.sum())
        return keep


def magnitude_chunk_masks(chunks: Callable[[], Iterable[Tensor]], n: int, density: float, method: Sparsification,
                          *, gamma: float = 0.01) -> list[TopKChunks]:
    """The selections ``magnitude`` (one: the k largest) or ``magnitude_outliers`` (two: keep the first minus the
    second) make on a whole tensor of ``n`` elements whose flat |delta| ``chunks()`` yields (each call a fresh
    pass), to apply chunk by chunk (``chunk_keep_mask``)."""
    if method == "magnitude":
        return [TopKChunks(chunks, n if density >= 1 else 0 if density <= 0 else max(1, int(density * n)), n)]
    if method != "magnitude_outliers":
        raise ValueError(f"{method} is not a magnitude sparsification")
    if density >= 1:
        return [TopKChunks(chunks, n, n), TopKChunks(chunks, 0, n)]
    target_n = int(density * n)
    n_bot = max(0, n - target_n - int(gamma * n))
    n_skip = max(0, n - n_bot - target_n)
    return [TopKChunks(chunks, n_skip + max(0, target_n), n), TopKChunks(chunks, n_skip, n)]


def chunk_keep_mask(selections: list[TopKChunks], magnitudes: Tensor) -> Tensor:
    """The next chunk's part of the whole-tensor keep mask of ``magnitude_chunk_masks``."""
    keep = selections[0].mask(magnitudes)
    if len(selections) == 2:
        keep &= ~selections[1].mask(magnitudes)
    return keep


def _descending_order(magnitudes: Tensor, dim: int) -> Tensor:
    """Indices ordering ``magnitudes`` from the largest along ``dim``; equal values keep their index order."""
    return torch.sort(magnitudes, dim=dim, descending=True, stable=True).indices


def rescale_masked(tensor: Tensor, mask: Tensor, rescale: Rescale, keep_probability: Tensor | float,
                   norms: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """``tensor * mask`` rescaled as ``rescale`` says (see the module docstring), in ``tensor``'s dtype.

    Args:
        tensor: the delta before masking.
        mask: 0/1 in ``tensor``'s dtype (multiplied, as mergekit does, so dropped entries are signed zeros).
        rescale: ``"l1"``, ``"inverse_keep"`` or ``"none"``.
        keep_probability: the divisor of ``"inverse_keep"``: a float, or a tensor broadcasting to ``tensor``.
        norms: ``"l1"``'s ``(||delta||_1, ||masked||_1)`` of the whole tensor, in ``tensor``'s dtype, when
            ``tensor`` is a row chunk of it (``l1_norms``); None computes them from ``tensor``.
    """
    masked = tensor * mask
    if rescale == "none":
        return masked
    if rescale == "inverse_keep":
        if not isinstance(keep_probability, Tensor):
            # a 0-dim tensor divisor: a true division on every device (CUDA turns a Python divisor into a product)
            keep_probability = torch.tensor(keep_probability, dtype=tensor.dtype, device=tensor.device)
        return masked / keep_probability
    if rescale == "l1":
        if norms is None:  # float64 sums rounded once to the dtype, as for row chunks (mergekit_methods.l1_norms)
            norms = (tensor.double().abs().sum().to(tensor.dtype), masked.double().abs().sum().to(tensor.dtype))
        before_scale, after_scale = norms
        if before_scale < L1_RESCALE_EPS or after_scale < L1_RESCALE_EPS:
            return masked
        return masked * (before_scale / after_scale)
    raise ValueError(f"unknown rescale {rescale!r}; choose one of {', '.join(RESCALES)}")


def magnitude(delta: Tensor, density: float, *, rescale: Rescale = "none") -> Tensor:
    """TIES trim: keep exactly the ``k = max(1, int(density * N))`` largest ``|delta|``, zero the rest.

    As mergekit 0.1.5: ``density >= 1`` returns ``delta`` itself, ``density <= 0`` (or an empty tensor) zeros.
    Ties at the threshold keep the lower flat index (module docstring).
    """
    if density >= 1:
        return delta
    if density <= 0 or delta.numel() == 0:
        return torch.zeros_like(delta)
    k = max(1, int(density * delta.numel()))
    mask = top_k_mask(delta.abs().reshape(-1), k).to(delta.dtype)
    return rescale_masked(delta, mask.reshape_as(delta), rescale, density)


def magnitude_outliers(delta: Tensor, density: float, *, gamma: float = 0.01, rescale: Rescale = "none") -> Tensor:
    """Model Breadcrumbs: drop the ``gamma`` largest outliers and the smallest, keep ``int(density * N)``.

    mergekit 0.1.5: ``target_n = int(density * N)``, ``n_top = int(gamma * N)``, ``n_bot = max(0, N - target_n -
    n_top)`` and the kept entries are ``ascending[n_bot : n_bot + target_n]`` of the ascending ``|delta|`` order.
    So ``n_top == 0`` (``gamma * N < 1``) keeps the ``target_n`` largest, exactly like ``magnitude`` (0.1.4's
    ``[n_bot:-n_top]`` zeroed the whole tensor there); when ``target_n + n_top > N`` the outlier cut shrinks to
    ``N - target_n``; ``target_n <= 0`` zeros the tensor. ``density >= 1`` returns ``delta`` itself.
    """
    if density >= 1:
        return delta
    num_elements = delta.numel()
    target_n = int(density * num_elements)
    n_top = int(gamma * num_elements)
    n_bot = max(0, num_elements - target_n - n_top)
    # ascending[n_bot : n_bot + target_n] of the descending order flipped = its entries n_skip .. n_skip + target_n
    n_skip = max(0, num_elements - n_bot - target_n)
    magnitudes = delta.abs().reshape(-1)
    mask = top_k_mask(magnitudes, n_skip + max(0, target_n)) & ~top_k_mask(magnitudes, n_skip)
    return rescale_masked(delta, mask.to(delta.dtype).reshape_as(delta), rescale, density)


def bernoulli(
    delta: Tensor, density: float, *, seed: int, model_index: int, name: str, rescale: Rescale = "none",
    element_offset: int = 0, norms: tuple[Tensor, Tensor] | None = None,
) -> Tensor:
    """DARE's random drop (mergekit's ``random``): keep each element with probability ``density``.

    The keep probability is ``density`` rounded to the work dtype, as mergekit's ``torch.full_like(delta,
    density, dtype=work_dtype)`` makes it (bfloat16: 0.3 -> 0.30078125); ``"inverse_keep"`` divides by that same
    value, so survivors are unbiased. The mask is ``random_keep_mask(drop_rate=1 - keep_probability, ...)``:
    a function of ``(seed, model_index, name, element position)`` only. ``density >= 1`` returns ``delta`` itself,
    a keep probability ``<= 0`` gives zeros (no rescale).
    """
    if density >= 1:
        return delta
    work_dtype = _work_dtype(delta)
    keep_probability = torch.tensor(density, dtype=work_dtype, device=delta.device)
    p = float(keep_probability)
    if p <= 0:
        keep, rescale = torch.zeros(delta.numel(), dtype=torch.bool), "none"
    else:
        keep = random_keep_mask(delta.numel(), 1.0 - p, seed=seed, model_index=model_index, name=name,
                                element_offset=element_offset)
    mask = keep.to(device=delta.device, dtype=work_dtype).reshape(delta.shape)
    return rescale_masked(delta.to(work_dtype), mask, rescale, keep_probability, norms).to(delta.dtype)


def keyed_uniforms(numel: int, *, seed: int, model_index: int, name: str, element_offset: int = 0) -> Tensor:
    """Float64 uniforms in [0, 1) for elements ``[element_offset, element_offset + numel)`` of a tensor.

    Same keying as DARE's masks (``dare.py``): block ``b`` of 2**20 elements draws from PCG64 seeded with
    ``SeedSequence([seed, model_index, blake2b64(name), b, DELLA_STREAM])``, so each element's value depends only on
    ``(seed, model_index, name, position)``, never on the order tensors or models are processed.
    """
    out = np.empty(numel, dtype=np.float64)
    if numel == 0:
        return torch.from_numpy(out)
    start, stop = element_offset, element_offset + numel
    name_key = name_hash(name)
    for block in range(start // MASK_BLOCK_SIZE, (stop - 1) // MASK_BLOCK_SIZE + 1):
        block_start = block * MASK_BLOCK_SIZE
        lo, hi = max(start, block_start), min(stop, block_start + MASK_BLOCK_SIZE)
        generator = np.random.Generator(_block_bit_generator(seed, model_index, name_key, block, DELLA_STREAM))
        out[lo - start : hi - start] = generator.random(hi - block_start)[lo - block_start :]
    return torch.from_numpy(out)


def della_keep_probabilities(delta: Tensor, density: float, epsilon: float) -> Tensor:
    """MagPrune's keep probabilities, ``delta``'s shape, in the work dtype (mergekit 0.1.5's ``della_magprune``).

    ``p = (density - epsilon) + rank_norm * 2 * epsilon`` with ``rank_norm = (rank - 1) / (n - 1)``, ``rank``
    the 1-based ascending rank of ``|delta|`` along **dim 1** (a 1-D tensor is one row; for 3-D and up, dim 1, not
    the last dim) and ``n`` that dim's size. Ranks are cast to the work dtype before the division, as mergekit
    does (in bfloat16, ranks above 256 round). Larger magnitudes are kept more often.

    Raises:
        ValueError: unless ``0 < density - epsilon`` and ``density + epsilon < 1`` (mergekit raises too); or when
            dim 1 has fewer than 2 elements (mergekit fails there inside ``torch.bernoulli`` on 0/0 = NaN).
    """
    if density + epsilon >= 1 or density - epsilon <= 0:
        raise ValueError(
            f"della_magprune needs density - epsilon > 0 and density + epsilon < 1 (mergekit: 'Epsilon must be "
            f"chosen such that density +/- epsilon is in (0, 1)'); got density={density}, epsilon={epsilon}"
        )
    rows = delta.unsqueeze(0) if delta.dim() < 2 else delta
    n = rows.shape[1]
    if n < 2:
        raise ValueError(
            f"della_magprune ranks |delta| along dim 1, which needs at least 2 elements; got shape "
            f"{tuple(delta.shape)} (mergekit 0.1.5 fails on it: rank_norm = 0/0)"
        )
    order = _descending_order(rows.abs(), dim=1)
    index_shape = [1] * rows.dim()
    index_shape[1] = n
    position = torch.empty_like(order)
    position.scatter_(1, order, torch.arange(n, device=rows.device).view(index_shape).expand_as(order))
    # mergekit: argsort(argsort(|x|)).to(work_dtype) + 1, i.e. 1 = the smallest
    ranks = ((n - 1) - position).to(_work_dtype(delta)) + 1
    min_ranks = ranks.min(dim=1, keepdim=True).values
    max_ranks = ranks.max(dim=1, keepdim=True).values
    rank_norm = ((ranks - min_ranks) / (max_ranks - min_ranks)).clamp(0, 1)
    return ((density - epsilon) + rank_norm * 2 * epsilon).reshape(delta.shape)


def della_magprune(
    delta: Tensor,
    density: float,
    epsilon: float,
    *,
    seed: int | None = None,
    model_index: int | None = None,
    name: str | None = None,
    uniforms: Tensor | None = None,
    rescale: Rescale = "none",
    element_offset: int = 0,
    norms: tuple[Tensor, Tensor] | None = None,
) -> Tensor:
    """DELLA's MagPrune: keep element i when ``u_i < p_i`` (``della_keep_probabilities``), then rescale.

    ``u`` is ``uniforms`` when given (tests), else ``keyed_uniforms(seed, model_index, name)``. ``p`` needs whole
    rows along dim 1: a chunk of whole rows of a 2-D tensor (``element_offset``, ``norms``) gives the same values as
    the tensor, a piece of a row would not. ``"inverse_keep"`` divides each survivor by
    its own ``p_i`` (the paper's ``1 / (1 - P_i)``); mergekit's ``"l1"`` matches the norm instead. As mergekit
    0.1.5: ``density >= 1`` returns ``delta`` itself and ``density <= 0`` zeros, both before the epsilon check.
    """
    if density >= 1:
        return delta
    if density <= 0:
        return torch.zeros_like(delta)
    probabilities = della_keep_probabilities(delta, density, epsilon)
    if uniforms is None:
        if seed is None or model_index is None or name is None:
            raise ValueError("della_magprune needs seed, model_index and name for its random draws")
        uniforms = keyed_uniforms(delta.numel(), seed=seed, model_index=model_index, name=name,
                                  element_offset=element_offset)
    keep = uniforms.to(device=delta.device, dtype=torch.float64).reshape(delta.shape) < probabilities.double()
    work_dtype = probabilities.dtype
    return rescale_masked(delta.to(work_dtype), keep.to(work_dtype), rescale, probabilities, norms).to(delta.dtype)


def sparsify(
    delta: Tensor,
    density: float,
    method: Sparsification,
    *,
    gamma: float = 0.0,
    epsilon: float = 0.0,
    rescale: Rescale = "none",
    seed: int | None = None,
    model_index: int | None = None,
    name: str | None = None,
    element_offset: int = 0,
    norms: tuple[Tensor, Tensor] | None = None,
    keep: Tensor | None = None,
) -> Tensor:
    """mergekit's ``sparsify`` dispatcher (same ``gamma``/``epsilon`` defaults of 0; the GTA methods pass theirs).

    ``seed``, ``model_index`` and ``name`` key the random methods' draws and are required for them. A row chunk
    of a tensor (``element_offset``: its first element's flat position; ``norms``: the whole tensor's L1 norms,
    ``l1_norms``) is possible for ``random`` and ``della_magprune``, not for the magnitude methods (they rank the
    whole tensor) unless ``keep`` gives the chunk's part of their whole-tensor mask (``chunk_keep_mask``; no rescale
    then, since an L1 norm would need the whole masked tensor).
    """
    if keep is not None:
        if method not in ("magnitude", "magnitude_outliers") or rescale == "l1":
            raise ValueError(f"a precomputed keep mask is for the magnitude methods without an L1 rescale, got "
                             f"{method} with rescale {rescale!r}")
        if density >= 1 and method == "magnitude":
            return delta
        return rescale_masked(delta, keep.to(delta.dtype).reshape_as(delta), rescale, density)
    if method in ("magnitude", "magnitude_outliers") and (element_offset or norms is not None):
        raise ValueError(f"{method} ranks the whole tensor: it cannot take a row chunk")
    if method == "magnitude":
        return magnitude(delta, density, rescale=rescale)
    if method == "magnitude_outliers":
        return magnitude_outliers(delta, density, gamma=gamma, rescale=rescale)
    if method not in ("random", "della_magprune"):
        raise ValueError(f"unknown sparsification {method!r}; choose magnitude, magnitude_outliers, random or "
                         "della_magprune")
    if method == "della_magprune":
        return della_magprune(delta, density, epsilon, seed=seed, model_index=model_index, name=name,
                              rescale=rescale, element_offset=element_offset, norms=norms)
    if seed is None or model_index is None or name is None:
        raise ValueError("the random sparsification needs seed, model_index and name for its mask")
    return bernoulli(delta, density, seed=seed, model_index=model_index, name=name, rescale=rescale,
                     element_offset=element_offset, norms=norms)
