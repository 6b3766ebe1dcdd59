"""Bootstrap intervals, signed-rank tests and Holm's correction of the encoder tables (glue/effect_statistics.py)."""

from __future__ import annotations

import pytest

from glue.effect_statistics import PairedCell, bootstrap_interval, cell_changes, holm, paired_effect, signed_rank_p


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


def test_replicates_of_a_cell_count_once_with_their_mean():
    # pair a, target x, fine-tuning seeds 0 and 1: changes +1 and +3 -> one cell, +2; target y: +0
    cells = [PairedCell("a", 50.0, (51.0,), "x", 0), PairedCell("a", 50.0, (53.0,), "x", 1),
             PairedCell("a", 10.0, (10.0,), "y", 0), PairedCell("a", 20.0, (20.0,), "y", 1)]
    assert cell_changes(cells) == [pytest.approx(2.0), pytest.approx(0.0)]
    effect = paired_effect(cells)
    assert (effect.cells, effect.clusters, effect.mean, effect.higher, effect.lower) == (2, 1, 1.0, 1, 0)
    # one cluster, two replicates drawn with replacement: the cell x averages 1, 2 or 3 -> the mean 0.5, 1 or 1.5
    assert bootstrap_interval(cells, resamples=2000) == (pytest.approx(0.5), pytest.approx(1.5))


def test_replicates_are_drawn_once_per_cluster_for_all_its_cells():
    """Seed 0 gives x +0 and y +4, seed 1 x +4 and y +0: drawn together, every resample's mean over the two
    cells is 2; drawn per cell it would range from 0 to 4."""
    cells = [PairedCell("a", 0.0, (0.0,), "x", 0), PairedCell("a", 0.0, (4.0,), "y", 0),
             PairedCell("a", 0.0, (4.0,), "x", 1), PairedCell("a", 0.0, (0.0,), "y", 1)]
    assert bootstrap_interval(cells, resamples=2000) == (pytest.approx(2.0), pytest.approx(2.0))


def test_a_single_replicate_leaves_the_interval_as_without_replicates():
    cells = [PairedCell(f"p{i}", 50.0, (50.0 + d, 50.0 + d + 1)) for i, d in enumerate([-2, 0, 1, 3])]
    named = [PairedCell(c.cluster, c.reference, c.treated, "t", 7) for c in cells]
    assert bootstrap_interval(named) == bootstrap_interval(cells)
