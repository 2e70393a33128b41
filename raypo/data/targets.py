"""Training targets from a row's labels: thin wrappers over :mod:`raypo.losses.labels`.

The formulas live in the loss library (one definition for data and losses); this module only adapts a
listwise row's Python lists (``scores [N][m]`` with None = missing, ``ranks [N]`` or None) to them:

* :func:`psi`: LiPO labels in [0, 1], stored with each tokenised row: from ranks when the row has them
  (``lipo_psi_from_ranks``: row means of M, M_ij = 1[rank_i < rank_j], 0.5 for ties), else from the
  ratings (``lipo_psi_from_ratings``, win-rate of the mean rating).

The other labels are built at training time from the collated ``scores`` / ``ranks``: per-dimension targets
inside the loss (``raypo.losses.labels.targets_from_ratings``), scalar scores for MPO, NCA and the best/worst
pairwise losses in ``raypo.train.objective.scalar_scores``.
"""

from __future__ import annotations

from typing import Optional

import torch

from raypo.losses import labels


def psi(scores: list[list[Optional[float]]], ranks: Optional[list[int]] = None) -> list[float]:
    """LiPO psi ``[N]`` from ranks if present, else from the (mean) ratings."""
    if ranks is not None:
        return labels.lipo_psi_from_ranks(torch.tensor(ranks, dtype=torch.float64)).tolist()
    if not scores or not scores[0]:
        raise ValueError("psi: the row has neither ranks nor ratings")
    return labels.lipo_psi_from_ratings([scores])[0].tolist()
