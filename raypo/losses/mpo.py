"""MPO / W-MPO: Multi-Preference Optimization (Gupta et al., arXiv 2412.04628), docs/loss_reference.md §5.

No public code exists; the formula is the paper's (and the code in its Appendix K), except that a prompt
whose scores are all equal is skipped instead of clamped to a loss of about 23 (§10.12).
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
    masked_logsumexp,
    prepare_inputs,
    row_has_valid,
    scalar_labels,
)
from raypo.losses.labels import MPO_THRESHOLDS, mpo_sets, mpo_threshold

WEIGHTINGS = ("absolute", "signed")


def _check_options(name: str, threshold: str, weighting: str) -> None:
    checks = (("threshold", threshold, MPO_THRESHOLDS), ("weighting", weighting, WEIGHTINGS))
    for key, value, options in checks:
        if value not in options:
            raise LossHyperparameterError(f"{name}: {key}={value!r} is not one of {', '.join(options)}")


def _mpo_labels(name: str, scores: Optional[Tensor], like: Tensor, mask: Tensor, threshold: str = "mean"
                ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(labels, mask, positive, counted)``: the labels in ``like``'s dtype (NaN = invalid) and the MPO
    sets; shared by the losses and :func:`mpo_denominator`."""
    labels, mask = scalar_labels(name, scores, like, mask)
    positive, _, counted = mpo_sets(labels, mask, threshold)
    return labels, mask, positive, counted


def mpo_denominator(mask: Tensor, scores: Optional[Tensor], *, dtype: torch.dtype, name: str = "mpo",
                    threshold: str = "mean", **_hparams: object) -> Tensor:
    """The mpo / wmpo denominator (prompts with a non-empty ``Y+``) without log-probs.

    ``mask``: prepared bool ``[B, N]``; ``dtype``: the compute dtype; other hyperparameters are ignored.
    """
    _, _, _, counted = _mpo_labels(name, scores, label_like(mask, dtype), mask, threshold)
    return detached_count(counted, dtype)


def _mpo(name: str, policy_logps: Tensor, ref_logps: Tensor, mask: Optional[Tensor], scores: Optional[Tensor],
         beta: float, alpha: float, threshold: str = "mean", weighting: str = "absolute") -> LossOutput:
    check_positive(name, "beta", beta)
    if not alpha >= 0:
        raise LossHyperparameterError(f"{name}: alpha={alpha!r} must be >= 0 (0 = MPO, > 0 = W-MPO)")
    _check_options(name, threshold, weighting)
    policy, ref, mask = prepare_inputs(name, policy_logps, ref_logps, mask)
    labels, mask, positive, counted = _mpo_labels(name, scores, policy, mask, threshold)
    zero = torch.zeros((), dtype=policy.dtype, device=policy.device)
    s = torch.where(mask, beta * (policy - ref), zero)
    bar = mpo_threshold(torch.where(mask, labels, zero).to(torch.float64), mask, threshold).to(policy.dtype)
    deviation = torch.where(mask, labels - bar, zero)
    r = s + alpha * (deviation.abs() if weighting == "absolute" else deviation)
    per_prompt = masked_logsumexp(r, mask) - masked_logsumexp(r, positive)
    numerator = torch.where(counted, per_prompt, zero).sum()
    denominator = detached_count(counted, policy.dtype)
    has_valid = row_has_valid(mask)
    metrics = {
        "num_prompts": detached_count(has_valid, policy.dtype),
        "num_skipped": detached_count(has_valid & ~counted, policy.dtype),
        "num_positive": detached_count(positive & counted.unsqueeze(-1), policy.dtype),
    }
    return finish(numerator, denominator, metrics, s)


def mpo_loss(
    policy_logps: Tensor,
    ref_logps: Tensor,
    *,
    mask: Optional[Tensor] = None,
    scores: Optional[Tensor] = None,
    beta: float = 0.05,
    alpha: float = 0.0,
    threshold: str = "mean",
    weighting: str = "absolute",
) -> LossOutput:
    """MPO (docs/loss_reference.md §5.2), set-level contrast of above-mean against all responses.

        S_bar = mean of the valid scores,  Y+ = {i valid: S_i > S_bar},  Y- = valid minus Y+
        r'_i  = s_i + alpha * |S_i - S_bar|,  s_i = beta * (logp_theta[i] - logp_ref[i])
        L     = -log( sum_{Y+} exp(r') / sum_{valid} exp(r') ) = LSE_valid(r') - LSE_{Y+}(r')

    ``scores [B, N]``: one scalar score per response (e.g. a reward-model score); NaN = invalid.
    Prompts with all scores equal (Y+ empty) are skipped: ``metrics["num_skipped"]``, not in the
    denominator; an all-skipped batch gives loss 0 with ``metrics["all_skipped"] = 1``.
    N = 2 gives DPO for any alpha (§7 identity 6). Defaults: beta = 0.05, alpha = 0. Log-probs summed.

    ``threshold``: the partition statistic S_bar, ``mean`` | ``median`` | ``trimmed_mean`` (the MPO paper's
    Table 7; :func:`raypo.losses.labels.mpo_threshold`). ``weighting`` (with alpha > 0): ``absolute``,
    r' = s + alpha |S - S_bar| (the paper's Eq. 6-7), or ``signed``, r' = s + alpha (S - S_bar) (its
    Appendix D, Eq. 14-16 and Algorithm 2).
    """
    return _mpo("mpo", policy_logps, ref_logps, mask, scores, beta, alpha, threshold, weighting)


def wmpo_loss(
    policy_logps: Tensor,
    ref_logps: Tensor,
    *,
    mask: Optional[Tensor] = None,
    scores: Optional[Tensor] = None,
    beta: float = 0.05,
    alpha: Optional[float] = None,
    threshold: str = "mean",
    weighting: str = "absolute",
) -> LossOutput:
    """W-MPO: :func:`mpo_loss` with reward-weighted margins, alpha > 0 required (W-MPO Eq. 6-7).

    Reference: docs/loss_reference.md §5.3.

    alpha has no default: the paper reports 0.1 best in its ablation and 10 in its appendix, and the right
    value depends on the score scale, so it is a search-space axis. Default beta = 0.05. ``threshold`` and
    ``weighting`` (absolute: Eq. 6-7; signed: Appendix D, Eq. 14-16) as in :func:`mpo_loss`.
    """
    if alpha is None or not alpha > 0:
        raise LossHyperparameterError(
            f"wmpo: alpha={alpha!r} must be > 0 (alpha = 0 is plain mpo); e.g. alpha=0.1 for scores in "
            "[0, 1] (the paper's ablation), or tune it with the score scale"
        )
    return _mpo("wmpo", policy_logps, ref_logps, mask, scores, beta, alpha, threshold, weighting)
