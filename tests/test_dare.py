import numpy as np
import pytest
import torch

from model_merging_methods import apply_dare, merge_state_dicts
from model_merging_methods.dare import (
    MASK_BLOCK_SIZE,
    dare_delta,
    drop_and_rescale,
    drop_threshold,
    magnitude_drop,
    mask_tensor,
    name_hash,
    random_keep_mask,
)


def dare_reference(finetuned, base, p, *, rescale=True, **mask_source):
    """DARE as the paper writes it, in plain torch: the oracle the fast kernels are compared with."""
    delta = finetuned.float() - base.float()
    keep = random_keep_mask(delta.numel(), p, **mask_source).view(delta.shape)  # the same mask source
    return base.float() + delta * keep / torch.tensor(1 - p if rescale else 1.0)  # ft_out = base + m * delta / (1-p)


def _dare(x, p, *, rescale=True, name="w", seed=0, model_index=0, offset=0):
    return mask_tensor(x.clone(), drop_rate=p, use_weight_rescale=rescale, mask_strategy="random", seed=seed,
                       model_index=model_index, name=name, element_offset=offset)


def test_dare_kept_values_exact_and_dropped_exactly_zero():
    delta = torch.linspace(-1.0, 1.0, 10_000)
    out = _dare(delta, 0.9)
    kept = out != 0
    assert torch.equal(out[kept], delta[kept] / (1.0 - 0.9))
    assert torch.all(out[~kept] == 0)


def test_dare_ones_kept_are_ten_and_fraction_within_5_sigma():
    n, p = 100_000, 0.9
    out = _dare(torch.ones(n), p)
    assert set(out.unique().tolist()) <= {0.0, 10.0}
    kept = int((out != 0).sum())
    sigma = (n * p * (1 - p)) ** 0.5
    assert abs(kept - n * (1 - p)) < 5 * sigma
    assert abs(out.mean().item() - 1.0) < 0.1


def test_dare_drop_rate_half_doubles_survivors():
    delta = torch.tensor([0.25, -0.5, 1.0, 3.0] * 64)
    out = _dare(delta, 0.5)
    kept = out != 0
    assert torch.equal(out[kept], 2.0 * delta[kept])
    assert 0 < kept.sum() < delta.numel()


def test_dare_drop_rate_zero_is_identity():
    delta = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    assert torch.equal(_dare(delta, 0.0), delta)


def test_drop_only_keeps_values_unscaled():
    delta = torch.linspace(0.1, 1.0, 5000)
    out = _dare(delta, 0.7, rescale=False)
    kept = out != 0
    assert torch.equal(out[kept], delta[kept])
    assert torch.equal(_dare(delta, 0.7, rescale=True)[kept], delta[kept] / 0.3)  # same mask, rescaled


def test_mask_depends_only_on_seed_model_and_name():
    a = random_keep_mask(5000, 0.5, seed=3, model_index=1, name="layer.0.weight")
    # unrelated masks drawn in between do not change it
    random_keep_mask(777, 0.5, seed=3, model_index=1, name="other")
    torch.manual_seed(1234)
    b = random_keep_mask(5000, 0.5, seed=3, model_index=1, name="layer.0.weight")
    assert torch.equal(a, b)
    assert not torch.equal(a, random_keep_mask(5000, 0.5, seed=4, model_index=1, name="layer.0.weight"))
    assert not torch.equal(a, random_keep_mask(5000, 0.5, seed=3, model_index=0, name="layer.0.weight"))
    assert not torch.equal(a, random_keep_mask(5000, 0.5, seed=3, model_index=1, name="layer.1.weight"))


def test_mask_of_a_chunk_equals_the_slice_of_the_whole_mask():
    n = MASK_BLOCK_SIZE * 2 + 123
    whole = random_keep_mask(n, 0.3, seed=0, model_index=0, name="embed")
    for start, stop in [(0, 10), (MASK_BLOCK_SIZE - 5, MASK_BLOCK_SIZE + 5), (n - 100, n), (17, n - 17)]:
        chunk = random_keep_mask(stop - start, 0.3, seed=0, model_index=0, name="embed", element_offset=start)
        assert torch.equal(chunk, whole[start:stop])


def _reference_keep_mask(numel, p, *, seed, model_index, name):
    """The documented mask, written plainly with NumPy's Generator API (no fast paths)."""
    threshold = drop_threshold(p)
    keep = []
    for block in range((numel - 1) // MASK_BLOCK_SIZE + 1):
        count = min(MASK_BLOCK_SIZE, numel - block * MASK_BLOCK_SIZE)

        def gen(stream, block=block):
            return np.random.Generator(np.random.PCG64(np.random.SeedSequence(
                [seed, model_index, name_hash(name), block, stream])))

        top = gen(0).integers(0, 256, size=count, dtype=np.uint8).astype(np.int64)
        low = iter(gen(1).integers(0, 1 << 24, size=int((top == threshold >> 24).sum()), dtype=np.uint32).tolist())
        u32 = [(t << 24) | next(low) if t == threshold >> 24 else t << 24 | 0xFFFFFF for t in top.tolist()]
        keep += [u >= threshold for u in u32]
    return torch.tensor(keep)


@pytest.mark.parametrize("p", [0.37, 0.9, 0.5])
def test_mask_equals_the_documented_definition(p):
    n = MASK_BLOCK_SIZE + 3001  # two blocks, the second partial
    expected = _reference_keep_mask(n, p, seed=5, model_index=2, name="model.layers.0.mlp.up_proj.weight")
    got = random_keep_mask(n, p, seed=5, model_index=2, name="model.layers.0.mlp.up_proj.weight")
    assert torch.equal(got, expected)


@pytest.mark.parametrize("offset", [0, 70_001, MASK_BLOCK_SIZE - 10])
def test_fused_dare_delta_equals_subtract_then_mask(offset):
    g = torch.Generator().manual_seed(0)
    shape = (301, 700)  # not a multiple of the cache slice nor of the mask block
    base = torch.randn(shape, generator=g)
    finetuned = (base + 0.01 * torch.randn(shape, generator=g)).bfloat16()
    kw = {"seed": 1, "model_index": 1, "name": "w", "element_offset": offset}
    for rescale in (True, False):
        fused = dare_delta(finetuned, base, drop_rate=0.9, use_weight_rescale=rescale, **kw)
        plain = mask_tensor(finetuned.float() - base, drop_rate=0.9, use_weight_rescale=rescale,
                            mask_strategy="random", **kw)
        assert torch.equal(fused, plain)
        assert fused.dtype == torch.float32 and fused.shape == shape


def test_merge_masks_independent_of_visiting_order_and_other_tensors():
    g = torch.Generator().manual_seed(0)
    base = {n: torch.zeros(50) for n in ["a", "b", "c"]}
    ft = [{n: torch.randn(50, generator=g) for n in base} for _ in range(2)]
    hp = dict(mask_apply_method="task_arithmetic", weight_mask_rate=0.5, seed=7)
    full = merge_state_dicts("mask_merging", base, ft, **hp)
    reordered = merge_state_dicts("mask_merging", {n: base[n] for n in "cba"}, [{n: f[n] for n in "cba"} for f in ft],
                                  **hp)
    subset = merge_state_dicts("mask_merging", {"b": base["b"]}, [{"b": f["b"]} for f in ft], **hp)
    for name in base:
        assert torch.equal(full[name], reordered[name])
    assert torch.equal(full["b"], subset["b"])


def test_apply_dare_equals_model_preprocessing_inside_mask_merging():
    g = torch.Generator().manual_seed(1)
    base = {"w": torch.randn(300, generator=g)}
    fts = [{"w": base["w"] + torch.randn(300, generator=g)} for _ in range(2)]
    single = apply_dare(base, fts[1], weight_mask_rate=0.6, seed=5, model_index=1)
    merged = merge_state_dicts("mask_merging", base, fts, mask_apply_method="task_arithmetic",
                               weight_mask_rate=[0.0, 0.6], seed=5, scaling_coefficient=1.0)
    # with model 0 undropped: merged = base + delta_0 + DARE(delta_1) = single + delta_0
    torch.testing.assert_close(merged["w"], single["w"] + (fts[0]["w"] - base["w"]), rtol=0, atol=1e-6)


def test_magnitude_drop_hand_computed():
    x = torch.tensor([0.1, -0.4, 0.3, -0.2, 0.5, 0.0, -0.6, 0.05])
    # k = int(8 * 0.5) = 4; sorted |x| = [0, .05, .1, .2, .3, .4, .5, .6] -> 4th = 0.2; drop |x| <= 0.2
    out = magnitude_drop(x.clone(), drop_rate=0.5)
    assert torch.equal(out, torch.tensor([0.0, -0.4, 0.3, 0.0, 0.5, 0.0, -0.6, 0.0]))
    # with rescale: survivors / (1 - 0.5)
    assert torch.equal(magnitude_drop(x.clone(), drop_rate=0.5, use_weight_rescale=True), out * 2)


def test_magnitude_drop_ties_are_dropped():
    x = torch.tensor([0.2, 0.2, 0.2, 0.9])
    # k = int(4 * 0.25) = 1 -> 1st smallest = 0.2, every |x| <= 0.2 goes: 3 entries, not 1
    assert torch.equal(magnitude_drop(x.clone(), drop_rate=0.25), torch.tensor([0.0, 0.0, 0.0, 0.9]))


def test_magnitude_drop_k_zero_leaves_tensor_unchanged():
    x = torch.tensor([0.3, -0.1])
    assert torch.equal(magnitude_drop(x.clone(), drop_rate=0.4), x)  # int(2 * 0.4) = 0


def test_finetuned_weight_format_masks_weights_not_deltas():
    base = {"w": torch.tensor([1.0, 1.0, 1.0, 1.0])}
    ft = {"w": torch.tensor([0.1, -0.4, 0.3, -0.2])}
    out = apply_dare(base, ft, weight_mask_rate=0.5, mask_strategy="magnitude", use_weight_rescale=False,
                     weight_format="finetuned_weight")
    # magnitude on the fine-tuned weights: k = 2, 2nd smallest |w| = 0.2 -> drop 0.1 and -0.2
    # (computed as base + (masked - base): equal up to one float32 rounding)
    torch.testing.assert_close(out["w"], torch.tensor([0.0, -0.4, 0.3, 0.0]), rtol=0, atol=1e-7)
    assert out["w"][0] == 0 and out["w"][3] == 0
    delta_out = apply_dare(base, ft, weight_mask_rate=0.5, mask_strategy="magnitude", use_weight_rescale=False)
    # on deltas [-0.9, -1.4, -0.7, -1.2]: drop |d| <= 0.9 -> base + [0, -1.4, 0, -1.2]
    torch.testing.assert_close(delta_out["w"], torch.tensor([1.0, -0.4, 1.0, -0.2]))


def test_drop_and_rescale_in_place_with_given_mask():
    delta = torch.tensor([1.0, 2.0, 3.0, 4.0])
    out = drop_and_rescale(delta, torch.tensor([True, False, True, False]), drop_rate=0.5)
    assert torch.equal(out, torch.tensor([2.0, 0.0, 6.0, 0.0]))


@pytest.mark.parametrize("rate", [1.0, -0.1, 1.5, float("nan")])
def test_bad_drop_rates_are_rejected(rate):
    with pytest.raises(ValueError, match="weight_mask_rate must be in \\[0, 1\\)"):
        apply_dare({"w": torch.zeros(2)}, {"w": torch.ones(2)}, weight_mask_rate=rate)


def test_dare_over_several_slices_and_blocks_equals_plain_formula():
    n = MASK_BLOCK_SIZE + 3 * 2**18 + 5  # crosses mask blocks and the fused loop's slices, ends mid-slice
    delta = torch.randn(n, generator=torch.Generator().manual_seed(0))
    keep = random_keep_mask(n, 0.9, seed=2, model_index=1, name="w", element_offset=77)
    expected = torch.from_numpy(delta.numpy() * keep.numpy() / np.float32(0.1))
    got = mask_tensor(delta.clone(), drop_rate=0.9, use_weight_rescale=True, mask_strategy="random", seed=2,
                      model_index=1, name="w", element_offset=77)
    assert torch.equal(got, expected)


def test_equal_byte_positions_matches_numpy():
    from model_merging_methods.dare_kernels import equal_byte_positions

    rng = np.random.default_rng(0)
    words = rng.integers(0, 1 << 64, size=4001, dtype=np.uint64)
    data = words.view(np.uint8)
    for byte in (0, 7, 0xE6, 255):
        for count in (data.size, data.size - 5, 13, 0):
            expected = np.flatnonzero(data[:count] == byte)
            assert np.array_equal(equal_byte_positions(words, byte, count), expected)
    same = np.full(3, 0xE6E6E6E6E6E6E6E6, dtype=np.uint64)  # every byte matches
    assert np.array_equal(equal_byte_positions(same, 0xE6, 21), np.arange(21))
    past_the_end = np.zeros(2, dtype=np.uint64)
    past_the_end.view(np.uint8)[13] = 0xE6  # a match just past ``count`` is not reported
    assert equal_byte_positions(past_the_end, 0xE6, 13).size == 0


def _bits_equal(a: np.ndarray, b: np.ndarray) -> bool:
    """Same float32 bit patterns (signed zeros included); any NaN matches any NaN."""
    nan = np.isnan(a)
    return np.array_equal(nan, np.isnan(b)) and np.array_equal(a[~nan].view(np.uint32), b[~nan].view(np.uint32))


@pytest.mark.parametrize("finetuned_dtype", [torch.bfloat16, torch.float32, torch.float16])
@pytest.mark.parametrize("rescale", [True, False])
def test_compiled_dare_bit_identical_to_plain_formula_with_special_values(finetuned_dtype, rescale):
    n, p, offset = MASK_BLOCK_SIZE + 4099, 0.9, 12_345
    g = torch.Generator().manual_seed(3)
    base = torch.randn(n, generator=g)
    finetuned = base + 0.01 * torch.randn(n, generator=g)
    special = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 0.0, 1e-40, -1e-40, 3e38, -3e38])
    finetuned[: special.numel()] = special
    base[special.numel(): 2 * special.numel()] = special
    finetuned = finetuned.to(finetuned_dtype)
    keep = random_keep_mask(n, p, seed=4, model_index=1, name="w", element_offset=offset).numpy()
    with np.errstate(invalid="ignore", over="ignore"):
        delta = finetuned.float().numpy() - base.numpy()
        expected = delta * keep
        if rescale:
            expected = expected / np.float32(1 - p)
    kw = {"drop_rate": p, "use_weight_rescale": rescale, "seed": 4, "model_index": 1, "name": "w",
          "element_offset": offset}
    fused = dare_delta(finetuned, base, **kw)
    in_place = mask_tensor(torch.from_numpy(delta.copy()), mask_strategy="random", **kw)
    assert _bits_equal(fused.numpy(), expected)
    assert _bits_equal(in_place.numpy(), expected)


@pytest.mark.parametrize("finetuned_dtype", [torch.bfloat16, torch.float32, torch.float16])
@pytest.mark.parametrize("rescale", [True, False])
def test_fast_kernels_equal_dare_reference(finetuned_dtype, rescale):
    n, p, offset = MASK_BLOCK_SIZE + 2**18 + 7, 0.9, 4_321  # two mask blocks, several compiled slices
    g = torch.Generator().manual_seed(11)
    base = torch.randn(n, generator=g)
    finetuned = (base + 0.01 * torch.randn(n, generator=g)).to(finetuned_dtype)
    finetuned[:4] = torch.tensor([float("nan"), float("inf"), -0.0, 1e-40])
    source = {"seed": 6, "model_index": 2, "name": "model.layers.3.mlp.down_proj.weight"}
    expected = dare_reference(finetuned, base, p, rescale=rescale, element_offset=offset, **source).numpy()
    kw = {"drop_rate": p, "use_weight_rescale": rescale, "element_offset": offset, **source}
    fused = dare_delta(finetuned, base, **kw)  # bfloat16: the fused compiled loop; else subtract + compiled mask
    in_place = mask_tensor(finetuned.float() - base, mask_strategy="random", **kw)
    with np.errstate(invalid="ignore"):
        assert _bits_equal((base + fused).numpy(), expected)
        assert _bits_equal((base + in_place).numpy(), expected)
    if finetuned_dtype == torch.float32:  # whole tensors (offset 0) through the public API
        whole = dare_reference(finetuned, base, p, rescale=rescale, **source).numpy()
        out = apply_dare({source["name"]: base}, {source["name"]: finetuned}, weight_mask_rate=p,
                         use_weight_rescale=rescale, seed=source["seed"], model_index=source["model_index"])
        assert _bits_equal(out[source["name"]].numpy(), whole)


def test_kernels_compile_without_a_writable_cache_folder(monkeypatch):
    import numba

    from model_merging_methods import dare_kernels

    def no_cache_folder(**options):
        if options.get("cache"):
            raise RuntimeError("cannot cache function 'f': no locator available for file 'f.py'")
        return numba.njit(**options)

    monkeypatch.setattr(dare_kernels, "_njit", no_cache_folder)

    @dare_kernels.njit(nogil=True, cache=True)
    def add_one(x):
        return x + 1

    assert add_one(41) == 42


def test_dare_accepts_parameters_that_require_grad():
    g = torch.Generator().manual_seed(0)
    base = torch.nn.Parameter(torch.randn(64, 32, generator=g))
    finetuned = torch.nn.Parameter((base.detach() + 0.01 * torch.randn(64, 32, generator=g)).bfloat16())
    kw = {"drop_rate": 0.5, "use_weight_rescale": True, "seed": 0, "model_index": 0, "name": "w"}
    got = dare_delta(finetuned, base, **kw)
    expected = mask_tensor(finetuned.detach().float() - base.detach(), mask_strategy="random", **kw)
    assert torch.equal(got, expected)


def test_missing_numba_is_a_clear_error(monkeypatch):
    import sys

    monkeypatch.delitem(sys.modules, "model_merging_methods.dare_kernels", raising=False)
    monkeypatch.setitem(sys.modules, "numba", None)  # "import numba" now fails as if it were not installed
    with pytest.raises(ModuleNotFoundError, match="pip install -r requirements.txt"):
        random_keep_mask(10, 0.5, seed=0, model_index=0, name="w")


# --- the rescale factor (DAREx's 1/q) --------------------------------------------------------------------------


def test_rescale_factor_of_one_over_keep_rate_is_dare_bit_for_bit():
    torch.manual_seed(0)
    base = {"w": torch.randn(5000), "v": torch.randn(40, 30)}
    finetuned = {k: v + 0.01 * torch.randn_like(v) for k, v in base.items()}
    for p in (0.5, 0.9, 0.99):
        dare = apply_dare(base, finetuned, weight_mask_rate=p, seed=3)
        same = apply_dare(base, finetuned, weight_mask_rate=p, seed=3, rescale_factor=1 / (1 - p))
        assert all(torch.equal(dare[k], same[k]) for k in base), p


@pytest.mark.parametrize("strategy", ["random", "magnitude"])
def test_rescale_factor_scales_the_kept_deltas(strategy):
    torch.manual_seed(1)
    base = {"w": torch.randn(4000)}
    finetuned = {"w": base["w"] + 0.01 * torch.randn(4000)}
    drop_only = apply_dare(base, finetuned, weight_mask_rate=0.9, use_weight_rescale=False, mask_strategy=strategy)
    scaled = apply_dare(base, finetuned, weight_mask_rate=0.9, mask_strategy=strategy, rescale_factor=4.0)
    kept, scaled_delta = drop_only["w"] - base["w"], scaled["w"] - base["w"]
    assert torch.equal(kept == 0, scaled_delta == 0)  # the same mask
    torch.testing.assert_close(scaled_delta, 4.0 * kept, rtol=1e-5, atol=1e-7)


def test_rescale_factor_is_checked():
    from model_merging_methods import Dare

    with pytest.raises(ValueError, match="rescale_factor .* without use_weight_rescale"):
        Dare(0.9, use_weight_rescale=False, rescale_factor=5.0)
    with pytest.raises(ValueError, match="rescale_factor must be > 0"):
        Dare(0.9, rescale_factor=0.0)
    assert "rescale_factor" not in Dare(0.9).settings()  # unset: the paper's rescale, names as before
    assert Dare(0.9, rescale_factor=5.0).settings()["rescale_factor"] == 5.0
