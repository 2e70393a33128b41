"""Targets from a row's labels, through raypo.losses.labels."""

from __future__ import annotations

import pytest

from raypo.data import targets


def test_rating_targets_match_the_lambda_dpo_example():
    # spec 3.2: ratings (5, 4, 2, 1) give p* = (0.6964, 0.2562, 0.0347, 0.0128)
    p = targets.rating_targets([[5.0], [4.0], [2.0], [1.0]])
    assert [round(x[0], 4) for x in p] == [0.6964, 0.2562, 0.0347, 0.0128]
    two = targets.rating_targets([[5.0, 1.0], [None, 1.0]], temperature=2.0)
    assert abs(sum(r[0] for r in two) - 1) < 1e-12 and two[0][1] == pytest.approx(0.5)


def test_psi_from_ranks_and_ratings():
    assert targets.psi([[], [], []], [1, 2, 3]) == pytest.approx([5 / 6, 0.5, 1 / 6])
    assert targets.psi([[5.0, 5.0], [1.0, 1.0]]) == pytest.approx([0.75, 0.25])
    with pytest.raises(ValueError):
        targets.psi([[], []])


def test_mpo_scores():
    assert targets.mpo_scores([[5.0, None], [1.0, 3.0], [None, None]]) == [5.0, 2.0, None]
    assert targets.mpo_scores([[], []], [2, 1]) == [-2.0, -1.0]
