"""Label construction (raypo.losses.labels)."""

from __future__ import annotations

import math

import pytest
import torch

from raypo.losses.labels import (
    aggregate_ratings,
    best_worst,
    lipo_psi_from_pairwise,
    lipo_psi_from_ranks,
    lipo_psi_from_ratings,
    mpo_sets,
    parse_rating,
    ratings_tensor,
    targets_from_ratings,
)

D64 = torch.float64


def test_targets_spec_example() -> None:
    p = targets_from_ratings(torch.tensor([[5.0, 4.0, 2.0, 1.0]], dtype=D64))
    expected = torch.tensor([[0.6964, 0.2562, 0.0347, 0.0128]], dtype=D64)
    torch.testing.assert_close(p, expected, atol=1e-4, rtol=0)


def test_targets_per_dimension_mask_and_temperature() -> None:
    ratings = torch.tensor([[[5.0, 1.0], [3.0, 2.0], [1.0, 9.0]]], dtype=D64)  # [B=1, N=3, m=2]
    mask = torch.tensor([[True, True, False]])
    p = targets_from_ratings(ratings, mask, temperature=2.0)
    assert p.shape == (1, 3, 2)
    torch.testing.assert_close(p.sum(1), torch.ones(1, 2, dtype=D64))
    assert (p[0, 2] == 0).all()
    torch.testing.assert_close(p[0, :2, 0], torch.softmax(torch.tensor([2.5, 1.5], dtype=D64), 0))
    pe = targets_from_ratings(ratings, mask, eps=1e-10)
    torch.testing.assert_close(pe[0, :2], targets_from_ratings(ratings, mask)[0, :2] + 1e-10)
    assert (pe[0, 2] == 0).all()


@pytest.mark.parametrize("raw", [None, "", "N/A", "n/a", "abc", float("nan")])
def test_missing_ratings_become_default(raw: object) -> None:
    assert parse_rating(raw) == 1.0
    assert parse_rating(raw, default_rating=2.5) == 2.5
    assert parse_rating("4") == 4.0 and parse_rating(3) == 3.0


def test_targets_from_nested_lists_with_missing() -> None:
    nested = [[[5, None], ["4", "N/A"], [2, 3]]]
    t = ratings_tensor(nested)
    torch.testing.assert_close(t, torch.tensor([[[5.0, 1.0], [4.0, 1.0], [2.0, 3.0]]], dtype=D64))
    torch.testing.assert_close(targets_from_ratings(nested), targets_from_ratings(t))
    nan_version = torch.tensor([[[5.0, math.nan], [4.0, math.nan], [2.0, 3.0]]], dtype=D64)
    torch.testing.assert_close(targets_from_ratings(nan_version), targets_from_ratings(t))


def test_aggregate_ratings_is_mean_of_targets() -> None:
    ratings = torch.tensor([[[5.0, 1.0], [3.0, 2.0], [1.0, 4.0]]], dtype=D64)
    agg = aggregate_ratings(ratings)
    torch.testing.assert_close(agg, targets_from_ratings(ratings).mean(-1))


def test_psi_from_pairwise_row_means_including_diagonal() -> None:
    w = torch.tensor([[0.5, 0.8, 0.9], [0.2, 0.5, 0.6], [0.1, 0.4, 0.5]], dtype=D64)
    torch.testing.assert_close(lipo_psi_from_pairwise(w), w.mean(-1))
    mask = torch.tensor([[True, True, False]])
    psi = lipo_psi_from_pairwise(w.unsqueeze(0), mask)
    torch.testing.assert_close(psi, torch.tensor([[0.65, 0.35, 0.0]], dtype=D64))


def test_psi_from_ranks_strict_ties_and_mask() -> None:
    torch.testing.assert_close(lipo_psi_from_ranks(torch.tensor([2, 1, 4, 3])),
                               torch.tensor([(4 - 2 + 0.5) / 4, 3.5 / 4, 0.5 / 4, 1.5 / 4], dtype=D64))
    tied = lipo_psi_from_ranks(torch.tensor([1, 1, 3]))
    torch.testing.assert_close(tied, torch.tensor([2 / 3, 2 / 3, 1 / 6], dtype=D64))
    masked = lipo_psi_from_ranks(torch.tensor([[1, 2, 3, 1]]), torch.tensor([[True, True, True, False]]))
    torch.testing.assert_close(masked, torch.tensor([[2.5 / 3, 0.5, 0.5 / 3, 0.0]], dtype=D64))


def test_psi_from_ratings_methods() -> None:
    r = torch.tensor([[4.0, 2.0, 4.0, 1.0]], dtype=D64)
    win = lipo_psi_from_ratings(r)
    # Equals the rank rule of the induced ranking (ties allowed).
    torch.testing.assert_close(win, lipo_psi_from_ranks(torch.tensor([[1, 3, 1, 4]])))
    torch.testing.assert_close(lipo_psi_from_ratings(r, method="minmax"),
                               torch.tensor([[1.0, 1 / 3, 1.0, 0.0]], dtype=D64))
    torch.testing.assert_close(lipo_psi_from_ratings(r, method="range", rating_range=(1, 5)),
                               torch.tensor([[0.75, 0.25, 0.75, 0.0]], dtype=D64))
    tied = lipo_psi_from_ratings(torch.tensor([[3.0, 3.0]], dtype=D64), method="minmax")
    torch.testing.assert_close(tied, torch.tensor([[0.5, 0.5]], dtype=D64))
    multi = torch.tensor([[[5.0, 1.0], [1.0, 3.0]]], dtype=D64)  # [1, 2, 2]
    torch.testing.assert_close(lipo_psi_from_ratings(multi, dim_weights=[0.0, 1.0]),
                               torch.tensor([[0.25, 0.75]], dtype=D64))
    # Mean ratings 3 vs 2.
    torch.testing.assert_close(lipo_psi_from_ratings(multi), torch.tensor([[0.75, 0.25]], dtype=D64))
    with pytest.raises(ValueError, match="rating_range"):
        lipo_psi_from_ratings(r, method="range")


def test_mpo_sets() -> None:
    rows = [[6.5, 3.0, 5.0, 1.5], [1.0, 2.0, 3.0, 9.0], [2.0, 2.0, 2.0, 2.0], [0.1, 0.1, 0.1, 0.1]]
    scores = torch.tensor(rows, dtype=D64)
    mask = torch.tensor([[True] * 4, [True, True, True, False], [True] * 4, [True] * 4])
    pos, neg, counted = mpo_sets(scores, mask)
    assert pos[0].tolist() == [True, False, True, False]
    assert pos[1].tolist() == [False, False, True, False]  # mean 2: the score equal to it goes to Y-
    assert neg[1].tolist() == [True, True, False, False]
    assert counted.tolist() == [True, True, False, False]


def test_best_worst() -> None:
    scores = torch.tensor([[0.1, 0.9, 0.9, 0.1], [1.0, math.nan, 3.0, 3.0], [2.0, 2.0, 0.0, 0.0]], dtype=D64)
    mask = torch.tensor([[True] * 4, [True] * 4, [True, True, False, False]])
    best, worst, usable = best_worst(scores, mask)
    assert best.tolist() == [1, 2, 0]
    assert worst.tolist() == [0, 0, 0]
    assert usable.tolist() == [True, True, False]
