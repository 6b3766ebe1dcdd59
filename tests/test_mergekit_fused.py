"""The compiled generalized task arithmetic (``mergekit_fused``) gives the bits of the torch operation sequence
(``mergekit_methods.generalized_task_arithmetic`` without it), for every case it covers."""

from __future__ import annotations

import itertools

import pytest
import torch

from model_merging_methods import mergekit_methods
from model_merging_methods.mergekit_fused import fused_gta
from model_merging_methods.mergekit_methods import generalized_task_arithmetic


def _torch_path(monkeypatch, **kwargs):
    with monkeypatch.context() as patch:
        patch.setattr(mergekit_methods, "fused_gta", lambda *a, **k: None)
        return generalized_task_arithmetic(**kwargs)


def _tensors(dtype, count, seed, shape=(37, 53)):
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=generator).to(dtype)
    models = [(base.float() + 0.01 * torch.randn(shape, generator=generator)).to(dtype) for _ in range(count)]
    # exact zeros, signed zeros, equal values and a negative-zero base: the sign election's and sums' edge cases
    base.view(-1)[:8] = torch.tensor([0.0, -0.0, 1.0, -1.0, 0.0, -0.0, 2.0, 0.5]).to(dtype)
    for index, model in enumerate(models):
        model.view(-1)[:8] = torch.tensor([0.0, -0.0, 1.0, -1.0, (-1.0) ** index, 0.25, 2.0, 0.5]).to(dtype)
    return base, models


CASES = list(itertools.product(
    (torch.bfloat16, torch.float32),
    (("task_arithmetic", None, None, False), ("dare_linear", "random", None, False),
     ("dare_ties", "random", "sum", False), ("dare_ties normalized", "random", "sum", True),
     ("task_arithmetic normalized", None, None, True)),
    ("l1", "inverse_keep", "none"),
    (2, 3, 4, 5),
))


@pytest.mark.parametrize(("dtype", "method", "rescale", "count"), CASES,
                         ids=[f"{d}-{m[0]}-{r}-{c}" for d, m, r, c in CASES])
def test_fused_equals_the_torch_operations_bit_for_bit(monkeypatch, dtype, method, rescale, count):
    _, sparsification, consensus, normalize = method
    base, models = _tensors(dtype, count, seed=count)
    weights = [0.3, -0.7, 1.1, 0.5, 0.05][:count]
    densities = [0.3, 1.0, 0.6, 0.0, 0.9][:count]  # 1.0: not sparsified; 0.0: everything dropped
    kwargs = dict(base=base, models=models, weights=weights, densities=densities, sparsification=sparsification,
                  consensus=consensus, normalize=normalize, rescale=rescale, dtype=dtype, seed=7,
                  model_indices=list(range(1, count + 1)), name="model.layers.0.mlp.up_proj.weight")
    fused = generalized_task_arithmetic(**kwargs)
    reference = _torch_path(monkeypatch, **kwargs)
    assert fused.dtype == reference.dtype == dtype
    if dtype == torch.float32 and count > 4:
        # torch sums a vector tail (the last numel % 32 elements here) over dim 0 with four accumulators, the fused
        # kernel in model order everywhere; up to 4 models the orders coincide, beyond they can differ by an ulp
        torch.testing.assert_close(fused, reference, rtol=2.5e-7, atol=1e-9)
        return
    assert torch.equal(fused.view(torch.int16 if dtype == torch.bfloat16 else torch.int32),
                       reference.view(torch.int16 if dtype == torch.bfloat16 else torch.int32))


def test_fused_row_chunks_with_given_norms_equal_the_torch_operations(monkeypatch):
    base, models = _tensors(torch.bfloat16, 2, seed=3, shape=(8, 16))
    norms = [(torch.tensor(5.0, dtype=torch.bfloat16), torch.tensor(2.0, dtype=torch.bfloat16))] * 2
    kwargs = dict(base=base[2:5], models=[m[2:5] for m in models], weights=[0.5, 0.5], densities=[0.3, 0.3],
                  sparsification="random", consensus="sum", rescale="l1", dtype=torch.bfloat16, seed=1,
                  model_indices=[1, 2], name="w", element_offset=32, l1_norms=norms)
    assert torch.equal(generalized_task_arithmetic(**kwargs), _torch_path(monkeypatch, **kwargs))


def test_uncovered_cases_are_left_to_the_torch_path():
    base, models = _tensors(torch.float16, 2, seed=1)
    common = dict(weights=[1.0, 1.0], densities=[0.5, 0.5], consensus=None, normalize=False, rescale="l1",
                  lambda_=1.0, seed=0, model_indices=[0, 1], name="w", element_offset=0, l1_norms=None)
    assert fused_gta(base, models, sparsification="random", **common) is None  # float16
    base, models = base.float(), [m.float() for m in models]
    assert fused_gta(base, models, sparsification="magnitude", **common) is None  # TIES ranks the whole tensor
    assert fused_gta(base, models, sparsification="random", **{**common, "lambda_": 0.5}) is None
    assert fused_gta(base, models, sparsification=None, **{**common, "consensus": "count"}) is None
    assert fused_gta(base, models, sparsification="random", **common) is not None


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("density", [0.3, 1.0, 0.0])
def test_chunk_norms_from_the_compiled_sums_equal_the_torch_sums(monkeypatch, dtype, density):
    from model_merging_methods import mergekit_fused
    from model_merging_methods.mergekit_methods import l1_norms

    generator = torch.Generator().manual_seed(0)
    delta = (torch.randn(6, 40, generator=generator) * 0.01).to(dtype)
    chunks = [(delta[:2], 0), (delta[2:], 80)]
    common = dict(density=density, sparsification="random", seed=3, model_index=2, name="w")
    fast = l1_norms(iter(chunks), **common)
    with monkeypatch.context() as patch:
        patch.setattr(mergekit_fused, "_FUSED_DTYPES", ())  # random_l1_sums declines: the torch sums run
        slow = l1_norms(iter(chunks), **common)
    assert all(torch.equal(a, b) and a.dtype == b.dtype for a, b in zip(fast, slow, strict=True))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_chunk_sums_formed_from_model_and_base_equal_the_sums_of_the_torch_delta(dtype):
    from model_merging_methods.mergekit_fused import random_l1_sums

    base, (model,) = _tensors(dtype, 1, seed=4, shape=(6, 40))
    common = dict(density=0.4, seed=3, model_index=1, name="w", element_offset=40)
    assert random_l1_sums(model, base=base, **common) == random_l1_sums(model - base, **common)
