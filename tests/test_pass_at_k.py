"""Unbiased pass@k against the closed form 1 - C(n-c, k) / C(n, k)."""

from __future__ import annotations

from math import comb

import pytest

from evaluation.pass_at_k import mean_pass_at_k, pass_at_k


@pytest.mark.parametrize("n", [1, 2, 5, 10])
def test_pass_at_k_matches_closed_form(n):
    for c in range(n + 1):
        for k in range(1, n + 1):
            expected = 1.0 - comb(n - c, k) / comb(n, k)
            assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_1_is_fraction_correct():
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    assert mean_pass_at_k([1, 1, 1, 1], [1, 0, 1, 1], 1) == 0.75
    assert mean_pass_at_k([], [], 1) == 0.0


@pytest.mark.parametrize(("n", "c", "k"), [(0, 0, 1), (3, 4, 1), (3, 1, 4), (3, 1, 0)])
def test_pass_at_k_rejects_bad_arguments(n, c, k):
    with pytest.raises(ValueError, match="must be"):
        pass_at_k(n, c, k)
