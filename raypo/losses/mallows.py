"""MallowsPO (Chen et al., arXiv 2405.14953, ICLR 2025; haoxian-chen/MallowsPO), docs/loss_reference.md §4.

* :func:`mallows_theta_loss` - MallowsPO-theta, DPO with a per-prompt beta_eff = beta * phi(x) (CODE).
* :func:`mallows_ipo_loss` - the repositories' ``mallows_ipo`` variants (CODE).
* :func:`mallows_phi_loss` - MallowsPO-phi with the exact Mallows-Kendall link or one of the paper's smooth
  approximations (PAPER; no official code; the links live in :mod:`raypo.losses.mallows_link`).
* Dispersion: ``phi(x) = -c * log Hbar(x)`` from reference-model token entropies (§4.3).

The dispersion comes in one of two inputs: ``dispersion [B]``, the *neg-log dispersion* ``phi(x)`` of each
prompt, given; or ``ref_entropy [B, N]``, each response's normalised reference entropy Hbar(y), from which
the loss takes ``phi(x) = -c log((Hbar(y_w) + Hbar(y_l)) / 2)`` over the pair it chose itself (as the
MallowsPO code averages the chosen and the rejected response), with ``c = dispersion_c`` (the trainer
calibrates it so that the dataset mean of phi is 1, raypo/train/dispersion.py). MallowsPO-phi's Mallows
dispersion is ``varphi(x) = exp(-phi(x)) = Hbar(x)^c``, in (0, 1).

These are pairwise losses: N = 2 with column 0 chosen, or any N with ``scores`` (best vs worst; tied
prompts skipped; ``[B, N, m]`` ratings aggregated with ``temperature``), exactly as
:mod:`raypo.losses.pairwise`.
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
from raypo.losses.mallows_link import (
    LINKS,
    POLY_RANGE_MODES,
    as_neg_log_phi,
    neg_log_link,
    neg_log_link_exact,
)
from raypo.losses.pairwise import PairSelection, pair_labels, pair_output

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


#: What a prompt whose pair lacks a reference entropy gets (docs/losses.md "MallowsPO dispersion"): error
#: (the default), or mean: phi := 1, the dataset mean of phi after calibration (MallowsPO-theta is then DPO
#: for that prompt), counted in ``metrics["num_missing_entropy"]``.
MISSING_ENTROPY = ("error", "mean")


def _select(name: str, policy: Tensor, ref: Tensor, mask: Tensor, scores: Optional[Tensor],
            temperature: float) -> tuple[PairSelection, Tensor, Tensor]:
    """:func:`raypo.losses.pairwise.select_pair` that also returns the chosen and rejected indices."""
    w, lo, usable, mask = pair_labels(name, mask, scores, dtype=policy.dtype, temperature=temperature)

    def take(x: Tensor, idx: Tensor) -> Tensor:
        return x.gather(1, idx.unsqueeze(1)).squeeze(1)

    return PairSelection(take(policy, w), take(policy, lo), take(ref, w), take(ref, lo), usable, mask), w, lo


def _given_dispersion(name: str, dispersion: Tensor, batch: int, like: Tensor) -> Tensor:
    d = torch.as_tensor(dispersion).to(device=like.device, dtype=like.dtype)
    if d.dim() == 0:
        d = d.expand(batch)
    if d.shape != (batch,):
        raise LossHyperparameterError(f"{name}: dispersion must be [B] = [{batch}], got {tuple(d.shape)}")
    return d


def pair_dispersion(
    name: str, sel: PairSelection, chosen: Tensor, rejected: Tensor, like: Tensor, *,
    dispersion: Optional[Tensor], ref_entropy: Optional[Tensor], dispersion_c: float, missing_entropy: str,
) -> tuple[Tensor, Tensor]:
    """``(phi [B], missing [B] bool)``: each prompt's neg-log dispersion, from its own pair.

    Reference: docs/loss_reference.md §4.3. Either ``dispersion [B]`` (phi given per prompt) or
    ``ref_entropy [B, N]`` (each response's normalised reference entropy Hbar(y); NaN = missing), from which
    phi(x) = -c log((Hbar(y_w) + Hbar(y_l)) / 2) over the pair the loss chose (``chosen``, ``rejected``), as
    the MallowsPO code averages the chosen and the rejected response. A usable prompt whose pair has a
    missing entropy (NaN, or 0: a response without scored tokens) raises under ``missing_entropy="error"``
    and gets phi = 1 under ``"mean"``; skipped prompts get phi = 1 too (they are not in the loss).
    """
    check_choice(name, "missing_entropy", missing_entropy, MISSING_ENTROPY)
    batch = like.shape[0]
    if (dispersion is None) == (ref_entropy is None):
        raise LossHyperparameterError(
            f"{name}: needs exactly one of dispersion [B] (phi(x) per prompt) or ref_entropy [B, N] (each "
            "response's normalised reference entropy, raypo.losses.normalized_mean_entropy); got "
            f"{'both' if dispersion is not None else 'neither'}; phi = 1 everywhere reduces MallowsPO-theta "
            "to DPO"
        )
    no_missing = torch.zeros(batch, dtype=torch.bool, device=like.device)
    if dispersion is not None:
        return _given_dispersion(name, dispersion, batch, like), no_missing
    if not (isinstance(dispersion_c, (int, float)) and math.isfinite(dispersion_c) and dispersion_c > 0):
        raise LossHyperparameterError(f"{name}: dispersion_c={dispersion_c!r} must be a finite number > 0")
    h = torch.as_tensor(ref_entropy).to(device=like.device, dtype=torch.float64)
    if tuple(h.shape) != tuple(like.shape):
        raise LossHyperparameterError(
            f"{name}: ref_entropy must be [B, N] = {tuple(like.shape)}, got {tuple(h.shape)}")
    h_w = h.gather(1, chosen.unsqueeze(1)).squeeze(1)
    h_l = h.gather(1, rejected.unsqueeze(1)).squeeze(1)
    present = (h_w > 0) & (h_l > 0)  # False for NaN
    missing = sel.usable & ~present
    if missing_entropy == "error" and bool(missing.any()):
        raise ValueError(
            f"{name}: {int(missing.sum())} of {int(sel.usable.sum())} prompts have no reference entropy for "
            "their chosen or rejected response (NaN, or 0 for a response without scored tokens), so their "
            "dispersion is unknown; recompute ref_entropy (train.reference=precomputed) or set "
            "loss.params.missing_entropy=mean to give those prompts phi = 1 (counted as num_missing_entropy)")
    one = torch.ones((), dtype=torch.float64, device=like.device)
    hbar = torch.where(sel.usable & present, 0.5 * (h_w + h_l), one)
    phi = torch.where(sel.usable & present, -dispersion_c * torch.log(hbar), one)
    return phi.to(like.dtype), missing


def _with_dispersion_metrics(out: LossOutput, phi: Tensor, missing: Tensor, usable: Tensor) -> LossOutput:
    """Adds ``num_missing_entropy`` and ``dispersion_sum`` (sum of phi over the counted prompts)."""
    zero = torch.zeros((), dtype=phi.dtype, device=phi.device)
    out.metrics["num_missing_entropy"] = missing.detach().to(phi.dtype).sum()
    out.metrics["dispersion_sum"] = torch.where(usable, phi, zero).detach().sum()
    return out


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
    ref_entropy: Optional[Tensor] = None,
    beta: float = 10.0,
    reference_free: bool = True,
    label_smoothing: float = 0.0,
    home_advantage: float = 0.0,
    if_mixing_alpha: bool = False,
    mixing_alpha: float = 0.5,
    length_normalization: bool = True,
    temperature: float = 1.0,
    dispersion_c: float = DEFAULT_C,
    missing_entropy: str = "error",
) -> LossOutput:
    """MallowsPO-theta (docs/loss_reference.md §4.1; CODE ``loss_type="mallows_dpo"``).

        logits = (th_w - th_l) - (r_w - r_l) - h                 (if_mixing_alpha=False)
        logits = (th_w - th_l) - a (r_w - r_l) - (1 - a) h       (if_mixing_alpha=True, a = mixing_alpha)
        L = -(1 - eps) log sigmoid(beta * phi(x) * logits) - eps log sigmoid(-beta * phi(x) * logits)

    ``reference_free=True`` sets (r_w - r_l) := 0 and a := 0. phi = ``dispersion [B]``, or from
    ``ref_entropy [B, N]`` and ``dispersion_c`` over the chosen pair (:func:`pair_dispersion`;
    ``missing_entropy``: ``error`` | ``mean``).

    Defaults as shipped (mallowsPO_config.py): beta = 10, reference_free = True, length-normalised
    log-probs (``length_normalization=True`` tells the trainer to feed per-token means), h = 0, eps = 0;
    temperature = 1.0 (rating softmax, only for ``[B, N, m]`` scores). The paper's "MallowsPO-theta on top
    of DPO": reference_free=False, length_normalization=False, beta ~ 0.1. phi = 1 gives DPO (§7 identity 7).
    """
    name = "mallows_theta"
    _check_common(name, beta, home_advantage, mixing_alpha)
    check_range(name, "label_smoothing", label_smoothing, 0.0, 0.5)
    policy, ref, mask = prepare_inputs(name, policy_logps, ref_logps, mask)
    sel, w, lo = _select(name, policy, ref, mask, scores, temperature)
    phi, missing = pair_dispersion(name, sel, w, lo, policy, dispersion=dispersion, ref_entropy=ref_entropy,
                                   dispersion_c=dispersion_c, missing_entropy=missing_entropy)
    logits = _mallows_logits(sel, reference_free=reference_free, home_advantage=home_advantage,
                             if_mixing_alpha=if_mixing_alpha, mixing_alpha=mixing_alpha)
    z = beta * phi * logits
    per_prompt = -(1.0 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)
    out = pair_output(per_prompt, sel, *_rewards(policy, ref, sel, beta, reference_free))
    return _with_dispersion_metrics(out, phi, missing, sel.usable)


def mallows_ipo_loss(
    policy_logps: Tensor,
    ref_logps: Optional[Tensor],
    *,
    mask: Optional[Tensor] = None,
    scores: Optional[Tensor] = None,
    dispersion: Optional[Tensor] = None,
    ref_entropy: Optional[Tensor] = None,
    beta: float = 0.1,
    variant: str = "mallowspo",
    reference_free: bool = False,
    home_advantage: float = 0.0,
    if_mixing_alpha: bool = False,
    mixing_alpha: float = 0.5,
    length_normalization: bool = True,
    temperature: float = 1.0,
    dispersion_c: float = DEFAULT_C,
    missing_entropy: str = "error",
) -> LossOutput:
    """MallowsPO IPO variants (docs/loss_reference.md §4.2; CODE).

        variant="mallowspo"          (MallowsPO repo):  L = (phi * logits - 1 / (2 beta))^2
        variant="rainbowpo"          (RainbowPO):       L = (beta * phi * logits - 1/2)^2   (beta^2 x above)
        variant="rainbowpo_modified" (RainbowPO ``mallows_ipo_modified``, also accepted as that name):
                                                        L = relu(1/2 - beta * phi * logits)^2

    logits and the dispersion inputs as :func:`mallows_theta_loss`. Defaults: beta = 0.1, variant
    "mallowspo", with the reference (reference_free=False) and length-normalised log-probs as TRL's IPO,
    so that phi = 1 gives TRL IPO (§7 identity 7); temperature = 1.0 (rating softmax, only for
    ``[B, N, m]`` scores).
    """
    name = "mallows_ipo"
    _check_common(name, beta, home_advantage, mixing_alpha)
    # "mallows_ipo_modified" is RainbowPO's own loss_type name for the modified variant.
    check_choice(name, "variant", variant, MALLOWS_IPO_VARIANTS)
    policy, ref, mask = prepare_inputs(name, policy_logps, ref_logps, mask)
    sel, w, lo = _select(name, policy, ref, mask, scores, temperature)
    phi, missing = pair_dispersion(name, sel, w, lo, policy, dispersion=dispersion, ref_entropy=ref_entropy,
                                   dispersion_c=dispersion_c, missing_entropy=missing_entropy)
    logits = _mallows_logits(sel, reference_free=reference_free, home_advantage=home_advantage,
                             if_mixing_alpha=if_mixing_alpha, mixing_alpha=mixing_alpha)
    if variant == "mallowspo":
        per_prompt = (phi * logits - 1.0 / (2.0 * beta)) ** 2
    elif variant == "rainbowpo":
        per_prompt = (beta * phi * logits - 0.5) ** 2
    else:
        per_prompt = torch.relu(0.5 - beta * phi * logits) ** 2
    out = pair_output(per_prompt, sel, *_rewards(policy, ref, sel, beta, reference_free))
    return _with_dispersion_metrics(out, phi, missing, sel.usable)


# --------------------------------------------------------------------------------------------------
# MallowsPO-phi (docs/loss_reference.md §4.4; links in raypo/losses/mallows_link.py, §4.5)
# --------------------------------------------------------------------------------------------------

_neg_log_g = neg_log_link_exact  # the exact link's -log g (kept under its old name)


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
    return torch.exp(-neg_log_link_exact(u64, as_neg_log_phi(phi, u64))).to(out_dtype)


def mallows_phi_loss(
    policy_logps: Tensor,
    ref_logps: Optional[Tensor],
    *,
    mask: Optional[Tensor] = None,
    scores: Optional[Tensor] = None,
    dispersion: Optional[Tensor] = None,
    ref_entropy: Optional[Tensor] = None,
    beta: float = 0.1,
    reference_free: bool = False,
    length_normalization: bool = False,
    temperature: float = 1.0,
    dispersion_c: float = DEFAULT_C,
    missing_entropy: str = "error",
    link: str = "exact",
    sigmoid_scale: float = 1.0,
    poly_degree: int = 5,
    poly_range: float = 3.0,
    poly_range_mode: str = "dispersion",
) -> LossOutput:
    """MallowsPO-phi with the Mallows-Kendall link (PAPER, not in any official code).

    Reference: docs/loss_reference.md §4.4 (exact link) and §4.5 (smooth approximations).

        u = s_w - s_l = beta * ((th_w - th_l) - (r_w - r_l)),   varphi(x) = exp(-phi(x)) = Hbar(x)^c
        L = -log g_varphi(x)(u)

    ``link``: ``exact`` (:func:`mallows_phi_link`; g(0) := 1/2, and at u = 0 the gradient is the mean of the
    one-sided gradients, since the closed form jumps at 0), ``sigmoid`` (g ~ sigmoid(sigmoid_scale * phi *
    u): MallowsPO-theta with beta * sigmoid_scale), or ``polynomial`` (an odd polynomial of degree
    ``poly_degree`` fitted per prompt to the exact link on [-U, U], U = ``poly_range`` / phi for
    ``poly_range_mode="dispersion"`` or ``poly_range`` for ``"fixed"``; constant beyond); the MallowsPO
    paper's Appendix C.5, forms of raypo/losses/mallows_link.py.

    The dispersion: ``dispersion [B]`` (phi(x) > 0 given), or ``ref_entropy [B, N]`` with
    ``dispersion_c`` (phi from the chosen pair, :func:`pair_dispersion`). The link is computed in float64
    and the loss cast back. Defaults: beta = 0.1, with the reference, summed log-probs (the DPO-based
    setting); temperature = 1.0 (rating softmax, only for ``[B, N, m]`` scores).
    """
    name = "mallows_phi"
    check_positive(name, "beta", beta)
    check_choice(name, "link", link, LINKS)
    check_choice(name, "poly_range_mode", poly_range_mode, POLY_RANGE_MODES)
    check_positive(name, "sigmoid_scale", sigmoid_scale)
    check_positive(name, "poly_range", poly_range)
    if not (isinstance(poly_degree, int) and poly_degree >= 1 and poly_degree % 2 == 1):
        raise LossHyperparameterError(
            f"{name}: poly_degree={poly_degree!r} must be an odd integer >= 1, e.g. 5")
    policy, ref, mask = prepare_inputs(name, policy_logps, ref_logps, mask)
    sel, w, lo = _select(name, policy, ref, mask, scores, temperature)
    phi, missing = pair_dispersion(name, sel, w, lo, policy, dispersion=dispersion, ref_entropy=ref_entropy,
                                   dispersion_c=dispersion_c, missing_entropy=missing_entropy)
    if not bool((torch.isfinite(phi) & (phi > 0))[sel.usable].all()):
        raise LossHyperparameterError(
            f"{name}: dispersion (neg-log dispersion phi = -c log Hbar) must be finite and > 0 for every "
            "prompt (Hbar in (0, 1)); got values outside that range"
        )
    s_all, s_w, s_l = _rewards(policy, ref, sel, beta, reference_free)
    u = s_w - s_l
    a = torch.where(sel.usable, phi.detach(), torch.ones_like(phi)).to(torch.float64)
    # The link runs in float64 on [B] scalars: cheap, and it keeps -log g exact in float32 training.
    per_prompt = neg_log_link(u.to(torch.float64), a, link, sigmoid_scale=sigmoid_scale,
                              poly_degree=poly_degree, poly_range_=poly_range,
                              poly_range_mode=poly_range_mode).to(u.dtype)
    out = pair_output(per_prompt, sel, s_all, s_w, s_l)
    return _with_dispersion_metrics(out, phi, missing, sel.usable)
