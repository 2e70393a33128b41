"""Configurable label rules: missing ratings, per-dimension ratings -> one score, LiPO psi from scores.

Reference: docs/losses.md ("Missing ratings", "One score per response", "LiPO labels"). Shapes: ``B``
prompts, ``N`` responses (padded), ``m`` rating dimensions; ``mask[B, N]`` marks real responses; NaN is a
missing rating (or an unrated response).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from raypo.losses.labels import DEFAULT_RATING, _pairwise_win_matrix, lipo_psi_from_pairwise

__all__ = [
    "MISSING_RULES",
    "SCORE_REDUCTIONS",
    "LIPO_LABEL_RULES",
    "impute_ratings",
    "reduce_ratings",
    "lipo_psi",
]

#: ``drop``: a missing rating leaves that response out of that dimension (raypo's default);
#: ``impute``: a missing rating is ``default_rating`` = 1.0 (the official lambda-DPO converter).
MISSING_RULES = ("drop", "impute")
#: Per-dimension ratings -> one score per response: the mean, or the prompt's lambda-weighted mean.
SCORE_REDUCTIONS = ("mean", "lambda")
#: LiPO psi from one score per response (docs/losses.md "LiPO labels").
LIPO_LABEL_RULES = ("win_rate", "raw", "minmax", "ranks", "bradley_terry", "matrix")


def impute_ratings(ratings: Tensor, default_rating: float = DEFAULT_RATING) -> Tensor:
    """The ``impute`` rule: every NaN rating becomes ``default_rating`` (official lambda-DPO code: 1.0)."""
    return torch.nan_to_num(ratings, nan=default_rating)


def reduce_ratings(ratings: Tensor, mask: Optional[Tensor] = None, *, reduction: str = "mean",
                   lam: Optional[Tensor] = None) -> Tensor:
    """One score per response from ``[B, N, m]`` ratings (``[B, N]`` passes through), over the available
    ratings only:

        mean:   S_i = sum_{k rated} R_{k,i} / |{k rated}|
        lambda: S_i = sum_{k rated} lam_k R_{k,i} / sum_{k rated} lam_k      (lam: [m] or [B, m])

    A response with no available rating (or, for ``lambda``, only ratings of zero-weight dimensions) gets
    NaN, i.e. it is unrated; so are padded responses. Impute first (:func:`impute_ratings`) for the
    official behaviour.
    """
    if reduction not in SCORE_REDUCTIONS:
        raise ValueError(f"reduce_ratings: reduction={reduction!r} is not one of {SCORE_REDUCTIONS}")
    r = ratings if ratings.is_floating_point() else ratings.to(torch.float64)
    nan = torch.full((), math.nan, dtype=r.dtype, device=r.device)
    if r.dim() == 2:
        out = r
    else:
        if r.dim() != 3:
            raise ValueError(f"reduce_ratings: ratings must be [B, N, m] or [B, N], got {tuple(r.shape)}")
        avail = ~torch.isnan(r)
        if reduction == "mean":
            w = torch.ones_like(r)
        else:
            if lam is None:
                raise ValueError("reduce_ratings(reduction='lambda') needs lam, [m] or [B, m]")
            lam_t = torch.as_tensor(lam).to(device=r.device, dtype=r.dtype)
            lam_t = lam_t.expand(r.shape[0], -1) if lam_t.dim() == 1 else lam_t
            if tuple(lam_t.shape) != (r.shape[0], r.shape[2]):
                raise ValueError(f"reduce_ratings: lam must be [m] or [B, m] = {(r.shape[0], r.shape[2])}, "
                                 f"got {tuple(lam_t.shape)}")
            w = lam_t.unsqueeze(1).expand_as(r)
        w = torch.where(avail, w, torch.zeros((), dtype=r.dtype, device=r.device))
        total = (w * torch.where(avail, r, torch.zeros_like(r))).sum(-1)
        weight = w.sum(-1)
        out = torch.where(weight > 0, total / torch.where(weight > 0, weight, torch.ones_like(weight)), nan)
    if mask is not None:
        out = torch.where(mask.to(device=out.device, dtype=torch.bool), out, nan)
    return out


def _normalised_ranks(r: Tensor, rated: Tensor) -> Tensor:
    """``(K - rank) / (K - 1)``: 1 for the best, 0 for the worst; ties share their mean rank; K = 1 -> 0.5."""
    win = lipo_psi_from_pairwise(_pairwise_win_matrix(r, higher_is_better=True), rated)
    k = rated.sum(-1, keepdim=True).to(r.dtype)
    # K * win_rate = K - mean_rank + 0.5 (the diagonal's 0.5 included), so this is (K - rank) / (K - 1).
    return torch.where(k > 1, (k * win - 0.5) / (k - 1).clamp(min=1), torch.full_like(win, 0.5))


def lipo_psi(scores: Tensor, mask: Optional[Tensor] = None, *, rule: str = "win_rate",
             temperature: float = 1.0, win_probs: Optional[Tensor] = None) -> Tensor:
    """LiPO labels psi ``[B, N]`` from one score per response (NaN = unrated), by ``rule``:

    * ``win_rate`` (default): Psi_ki = 1[S_k > S_i] + 0.5 * 1[S_k = S_i], psi_k = (1/K) sum_i Psi_ki over
      the K rated responses (diagonal 0.5 included): the LiPO paper's indicator rule (Sec. 5.4) applied to
      scores; scale-free.
    * ``bradley_terry``: Psi_ki = sigmoid((S_k - S_i) / T), same average (diagonal sigmoid(0) = 0.5); keeps
      the score gaps.
    * ``raw``: psi = S as given (scores already in [0, 1], e.g. reward-model probabilities).
    * ``minmax``: (S - min) / (max - min) over the prompt's rated responses; all tied -> 0.5.
    * ``ranks``: (K - rank) / (K - 1), rank 1 = best, ties at their mean rank.
    * ``matrix``: psi_k = (1/K) sum_i W_ki with a supplied win-probability matrix ``win_probs [B, N, N]``
      (LiPO Sec. 5), its diagonal taken as 0.5 whatever it holds; every valid response is rated.

    Returns psi with NaN at unrated and padded responses, so the LiPO losses leave them out of every pair.
    """
    if rule not in LIPO_LABEL_RULES:
        raise ValueError(f"lipo_psi: rule={rule!r} is not one of {LIPO_LABEL_RULES}")
    if not temperature > 0:
        raise ValueError(f"lipo_psi: temperature={temperature!r} must be > 0")
    s = scores if scores.is_floating_point() else scores.to(torch.float64)
    valid = torch.ones_like(s, dtype=torch.bool) if mask is None else mask.to(device=s.device,
                                                                               dtype=torch.bool)
    nan = torch.full((), math.nan, dtype=s.dtype, device=s.device)
    if rule == "matrix":
        if win_probs is None:
            raise ValueError("lipo_psi(rule='matrix') needs win_probs [B, N, N]: the data's 'win_probs' "
                             "column (docs/data.md); this batch has none")
        w = win_probs.to(device=s.device, dtype=s.dtype)
        if tuple(w.shape) != (*s.shape, s.shape[-1]):
            raise ValueError(f"lipo_psi: win_probs must be [B, N, N] = {(*s.shape, s.shape[-1])}, got "
                             f"{tuple(w.shape)}")
        eye = torch.eye(s.shape[-1], dtype=torch.bool, device=s.device)
        w = torch.where(eye, torch.full((), 0.5, dtype=s.dtype, device=s.device), w)
        pairs = valid.unsqueeze(-1) & valid.unsqueeze(-2)
        if torch.isnan(torch.where(pairs, w, torch.zeros_like(w))).any():
            raise ValueError("lipo_psi: win_probs has a missing (NaN) entry between two real responses")
        return torch.where(valid, lipo_psi_from_pairwise(torch.where(pairs, w, torch.zeros_like(w)), valid),
                           nan)
    rated = valid & ~torch.isnan(s)
    r = torch.where(rated, s, torch.zeros((), dtype=s.dtype, device=s.device))
    if rule == "win_rate":
        psi = lipo_psi_from_pairwise(_pairwise_win_matrix(r, higher_is_better=True), rated)
    elif rule == "bradley_terry":
        psi = lipo_psi_from_pairwise(torch.sigmoid((r.unsqueeze(-1) - r.unsqueeze(-2)) / temperature), rated)
    elif rule == "raw":
        psi = r
    elif rule == "ranks":
        psi = _normalised_ranks(r, rated)
    else:  # minmax
        inf = torch.full((), math.inf, dtype=s.dtype, device=s.device)
        lo = torch.where(rated, r, inf).amin(-1, keepdim=True)
        hi = torch.where(rated, r, -inf).amax(-1, keepdim=True)
        span = hi - lo
        ok = span > 0
        scaled = (r - lo) / torch.where(ok, span, torch.ones_like(span))
        psi = torch.where(ok, scaled, torch.full_like(r, 0.5))
    return torch.where(rated, psi, nan)
