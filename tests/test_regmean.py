import pytest
import torch
from torch import nn
from torch.testing import assert_close

from model_merging_methods import compute_gram_matrices, merge_state_dicts
from model_merging_methods.regmean import reduce_non_diagonal, regmean_merging


def test_reduce_non_diagonal_hand_computed():
    gram = torch.tensor([[2.0, 4.0], [6.0, 8.0]])
    assert torch.equal(reduce_non_diagonal(gram, 0.5), torch.tensor([[2.0, 2.0], [3.0, 8.0]]))


def test_regmean_with_alpha_below_one_matches_direct_solve():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(3, 2, generator=g, dtype=torch.float64).float()
    w = [base + torch.randn(3, 2, generator=g) for _ in range(2)]
    x = [torch.randn(5, 2, generator=g) for _ in range(2)]
    grams = [xi.T @ xi / 5 for xi in x]
    alpha = 0.7
    scaled = [gi * alpha + torch.diag(torch.diagonal(gi)) * (1 - alpha) for gi in grams]
    expected = (torch.inverse(scaled[0] + scaled[1]) @ (scaled[0] @ w[0].T + scaled[1] @ w[1].T)).T
    out = regmean_merging(base, [wi - base for wi in w], gram_matrices=grams, reduce_non_diagonal_ratio=alpha)
    assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_regmean_identity_grams_give_the_average():
    base = torch.zeros(2, 2)
    deltas = [torch.tensor([[1.0, 2.0], [3.0, 4.0]]), torch.tensor([[3.0, 0.0], [1.0, 0.0]])]
    out = regmean_merging(base, deltas, gram_matrices=[torch.eye(2), torch.eye(2)])
    assert_close(out, torch.tensor([[2.0, 1.0], [2.0, 2.0]]))


def test_regmean_non_linear_params_are_plain_average():
    base = {"lin.weight": torch.zeros(1, 2), "lin.bias": torch.zeros(1), "norm.weight": torch.zeros(2)}
    ft = [
        {"lin.weight": torch.tensor([[1.0, 1.0]]), "lin.bias": torch.tensor([1.0]), "norm.weight": torch.ones(2)},
        {"lin.weight": torch.tensor([[3.0, 3.0]]), "lin.bias": torch.tensor([3.0]), "norm.weight": torch.ones(2) * 3},
    ]
    grams = [{"lin": torch.tensor([[3.0, 0.0], [0.0, 3.0]])}, {"lin": torch.eye(2)}]
    out = merge_state_dicts("regmean_merging", base, ft, gram_matrices=grams)
    # weight: (3*1 + 1*3) / (3 + 1) = 1.5 per entry ; bias and norm: plain average 2
    assert_close(out["lin.weight"], torch.tensor([[1.5, 1.5]]))
    assert_close(out["lin.bias"], torch.tensor([2.0]))
    assert_close(out["norm.weight"], torch.tensor([2.0, 2.0]))
    with pytest.raises(ValueError, match="same Linear modules"):
        merge_state_dicts("regmean_merging", base, ft, gram_matrices=[grams[0], {}])


def test_compute_gram_matrices_running_mean_over_rows():
    model = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1))
    x = torch.randn(5, 4, 2)  # (batch, tokens, features): every token position is a row
    loader = [{"input": x[:2]}, {"input": x[2:]}]

    class Wrapper(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = model

        def forward(self, input):
            return self.net(input)

    grams = compute_gram_matrices(Wrapper(), loader, num_examples=5)
    rows = x.reshape(-1, 2)
    assert_close(grams["net.0"], rows.T @ rows / rows.shape[0])
    hidden = torch.relu(model[0](x)).reshape(-1, 3)
    assert_close(grams["net.2"], hidden.T @ hidden / hidden.shape[0], rtol=1e-5, atol=1e-6)
