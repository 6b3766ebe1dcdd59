"""Bootstrap intervals, signed-rank tests and Holm's correction of the encoder tables (glue/effect_statistics.py)."""

from __future__ import annotations

import pytest

from glue.effect_statistics import PairedCell, bootstrap_interval, holm, paired_effect, signed_rank_p


def test_holm_by_hand():
    # sorted 0.01, 0.02, 0.04 over 3 tests: 0.03, max(0.03, 0.04) = 0.04, max(0.04, 0.04) = 0.04
    assert holm({"a": 0.04, "b": 0.01, "c": 0.02, "d": None}) == {
        "a": pytest.approx(0.04), "b": pytest.approx(0.03), "c": pytest.approx(0.04), "d": None}
    assert holm({"a": 0.6, "b": 0.3}) == {"a": pytest.approx(0.6), "b": pytest.approx(0.6)}


def test_interval_of_constant_changes_is_that_change():
    cells = [PairedCell(f"pair{i}", 50.0, (52.0, 52.0, 52.0)) for i in range(5)]
    assert bootstrap_interval(cells, resamples=500) == (pytest.approx(2.0), pytest.approx(2.0))


def test_cells_of_one_cluster_move_together():
    """Two clusters of two cells each: every resample averages whole clusters, so with constant changes the mean
    can only be one cluster's change, the other's, or their mean."""
    cells = [PairedCell("a", 0.0, (1.0,)), PairedCell("a", 0.0, (1.0,)), PairedCell("b", 0.0, (3.0,)),
             PairedCell("b", 0.0, (3.0,))]
    low, high = bootstrap_interval(cells, resamples=2000)
    assert (low, high) == (pytest.approx(1.0), pytest.approx(3.0))


def test_interval_covers_the_mean_and_is_seeded():
    cells = [PairedCell(f"p{i}", 50.0, (50.0 + d, 50.0 + d + 1)) for i, d in enumerate([-2, 0, 1, 3, 4, 6])]
    effect = paired_effect(cells)
    assert effect.low < effect.mean < effect.high
    assert paired_effect(cells) == effect  # same seed, same interval


def test_signed_rank_ignores_rounding_and_is_exact_for_small_samples():
    assert signed_rank_p([1e-12, -1e-13]) is None
    assert signed_rank_p([1.0, 2.0, 3.0, 4.0, 5.0]) == pytest.approx(2 / 2 ** 5)  # all positive, n = 5
