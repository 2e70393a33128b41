"""InfoNCA and NCA (Chen et al. 2024, "Noise Contrastive Alignment"; thu-ml/Noise-Contrastive-Alignment),
docs/loss_reference.md §6.1 (CODE ``reward_trainer.py::nca_loss`` and ``preference_trainer.py``; defaults
from the shipped yamls / README).

Soft labels from scalar rewards ``R [B, N]`` over the valid responses:

    q = softmax( (R + first_bonus * e_0) / temperature_alpha )

``first_bonus`` (0.01 in the code) is added to response 0's reward "so A0 has the highest reward even if
r(A1) = r(A0)"; ``temperature_alpha`` (1e-4) is the code's parameter, the inverse of the paper's alpha, and at
the default the labels are effectively one-hot on the best response. The code hard-codes K = 4; here K is
the number of valid responses of each prompt. Batch value: mean over prompts with a valid response.

The NCA loss also has the preference trainer's two pairwise forms (``variant="pair"``: the code's
``loss_type="NCA"``; ``variant="biased"``: ``loss_type="biasedNCA"``), which compare a chosen and a rejected
response exactly as the other pairwise losses pick them (:func:`raypo.losses.pairwise.select_pair`).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from raypo.losses._common import (
    LossOutput,
    check_choice,
    check_positive,
    detached_count,
    finish,
    label_like,
    masked_log_softmax,
    masked_softmax,
    prepare_inputs,
    row_has_valid,
    scalar_labels,
)
from raypo.losses.pairwise import pair_denominator, pair_output, select_pair

#: ``nca_loss(variant=...)``: the listwise NCA of ``reward_trainer.py`` (default), and the pairwise
#: ``loss_type="NCA"`` and ``loss_type="biasedNCA"`` of ``preference_trainer.py``.
NCA_VARIANTS = ("listwise", "pair", "biased")


def nca_soft_labels(rewards: Tensor, mask: Tensor, *, temperature_alpha: float = 1e-4,
                    first_bonus: float = 0.01) -> Tensor:
    """``q [B, N] = softmax_valid((R + first_bonus * e_0) / temperature_alpha)``; 0 at padding.

    The labels carry no gradient. They are computed in float64 with the row's largest valid
    ``R + bonus`` subtracted before the division by ``temperature_alpha`` (softmax is shift-invariant), so
    the tiny default ``temperature_alpha = 1e-4`` (logits of 1e4-1e6 for ratings) cannot cancel
    catastrophically; the result is returned in ``rewards``' floating dtype (float64 for integer input).
    """
    out_dtype = rewards.dtype if rewards.is_floating_point() else torch.float64
    mask = mask.to(device=rewards.device, dtype=torch.bool)
    r = rewards.detach().to(torch.float64)
    zero = torch.zeros((), dtype=torch.float64, device=r.device)
    bonus = torch.zeros_like(r)
    bonus[:, 0] = first_bonus
    x = torch.where(mask, r + bonus, zero)
    top = torch.where(mask, x, torch.full((), -math.inf, dtype=torch.float64, device=r.device))
    top = top.amax(dim=-1, keepdim=True)
    top = torch.where(torch.isfinite(top), top, zero)  # rows without a valid response
    q = masked_softmax((x - top) / temperature_alpha, mask)
    return q.to(out_dtype)


def _setup(
    name: str, policy_logps: Tensor, ref_logps: Tensor, mask: Optional[Tensor], scores: Optional[Tensor],
    beta: float, temperature_alpha: float, first_bonus: float,
) -> tuple[Tensor, Tensor, Tensor]:
    check_positive(name, "beta", beta)
    check_positive(name, "temperature_alpha", temperature_alpha)
    policy, ref, mask = prepare_inputs(name, policy_logps, ref_logps, mask)
    _, mask = scalar_labels(name, scores, policy, mask)
    # Labels from the scores as given (float64 when they are), not rounded to the compute dtype first.
    q = nca_soft_labels(scores.to(device=policy.device), mask, temperature_alpha=temperature_alpha,
                        first_bonus=first_bonus).to(policy.dtype)
    s = torch.where(mask, beta * (policy - ref), torch.zeros((), dtype=policy.dtype, device=policy.device))
    return s, q, mask


def infonca_denominator(mask: Tensor, scores: Optional[Tensor], *, dtype: torch.dtype,
                        name: str = "infonca", **_hparams: object) -> Tensor:
    """The infonca (and listwise nca) denominator, prompts with a valid response, without log-probs.

    ``mask``: prepared bool ``[B, N]``; ``dtype``: the compute dtype; NaN labels mark responses invalid.
    """
    _, mask = scalar_labels(name, scores, label_like(mask, dtype), mask)
    return detached_count(row_has_valid(mask), dtype)


def nca_denominator(mask: Tensor, scores: Optional[Tensor], *, dtype: torch.dtype, name: str = "nca",
                    variant: str = "listwise", **_hparams: object) -> Tensor:
    """The nca denominator without log-probs: as infonca for ``"listwise"``, else usable pairs (the pair
    variants pick (chosen, rejected) as :func:`_pair_nca` does, temperature 1)."""
    check_choice(name, "variant", variant, NCA_VARIANTS)
    if variant != "listwise":
        return pair_denominator(mask, scores, dtype=dtype, name=name)
    return infonca_denominator(mask, scores, dtype=dtype, name=name)


def _mean_over_prompts(per_prompt: Tensor, mask: Tensor, s: Tensor) -> LossOutput:
    has_valid = row_has_valid(mask)
    zero = torch.zeros((), dtype=per_prompt.dtype, device=per_prompt.device)
    numerator = torch.where(has_valid, per_prompt, zero).sum()
    denominator = detached_count(has_valid, per_prompt.dtype)
    return finish(numerator, denominator, {"num_prompts": denominator.clone()}, s)


def infonca_loss(
    policy_logps: Tensor,
    ref_logps: Tensor,
    *,
    mask: Optional[Tensor] = None,
    scores: Optional[Tensor] = None,
    beta: float = 0.01,
    temperature_alpha: float = 1e-4,
    first_bonus: float = 0.01,
) -> LossOutput:
    """InfoNCA: listwise cross-entropy between reward soft labels and the implicit softmax.

    Reference: docs/loss_reference.md §6.1 (Chen et al. arXiv 2402.05369).

        L = -sum_k q_k log softmax_valid(s)_k,   s = beta * (logp_theta - logp_ref)

    ``scores [B, N]`` = rewards R. Defaults: beta = 0.01, temperature_alpha = 1e-4, first_bonus = 0.01.
    With one-hot q this is listwise CE, i.e. DPO at N = 2 (§7 identity 4). Log-probs summed.
    """
    name = "infonca"
    s, q, mask = _setup(name, policy_logps, ref_logps, mask, scores, beta, temperature_alpha, first_bonus)
    per_prompt = -(q * masked_log_softmax(s, mask)).sum(-1)
    return _mean_over_prompts(per_prompt, mask, s)


def _pair_nca(name: str, policy_logps: Tensor, ref_logps: Tensor, mask: Optional[Tensor],
              scores: Optional[Tensor], beta: float, variant: str) -> LossOutput:
    """The pairwise forms of ``preference_trainer.py`` on the selected (chosen, rejected) pair."""
    policy, ref, mask = prepare_inputs(name, policy_logps, ref_logps, mask)
    sel = select_pair(name, policy, ref, mask, scores)
    s_w, s_l = beta * (sel.policy_w - sel.ref_w), beta * (sel.policy_l - sel.ref_l)
    if variant == "pair":
        per_prompt = -F.logsigmoid(s_w) - 0.5 * F.logsigmoid(-s_w) - 0.5 * F.logsigmoid(-s_l)
    else:
        per_prompt = -F.logsigmoid(s_w) - F.logsigmoid(-s_l)
    return pair_output(per_prompt, sel, beta * (policy - ref), s_w, s_l)


def nca_loss(
    policy_logps: Tensor,
    ref_logps: Tensor,
    *,
    mask: Optional[Tensor] = None,
    scores: Optional[Tensor] = None,
    beta: float = 0.01,
    temperature_alpha: float = 1e-4,
    first_bonus: float = 0.01,
    variant: str = "listwise",
) -> LossOutput:
    """NCA (docs/loss_reference.md §6.1): binary NCE of each response against the reference.

        variant="listwise" (default; CODE reward_trainer.py::nca_loss):
            L = -sum_k q_k log sigmoid(s_k) - (1/K) sum_k log sigmoid(-s_k),   K = number of valid responses
        variant="pair"   (pairwise NCA, CODE preference_trainer.py loss_type="NCA"):
            L = -log sigmoid(s_w) - 1/2 log sigmoid(-s_w) - 1/2 log sigmoid(-s_l)
        variant="biased" (CODE preference_trainer.py loss_type="biasedNCA"):
            L = -log sigmoid(s_w) - log sigmoid(-s_l)

    s = beta * (logp_theta - logp_ref); q as in :func:`nca_soft_labels`. The pair variants take the chosen
    w and rejected l as every pairwise loss does: columns (0, 1) when N = 2 and ``scores`` is None, else the
    best and worst valid responses by score (first occurrence; tied prompts skipped and counted in
    ``metrics["num_skipped"]``); they ignore ``temperature_alpha`` and ``first_bonus``. Batch value: mean
    over prompts (listwise: prompts with a valid response; pair variants: prompts with a usable pair).

    Defaults: beta = 0.01, temperature_alpha = 1e-4, first_bonus = 0.01 (as :func:`infonca_loss`),
    variant = "listwise". With one-hot q and K = 2 the listwise form equals the pairwise one (§7 identity 8).
    Log-probs summed.
    """
    name = "nca"
    check_choice(name, "variant", variant, NCA_VARIANTS)
    if variant != "listwise":
        check_positive(name, "beta", beta)
        return _pair_nca(name, policy_logps, ref_logps, mask, scores, beta, variant)
    s, q, mask = _setup(name, policy_logps, ref_logps, mask, scores, beta, temperature_alpha, first_bonus)
    zero = torch.zeros((), dtype=s.dtype, device=s.device)
    k = mask.sum(-1).clamp(min=1).to(s.dtype)
    pos = -(q * F.logsigmoid(s)).sum(-1)
    neg = -torch.where(mask, F.logsigmoid(-s), zero).sum(-1) / k
    return _mean_over_prompts(pos + neg, mask, s)
