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


class _OneWeight(nn.Module):
    """logits = [w * x, 0]: p0 = sigmoid(w x), d log p0 / dw = x (1 - p0), d log p1 / dw = -x p0."""

    def __init__(self, w):
        super().__init__()
        self.w = nn.Parameter(torch.tensor([w]))

    def forward(self, x):
        return type("Out", (), {"logits": torch.stack([self.w * x, torch.zeros_like(x)], dim=-1)})()


def test_compute_fisher_mergelm_hand_computed_with_cross_terms():
    # x = 2, w = ln(3)/2 -> p = (3/4, 1/4); per example d/dw of sqrt(p0) log p0 + sqrt(p1) log p1
    # = sqrt(3/4) * 2/4 + sqrt(1/4) * (-2 * 3/4) = (sqrt(3) - 3) / 4
    model = _OneWeight(math.log(3.0) / 2)
    x = torch.tensor([2.0, 2.0])
    per_example = (math.sqrt(3.0) - 3.0) / 4
    one_batch = compute_fisher_weights(model, [{"x": x, "labels": torch.tensor([0, 1])}], num_examples=2)
    assert model.w.grad is None  # gradients cleared afterwards
    # both examples in one batch: the gradients add before squaring -> (2 g)^2 / 2
    assert one_batch["w"].item() == pytest.approx((2 * per_example) ** 2 / 2, rel=1e-5)
    separate = compute_fisher_weights(model, _loader(x, torch.tensor([0, 1]), 1), num_examples=2)
    assert separate["w"].item() == pytest.approx(per_example ** 2, rel=1e-5)


def test_exact_fisher_hand_computed_where_mergelm_gives_zero():
    # p = (0.5, 0.5) at w = 0, x = 1: the Fisher is 0.5 (x/2)^2 + 0.5 (x/2)^2 = x^2/4 = 0.25;
    # MergeLM's sqrt(p)-weighted gradients cancel to exactly 0.
    model = _OneWeight(0.0)
    loader = [{"x": torch.tensor([1.0]), "labels": torch.tensor([0])}]
    assert compute_fisher_weights(model, loader, num_examples=1, estimator="exact")["w"].item() == \
        pytest.approx(0.25)
    assert compute_fisher_weights(model, loader, num_examples=1)["w"].item() == 0.0
    # x = 2, p = (3/4, 1/4): sum_y p_y g_y^2 = p0 p1 x^2 = 3/4
    model = _OneWeight(math.log(3.0) / 2)
    loader = [{"x": torch.tensor([2.0, 2.0]), "labels": torch.tensor([0, 1])}]
    assert compute_fisher_weights(model, loader, num_examples=2, estimator="exact")["w"].item() == \
        pytest.approx(0.75, rel=1e-5)


def _brute_force_fisher(model, x, regression=False):
    """Per example and class, in float64 with torch.autograd.grad: (1/N) sum_x sum_y p(y|x) g_y^2."""
    model = model.double()
    out = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for row in x.double():
        for y in range(1 if regression else model.linear.out_features):
            logits = model.linear(row)  # a fresh graph per (example, class)
            weight = 1.0 if regression else float(torch.softmax(logits.detach(), -1)[y])
            value = logits[0] if regression else torch.log_softmax(logits, -1)[y]
            grads = torch.autograd.grad(value, list(model.parameters()))
            for (name, _), g in zip(model.named_parameters(), grads, strict=True):
                out[name] += weight * g ** 2
    return {n: (v / len(x)).float() for n, v in out.items()}


@pytest.mark.parametrize("classes", [3, 1])
def test_exact_fisher_equals_brute_force_per_example(classes):
    torch.manual_seed(0)
    model = _Head(classes)
    x, y = torch.randn(7, 2), torch.randint(0, max(classes, 2), (7,)).float()
    fisher = compute_fisher_weights(model, _loader(x, y, 3), num_examples=5, estimator="exact")
    expected = _brute_force_fisher(_copy(model), x[:5], regression=classes == 1)  # exactly 5, mid-batch
    for name in expected:
        assert_close(fisher[name], expected[name], rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="estimator must be one of"):
        compute_fisher_weights(model, _loader(x, y, 3), num_examples=5, estimator="empirical")


def _copy(model):
    import copy

    return copy.deepcopy(model)


def test_compute_fisher_regression_uses_mse_and_counts_nominal_batches():
    torch.manual_seed(0)
    model = _Head(1)
    x, y = torch.randn(6, 2), torch.randn(6)
    fisher = compute_fisher_weights(model, _loader(x, y, 4), num_examples=3)  # one batch of 4 counted
    model.zero_grad()
    nn.functional.mse_loss(model.linear(x[:4]).squeeze(-1), y[:4]).backward()
    assert_close(fisher["linear.bias"], model.linear.bias.grad ** 2 / 4)


class _Embedder(nn.Module):
    """Token + broadcast position embeddings, mean-pooled into a linear head (the layout of BERT's embeddings)."""

    def __init__(self, vocab=11, length=6, dim=4, classes=3):
        super().__init__()
        self.tokens, self.positions = nn.Embedding(vocab, dim), nn.Embedding(length, dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, input_ids):
        positions = torch.arange(input_ids.shape[1])[None]  # (1, length), broadcast over the batch
        hidden = torch.tanh(self.tokens(input_ids) + self.positions(positions))
        return type("Out", (), {"logits": self.head(hidden.mean(dim=1))})()


def test_exact_fisher_of_embedding_tables_sums_repeated_tokens_before_squaring():
    torch.manual_seed(0)
    model = _Embedder()
    ids = torch.tensor([[1, 1, 3, 1, 5, 0], [2, 2, 2, 2, 2, 2], [4, 7, 4, 9, 10, 3]])
    fisher = compute_fisher_weights(model, [{"input_ids": ids, "labels": torch.zeros(3)}], num_examples=3,
                                    estimator="exact")
    assert not model.tokens.sparse and model.tokens.weight.grad is None  # the model is left as it was
    reference = _copy(model).double()
    expected = {n: torch.zeros_like(p) for n, p in reference.named_parameters()}
    for row in ids:
        for y in range(3):
            log_p = torch.log_softmax(reference(row[None]).logits[0], -1)
            grads = torch.autograd.grad(log_p[y], list(reference.parameters()))  # dense tables
            for (name, _), g in zip(reference.named_parameters(), grads, strict=True):
                expected[name] += float(log_p[y].detach().exp()) * g ** 2 / len(ids)
    for name, value in expected.items():
        assert_close(fisher[name], value.float(), rtol=1e-5, atol=1e-8)
    assert fisher["tokens.weight"][[6, 8]].abs().sum() == 0 and fisher["tokens.weight"][2].abs().sum() > 0
