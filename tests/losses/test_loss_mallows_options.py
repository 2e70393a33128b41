"""MallowsPO options: the pair's own dispersion from per-response entropies, the missing-entropy rule, and
the smooth approximations of the phi link (docs/loss_reference.md §4.3-4.5; docs/losses.md "MallowsPO")."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from raypo.config import load_config
from raypo.errors import ConfigError
from raypo.losses import listwise_loss, loss_denominator, mallows_phi_link, neg_log_dispersion
from raypo.losses.mallows_link import (
    neg_log_link_exact,
    neg_log_link_polynomial,
    poly_range,
    polynomial_link_coefficients,
)

D64 = torch.float64
MALLOWS = ("mallows_theta", "mallows_ipo", "mallows_phi")


def _batch():
    """Three prompts of N = 4 with scalar scores: best / worst differ from columns 0 / 1."""
    g = torch.Generator().manual_seed(7)
    ref = -30.0 + 3.0 * torch.randn(3, 4, generator=g, dtype=D64)
    policy = ref + torch.randn(3, 4, generator=g, dtype=D64)
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.3], [2.0, 1.0, 3.0, 0.0], [1.0, 4.0, 2.0, 3.0]], dtype=D64)
    hbar = torch.tensor([[0.10, 0.02, 0.30, 0.05], [0.20, 0.04, 0.08, 0.15], [0.01, 0.12, 0.40, 0.06]],
                        dtype=D64)
    return policy, ref, scores, hbar


# ----------------------------------------------------------------------------------------------------
# The pair's dispersion (docs/loss_reference.md §4.3)
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", MALLOWS)
def test_dispersion_comes_from_the_chosen_pair(name: str) -> None:
    policy, ref, scores, hbar = _batch()
    c = 0.37
    best, worst = scores.argmax(-1), scores.argmin(-1)
    pair = 0.5 * (hbar.gather(1, best[:, None]) + hbar.gather(1, worst[:, None])).squeeze(1)
    phi_pair = -c * torch.log(pair)
    hp = {"beta": 0.3} if name != "mallows_ipo" else {}
    got = listwise_loss(name, policy, ref, scores=scores, ref_entropy=hbar, dispersion_c=c, **hp)
    want = listwise_loss(name, policy, ref, scores=scores, dispersion=phi_pair, **hp)
    assert got.loss.item() == pytest.approx(want.loss.item(), rel=1e-13)
    assert got.metrics["dispersion_sum"].item() == pytest.approx(phi_pair.sum().item(), rel=1e-13)
    # ... and not from the mean over all N responses (raypo's earlier rule)
    all_n = listwise_loss(name, policy, ref, scores=scores, dispersion=neg_log_dispersion(hbar, c=c), **hp)
    assert abs(all_n.loss.item() - got.loss.item()) > 1e-3


def test_dispersion_gradient_matches_given_phi() -> None:
    policy, ref, scores, hbar = _batch()
    p1, p2 = policy.clone().requires_grad_(True), policy.clone().requires_grad_(True)
    best, worst = scores.argmax(-1), scores.argmin(-1)
    phi = -0.29 * torch.log(0.5 * (hbar[torch.arange(3), best] + hbar[torch.arange(3), worst]))
    out1 = listwise_loss("mallows_theta", p1, ref, scores=scores, ref_entropy=hbar, beta=0.5,
                         reference_free=False)
    out2 = listwise_loss("mallows_theta", p2, ref, scores=scores, dispersion=phi, beta=0.5,
                         reference_free=False)
    (g1,) = torch.autograd.grad(out1.loss, p1)
    (g2,) = torch.autograd.grad(out2.loss, p2)
    torch.testing.assert_close(g1, g2, rtol=1e-13, atol=1e-15)


def test_needs_exactly_one_dispersion_input() -> None:
    policy, ref, scores, hbar = _batch()
    with pytest.raises(ValueError, match="exactly one of dispersion"):
        listwise_loss("mallows_theta", policy, ref, scores=scores)
    with pytest.raises(ValueError, match="both"):
        listwise_loss("mallows_theta", policy, ref, scores=scores, ref_entropy=hbar,
                      dispersion=torch.ones(3, dtype=D64))
    with pytest.raises(ValueError, match="ref_entropy must be"):
        listwise_loss("mallows_theta", policy, ref, scores=scores, ref_entropy=hbar[:, :3])
    with pytest.raises(ValueError, match="dispersion_c"):
        listwise_loss("mallows_theta", policy, ref, scores=scores, ref_entropy=hbar, dispersion_c=0.0)
    with pytest.raises(ValueError, match="does not use dispersion or ref_entropy"):
        listwise_loss("dpo", policy, ref, scores=scores, ref_entropy=hbar)


# ----------------------------------------------------------------------------------------------------
# Missing entropies: an error, or phi = 1 counted (never a silent phi = 0)
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("gap", [math.nan, 0.0])
def test_missing_entropy_is_an_error_by_default(gap: float) -> None:
    policy, ref, scores, hbar = _batch()
    hbar = hbar.clone()
    hbar[1, 2] = gap  # prompt 1's chosen response (best score 3.0)
    with pytest.raises(ValueError, match="missing_entropy=mean"):
        listwise_loss("mallows_theta", policy, ref, scores=scores, ref_entropy=hbar)


def test_missing_entropy_mean_gives_phi_one_and_is_counted() -> None:
    policy, ref, scores, hbar = _batch()
    hbar = hbar.clone()
    hbar[1, 2] = math.nan
    out = listwise_loss("mallows_theta", policy, ref, scores=scores, ref_entropy=hbar, beta=0.5,
                        reference_free=False, missing_entropy="mean")
    best, worst = scores.argmax(-1), scores.argmin(-1)
    rows = torch.arange(3)
    phi = -0.29 * torch.log(0.5 * (hbar[rows, best] + hbar[rows, worst]))
    phi[1] = 1.0
    want = listwise_loss("mallows_theta", policy, ref, scores=scores, dispersion=phi, beta=0.5,
                         reference_free=False)
    assert out.loss.item() == pytest.approx(want.loss.item(), rel=1e-13)
    assert out.metrics["num_missing_entropy"].item() == 1.0
    # the prompt still counts: the denominator is the label-only one
    assert out.denominator.item() == 3.0
    den = loss_denominator("mallows_theta", scores=scores, ref_entropy=hbar, dtype=D64,
                           missing_entropy="mean")
    assert torch.equal(den, out.denominator)


def test_entropy_gaps_outside_the_pair_or_in_skipped_prompts_are_fine() -> None:
    policy, ref, scores, hbar = _batch()
    hbar = hbar.clone()
    hbar[0, 2] = math.nan  # prompt 0's pair is (1, 0): response 2 is not in it
    scores = scores.clone()
    scores[2] = 1.0  # all tied: skipped
    hbar[2] = math.nan
    out = listwise_loss("mallows_theta", policy, ref, scores=scores, ref_entropy=hbar)
    assert torch.isfinite(out.loss) and out.metrics["num_missing_entropy"].item() == 0.0
    assert out.denominator.item() == 2.0


def test_missing_entropy_rule_is_checked() -> None:
    policy, ref, scores, hbar = _batch()
    with pytest.raises(ValueError, match="missing_entropy"):
        listwise_loss("mallows_theta", policy, ref, scores=scores, ref_entropy=hbar, missing_entropy="zero")


# ----------------------------------------------------------------------------------------------------
# Links (docs/loss_reference.md §4.5)
# ----------------------------------------------------------------------------------------------------


def _phi_case(beta: float = 0.4):
    g = torch.Generator().manual_seed(3)
    ref = -20.0 + torch.randn(6, 2, generator=g, dtype=D64)
    policy = ref + 2.0 * torch.randn(6, 2, generator=g, dtype=D64)
    disp = 0.2 + 2.0 * torch.rand(6, generator=g, dtype=D64)
    u = beta * ((policy[:, 0] - policy[:, 1]) - (ref[:, 0] - ref[:, 1]))
    return policy, ref, disp, u


@pytest.mark.parametrize("scale", [1.0, 0.7])
def test_sigmoid_link_value_and_gradient(scale: float) -> None:
    beta = 0.4
    policy, ref, disp, u = _phi_case(beta)
    p = policy.clone().requires_grad_(True)
    out = listwise_loss("mallows_phi", p, ref, dispersion=disp, beta=beta, link="sigmoid",
                        sigmoid_scale=scale)
    want = -F.logsigmoid(scale * disp * u)
    assert out.loss.item() == pytest.approx(want.mean().item(), rel=1e-13)
    (grad,) = torch.autograd.grad(out.loss, p)
    dz = -torch.sigmoid(-scale * disp * u) * scale * disp * beta / 6  # d/d logp_w; -that for logp_l
    torch.testing.assert_close(grad[:, 0], dz, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(grad[:, 1], -dz, rtol=1e-12, atol=1e-15)
    # MallowsPO-phi with the sigmoid link is MallowsPO-theta with beta * scale (the same objective up to
    # the factor, the MallowsPO paper's Appendix C.5)
    theta = listwise_loss("mallows_theta", policy, ref, dispersion=disp, beta=beta * scale,
                          reference_free=False)
    assert out.loss.item() == pytest.approx(theta.loss.item(), rel=1e-12)


def test_sigmoid_link_is_exact_at_plus_minus_one() -> None:
    a = torch.tensor([0.3, 1.0, 2.5], dtype=D64)
    for u in (1.0, -1.0):
        uu = torch.full_like(a, u)
        exact = neg_log_link_exact(uu, a)
        torch.testing.assert_close(-F.logsigmoid(a * uu), exact, rtol=1e-13, atol=0)


@pytest.mark.parametrize("varphi", [0.2, 0.5, 0.8, 0.95])
def test_polynomial_link_approximates_the_exact_link(varphi: float) -> None:
    a = torch.tensor(-math.log(varphi), dtype=D64)
    half = float(poly_range(a, 3.0, "dispersion"))
    u = torch.linspace(min(1.0, half / 2), half, 60, dtype=D64)
    approx = torch.exp(-neg_log_link_polynomial(u, a))  # defaults: degree 5, range 3, dispersion mode
    exact = torch.exp(-neg_log_link_exact(u, a))
    assert (approx - exact).abs().max().item() < 0.02
    grid = torch.linspace(-half, half, 401, dtype=D64)
    g = torch.exp(-neg_log_link_polynomial(grid, a))
    assert bool((g[1:] > g[:-1]).all())  # increasing on the interval at the defaults
    torch.testing.assert_close(g + g.flip(0), torch.ones_like(g), rtol=0, atol=1e-12)  # g(-u) = 1 - g(u)


def test_polynomial_link_value_and_gradient() -> None:
    a = torch.tensor([0.4, 1.3], dtype=D64)
    half = poly_range(a, 3.0, "dispersion")
    coef = polynomial_link_coefficients(a, 5, half)
    u = torch.tensor([0.0, 0.0], dtype=D64, requires_grad=True)
    loss = neg_log_link_polynomial(u, a)
    assert loss.detach().tolist() == pytest.approx([math.log(2.0)] * 2, rel=1e-15)  # g(0) = 1/2 exactly
    (grad,) = torch.autograd.grad(loss.sum(), u)
    # smooth at 0: d(-log g)/du = -g'(0)/g(0) = -2 c_1 / U, no hand-set slope
    torch.testing.assert_close(grad, -2.0 * coef[:, 0] / half, rtol=1e-12, atol=0)
    assert bool((grad < 0).all())
    # elsewhere: the analytic derivative of the polynomial and central differences
    for u0 in (0.3, -0.9, 1.7):
        uu = torch.full((2,), u0, dtype=D64, requires_grad=True)
        (gr,) = torch.autograd.grad(neg_log_link_polynomial(uu, a).sum(), uu)
        t = u0 / half
        k = torch.arange(1, 6, 2, dtype=D64)
        g = 0.5 + (coef * t.unsqueeze(-1) ** k).sum(-1)
        dg = (coef * k * t.unsqueeze(-1) ** (k - 1)).sum(-1) / half
        torch.testing.assert_close(gr, -dg / g, rtol=1e-12, atol=0)
        h = 1e-6
        fd = (neg_log_link_polynomial(torch.full((2,), u0 + h, dtype=D64), a)
              - neg_log_link_polynomial(torch.full((2,), u0 - h, dtype=D64), a)) / (2 * h)
        torch.testing.assert_close(gr, fd, rtol=1e-6, atol=1e-9)
    # beyond +-U the link is constant
    far = (2.0 * half).detach().clone().requires_grad_(True)
    (g_far,) = torch.autograd.grad(neg_log_link_polynomial(far, a).sum(), far)
    assert torch.equal(g_far, torch.zeros_like(g_far))


def test_polynomial_link_fixed_range_ignores_the_dispersion() -> None:
    a = torch.tensor([0.5, 2.0], dtype=D64)
    assert poly_range(a, 4.0, "fixed").tolist() == [4.0, 4.0]
    assert poly_range(a, 4.0, "dispersion").tolist() == [8.0, 2.0]
    u = torch.tensor([3.0, 3.0], dtype=D64)
    fixed = neg_log_link_polynomial(u, a, 5, 4.0, "fixed")
    tied = neg_log_link_polynomial(u, a, 5, 4.0, "dispersion")
    assert fixed[0].item() != pytest.approx(tied[0].item(), rel=1e-6)
    assert tied[1].item() == pytest.approx(neg_log_link_polynomial(torch.tensor(2.0, dtype=D64), a[1], 5,
                                                                   4.0, "dispersion").item(), rel=1e-14)


@pytest.mark.parametrize("link", ["exact", "sigmoid", "polynomial"])
def test_mallows_phi_loss_per_link(link: str) -> None:
    beta = 0.4
    policy, ref, disp, u = _phi_case(beta)
    p = policy.clone().requires_grad_(True)
    out = listwise_loss("mallows_phi", p, ref, dispersion=disp, beta=beta, link=link)
    fns = {"exact": lambda: neg_log_link_exact(u, disp), "sigmoid": lambda: -F.logsigmoid(disp * u),
           "polynomial": lambda: neg_log_link_polynomial(u, disp)}
    assert out.loss.item() == pytest.approx(fns[link]().mean().item(), rel=1e-13)
    (grad,) = torch.autograd.grad(out.loss, p)
    assert bool((grad[:, 0] <= 0).all()) and bool((grad[:, 1] >= 0).all())
    torch.testing.assert_close(grad[:, 0], -grad[:, 1], rtol=1e-13, atol=0)
    if link == "exact":  # the default link is the closed form of docs/loss_reference.md §4.4
        want = -torch.log(mallows_phi_link(u, torch.exp(-disp)))
        assert out.loss.item() == pytest.approx(want.mean().item(), rel=1e-12)


def test_link_options_are_checked() -> None:
    policy, ref, disp, _ = _phi_case()
    for hp, match in (({"link": "cubic"}, "link"), ({"poly_degree": 4}, "odd"),
                      ({"poly_range_mode": "auto"}, "poly_range_mode"), ({"sigmoid_scale": 0.0}, "sigmoid")):
        with pytest.raises(ValueError, match=match):
            listwise_loss("mallows_phi", policy, ref, dispersion=disp, **hp)


# ----------------------------------------------------------------------------------------------------
# From YAML
# ----------------------------------------------------------------------------------------------------


def test_config_dispersion_c_auto_or_number() -> None:
    assert load_config(None, ["loss.name=mallows_theta"]).loss.dispersion_c == "auto"
    assert load_config(None, ["loss.name=mallows_theta", "loss.dispersion_c=0.4"]).loss.dispersion_c == 0.4
    for bad in ("fixed", "-1", "0"):
        with pytest.raises(ConfigError, match="loss.dispersion_c"):
            load_config(None, ["loss.name=mallows_theta", f"loss.dispersion_c={bad}"])
    with pytest.raises(ConfigError, match="move it to loss.dispersion_c"):
        load_config(None, ["loss.name=mallows_theta", "loss.params.dispersion_c=0.3"])


def test_config_link_params_validated_with_field_value_and_fix() -> None:
    cfg = load_config(None, ["loss.name=mallows_phi", "loss.params.link=polynomial",
                             "loss.params.poly_degree=7", "loss.params.poly_range_mode=fixed",
                             "loss.params.missing_entropy=mean"])
    assert cfg.loss.params["link"] == "polynomial"
    with pytest.raises(ConfigError, match=r"loss.params.link='cubic' is not one of exact, sigmoid"):
        load_config(None, ["loss.name=mallows_phi", "loss.params.link=cubic"])
    with pytest.raises(ConfigError, match=r"loss.params.poly_degree=4 must be an odd integer"):
        load_config(None, ["loss.name=mallows_phi", "loss.params.poly_degree=4"])
    with pytest.raises(ConfigError, match=r"loss.params.missing_entropy='zero' is not one of error, mean"):
        load_config(None, ["loss.name=mallows_theta", "loss.params.missing_entropy=zero"])
    with pytest.raises(ConfigError, match="link"):  # theta has no link
        load_config(None, ["loss.name=mallows_theta", "loss.params.link=sigmoid"])


def test_shipped_dpo_based_theta_config():
    """configs/loss/mallows_theta_dpo.yaml is the paper's MallowsPO-theta on top of DPO: the reference, summed
    log-probs, beta = 0.1; with phi = 1 it is DPO (docs/loss_reference.md §7 identity 7)."""
    from pathlib import Path

    from raypo.losses import get_loss_spec

    root = Path(__file__).resolve().parents[2]
    cfg = load_config(root / "configs/loss/mallows_theta_dpo.yaml")
    spec, hp = get_loss_spec(cfg.loss.name), {**cfg.loss.params, "beta": cfg.loss.beta}
    assert cfg.loss.name == "mallows_theta" and cfg.loss.beta == 0.1 and cfg.loss.dispersion_c == "auto"
    assert spec.uses_reference(hp) and spec.logp_reduction_for(hp) == "sum"
    policy, ref, scores, _ = _batch()
    ones = torch.ones(3, dtype=D64)
    theta = listwise_loss("mallows_theta", policy, ref, scores=scores, dispersion=ones, **hp)
    dpo = listwise_loss("dpo", policy, ref, scores=scores, beta=0.1)
    assert theta.loss.item() == pytest.approx(dpo.loss.item(), rel=1e-14)
    shipped = load_config(root / "configs/loss/mallows_theta.yaml")  # the authors' reference-free defaults
    assert not get_loss_spec("mallows_theta").uses_reference(shipped.loss.params)
    free = load_config(root / "configs/loss/mpo_reference_free.yaml")
    mpo_hp = {**free.loss.params, "beta": free.loss.beta}
    mpo = get_loss_spec("mpo")
    assert not mpo.uses_reference(mpo_hp) and mpo.logp_reduction_for(mpo_hp) == "mean"
