import math

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from model_merging_methods import compute_fisher_weights, merge_state_dicts
from model_merging_methods.fisher import fisher_merging, fisher_model_coefficients


def test_fisher_merging_hand_computed():
    base = torch.tensor([0.0, 0.0])
    deltas = [torch.tensor([1.0, 2.0]), torch.tensor([3.0, 6.0])]
    fishers = [torch.tensor([1.0, 0.0]), torch.tensor([3.0, 0.0])]
    # eps = 0: col0 = (1*1 + 3*3) / (1 + 3) = 2.5 ; col1 has zero Fisher everywhere -> 0/0
    out = fisher_merging(base, deltas, fisher_weights=fishers, model_coefficients=[0.5, 0.5],
                         minimal_fisher_weight=1.0)
    # eps = 1: col0 = (.5*2*1 + .5*4*3) / (.5*2 + .5*4) = 7/3 ; col1 = (.5*1*2 + .5*1*6)/(.5+.5) = 4
    assert_close(out, torch.tensor([7.0 / 3.0, 4.0]))


def test_fisher_normalisation_coefficients_hand_computed():
    # global norms g = [1, 3], eps = 0: w = [1, 1/3] / (4/3) = [0.75, 0.25]; c = 1/2 each -> [0.375, 0.125]
    coefficients = fisher_model_coefficients(2, normalize_fisher_weight=True, minimal_fisher_weight=0.0,
                                             global_norms=[1.0, 3.0])
    assert coefficients == pytest.approx([0.375, 0.125])
    assert fisher_model_coefficients(2, normalize_fisher_weight=False) == [0.5, 0.5]


def test_fisher_merge_state_dicts_uses_global_norms_across_tensors():
    base = {"a": torch.zeros(1), "b": torch.zeros(1)}
    ft = [{"a": torch.tensor([1.0]), "b": torch.tensor([1.0])}, {"a": torch.tensor([5.0]), "b": torch.tensor([5.0])}]
    fw = [{"a": torch.tensor([3.0]), "b": torch.tensor([4.0])}, {"a": torch.tensor([1.0]), "b": torch.tensor([1.0])}]
    # norms: model 0 = sqrt(9 + 16) = 5, model 1 = sqrt(2); eps = 0
    g0, g1 = 5.0, math.sqrt(2.0)
    w0, w1 = (1 / g0) / (1 / g0 + 1 / g1), (1 / g1) / (1 / g0 + 1 / g1)
    expected_a = (w0 * 3 * 1 + w1 * 1 * 5) / (w0 * 3 + w1 * 1)
    out = merge_state_dicts("fisher_merging", base, ft, fisher_weights=fw, minimal_fisher_weight=0.0)
    assert out["a"].item() == pytest.approx(expected_a, rel=1e-6)
    # equal scaling coefficients cancel (MergeLM's grid over them is a no-op)
    same = merge_state_dicts("fisher_merging", base, ft, fisher_weights=fw, minimal_fisher_weight=0.0,
                             fisher_scaling_coefficients=[0.3, 0.3])
    assert_close(same["a"], out["a"])


def test_fisher_missing_name_is_rejected():
    base = {"a": torch.zeros(1), "b": torch.zeros(1)}
    ft = [dict(base), dict(base)]
    with pytest.raises(ValueError, match="fisher_weights\\[1\\] must cover every merged parameter"):
        merge_state_dicts("fisher_merging", base, ft, fisher_weights=[dict(base), {"a": torch.ones(1)}])
    with pytest.raises(ValueError, match="needs fisher_weights"):
        merge_state_dicts("fisher_merging", base, ft)


class _Head(nn.Module):
    def __init__(self, out_features):
        super().__init__()
        self.linear = nn.Linear(2, out_features)

    def forward(self, x):
        return type("Out", (), {"logits": self.linear(x)})()


def _loader(x, y, batch_size):
    return [{"x": x[i:i + batch_size], "labels": y[i:i + batch_size]} for i in range(0, len(x), batch_size)]


def test_compute_fisher_classification_matches_manual_gradient():
    torch.manual_seed(0)
    model = _Head(3)
    x, y = torch.randn(4, 2), torch.tensor([0, 1, 2, 1])
    fisher = compute_fisher_weights(model, _loader(x, y, 2), num_examples=4)
    assert model.linear.weight.grad is None  # gradients cleared afterwards
    expected = torch.zeros_like(model.linear.weight)
    for i in range(0, 4, 2):
        model.zero_grad()
        logits = model.linear(x[i:i + 2])
        p = torch.softmax(logits, -1).detach()
        (p.sqrt() * torch.log_softmax(logits, -1)).sum().backward()
        expected += model.linear.weight.grad ** 2
    assert_close(fisher["linear.weight"], expected / 4)


def test_compute_fisher_regression_uses_mse_and_counts_nominal_batches():
    torch.manual_seed(0)
    model = _Head(1)
    x, y = torch.randn(6, 2), torch.randn(6)
    fisher = compute_fisher_weights(model, _loader(x, y, 4), num_examples=3)  # one batch of 4 counted
    model.zero_grad()
    nn.functional.mse_loss(model.linear(x[:4]).squeeze(-1), y[:4]).backward()
    assert_close(fisher["linear.bias"], model.linear.bias.grad ** 2 / 4)
