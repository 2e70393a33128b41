"""MallowsPO (Chen et al., arXiv 2405.14953, ICLR 2025; haoxian-chen/MallowsPO), docs/loss_reference.md §4.

* :func:`mallows_theta_loss` - MallowsPO-theta, DPO with a per-prompt beta_eff = beta * phi(x) (CODE).
* :func:`mallows_ipo_loss` - the repositories' ``mallows_ipo`` variants (CODE).
* :func:`mallows_phi_loss` - MallowsPO-phi with the exact Mallows-Kendall link (PAPER; no official code).
* Dispersion: ``phi(x) = -c * log Hbar(x)`` from reference-model token entropies (§4.3).

``dispersion`` is always the *neg-log dispersion* ``phi(x) [B]`` (a positive number, dataset mean 1 after
:func:`calibrate_c`). MallowsPO-phi's Mallows dispersion is ``varphi(x) = exp(-phi(x)) = Hbar(x)^c``,
in (0, 1).

These are pairwise losses: N = 2 with column 0 chosen, or any N with ``scores`` (best vs worst; tied
prompts skipped; ``[B, N, m]`` ratings aggregated with ``temperature``), exactly as
:mod:`raypo.losses.pairwise`. The dispersion is per prompt; which responses'
entropies it averages is the caller's choice (the official code: the chosen and the rejected one).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from raypo.losses._common import (
    LossHyperparameterError,
    LossOutput,
    check_choice,
    check_positive,
    check_range,
    prepare_inputs,
)
from raypo.losses.pairwise import PairSelection, pair_output, select_pair

#: MallowsPO's shipped ``neg_log_dispersion_mean`` (Llama-3-Instruct on UltraFeedback-ArmoRM).
DEFAULT_C = 0.29

MALLOWS_IPO_VARIANTS = ("mallowspo", "rainbowpo", "rainbowpo_modified", "mallows_ipo_modified")


# --------------------------------------------------------------------------------------------------
# Dispersion estimator (docs/loss_reference.md §4.3)
# --------------------------------------------------------------------------------------------------


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Token entropies ``H_t = -sum_v p(v) log p(v)`` (natural log, full output dim), ``[..., V] -> [...]``.

    Computed in float32 or better: ``H = logsumexp(z) - sum_v softmax(z)_v z_v``.
    """
    z = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    log_p = torch.log_softmax(z, dim=-1)
    return -(log_p.exp() * log_p).sum(-1)


def normalized_mean_entropy(token_entropy: Tensor, token_mask: Tensor, vocab_size: int) -> Tensor:
    """Per-response normalised mean entropy (CODE ``get_batch_logps(calculate_entropy=True)``).

        Hbar(y) = sum_t m_t H_t / (sum_t m_t * ln |V|)

    Args:
        token_entropy: ``[..., T]`` reference-model token entropies (natural log).
        token_mask: ``[..., T]`` 1 on completion tokens (shifted labels != -100).
        vocab_size: |V| = the model's output dimension ``logits.shape[-1]`` (may exceed the tokenizer's).

    Returns:
        ``[...]`` Hbar in [0, 1]; 0 for a response without completion tokens.
    """
    if vocab_size < 2:
        raise ValueError(f"normalized_mean_entropy: vocab_size={vocab_size} must be >= 2")
    m = token_mask.to(token_entropy.dtype)
    count = m.sum(-1)
    return (token_entropy * m).sum(-1) / (count.clamp(min=1) * math.log(vocab_size))


HbarLike = Union[Tensor, Sequence[Tensor]]


def prompt_hbar(hbar: HbarLike, mask: Optional[Tensor] = None) -> Tensor:
    """Hbar(x) = mean of the responses' Hbar over valid responses (``1/2 (Hbar_w + Hbar_l)`` for a pair).

    ``hbar`` is ``[B]`` (already per prompt), ``[B, N]`` (per response, with optional ``mask``), or a
    sequence of ``[B]`` tensors (e.g. ``(hbar_w, hbar_l)``).
    """
    if not isinstance(hbar, Tensor):
        hbar = torch.stack([torch.as_tensor(h) for h in hbar], dim=-1)
    if hbar.dim() == 1:
        return hbar
    if hbar.dim() != 2:
        raise ValueError(f"prompt_hbar: expected [B] or [B, N], got {tuple(hbar.shape)}")
    m = torch.ones_like(hbar, dtype=torch.bool) if mask is None else mask.to(torch.bool)
    w = m.to(hbar.dtype)
    return (hbar * w).sum(-1) / w.sum(-1).clamp(min=1)


def neg_log_dispersion(hbar: HbarLike, mask: Optional[Tensor] = None, *, c: float = DEFAULT_C) -> Tensor:
    """Neg-log dispersion ``phi(x) = -c * log Hbar(x)`` (CODE ``concatenated_forward`` l.1430-1431).

    Args:
        hbar: per-prompt ``[B]``, per-response ``[B, N]`` or a sequence such as ``(hbar_w, hbar_l)``;
            per-response values are averaged over valid responses first (:func:`prompt_hbar`).
        c: scale; default 0.29 (MallowsPO config). Use :func:`calibrate_c` to make the dataset mean 1.

    Hbar -> 1 gives phi -> 0 (flat loss); Hbar -> 0 gives phi -> inf (a step loss). No clamp, as in code.
    """
    return -c * torch.log(prompt_hbar(hbar, mask))


def calibrate_c(hbar_per_prompt: HbarLike) -> float:
    """``c = 1 / mean_x[-log Hbar(x)]`` so that the dataset mean of phi(x) is 1.

    Reference: docs/loss_reference.md §4.3 (the MallowsPO paper's calibration).

    ``hbar_per_prompt``: Hbar(x) for every prompt of the dataset (``[P]``, or ``[P, N]`` averaged per row).
    """
    h = prompt_hbar(hbar_per_prompt).to(torch.float64)
    mean_neg_log = (-torch.log(h)).mean()
    if not (torch.isfinite(mean_neg_log) and mean_neg_log > 0):
        raise ValueError(
            f"calibrate_c: mean(-log Hbar) = {float(mean_neg_log)} must be finite and > 0; "
            "Hbar must lie in (0, 1)"
        )
    return float(1.0 / mean_neg_log)


# --------------------------------------------------------------------------------------------------
# Shared pieces
# --------------------------------------------------------------------------------------------------


def _dispersion(name: str, dispersion: Optional[Tensor], batch: int, like: Tensor) -> Tensor:
    if dispersion is None:
        raise LossHyperparameterError(
            f"{name}: needs dispersion [B], the neg-log dispersion phi(x) = -c log Hbar(x) of each prompt "
            "(raypo.losses.neg_log_dispersion); phi = 1 everywhere reduces MallowsPO-theta to DPO"
        )
    d = torch.as_tensor(dispersion).to(device=like.device, dtype=like.dtype)
    if d.dim() == 0:
        d = d.expand(batch)
    if d.shape != (batch,):
        raise LossHyperparameterError(f"{name}: dispersion must be [B] = [{batch}], got {tuple(d.shape)}")
    return d


def _mallows_logits(
    sel: PairSelection, *, reference_free: bool, home_advantage: float, if_mixing_alpha: bool,
    mixing_alpha: float,
) -> Tensor:
    """CODE l.1268-1275: ``(th_w - th_l) - (r_w - r_l) - h``; mixing: ``... - a (r_w - r_l) - (1 - a) h``."""
    pi = sel.policy_w - sel.policy_l
    ref = torch.zeros_like(pi) if reference_free else sel.ref_w - sel.ref_l
    if if_mixing_alpha:
        a = 0.0 if reference_free else mixing_alpha
        return pi - a * ref - (1.0 - a) * home_advantage
    return pi - ref - home_advantage


def _rewards(policy: Tensor, ref: Tensor, sel: PairSelection, beta: float, reference_free: bool
             ) -> tuple[Tensor, Tensor, Tensor]:
    """Implicit rewards for metrics: ``beta * (logp - ref)``, or ``beta * logp`` when reference-free.

    Returns ``(s [B, N], s_w [B], s_l [B])``.
    """
    if reference_free:
        return beta * policy, beta * sel.policy_w, beta * sel.policy_l
    return beta * (policy - ref), beta * (sel.policy_w - sel.ref_w), beta * (sel.policy_l - sel.ref_l)


def _check_common(name: str, beta: float, home_advantage: float, mixing_alpha: float) -> None:
    check_positive(name, "beta", beta)
    if not math.isfinite(home_advantage):
        raise LossHyperparameterError(f"{name}: home_advantage={home_advantage} must be finite")
    check_range(name, "mixing_alpha", mixing_alpha, 0.0, 1.0)


# --------------------------------------------------------------------------------------------------
# MallowsPO-theta and mallows_ipo (CODE)
# --------------------------------------------------------------------------------------------------


def mallows_theta_loss(
    policy_logps: Tensor,
    ref_logps: Optional[Tensor],
    *,
    mask: Optional[Tensor] = None,
    scores: Optional[Tensor] = None,
    dispersion: Optional[Tensor] = None,
    beta: float = 10.0,
    reference_free: bool = True,
    label_smoothing: float = 0.0,
    home_advantage: float = 0.0,
    if_mixing_alpha: bool = False,
    mixing_alpha: float = 0.5,
    length_normalization: bool = True,
    temperature: float = 1.0,
) -> LossOutput:
    """MallowsPO-theta (docs/loss_reference.md §4.1; CODE ``loss_type="mallows_dpo"``).

        logits = (th_w - th_l) - (r_w - r_l) - h                 (if_mixing_alpha=False)
        logits = (th_w - th_l) - a (r_w - r_l) - (1 - a) h       (if_mixing_alpha=True, a = mixing_alpha)
        L = -(1 - eps) log sigmoid(beta * phi(x) * logits) - eps log sigmoid(-beta * phi(x) * logits)

    ``reference_free=True`` sets (r_w - r_l) := 0 and a := 0. phi = ``dispersion [B]``.

    Defaults as shipped (mallowsPO_config.py): beta = 10, reference_free = True, length-normalised
    log-probs (``length_normalization=True`` tells the trainer to feed per-token means), h = 0, eps = 0;
    temperature = 1.0 (rating softmax, only for ``[B, N, m]`` scores). The paper's "MallowsPO-theta on top
    of DPO": reference_free=False, length_normalization=False, beta ~ 0.1. phi = 1 gives DPO (§7 identity 7).
    """
    name = "mallows_theta"
    _check_common(name, beta, home_advantage, mixing_alpha)
    check_range(name, "label_smoothing", label_smoothing, 0.0, 0.5)
    policy, ref, mask = prepare_inputs(name, policy_logps, ref_logps, mask)
    phi = _dispersion(name, dispersion, policy.shape[0], policy)
    sel = select_pair(name, policy, ref, mask, scores, temperature=temperature)
    logits = _mallows_logits(sel, reference_free=reference_free, home_advantage=home_advantage,
                             if_mixing_alpha=if_mixing_alpha, mixing_alpha=mixing_alpha)
    z = beta * phi * logits
    per_prompt = -(1.0 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)
    return pair_output(per_prompt, sel, *_rewards(policy, ref, sel, beta, reference_free))


def mallows_ipo_loss(
    policy_logps: Tensor,
    ref_logps: Optional[Tensor],
    *,
    mask: Optional[Tensor] = None,
    scores: Optional[Tensor] = None,
    dispersion: Optional[Tensor] = None,
    beta: float = 0.1,
    variant: str = "mallowspo",
    reference_free: bool = False,
    home_advantage: float = 0.0,
    if_mixing_alpha: bool = False,
    mixing_alpha: float = 0.5,
    length_normalization: bool = True,
    temperature: float = 1.0,
) -> LossOutput:
    """MallowsPO IPO variants (docs/loss_reference.md §4.2; CODE).

        variant="mallowspo"          (MallowsPO repo):  L = (phi * logits - 1 / (2 beta))^2
        variant="rainbowpo"          (RainbowPO):       L = (beta * phi * logits - 1/2)^2   (beta^2 x above)
        variant="rainbowpo_modified" (RainbowPO ``mallows_ipo_modified``, also accepted as that name):
                                                        L = relu(1/2 - beta * phi * logits)^2

    logits as :func:`mallows_theta_loss`. Defaults: beta = 0.1, variant "mallowspo", with the reference
    (reference_free=False) and length-normalised log-probs as TRL's IPO, so that phi = 1 gives TRL IPO
    (§7 identity 7); temperature = 1.0 (rating softmax, only for ``[B, N, m]`` scores).
    """
    name = "mallows_ipo"
    _check_common(name, beta, home_advantage, mixing_alpha)
    # "mallows_ipo_modified" is RainbowPO's own loss_type name for the modified variant.
    check_choice(name, "variant", variant, MALLOWS_IPO_VARIANTS)
    policy, ref, mask = prepare_inputs(name, policy_logps, ref_logps, mask)
    phi = _dispersion(name, dispersion, policy.shape[0], policy)
    sel = select_pair(name, policy, ref, mask, scores, temperature=temperature)
    logits = _mallows_logits(sel, reference_free=reference_free, home_advantage=home_advantage,
                             if_mixing_alpha=if_mixing_alpha, mixing_alpha=mixing_alpha)
    if variant == "mallowspo":
        per_prompt = (phi * logits - 1.0 / (2.0 * beta)) ** 2
    elif variant == "rainbowpo":
        per_prompt = (beta * phi * logits - 0.5) ** 2
    else:
        per_prompt = torch.relu(0.5 - beta * phi * logits) ** 2
    return pair_output(per_prompt, sel, *_rewards(policy, ref, sel, beta, reference_free))


# --------------------------------------------------------------------------------------------------
# MallowsPO-phi: the exact Mallows-Kendall link (docs/loss_reference.md §4.4)
# --------------------------------------------------------------------------------------------------
#
# With a = -log varphi > 0 and B(x) = x / (e^x - 1) (B(0) = 1, decreasing on x >= 0):
#     d / (1 - varphi^d) = d + B(a d) / a,   so for v > 0
#     g(v)  = (v+1)/(1 - varphi^(v+1)) - v/(1 - varphi^v) = 1 - Q(v),
#     Q(v)  = (B(a v) - B(a (v+1))) / a  in (0, 1/2),     g(-v) = 1 - g(v) = Q(v).
# Everything is evaluated through log B, which is stable for all x >= 0, so -log g never cancels:
#     log Q(v) = -log a + log B(a v) + log(-expm1(log B(a v + a) - log B(a v))).


_SERIES_X = 1e-4


def _log_b(x: Tensor) -> Tensor:
    """log(x / (e^x - 1)) for x >= 0, exact to float64 rounding; log B(0) = 0."""
    small = x < _SERIES_X
    xs = torch.where(small, torch.ones_like(x), x)
    # log x - log(e^x - 1) = log x - x - log(1 - e^-x); -expm1(-x) keeps 1 - e^-x accurate for small x.
    general = torch.log(xs) - xs - torch.log(-torch.expm1(-xs))
    xq = torch.where(small, x, torch.zeros_like(x))
    # -x/2 - log(sinh(x/2) / (x/2)), Taylor to x^4: error < 1e-21 for x < 1e-4.
    series = -xq / 2 - xq**2 / 24 + xq**4 / 2880
    return torch.where(small, series, general)


def _log_q(v: Tensor, a: Tensor) -> Tensor:
    """log(1 - g(v)) for v >= 0 (v = 0 means the limit 0+)."""
    x0 = a * v
    lb0 = _log_b(x0)
    lb1 = _log_b(x0 + a)
    return -torch.log(a) + lb0 + torch.log(-torch.expm1(lb1 - lb0))


def _b_prime(a: Tensor) -> Tensor:
    """B'(a) for a > 0: ((1 - e^-a) - a) e^-a / (1 - e^-a)^2, with a series near 0."""
    small = a < 1e-3
    as_ = torch.where(small, torch.ones_like(a), a)
    one_m = -torch.expm1(-as_)
    general = (one_m - as_) * torch.exp(-as_) / one_m**2
    aq = torch.where(small, a, torch.zeros_like(a))
    series = -0.5 + aq / 6 - aq**3 / 180
    return torch.where(small, series, general)


def _neg_log_g(u: Tensor, a: Tensor) -> Tensor:
    """-log g_varphi(u) for real u, a = -log varphi; g(0) := 1/2 (NON-NORMATIVE).

    Reference: docs/loss_reference.md §4.4.

    g jumps at 0 (g(0+) = 1/(1 - varphi) + 1/ln varphi). At exactly u = 0 - every prompt at step 0, when the
    policy equals the reference - the value is log 2 and the gradient is the mean of the two one-sided
    derivatives of -log g, so training starts instead of sitting on a zero gradient.
    """
    zero = torch.zeros_like(u)
    pos, neg = u > 0, u < 0
    v_pos = torch.where(pos, u, torch.ones_like(u))
    v_neg = torch.where(neg, -u, torch.ones_like(u))
    loss_pos = -torch.log1p(-torch.exp(_log_q(v_pos, a)))
    loss_neg = -_log_q(v_neg, a)
    # One-sided slopes at 0: g'(0+) = g'(0-) = 1/2 + B'(a), g(0+) = 1 - Q(0+), g(0-) = Q(0+).
    with torch.no_grad():
        q0 = torch.exp(_log_q(zero, a))
        g_prime = 0.5 + _b_prime(a)
        slope = -0.5 * g_prime * (1.0 / (1.0 - q0) + 1.0 / q0)
    at_zero = math.log(2.0) + slope * u
    return torch.where(pos, loss_pos, torch.where(neg, loss_neg, at_zero))


def _as_neg_log_phi(phi: Union[float, Tensor], like: Tensor) -> Tensor:
    p = torch.as_tensor(phi, dtype=torch.float64, device=like.device)
    if not bool(((p > 0) & (p < 1)).all()):
        raise ValueError(f"mallows_phi_link: the Mallows dispersion phi must lie in (0, 1), got {phi}")
    return -torch.log(p)


def mallows_phi_link(u: Tensor, phi: Union[float, Tensor]) -> Tensor:
    """Mallows-Kendall link g_phi(u): P(the item at central rank i beats the one at rank i + u).

    Reference: docs/loss_reference.md §4.4 (MallowsPO paper, Mallows-Kendall model).

        g(d) = (d+1) / (1 - phi^(d+1)) - d / (1 - phi^d),  d = 1, 2, ...;   g(-d) = 1 - g(d);   g(0) := 1/2

    Exact for integer d (checked against brute-force enumeration in tests/losses/test_loss_mallows.py),
    used as is for real u.
    g(1) = 1/(1+phi); phi -> 0 gives a 0-1 step, phi -> 1 gives 1/2. Evaluated in float64 via
    expm1/log forms (see ``_neg_log_g``), returned in u's dtype. ``phi`` in (0, 1), scalar or broadcastable.
    """
    u_t = torch.as_tensor(u)
    out_dtype = u_t.dtype if u_t.is_floating_point() else torch.float64
    u64 = u_t.to(torch.float64)
    return torch.exp(-_neg_log_g(u64, _as_neg_log_phi(phi, u64))).to(out_dtype)


def mallows_phi_loss(
    policy_logps: Tensor,
    ref_logps: Optional[Tensor],
    *,
    mask: Optional[Tensor] = None,
    scores: Optional[Tensor] = None,
    dispersion: Optional[Tensor] = None,
    beta: float = 0.1,
    reference_free: bool = False,
    length_normalization: bool = False,
    temperature: float = 1.0,
) -> LossOutput:
    """MallowsPO-phi with the exact Mallows-Kendall link (PAPER, not in any official code).

    Reference: docs/loss_reference.md §4.4.

        u = s_w - s_l = beta * ((th_w - th_l) - (r_w - r_l)),   varphi(x) = exp(-phi(x)) = Hbar(x)^c
        L = -log g_varphi(x)(u)                                   (g: :func:`mallows_phi_link`)

    ``dispersion [B]`` is the neg-log dispersion phi(x) > 0 (as for MallowsPO-theta). The link is computed
    in float64 and the loss cast back. g(0) := 1/2; at u = 0 the gradient is the mean of the one-sided
    gradients (the closed form jumps at 0). The paper's smooth approximations (App. C.5) are not
    implemented (docs/loss_reference.md §10.11). Defaults: beta = 0.1, with the reference, summed
    log-probs (the DPO-based setting); temperature = 1.0 (rating softmax, only for ``[B, N, m]`` scores).
    """
    name = "mallows_phi"
    check_positive(name, "beta", beta)
    policy, ref, mask = prepare_inputs(name, policy_logps, ref_logps, mask)
    phi = _dispersion(name, dispersion, policy.shape[0], policy)
    if not bool((torch.isfinite(phi) & (phi > 0)).all()):
        raise LossHyperparameterError(
            f"{name}: dispersion (neg-log dispersion phi = -c log Hbar) must be finite and > 0 for every "
            "prompt (Hbar in (0, 1)); got values outside that range"
        )
    sel = select_pair(name, policy, ref, mask, scores, temperature=temperature)
    s_all, s_w, s_l = _rewards(policy, ref, sel, beta, reference_free)
    u = s_w - s_l
    # The link runs in float64 on [B] scalars: cheap, and it keeps -log g exact in float32 training.
    per_prompt = _neg_log_g(u.to(torch.float64), phi.detach().to(torch.float64)).to(u.dtype)
    return pair_output(per_prompt, sel, s_all, s_w, s_l)
