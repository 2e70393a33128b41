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
    check_choice,
    check_positive,
    detached_count,
    finish,
    label_like,
    masked_log_softmax,
    prepare_inputs,
    row_has_valid,
)
from raypo.losses.label_rules import MISSING_RULES
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


def _dimension_weights(ratings: Tensor, mask: Tensor, lam_b: Tensor, missing: str
                       ) -> tuple[Tensor, Tensor, Tensor]:
    """``(rated [B, N, m], weights [B, m], counted [B])`` under the missing-rating rule.

    impute: every valid response is rated, lam as given, every prompt with a valid response counted.
    drop: a dimension with fewer than two rated responses drops out and lam is renormalised over the
    remaining ones (only where one dropped, so complete ratings give the official value); a prompt with no
    remaining lambda mass is not counted.
    """
    valid3 = mask.unsqueeze(-1).expand_as(ratings)
    has_valid = row_has_valid(mask)
    if missing == "impute":
        return valid3, lam_b, has_valid
    rated = valid3 & ~torch.isnan(ratings)
    usable = rated.sum(1) >= 2  # [B, m]
    kept = torch.where(usable, lam_b, torch.zeros((), dtype=lam_b.dtype, device=lam_b.device))
    mass = kept.sum(-1, keepdim=True)
    renorm = kept / torch.where(mass > 0, mass, torch.ones_like(mass))
    weights = torch.where(usable.all(-1, keepdim=True), lam_b, renorm)
    return rated, weights, has_valid & (mass.squeeze(-1) > 0)


def lambda_dpo_denominator(mask: Tensor, scores: Optional[Tensor], *, dtype: torch.dtype,
                           lam: Optional[Tensor] = None, missing_ratings: str = "drop",
                           **_hparams: object) -> Tensor:
    """The lambda_dpo denominator (counted prompts) without log-probs.

    ``mask``: prepared bool ``[B, N]``; ``dtype``: the compute dtype. The ratings and lam are checked as
    the loss checks them. ``missing_ratings="impute"``: every prompt with a valid response; ``"drop"``:
    prompts left with a usable dimension of positive lambda mass (:func:`lambda_dpo_loss`). Other
    hyperparameters are ignored.
    """
    check_choice("lambda_dpo", "missing_ratings", missing_ratings, MISSING_RULES)
    like = label_like(mask, dtype)
    ratings = _ratings("lambda_dpo", scores, like)
    lam_b = _lambda_matrix(lam, ratings.shape[0], ratings.shape[2], like)
    _, _, counted = _dimension_weights(ratings, mask, lam_b, missing_ratings)
    return detached_count(counted, dtype)


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
    missing_ratings: str = "drop",
) -> LossOutput:
    """lambda-DPO (docs/loss_reference.md §3.1; CODE ``trainer.py::_compute_lambda_dpo_loss``).

        P_theta(i) = softmax_{valid}(s)_i,  s_i = beta * (logp_theta[i] - logp_ref[i])
        p*(k)      = softmax_{valid}(R_k / T)                       (§3.2)
        L_k(b)     = -sum_{i valid} (p*_{k,i} + eps) * log P_theta(i)
        L(b)       = sum_k lam_{b,k} * L_k(b);     batch value = mean over prompts with a valid response

    Args:
        scores: per-dimension ratings ``[B, N, m]`` (``[B, N]`` means m = 1). NaN = missing rating,
            handled by ``missing_ratings``. With ``scores_are_targets=True`` they are already target
            distributions p* (e.g. from :func:`raypo.losses.labels.targets_from_ratings`).
        missing_ratings: ``"drop"`` (default, docs/losses.md "Missing ratings"): in dimension k the target
            and the softmax run over the responses rated in k; a dimension with fewer than two rated
            responses drops out of the prompt's loss and lam is renormalised over the others; a prompt
            with no usable dimension (no lambda mass left) adds nothing and is not in the denominator.
            ``"impute"``: NaN -> ``default_rating`` (official converter: 1.0), exact official behaviour.
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
    check_choice(name, "missing_ratings", missing_ratings, MISSING_RULES)
    policy, ref, mask = prepare_inputs(name, policy_logps, ref_logps, mask)
    ratings = _ratings(name, scores, policy)
    batch, _, m = ratings.shape
    zero = torch.zeros((), dtype=policy.dtype, device=policy.device)
    lam_b = _lambda_matrix(lam, batch, m, policy)
    rated, weights, counted = _dimension_weights(ratings, mask, lam_b, missing_ratings)
    if scores_are_targets:
        targets = torch.where(rated, torch.nan_to_num(ratings, nan=0.0) + eps, zero)
    else:
        targets = targets_from_ratings(ratings, mask, temperature=temperature, default_rating=default_rating,
                                       eps=eps, missing=missing_ratings)

    s = torch.where(mask, beta * (policy - ref), zero)
    # The softmax of dimension k over its rated responses (all valid ones under "impute").
    log_p = masked_log_softmax(s.unsqueeze(-1).expand_as(ratings), rated, dim=1)  # [B, N, m]
    per_dim = -(targets * log_p).sum(dim=1)  # [B, m]
    per_prompt = (weights * per_dim).sum(-1)

    has_valid = row_has_valid(mask)
    numerator = torch.where(counted, per_prompt, zero).sum()
    denominator = detached_count(counted, policy.dtype)
    used = counted.unsqueeze(-1) & (weights > 0)
    metrics = {
        "num_prompts": detached_count(has_valid, policy.dtype),
        "num_skipped": detached_count(has_valid & ~counted, policy.dtype),
        "num_dims_dropped": detached_count(has_valid.unsqueeze(-1) & (rated.sum(1) < 2), policy.dtype),
        "L_k_sum": torch.where(counted.unsqueeze(-1), per_dim, zero).sum(0),
        "lambda_sum": torch.where(used, weights, zero).sum(0),
    }
    return finish(numerator, denominator, metrics, s)
