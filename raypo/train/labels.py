"""What each loss reads from a collated batch: labels, lambdas and dispersion.

The data layer carries per-response ``scores`` ([B, N, m] ratings, NaN = missing), and optionally ``psi``
(LiPO labels) and ``ranks`` (1 = best). Each loss declares the label kind it needs
(:class:`raypo.losses.registry.LossSpec.labels`):

* ``per_dimension_scores`` (lambda_dpo): the [B, N, m] ratings as they are (the loss turns them into
  softmax targets per dimension, missing ratings as the spec's default rating).
* ``scalar_scores`` (LiPO, MPO, NCA, ...): LiPO losses take ``psi`` when the data has it; the others take
  the mean of the available ratings, or ``-rank`` for rank-only data.
* ``pairwise_order`` (dpo, ipo, slic, simpo, mallows_*): the same scalar, from which the loss picks the
  best and worst valid responses (column 0 = chosen when N = 2 and no scores exist).
"""

from __future__ import annotations

from typing import Optional

import torch

from raypo.losses.registry import LossSpec


def scalar_scores(extras: dict[str, torch.Tensor]) -> Optional[torch.Tensor]:
    """[B, N] scalar preference per response (larger is better); NaN where unknown."""
    scores = extras.get("scores")
    if scores is not None and scores.numel() > 0 and not torch.isnan(scores).all():
        if scores.dim() == 2:
            return scores
        valid = ~torch.isnan(scores)
        total = torch.where(valid, scores, torch.zeros_like(scores)).sum(-1)
        count = valid.sum(-1)
        return torch.where(count > 0, total / count.clamp(min=1), torch.full_like(total, float("nan")))
    ranks = extras.get("ranks")
    if ranks is not None:
        return -ranks
    return None


def loss_labels(spec: LossSpec, extras: dict[str, torch.Tensor]) -> Optional[torch.Tensor]:
    """The ``scores`` argument of :func:`raypo.losses.listwise_loss` for this loss."""
    if spec.labels == "per_dimension_scores":
        scores = extras.get("scores")
        if scores is None or scores.dim() != 3:
            raise ValueError(f"loss {spec.name} needs per-dimension ratings [B, N, m] in the data's 'scores' "
                             "column; this dataset has none (use a rated dataset or another loss)")
        return scores
    if spec.family == "lipo" and "psi" in extras and not torch.isnan(extras["psi"]).all():
        return extras["psi"]
    return scalar_scores(extras)


def metric_labels(extras: dict[str, torch.Tensor]) -> Optional[torch.Tensor]:
    """Labels for ranking metrics: the per-dimension ratings when present (metrics per dimension and on
    their mean), else the scalar labels."""
    return scalar_scores(extras)
