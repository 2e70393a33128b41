"""MallowsPO specifics: the exact Mallows-Kendall link (accuracy, stability, the gradient at 0) and the
dispersion estimator (docs/loss_reference.md §4.3, 4.4)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from loss_cases import BUNDLED_VECTORS_PATH, load_vectors

from raypo.losses import (
    calibrate_c,
    entropy_from_logits,
    listwise_loss,
    mallows_phi_link,
    neg_log_dispersion,
    normalized_mean_entropy,
)
from raypo.losses.mallows import DEFAULT_C, _neg_log_g

D64 = torch.float64


def _g_mp(u: float, phi: float) -> float:
    mpmath = pytest.importorskip("mpmath")
    mpmath.mp.dps = 200  # 1 - g(40) at phi = 0.01 is 4e-79
    p = mpmath.mpf(phi)

    def gp(v):
        v = mpmath.mpf(v)
        return (v + 1) / (1 - p ** (v + 1)) - v / (1 - p**v)

    if u == 0:
        return 0.5
    return float(gp(u)) if u > 0 else float(1 - gp(-u))


@pytest.mark.parametrize("phi", [0.01, 0.2, 0.5, 0.9, 0.999])
@pytest.mark.parametrize("u", [-40.0, -5.5, -1.0, -0.3, -1e-7, 1e-7, 0.3, 1.0, 2.7, 50.0])
def test_link_matches_high_precision(phi: float, u: float) -> None:
    got = mallows_phi_link(torch.tensor([u], dtype=D64), phi).item()
    want = _g_mp(u, phi)
    assert got == pytest.approx(want, rel=1e-11, abs=1e-300)


def test_link_brute_force_mallows_kendall() -> None:
    """g(d) = P(item at central rank i beats item at rank i + d) under Mallows-Kendall, n = 5."""
    n, phi = 5, 0.4
    perms = list(itertools.permutations(range(n)))

    def inversions(p):
        return sum(1 for a, b in itertools.combinations(range(n), 2) if p[a] > p[b])

    weights = [phi ** inversions(p) for p in perms]
    z = sum(weights)
    for d in (1, 2, 3):
        i, j = 0, d  # central ranks
        # p[k] = position of item k; item i beats item j if it is placed first.
        prob = sum(w for p, w in zip(perms, weights) if p[i] < p[j]) / z
        got = mallows_phi_link(torch.tensor([float(d)], dtype=D64), phi).item()
        assert got == pytest.approx(prob, rel=1e-12)


def test_link_jump_at_zero_and_convention() -> None:
    phi = 0.5
    g0 = mallows_phi_link(torch.tensor([0.0], dtype=D64), phi).item()
    g0p = mallows_phi_link(torch.tensor([1e-12], dtype=D64), phi).item()
    assert g0 == 0.5
    # 0.5573 (docs/loss_reference.md §4.4)
    assert g0p == pytest.approx(1 / (1 - phi) + 1 / math.log(phi), rel=1e-9)
    assert g0p == pytest.approx(0.5573, abs=1e-4)


@pytest.mark.parametrize("phi", [1e-8, 0.3, 1 - 1e-9])
def test_link_extremes_finite(phi: float) -> None:
    u = torch.tensor([-1e4, -50.0, -1e-9, 0.0, 1e-9, 50.0, 1e4], dtype=D64, requires_grad=True)
    a = torch.full_like(u, -math.log(phi))
    loss = _neg_log_g(u, a)
    (grad,) = torch.autograd.grad(loss.sum(), u)
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    assert (grad <= 0).all()  # -log g is decreasing in u


def test_gradient_near_zero_is_well_defined() -> None:
    a = torch.tensor(math.log(2.0), dtype=D64)  # phi = 1/2
    grads = {}
    for u0 in (-1e-3, -1e-9, 0.0, 1e-9, 1e-3):
        u = torch.tensor(u0, dtype=D64, requires_grad=True)
        (grads[u0],) = torch.autograd.grad(_neg_log_g(u, a), u)
    # One-sided derivatives by finite differences away from the jump.
    h = 1e-6
    def f(u: float) -> float:
        return _neg_log_g(torch.tensor(u, dtype=D64), a).item()

    right = (f(2 * h) - f(h)) / h
    left = (f(-h) - f(-2 * h)) / h
    assert grads[1e-9].item() == pytest.approx(right, rel=1e-4)
    assert grads[-1e-9].item() == pytest.approx(left, rel=1e-4)
    assert grads[0.0].item() == pytest.approx(0.5 * (left + right), rel=1e-4)
    assert grads[0.0].item() < 0
    # Closed form of docs/loss_reference.md §4.4 check: g'(0+) = 1/2 + B'(a) = 0.1137 at phi = 1/2.
    g0 = 1 / (1 - 0.5) + 1 / math.log(0.5)
    assert -right * g0 == pytest.approx(0.5 + (1 - 2 * math.log(2)), rel=1e-4)


def test_mallows_phi_loss_at_reference_is_log2_with_nonzero_gradient() -> None:
    ref = torch.tensor([[-10.0, -12.0], [-3.0, -4.0]], dtype=D64)
    policy = ref.clone().requires_grad_(True)
    out = listwise_loss("mallows_phi", policy, ref, dispersion=torch.tensor([1.0, 0.5], dtype=D64))
    assert out.loss.item() == pytest.approx(math.log(2), rel=1e-15)
    (grad,) = torch.autograd.grad(out.loss, policy)
    assert (grad[:, 0] < 0).all() and (grad[:, 1] > 0).all()


def test_mallows_phi_loss_matches_link() -> None:
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(6, 2, generator=g, dtype=D64) * 5 - 50
    policy = ref + torch.randn(6, 2, generator=g, dtype=D64) * 5
    disp = 0.3 + torch.rand(6, generator=g, dtype=D64)
    beta = 0.2
    out = listwise_loss("mallows_phi", policy, ref, dispersion=disp, beta=beta)
    u = beta * ((policy[:, 0] - policy[:, 1]) - (ref[:, 0] - ref[:, 1]))
    varphi = torch.exp(-disp)
    want = -torch.log(mallows_phi_link(u, varphi))
    assert out.loss.item() == pytest.approx(want.mean().item(), rel=1e-12)


def test_mallows_phi_float32() -> None:
    ref = torch.tensor([[-10.0, -12.0], [-3.0, -4.0]], dtype=torch.float32)
    policy = (ref + torch.tensor([[0.5, -0.2], [1e4, -1e4]])).requires_grad_(True)
    out = listwise_loss("mallows_phi", policy, ref, dispersion=torch.tensor([1.0, 0.5]))
    (grad,) = torch.autograd.grad(out.loss, policy)
    assert out.loss.dtype == torch.float32 and torch.isfinite(grad).all()


# Dispersion estimator -------------------------------------------------------------------------------


MALLOWS_VECTORS = [v for v in load_vectors(BUNDLED_VECTORS_PATH)
                   if "neg_log_dispersion_phi" in (v.get("derived") or {})]


@pytest.mark.parametrize("v", MALLOWS_VECTORS, ids=[v["id"] for v in MALLOWS_VECTORS])
def test_neg_log_dispersion_vector_value(v: dict) -> None:
    """The spec's phi = -c log((Hbar_w + Hbar_l) / 2) at the vector's c, as a pair and per response; at the
    configured c (what the trainer passes) phi scales linearly, and the estimator's default c is that one."""
    inp, vec_c, want = v["inputs"], v["params"]["c"], v["derived"]["neg_log_dispersion_phi"]
    hbar_w, hbar_l = torch.tensor([inp["Hbar_w"]], dtype=D64), torch.tensor([inp["Hbar_l"]], dtype=D64)
    phi = neg_log_dispersion((hbar_w, hbar_l), c=vec_c)
    assert phi.item() == pytest.approx(want, rel=1e-11)
    per_response = neg_log_dispersion(torch.tensor([[inp["Hbar_w"], inp["Hbar_l"], 0.9]], dtype=D64),
                                      torch.tensor([[True, True, False]]), c=vec_c)
    assert per_response.item() == pytest.approx(want, rel=1e-11)
    c = DEFAULT_C
    at_config = neg_log_dispersion((hbar_w, hbar_l), c=c)
    assert at_config.item() == pytest.approx(want * c / vec_c, rel=1e-11)
    assert neg_log_dispersion((hbar_w, hbar_l)).item() == pytest.approx(at_config.item(), rel=1e-15)


def test_entropy_and_normalized_mean() -> None:
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 3, 7, 11, generator=g, dtype=D64)  # [B, N, T, V]
    h = entropy_from_logits(logits)
    p = torch.softmax(logits, -1)
    torch.testing.assert_close(h, -(p * p.log()).sum(-1))
    mask = torch.ones(2, 3, 7)
    mask[..., 5:] = 0
    hbar = normalized_mean_entropy(h, mask, vocab_size=11)
    torch.testing.assert_close(hbar, h[..., :5].mean(-1) / math.log(11))
    assert bool(((hbar > 0) & (hbar < 1)).all())
    uniform = entropy_from_logits(torch.zeros(4, 11, dtype=D64))
    hbar_uniform = normalized_mean_entropy(uniform, torch.ones(4), 11)
    torch.testing.assert_close(hbar_uniform, torch.tensor(1.0, dtype=D64))


def test_calibrate_c_gives_mean_phi_one() -> None:
    hbar = torch.tensor([0.02, 0.05, 0.1, 0.2, 0.35], dtype=D64)
    c = calibrate_c(hbar)
    assert neg_log_dispersion(hbar, c=c).mean().item() == pytest.approx(1.0, rel=1e-14)
    # The shipped c (MallowsPO's config) is the calibrated c of a dataset whose mean -log Hbar is 1 / c:
    # there the mean phi is 1.
    c_cfg = DEFAULT_C
    spread = torch.tensor([-0.5, 0.0, 0.5], dtype=D64)
    hbar_cfg = torch.exp(-(1.0 / c_cfg + spread))
    assert calibrate_c(hbar_cfg) == pytest.approx(c_cfg, rel=1e-12)
    assert neg_log_dispersion(hbar_cfg, c=c_cfg).mean().item() == pytest.approx(1.0, rel=1e-12)
    with pytest.raises(ValueError):
        calibrate_c(torch.tensor([1.0, 1.0]))
