"""Pairwise losses: DPO, IPO, SLiC-hinge (docs/loss_reference.md §1) and SimPO (§6.2).

All take ``[B, N]`` log-probs. With ``scores=None`` they need N = 2 with column 0 the chosen and column 1
the rejected response. With ``scores [B, N]`` any N works: the chosen response is the best valid one
(argmax, first occurrence) and the rejected one the worst (argmin, first occurrence); a NaN score marks the
response invalid. Per-dimension ratings ``scores [B, N, m]`` are first reduced as the lambda-DPO trainer's
UltraFeedback best-vs-worst baseline does (§3.3, ``ultrafb_best_worst_dpo``): the mean over dimensions
of the per-dimension targets ``p*(k) = softmax_valid(R_k / temperature)`` (§3.2, T = 1.0 by default; a
NaN rating is missing and dropped from its dimension, docs/losses.md "Missing ratings"; impute it first,
e.g. with ``raypo.losses.label_rules.impute_ratings``, for the official 1.0), then best = argmax and
worst = argmin, first occurrence.
Prompts whose best and worst scores tie, or with fewer than two valid responses, are skipped: they are
counted in ``metrics["num_skipped"]`` and excluded from the denominator. Batch value = mean over the
remaining prompts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from raypo.losses._common import (
    LossHyperparameterError,
    LossOutput,
    check_choice,
    check_positive,
    check_range,
    detached_count,
    finish,
    prepare_inputs,
    row_has_valid,
)
from raypo.losses.labels import aggregate_ratings, best_worst


@dataclass
class PairSelection:
    """Chosen (w) and rejected (l) values per prompt, and which prompts are usable."""

    policy_w: Tensor
    policy_l: Tensor
    ref_w: Tensor
    ref_l: Tensor
    usable: Tensor  # [B] bool
    mask: Tensor  # [B, N] bool, the validity mask after NaN labels were removed


def pair_labels(
    name: str, mask: Tensor, scores: Optional[Tensor], *, dtype: torch.dtype, temperature: float = 1.0,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The label-only part of :func:`select_pair`: ``(chosen [B], rejected [B], usable [B], mask [B, N])``.

    ``mask`` is the prepared bool ``[B, N]`` validity mask (on the log-probs' device), ``dtype`` the compute
    dtype; the returned mask has NaN-labelled responses removed. Shared by the pairwise losses and
    :func:`pair_denominator`, so a loss and its denominator pick the same pairs.
    """
    check_positive(name, "temperature", temperature)
    if scores is None:
        if mask.shape[1] != 2:
            raise LossHyperparameterError(
                f"{name}: without scores the input must be N = 2 columns [chosen, rejected], got N = "
                f"{mask.shape[1]}; pass scores [B, N] to pick the best and worst of N responses"
            )
        w = torch.zeros(mask.shape[0], dtype=torch.long, device=mask.device)
        lo = torch.ones_like(w)
        usable = mask[:, 0] & mask[:, 1]
    elif scores.dim() == 3 and tuple(scores.shape[:2]) == tuple(mask.shape):
        ratings = scores.to(device=mask.device, dtype=torch.float64)
        # A NaN rating is missing and dropped (docs/losses.md "Missing ratings"); the trainer imputes
        # before this call under loss.missing_ratings=impute, the official converter's rule.
        aggregate = aggregate_ratings(ratings, mask, temperature=temperature, missing="drop")
        mask = mask & ~torch.isnan(aggregate)
        w, lo, usable = best_worst(aggregate, mask)
    else:
        if scores.dim() != 2 or scores.shape != mask.shape:
            raise LossHyperparameterError(
                f"{name}: scores must be [B, N] = {tuple(mask.shape)} scalar labels or [B, N, m] "
                f"per-dimension ratings, got {tuple(scores.shape)}"
            )
        scores = scores.to(mask.device)
        mask = mask & ~torch.isnan(scores.to(dtype))
        w, lo, usable = best_worst(scores, mask)
    return w, lo, usable, mask


def pair_denominator(
    mask: Tensor, scores: Optional[Tensor], *, dtype: torch.dtype, name: str = "pairwise",
    temperature: float = 1.0, **_hparams: object,
) -> Tensor:
    """The denominator of every pairwise loss (usable prompts) from the labels alone (no log-probs).

    ``mask``: prepared bool ``[B, N]``; ``dtype``: the compute dtype. Other hyperparameters are ignored.
    """
    _, _, usable, _ = pair_labels(name, mask, scores, dtype=dtype, temperature=temperature)
    return detached_count(usable, dtype)


def select_pair(
    name: str, policy: Tensor, ref: Tensor, mask: Tensor, scores: Optional[Tensor], *,
    temperature: float = 1.0,
) -> PairSelection:
    """Picks (chosen, rejected) per prompt: columns (0, 1) without scores, else best / worst by score.

    ``scores [B, N]``: scalar labels (NaN = invalid response). ``scores [B, N, m]``: per-dimension ratings,
    aggregated to ``mean_k softmax_valid(R_k / temperature)`` (docs/loss_reference.md §3.3,
    :func:`aggregate_ratings`; NaN = missing rating, dropped) before the best / worst choice (first occurrence
    on ties; §1.0).
    """
    w, lo, usable, mask = pair_labels(name, mask, scores, dtype=policy.dtype, temperature=temperature)

    def take(x: Tensor, idx: Tensor) -> Tensor:
        return x.gather(1, idx.unsqueeze(1)).squeeze(1)

    return PairSelection(take(policy, w), take(policy, lo), take(ref, w), take(ref, lo), usable, mask)


def pair_output(
    per_prompt: Tensor, sel: PairSelection, s_all: Tensor, s_w: Tensor, s_l: Tensor
) -> LossOutput:
    """Sums the usable prompts' losses; the rest are skipped (0 in the numerator, not in the denominator)."""
    usable = sel.usable
    zero = torch.zeros((), dtype=per_prompt.dtype, device=per_prompt.device)
    numerator = torch.where(usable, per_prompt, zero).sum()
    denominator = detached_count(usable, per_prompt.dtype)
    has_valid = row_has_valid(sel.mask)
    metrics = {
        "num_prompts": detached_count(has_valid, per_prompt.dtype),
        "num_skipped": detached_count(has_valid & ~usable, per_prompt.dtype),
        "rewards_chosen_sum": torch.where(usable, s_w, zero).sum(),
        "rewards_rejected_sum": torch.where(usable, s_l, zero).sum(),
        "reward_accuracy_sum": torch.where(usable, (s_w > s_l).to(s_w.dtype), zero).sum(),
    }
    rewards = torch.where(sel.mask, s_all, zero)
    return finish(numerator, denominator, metrics, rewards)


def dpo_loss(
    policy_logps: Tensor,
    ref_logps: Tensor,
    *,
    mask: Optional[Tensor] = None,
    scores: Optional[Tensor] = None,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    temperature: float = 1.0,
) -> LossOutput:
    """DPO sigmoid loss with optional cDPO label smoothing (Rafailov et al. Eq. 7; TRL "sigmoid").

    Reference: docs/loss_reference.md §1.1.

        s_i = beta * (logp_theta[i] - logp_ref[i]),   D_s = s_w - s_l
        L = -(1 - eps) * log sigmoid(D_s) - eps * log sigmoid(-D_s)

    Log-probs: summed over completion tokens (TRL). Defaults: beta = 0.1, label_smoothing eps = 0
    (TRL v0.12.2 semantics; TRL HEAD dropped eps from "sigmoid", identical at eps = 0), temperature = 1.0
    (T of the rating softmax, used only with per-dimension ratings, §3.2).
    Shapes: ``policy_logps``, ``ref_logps`` ``[B, N]``; pair selection as in the module docstring.
    With ratings ``[B, N, m]`` and length-normalised log-probs this is the lambda-DPO trainer's
    UltraFeedback best-vs-worst baseline (§3.3), registered as ``ultrafb_best_worst_dpo``.
    """
    name = "dpo"
    check_positive(name, "beta", beta)
    check_range(name, "label_smoothing", label_smoothing, 0.0, 0.5)
    policy, ref, mask = prepare_inputs(name, policy_logps, ref_logps, mask)
    sel = select_pair(name, policy, ref, mask, scores, temperature=temperature)
    s_w, s_l = beta * (sel.policy_w - sel.ref_w), beta * (sel.policy_l - sel.ref_l)
    logits = s_w - s_l
    per_prompt = -(1.0 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)
    return pair_output(per_prompt, sel, beta * (policy - ref), s_w, s_l)


def ipo_loss(
    policy_logps: Tensor,
    ref_logps: Tensor,
    *,
    mask: Optional[Tensor] = None,
    scores: Optional[Tensor] = None,
    beta: float = 0.1,
    temperature: float = 1.0,
) -> LossOutput:
    """IPO (Azar et al. Eq. 17; TRL "ipo"; docs/loss_reference.md §1.2), tau := beta.

        D = (logp_theta[w] - logp_theta[l]) - (logp_ref[w] - logp_ref[l])
        L = (D - 1 / (2 * tau))^2            (= (D_s - 1/2)^2 / beta^2 in s units)

    Log-probs: length-averaged (TRL, confirmed by the IPO authors). Minimum at D = 1/(2 tau), not at
    infinity. Defaults: beta (tau) = 0.1; temperature = 1.0 (rating softmax for ``[B, N, m]`` scores only).
    """
    name = "ipo"
    check_positive(name, "beta", beta)
    policy, ref, mask = prepare_inputs(name, policy_logps, ref_logps, mask)
    sel = select_pair(name, policy, ref, mask, scores, temperature=temperature)
    d = (sel.policy_w - sel.policy_l) - (sel.ref_w - sel.ref_l)
    per_prompt = (d - 1.0 / (2.0 * beta)) ** 2
    s_w, s_l = beta * (sel.policy_w - sel.ref_w), beta * (sel.policy_l - sel.ref_l)
    return pair_output(per_prompt, sel, beta * (policy - ref), s_w, s_l)


def slic_loss(
    policy_logps: Tensor,
    ref_logps: Tensor,
    *,
    mask: Optional[Tensor] = None,
    scores: Optional[Tensor] = None,
    beta: float = 0.1,
    margin: float = 1.0,
    temperature: float = 1.0,
) -> LossOutput:
    """SLiC hinge / SLiC_norm (TRL "hinge"; LiPO Eq. 6; docs/loss_reference.md §1.3).

        L = max(0, margin - (s_w - s_l)),   margin = 1 (hard-coded in TRL)

    Reference-normalised, no regulariser. Log-probs summed. Defaults: beta = 0.1, margin = 1.0,
    temperature = 1.0 (rating softmax for ``[B, N, m]`` scores only).
    The gradient is -beta w.r.t. logp_theta[w] while the hinge is active and 0 otherwise.
    """
    name = "slic"
    check_positive(name, "beta", beta)
    check_positive(name, "margin", margin)
    policy, ref, mask = prepare_inputs(name, policy_logps, ref_logps, mask)
    sel = select_pair(name, policy, ref, mask, scores, temperature=temperature)
    s_w, s_l = beta * (sel.policy_w - sel.ref_w), beta * (sel.policy_l - sel.ref_l)
    per_prompt = torch.relu(margin - (s_w - s_l))
    return pair_output(per_prompt, sel, beta * (policy - ref), s_w, s_l)


#: SimPO's shipped ``gamma_beta_ratio`` (simpo_config.py), used when neither gamma nor a ratio is given.
DEFAULT_GAMMA_BETA_RATIO = 0.25


def resolve_simpo_gamma(beta: float, gamma: Optional[float], gamma_beta_ratio: Optional[float]) -> float:
    """SimPO's margin gamma: an explicit absolute ``gamma`` wins; else ``gamma_beta_ratio * beta``; else
    ``0.25 * beta`` (the official default ratio).

    docs/loss_reference.md §10.10 (and §3.3, §6.2): the official code parameterises gamma through
    gamma / beta (default 0.25), while LLaMA-Factory (and the lambda-DPO trainer's baseline) gives an
    absolute ``simpo_gamma = 0.5``. An absolute gamma is the more specific setting, so it takes precedence
    over a ratio given alongside it (for example a config that states gamma = 0.5 next to the official
    default ratio 0.25 at beta = 2.5).
    """
    for key, value in (("gamma", gamma), ("gamma_beta_ratio", gamma_beta_ratio)):
        if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value)):
            raise LossHyperparameterError(f"simpo: {key}={value!r} must be a finite number or None")
    if gamma is not None:
        return float(gamma)
    ratio = DEFAULT_GAMMA_BETA_RATIO if gamma_beta_ratio is None else gamma_beta_ratio
    return float(ratio * beta)


def simpo_loss(
    policy_logps: Tensor,
    ref_logps: Optional[Tensor] = None,
    *,
    mask: Optional[Tensor] = None,
    scores: Optional[Tensor] = None,
    beta: float = 2.0,
    gamma: Optional[float] = None,
    gamma_beta_ratio: Optional[float] = None,
    label_smoothing: float = 0.0,
    loss_type: str = "sigmoid",
    temperature: float = 1.0,
) -> LossOutput:
    """SimPO (Meng et al. arXiv 2405.14734; princeton-nlp/SimPO ``simpo_loss``), reference-free.

    Reference: docs/loss_reference.md §6.2. Length-normalised log-probs.

        z = beta * (abar_w - abar_l) - gamma,   abar = length-normalised policy log-prob
        sigmoid: L = -(1 - eps) * log sigmoid(z) - eps * log sigmoid(-z)
        hinge:   L = relu(1 - z)

    ``ref_logps`` is ignored. Defaults (simpo_config.py): beta = 2.0, gamma_beta_ratio = 0.25 so
    gamma = 0.5; eps = 0; loss_type = "sigmoid"; temperature = 1.0 (rating softmax for ``[B, N, m]`` scores
    only). An explicit absolute ``gamma`` (LLaMA-Factory's ``simpo_gamma``) takes precedence over
    ``gamma_beta_ratio`` when both are given (:func:`resolve_simpo_gamma`).
    gamma = 0 gives DPO with logp_ref = 0 (§7 identity 9).
    """
    name = "simpo"
    check_positive(name, "beta", beta)
    check_range(name, "label_smoothing", label_smoothing, 0.0, 0.5)
    check_choice(name, "loss_type", loss_type, ("sigmoid", "hinge"))
    g = resolve_simpo_gamma(beta, gamma, gamma_beta_ratio)
    policy, _, mask = prepare_inputs(name, policy_logps, None, mask)
    zeros = torch.zeros_like(policy)
    sel = select_pair(name, policy, zeros, mask, scores, temperature=temperature)
    s_w, s_l = beta * sel.policy_w, beta * sel.policy_l
    z = s_w - s_l - g
    if loss_type == "sigmoid":
        per_prompt = -(1.0 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)
    else:
        per_prompt = torch.relu(1.0 - z)
    return pair_output(per_prompt, sel, beta * policy, s_w, s_l)

