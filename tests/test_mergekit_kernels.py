"""mergekit 0.1.5's per-tensor maths (``model_merging_methods.mergekit_methods``): hand-computed cases, then parity
with mergekit's own functions when ``mergekit`` is importable (skipped otherwise)."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from model_merging_methods.dare import MASK_BLOCK_SIZE, random_keep_mask
from model_merging_methods.mergekit_methods import (
    GTA_METHODS,
    bernoulli,
    della_keep_probabilities,
    della_magprune,
    generalized_task_arithmetic,
    gta_merge,
    keyed_uniforms,
    linear,
    magnitude,
    magnitude_outliers,
    model_stock,
    nuslerp,
    passthrough,
    rescale_masked,
    slerp,
    sparsify,
)

SQRT_HALF = math.sqrt(0.5)


def t(*values: float, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype)


# ---------------------------------------------------------------- magnitude (TIES trim)


def test_magnitude_keeps_exactly_top_k():
    delta = t(0.5, -2.0, 1.0, -0.25, 3.0, 0.75)
    # N = 6; density 0.5 -> k = int(3.0) = 3: |3.0| (i4), |-2.0| (i1), |1.0| (i2)
    assert torch.equal(magnitude(delta, 0.5), t(0.0, -2.0, 1.0, 0.0, 3.0, 0.0))
    # density 0.4 -> k = int(2.4) = 2
    assert torch.equal(magnitude(delta, 0.4), t(0.0, -2.0, 0.0, 0.0, 3.0, 0.0))
    # density 0.1 -> int(0.6) = 0 -> k = max(1, 0) = 1: the largest survives
    assert torch.equal(magnitude(delta, 0.1), t(0.0, 0.0, 0.0, 0.0, 3.0, 0.0))


def test_magnitude_density_bounds():
    delta = t(1.0, -2.0)
    assert magnitude(delta, 1.0) is delta  # density >= 1: unchanged, not even copied
    assert torch.equal(magnitude(delta, 0.0), t(0.0, 0.0))
    assert torch.equal(magnitude(delta, -0.5, rescale="l1"), t(0.0, 0.0))


def test_magnitude_ties_keep_lower_index():
    # |delta| = 2 at flat indices 0, 2, 3; k = int(0.5 * 4) = 2 keeps indices 0 and 2
    assert torch.equal(magnitude(t(2.0, 1.0, -2.0, 2.0), 0.5), t(2.0, 0.0, -2.0, 0.0))
    # the same by flat index in 2-D
    square = torch.tensor([[2.0, 1.0], [-2.0, 2.0]])
    assert torch.equal(magnitude(square, 0.5), torch.tensor([[2.0, 0.0], [-2.0, 0.0]]))
    # 100 equal values (long enough for torch's unstable sort to scramble them): k = 30 keeps indices 0..29
    assert torch.equal(magnitude(torch.ones(100), 0.3) != 0, torch.arange(100) < 30)


def test_l1_rescale_and_inverse_keep_on_a_known_mask():
    delta = t(4.0, -1.0, 2.0, -3.0)
    # k = 2 keeps 4 and -3; ||delta||_1 = 10, ||kept||_1 = 7
    assert torch.equal(magnitude(delta, 0.5, rescale="none"), t(4.0, 0.0, 0.0, -3.0))
    # L1 matching: x 10/7 -> [40/7, 0, 0, -30/7] = [5.7142857, 0, 0, -4.2857143]
    assert_close(magnitude(delta, 0.5, rescale="l1"), t(40 / 7, 0.0, 0.0, -30 / 7))
    # inverse keep: / density 0.5 -> [8, 0, 0, -6], exactly
    assert torch.equal(magnitude(delta, 0.5, rescale="inverse_keep"), t(8.0, 0.0, 0.0, -6.0))


def test_l1_rescale_skipped_below_threshold():
    # ||delta||_1 = 1e-8 < 1e-7: the masked tensor comes back unscaled
    delta = t(4e-9, -1e-9, 2e-9, -3e-9)
    assert torch.equal(magnitude(delta, 0.5, rescale="l1"), t(4e-9, 0.0, 0.0, -3e-9))
    # ||delta||_1 = 1 but ||masked||_1 = 5e-8 < 1e-7: unscaled too (instead of x 2e7)
    assert torch.equal(rescale_masked(t(1.0, 5e-8), t(0.0, 1.0), "l1", 0.5), t(0.0, 5e-8))


def test_unknown_rescale_is_rejected():
    with pytest.raises(ValueError, match="unknown rescale 'l2'"):
        rescale_masked(t(1.0), t(1.0), "l2", 1.0)


# ---------------------------------------------------------------- magnitude_outliers (breadcrumbs)

OUTLIER_DELTA = (0.3, -0.8, 0.1, 0.6, -0.5, 0.2, 0.7, -0.4)
# ascending |delta|: 0.1 (i2), 0.2 (i5), 0.3 (i0), 0.4 (i7), 0.5 (i4), 0.6 (i3), 0.7 (i6), 0.8 (i1)


def test_magnitude_outliers_drops_top_and_bottom():
    # N = 8, density 0.5, gamma 0.25: target 4, n_top 2, n_bot = 8 - 4 - 2 = 2 -> ascending[2:6] = i0, i7, i4, i3
    out = magnitude_outliers(t(*OUTLIER_DELTA), 0.5, gamma=0.25)
    assert torch.equal(out, t(0.3, 0.0, 0.0, 0.6, -0.5, 0.0, 0.0, -0.4))


def test_magnitude_outliers_with_no_outliers_equals_magnitude():
    # gamma 0.01: n_top = int(0.08) = 0, n_bot = 4 -> ascending[4:8] = i4, i3, i6, i1 (0.1.4 zeroed the tensor here)
    delta = t(*OUTLIER_DELTA)
    out = magnitude_outliers(delta, 0.5, gamma=0.01)
    assert torch.equal(out, t(0.0, -0.8, 0.0, 0.6, -0.5, 0.0, 0.7, 0.0))
    assert torch.equal(out, magnitude(delta, 0.5))


def test_magnitude_outliers_shrinks_the_outlier_cut():
    # density 0.75, gamma 0.5: target 6, n_top 4, n_bot = max(0, 8 - 6 - 4) = 0 -> ascending[0:6]: only 2 outliers go
    out = magnitude_outliers(t(*OUTLIER_DELTA), 0.75, gamma=0.5)
    assert torch.equal(out, t(0.3, 0.0, 0.1, 0.6, -0.5, 0.2, 0.0, -0.4))


def test_magnitude_outliers_density_bounds_and_ties():
    delta = t(*OUTLIER_DELTA)
    assert magnitude_outliers(delta, 1.0) is delta
    assert torch.equal(magnitude_outliers(delta, 0.1), torch.zeros(8))  # target = int(0.8) = 0
    # all equal: the lower index ranks larger, so ascending = i3, i2, i1, i0; target 2, n_top 1, n_bot 1 -> i2, i1
    assert torch.equal(magnitude_outliers(t(1.0, 1.0, 1.0, 1.0), 0.5, gamma=0.25), t(0.0, 1.0, 1.0, 0.0))
    # 100 equal values, density 0.3, gamma 0.1: target 30, n_top 10, n_bot 60 -> the 10 lowest indices are the
    # outliers and indices 10..39 are kept
    kept = magnitude_outliers(torch.ones(100), 0.3, gamma=0.1) != 0
    assert torch.equal(kept, (torch.arange(100) >= 10) & (torch.arange(100) < 40))


def test_magnitude_outliers_inverse_keep_divides_by_density():
    # the 0.5/0.25 case above, / 0.5
    out = magnitude_outliers(t(*OUTLIER_DELTA), 0.5, gamma=0.25, rescale="inverse_keep")
    assert torch.equal(out, t(0.6, 0.0, 0.0, 1.2, -1.0, 0.0, 0.0, -0.8))


def test_breadcrumbs_gamma_defaults_to_0_01_in_gta():
    # N = 200, density 0.5: target 100; gamma 0.01 -> n_top 2 (the two largest go), gamma 0 -> n_top 0
    delta = torch.arange(1.0, 201.0)
    kept = gta_merge("breadcrumbs", torch.zeros(200), [delta], weights=[1.0], densities=[0.5]) != 0
    assert torch.equal(kept, (delta > 98) & (delta <= 198))
    kept = gta_merge("breadcrumbs", torch.zeros(200), [delta], weights=[1.0], densities=[0.5], gammas=[None]) != 0
    assert torch.equal(kept, (delta > 98) & (delta <= 198))
    kept = gta_merge("breadcrumbs", torch.zeros(200), [delta], weights=[1.0], densities=[0.5], gammas=[0.0]) != 0
    assert torch.equal(kept, delta > 100)


# ---------------------------------------------------------------- random (DARE)

KEY = {"seed": 7, "model_index": 1, "name": "model.layers.0.mlp.up_proj.weight"}


def test_bernoulli_uses_the_keyed_dare_mask():
    delta = torch.arange(1.0, 9.0)
    keep = random_keep_mask(8, 0.5, **KEY)  # float32(0.5) = 0.5 -> drop rate 0.5
    assert torch.equal(bernoulli(delta, 0.5, **KEY), delta * keep)
    # inverse keep: survivors / 0.5 = x 2, exactly
    assert torch.equal(bernoulli(delta, 0.5, rescale="inverse_keep", **KEY), delta * keep * 2)


def test_bernoulli_density_bounds():
    delta = t(1.0, -2.0, 3.0)
    assert bernoulli(delta, 1.0, **KEY) is delta
    for rescale in ("none", "l1", "inverse_keep"):  # no 0/0
        assert torch.equal(bernoulli(delta, 0.0, rescale=rescale, **KEY), torch.zeros(3))


def test_bernoulli_keep_probability_is_density_in_the_work_dtype():
    # bfloat16 (CPU work dtype bfloat16): density 0.3 -> 0.30078125; survivors 1 / 0.30078125 = 3.3246753
    # -> bfloat16 3.328125 (neighbours 3.3125 and 3.328125, spacing 2**-6)
    out = bernoulli(torch.ones(4096, dtype=torch.bfloat16), 0.3, rescale="inverse_keep", **KEY)
    assert out.dtype == torch.bfloat16
    assert set(out.unique().tolist()) == {0.0, 3.328125}
    keep = random_keep_mask(4096, 1 - 0.30078125, **KEY)
    assert torch.equal(out != 0, keep)


def test_bernoulli_kept_fraction_within_five_sigma():
    n, density = 100_000, 0.3
    kept = int((bernoulli(torch.ones(n), density, **KEY) != 0).sum())
    # binomial: mean 30,000, sd sqrt(1e5 * 0.3 * 0.7) = 144.9 -> 5 sigma = 725
    assert abs(kept - n * density) <= 5 * math.sqrt(n * density * (1 - density))


def test_random_masks_do_not_depend_on_processing_order():
    deltas = {name: torch.randn(64, generator=torch.Generator().manual_seed(i)) for i, name in enumerate("ab")}
    jobs = [(name, index) for name in "ab" for index in range(2)]

    def run(order):
        return {(name, index): sparsify(deltas[name], 0.4, "random", rescale="l1", seed=3, model_index=index,
                                        name=name) for name, index in order}

    forward, backward = run(jobs), run(reversed(jobs))
    assert all(torch.equal(forward[job], backward[job]) for job in jobs)
    # ...and they differ between models and between tensor names
    assert not torch.equal(forward[("a", 0)] != 0, forward[("a", 1)] != 0)
    assert not torch.equal(forward[("a", 0)] != 0, forward[("b", 0)] != 0)


def test_sparsify_random_needs_its_key():
    with pytest.raises(ValueError, match="seed, model_index and name"):
        sparsify(t(1.0, 2.0), 0.5, "random")
    with pytest.raises(ValueError, match="unknown sparsification 'topk'"):
        sparsify(t(1.0, 2.0), 0.5, "topk")


# ---------------------------------------------------------------- della_magprune

ROW = (0.3, -0.1, 0.4, 0.2)  # ascending ranks 3, 1, 4, 2


def test_della_probabilities_per_row():
    delta = torch.tensor([ROW, (-0.5, 0.6, 0.05, -0.7)])  # row 1: |x| .5 .6 .05 .7 -> ranks 2, 3, 1, 4
    # density 0.5, epsilon 0.1: p = (0.5 - 0.1) + 2 * 0.1 * (rank - 1) / (4 - 1)
    # -> ranks 1..4: 0.4, 0.4667, 0.5333, 0.6
    expected = torch.tensor([[8 / 15, 0.4, 0.6, 7 / 15], [7 / 15, 8 / 15, 0.4, 0.6]])
    assert_close(della_keep_probabilities(delta, 0.5, 0.1), expected)
    # a 1-D tensor is one row
    assert_close(della_keep_probabilities(t(*ROW), 0.5, 0.1), expected[0])


def test_della_ranks_along_dim_1_for_3d_tensors():
    delta = torch.tensor([[[0.1, -0.9], [0.3, 0.5], [0.2, 0.7]]])  # shape (1, 3, 2)
    # [0, :, 0] = .1 .3 .2 -> ranks 1, 3, 2 -> rank_norm 0, 1, 0.5; [0, :, 1] = .9 .5 .7 -> ranks 3, 1, 2
    # density 0.5, epsilon 0.1: p = 0.4 + 0.2 * rank_norm
    expected = torch.tensor([[[0.4, 0.6], [0.6, 0.4], [0.5, 0.5]]])
    assert_close(della_keep_probabilities(delta, 0.5, 0.1), expected)


def test_della_ties_rank_the_lower_index_larger():
    # equal magnitudes: i0 > i1 > i2 -> ranks 3, 2, 1 -> p = 0.6, 0.5, 0.4
    assert_close(della_keep_probabilities(t(1.0, -1.0, 1.0), 0.5, 0.1), t(0.6, 0.5, 0.4))


def test_della_with_a_fixed_draw_and_each_rescale():
    delta, uniforms = t(*ROW), torch.full((4,), 0.5, dtype=torch.float64)
    # p = 8/15, 0.4, 0.6, 7/15: u = 0.5 < p keeps i0 and i2
    assert torch.equal(della_magprune(delta, 0.5, 0.1, uniforms=uniforms), t(0.3, 0.0, 0.4, 0.0))
    # inverse keep (the paper's 1 / (1 - P_i)): 0.3 / (8/15) = 0.5625, 0.4 / 0.6 = 0.6667
    assert_close(della_magprune(delta, 0.5, 0.1, uniforms=uniforms, rescale="inverse_keep"),
                 t(0.5625, 0.0, 0.4 / 0.6, 0.0))
    # L1: ||delta||_1 = 1.0, ||kept||_1 = 0.7 -> x 1/0.7: 0.4286, 0.5714
    assert_close(della_magprune(delta, 0.5, 0.1, uniforms=uniforms, rescale="l1"), t(0.3 / 0.7, 0.0, 0.4 / 0.7, 0.0))


def test_della_bounds_error_names_density_and_epsilon():
    for density, epsilon in ((0.1, 0.1), (0.9, 0.1), (0.5, 0.6)):
        with pytest.raises(ValueError, match=rf"density={density}, epsilon={epsilon}"):
            della_magprune(t(*ROW), density, epsilon, uniforms=torch.zeros(4, dtype=torch.float64))
    # density >= 1 and <= 0 return before the epsilon check, as in mergekit
    delta = t(*ROW)
    assert della_magprune(delta, 1.0, 0.5) is delta
    assert torch.equal(della_magprune(delta, 0.0, 0.5), torch.zeros(4))


def test_della_needs_two_elements_along_dim_1():
    for shape in ((3, 1), (1,)):
        with pytest.raises(ValueError, match="at least 2 elements"):
            della_keep_probabilities(torch.ones(shape), 0.5, 0.1)


def test_della_keyed_draws():
    delta = torch.randn(4, 6, generator=torch.Generator().manual_seed(0))
    uniforms = keyed_uniforms(24, **KEY)
    assert uniforms.dtype == torch.float64 and bool(((uniforms >= 0) & (uniforms < 1)).all())
    assert torch.equal(della_magprune(delta, 0.5, 0.2, **KEY), della_magprune(delta, 0.5, 0.2, uniforms=uniforms))
    with pytest.raises(ValueError, match="seed, model_index and name"):
        della_magprune(delta, 0.5, 0.2)


def test_keyed_uniforms_depend_only_on_key_and_position():
    # a slice equals the same elements of a longer draw, also across a 2**20 block boundary
    assert torch.equal(keyed_uniforms(10, element_offset=5, **KEY), keyed_uniforms(20, **KEY)[5:15])
    whole = keyed_uniforms(MASK_BLOCK_SIZE + 2, **KEY)
    assert torch.equal(keyed_uniforms(4, element_offset=MASK_BLOCK_SIZE - 2, **KEY), whole[-4:])
    other_model = keyed_uniforms(20, **{**KEY, "model_index": 2})
    assert not torch.equal(other_model, keyed_uniforms(20, **KEY))
    assert keyed_uniforms(0, **KEY).numel() == 0


# ---------------------------------------------------------------- generalized task arithmetic


def test_gta_table_mirrors_the_0_1_5_registry():
    # (sparsifier, consensus, normalize, rescale, per-model defaults) as in mergekit 0.1.5 registry.py
    expected = {
        "task_arithmetic": (None, None, False, False, {"density": 1.0}),
        "ties": ("magnitude", "sum", True, False, {"density": 1.0}),
        "dare_ties": ("random", "sum", False, True, {"density": 1.0}),
        "dare_linear": ("random", None, False, True, {"density": 1.0}),
        "breadcrumbs": ("magnitude_outliers", None, False, False, {"density": 1.0, "gamma": 0.01}),
        "breadcrumbs_ties": ("magnitude_outliers", "sum", False, False, {"density": 1.0, "gamma": 0.01}),
        "della": ("della_magprune", "sum", True, True, {"density": 1.0, "epsilon": 0.15}),
        "della_linear": ("della_magprune", None, False, True, {"density": 1.0, "epsilon": 0.15}),
    }
    got = {name: (m.sparsification, m.consensus, m.default_normalize, m.default_rescale, dict(m.per_model_defaults))
           for name, m in GTA_METHODS.items()}
    assert got == expected
    assert dict(GTA_METHODS["ties"].shared_defaults) == {"int8_mask": False, "normalize": True, "rescale": False,
                                                         "lambda": 1.0}


def test_task_arithmetic_weights_normalize_and_lambda():
    base, m1, m2 = t(1.0, 2.0, 3.0), t(2.0, 2.0, 2.0), t(1.0, 3.0, 5.0)  # deltas [1, 0, -1] and [0, 1, 2]
    # weights 1, 0.5: mixed = [1, 0.5, 0]; lambda 2 -> [2, 1, 0]; + base -> [3, 3, 3]
    out = gta_merge("task_arithmetic", base, [m1, m2], weights=[1.0, 0.5], lambda_=2.0)
    assert torch.equal(out, t(3.0, 3.0, 3.0))
    # normalize: / (1 + 0.5) -> [2/3, 1/3, 0]; x 2 -> [4/3, 2/3, 0]; + base
    out = gta_merge("task_arithmetic", base, [m1, m2], weights=[1.0, 0.5], lambda_=2.0, normalize=True)
    assert_close(out, t(1 + 4 / 3, 2 + 2 / 3, 3.0))


def test_normalize_comes_before_lambda():
    # one model, delta 1, weight 3, lambda 1.7, float32: D = 3; (3 / 3) * 1.7 = float32(1.7) = 1.70000005;
    # the other order (3 * 1.7) / 3 = 5.1000004 / 3 = 1.70000017
    out = generalized_task_arithmetic(t(0.0), [t(1.0)], weights=[3.0], normalize=True, lambda_=1.7)
    assert torch.equal(out, t(1.7))
    assert not torch.equal(out, (t(3.0) * 1.7) / 3.0)


def test_ties_sign_election_zero_sum_elects_plus():
    base, m1, m2 = torch.zeros(3), t(1.0, -2.0, 0.5), t(-1.0, 2.0, 0.5)
    # column sums [0, 0, 1]: all elect +; col 0 keeps m1 (1 / 1), col 1 keeps m2 (2 / 1), col 2 both (1 / 2)
    out = gta_merge("ties", base, [m1, m2], weights=[1.0, 1.0])
    assert torch.equal(out, t(1.0, 2.0, 0.5))


def test_ties_trim_and_weighted_disjoint_mean():
    base = torch.zeros(4)
    m1, m2 = t(0.5, -0.1, 0.3, -0.4), t(0.2, 0.6, -0.3, -0.2)
    # density 0.5, k = 2: m1 keeps .5, -.4; m2 (|x| .2 .6 .3 .2) keeps .6, -.3
    # weights 2, 1: D1 = [1, 0, 0, -.8], D2 = [0, .6, -.3, 0]; sums [1, .6, -.3, -.8] -> + + - -
    # mixed [1, .6, -.3, -.8], divisor (weights of agreeing models) [2, 1, 1, 2] -> [.5, .6, -.3, -.4]
    out = gta_merge("ties", base, [m1, m2], weights=[2.0, 1.0], densities=[0.5, 0.5])
    assert_close(out, t(0.5, 0.6, -0.3, -0.4))


def test_consensus_count_differs_from_sum():
    base, models = t(0.0), [t(3.0), t(-1.0), t(-1.0)]
    # sum: 3 - 1 - 1 = 1 >= 0 elects +: only 3 agrees -> 3 / 1
    out = generalized_task_arithmetic(base, models, weights=[1.0] * 3, consensus="sum", normalize=True)
    assert torch.equal(out, t(3.0))
    # count: signs 1 - 1 - 1 = -1 elects -: (-1 - 1) / 2 = -1
    out = generalized_task_arithmetic(base, models, weights=[1.0] * 3, consensus="count", normalize=True)
    assert torch.equal(out, t(-1.0))


def test_divisor_zero_guards_with_consensus():
    # col 0: both deltas 0 -> no model agrees -> divisor 0 -> 1, mixed 0 -> base 5
    # col 1: deltas 1, -1 sum 0 -> + -> m1: 1 / 1 -> 6
    out = gta_merge("ties", t(5.0, 5.0), [t(5.0, 6.0), t(5.0, 4.0)], weights=[1.0, 1.0])
    assert torch.equal(out, t(5.0, 6.0))
    # weights 1, -1 on deltas 1, -1: D = [1, 1] both agree; divisor 1 + (-1) = 0 -> 1; mixed 2
    out = gta_merge("ties", t(0.0), [t(1.0), t(-1.0)], weights=[1.0, -1.0])
    assert torch.equal(out, t(2.0))


def test_divisor_zero_guards_without_consensus():
    # weights 1, -1 sum to 0 -> divisor 1: mixed = [1, 2] - [0.5, 0.5]
    out = gta_merge("task_arithmetic", t(0.0, 0.0), [t(1.0, 2.0), t(0.5, 0.5)], weights=[1.0, -1.0], normalize=True)
    assert torch.equal(out, t(0.5, 1.5))
    # |sum w| = 1e-9 < 1e-8 -> divisor 1: mixed = 2 * 1e-9 stays 2e-9 (not 2)
    out = gta_merge("task_arithmetic", t(0.0), [t(2.0)], weights=[1e-9], normalize=True)
    assert_close(out, t(2e-9))
    # 1e-7 is above the guard: 2e-7 / 1e-7 = 2
    out = gta_merge("task_arithmetic", t(0.0), [t(2.0)], weights=[1e-7], normalize=True)
    assert_close(out, t(2.0))


def test_weights_and_deltas_live_in_the_compute_dtype():
    # bfloat16: weight 0.3 -> 0.30078125; delta 3: 3 * 0.30078125 = 0.90234375 (231/256, exact in bfloat16), where
    # a float32 weight would give bfloat16(0.9) = 0.8984375
    out = gta_merge("task_arithmetic", t(0.0, dtype=torch.bfloat16), [t(3.0, dtype=torch.bfloat16)], weights=[0.3])
    assert out.dtype == torch.bfloat16 and out.item() == 0.90234375
    # float32 inputs, dtype bfloat16: 1.001 -> bfloat16 1.0, so the delta is 0
    out = gta_merge("task_arithmetic", t(1.0), [t(1.001)], weights=[1.0], dtype=torch.bfloat16)
    assert out.dtype == torch.bfloat16 and out.item() == 1.0
    # bfloat16 inputs, dtype float32: computed and returned in float32 (0.3 -> 0.30000001)
    out = gta_merge("task_arithmetic", t(0.0, dtype=torch.bfloat16), [t(1.0, dtype=torch.bfloat16)], weights=[0.3],
                    dtype=torch.float32)
    assert out.dtype == torch.float32 and torch.equal(out, t(0.3))


def test_gta_without_models_returns_base_and_validates_inputs():
    assert torch.equal(gta_merge("ties", t(1.0, 2.0), [], weights=[]), t(1.0, 2.0))
    with pytest.raises(ValueError, match="shapes differ"):
        gta_merge("ties", t(1.0, 2.0), [t(1.0)], weights=[1.0])
    with pytest.raises(ValueError, match="densities has 1 values for 2 models"):
        gta_merge("ties", t(1.0), [t(1.0), t(2.0)], weights=[1.0, 1.0], densities=[0.5])
    with pytest.raises(ValueError, match="ties has no parameter 'gamma'"):
        gta_merge("ties", t(1.0), [t(2.0)], weights=[1.0], gammas=[0.1])
    # a list of None means "not set" (mergekit's default where the method has the parameter)
    assert torch.equal(gta_merge("ties", t(1.0), [t(2.0)], weights=[1.0], gammas=[None]), t(2.0))
    with pytest.raises(ValueError, match="unknown task-arithmetic method 'slerp'"):
        gta_merge("slerp", t(1.0), [t(2.0)], weights=[1.0])


def test_dare_linear_is_keyed_dare_then_a_weighted_sum():
    base = torch.zeros(50)
    models = [torch.randn(50, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    key = {"seed": 11, "name": "w"}
    out = gta_merge("dare_linear", base, models, weights=[0.5, 2.0], densities=[0.3, 0.6], **key)
    # rescale (default True) = L1 matching per model
    expected = (0.5 * bernoulli(models[0], 0.3, model_index=0, rescale="l1", **key)
                + 2.0 * bernoulli(models[1], 0.6, model_index=1, rescale="l1", **key))
    assert torch.equal(out, expected)
    # model order: the mask follows the model index, not the position
    swapped = gta_merge("dare_linear", base, models[::-1], weights=[2.0, 0.5], densities=[0.6, 0.3],
                        model_indices=[1, 0], **key)
    assert torch.equal(swapped, out)


def test_della_linear_is_keyed_magprune_with_l1_rescale():
    base, model = torch.zeros(2, 8), torch.randn(2, 8, generator=torch.Generator().manual_seed(5))
    out = gta_merge("della_linear", base, [model], weights=[1.0], densities=[0.5], seed=1, name="w")
    # epsilon default 0.15, rescale default True (L1)
    assert torch.equal(out, della_magprune(model, 0.5, 0.15, seed=1, model_index=0, name="w", rescale="l1"))


# ---------------------------------------------------------------- linear, slerp, nuslerp, model_stock, passthrough


def test_linear_weighted_sum_and_normalize():
    tensors = [t(1.0, 2.0), t(3.0, 4.0), t(5.0, 6.0)]
    # 1*[1,2] + 2*[3,4] + 1*[5,6] = [12, 16]; / (1 + 2 + 1) = [3, 4]
    assert torch.equal(linear(tensors, [1.0, 2.0, 1.0]), t(3.0, 4.0))
    assert torch.equal(linear(tensors, [1.0, 2.0, 1.0], normalize=False), t(12.0, 16.0))


def test_linear_has_no_zero_weight_guard():
    # [1, 1] - [2, 1] = [-1, 0]; / 0 -> [-inf, nan], as in 0.1.5
    out = linear([t(1.0, 1.0), t(2.0, 1.0)], [1.0, -1.0])
    assert out[0].item() == -math.inf and math.isnan(out[1].item())


def test_linear_accumulates_in_float32():
    ones = [t(1.0, dtype=torch.bfloat16)] * 3
    # float32: 1 + 2**-8 + 2**-8 = 1.0078125 (a bfloat16 value); in bfloat16 steps 1 + 2**-8 would round to 1.0 twice
    out = linear(ones, [1.0, 2**-8, 2**-8], normalize=False)
    assert out.dtype == torch.bfloat16 and out.item() == 1.0078125


def test_slerp_orthogonal_vectors():
    a, b = t(1.0, 0.0), t(0.0, 1.0)
    assert torch.equal(slerp(0.0, a, b), a)  # sin(theta) / sin(theta) = 1 and sin(0) = 0 exactly
    assert torch.equal(slerp(1.0, a, b), b)
    # theta = pi/2: sin(pi/4) / sin(pi/2) = sqrt(1/2) for each
    assert_close(slerp(0.5, a, b), t(SQRT_HALF, SQRT_HALF))
    # magnitudes are interpolated, not normalised: [3, 0, 0] and [0, 4, 0] -> [3, 4, 0] * sqrt(1/2)
    assert_close(slerp(0.5, t(3.0, 0.0, 0.0), t(0.0, 4.0, 0.0)), t(3 * SQRT_HALF, 4 * SQRT_HALF, 0.0))
    # the whole matrix is one vector
    out = slerp(0.5, torch.tensor([[1.0, 0.0], [0.0, 0.0]]), torch.tensor([[0.0, 0.0], [0.0, 1.0]]))
    assert_close(out, torch.tensor([[SQRT_HALF, 0.0], [0.0, SQRT_HALF]]))


def test_slerp_colinear_and_antipodal_fall_back_to_lerp():
    # cos = 1 > 0.9995: 0.75 * [1, 2] + 0.25 * [2, 4] = [1.25, 2.5]
    assert torch.equal(slerp(0.25, t(1.0, 2.0), t(2.0, 4.0)), t(1.25, 2.5))
    # cos = -1: |cos| > 0.9995 too -> 0.75 * [1, 0] + 0.25 * [-1, 0]
    assert torch.equal(slerp(0.25, t(1.0, 0.0), t(-1.0, 0.0)), t(0.5, 0.0))
    # a zero vector counts as norm 1: dot 0 -> theta pi/2 -> sqrt(1/2) * b
    assert_close(slerp(0.5, t(0.0, 0.0), t(0.0, 2.0)), t(0.0, 2 * SQRT_HALF))


def test_slerp_returns_the_compute_dtype():
    out = slerp(0.5, t(1.0, 0.0, dtype=torch.bfloat16), t(0.0, 1.0, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16  # sqrt(1/2) = 0.70710677 -> bfloat16 0.70703125
    assert out.tolist() == [0.70703125, 0.70703125]


def test_nuslerp_weights_give_t():
    a, b = t(1.0, 0.0), t(0.0, 1.0)
    # weights 1, 1: t = 0.5
    assert_close(nuslerp(a, b, weights=[1.0, 1.0]), t(SQRT_HALF, SQRT_HALF))
    # weights 1, 3: t = 3/4 -> [sin(pi/8), sin(3 pi/8)] / sin(pi/2)
    assert_close(nuslerp(a, b, weights=[1.0, 3.0]), t(math.sin(math.pi / 8), math.sin(3 * math.pi / 8)))
    # weights summing to 0: t = 0.5
    assert_close(nuslerp(a, b, weights=[1.0, -1.0]), t(SQRT_HALF, SQRT_HALF))
    with pytest.raises(ValueError, match="exactly 2 models"):
        nuslerp(a, b, weights=[1.0])


def test_nuslerp_relative_to_base():
    # task vectors [1, 0] and [0, 1] from base [1, 1]
    out = nuslerp(t(2.0, 1.0), t(1.0, 2.0), weights=[1.0, 1.0], base=t(1.0, 1.0))
    assert_close(out, t(1 + SQRT_HALF, 1 + SQRT_HALF))


def test_nuslerp_flatten_rows_and_columns():
    a, b = torch.tensor([[1.0, 0.0], [1.0, 0.0]]), torch.tensor([[0.0, 1.0], [2.0, 0.0]])
    # per row (last dim): row 0 orthogonal -> sqrt(1/2) each; row 1 colinear -> lerp [1.5, 0]
    out = nuslerp(a, b, weights=[1.0, 1.0], nuslerp_flatten=False)
    assert_close(out, torch.tensor([[SQRT_HALF, SQRT_HALF], [1.5, 0.0]]))
    # per column (row_wise = dim 0): the transposed inputs give the transposed result
    out = nuslerp(a.T, b.T, weights=[1.0, 1.0], nuslerp_flatten=False, nuslerp_row_wise=True)
    assert_close(out, torch.tensor([[SQRT_HALF, 1.5], [SQRT_HALF, 0.0]]))
    # flattened (default): a = [1, 0, 1, 0], b = [0, 1, 2, 0]; cos = 2 / (sqrt 2 sqrt 5) = 2 / sqrt 10;
    # t = 0.5: sin(theta/2) / sin(theta) (a + b) = (a + b) / (2 cos(theta/2)), cos(theta/2) = sqrt((1 + cos) / 2)
    factor = 1 / (2 * math.sqrt((1 + 2 / math.sqrt(10)) / 2))
    assert_close(nuslerp(a, b, weights=[1.0, 1.0]), factor * torch.tensor([[1.0, 1.0], [3.0, 0.0]]))


def test_model_stock_known_angle():
    base = t(1.0, 1.0)
    w1, w2 = base + t(1.0, 0.0), base + t(0.5, math.sqrt(3) / 2)  # offsets 60 degrees apart: cos = 0.5
    # N = 2: t = 2 * 0.5 / (1 + 0.5) = 2/3; mean = [1.75, 1 + sqrt(3)/4]; 2/3 mean + 1/3 base = [1.5, 1 + sqrt(3)/6]
    assert_close(model_stock(base, [w1, w2]), t(1.5, 1 + math.sqrt(3) / 6))


def test_model_stock_filter_wise_and_singular():
    base = torch.zeros(2, 2)
    w1, w2 = torch.tensor([[1.0, 0.0], [1.0, 0.0]]), torch.tensor([[0.0, 1.0], [2.0, 0.0]])
    # row 0: cos 0 -> t = 0 -> base; row 1: cos 1 -> t = 2 / 2 = 1 -> mean [1.5, 0]
    assert_close(model_stock(base, [w1, w2], filter_wise=True), torch.tensor([[0.0, 0.0], [1.5, 0.0]]))
    # whole tensor: offsets [1, 0, 1, 0] and [0, 1, 2, 0]: cos = 2 / sqrt(10); t = 2c / (1 + c)
    c = 2 / math.sqrt(10)
    assert_close(model_stock(base, [w1, w2]), (2 * c / (1 + c)) * torch.tensor([[0.5, 0.5], [1.5, 0.0]]))
    # opposite offsets: 1 + (2 - 1) * (-1) = 0 -> t = 0 -> base
    assert torch.equal(model_stock(t(0.0, 0.0), [t(1.0, 0.0), t(-1.0, 0.0)]), t(0.0, 0.0))
    with pytest.raises(ValueError, match="at least 2 models"):
        model_stock(base, [w1])


def test_passthrough_scale_and_dtype():
    assert torch.equal(passthrough(t(1.0, 2.0), scale=0.5), t(0.5, 1.0))
    out = passthrough(t(1.001, 2.0), dtype=torch.bfloat16)
    assert out.dtype == torch.bfloat16 and out.tolist() == [1.0, 2.0]


# ---------------------------------------------------------------- parity with mergekit 0.1.5 (when installed)


@pytest.fixture
def mergekit():
    mergekit = pytest.importorskip("mergekit")
    from mergekit import merge_methods, sparsify  # noqa: F401  (submodules used through the package)

    return mergekit


def distinct(n: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """n values with distinct magnitudes (k/64, k = 1..n, random signs), exact in bfloat16 for n <= 256."""
    g = torch.Generator().manual_seed(seed)
    signs = torch.randint(0, 2, (n,), generator=g) * 2 - 1
    return ((torch.randperm(n, generator=g) + 1).float() / 64 * signs).to(dtype)


DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


@pytest.mark.parametrize("dtype", DTYPES)
def test_parity_deterministic_sparsifiers(mergekit, dtype):
    mk = mergekit.sparsify
    delta = distinct(120, dtype, seed=0).reshape(8, 15)
    for rescale, norm in (("none", None), ("l1", mk.RescaleNorm.l1)):
        for density in (0.05, 0.3, 0.5, 0.99):
            assert torch.equal(magnitude(delta, density, rescale=rescale), mk.magnitude(delta, density, norm))
            for gamma in (0.0, 0.005, 0.01, 0.1, 0.9):
                ours = magnitude_outliers(delta, density, gamma=gamma, rescale=rescale)
                assert torch.equal(ours, mk.magnitude_outliers(delta, density, norm, gamma=gamma))


@pytest.mark.parametrize("dtype", DTYPES)
def test_parity_random_sparsifiers_given_the_same_draws(mergekit, dtype, monkeypatch):
    mk = mergekit.sparsify
    for shape in ((120,), (8, 15), (3, 4, 10)):
        delta = distinct(120, dtype, seed=1).reshape(shape)
        uniforms = keyed_uniforms(120, **KEY)
        # mergekit's torch.bernoulli(p) replaced by the same uniforms: keep where u < p
        monkeypatch.setattr(torch, "bernoulli", lambda p, u=uniforms: (u.reshape(p.shape) < p.double()).to(p.dtype))
        for rescale, norm in (("none", None), ("l1", mk.RescaleNorm.l1)):
            ours = della_magprune(delta, 0.4, 0.15, rescale=rescale, **KEY)
            assert torch.equal(ours, mk.della_magprune(delta, 0.4, 0.15, rescale_norm=norm))
        # DARE: mergekit's keep mask replaced by ours (drop rate 1 - density in the work dtype)
        density = float(torch.tensor(0.3, dtype=torch.bfloat16 if dtype == torch.bfloat16 else torch.float32))
        keep = random_keep_mask(120, 1 - density, **KEY)
        monkeypatch.setattr(torch, "bernoulli", lambda p, keep=keep: keep.reshape(p.shape).to(p.dtype))
        ours = bernoulli(delta, 0.3, rescale="l1", **KEY)
        assert torch.equal(ours, mk.bernoulli(delta, 0.3, mk.RescaleNorm.l1))
        monkeypatch.undo()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method", sorted(GTA_METHODS))
def test_parity_gta_methods(mergekit, method, dtype, monkeypatch):
    from mergekit.merge_methods import merge_tensors

    n, name, seed = 120, "layers.0.w", 5
    base = torch.zeros(8, 15, dtype=dtype)
    models = [distinct(n, dtype, seed=10 + i).reshape(8, 15) for i in range(3)]
    weights, densities = [0.3, -0.5, 1.1], [0.5, 0.3, 0.7]
    # mergekit draws one mask per model in order; feed it our keyed draws for that model
    calls = iter(range(3))

    def fake_bernoulli(p):
        index = next(calls)
        if method.startswith("della"):
            u = keyed_uniforms(n, seed=seed, model_index=index, name=name).reshape(p.shape)
            return (u < p.double()).to(p.dtype)
        density = float(torch.tensor(densities[index], dtype=p.dtype))
        return random_keep_mask(n, 1 - density, seed=seed, model_index=index, name=name).reshape(p.shape).to(p.dtype)

    monkeypatch.setattr(torch, "bernoulli", fake_bernoulli)
    for options in ({}, {"normalize": True, "lambda": 0.7}, {"rescale": False, "normalize": False}):
        calls = iter(range(3))
        parameters = {"weight": weights, "density": densities, **options}
        expected = merge_tensors([base, *models], method, parameters=parameters, base_index=0)
        calls = iter(range(3))
        ours = gta_merge(method, base, models, weights=weights, densities=densities,
                         normalize=options.get("normalize"), rescale=options.get("rescale"),
                         lambda_=options.get("lambda", 1.0), seed=seed, name=name)
        assert ours.dtype == expected.dtype and torch.equal(ours, expected)


def test_parity_gta_table_with_the_registry(mergekit):
    from mergekit.merge_methods import registry

    for name, ours in GTA_METHODS.items():
        theirs = registry.get(name)
        assert ours.sparsification == (theirs.sparsification_method and theirs.sparsification_method.value)
        assert ours.consensus == (theirs.consensus_method and theirs.consensus_method.value)
        defaults = {p.name: p.default for p in theirs.spec.parameters if not p.required}
        assert defaults == {**ours.shared_defaults, **ours.per_model_defaults}
        assert [p.name for p in theirs.spec.parameters if p.required] == ["weight"]
        assert (ours.pretty_name, ours.reference_url) == (theirs.spec.pretty_name, theirs.spec.reference_url)


@pytest.mark.parametrize("dtype", [None, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("input_dtype", DTYPES)
def test_parity_linear_slerp_nuslerp_model_stock(mergekit, input_dtype, dtype):
    from mergekit.merge_methods import merge_tensors

    g = torch.Generator().manual_seed(0)
    base, *models = [torch.randn(6, 7, generator=g).to(input_dtype) for _ in range(4)]
    for normalize in (True, False):
        expected = merge_tensors(models, "linear", parameters={"weight": [0.3, 0.2, 0.9], "normalize": normalize},
                                 dtype=dtype)
        assert torch.equal(linear(models, [0.3, 0.2, 0.9], normalize=normalize, dtype=dtype), expected)
    for t_value in (0.0, 0.3, 1.0):
        expected = merge_tensors([base, models[0]], "slerp", parameters={"t": t_value}, base_index=0, dtype=dtype)
        assert torch.equal(slerp(t_value, base, models[0], dtype=dtype), expected)
    for flatten in (True, False):
        for row_wise in (True, False):
            parameters = {"weight": [0.3, 0.5], "nuslerp_flatten": flatten, "nuslerp_row_wise": row_wise}
            options = {"weights": [0.3, 0.5], "nuslerp_flatten": flatten, "nuslerp_row_wise": row_wise, "dtype": dtype}
            expected = merge_tensors([base, *models[:2]], "nuslerp", parameters=parameters, base_index=0, dtype=dtype)
            assert torch.equal(nuslerp(*models[:2], base=base, **options), expected)
            expected = merge_tensors(models[:2], "nuslerp", parameters=parameters, dtype=dtype)
            assert torch.equal(nuslerp(*models[:2], **options), expected)
    for filter_wise in (True, False):
        expected = merge_tensors([base, *models], "model_stock", parameters={"filter_wise": filter_wise},
                                 base_index=0, dtype=dtype)
        assert torch.equal(model_stock(base, models, filter_wise=filter_wise, dtype=dtype), expected)
    expected = merge_tensors([base], "passthrough", parameters={"scale": [0.7]}, dtype=dtype)
    assert torch.equal(passthrough(base, scale=0.7, dtype=dtype), expected)


def test_parity_slerp_over_several_chunks(mergekit):
    from mergekit.merge_methods import merge_tensors

    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(3, 800_000, generator=g), torch.randn(3, 800_000, generator=g)  # 2.4M elements: 3 slices
    expected = merge_tensors([a, b], "slerp", parameters={"t": 0.4}, base_index=0)
    assert torch.equal(slerp(0.4, a, b), expected)


def test_linear_time_top_k_equals_the_stable_sort_selection_with_ties():
    from model_merging_methods.mergekit_sparsify import _descending_order, top_k_mask

    generator = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        magnitudes = torch.randint(0, 20, (1000,), generator=generator).to(dtype) / 8  # many ties
        order = _descending_order(magnitudes, 0)
        for k in (0, 1, 7, 500, 999, 1000):
            expected = torch.zeros(1000, dtype=torch.bool)
            expected[order[:k]] = True
            assert torch.equal(top_k_mask(magnitudes, k), expected), (dtype, k)
