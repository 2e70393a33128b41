"""Lambda-weighted listwise DPO (Sun et al., arXiv 2506.19780; yuhui15/Multi-Preference-Lambda-weighted-DPO).

Reference: docs/loss_reference.md §3. The official code hard-codes N = m = 4 and one lambda per batch;
raypo takes any N (padding masked), any m, and lambda per prompt ``[B, m]`` or shared ``[m]``.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from raypo.losses._common import (
    LossHyperparameterError,
    LossOutput,
    check_positive,
    detached_count,
    finish,
    label_like,
    masked_log_softmax,
    prepare_inputs,
    row_has_valid,
)
from raypo.losses.labels import DEFAULT_RATING, targets_from_ratings


def _lambda_matrix(lam: Optional[Tensor], batch: int, m: int, like: Tensor) -> Tensor:
    if lam is None:
        raise LossHyperparameterError(
            "lambda_dpo: needs lam, [m] or [B, m] weights on the simplex; sample them with a "
            "raypo.train.lambda_schedules "
            "schedule (e.g. uniform) or pass a fixed vector such as [0.25, 0.25, 0.25, 0.25]"
        )
    lam = torch.as_tensor(lam).to(device=like.device, dtype=like.dtype)
    if lam.dim() == 1:
        lam = lam.unsqueeze(0).expand(batch, -1)
    if lam.dim() != 2 or lam.shape != (batch, m):
        raise LossHyperparameterError(
            f"lambda_dpo: lam must be [m] = [{m}] or [B, m] = [{batch}, {m}], got {tuple(lam.shape)}"
        )
    return lam


def _ratings(name: str, scores: Optional[Tensor], like: Tensor) -> Tensor:
    """Checks the ratings and returns them as ``[B, N, m]`` in ``like``'s dtype and device."""
    if scores is None:
        raise LossHyperparameterError(f"{name}: needs scores, per-dimension ratings [B, N, m]")
    ratings = scores.to(device=like.device, dtype=like.dtype)
    if ratings.dim() == 2:
        ratings = ratings.unsqueeze(-1)
    if ratings.dim() != 3 or ratings.shape[:2] != like.shape:
        raise LossHyperparameterError(
            f"{name}: scores must be [B, N, m] with [B, N] = {tuple(like.shape)}, got {tuple(scores.shape)}"
        )
    return ratings


def lambda_dpo_denominator(mask: Tensor, scores: Optional[Tensor], *, dtype: torch.dtype,
                           lam: Optional[Tensor] = None, **_hparams: object) -> Tensor:
    """The lambda_dpo denominator (prompts with a valid response) without log-probs.

    ``mask``: prepared bool ``[B, N]``; ``dtype``: the compute dtype. The ratings and lam are checked as
    the loss checks them; NaN ratings are missing (``default_rating``), not invalid, so they never change
    the count. Other hyperparameters are ignored.
    """
    like = label_like(mask, dtype)
    ratings = _ratings("lambda_dpo", scores, like)
    _lambda_matrix(lam, ratings.shape[0], ratings.shape[2], like)
    return detached_count(row_has_valid(mask), dtype)


def lambda_dpo_loss(
    policy_logps: Tensor,
    ref_logps: Tensor,
    *,
    mask: Optional[Tensor] = None,
    scores: Optional[Tensor] = None,
    lam: Optional[Tensor] = None,
    beta: float = 0.1,
    temperature: float = 1.0,
    default_rating: float = DEFAULT_RATING,
    eps: float = 1e-10,
    scores_are_targets: bool = False,
) -> LossOutput:
    """lambda-DPO (docs/loss_reference.md §3.1; CODE ``trainer.py::_compute_lambda_dpo_loss``).

        P_theta(i) = softmax_{valid}(s)_i,  s_i = beta * (logp_theta[i] - logp_ref[i])
        p*(k)      = softmax_{valid}(R_k / T)                       (§3.2)
        L_k(b)     = -sum_{i valid} (p*_{k,i} + eps) * log P_theta(i)
        L(b)       = sum_k lam_{b,k} * L_k(b);     batch value = mean over prompts with a valid response

    Args:
        scores: per-dimension ratings ``[B, N, m]`` (``[B, N]`` means m = 1). NaN = missing rating,
            replaced by ``default_rating`` (official: 1.0). With ``scores_are_targets=True`` they are
            already target distributions p* (e.g. from :func:`raypo.losses.labels.targets_from_ratings`).
        lam: ``[m]`` (one lambda for the batch, the official behaviour) or ``[B, m]`` (per prompt, the raypo
            default schedule). lam is used as given (the official table rows sum to 0.999-1.001).
        beta: 0.1 (``pref_beta`` default). temperature T: 1.0 (raw 1-5 ratings, no rescaling).
        eps: 1e-10, added to every valid target entry as the official code does; eps = 0 makes
            ``sum_k lam_k L_k = CE(sum_k lam_k p*(k), P_theta)`` exact (§7 identity 5).

    Log-probs: length-normalised (``seq_lp / valid_len``) for policy and reference, as in the official code.
    Metrics: ``L_k_sum [m]`` (per-dimension loss sums over counted prompts, unweighted by lambda).
    """
    name = "lambda_dpo"
    check_positive(name, "beta", beta)
    check_positive(name, "temperature", temperature)
    if not eps >= 0:
        raise LossHyperparameterError(f"{name}: eps={eps!r} must be >= 0 (official code: 1e-10)")
    policy, ref, mask = prepare_inputs(name, policy_logps, ref_logps, mask)
    ratings = _ratings(name, scores, policy)
    batch, _, m = ratings.shape
    zero = torch.zeros((), dtype=policy.dtype, device=policy.device)
    valid3 = mask.unsqueeze(-1).expand_as(ratings)
    if scores_are_targets:
        targets = torch.where(valid3, torch.nan_to_num(ratings, nan=0.0) + eps, zero)
    else:
        targets = targets_from_ratings(ratings, mask, temperature=temperature, default_rating=default_rating,
                                       eps=eps)
    lam_b = _lambda_matrix(lam, batch, m, policy)

    s = torch.where(mask, beta * (policy - ref), zero)
    log_p = masked_log_softmax(s, mask)  # [B, N], 0 at padding
    per_dim = -(targets * log_p.unsqueeze(-1)).sum(dim=1)  # [B, m]
    per_prompt = (lam_b * per_dim).sum(-1)

    has_valid = row_has_valid(mask)
    numerator = torch.where(has_valid, per_prompt, zero).sum()
    denominator = detached_count(has_valid, policy.dtype)
    metrics = {
        "num_prompts": denominator.clone(),
        "L_k_sum": torch.where(has_valid.unsqueeze(-1), per_dim, zero).sum(0),
        "lambda_sum": torch.where(has_valid.unsqueeze(-1), lam_b, zero).sum(0),
    }
    return finish(numerator, denominator, metrics, s)
