"""Ranking metrics between implicit rewards and labels, as exact (sum, count) pairs.

Every metric is returned as ``name -> (sum, count)`` (float64 scalar tensors, no grad) so that micro-batches,
gradient-accumulation steps and data-parallel ranks aggregate exactly: add the pairs (e.g. one
``all_reduce`` of :func:`metric_sums_to_tensor`) and divide once with :func:`finalize_metrics`.

Conventions (documented choices):

* Items: valid responses (``mask``) whose label is not NaN. Implicit rewards ``s`` come from
  ``LossOutput.rewards`` (``beta * (logp_theta - logp_ref)`` or the loss's own definition).
* ``pairwise_accuracy``: over all valid pairs with different labels (pooled over the batch); a pair is
  correct when ``s`` orders it strictly like the label (a reward tie counts as wrong, as TRL's
  ``rewards/accuracies`` does; so at step 0 with s = 0 the accuracy is 0).
* ``top1_accuracy``: per prompt with non-tied labels; the first argmax of s must have the maximal label
  (any of several tied best responses counts).
* ``ndcg`` / ``ndcg@k``: gain ``2^label - 1`` (RAX default; ``gain="linear"`` uses the label), discount
  ``1 / log2(1 + rank)``, ranks of s descending with ties in index order (RAX); prompts with IDCG = 0 are
  not counted. Labels should be non-negative (psi, ratings) for NDCG to be meaningful.
* ``kendall_tau``: tau-b per prompt, ``sum sgn(ds) sgn(dl) / sqrt((n0 - n_s)(n0 - n_l))``; prompts where all
  rewards or all labels tie (tau-b undefined) are not counted, so it is absent at step 0.
* ``reward_margin``, ``rewards_chosen``, ``rewards_rejected``: s of the best and worst response by label
  (first argmax / argmin; tied prompts not counted). ``rewards_mean``: mean s over valid items.
* Labels ``[B, N, m]``: every metric per dimension, named ``metric/<dim name>`` (default ``dim<k>``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Optional

import torch
from torch import Tensor

from raypo.losses.labels import best_worst

MetricSums = dict[str, tuple[Tensor, Tensor]]


def _pair(total: Tensor, count: Tensor) -> tuple[Tensor, Tensor]:
    return total.detach().to(torch.float64), count.detach().to(torch.float64)


def _stable_rank_desc(s: Tensor, valid: Tensor) -> Tensor:
    """1-based ranks by s descending among valid items, ties in index order, invalid items last."""
    order = torch.sort(-s, dim=-1, stable=True).indices
    inv = (~valid).gather(-1, order).to(torch.int8)
    order = order.gather(-1, torch.sort(inv, dim=-1, stable=True).indices)
    ranks = torch.empty_like(order)
    ranks.scatter_(-1, order, torch.arange(1, s.shape[-1] + 1, device=s.device).expand_as(order))
    return ranks


def _ndcg(s: Tensor, labels: Tensor, valid: Tensor, k: Optional[int], gain: str) -> tuple[Tensor, Tensor]:
    zero = torch.zeros((), dtype=s.dtype, device=s.device)
    g = torch.exp2(labels) - 1.0 if gain == "exp2" else labels
    g = torch.where(valid, g, zero)
    n = s.shape[-1]
    cutoff = n if k is None else k
    ranks = _stable_rank_desc(s, valid).to(s.dtype)
    disc = torch.where(valid & (ranks <= cutoff), 1.0 / torch.log2(1.0 + ranks), zero)
    dcg = (g * disc).sum(-1)
    ideal = torch.sort(torch.where(valid, g, torch.full((), -math.inf, dtype=s.dtype, device=s.device)),
                       dim=-1, descending=True).values
    ideal = torch.where(torch.isfinite(ideal), ideal, zero)
    pos = torch.arange(1, n + 1, device=s.device, dtype=s.dtype)
    ideal_disc = torch.where(pos <= cutoff, 1.0 / torch.log2(1.0 + pos), zero)
    idcg = (ideal * ideal_disc).sum(-1)
    counted = idcg > 0
    ndcg = dcg / torch.where(counted, idcg, torch.ones_like(idcg))
    return _pair(torch.where(counted, ndcg, zero).sum(), counted.sum())


def _kendall_tau_b(s: Tensor, labels: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
    n = s.shape[-1]
    upper = torch.triu(torch.ones(n, n, dtype=torch.bool, device=s.device), diagonal=1)
    pairs = valid.unsqueeze(-1) & valid.unsqueeze(-2) & upper
    ds = torch.sign(s.unsqueeze(-1) - s.unsqueeze(-2))
    dl = torch.sign(labels.unsqueeze(-1) - labels.unsqueeze(-2))
    pf = pairs.to(s.dtype)
    concord = (ds * dl * pf).sum((-1, -2))
    untied_s = ((ds != 0).to(s.dtype) * pf).sum((-1, -2))
    untied_l = ((dl != 0).to(s.dtype) * pf).sum((-1, -2))
    denom = torch.sqrt(untied_s * untied_l)
    counted = denom > 0
    tau = concord / torch.where(counted, denom, torch.ones_like(denom))
    return _pair(torch.where(counted, tau, torch.zeros_like(tau)).sum(), counted.sum())


def _single_dimension(s: Tensor, labels: Tensor, valid: Tensor, ndcg_ks: Sequence[Optional[int]],
                      gain: str) -> MetricSums:
    zero = torch.zeros((), dtype=s.dtype, device=s.device)
    labels = torch.where(valid, labels, zero)
    out: MetricSums = {}

    pairs = valid.unsqueeze(-1) & valid.unsqueeze(-2) & (labels.unsqueeze(-1) > labels.unsqueeze(-2))
    correct = pairs & (s.unsqueeze(-1) > s.unsqueeze(-2))
    out["pairwise_accuracy"] = _pair(correct.sum(), pairs.sum())

    n_valid = valid.sum(-1)
    lab_hi = torch.where(valid, labels, torch.full((), -math.inf, dtype=s.dtype, device=s.device))
    lab_lo = torch.where(valid, labels, torch.full((), math.inf, dtype=s.dtype, device=s.device))
    not_tied = (n_valid >= 2) & (lab_hi.amax(-1) > lab_lo.amin(-1))
    top = torch.where(valid, s, torch.full((), -math.inf, dtype=s.dtype, device=s.device)).argmax(-1)
    top_ok = lab_hi.gather(-1, top.unsqueeze(-1)).squeeze(-1) == lab_hi.amax(-1)
    out["top1_accuracy"] = _pair((top_ok & not_tied).sum(), not_tied.sum())

    for k in ndcg_ks:
        out["ndcg" if k is None else f"ndcg@{k}"] = _ndcg(s, labels, valid, k, gain)
    out["kendall_tau"] = _kendall_tau_b(s, labels, valid)

    best, worst, usable = best_worst(torch.where(valid, labels, torch.full((), math.nan, dtype=s.dtype,
                                                                          device=s.device)), valid)
    s_best = s.gather(-1, best.unsqueeze(-1)).squeeze(-1)
    s_worst = s.gather(-1, worst.unsqueeze(-1)).squeeze(-1)
    n_usable = usable.sum()
    out["reward_margin"] = _pair(torch.where(usable, s_best - s_worst, zero).sum(), n_usable)
    out["rewards_chosen"] = _pair(torch.where(usable, s_best, zero).sum(), n_usable)
    out["rewards_rejected"] = _pair(torch.where(usable, s_worst, zero).sum(), n_usable)
    out["rewards_mean"] = _pair(torch.where(valid, s, zero).sum(), valid.sum())
    return out


def ranking_metrics(
    rewards: Tensor,
    labels: Tensor,
    mask: Optional[Tensor] = None,
    *,
    ndcg_ks: Sequence[Optional[int]] = (None, 1),
    gain: str = "exp2",
    dim_names: Optional[Sequence[str]] = None,
    prefix: str = "",
) -> MetricSums:
    """Ranking metrics of implicit rewards against labels, as ``name -> (sum, count)``.

    Args:
        rewards: ``[B, N]`` implicit rewards s (e.g. ``LossOutput.rewards``).
        labels: ``[B, N]`` scalar labels (larger is better) or ``[B, N, m]`` per-dimension ratings;
            NaN = missing (that item is left out of that dimension's metrics).
        mask: ``[B, N]`` valid responses (None = all).
        ndcg_ks: cutoffs; ``None`` = the full list (``"ndcg"``), an int k gives ``"ndcg@k"``.
        gain: ``"exp2"`` (2^l - 1, RAX default) or ``"linear"``.
        dim_names: names of the m dimensions (default ``dim0..``).
        prefix: prepended to every name (e.g. ``"eval/"``).
    """
    if gain not in ("exp2", "linear"):
        raise ValueError(f"ranking_metrics: gain={gain!r} is not one of ('exp2', 'linear')")
    s = rewards.detach().to(torch.float64)
    if s.dim() != 2:
        raise ValueError(f"ranking_metrics: rewards must be [B, N], got {tuple(rewards.shape)}")
    lab = labels.detach().to(device=s.device, dtype=torch.float64)
    if mask is None:
        base = torch.ones_like(s, dtype=torch.bool)
    else:
        base = mask.to(device=s.device, dtype=torch.bool)
    if lab.dim() == 2:
        valid = base & ~torch.isnan(lab)
        return {prefix + k: v for k, v in _single_dimension(s, lab, valid, ndcg_ks, gain).items()}
    if lab.dim() != 3 or lab.shape[:2] != s.shape:
        raise ValueError(f"ranking_metrics: labels must be [B, N] or [B, N, m], [B, N] = {tuple(s.shape)}, "
                         f"got {tuple(labels.shape)}")
    m = lab.shape[-1]
    names = list(dim_names) if dim_names is not None else [f"dim{k}" for k in range(m)]
    if len(names) != m:
        raise ValueError(f"ranking_metrics: {len(names)} dim_names for m = {m} dimensions")
    out: MetricSums = {}
    for k in range(m):
        lk = lab[..., k]
        valid = base & ~torch.isnan(lk)
        for name, v in _single_dimension(s, lk, valid, ndcg_ks, gain).items():
            out[f"{prefix}{name}/{names[k]}"] = v
    return out


def merge_metric_sums(*parts: Mapping[str, tuple[Tensor, Tensor]]) -> MetricSums:
    """Adds (sum, count) pairs key by key (micro-batches, steps); missing keys count as (0, 0)."""
    out: MetricSums = {}
    for part in parts:
        for k, (total, count) in part.items():
            if k in out:
                out[k] = (out[k][0] + total.to(out[k][0].device), out[k][1] + count.to(out[k][1].device))
            else:
                out[k] = (total, count)
    return out


def metric_sums_to_tensor(sums: Mapping[str, tuple[Tensor, Tensor]]) -> tuple[list[str], Tensor]:
    """Packs sums into ``(names, Tensor[K, 2])`` for a single ``all_reduce(SUM)`` across ranks.

    All ranks must produce the same names in the same order (sort them, as done here).
    """
    names = sorted(sums)
    if not names:
        return names, torch.zeros(0, 2, dtype=torch.float64)
    rows = [torch.stack([sums[n][0].reshape(()), sums[n][1].reshape(())]) for n in names]
    return names, torch.stack(rows)


def metric_sums_from_tensor(names: Sequence[str], packed: Tensor) -> MetricSums:
    """Inverse of :func:`metric_sums_to_tensor`."""
    return {n: (packed[i, 0], packed[i, 1]) for i, n in enumerate(names)}


def finalize_metrics(sums: Mapping[str, tuple[Tensor, Tensor]]) -> dict[str, float]:
    """``sum / count`` per metric; NaN when nothing was counted (e.g. Kendall tau with all rewards tied)."""
    out: dict[str, float] = {}
    for k, (total, count) in sums.items():
        c = float(count)
        out[k] = float(total) / c if c > 0 else math.nan
    return out
