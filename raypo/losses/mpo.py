"""MPO / W-MPO: Multi-Preference Optimization (Gupta et al., arXiv 2412.04628), docs/loss_reference.md §5.

No public code exists; the formula is the paper's (and the code in its Appendix K), except that a prompt
whose scores are all equal is skipped instead of clamped to a loss of about 23 (§10.12).

Options besides the paper's default (each a loss hyperparameter, docs/losses.md "MPO"):

* ``threshold``: the partition statistic (mean, median, trimmed mean; the paper's Table 7);
* ``weighting``: W-MPO's absolute (Eq. 6-7) or signed (Appendix D, Eq. 14-16) deviation;
* ``reference_free``: the paper's reference-free MPO, SimPO's reward beta * logp / |y| (length-normalised,
  no reference) inside the set contrast, with SimPO's margin ``gamma`` taken off the positive set (§5.4);
* ``selection``: ``threshold`` (the paper's sets) or ``top_bottom`` (the k best against the k worst, the
  middle discarded; raypo's option for on-policy lists, :func:`raypo.losses.labels.mpo_sets`).
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
from raypo.losses.labels import MPO_SELECTIONS, MPO_THRESHOLDS, mpo_sets, mpo_threshold
from raypo.losses.pairwise import resolve_simpo_gamma

WEIGHTINGS = ("absolute", "signed")


def _check_options(name: str, threshold: str, weighting: str, selection: str, k: Optional[int]) -> None:
    checks = (("threshold", threshold, MPO_THRESHOLDS), ("weighting", weighting, WEIGHTINGS),
              ("selection", selection, MPO_SELECTIONS))
    for key, value, options in checks:
        if value not in options:
            raise LossHyperparameterError(f"{name}: {key}={value!r} is not one of {', '.join(options)}")
    if k is not None and not (isinstance(k, int) and not isinstance(k, bool) and k >= 1):
        raise LossHyperparameterError(
            f"{name}: k={k!r} must be an integer >= 1 (the number of best and of worst responses kept by "
            "selection=top_bottom), or None for n // 2")
    if k is not None and selection != "top_bottom":
        raise LossHyperparameterError(f"{name}: k={k!r} is only read by selection=top_bottom; drop k or set "
                                      "selection=top_bottom")


def _mpo_labels(name: str, scores: Optional[Tensor], like: Tensor, mask: Tensor, threshold: str = "mean",
                selection: str = "threshold", k: Optional[int] = None
                ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(labels, mask, positive, negative, counted)``: the labels in ``like``'s dtype (NaN = invalid) and
    the MPO sets; shared by the losses and :func:`mpo_denominator`."""
    labels, mask = scalar_labels(name, scores, like, mask)
    positive, negative, counted = mpo_sets(labels, mask, threshold, selection=selection, k=k)
    return labels, mask, positive, negative, counted


def mpo_denominator(mask: Tensor, scores: Optional[Tensor], *, dtype: torch.dtype, name: str = "mpo",
                    threshold: str = "mean", selection: str = "threshold", k: Optional[int] = None,
                    **_hparams: object) -> Tensor:
    """The mpo / wmpo denominator (prompts with a non-empty ``Y+``) without log-probs.

    ``mask``: prepared bool ``[B, N]``; ``dtype``: the compute dtype; other hyperparameters are ignored.
    """
    *_, counted = _mpo_labels(name, scores, label_like(mask, dtype), mask, threshold, selection, k)
    return detached_count(counted, dtype)


def _margin(name: str, beta: float, reference_free: bool, gamma: Optional[float],
            gamma_beta_ratio: Optional[float]) -> float:
    """SimPO's margin: ``gamma``, else ``gamma_beta_ratio * beta``; by default 0.25 * beta (SimPO's ratio)
    when reference-free and 0 with the reference (plain MPO)."""
    if gamma is None and gamma_beta_ratio is None and not reference_free:
        return 0.0
    g = resolve_simpo_gamma(beta, gamma, gamma_beta_ratio)
    if g < 0:
        raise LossHyperparameterError(f"{name}: the margin gamma={g} must be >= 0 (SimPO's gamma)")
    return g


def _mpo(name: str, policy_logps: Tensor, ref_logps: Optional[Tensor], mask: Optional[Tensor],
         scores: Optional[Tensor], beta: float, alpha: float, threshold: str = "mean",
         weighting: str = "absolute", reference_free: bool = False, gamma: Optional[float] = None,
         gamma_beta_ratio: Optional[float] = None, selection: str = "threshold", k: Optional[int] = None
         ) -> LossOutput:
    check_positive(name, "beta", beta)
    if not alpha >= 0:
        raise LossHyperparameterError(f"{name}: alpha={alpha!r} must be >= 0 (0 = MPO, > 0 = W-MPO)")
    _check_options(name, threshold, weighting, selection, k)
    margin = _margin(name, beta, reference_free, gamma, gamma_beta_ratio)
    policy, ref, mask = prepare_inputs(name, policy_logps, None if reference_free else ref_logps, mask)
    labels, mask, positive, negative, counted = _mpo_labels(name, scores, policy, mask, threshold,
                                                            selection, k)
    zero = torch.zeros((), dtype=policy.dtype, device=policy.device)
    # Reference-free: SimPO's reward beta * logp / |y| (the trainer feeds per-token means, registry
    # logp_reduction_for); else the implicit reward beta * (logp - logp_ref).
    s = torch.where(mask, beta * (policy - ref), zero)
    bar = mpo_threshold(torch.where(mask, labels, zero).to(torch.float64), mask, threshold).to(policy.dtype)
    deviation = torch.where(mask, labels - bar, zero)
    r = s + alpha * (deviation.abs() if weighting == "absolute" else deviation)
    r = r - margin * positive.to(r.dtype)  # SimPO's margin on the positive set (0 by default with a ref)
    contrast = positive | negative  # = the valid responses under selection=threshold
    per_prompt = masked_logsumexp(r, contrast) - masked_logsumexp(r, positive)
    numerator = torch.where(counted, per_prompt, zero).sum()
    denominator = detached_count(counted, policy.dtype)
    has_valid = row_has_valid(mask)
    metrics = {
        "num_prompts": detached_count(has_valid, policy.dtype),
        "num_skipped": detached_count(has_valid & ~counted, policy.dtype),
        "num_positive": detached_count(positive & counted.unsqueeze(-1), policy.dtype),
        "num_discarded": detached_count(mask & ~contrast & counted.unsqueeze(-1), policy.dtype),
    }
    return finish(numerator, denominator, metrics, s)


def mpo_loss(
    policy_logps: Tensor,
    ref_logps: Optional[Tensor],
    *,
    mask: Optional[Tensor] = None,
    scores: Optional[Tensor] = None,
    beta: float = 0.05,
    alpha: float = 0.0,
    threshold: str = "mean",
    weighting: str = "absolute",
    reference_free: bool = False,
    length_normalization: Optional[bool] = None,
    gamma: Optional[float] = None,
    gamma_beta_ratio: Optional[float] = None,
    selection: str = "threshold",
    k: Optional[int] = None,
) -> LossOutput:
    """MPO (docs/loss_reference.md §5.2), set-level contrast of above-mean against all responses.

        S_bar = mean of the valid scores,  Y+ = {i valid: S_i > S_bar},  Y- = valid minus Y+
        r'_i  = s_i + alpha * |S_i - S_bar| - gamma * 1[i in Y+],  s_i = beta * (logp_theta[i] - logp_ref[i])
        L     = -log( sum_{Y+} exp(r') / sum_{Y+ u Y-} exp(r') ) = LSE_{Y+ u Y-}(r') - LSE_{Y+}(r')

    ``scores [B, N]``: one scalar score per response (e.g. a reward-model score); NaN = invalid.
    Prompts with all scores equal (Y+ empty) are skipped: ``metrics["num_skipped"]``, not in the
    denominator; an all-skipped batch gives loss 0 with ``metrics["all_skipped"] = 1``.
    N = 2 gives DPO for any alpha (§7 identity 6). Defaults: beta = 0.05, alpha = 0. Log-probs summed.

    ``threshold``: the partition statistic S_bar, ``mean`` | ``median`` | ``trimmed_mean`` (the MPO paper's
    Table 7; :func:`raypo.losses.labels.mpo_threshold`). ``weighting`` (with alpha > 0): ``absolute``,
    r' = s + alpha |S - S_bar| (the paper's Eq. 6-7), or ``signed``, r' = s + alpha (S - S_bar) (its
    Appendix D, Eq. 14-16 and Algorithm 2).

    ``reference_free=True``: the MPO paper's reference-free variant, s_i = beta * logp_theta[i] / |y_i|
    (SimPO's reward: ``length_normalization=None`` follows reference_free, so the trainer feeds per-token
    means; ``ref_logps`` is ignored) and SimPO's margin gamma on the positive set: ``gamma`` (absolute) or
    ``gamma_beta_ratio * beta``, default 0.25 * beta as SimPO (:func:`raypo.losses.pairwise.
    resolve_simpo_gamma`); with the reference the margin defaults to 0. N = 2, reference-free, is SimPO.

    ``selection``: ``threshold`` (the sets above) or ``top_bottom``: Y+ = the ``k`` best, Y- = the ``k``
    worst valid responses, the middle out of the contrast (``k=None``: n // 2; raypo's option, §5.4,
    :func:`raypo.losses.labels.mpo_sets`); S_bar of the weighting is still over all valid responses.
    """
    return _mpo("mpo", policy_logps, ref_logps, mask, scores, beta, alpha, threshold, weighting,
                reference_free, gamma, gamma_beta_ratio, selection, k)


def wmpo_loss(
    policy_logps: Tensor,
    ref_logps: Optional[Tensor],
    *,
    mask: Optional[Tensor] = None,
    scores: Optional[Tensor] = None,
    beta: float = 0.05,
    alpha: Optional[float] = None,
    threshold: str = "mean",
    weighting: str = "absolute",
    reference_free: bool = False,
    length_normalization: Optional[bool] = None,
    gamma: Optional[float] = None,
    gamma_beta_ratio: Optional[float] = None,
    selection: str = "threshold",
    k: Optional[int] = None,
) -> LossOutput:
    """W-MPO: :func:`mpo_loss` with reward-weighted margins, alpha > 0 required (W-MPO Eq. 6-7).

    Reference: docs/loss_reference.md §5.3.

    alpha has no default: the paper reports 0.1 best in its ablation and 10 in its appendix, and the right
    value depends on the score scale, so it is a search-space axis. Default beta = 0.05. ``threshold``,
    ``weighting`` (absolute: Eq. 6-7; signed: Appendix D, Eq. 14-16), ``reference_free`` (with ``gamma`` /
    ``gamma_beta_ratio``) and ``selection`` / ``k`` as in :func:`mpo_loss`.
    """
    if alpha is None or not alpha > 0:
        raise LossHyperparameterError(
            f"wmpo: alpha={alpha!r} must be > 0 (alpha = 0 is plain mpo); e.g. alpha=0.1 for scores in "
            "[0, 1] (the paper's ablation), or tune it with the score scale"
        )
    return _mpo("wmpo", policy_logps, ref_logps, mask, scores, beta, alpha, threshold, weighting,
                reference_free, gamma, gamma_beta_ratio, selection, k)
