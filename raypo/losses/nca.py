"""InfoNCA and NCA (Chen et al. 2024, "Noise Contrastive Alignment"; thu-ml/Noise-Contrastive-Alignment),
spec section 6.1 (CODE ``reward_trainer.py::nca_loss``; defaults from the shipped yamls / README).

Soft labels from scalar rewards ``R [B, N]`` over the valid responses:

    q = softmax( (R + first_bonus * e_0) / temperature_alpha )

``first_bonus`` (0.01 in the code) is added to response 0's reward "so A0 has the highest reward even if
r(A1) = r(A0)"; ``temperature_alpha`` (1e-4) is the code's parameter, the inverse of the paper's alpha, and at
the default the labels are effectively one-hot on the best response. The code hard-codes K = 4; here K is
the number of valid responses of each prompt. Batch value: mean over prompts with a valid response.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from raypo.losses._common import (
    LossOutput,
    check_positive,
    detached_count,
    finish,
    masked_log_softmax,
    masked_softmax,
    prepare_inputs,
    row_has_valid,
    scalar_labels,
)


def nca_soft_labels(rewards: Tensor, mask: Tensor, *, temperature_alpha: float = 1e-4,
                    first_bonus: float = 0.01) -> Tensor:
    """``q [B, N] = softmax_valid((R + first_bonus * e_0) / temperature_alpha)``; 0 at padding."""
    bonus = torch.zeros_like(rewards)
    bonus[:, 0] = first_bonus
    return masked_softmax((rewards + bonus) / temperature_alpha, mask)


def _setup(
    name: str, policy_logps: Tensor, ref_logps: Tensor, mask: Optional[Tensor], scores: Optional[Tensor],
    beta: float, temperature_alpha: float, first_bonus: float,
) -> tuple[Tensor, Tensor, Tensor]:
    check_positive(name, "beta", beta)
    check_positive(name, "temperature_alpha", temperature_alpha)
    policy, ref, mask = prepare_inputs(name, policy_logps, ref_logps, mask)
    rewards, mask = scalar_labels(name, scores, policy, mask)
    q = nca_soft_labels(rewards, mask, temperature_alpha=temperature_alpha, first_bonus=first_bonus)
    s = torch.where(mask, beta * (policy - ref), torch.zeros((), dtype=policy.dtype, device=policy.device))
    return s, q, mask


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
    """InfoNCA (spec 6.1): listwise cross-entropy between reward soft labels and the implicit softmax.

        L = -sum_k q_k log softmax_valid(s)_k,   s = beta * (logp_theta - logp_ref)

    ``scores [B, N]`` = rewards R. Defaults: beta = 0.01, temperature_alpha = 1e-4, first_bonus = 0.01.
    With one-hot q this is listwise CE, i.e. DPO at N = 2 (identity 4). Log-probs summed.
    """
    name = "infonca"
    s, q, mask = _setup(name, policy_logps, ref_logps, mask, scores, beta, temperature_alpha, first_bonus)
    per_prompt = -(q * masked_log_softmax(s, mask)).sum(-1)
    return _mean_over_prompts(per_prompt, mask, s)


def nca_loss(
    policy_logps: Tensor,
    ref_logps: Tensor,
    *,
    mask: Optional[Tensor] = None,
    scores: Optional[Tensor] = None,
    beta: float = 0.01,
    temperature_alpha: float = 1e-4,
    first_bonus: float = 0.01,
) -> LossOutput:
    """NCA (spec 6.1): per-response binary NCE against the reference.

        L = -sum_k q_k log sigmoid(s_k) - (1/K) sum_k log sigmoid(-s_k),   K = number of valid responses

    Defaults as :func:`infonca_loss`. With one-hot q and K = 2 this is TRL's pairwise ``nca_pair``
    (identity 8). Log-probs summed.
    """
    name = "nca"
    s, q, mask = _setup(name, policy_logps, ref_logps, mask, scores, beta, temperature_alpha, first_bonus)
    zero = torch.zeros((), dtype=s.dtype, device=s.device)
    k = mask.sum(-1).clamp(min=1).to(s.dtype)
    pos = -(q * F.logsigmoid(s)).sum(-1)
    neg = -torch.where(mask, F.logsigmoid(-s), zero).sum(-1) / k
    return _mean_over_prompts(pos + neg, mask, s)
