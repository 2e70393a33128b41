"""LiPO family (Liu et al., arXiv 2402.01878v3), computed with RAX's default semantics.

Reference: docs/loss_reference.md §2 (the § numbers below are its sections).

The LiPO authors compute every loss with the open-source RAX library and default arguments (App. B,
Algorithm 1), so the default reduction here is ``"rax"``: pair losses and point losses are averaged over
all valid pairs / items *pooled over the batch*; list losses are averaged over lists. ``"paper"`` gives the
per-prompt sums written in the paper's equations, averaged over prompts.

Labels: ``scores [B, N]`` = psi in [0, 1], larger is better (see :mod:`raypo.losses.labels` for psi from
ranks, win matrices and ratings). A NaN label marks the response invalid. Implicit reward
``s = beta * (logp_theta - logp_ref)``; log-probs summed over completion tokens. Default beta = 0.05 (paper).

Pairs: ``P = {(i, j): valid_i and valid_j and psi_i > psi_j}`` (strict; tied labels form no pair).

Numerator and denominator per reduction (``numerator / denominator`` is the batch value):

============= ================================ ================================ ==========================
reduction     pair losses (logistic, hinge, λ) point losses (mse, sigmoid)      list losses (MLE, softmax)
============= ================================ ================================ ==========================
rax           sum over pairs / valid pairs     sum over items / valid items     sum over lists / lists
paper         sum over pairs / lists           sum over items / lists           (same as rax)
per_list_mean sum of per-list pair means /     sum of per-list item means /     (same as rax)
              lists with >= 1 pair             lists
sum           sum over pairs / 1               sum over items / 1               sum over lists / 1
============= ================================ ================================ ==========================

"lists" = lists with at least one valid item (fully padded rows never count). A list whose labels are all
tied has no pair: it adds 0 to "paper" and is left out of "per_list_mean".

``"sum"`` is allRank's ``reduction="sum"`` (§2.10: ``lipo_lambda_loss(normalize=True, scale="none",
reduction="sum")`` equals allRank's ``lambdaLoss(weighing_scheme="lambdaRank_scheme",
reduction_log="natural")``): the plain sum over the batch, with denominator 1 (0 when the batch has nothing
to sum, so ``all_skipped`` stays meaningful). Its numerators add up across micro-batches, but its
denominators do not (every micro-batch counts 1): under the trainer's global normalisation, k micro-batches
give the mean of their k sums, not the sum of the concatenated batch. Use it to compare with allRank, not to
train with gradient accumulation.

A batch with nothing to count gives loss 0 and ``metrics["all_skipped"] = 1`` (RAX's safe_reduce gives 0).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from raypo.losses._common import (
    NEG_FILL,
    LossHyperparameterError,
    LossOutput,
    check_choice,
    check_positive,
    detached_count,
    finish,
    label_like,
    masked_log_softmax,
    pair_mask,
    prepare_inputs,
    row_has_valid,
    scalar_labels,
)

PAIR_REDUCTIONS = ("rax", "paper", "per_list_mean", "sum")
POINT_REDUCTIONS = ("rax", "paper", "per_list_mean", "sum")
LIST_REDUCTIONS = PAIR_REDUCTIONS
#: lipo_lambda's ``weighting``: the DCG weight and the LiPO paper's three ablations (Sec. 5).
LAMBDA_WEIGHTINGS = ("dcg", "constant", "constant_gain", "constant_discount")


def _sum_denominator(counted: Tensor, dtype: torch.dtype) -> Tensor:
    """Reduction ``"sum"``: denominator 1 if anything was counted in the batch, else 0 (no grad)."""
    return counted.detach().any().to(dtype)


def _setup(name: str, policy_logps: Tensor, ref_logps: Tensor, mask: Optional[Tensor],
           scores: Optional[Tensor], beta: float) -> tuple[Tensor, Tensor, Tensor]:
    """Returns ``(s, psi, mask)`` with s zeroed at padding."""
    check_positive(name, "beta", beta)
    policy, ref, mask = prepare_inputs(name, policy_logps, ref_logps, mask)
    psi, mask = scalar_labels(name, scores, policy, mask)
    s = beta * (policy - ref)
    s = torch.where(mask, s, torch.zeros((), dtype=s.dtype, device=s.device))
    return s, psi, mask


def label_pairs(psi: Tensor, mask: Tensor) -> Tensor:
    """``[B, N, N]`` bool: (i, j) is a valid pair with ``psi_i > psi_j``."""
    return pair_mask(mask) & (psi.unsqueeze(-1) > psi.unsqueeze(-2))


def _score_diffs(s: Tensor) -> Tensor:
    """``[B, N, N]``: ``s_i - s_j``."""
    return s.unsqueeze(-1) - s.unsqueeze(-2)


def _pair_count(pairs: Tensor, mask: Tensor, reduction: str, dtype: torch.dtype) -> Tensor:
    """Denominator of the pair losses (module table): pairs, 1, lists, or lists with a pair."""
    if reduction == "rax":
        return detached_count(pairs, dtype)
    if reduction == "sum":
        return _sum_denominator(pairs, dtype)
    if reduction == "paper":
        return detached_count(row_has_valid(mask), dtype)
    return detached_count(pairs.sum(dim=(-1, -2)) > 0, dtype)


def _item_count(mask: Tensor, reduction: str, dtype: torch.dtype) -> Tensor:
    """Denominator of the point losses (module table): valid items, 1, or lists."""
    if reduction == "rax":
        return detached_count(mask, dtype)
    if reduction == "sum":
        return _sum_denominator(mask, dtype)
    return detached_count(row_has_valid(mask), dtype)


def _list_count(mask: Tensor, reduction: str, dtype: torch.dtype) -> Tensor:
    """Denominator of the list losses: lists with a valid item (1 for ``"sum"``)."""
    has_valid = row_has_valid(mask)
    return _sum_denominator(has_valid, dtype) if reduction == "sum" else detached_count(has_valid, dtype)


def _label_mask(name: str, mask: Tensor, scores: Optional[Tensor],
                dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """``(psi, mask)`` as :func:`_setup` makes them, from the prepared mask and the labels only."""
    return scalar_labels(name, scores, label_like(mask, dtype), mask)


def lipo_pair_denominator(mask: Tensor, scores: Optional[Tensor], *, dtype: torch.dtype,
                          name: str = "lipo_pair", reduction: str = "rax", **_hparams: object) -> Tensor:
    """Denominator of lipo_pair_logistic, lipo_pair_hinge and lipo_lambda without log-probs.

    ``mask``: prepared bool ``[B, N]``; ``dtype``: the compute dtype; other hyperparameters are ignored.
    """
    check_choice(name, "reduction", reduction, PAIR_REDUCTIONS)
    psi, mask = _label_mask(name, mask, scores, dtype)
    return _pair_count(label_pairs(psi, mask), mask, reduction, dtype)


def lipo_point_denominator(mask: Tensor, scores: Optional[Tensor], *, dtype: torch.dtype,
                           name: str = "lipo_point", reduction: str = "rax", **_hparams: object) -> Tensor:
    """Denominator of lipo_point_mse and lipo_point_sigmoid without log-probs."""
    check_choice(name, "reduction", reduction, POINT_REDUCTIONS)
    _, mask = _label_mask(name, mask, scores, dtype)
    return _item_count(mask, reduction, dtype)


def lipo_list_denominator(mask: Tensor, scores: Optional[Tensor], *, dtype: torch.dtype,
                          name: str = "lipo_list", reduction: str = "rax", **_hparams: object) -> Tensor:
    """Denominator of lipo_list_mle and lipo_softmax without log-probs."""
    check_choice(name, "reduction", reduction, LIST_REDUCTIONS)
    _, mask = _label_mask(name, mask, scores, dtype)
    return _list_count(mask, reduction, dtype)


def _reduce_pairs(name: str, per_pair: Tensor, pairs: Tensor, mask: Tensor, reduction: str,
                  s: Tensor) -> LossOutput:
    check_choice(name, "reduction", reduction, PAIR_REDUCTIONS)
    zero = torch.zeros((), dtype=per_pair.dtype, device=per_pair.device)
    masked = torch.where(pairs, per_pair, zero)
    n_pairs_per_list = pairs.sum(dim=(-1, -2))
    has_valid = row_has_valid(mask)
    if reduction == "per_list_mean":
        has_pair = n_pairs_per_list > 0
        per_list = masked.sum(dim=(-1, -2)) / n_pairs_per_list.clamp(min=1).to(per_pair.dtype)
        numerator = torch.where(has_pair, per_list, zero).sum()
    else:
        numerator = masked.sum()
    denominator = _pair_count(pairs, mask, reduction, per_pair.dtype)
    metrics = {
        "num_prompts": detached_count(has_valid, per_pair.dtype),
        "num_pairs": detached_count(pairs, per_pair.dtype),
        "num_lists_without_pairs": detached_count(has_valid & (n_pairs_per_list == 0), per_pair.dtype),
    }
    return finish(numerator, denominator, metrics, s)


def _reduce_items(name: str, per_item: Tensor, mask: Tensor, reduction: str, s: Tensor) -> LossOutput:
    check_choice(name, "reduction", reduction, POINT_REDUCTIONS)
    zero = torch.zeros((), dtype=per_item.dtype, device=per_item.device)
    masked = torch.where(mask, per_item, zero)
    has_valid = row_has_valid(mask)
    if reduction == "per_list_mean":
        n_items = mask.sum(-1).clamp(min=1).to(per_item.dtype)
        numerator = torch.where(has_valid, masked.sum(-1) / n_items, zero).sum()
    else:
        numerator = masked.sum()
    denominator = _item_count(mask, reduction, per_item.dtype)
    metrics = {
        "num_prompts": detached_count(has_valid, per_item.dtype),
        "num_items": detached_count(mask, per_item.dtype),
    }
    return finish(numerator, denominator, metrics, s)


def _reduce_lists(name: str, per_list: Tensor, mask: Tensor, reduction: str, s: Tensor) -> LossOutput:
    # Every reduction but "sum" is the mean over lists for list losses (docs/loss_reference.md §2.9); the
    # argument exists so that one reduction setting can be passed to any LiPO loss.
    check_choice(name, "reduction", reduction, LIST_REDUCTIONS)
    has_valid = row_has_valid(mask)
    zero = torch.zeros((), dtype=per_list.dtype, device=per_list.device)
    numerator = torch.where(has_valid, per_list, zero).sum()
    num_lists = detached_count(has_valid, per_list.dtype)
    denominator = _list_count(mask, reduction, per_list.dtype)
    metrics = {"num_prompts": num_lists}
    return finish(numerator, denominator, metrics, s)


def lipo_pair_logistic_loss(
    policy_logps: Tensor,
    ref_logps: Tensor,
    *,
    mask: Optional[Tensor] = None,
    scores: Optional[Tensor] = None,
    beta: float = 0.05,
    reduction: str = "rax",
) -> LossOutput:
    """LiPO pair-logistic = DPO_BT on all pairs (LiPO Eq. 5; ``rax.pairwise_logistic_loss``).

    Reference: docs/loss_reference.md §2.2.

        l_ij = log(1 + exp(-(s_i - s_j))) = softplus(-(s_i - s_j)),   (i, j) in P

    rax: sum over the batch's pairs / number of pairs (other reductions: module docstring, including
    ``"sum"``, allRank's plain sum). N = 2 with psi_w > psi_l is exactly DPO.
    Defaults: beta = 0.05, reduction = "rax".
    """
    name = "lipo_pair_logistic"
    s, psi, mask = _setup(name, policy_logps, ref_logps, mask, scores, beta)
    per_pair = F.softplus(-_score_diffs(s))
    return _reduce_pairs(name, per_pair, label_pairs(psi, mask), mask, reduction, s)


def lipo_pair_hinge_loss(
    policy_logps: Tensor,
    ref_logps: Tensor,
    *,
    mask: Optional[Tensor] = None,
    scores: Optional[Tensor] = None,
    beta: float = 0.05,
    reduction: str = "rax",
) -> LossOutput:
    """LiPO pair-hinge = SLiC_norm on all pairs (LiPO Eq. 6; ``rax.pairwise_hinge_loss``).

    Reference: docs/loss_reference.md §2.3.

        l_ij = max(0, 1 - (s_i - s_j)),   (i, j) in P

    Same pairs and reductions as pair-logistic; N = 2 gives TRL's hinge. Defaults: beta = 0.05, "rax".
    """
    name = "lipo_pair_hinge"
    s, psi, mask = _setup(name, policy_logps, ref_logps, mask, scores, beta)
    per_pair = torch.relu(1.0 - _score_diffs(s))
    return _reduce_pairs(name, per_pair, label_pairs(psi, mask), mask, reduction, s)


def _stable_order(primary_invalid: Tensor, key: Tensor) -> Tensor:
    """Indices sorting by (invalid last, key ascending), ties kept in index order (RAX's stable sort)."""
    order = torch.sort(key, dim=-1, stable=True).indices
    invalid_sorted = primary_invalid.gather(-1, order).to(torch.int8)
    order2 = torch.sort(invalid_sorted, dim=-1, stable=True).indices
    return order.gather(-1, order2)


def lipo_list_mle_loss(
    policy_logps: Tensor,
    ref_logps: Tensor,
    *,
    mask: Optional[Tensor] = None,
    scores: Optional[Tensor] = None,
    beta: float = 0.05,
    reduction: str = "rax",
) -> LossOutput:
    """LiPO list-MLE = DPO_PL = PRO without its SFT term (LiPO Eq. 7; ``rax.listmle_loss``).

    Reference: docs/loss_reference.md §2.4.

        L = -sum_{k=1..n} [ s_pi(k) - log sum_{j=k..n} exp(s_pi(j)) ]

    pi sorts the valid responses by psi descending; ties keep index order (RAX's stable sort, no PRNG);
    padding is excluded from every denominator. Batch value: mean over lists with a valid item (for every
    ``reduction`` but ``"sum"``, which sums over lists; §2.9).
    N = 2 with psi_w > psi_l gives DPO; with psi_w = psi_l the loss is not 0 (index order decides).
    Default beta = 0.05.
    """
    name = "lipo_list_mle"
    s, psi, mask = _setup(name, policy_logps, ref_logps, mask, scores, beta)
    order = _stable_order(~mask, -psi)
    s_sorted = s.gather(-1, order)
    m_sorted = mask.gather(-1, order)
    filled = torch.where(m_sorted, s_sorted, torch.full((), NEG_FILL, dtype=s.dtype, device=s.device))
    # log sum_{j >= k} exp(s_pi(j)): a reversed cumulative logsumexp.
    suffix_lse = torch.flip(torch.logcumsumexp(torch.flip(filled, [-1]), dim=-1), [-1])
    terms = torch.where(m_sorted, s_sorted - suffix_lse, torch.zeros((), dtype=s.dtype, device=s.device))
    per_list = -terms.sum(-1)
    return _reduce_lists(name, per_list, mask, reduction, s)


def lipo_softmax_loss(
    policy_logps: Tensor,
    ref_logps: Tensor,
    *,
    mask: Optional[Tensor] = None,
    scores: Optional[Tensor] = None,
    beta: float = 0.05,
    normalize_labels: bool = True,
    reduction: str = "rax",
) -> LossOutput:
    """LiPO softmax / ListNet / NCE (LiPO Eq. 11; ``rax.softmax_loss``; docs/loss_reference.md §2.5).

        L = -sum_k q_k * log( exp(s_k) / sum_{j valid} exp(s_j) )

    ``normalize_labels=True`` (paper, default): q = psi / sum psi over valid items; all psi = 0 gives q
    uniform over the valid items (``rax.utils.normalize_probabilities``). ``False``: q = psi unnormalised
    (the RAX call of Algorithm 1). Batch value: mean over lists with a valid item, for every ``reduction``
    but ``"sum"`` (sum over lists). N = 2 with one-hot psi
    gives DPO; psi = (a, b) gives cDPO with eps = b / (a + b). Default beta = 0.05.
    """
    name = "lipo_softmax"
    s, psi, mask = _setup(name, policy_logps, ref_logps, mask, scores, beta)
    zero = torch.zeros((), dtype=s.dtype, device=s.device)
    if normalize_labels:
        total = psi.sum(-1, keepdim=True)
        n_valid = mask.sum(-1, keepdim=True).clamp(min=1).to(s.dtype)
        uniform = mask.to(s.dtype) / n_valid
        q = torch.where(total == 0, uniform, psi / torch.where(total == 0, torch.ones_like(total), total))
    else:
        q = psi
    q = torch.where(mask, q, zero)
    per_list = -(q * masked_log_softmax(s, mask)).sum(-1)
    return _reduce_lists(name, per_list, mask, reduction, s)


def lipo_point_mse_loss(
    policy_logps: Tensor,
    ref_logps: Tensor,
    *,
    mask: Optional[Tensor] = None,
    scores: Optional[Tensor] = None,
    beta: float = 0.05,
    reduction: str = "rax",
) -> LossOutput:
    """LiPO point-MSE (LiPO Eq. 9; ``rax.pointwise_mse_loss``; docs/loss_reference.md §2.6).

        l_k = (psi_k - s_k)^2

    rax (default): mean over all valid items of the batch; paper: per-prompt sum, mean over prompts;
    per_list_mean: per-prompt mean, mean over prompts; sum: sum over all valid items (denominator 1).
    Does not reduce to DPO at N = 2. Gradient 2 (s - psi). Default beta = 0.05.
    """
    name = "lipo_point_mse"
    s, psi, mask = _setup(name, policy_logps, ref_logps, mask, scores, beta)
    return _reduce_items(name, (psi - s) ** 2, mask, reduction, s)


def lipo_point_sigmoid_loss(
    policy_logps: Tensor,
    ref_logps: Tensor,
    *,
    mask: Optional[Tensor] = None,
    scores: Optional[Tensor] = None,
    beta: float = 0.05,
    reduction: str = "rax",
) -> LossOutput:
    """LiPO point-sigmoid (LiPO Eq. 10; ``rax.pointwise_sigmoid_loss``; docs/loss_reference.md §2.7).

        l_k = -[psi_k log sigmoid(s_k) + (1 - psi_k) log(1 - sigmoid(s_k))] = softplus(s_k) - psi_k s_k

    psi is clipped to [0, 1] as RAX does. Reductions as point-MSE. Gradient sigmoid(s) - psi.
    Default beta = 0.05.
    """
    name = "lipo_point_sigmoid"
    s, psi, mask = _setup(name, policy_logps, ref_logps, mask, scores, beta)
    psi = psi.clamp(0.0, 1.0)
    return _reduce_items(name, F.softplus(s) - psi * s, mask, reduction, s)


def score_ranks(s: Tensor, mask: Tensor) -> Tensor:
    """1-based rank of each item by score, descending, among the valid items (``rax.utils.ranks``).

    Stable sort of (invalid, -s): ties in s keep index order and padded items rank after every valid one.
    No gradient (ranks are piecewise constant).
    """
    order = _stable_order(~mask, -s.detach())
    positions = torch.arange(1, s.shape[-1] + 1, device=s.device).expand_as(order)
    ranks = torch.empty_like(order)
    ranks.scatter_(-1, order, positions)
    return ranks


def lipo_lambda_weights(
    s: Tensor,
    psi: Tensor,
    mask: Tensor,
    *,
    scale: str = "padded",
    normalize: bool = False,
    topn: Optional[int] = None,
    log_base: float = 2.0,
    weighting: str = "dcg",
) -> Tensor:
    """DCG lambda weights ``Delta [B, N, N]`` (``rax.dcg_lambdaweight``), detached.

        Delta_ij = C * |G_i - G_j| * |1/D(tau_i) - 1/D(tau_j)|,  G = 2^psi - 1,  D(r) = log_b(1 + r)

    ``weighting``: ``"dcg"`` (the formula above), ``"constant_gain"`` (``|G_i - G_j| = 1``) or
    ``"constant_discount"`` (``|1/D(tau_i) - 1/D(tau_j)| = 1``), the LiPO paper's Lambda-weight ablations;
    C, ``topn`` and ``normalize`` apply to whichever factor is kept.

    tau = rank of s among the valid items (:func:`score_ranks`). ``topn``: discounts of ranks > topn are 0.
    ``normalize``: G is divided by IDCG = sum_k G_(k) / D(k) over the valid items sorted by G (and cut at
    topn); IDCG = 0 is replaced by 1. C: ``"padded"`` = padded list size N (RAX's ``weight_scalar``),
    ``"valid"`` = number of valid items of the list, ``"none"`` = 1 (the paper's formula).
    Weights are 0 for pairs with a padded item.
    """
    s = s.detach()
    dtype = s.dtype
    zero = torch.zeros((), dtype=dtype, device=s.device)
    ranks = score_ranks(s, mask).to(dtype)
    ln_b = math.log(log_base)
    discount = ln_b / torch.log1p(ranks)
    if topn is not None:
        discount = torch.where(ranks <= topn, discount, zero)
    gains = torch.where(mask, torch.exp2(psi) - 1.0, zero)
    if normalize:
        # Padded items sort last (-inf) and then contribute 0, whatever the sign of the valid gains.
        ideal = torch.sort(torch.where(mask, gains, torch.full((), -math.inf, dtype=dtype, device=s.device)),
                           dim=-1, descending=True).values
        ideal = torch.where(torch.isfinite(ideal), ideal, zero)
        positions = torch.arange(1, s.shape[-1] + 1, device=s.device, dtype=dtype)
        ideal_disc = ln_b / torch.log1p(positions)
        if topn is not None:
            ideal_disc = torch.where(positions <= topn, ideal_disc, zero)
        idcg = (ideal * ideal_disc).sum(-1, keepdim=True)
        gains = gains / torch.where(idcg == 0, torch.ones_like(idcg), idcg)
    gain_diff = (gains.unsqueeze(-1) - gains.unsqueeze(-2)).abs()
    discount_diff = (discount.unsqueeze(-1) - discount.unsqueeze(-2)).abs()
    # The LiPO paper's ablations (Sec. 5 "Lambda weight"): one of the two factors is held at 1.
    if weighting == "constant_gain":
        gain_diff = torch.ones_like(gain_diff)
    elif weighting == "constant_discount":
        discount_diff = torch.ones_like(discount_diff)
    delta = gain_diff * discount_diff
    if scale == "padded":
        delta = delta * s.shape[-1]
    elif scale == "valid":
        delta = delta * mask.sum(-1).to(dtype)[:, None, None]
    return torch.where(pair_mask(mask), delta, zero)


def lipo_lambda_loss(
    policy_logps: Tensor,
    ref_logps: Tensor,
    *,
    mask: Optional[Tensor] = None,
    scores: Optional[Tensor] = None,
    beta: float = 0.05,
    reduction: str = "rax",
    scale: str = "padded",
    normalize: bool = False,
    topn: Optional[int] = None,
    log_base: float = 2.0,
    weighting: str = "dcg",
) -> LossOutput:
    """LiPO-lambda / LambdaLoss (LiPO Eq. 8; ``rax.pairwise_logistic_loss`` with
    ``lambdaweight_fn=rax.dcg_lambdaweight``; docs/loss_reference.md §2.8).

        L = sum_{(i,j) in P} Delta_ij * log(1 + exp(-(s_i - s_j)))
        Delta_ij = C * |G_i - G_j| * |1/D(tau_i) - 1/D(tau_j)|,  G = 2^psi - 1,  D(r) = log2(1 + r)

    tau ranks the current scores s (not the labels), descending, stable for ties; Delta carries no
    gradient. rax (default): sum of weighted pair losses / number of pairs in P, pooled over the batch.
    ``paper``: per-prompt sum, mean over prompts (the paper's Eq. 8 also has ``scale="none"``).
    ``sum``: the plain sum over the batch's pairs, denominator 1; with ``normalize=True, scale="none"`` this
    is allRank's ``lambdaLoss(weighing_scheme="lambdaRank_scheme", reduction="sum",
    reduction_log="natural")`` (§2.10; allRank's default binary log is this / ln 2). Its denominators do
    not add up across micro-batches (module docstring).

    Defaults (RAX): beta = 0.05, scale = "padded" (C = padded N), normalize = False, topn = None,
    log_base = 2, weighting = "dcg". The LiPO paper's Lambda-weight ablations (Sec. 5):
    ``weighting="constant"`` sets Delta = 1 ("constant weight"), which is pair-logistic (§7 identity 11);
    ``"constant_gain"`` sets |G_i - G_j| = 1, Delta_ij = C * |1/D(tau_i) - 1/D(tau_j)|;
    ``"constant_discount"`` sets |1/D(tau_i) - 1/D(tau_j)| = 1, Delta_ij = C * |G_i - G_j|.
    N = 2: L = C * |2^psi_w - 2^psi_l| * 0.369070 * DPO.

    Padding: with ``scale="padded"`` the loss depends on the padded length (§7 identity 15, as in RAX), so
    micro-batches padded to different N add up to the concatenated batch only if they share N. Use
    ``scale="valid"`` (padding-invariant, additive across any split into micro-batches) for variable N in
    training.
    """
    name = "lipo_lambda"
    check_choice(name, "scale", scale, ("padded", "valid", "none"))
    check_choice(name, "weighting", weighting, LAMBDA_WEIGHTINGS)
    if not (isinstance(log_base, (int, float)) and log_base > 0 and log_base != 1):
        raise LossHyperparameterError(f"{name}: log_base={log_base!r} must be > 0 and != 1 (RAX: 2)")
    if topn is not None and (isinstance(topn, bool) or not isinstance(topn, int) or topn < 1):
        raise LossHyperparameterError(f"{name}: topn={topn!r} must be None (no cutoff) or an int >= 1")
    s, psi, mask = _setup(name, policy_logps, ref_logps, mask, scores, beta)
    pairs = label_pairs(psi, mask)
    per_pair = F.softplus(-_score_diffs(s))
    if weighting != "constant":
        delta = lipo_lambda_weights(s, psi, mask, scale=scale, normalize=normalize, topn=topn,
                                    log_base=log_base, weighting=weighting)
        per_pair = per_pair * delta
    return _reduce_pairs(name, per_pair, pairs, mask, reduction, s)
