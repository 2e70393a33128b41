"""MallowsPO-phi's link g_varphi(u): the exact Mallows-Kendall form and the two smooth approximations.

Reference: docs/loss_reference.md §4.4 (exact link) and §4.5 (approximations; the MallowsPO paper's
Appendix C.5, whose formulas are derived there because neither the paper text available to raypo nor the
authors' code states them).

All functions take ``u`` (the reward margin s_w - s_l) and ``a = -log varphi > 0`` (the neg-log dispersion
phi(x) of the prompt) and return ``-log g(u)``, float64 in, float64 out:

* :func:`neg_log_link_exact`: the closed form of §4.4 for real u, with g(0) := 1/2 and a hand-set gradient
  at 0 (the closed form jumps there).
* :func:`neg_log_link_sigmoid`: g(u) ~ sigmoid(kappa * a * u); exact at |u| = 1 for kappa = 1, where
  g(1) = 1 / (1 + varphi). MallowsPO-phi with this link is MallowsPO-theta with beta * kappa.
* :func:`neg_log_link_polynomial`: g(u) ~ 1/2 + sum_k c_k (u/U)^k over odd k <= degree, a least-squares fit
  of the exact link on [-U, U] away from its jump at 0 (per prompt, since varphi varies), constant beyond
  +-U; U tied to the dispersion (U = range / a, a fixed interval of a * u; the default) or fixed.
"""

from __future__ import annotations

import math
from typing import Union

import torch
from torch import Tensor

LINKS = ("exact", "sigmoid", "polynomial")
POLY_RANGE_MODES = ("fixed", "dispersion")

# --------------------------------------------------------------------------------------------------
# The exact Mallows-Kendall link (docs/loss_reference.md §4.4)
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


def neg_log_link_exact(u: Tensor, a: Tensor) -> Tensor:
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


# --------------------------------------------------------------------------------------------------
# Smooth approximations (docs/loss_reference.md §4.5; MallowsPO paper Appendix C.5)
# --------------------------------------------------------------------------------------------------


def neg_log_link_sigmoid(u: Tensor, a: Tensor, scale: float = 1.0) -> Tensor:
    """-log sigmoid(scale * a * u): the sigmoid approximation g(u) ~ sigmoid(-scale * log varphi * u).

    Reference: docs/loss_reference.md §4.5. With scale = 1 it is exact at u = +-1 (g(1) = 1/(1 + varphi)),
    above the exact link for |u| > 1 (which saturates more slowly), and smooth at 0 with slope a/2 of g.
    """
    return -torch.nn.functional.logsigmoid(scale * a * u)


def poly_range(a: Tensor, range_: float, mode: str) -> Tensor:
    """The fit interval's half-width U: ``range_`` (mode fixed) or ``range_ / a`` (mode dispersion)."""
    if mode == "fixed":
        return torch.full_like(a, float(range_))
    return float(range_) / a


def poly_nodes(degree: int, half_width: Tensor) -> Tensor:
    """``[..., M]`` fit nodes u in [lo, U], lo = min(1, U/2): midpoints of M = 4 (degree + 1) equal cells.

    The nodes stay away from the exact link's jump at 0 (docs/loss_reference.md §4.4): between 0 and lo
    the odd polynomial interpolates from g(0) = 1/2, so the jump is smoothed over instead of fitted.
    """
    m = 4 * (degree + 1)
    cells = (torch.arange(m, dtype=torch.float64, device=half_width.device) + 0.5) / m
    lo = torch.minimum(torch.ones_like(half_width), half_width / 2)
    return lo.unsqueeze(-1) + (half_width - lo).unsqueeze(-1) * cells


def polynomial_link_coefficients(a: Tensor, degree: int, half_width: Tensor) -> Tensor:
    """``[..., K]`` coefficients c_k (odd k = 1, 3, ..., degree) of g(u) ~ 1/2 + sum_k c_k (u/U)^k.

    Reference: docs/loss_reference.md §4.5. Least squares (float64) of g(u) - 1/2, g the exact link
    (:func:`neg_log_link_exact`), on the nodes of :func:`poly_nodes`; one fit per element of ``a`` and
    ``half_width`` (U). No gradient flows through the coefficients.
    """
    a = a.detach().to(torch.float64)
    half_width = half_width.detach().to(torch.float64)
    a, half_width = torch.broadcast_tensors(a, half_width)
    u = poly_nodes(degree, half_width)  # [..., M]
    powers = torch.arange(1, degree + 1, 2, dtype=torch.float64, device=a.device)
    design = (u / half_width.unsqueeze(-1)).unsqueeze(-1) ** powers  # [..., M, K]
    target = torch.exp(-neg_log_link_exact(u, a.unsqueeze(-1))) - 0.5  # [..., M]
    return torch.linalg.lstsq(design, target.unsqueeze(-1)).solution.squeeze(-1)


def neg_log_link_polynomial(u: Tensor, a: Tensor, degree: int = 5, range_: float = 3.0,
                            mode: str = "dispersion") -> Tensor:
    """-log of the polynomial approximation of g (docs/loss_reference.md §4.5).

        t = clamp(u / U, -1, 1),  g_poly(u) = 1/2 + sum_{odd k <= degree} c_k t^k,  clamped to [1e-12, 1]

    U = ``range_`` (mode ``fixed``) or ``range_ / a`` (mode ``dispersion``); the c_k from
    :func:`polynomial_link_coefficients` (constants: no gradient flows into them). g_poly(-u) =
    1 - g_poly(u), g_poly(0) = 1/2, smooth at 0; beyond +-U the value is constant (gradient 0).
    """
    half_width = poly_range(a, range_, mode)
    coef = polynomial_link_coefficients(a, degree, half_width)
    t = (u / half_width).clamp(-1.0, 1.0)
    powers = torch.arange(1, degree + 1, 2, dtype=torch.float64, device=u.device)
    g = 0.5 + (coef * t.unsqueeze(-1) ** powers).sum(-1)
    return -torch.log(g.clamp(1e-12, 1.0))


def neg_log_link(u: Tensor, a: Tensor, link: str = "exact", *, sigmoid_scale: float = 1.0,
                 poly_degree: int = 5, poly_range_: float = 3.0,
                 poly_range_mode: str = "dispersion") -> Tensor:
    """-log g(u) by ``link`` (``exact`` | ``sigmoid`` | ``polynomial``); float64 ``u`` and ``a``."""
    if link == "exact":
        return neg_log_link_exact(u, a)
    if link == "sigmoid":
        return neg_log_link_sigmoid(u, a, sigmoid_scale)
    if link == "polynomial":
        return neg_log_link_polynomial(u, a, poly_degree, poly_range_, poly_range_mode)
    raise ValueError(f"mallows link {link!r} is not one of {', '.join(LINKS)}")


def as_neg_log_phi(phi: Union[float, Tensor], like: Tensor) -> Tensor:
    """``-log varphi`` (float64) of a Mallows dispersion varphi in (0, 1); raises outside that range."""
    p = torch.as_tensor(phi, dtype=torch.float64, device=like.device)
    if not bool(((p > 0) & (p < 1)).all()):
        raise ValueError(f"mallows_phi_link: the Mallows dispersion phi must lie in (0, 1), got {phi}")
    return -torch.log(p)
