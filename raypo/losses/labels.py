"""Label construction: ratings -> target distributions, LiPO psi, MPO sets, best/worst responses.

The data layer imports these; the losses use them too, so a label means the same thing everywhere.
Shapes: ``B`` prompts, ``N`` responses (padded), ``m`` rating dimensions. ``mask[B, N]`` marks real
responses (None = all real).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Optional, Union

import torch
from torch import Tensor

__all__ = [
    "DEFAULT_RATING",
    "parse_rating",
    "ratings_tensor",
    "targets_from_ratings",
    "aggregate_ratings",
    "lipo_psi_from_ranks",
    "lipo_psi_from_pairwise",
    "lipo_psi_from_ratings",
    "mpo_sets",
    "best_worst",
]

#: lambda-DPO (docs/loss_reference.md §3.2, CODE converter.py): a missing, "", "N/A" or unparsable rating
#: becomes 1.0.
DEFAULT_RATING = 1.0

_MISSING_STRINGS = {"", "n/a", "na", "none", "null", "nan"}

RatingsLike = Union[Tensor, Sequence[Any]]


def _mask_like(x: Tensor, mask: Optional[Tensor]) -> Tensor:
    shape = x.shape[:2]
    if mask is None:
        return torch.ones(shape, dtype=torch.bool, device=x.device)
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"mask has shape {tuple(mask.shape)} but the labels have [B, N] = {tuple(shape)}")
    return mask.to(device=x.device, dtype=torch.bool)


def parse_rating(value: Any, default_rating: float = DEFAULT_RATING) -> float:
    """One raw rating -> float; None, NaN, "", "N/A" or anything unparsable -> ``default_rating``.

    This is the official lambda-DPO converter's rule (docs/loss_reference.md §3.2).
    """
    if value is None:
        return default_rating
    if isinstance(value, str):
        if value.strip().lower() in _MISSING_STRINGS:
            return default_rating
        try:
            value = float(value)
        except ValueError:
            return default_rating
    try:
        out = float(value)
    except (TypeError, ValueError):
        return default_rating
    return default_rating if math.isnan(out) else out


def ratings_tensor(ratings: RatingsLike, default_rating: float = DEFAULT_RATING,
                   dtype: torch.dtype = torch.float64) -> Tensor:
    """Nested lists ``[B][N][m]`` (or ``[B][N]``) of raw ratings -> a tensor, missing -> ``default_rating``.

    All rows must already have the same N (pad first). Tensors pass through with NaN replaced.
    """
    if isinstance(ratings, Tensor):
        t = ratings.to(dtype)
        return torch.nan_to_num(t, nan=default_rating)

    def conv(x: Any) -> Any:
        if isinstance(x, (list, tuple)):
            return [conv(v) for v in x]
        return parse_rating(x, default_rating)

    return torch.tensor(conv(ratings), dtype=dtype)


def targets_from_ratings(
    ratings: RatingsLike,
    mask: Optional[Tensor] = None,
    *,
    temperature: float = 1.0,
    default_rating: float = DEFAULT_RATING,
    eps: float = 0.0,
    missing: str = "impute",
) -> Tensor:
    """Per-dimension listwise target distributions (lambda-DPO, docs/loss_reference.md §3.2).

        p*(k)_i = exp(R_{k,i} / T) / sum_{j valid} exp(R_{k,j} / T)

    Args:
        ratings: ``[B, N, m]`` (or ``[B, N]``, treated as m = 1); NaN / missing -> ``default_rating``.
        mask: ``[B, N]`` valid responses; the softmax runs over valid responses only.
        temperature: T (official code: 1.0, raw 1-5 UltraFeedback ratings, no rescaling).
        default_rating: replacement for a missing rating (official code: 1.0).
        eps: added to every valid target entry without renormalising, as the official loss does with
            ``p* + 1e-10`` (§3.1). Default 0 here; the lambda_dpo loss applies its own ``eps``.
        missing: ``"impute"`` (the official converter, the default of this function): NaN ->
            ``default_rating``; ``"drop"`` (docs/losses.md "Missing ratings"): the softmax of dimension k
            runs over the responses rated in k only, and an unrated response's target is 0.

    Returns:
        ``[B, N, m]`` targets (``[B, N]`` if the input was 2-D); 0 at padded responses.
    """
    if temperature <= 0:
        raise ValueError(f"targets_from_ratings: temperature={temperature} must be > 0")
    r = ratings_tensor(ratings, default_rating) if not isinstance(ratings, Tensor) else ratings
    squeeze = r.dim() == 2
    if squeeze:
        r = r.unsqueeze(-1)
    if r.dim() != 3:
        raise ValueError(f"targets_from_ratings: ratings must be [B, N, m] or [B, N], got {tuple(r.shape)}")
    dtype = r.dtype if r.is_floating_point() else torch.float64
    if missing not in ("impute", "drop"):
        raise ValueError(f"targets_from_ratings: missing={missing!r} is not one of ('drop', 'impute')")
    r = r.to(dtype)
    valid = _mask_like(r, mask).unsqueeze(-1).expand_as(r)
    if missing == "drop":
        valid = valid & ~torch.isnan(r)
    r = torch.nan_to_num(r, nan=default_rating)
    logits = torch.where(valid, r / temperature, torch.full((), -1e30, dtype=dtype, device=r.device))
    p = torch.softmax(logits, dim=1)
    p = torch.where(valid, p + eps, torch.zeros((), dtype=dtype, device=r.device))
    return p.squeeze(-1) if squeeze else p


def aggregate_ratings(
    ratings: RatingsLike,
    mask: Optional[Tensor] = None,
    *,
    temperature: float = 1.0,
    default_rating: float = DEFAULT_RATING,
    missing: str = "impute",
) -> Tensor:
    """Scalar score per response from per-dimension ratings: ``mean_k p*(k)`` (docs/loss_reference.md §3.3).

    This is how the lambda-DPO trainer's pairwise baseline (``ultrafb_best_worst_dpo``) picks its best
    and worst response; feed the result to :func:`best_worst` or as ``scores`` of a pairwise loss.
    Returns ``[B, N]`` (0 at padding). ``missing="drop"``: p*(k) over the responses rated in k, a dimension
    with fewer than two rated responses left out, and the mean over the dimensions where the response is
    rated; a response with none is NaN (unrated).
    """
    p = targets_from_ratings(ratings, mask, temperature=temperature, default_rating=default_rating,
                             missing=missing)
    if p.dim() != 3:
        return p
    if missing == "impute":
        return p.mean(dim=-1)
    r = ratings_tensor(ratings, math.nan) if not isinstance(ratings, Tensor) else ratings.to(p.dtype)
    r = r.unsqueeze(-1) if r.dim() == 2 else r
    rated = _mask_like(r, mask).unsqueeze(-1) & ~torch.isnan(r)
    used = rated & (rated.sum(1, keepdim=True) >= 2)
    count = used.sum(-1)
    total = torch.where(used, p, torch.zeros((), dtype=p.dtype, device=p.device)).sum(-1)
    return torch.where(count > 0, total / count.clamp(min=1), torch.full_like(total, math.nan))


def _pairwise_win_matrix(values: Tensor, higher_is_better: bool) -> Tensor:
    """``M[b, i, j] = 1[i beats j] + 0.5 * 1[tie]``; the diagonal is 0.5 (a tie with itself)."""
    vi, vj = values.unsqueeze(-1), values.unsqueeze(-2)
    wins = (vi > vj) if higher_is_better else (vi < vj)
    return wins.to(values.dtype) + 0.5 * (vi == vj).to(values.dtype)


def lipo_psi_from_pairwise(win_prob: Tensor, mask: Optional[Tensor] = None) -> Tensor:
    """LiPO labels from a pairwise winning-probability matrix (LiPO Sec. 5; docs/loss_reference.md §2.1).

        psi_k = (1 / K) * sum_{i=1..K} Psi[k, i]         (all K columns, diagonal included as given)

    Args:
        win_prob: ``[B, N, N]`` (or ``[N, N]``), ``Psi[k, i]`` = P(response k beats response i).
            The paper sets the diagonal to 0.5; it is used as given.
        mask: ``[B, N]``; only valid columns are averaged and K is the number of valid responses.

    Returns:
        psi ``[B, N]`` (``[N]`` for a single matrix), 0 at padded responses.
    """
    squeeze = win_prob.dim() == 2
    w = win_prob.unsqueeze(0) if squeeze else win_prob
    if w.dim() != 3 or w.shape[-1] != w.shape[-2]:
        raise ValueError(f"lipo_psi_from_pairwise: expected [B, N, N], got {tuple(win_prob.shape)}")
    w = w.to(torch.float64) if not w.is_floating_point() else w
    valid = _mask_like(w, None if mask is None else (mask.unsqueeze(0) if squeeze else mask))
    zero = torch.zeros((), dtype=w.dtype, device=w.device)
    k = valid.sum(-1, keepdim=True).clamp(min=1).to(w.dtype)
    # torch.where, not a product with the mask: a NaN at a padded column must not leak into a row's sum.
    psi = torch.where(valid, torch.where(valid.unsqueeze(-2), w, zero).sum(-1) / k, zero)
    return psi.squeeze(0) if squeeze else psi


def lipo_psi_from_ranks(ranks: Tensor, mask: Optional[Tensor] = None) -> Tensor:
    """LiPO labels from ranks, 1 = best, ties allowed (LiPO Sec. 5.4; docs/loss_reference.md §2.1).

    ``M_ii = 0.5``, ``M_ij = 1[rank_i < rank_j]``, ``M_ij = 0.5`` for tied ranks (our extension), and
    ``psi = row mean of M`` over valid responses. A strict ranking gives ``psi_k = (K - rank_k + 0.5) / K``,
    e.g. ``(0.8333, 0.5, 0.1667)`` for K = 3.

    Args:
        ranks: ``[B, N]`` (or ``[N]``) ranks, smaller is better.
        mask: ``[B, N]`` valid responses.
    """
    squeeze = ranks.dim() == 1
    r = (ranks.unsqueeze(0) if squeeze else ranks).to(torch.float64)
    m = None if mask is None else (mask.unsqueeze(0) if squeeze else mask)
    psi = lipo_psi_from_pairwise(_pairwise_win_matrix(r, higher_is_better=False), m)
    return psi.squeeze(0) if squeeze else psi


def lipo_psi_from_ratings(
    ratings: RatingsLike,
    mask: Optional[Tensor] = None,
    *,
    method: str = "winrate",
    dim_weights: Optional[Sequence[float]] = None,
    rating_range: Optional[tuple[float, float]] = None,
    default_rating: float = DEFAULT_RATING,
) -> Tensor:
    """LiPO labels psi in [0, 1] from ratings (raypo rule; the paper only covers win matrices and ranks).

    Per-dimension ratings ``[B, N, m]`` are first combined into one score per response,
    ``R = sum_k w_k R_k`` with ``w = dim_weights`` (default: the mean over dimensions); missing ratings
    count as ``default_rating``. Then:

    * ``"winrate"`` (default): the rank rule of docs/loss_reference.md §2.1 applied to the ratings, i.e.
      ``M_ij = 1[R_i > R_j] + 0.5 * 1[R_i = R_j]`` and ``psi = row mean of M`` over valid responses.
      Scale-free, ties give equal psi, and it equals :func:`lipo_psi_from_ranks` of the induced ranking.
    * ``"minmax"``: ``(R - min) / (max - min)`` over the prompt's valid responses; all tied -> 0.5.
    * ``"range"``: ``(R - lo) / (hi - lo)`` with a fixed ``rating_range=(lo, hi)`` (e.g. (1, 5)), clipped
      to [0, 1]; keeps the absolute rating level across prompts.
    """
    r = ratings_tensor(ratings, default_rating)
    if r.dim() == 3:
        m = r.shape[-1]
        w = torch.full((m,), 1.0 / m, dtype=r.dtype) if dim_weights is None else torch.as_tensor(
            dim_weights, dtype=r.dtype)
        if w.shape != (m,):
            raise ValueError(
                f"lipo_psi_from_ratings: dim_weights must have {m} entries, got {tuple(w.shape)}")
        r = (r * w.to(r.device)).sum(-1)
    if r.dim() != 2:
        raise ValueError(f"lipo_psi_from_ratings: ratings must be [B, N] or [B, N, m], got {tuple(r.shape)}")
    valid = _mask_like(r, mask)
    zero = torch.zeros((), dtype=r.dtype, device=r.device)
    if method == "winrate":
        return lipo_psi_from_pairwise(_pairwise_win_matrix(r, higher_is_better=True), valid)
    if method == "minmax":
        inf = torch.full((), math.inf, dtype=r.dtype, device=r.device)
        lo = torch.where(valid, r, inf).amin(-1, keepdim=True)
        hi = torch.where(valid, r, -inf).amax(-1, keepdim=True)
        span = hi - lo
        tied = ~(span > 0)
        safe_span = torch.where(tied, torch.ones_like(span), span)
        psi = torch.where(tied, torch.full_like(r, 0.5), (r - lo) / safe_span)
        return torch.where(valid, psi, zero)
    if method == "range":
        if rating_range is None:
            raise ValueError("lipo_psi_from_ratings(method='range') needs rating_range=(lo, hi), e.g. (1, 5)")
        lo_v, hi_v = rating_range
        if not hi_v > lo_v:
            raise ValueError(f"lipo_psi_from_ratings: rating_range={rating_range} needs hi > lo")
        return torch.where(valid, ((r - lo_v) / (hi_v - lo_v)).clamp(0.0, 1.0), zero)
    raise ValueError(f"lipo_psi_from_ratings: method={method!r} is not one of ('winrate', 'minmax', 'range')")


MPO_THRESHOLDS = ("mean", "median", "trimmed_mean")


def mpo_threshold(s: Tensor, valid: Tensor, kind: str = "mean", trim: float = 0.1) -> Tensor:
    """``[B, 1]`` partition statistic of the valid scores (float64), MPO paper Table 7: ``mean``; ``median``
    (the middle value, the mean of the two middle ones for an even count); ``trimmed_mean``: the mean after
    dropping ``floor(trim * n)`` scores from each end (n valid scores; with 10 % that changes nothing below
    n = 10)."""
    n = valid.sum(-1, keepdim=True)
    zero = torch.zeros((), dtype=s.dtype, device=s.device)
    if kind == "mean":
        return torch.where(valid, s, zero).sum(-1, keepdim=True) / n.clamp(min=1)
    if kind not in MPO_THRESHOLDS:
        raise ValueError(f"MPO threshold {kind!r} is not one of {', '.join(MPO_THRESHOLDS)}")
    ordered = torch.where(valid, s, torch.full((), math.inf, dtype=s.dtype, device=s.device)).sort(-1).values
    rank = torch.arange(s.shape[-1], device=s.device).expand_as(s)
    if kind == "median":
        lo, hi = (n - 1).clamp(min=0) // 2, n.clamp(min=1) // 2
        picked = (rank == lo) | (rank == hi)
        count = 1 + (lo != hi).to(s.dtype)
        return torch.where(picked, ordered, zero).sum(-1, keepdim=True) / count
    k = torch.floor(trim * n.to(s.dtype)).long()
    kept = (rank >= k) & (rank < n - k)
    return torch.where(kept, ordered, zero).sum(-1, keepdim=True) / kept.sum(-1, keepdim=True).clamp(min=1)


MPO_SELECTIONS = ("threshold", "top_bottom")


def mpo_sets(scores: Tensor, mask: Optional[Tensor] = None, threshold: str = "mean", *,
             selection: str = "threshold", k: Optional[int] = None) -> tuple[Tensor, Tensor, Tensor]:
    """MPO positive / negative sets (Gupta et al. arXiv 2412.04628; docs/loss_reference.md §5.1).

    ``selection="threshold"`` (the paper): ``S_bar`` = the partition statistic of the valid scores
    (:func:`mpo_threshold`: the mean by default, computed in float64), ``Y+ = {i valid: S_i > S_bar}``
    (strict, a score equal to it goes to ``Y-``), ``Y- = valid minus Y+``. ``Y+`` additionally requires
    ``S_i > min`` so that float rounding can never put every response of a tied prompt into ``Y+``.

    ``selection="top_bottom"`` (raypo's option, the on-policy rule "discard the middle"; §5.4): ``Y+`` = the
    ``k`` best valid responses, ``Y-`` = the ``k`` worst, the rest discarded (in neither set, so out of the
    contrast too); ``k`` is capped at ``floor(n / 2)`` for a prompt with n valid responses, and ``k=None``
    means ``floor(n / 2)`` (only the median of an odd list is dropped). Order: score descending, first
    occurrence first on ties. The prompt counts only if ``min(S on Y+) > max(S on Y-)``.

    Either way a prompt whose valid scores are all equal (or with fewer than 2 valid responses) is skipped.
    NaN scores count as invalid responses.

    Returns:
        ``(positive [B, N] bool, negative [B, N] bool, counted [B] bool)``.
    """
    s = scores.to(torch.float64)
    valid = _mask_like(s, mask) & ~torch.isnan(s)
    s = torch.where(valid, s, torch.zeros((), dtype=s.dtype, device=s.device))
    if selection == "top_bottom":
        return _top_bottom_sets(s, valid, k)
    if selection != "threshold":
        raise ValueError(f"MPO selection {selection!r} is not one of {', '.join(MPO_SELECTIONS)}")
    bar = mpo_threshold(s, valid, threshold)
    inf = torch.full((), math.inf, dtype=s.dtype, device=s.device)
    lo = torch.where(valid, s, inf).amin(-1, keepdim=True)
    positive = valid & (s > bar) & (s > lo)
    negative = valid & ~positive
    counted = positive.any(-1)
    return positive, negative, counted


def _top_bottom_sets(s: Tensor, valid: Tensor, k: Optional[int]) -> tuple[Tensor, Tensor, Tensor]:
    """The ``top_bottom`` selection of :func:`mpo_sets` on float64 scores ``s`` (0 where invalid)."""
    if k is not None and not (isinstance(k, int) and not isinstance(k, bool) and k >= 1):
        raise ValueError(f"MPO top_bottom selection: k={k!r} must be an integer >= 1 (or None: n // 2)")
    n = valid.sum(-1, keepdim=True)
    half = n // 2
    k_eff = half if k is None else torch.clamp(half, max=k)
    ninf = torch.full((), -math.inf, dtype=s.dtype, device=s.device)
    # Stable descending sort: the rank of each response in score order, ties by index (first first).
    order = torch.sort(torch.where(valid, s, ninf), dim=-1, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(s.shape[-1], device=s.device).expand_as(order))
    positive = valid & (rank < k_eff)
    negative = valid & (rank >= n - k_eff) & ~positive
    inf = torch.full((), math.inf, dtype=s.dtype, device=s.device)
    worst_positive = torch.where(positive, s, inf).amin(-1)
    best_negative = torch.where(negative, s, ninf).amax(-1)
    counted = positive.any(-1) & negative.any(-1) & (worst_positive > best_negative)
    return positive & counted.unsqueeze(-1), negative & counted.unsqueeze(-1), counted


def best_worst(scores: Tensor, mask: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor]:
    """Best (argmax, first occurrence) and worst (argmin, first occurrence) valid response per prompt.

    NaN scores count as invalid. A prompt is usable only if it has 2+ valid responses and
    ``score[best] > score[worst]``; tied prompts are reported so the pairwise losses can skip them.

    Returns:
        ``(best [B] long, worst [B] long, usable [B] bool)``.
    """
    if scores.dim() != 2:
        raise ValueError(f"best_worst: scores must be [B, N], got {tuple(scores.shape)}")
    s = scores if scores.is_floating_point() else scores.to(torch.float64)
    valid = _mask_like(s, mask) & ~torch.isnan(s)
    hi = torch.where(valid, s, torch.full((), -math.inf, dtype=s.dtype, device=s.device))
    lo = torch.where(valid, s, torch.full((), math.inf, dtype=s.dtype, device=s.device))
    # torch.argmax/argmin return the first occurrence of the extreme value.
    best = hi.argmax(-1)
    worst = lo.argmin(-1)
    s_best = hi.gather(-1, best.unsqueeze(-1)).squeeze(-1)
    s_worst = lo.gather(-1, worst.unsqueeze(-1)).squeeze(-1)
    usable = (valid.sum(-1) >= 2) & (s_best > s_worst)
    return best, worst, usable
