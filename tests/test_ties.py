import torch
from torch.testing import assert_close

from model_merging_methods import merge_state_dicts
from model_merging_methods.ties import KthSmallestAbs, disjoint_mean, elect_sign, ties_merging, trim


def test_trim_keeps_values_at_threshold():
    d = torch.tensor([[0.1, -0.2, 0.2, 0.5]])
    # threshold 0.2: keep |x| >= 0.2 (ties kept, as MergeLM)
    assert torch.equal(trim(d, [0.2]), torch.tensor([[0.0, -0.2, 0.2, 0.5]]))


def test_elect_sign_zero_column_gets_majority_sign():
    trimmed = torch.tensor([[0.5, -0.2, 0.3, 0.4], [0.1, -0.3, -0.3, 0.0]])
    # column sums [0.6, -0.5, 0.0, 0.4] -> signs [+, -, 0, +]; majority sign(+1 -1 +1) = +1 fills the zero
    assert torch.equal(elect_sign(trimmed), torch.tensor([1.0, -1.0, 1.0, 1.0]))
    assert torch.equal(elect_sign(trimmed, majority_sign=-1.0), torch.tensor([1.0, -1.0, -1.0, 1.0]))


def test_disjoint_mean_hand_computed():
    d1 = torch.tensor([0.5, -0.2, 0.0, 0.0])
    d2 = torch.tensor([0.0, 0.4, -0.3, 0.0])
    stacked = torch.stack([d1, d2])
    # column sums [0.5, 0.2, -0.3, 0.0] -> signs [+, +, -, majority(+)]
    # mean of entries agreeing with the sign (zeros never count): [0.5, 0.4, -0.3, 0.0]
    assert_close(disjoint_mean(stacked, elect_sign(stacked)), torch.tensor([0.5, 0.4, -0.3, 0.0]))


def test_ties_merging_per_tensor_hand_computed():
    base = torch.tensor([1.0, 1.0, 1.0, 1.0])
    d1 = torch.tensor([0.5, -0.1, 0.3, -0.4])
    d2 = torch.tensor([0.2, 0.6, -0.3, -0.2])
    # rate 0.5 -> k = 2; model 1: sorted |d| [.1,.3,.4,.5] kth = .3 -> keep [.5, 0, .3, -.4]
    #                     model 2: sorted |d| [.2,.2,.3,.6] kth = .2 -> keep all (ties kept)
    # sums [.7, .6, 0, -.6] -> signs [+, +, majority(+1+1-1 => +), -]
    # agreeing: col0 (.5,.2) -> .35 ; col1 (.6) -> .6 ; col2 (.3) -> .3 ; col3 (-.4,-.2) -> -.3
    out = ties_merging(base, [d1, d2], param_value_mask_rate=0.5, scaling_coefficient=2.0)
    assert_close(out, base + 2.0 * torch.tensor([0.35, 0.6, 0.3, -0.3]))


def test_global_trim_uses_whole_model_threshold():
    base = {"a": torch.zeros(2), "b": torch.zeros(2)}
    ft = [{"a": torch.tensor([0.1, 0.2]), "b": torch.tensor([0.3, 0.4])}]
    # global: k = int(4 * 0.5) = 2 -> threshold 0.2 -> a = [0, .2], b untouched
    out = merge_state_dicts("ties_merging", base, ft, param_value_mask_rate=0.5)
    assert_close(out["a"], torch.tensor([0.0, 0.2]))
    assert_close(out["b"], torch.tensor([0.3, 0.4]))
    # per tensor: k = 1 in each -> thresholds 0.1 and 0.3 keep everything (ties kept)
    out = merge_state_dicts("ties_merging", base, ft, param_value_mask_rate=0.5, ties_trim_scope="per_tensor")
    assert_close(out["a"], torch.tensor([0.1, 0.2]))


def test_global_majority_sign_spans_tensors():
    base = {"a": torch.zeros(1), "b": torch.zeros(3)}
    ft = [{"a": torch.tensor([0.5]), "b": torch.tensor([-1.0, -1.0, -1.0])},
          {"a": torch.tensor([-0.5]), "b": torch.tensor([-1.0, -1.0, -1.0])}]
    # "a" sums to 0; globally signs are [0, -, -, -] -> majority -1 -> "a" keeps model 2's -0.5
    out = merge_state_dicts("ties_merging", base, ft, param_value_mask_rate=0.0)
    assert_close(out["a"], torch.tensor([-0.5]))
    # per tensor, "a" alone has no majority (sign 0): nothing agrees -> 0
    out = merge_state_dicts("ties_merging", base, ft, param_value_mask_rate=0.0, ties_trim_scope="per_tensor")
    assert_close(out["a"], torch.tensor([0.0]))


def test_kth_smallest_abs_radix_select_equals_kthvalue():
    g = torch.Generator().manual_seed(0)
    chunks = [torch.randn(1000, generator=g) * 1e-3, torch.randn(37, generator=g), torch.zeros(50),
              torch.tensor([5e-39, -5e-39, float("inf")])]
    values = torch.cat(chunks).abs()
    for k in [1, 2, 51, 500, 700, values.numel() - 1, values.numel()]:
        selector = KthSmallestAbs(k)
        for pass_index in range(2):
            for chunk in reversed(chunks):
                selector.update(pass_index, chunk)
            selector.finish_pass(pass_index)
        assert selector.value == values.kthvalue(k).values.item(), k
