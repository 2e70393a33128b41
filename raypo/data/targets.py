"""Training targets from a row's labels: thin wrappers over :mod:`raypo.losses.labels`.

The formulas live in the loss library (one definition for data and losses); this module only adapts a
listwise row's Python lists (``scores [N][m]`` with None = missing, ``ranks [N]`` or None) to them:

* :func:`rating_targets`: per-dimension target distributions, ``p*(k)_i = softmax_i(R_{k,i} / T)``
  (lambda-DPO; a missing rating counts as ``DEFAULT_RATING`` = 1.0, the official converter's rule).
* :func:`psi`: LiPO labels in [0, 1]: from ranks when the row has them
  (``lipo_psi_from_ranks``: row means of M, M_ij = 1[rank_i < rank_j], 0.5 for ties), else from the
  ratings (``lipo_psi_from_ratings``, win-rate of the mean rating).
* :func:`mpo_scores`: one scalar per response for MPO/W-MPO and best/worst pairwise losses: the mean
  of the available ratings (None when a response has none), or ``-rank`` for rank-only rows.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from raypo.losses import labels


def rating_targets(scores: list[list[Optional[float]]], temperature: float = 1.0) -> list[list[float]]:
    """``[N][m]`` ratings -> ``[N][m]`` targets; each dimension's column sums to 1 over the N responses."""
    if not scores or not scores[0]:
        return [[] for _ in scores]
    r = labels.ratings_tensor([scores])  # [1, N, m], missing -> DEFAULT_RATING
    return labels.targets_from_ratings(r, temperature=temperature)[0].tolist()


def psi(scores: list[list[Optional[float]]], ranks: Optional[list[int]] = None) -> list[float]:
    """LiPO psi ``[N]`` from ranks if present, else from the (mean) ratings."""
    if ranks is not None:
        return labels.lipo_psi_from_ranks(torch.tensor(ranks, dtype=torch.float64)).tolist()
    if not scores or not scores[0]:
        raise ValueError("psi: the row has neither ranks nor ratings")
    return labels.lipo_psi_from_ratings([scores])[0].tolist()


def mpo_scores(scores: list[list[Optional[float]]], ranks: Optional[list[int]] = None
               ) -> list[Optional[float]]:
    """One scalar score per response: mean of its available ratings, or ``-rank`` for rank-only rows."""
    if scores and scores[0]:
        out = []
        for row in scores:
            vals = [v for v in row if v is not None and math.isfinite(v)]
            out.append(sum(vals) / len(vals) if vals else None)
        return out
    if ranks is None:
        raise ValueError("mpo_scores: the row has neither ratings nor ranks")
    return [-float(r) for r in ranks]


def psi_batch(scores_rows: list[list[list[Optional[float]]]], ranks_rows: list[Optional[list[int]]]
              ) -> list[list[float]]:
    """:func:`psi` for many rows (used by the tokenisation stage)."""
    return [psi(s, r) for s, r in zip(scores_rows, ranks_rows)]
