"""Labels from a row's ratings and ranks: LiPO psi (raypo.data.targets, stored with each tokenised row) and
the scalar scores the trainer derives from the collated rows (raypo.train.objective.scalar_scores)."""

from __future__ import annotations

import math

import pytest

from raypo.data import targets
from raypo.model.batch import collate_listwise
from raypo.train.objective import scalar_scores


def test_psi_from_ranks_and_ratings():
    assert targets.psi([[], [], []], [1, 2, 3]) == pytest.approx([5 / 6, 0.5, 1 / 6])
    assert targets.psi([[5.0, 5.0], [1.0, 1.0]]) == pytest.approx([0.75, 0.25])
    with pytest.raises(ValueError):
        targets.psi([[], []])


def test_scalar_scores_of_collated_rows():
    """A response's scalar score is the mean of its available ratings (NaN when it has none), or -rank for
    a rank-only row: what MPO, NCA and the best/worst pairwise losses read."""
    rated = collate_listwise([{"prompt_ids": [1, 2], "response_ids": [[3], [4], [5]],
                               "scores": [[5.0, None], [1.0, 3.0], [None, None]], "ranks": None}])
    got = scalar_scores(rated.extras)[0].tolist()
    assert got[:2] == [5.0, 2.0] and math.isnan(got[2])
    ranked = collate_listwise([{"prompt_ids": [1, 2], "response_ids": [[3], [4]], "scores": [[], []],
                                "ranks": [2, 1]}])
    assert scalar_scores(ranked.extras)[0].tolist() == [-2.0, -1.0]
